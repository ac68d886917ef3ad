"""Cooperative key servers: KS-to-KS phase 1, ANN announcements, election, state sync.

Pure logic driven by the KS engine (it passes ``now`` and routes datagrams):

- every KS keeps a Main Mode SA with each configured peer (either side's SA
  serves; lost or expired SAs are re-established);
- the primary announces every ``announce_interval`` with the group key state;
  every KS announces its role, priority, version and member changes;
- a starting KS listens for two periods before claiming primary; secondaries
  that miss the primary for three periods elect: highest priority wins, ties
  go to the higher address; two primaries (a healed partition) resolve to the
  winner, the loser first rekeying its own GMs onto the winner's keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from gdoid import log
from gdoid.config import CoopConfig
from gdoid.keyserver import state
from gdoid.keyserver.group import Group, Member
from gdoid.protocol.ann import AnnBlock, AnnFlag, AnnPayload, BlockType, Role, open_ann, seal_ann
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.ike import (
    IkeSa,
    MainModeInitiator,
    Phase1Config,
    Phase1Established,
    Phase1Failed,
)
from gdoid.protocol.version import SoftwareVersion

if TYPE_CHECKING:
    from gdoid.keyserver.engine import KeyServerEngine

Address = tuple[str, int]
Outgoing = list[tuple[bytes, Address]]

MEMBER_CHUNK_BYTES = 24_000  # JSON per ANN so a datagram stays below 32 KiB
MISSED_PERIODS = 3
LISTEN_PERIODS = 2


@dataclass
class Peer:
    address: IPv4Address
    port: int
    initiator: MainModeInitiator | None = None
    sa: IkeSa | None = None
    next_attempt: float = 0.0
    failures: int = 0
    version: SoftwareVersion | None = None
    priority: int | None = None
    role: int | None = None
    last_heard: float | None = None
    last_seq: int = 0
    ann_sent: int = 0
    ann_received: int = 0
    ann_rejected: int = 0
    full_sent: bool = False
    ike_status: str = "Down"
    reachable: bool = False

    @property
    def addr(self) -> Address:
        return (str(self.address), self.port)

    def alive(self, now: float, period: float) -> bool:
        return self.last_heard is not None and now - self.last_heard <= MISSED_PERIODS * period


@dataclass
class CoopGroupState:
    delta: dict[IPv4Address, Member] = field(default_factory=dict)
    removed: dict[IPv4Address, float] = field(default_factory=dict)  # to announce
    tombstones: dict[IPv4Address, float] = field(default_factory=dict)  # removal times


class Coop:
    def __init__(
        self,
        config: CoopConfig,
        address: IPv4Address,
        version: SoftwareVersion,
        phase1: Phase1Config,
        engine: KeyServerEngine,
        now: float,
    ) -> None:
        self.config = config
        self.address = address
        self.version = version
        self.phase1 = phase1
        self.engine = engine
        self.log = engine.log
        self.priority = config.priority
        self.period = config.announce_interval
        self.role: Role | None = None  # None while listening at start
        self.primary: IPv4Address | None = None
        self.started_at = now
        self.last_primary_heard = now
        self.next_announce = now
        self.ann_seq = int(now * 1_000_000)  # strictly increasing across restarts too
        self.peers = {p.address: Peer(p.address, p.port) for p in config.peers}
        self.groups_state: dict[int, CoopGroupState] = {n: CoopGroupState() for n in engine.groups}
        self.on_role_change: Callable[[], None] | None = None
        self.synced = False  # True once primary, or once a primary's keys were adopted
        everyone = sorted([address, *self.peers])
        for g in engine.groups.values():
            g.sids.set_slice(everyone.index(address), len(everyone))

    # --- helpers -------------------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role == Role.PRIMARY

    def _rank(self, priority: int, address: IPv4Address) -> tuple[int, int]:
        return (priority, int(address))

    @property
    def my_rank(self) -> tuple[int, int]:
        return self._rank(self.priority, self.address)

    def _usable_sa(self, peer: Peer, now: float) -> IkeSa | None:
        # Ours or one the peer initiated to us, whichever is newest: a restarted
        # peer has forgotten the older ones.
        best = peer.sa if peer.sa is not None and peer.sa.expires_at > now else None
        for entry in self.engine.sas.values():
            if entry.sa.peer_address == peer.address and entry.sa.expires_at > now and (
                best is None or entry.sa.established_at > best.established_at
            ):
                best = entry.sa
        return best

    def owns_initiator(self, icky: bytes) -> Peer | None:
        return next((p for p in self.peers.values() if p.initiator is not None and p.initiator.icky == icky), None)

    # --- phase 1 to peers ----------------------------------------------------------------

    def _start_phase1(self, peer: Peer, now: float) -> Outgoing:
        mm = MainModeInitiator(self.phase1, peer.address, now)
        out = mm.start(now)
        peer.initiator = mm
        peer.ike_status = "Negotiating"
        return [(d, peer.addr) for d in out.send]

    def main_mode(self, peer: Peer, data: bytes, now: float) -> Outgoing:
        assert peer.initiator is not None
        out = peer.initiator.receive(data, now)
        sends = [(d, peer.addr) for d in out.send]
        for ev in out.events:
            sends += self._phase1_event(peer, ev, now)
        return sends

    def _phase1_event(self, peer: Peer, ev: object, now: float) -> Outgoing:
        if isinstance(ev, Phase1Established):
            peer.sa = ev.sa
            peer.initiator = None
            peer.failures = 0
            return self.peer_sa_up(peer, now)
        if isinstance(ev, Phase1Failed):
            peer.initiator = None
            peer.failures += 1
            peer.ike_status = f"Failed ({ev.reason})"
            peer.next_attempt = now + min(30.0, self.period * 2 ** min(peer.failures, 5))
            self.log.warning("coop_phase1_failed", peer=str(peer.address), reason=ev.reason)
        return []

    def peer_sa_up(self, peer: Peer, now: float) -> Outgoing:
        """A phase-1 SA with a peer exists (either side started it): say hello at once."""
        peer.ike_status = "Established"
        peer.full_sent = False
        return self._announce_to(peer, now, reply=True)

    # --- announcements ---------------------------------------------------------------------

    def _role_for_ann(self) -> Role:
        return Role.PRIMARY if self.is_primary else Role.SECONDARY

    def _keys_block(self, g: Group) -> AnnBlock:
        return AnnBlock.of(BlockType.GROUP_KEYS, {
            "seq": g.seq, "epoch": g.epoch, "last_rekey_at": g.last_rekey_at, "rekeys_sent": g.rekeys_sent,
            "kek": state.kek_to_json(g.kek), "teks": [state.tek_to_json(t) for t in g.teks],
        })

    def _member_chunks(self, members: list[Member]) -> list[list[dict[str, Any]]]:
        chunks: list[list[dict[str, Any]]] = [[]]
        size = 0
        for m in members:
            j = state.member_to_json(m)
            n = len(str(j))
            if chunks[-1] and size + n > MEMBER_CHUNK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(j)
            size += n
        return chunks

    def _anns_for(self, peer: Peer, g: Group, now: float, reply: bool) -> list[AnnPayload]:
        # Synced secondaries send theirs too: the primary takes only their SEQ (a
        # handover rekey from a former primary raised it); a restarted KS that is
        # still listening takes the keys, so it never claims primary with fresh ones.
        blocks: list[AnnBlock] = [self._keys_block(g)] if self.is_primary or self.synced else []
        delta = list(self.groups_state[g.number].delta.values())
        anns: list[list[AnnBlock]] = []
        if not peer.full_sent:
            chunks = self._member_chunks(list(g.members.values()))
            for i, chunk in enumerate(chunks):
                part = AnnBlock.of(BlockType.MEMBERS_FULL, {"chunk": i, "of": len(chunks), "members": chunk})
                anns.append(([*blocks] if i == 0 else []) + [part])
            peer.full_sent = True
        else:
            chunks = self._member_chunks(delta) if delta else [[]]
            for i, chunk in enumerate(chunks):
                extra = [AnnBlock.of(BlockType.MEMBERS_DELTA, chunk)] if chunk else []
                anns.append(([*blocks] if i == 0 else []) + extra)
        removed = self.groups_state[g.number].removed
        if removed:
            anns[0].append(AnnBlock.of(BlockType.MEMBERS_REMOVED, {str(a): t for a, t in removed.items()}))
        out = []
        for i, blocks_i in enumerate(anns):
            self.ann_seq += 1
            # One reply per batch: a reply flag on every chunk would draw a full list per chunk.
            out.append(AnnPayload(
                self.version, self.priority, self._role_for_ann(),
                AnnFlag.REPLY_REQUESTED if reply and i == 0 else 0, self.ann_seq, g.number, g.rekeys_sent & 0xFFFFFFFF,
                tuple(blocks_i),
            ))
        return out

    def _announce_to(self, peer: Peer, now: float, reply: bool = False) -> Outgoing:
        sa = self._usable_sa(peer, now)
        if sa is None:
            return []
        out: Outgoing = []
        for g in self.engine.groups.values():
            for ann in self._anns_for(peer, g, now, reply):
                out.append((seal_ann(sa, ann), peer.addr))
                peer.ann_sent += 1
        return out

    def announce(self, now: float) -> Outgoing:
        out: Outgoing = []
        for peer in self.peers.values():
            out += self._announce_to(peer, now)
        for gs in self.groups_state.values():
            gs.delta.clear()
            gs.removed.clear()
        self.engine.counters["ann_sent"] += len(out)
        return out

    def member_changed(self, group: Group, member: Member) -> None:
        gs = self.groups_state[group.number]
        gs.delta[member.address] = member
        gs.removed.pop(member.address, None)

    def member_removed(self, group: Group, address: IPv4Address, now: float) -> None:
        """GM removal or a GM dropped for missed rekeys: the other KSs forget it too."""
        gs = self.groups_state[group.number]
        gs.delta.pop(address, None)
        gs.removed[address] = now
        gs.tombstones[address] = now

    # --- receiving ------------------------------------------------------------------------

    def receive_ann(self, sa: IkeSa, data: bytes, peer_addr: Address, now: float) -> Outgoing:
        peer = self.peers.get(sa.peer_address)
        if peer is None:
            self._reject(None, peer_addr[0], "ANN from a KS that is not a configured peer")
            return []
        try:
            ann = open_ann(sa, data)
        except ProtocolError as exc:
            self._reject(peer, peer_addr[0], str(exc))
            return []
        if ann.sequence <= peer.last_seq:
            self._reject(peer, peer_addr[0], f"replayed ANN sequence {ann.sequence} (last {peer.last_seq})")
            return []
        group = self.engine.groups.get(ann.group_number)
        if group is None:
            self._reject(peer, peer_addr[0], f"ANN for unknown group {ann.group_number}")
            return []
        peer.last_seq = ann.sequence
        peer.ann_received += 1
        self.engine.counters["ann_received"] += 1
        if not peer.reachable:
            peer.reachable = True
            peer.full_sent = False  # members it missed while apart (deltas went nowhere)
            log.emit(self.log, log.COOP_KS_REACH, peer=str(peer.address), group=group.name)
        peer.last_heard = now
        peer.version, peer.priority, peer.role = ann.version, ann.priority, ann.role
        out: Outgoing = []
        try:
            self._merge_members(group, ann)
            if ann.role == Role.PRIMARY:
                out += self._from_primary(peer, group, ann, now)
            else:
                self._from_secondary(peer, group, ann)
        except ProtocolError as exc:
            self._reject(peer, peer_addr[0], str(exc))
            return out
        if ann.flags & AnnFlag.REPLY_REQUESTED:
            peer.full_sent = False
            out += self._announce_to(peer, now)
        return out

    def _reject(self, peer: Peer | None, addr: str, reason: str) -> None:
        if peer is not None:
            peer.ann_rejected += 1
        self.engine.counters["ann_rejected"] += 1
        self.engine.log_limit.emit(self.log, log.COOP_ANN_REJECTED, peer=addr, reason=reason)  # rate-limited

    def _merge_members(self, group: Group, ann: AnnPayload) -> None:
        gs = self.groups_state[group.number]
        gone = ann.block(BlockType.MEMBERS_REMOVED)
        if gone is not None:
            try:
                removed = {IPv4Address(a): float(t) for a, t in gone.json().items()}
            except (AttributeError, TypeError, ValueError) as exc:
                raise ProtocolError(f"ANN removed-members block: {exc}") from exc
            for address, at in removed.items():
                gs.tombstones[address] = max(at, gs.tombstones.get(address, 0.0))
                m = group.members.get(address)
                if m is not None and m.registered_at <= at:
                    group.remove_member(address)
        for btype in (BlockType.MEMBERS_FULL, BlockType.MEMBERS_DELTA):
            block = ann.block(btype)
            if block is None:
                continue
            value = block.json()
            rows = value["members"] if btype == BlockType.MEMBERS_FULL else value
            try:
                members = [state.member_from_json(r) for r in rows]
            except (KeyError, TypeError, ValueError) as exc:
                raise ProtocolError(f"ANN member block: {exc}") from exc
            for m in members:
                if m.registered_at <= gs.tombstones.get(m.address, -1.0):
                    continue  # removed after this registration
                old = group.members.get(m.address)
                if old is None or m.registered_at >= old.registered_at:
                    if old is not None and old.pending is not None:
                        m.pending = old.pending
                    group.members[m.address] = m
                    if m.sender_ids:
                        group.sids.claim(m.identity, m.sender_ids)

    def _adopt_keys(self, group: Group, ann: AnnPayload) -> dict[str, Any] | None:
        block = ann.block(BlockType.GROUP_KEYS)
        if block is None:
            return None
        value = block.json()
        try:
            return {
                "seq": int(value["seq"]), "epoch": float(value["epoch"]),
                "last_rekey_at": float(value["last_rekey_at"]), "rekeys_sent": int(value["rekeys_sent"]),
                "kek": state.kek_from_json(value["kek"]), "teks": [state.tek_from_json(t) for t in value["teks"]],
            }
        except (KeyError, TypeError, ValueError, state.StateError) as exc:
            raise ProtocolError(f"ANN key block: {exc}") from exc

    def _install_keys(self, group: Group, keys: dict[str, Any]) -> None:
        self.synced = True
        group.kek = keys["kek"]
        group.teks = keys["teks"]
        group.seq = max(group.seq, keys["seq"])
        group.epoch = keys["epoch"]
        group.last_rekey_at = keys["last_rekey_at"]
        group.rekeys_sent = keys["rekeys_sent"]
        if self.engine.keylog is not None:
            for t in group.teks:
                self.engine.keylog.esp(t)

    def _from_primary(self, peer: Peer, group: Group, ann: AnnPayload, now: float) -> Outgoing:
        keys = self._adopt_keys(group, ann)
        out: Outgoing = []
        if self.is_primary:
            if self._rank(ann.priority, peer.address) <= self.my_rank:
                return self._announce_to(peer, now)  # we win: tell it at once
            # Two primaries and the peer wins: bring our GMs onto its keys, then step down.
            if keys is not None:
                out += self._handover(group, keys, now)
            self._become_secondary(peer.address, group, now)
            return out
        if keys is not None:
            self._install_keys(group, keys)
        self.last_primary_heard = now
        if self.role is None and self.my_rank > self._rank(ann.priority, peer.address):
            # We outrank the running primary: take over, now that we are in sync.
            self._become_primary(group, now, previous=peer.address)
            return self._announce_all(now)
        if self.role != Role.SECONDARY or self.primary != peer.address:
            self._become_secondary(peer.address, group, now)
        return out

    def _from_secondary(self, peer: Peer, group: Group, ann: AnnPayload) -> None:
        keys = self._adopt_keys(group, ann)
        if keys is not None and self.role is None and not self.synced:
            self._install_keys(group, keys)  # restarted: the group's keys, not our fresh ones
        elif keys is not None and keys["seq"] > group.seq:
            group.seq = keys["seq"]

    def _handover(self, group: Group, keys: dict[str, Any], now: float) -> Outgoing:
        if keys["kek"].spi == group.kek.spi and {t.spi for t in keys["teks"]} <= {t.spi for t in group.teks}:
            self._install_keys(group, keys)
            return []
        seq = max(group.seq, keys["seq"]) + 1
        messages = group.plan_handover(now, keys["kek"], keys["teks"], seq)
        keys = {**keys, "seq": seq}
        self._install_keys(group, keys)
        self.log.info("coop_handover", group=group.name, seq=seq, members=len(group.members))
        return self.engine.send_rekey(group, messages, now)

    def _announce_all(self, now: float) -> Outgoing:
        out: Outgoing = []
        for peer in self.peers.values():
            out += self._announce_to(peer, now)
        return out

    # --- roles ----------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Whether GMs may register here: not while listening, not before a first sync."""
        return self.is_primary or (self.role == Role.SECONDARY and self.synced)

    def _become_primary(self, group: Group | None, now: float, previous: IPv4Address | None) -> None:
        self.role = Role.PRIMARY
        self.synced = True
        self.primary = self.address
        self.engine.scheduled_rekeys = True
        for g in self.engine.groups.values():
            log.emit(self.log, log.COOP_KS_TRANS_TO_PRI, ks=str(self.address), group=g.name,
                     previous=str(previous) if previous else "NONE")
        if self.on_role_change is not None:
            self.on_role_change()

    def _become_secondary(self, primary: IPv4Address, group: Group | None, now: float) -> None:
        was = self.role
        self.role = Role.SECONDARY
        self.primary = primary
        self.last_primary_heard = now
        self.engine.scheduled_rekeys = False
        if was != Role.SECONDARY:
            for g in self.engine.groups.values():
                log.emit(self.log, log.COOP_KS_TRANS_TO_SEC, ks=str(self.address), group=g.name, primary=str(primary))
        if self.on_role_change is not None:
            self.on_role_change()

    def _elect(self, now: float) -> Outgoing:
        previous = self.primary
        for g in self.engine.groups.values():
            log.emit(self.log, log.COOP_KS_ELECTION, group=g.name, previous=str(previous) if previous else "NONE")
        candidates = [(self.my_rank, self.address)]
        for p in self.peers.values():
            if p.alive(now, self.period) and p.priority is not None and p.address != previous:
                candidates.append((self._rank(p.priority, p.address), p.address))
        _, winner = max(candidates)
        if winner == self.address:
            self._become_primary(None, now, previous)
            return self._announce_all(now)
        # The winner will announce itself; wait for it as a secondary.
        self._become_secondary(winner, None, now)
        return []

    # --- time ------------------------------------------------------------------------------

    def on_timer(self, now: float) -> Outgoing:
        out: Outgoing = []
        for peer in self.peers.values():
            if peer.initiator is not None:
                mm_out = peer.initiator.on_timeout(now)
                out += [(d, peer.addr) for d in mm_out.send]
                for ev in mm_out.events:
                    out += self._phase1_event(peer, ev, now)
            elif self._usable_sa(peer, now) is None and now >= peer.next_attempt:
                if peer.ike_status == "Established":
                    peer.ike_status = "Expired"
                out += self._start_phase1(peer, now)
            if peer.reachable and not peer.alive(now, self.period):
                peer.reachable = False
                for g in self.engine.groups.values():
                    log.emit(self.log, log.COOP_KS_UNREACH, peer=str(peer.address), group=g.name, status=peer.ike_status)
        if self.role is None and now - self.started_at >= LISTEN_PERIODS * self.period:
            out += self._elect(now)
        elif self.role == Role.SECONDARY and now - self.last_primary_heard > MISSED_PERIODS * self.period:
            primary_peer = self.peers.get(self.primary) if self.primary else None
            if primary_peer is None or not primary_peer.alive(now, self.period) or primary_peer.role != Role.PRIMARY:
                out += self._elect(now)
        if now >= self.next_announce:
            self.next_announce = now + self.period
            out += self.announce(now)
        elif any(gs.delta or gs.removed for gs in self.groups_state.values()):
            out += self.announce(now)  # tell the others about new members at once
        return out

    # --- show ------------------------------------------------------------------------------

    def key_servers(self) -> list[tuple[IPv4Address, SoftwareVersion | None]]:
        """Every KS of the group with its version: ours, and each peer's from its ANNs."""
        peers = sorted(self.peers.values(), key=lambda p: p.address)
        return [(self.address, self.version), *((p.address, p.version) for p in peers)]

    def describe(self, now: float) -> dict[str, Any]:
        role = {Role.PRIMARY: "Primary", Role.SECONDARY: "Secondary", None: "Listening"}[self.role]
        return {
            "address": str(self.address),
            "priority": self.priority,
            "role": role,
            "version": str(self.version),
            "primary": str(self.primary) if self.primary else None,
            "announce_interval": self.period,
            "peers": [
                {
                    "address": str(p.address),
                    "priority": p.priority,
                    "role": {Role.PRIMARY: "Primary", Role.SECONDARY: "Secondary"}.get(p.role, "Unknown"),  # type: ignore[call-overload]
                    "version": str(p.version) if p.version else "unknown",
                    "status": "Alive" if p.alive(now, self.period) else "Dead",
                    "ann_sent": p.ann_sent,
                    "ann_received": p.ann_received,
                    "ann_rejected": p.ann_rejected,
                    "last_heard": None if p.last_heard is None else round(now - p.last_heard, 1),
                    "ike_status": p.ike_status,
                }
                for p in self.peers.values()
            ],
        }
