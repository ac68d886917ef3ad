"""Cooperative key servers: KS-to-KS phase 1, ANN announcements, election, state sync.

Pure logic driven by the KS engine, which routes datagrams to it and passes
``now`` (wall clock: SA and key lifetimes, member times) and ``mono``
(monotonic: announcement, election and peer timers, so that a wall-clock jump
neither fires nor stalls them).  Coop sees its host only through
:class:`CoopHost`; its methods return the datagrams to send.

- every KS keeps a Main Mode SA with each configured peer (either side's SA
  serves; lost or expired SAs are re-established);
- the primary announces every ``announce_interval`` with the group key state;
  every KS announces its role, priority, version and member changes;
- a starting KS listens for two periods before claiming primary; secondaries
  that miss the primary for three periods elect: highest priority wins, ties
  go to the higher address; two primaries (a healed partition) resolve to the
  winner, the loser first rekeying its own GMs onto the winner's keys.

Over 600 lines because it is one state machine: election, announcements and
state sync all read and write the same peer table and role; the parts that
stand alone live apart (ANN block validation in annblocks.py, the key state in
group_keys.py, SID records in sender_ids.py).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import Any, Protocol

from gdoid import log
from gdoid.config.model import CoopConfig, CoopPeer
from gdoid.keyserver import sender_ids, state
from gdoid.keyserver.annblocks import (
    AnnInvalid,
    ParsedAnn,
    parse_ann,
    signing_key_block,
    signing_key_fingerprint,
)
from gdoid.keyserver.group import Group, Member, RekeyMessages
from gdoid.keyserver.group_keys import GroupKeyState
from gdoid.phase1 import coop_peer_phase1
from gdoid.protocol.ann import open_ann, seal_ann
from gdoid.protocol.constants import AuthenticationMethod
from gdoid.protocol.datagram import Address, Outgoing
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.events import Phase1Established, Phase1Failed
from gdoid.protocol.gdoi_payloads import AnnBlock, AnnFlag, AnnPayload, BlockType, Role
from gdoid.protocol.identity import describe_certificate, matching_pattern
from gdoid.protocol.ike_policy import Phase1Config
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.version import SoftwareVersion

MEMBER_CHUNK_BYTES = 24_000  # JSON per ANN so a datagram stays below 32 KiB
MISSED_PERIODS = 3
LISTEN_PERIODS = 2
REJECT_LOG_INTERVAL = 60.0  # one log line per (peer, reason) per minute
LATE = 0.001  # seconds past a "more than N periods" limit at which its timer is due

# ann_rejected reasons (counters ann_rejected_<reason>):
NOT_PEER = "not_peer"  # on an SA whose peer is not a configured COOP peer
AUTH = "auth"  # the SA was not authenticated with the peer's own COOP credentials
DECODE = "decode"  # does not decrypt / HASH(1) wrong / malformed payload
REPLAY = "replay"  # sequence number not above the last accepted one
UNKNOWN_GROUP = "unknown_group"
INVALID = "invalid"  # a block that does not validate (annblocks.parse_ann)
FINGERPRINT = "fingerprint"  # the peer's rekey signing key differs from ours: no sync
INTERNAL = "internal"  # a bug: logged with its traceback
NO_SA = "no_sa"  # for no phase-1 SA we hold (or one we refused as not a KS's)


class CoopHost(Protocol):
    """What Coop needs from the KS engine that hosts it (pure, no I/O), as pull.GroupDirectory for PULL."""

    scheduled_rekeys: bool  # rekeys on (primary) or off (secondary, listening)

    @property
    def groups(self) -> Mapping[int, Group]: ...

    @property
    def counters(self) -> Counter[str]: ...

    @property
    def log(self) -> Any: ...

    def phase1_sas(self, peer: IPv4Address) -> Iterable[IkeSa]:
        """Every phase-1 SA the host keeps with ``peer`` (either side initiated it)."""
        ...

    def drop_phase1_sas(self, peer: IPv4Address) -> None: ...

    def keys_changed(self, group: Group) -> None:
        """The group's keys were replaced from a peer (the host logs the new TEKs' keys)."""
        ...

    def persist(self) -> None:
        """Save the state now: called before a handover rekey leaves (SEQ never goes backwards)."""
        ...

    def send_rekey(self, group: Group, messages: RekeyMessages, now: float) -> Outgoing:
        """Push ``messages`` to every registered GM of ``group``, with retransmissions."""
        ...


class OncePerInterval:
    """At most one log line per key per interval; counts the lines it held back.

    A small local limiter (keys are (peer, reason) pairs, bounded in number), to be
    replaced by the general one in gdoid.log.
    """

    def __init__(self, interval: float = REJECT_LOG_INTERVAL, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[tuple[str, str], float] = {}
        self._held: Counter[tuple[str, str]] = Counter()

    def allow(self, key: tuple[str, str], now: float) -> int | None:
        """None: stay quiet; else log now, mentioning this many suppressed lines."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] += 1
            return None
        if last is None and len(self._last) >= self.max_keys:
            oldest = min(self._last, key=self._last.__getitem__)
            del self._last[oldest]
            self._held.pop(oldest, None)
        self._last[key] = now
        return self._held.pop(key, 0)


@dataclass
class Peer:
    address: IPv4Address
    port: int
    config: CoopPeer | None = None
    initiator: MainModeInitiator | None = None
    initiator_due: float | None = None  # monotonic: when the initiator's (wall) deadline comes
    sa: IkeSa | None = None
    next_attempt: float = 0.0  # monotonic
    recheck_at: float = 0.0  # monotonic: when its SA expires, or the next phase-1 attempt is due
    failures: int = 0
    version: SoftwareVersion | None = None
    priority: int | None = None
    role: int | None = None
    last_heard: float | None = None  # monotonic
    last_seq: int = 0
    ann_sent: int = 0
    ann_received: int = 0
    ann_rejected: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    sync_refused: dict[int, str] = field(default_factory=dict)  # group number -> why
    full_sent: bool = False
    ike_status: str = "Down"
    reachable: bool = False

    @property
    def addr(self) -> Address:
        return (str(self.address), self.port)

    def alive(self, mono: float, period: float) -> bool:
        return self.last_heard is not None and mono - self.last_heard <= MISSED_PERIODS * period


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
        host: CoopHost,
        now: float,
    ) -> None:
        self.config = config
        self.address = address
        self.version = version
        self.phase1 = phase1
        self.host = host
        self.log = host.log
        self.priority = config.priority
        self.period = config.announce_interval
        self.role: Role | None = None  # None while listening at start
        self.primary: IPv4Address | None = None
        # Monotonic times, set by the first call that brings the clocks (_clock):
        self.started_at: float | None = None
        self.last_primary_heard = 0.0
        self.next_announce = 0.0
        self._mono = 0.0  # of the call being handled
        self._wall_offset = 0.0  # now - mono at the last call
        self.ann_seq = int(now * 1_000_000)  # wall clock: strictly increasing across restarts too
        self.peers = {p.address: Peer(p.address, p.port, p) for p in config.peers}
        self.groups_state: dict[int, CoopGroupState] = {}  # by group number, made on first use
        self.on_role_change: Callable[[], None] | None = None
        self.on_dirty: Callable[[], None] | None = None  # the daemon saves state, coalesced
        self.synced = False  # True once primary, or once a primary's keys were adopted
        self._log_limit = OncePerInterval()

    # --- helpers -------------------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        return self.role == Role.PRIMARY

    def _rank(self, priority: int, address: IPv4Address) -> tuple[int, int]:
        return (priority, int(address))

    @property
    def my_rank(self) -> tuple[int, int]:
        return self._rank(self.priority, self.address)

    def _clock(self, now: float, mono: float) -> None:
        """Note the clocks of this call; the first one starts the listening period."""
        self._mono = mono
        self._wall_offset = now - mono
        if self.started_at is None:
            self.started_at = self.last_primary_heard = self.next_announce = mono

    def _mono_at(self, now: float) -> float:
        """The monotonic time of wall time ``now`` (for callers that have only the wall clock)."""
        return now - self._wall_offset

    def _group_state(self, group: Group) -> CoopGroupState:
        """Per-group COOP state, created on first use (a reload may add groups)."""
        gs = self.groups_state.get(group.number)
        if gs is None:
            gs = self.groups_state[group.number] = CoopGroupState()
            self._slice(group)
        return gs

    def prepare_group(self, group: Group) -> None:
        """Before the host hands out SIDs of ``group``: its slice of the SID space is set."""
        self._group_state(group)

    def _slice(self, group: Group) -> None:
        everyone = sorted([self.address, *self.peers])
        group.sids.set_slice(everyone.index(self.address), len(everyone))

    def _dirty(self) -> None:
        if self.on_dirty is not None:
            self.on_dirty()

    def auth_failure(self, peer: Peer, sa: IkeSa) -> str | None:
        """Why ``sa`` does not prove ``peer``'s own KS credentials (None: it does).

        A PSK SA must have used this peer's COOP key (never a GM key); a signature SA
        needs a certificate whose subject or subjectAltName matches a pinned identity.
        """
        conf = peer.config
        if conf is None:
            return "no credentials configured"
        if sa.peer_address != peer.address:
            return f"SA is with {sa.peer_address}"
        if sa.proposal.auth == AuthenticationMethod.PRE_SHARED_KEY:
            if conf.psk is None:
                return "pre-shared key, but this peer must use a certificate"
            if sa.psk_digest is None or not hmac.compare_digest(
                sa.psk_digest, hashlib.sha256(conf.psk).digest()
            ):
                return "pre-shared key is not this peer's COOP key"
            return None
        if sa.proposal.auth == AuthenticationMethod.RSA_SIG:
            if not conf.identities:
                return "certificate, but this peer must use its COOP pre-shared key"
            cert = sa.peer_certificate
            if cert is None or matching_pattern(conf.identities, cert) is None:
                subject = describe_certificate(cert, 120) if cert is not None else "none"
                return f"certificate {subject} matches no pinned identity"
            return None
        return f"authentication method {sa.proposal.auth}"

    def _usable_sa(self, peer: Peer, now: float) -> IkeSa | None:
        # Ours or one the peer initiated to us, whichever is newest: a restarted
        # peer has forgotten the older ones.  Only SAs that prove the peer's KS
        # credentials: one a GM set up from the peer's address never carries our keys.
        best = peer.sa if peer.sa is not None and peer.sa.expires_at > now else None
        for sa in self.host.phase1_sas(peer.address):
            if (
                sa.expires_at > now
                and (best is None or sa.established_at > best.established_at)
                and self.auth_failure(peer, sa) is None
            ):
                best = sa
        return best

    def owns_initiator(self, icky: bytes) -> Peer | None:
        return next(
            (
                p
                for p in self.peers.values()
                if p.initiator is not None and p.initiator.icky == icky
            ),
            None,
        )

    def _log_limited(
        self,
        peer: str,
        kind: str,
        mnemonic: log.Mnemonic | None = None,
        event: str = "",
        **fields: Any,
    ) -> None:
        suppressed = self._log_limit.allow((peer, kind), self._mono)
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        if mnemonic is not None:
            if suppressed:
                fields["reason"] = f"{fields.get('reason', '')} ({suppressed} more suppressed)"
                del fields["suppressed"]
            log.emit(self.log, mnemonic, peer=peer, **fields)
        else:
            self.log.warning(event, peer=peer, **fields)

    def _internal_error(self, where: str, peer: str, exc: BaseException) -> None:
        self.host.counters["coop_internal_error"] += 1
        if self._log_limit.allow((peer, f"{INTERNAL}:{where}"), self._mono) is not None:
            self.log.exception("coop_internal_error", where=where, peer=peer, error=repr(exc)[:200])

    # --- phase 1 to peers ----------------------------------------------------------------

    def _start_phase1(self, peer: Peer, now: float) -> Outgoing:
        config = (
            coop_peer_phase1(self.phase1, peer.config) if peer.config is not None else self.phase1
        )
        mm = MainModeInitiator(config, peer.address, now)
        out = mm.start(now)
        peer.initiator = mm
        self._track_initiator(peer, now)
        peer.ike_status = "Negotiating"
        return [(d, peer.addr) for d in out.send]

    def _track_initiator(self, peer: Peer, now: float) -> None:
        # The machine's deadline is on the wall clock it was given: it is due at the
        # same distance on the monotonic clock.
        deadline = peer.initiator.deadline if peer.initiator is not None else None
        peer.initiator_due = None if deadline is None else self._mono + max(0.0, deadline - now)

    def main_mode(self, peer: Peer, data: bytes, now: float, mono: float) -> Outgoing:
        """A Main Mode message of our own exchange with ``peer`` (its initiator cookie is ours)."""
        self._clock(now, mono)
        assert peer.initiator is not None
        out = peer.initiator.receive(data, now)
        self._track_initiator(peer, now)
        sends = [(d, peer.addr) for d in out.send]
        for ev in out.events:
            sends += self._phase1_event(peer, ev, now)
        return sends

    def _phase1_event(self, peer: Peer, ev: object, now: float) -> Outgoing:
        if isinstance(ev, Phase1Established):
            peer.initiator = peer.initiator_due = None
            why = self.auth_failure(peer, ev.sa)
            if why is not None:
                peer.failures += 1
                peer.ike_status = "Failed (not a KS credential)"
                peer.next_attempt = peer.recheck_at = self._mono + min(
                    30.0, self.period * 2 ** min(peer.failures, 5)
                )
                self._log_limited(
                    str(peer.address), AUTH, event="coop_peer_not_authenticated", reason=why
                )
                return []
            peer.sa = ev.sa
            peer.failures = 0
            return self._sa_up(peer, now)
        if isinstance(ev, Phase1Failed):
            peer.initiator = peer.initiator_due = None
            peer.failures += 1
            peer.ike_status = f"Failed ({ev.reason})"
            peer.next_attempt = peer.recheck_at = self._mono + min(
                30.0, self.period * 2 ** min(peer.failures, 5)
            )
            self._log_limited(
                str(peer.address), "phase1", event="coop_phase1_failed", reason=ev.reason
            )
        return []

    def peer_sa_up(self, peer: Peer, now: float, mono: float) -> Outgoing:
        self._clock(now, mono)
        return self._sa_up(peer, now)

    def _sa_up(self, peer: Peer, now: float) -> Outgoing:
        """A phase-1 SA with a peer exists (either side started it): say hello at once.

        The engine calls this for an SA a peer address set up to us.  One that does not
        prove the peer's KS credentials (a GM key or certificate) gets nothing from us:
        _usable_sa never picks it and every ANN on it is rejected (reason ``auth``).
        """
        latest = max(
            self.host.phase1_sas(peer.address), key=lambda sa: sa.established_at, default=None
        )
        why = self.auth_failure(peer, latest) if latest is not None else None
        if why is not None:
            self.host.counters["coop_sa_not_ks"] += 1
            self._log_limited(
                str(peer.address), AUTH, event="coop_peer_not_authenticated", reason=why
            )
        self._recheck(peer, now)
        if self._usable_sa(peer, now) is None:
            return []
        peer.ike_status = "Established"
        peer.full_sent = False
        return self._announce_to(peer, now, reply=True)

    # --- announcements ---------------------------------------------------------------------

    def _role_for_ann(self) -> Role:
        return Role.PRIMARY if self.is_primary else Role.SECONDARY

    def _keys_block(self, g: Group) -> AnnBlock:
        return AnnBlock.of(BlockType.GROUP_KEYS, GroupKeyState.of(g).to_json())

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
        gs = self._group_state(g)
        fingerprint = signing_key_block(g)  # in every ANN: each is checked on its own
        anns: list[list[AnnBlock]] = []
        if peer.sync_refused:
            # No keys and no members for a KS we refuse to sync with; the
            # fingerprint lets it see (and show) why.
            anns.append([])
        # Synced secondaries send theirs too: the primary takes only their SEQ (a
        # handover rekey from a former primary raised it); a restarted KS that is
        # still listening takes the keys, so it never claims primary with fresh ones.
        elif not peer.full_sent:
            blocks: list[AnnBlock] = [self._keys_block(g)] if self.is_primary or self.synced else []
            chunks = self._member_chunks(list(g.members.values()))
            for i, chunk in enumerate(chunks):
                part = AnnBlock.of(
                    BlockType.MEMBERS_FULL, {"chunk": i, "of": len(chunks), "members": chunk}
                )
                anns.append(([*blocks] if i == 0 else []) + [part])
            peer.full_sent = True
        else:
            blocks = [self._keys_block(g)] if self.is_primary or self.synced else []
            delta = list(gs.delta.values())
            chunks = self._member_chunks(delta) if delta else [[]]
            for i, chunk in enumerate(chunks):
                extra = [AnnBlock.of(BlockType.MEMBERS_DELTA, chunk)] if chunk else []
                anns.append(([*blocks] if i == 0 else []) + extra)
        if gs.removed and not peer.sync_refused:
            anns[0].append(
                AnnBlock.of(BlockType.MEMBERS_REMOVED, {str(a): t for a, t in gs.removed.items()})
            )
        if not peer.sync_refused:
            sender_ids.add_block(anns, g.sids, str(self.address), str(peer.address), now)
        out = []
        for i, blocks_i in enumerate(anns):
            self.ann_seq += 1
            # One reply per batch: a reply flag on every chunk would draw a full list per chunk.
            out.append(
                AnnPayload(
                    self.version,
                    self.priority,
                    self._role_for_ann(),
                    AnnFlag.REPLY_REQUESTED if reply and i == 0 else 0,
                    self.ann_seq,
                    g.number,
                    g.rekeys_sent & 0xFFFFFFFF,
                    (*blocks_i, fingerprint),
                )
            )
        return out

    def _announce_to(self, peer: Peer, now: float, reply: bool = False) -> Outgoing:
        sa = self._usable_sa(peer, now)
        if sa is None:
            return []
        out: Outgoing = []
        for g in list(self.host.groups.values()):
            try:  # one group that cannot be announced must not silence the others
                for ann in self._anns_for(peer, g, now, reply):
                    out.append((seal_ann(sa, ann), peer.addr))
                    peer.ann_sent += 1
            except Exception as exc:  # noqa: BLE001 - counted and logged with its traceback
                self._internal_error(f"announce group {g.name}", str(peer.address), exc)
        return out

    def _announce(self, now: float) -> Outgoing:
        out: Outgoing = []
        for peer in list(self.peers.values()):
            out += self._announce_to(peer, now)
        for number in [n for n in self.groups_state if n not in self.host.groups]:
            del self.groups_state[number]  # a group removed by a reload
        for gs in self.groups_state.values():
            gs.delta.clear()
            gs.removed.clear()
        self.host.counters["ann_sent"] += len(out)
        return out

    def member_changed(self, group: Group, member: Member) -> None:
        gs = self._group_state(group)
        gs.delta[member.address] = member
        gs.removed.pop(member.address, None)

    def member_removed(self, group: Group, address: IPv4Address, now: float) -> None:
        """GM removal or a GM dropped for missed rekeys: the other KSs forget it too."""
        gs = self._group_state(group)
        gs.delta.pop(address, None)
        gs.removed[address] = now
        gs.tombstones[address] = now

    # --- receiving ------------------------------------------------------------------------

    def receive_ann(
        self, sa: IkeSa, data: bytes, peer_addr: Address, now: float, mono: float
    ) -> Outgoing:
        """A COOP_ANN datagram on phase-1 SA ``sa``: the datagrams to answer with."""
        self._clock(now, mono)
        try:
            return self._receive_ann(sa, data, peer_addr, now)
        except Exception as exc:  # noqa: BLE001 - a bug must not cost the daemon its timers
            self._count_reject(self.peers.get(sa.peer_address), INTERNAL)
            self._internal_error("receive_ann", peer_addr[0], exc)
            return []

    def _receive_ann(self, sa: IkeSa, data: bytes, peer_addr: Address, now: float) -> Outgoing:
        peer = self.peers.get(sa.peer_address)
        if peer is None or peer_addr[0] != str(sa.peer_address):
            self._reject(
                None,
                str(sa.peer_address),
                NOT_PEER,
                "ANN on an SA that is not with a configured COOP peer",
            )
            return []
        why = self.auth_failure(peer, sa)
        if why is not None:  # checked before anything is decrypted
            self._reject(peer, peer_addr[0], AUTH, f"phase 1 not authenticated as a KS: {why}")
            return []
        try:
            ann = open_ann(sa, data)
        except ProtocolError as exc:
            self._reject(peer, peer_addr[0], DECODE, str(exc))
            return []
        if ann.sequence <= peer.last_seq:
            self._reject(
                peer,
                peer_addr[0],
                REPLAY,
                f"replayed ANN sequence {ann.sequence} (last {peer.last_seq})",
            )
            return []
        group = self.host.groups.get(ann.group_number)
        if group is None:
            self._reject(
                peer, peer_addr[0], UNKNOWN_GROUP, f"ANN for unknown group {ann.group_number}"
            )
            return []
        try:
            parsed = parse_ann(ann, group)
        except AnnInvalid as exc:
            self._reject(peer, peer_addr[0], INVALID, str(exc))
            return []
        if not self._fingerprint_matches(peer, group, parsed):
            return []
        # The whole ANN is valid: only now does any state change.
        return self._apply(peer, group, parsed, now)

    def _fingerprint_matches(self, peer: Peer, group: Group, parsed: ParsedAnn) -> bool:
        ours = signing_key_fingerprint(group)
        if hmac.compare_digest(parsed.fingerprint, ours):
            peer.sync_refused.pop(group.number, None)
        else:
            peer.sync_refused[group.number] = (
                f"rekey signing key differs in group {group.name}: peer sha256:{parsed.fingerprint.hex()[:16]}..., "
                f"ours sha256:{ours.hex()[:16]}..."
            )
        if not peer.sync_refused:
            return True
        # GET VPN needs one push-signing key on every KS: no keys, members or election from this peer.
        reason = next(iter(peer.sync_refused.values()))
        self._count_reject(peer, FINGERPRINT)
        self._log_limited(str(peer.address), FINGERPRINT, event="coop_sync_refused", reason=reason)
        return False

    def _apply(self, peer: Peer, group: Group, parsed: ParsedAnn, now: float) -> Outgoing:
        ann = parsed.ann
        peer.last_seq = ann.sequence
        peer.ann_received += 1
        self.host.counters["ann_received"] += 1
        if not peer.reachable:
            peer.reachable = True
            peer.full_sent = False  # members it missed while apart (deltas went nowhere)
            log.emit(self.log, log.COOP_KS_REACH, peer=str(peer.address), group=group.name)
        peer.last_heard = self._mono
        peer.version, peer.priority, peer.role = ann.version, ann.priority, ann.role
        out: Outgoing = []
        if self._merge_members(group, parsed):
            self._dirty()
        records = parsed.blocks.get(BlockType.SENDER_IDS)
        if records is not None:
            sender_ids.apply_records(group.sids, records, str(self.address), now)
        if ann.role == Role.PRIMARY:
            out += self._from_primary(peer, group, parsed, now)
        else:
            self._from_secondary(peer, group, parsed)
        if ann.flags & AnnFlag.REPLY_REQUESTED:
            peer.full_sent = False
            out += self._announce_to(peer, now)
        return out

    def reject_no_sa(self, peer_addr: Address, now: float, mono: float) -> None:
        """An ANN for cookies of no SA we keep: a peer's address is logged as itself,
        any other source under one shared key (spoofed sources fill no table)."""
        self._clock(now, mono)
        peer = self.peers.get(IPv4Address(peer_addr[0]))
        self._count_reject(peer, NO_SA)
        key = peer_addr[0] if peer is not None else "*"
        self._log_limited(
            key, NO_SA, log.COOP_ANN_REJECTED, reason=f"{NO_SA}: ANN for no phase-1 SA"
        )

    def _count_reject(self, peer: Peer | None, reason: str) -> None:
        if peer is not None:
            peer.ann_rejected += 1
            peer.rejected[reason] += 1
        self.host.counters["ann_rejected"] += 1
        self.host.counters[f"ann_rejected_{reason}"] += 1

    def _reject(self, peer: Peer | None, addr: str, reason: str, detail: str) -> None:
        self._count_reject(peer, reason)
        self._log_limited(addr, reason, log.COOP_ANN_REJECTED, reason=f"{reason}: {detail[:200]}")

    def _merge_members(self, group: Group, parsed: ParsedAnn) -> bool:
        """Apply MEMBERS_REMOVED / FULL / DELTA; True if the member table changed."""
        gs = self._group_state(group)
        changed = False
        for address, at in parsed.removed.items():
            gs.tombstones[address] = max(at, gs.tombstones.get(address, 0.0))
            m = group.members.get(address)
            if m is not None and m.registered_at <= at:
                group.remove_member(address)
                changed = True
        for m in parsed.members():
            if m.registered_at <= gs.tombstones.get(m.address, -1.0):
                continue  # removed after this registration
            old = group.members.get(m.address)
            if old is None or m.registered_at >= old.registered_at:
                if old is not None and old.pending is not None:
                    m.pending = old.pending
                changed = (
                    changed or old is None or state.member_to_json(old) != state.member_to_json(m)
                )
                group.members[m.address] = m
                if m.sender_ids:
                    group.sids.claim(m.identity, m.sender_ids)
        return changed

    def _install_keys(self, group: Group, keys: GroupKeyState) -> None:
        self.synced = True
        keys = replace(keys, seq=max(group.seq, keys.seq))  # SEQ never goes backwards
        changed = (group.kek, group.teks, group.seq) != (keys.kek, list(keys.teks), keys.seq)
        keys.install(group)
        if changed:
            self._dirty()
            self.host.keys_changed(group)

    def _from_primary(self, peer: Peer, group: Group, parsed: ParsedAnn, now: float) -> Outgoing:
        keys = parsed.keys
        out: Outgoing = []
        if self.is_primary:
            if self._rank(parsed.ann.priority, peer.address) <= self.my_rank:
                return self._announce_to(peer, now)  # we win: tell it at once
            # Two primaries and the peer wins: bring our GMs onto its keys, then step down.
            if keys is not None:
                out += self._handover(group, keys, now)
            self._become_secondary(peer.address, group, now)
            return out
        if keys is not None:
            self._install_keys(group, keys)
        self.last_primary_heard = self._mono
        if self.role is None and self.my_rank > self._rank(parsed.ann.priority, peer.address):
            # We outrank the running primary: take over, now that we are in sync.
            self._become_primary(group, now, previous=peer.address)
            return self._announce_all(now)
        if self.role != Role.SECONDARY or self.primary != peer.address:
            self._become_secondary(peer.address, group, now)
        return out

    def _from_secondary(self, peer: Peer, group: Group, parsed: ParsedAnn) -> None:
        keys = parsed.keys
        if keys is not None and self.role is None and not self.synced:
            self._install_keys(group, keys)  # restarted: the group's keys, not our fresh ones
        elif keys is not None and keys.seq > group.seq:
            group.seq = keys.seq
            self._dirty()

    def _handover(self, group: Group, keys: GroupKeyState, now: float) -> Outgoing:
        if keys.kek.spi == group.kek.spi and {t.spi for t in keys.teks} <= {
            t.spi for t in group.teks
        }:
            self._install_keys(group, keys)
            return []
        seq = max(group.seq, keys.seq) + 1
        messages = group.plan_handover(now, keys.kek, list(keys.teks), seq)
        self._install_keys(group, replace(keys, seq=seq))
        self.log.info("coop_handover", group=group.name, seq=seq, members=len(group.members))
        self.host.persist()  # saved before the rekey leaves: SEQ never goes backwards
        return self.host.send_rekey(group, messages, now)

    def _announce_all(self, now: float) -> Outgoing:
        out: Outgoing = []
        for peer in list(self.peers.values()):
            out += self._announce_to(peer, now)
        return out

    # --- roles ----------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Whether GMs may register here: not while listening, not before a first sync."""
        return self.is_primary or (self.role == Role.SECONDARY and self.synced)

    def _become_primary(
        self, group: Group | None, now: float, previous: IPv4Address | None
    ) -> None:
        self.role = Role.PRIMARY
        self.synced = True
        self.primary = self.address
        self.host.scheduled_rekeys = True
        for g in self.host.groups.values():
            log.emit(
                self.log,
                log.COOP_KS_TRANS_TO_PRI,
                ks=str(self.address),
                group=g.name,
                previous=str(previous) if previous else "NONE",
            )
        if self.on_role_change is not None:
            self.on_role_change()

    def _become_secondary(self, primary: IPv4Address, group: Group | None, now: float) -> None:
        was = self.role
        self.role = Role.SECONDARY
        self.primary = primary
        self.last_primary_heard = self._mono
        self.host.scheduled_rekeys = False
        if was != Role.SECONDARY:
            for g in self.host.groups.values():
                log.emit(
                    self.log,
                    log.COOP_KS_TRANS_TO_SEC,
                    ks=str(self.address),
                    group=g.name,
                    primary=str(primary),
                )
        if self.on_role_change is not None:
            self.on_role_change()

    def _elect(self, now: float) -> Outgoing:
        previous = self.primary
        for g in self.host.groups.values():
            log.emit(
                self.log,
                log.COOP_KS_ELECTION,
                group=g.name,
                previous=str(previous) if previous else "NONE",
            )
        candidates = [(self.my_rank, self.address)]
        for p in self.peers.values():
            if (
                p.alive(self._mono, self.period)
                and p.priority is not None
                and p.address != previous
                and not p.sync_refused
            ):
                candidates.append((self._rank(p.priority, p.address), p.address))
        _, winner = max(candidates)
        if winner == self.address:
            self._become_primary(None, now, previous)
            return self._announce_all(now)
        # The winner will announce itself; wait for it as a secondary.
        self._become_secondary(winner, None, now)
        return []

    # --- time ------------------------------------------------------------------------------

    def next_deadline(self, now: float, mono: float) -> float | None:
        """The monotonic time ``on_timer`` next has work (SA expiries mapped at ``now``)."""
        if self.started_at is None:
            return mono  # the first call starts the clocks
        times = [self.next_announce]
        if self.role is None:
            times.append(self.started_at + LISTEN_PERIODS * self.period)
        elif self.role == Role.SECONDARY:
            heard = self.last_primary_heard  # (no election while the primary is alive)
            primary_peer = self.peers.get(self.primary) if self.primary else None
            if (
                primary_peer is not None
                and primary_peer.role == Role.PRIMARY
                and primary_peer.last_heard is not None
            ):
                heard = max(heard, primary_peer.last_heard)
            times.append(heard + MISSED_PERIODS * self.period + LATE)
        if any(gs.delta or gs.removed for gs in self.groups_state.values()):
            times.append(mono)  # new members are told at once
        for peer in self.peers.values():
            if peer.initiator is not None:
                if peer.initiator_due is not None:
                    times.append(peer.initiator_due)
            else:
                times.append(peer.recheck_at)
            if peer.reachable and peer.last_heard is not None:
                times.append(peer.last_heard + MISSED_PERIODS * self.period + LATE)
        return min(times)

    def on_timer(self, now: float, mono: float) -> Outgoing:
        self._clock(now, mono)
        assert self.started_at is not None
        out: Outgoing = []
        for peer in list(self.peers.values()):
            try:  # one peer's failure must not stop the others, nor the engine's timers
                out += self._peer_timer(peer, now)
            except Exception as exc:  # noqa: BLE001 - counted and logged with its traceback
                self._internal_error("peer timer", str(peer.address), exc)
        if self.role is None and mono - self.started_at >= LISTEN_PERIODS * self.period:
            out += self._elect(now)
        elif (
            self.role == Role.SECONDARY
            and mono - self.last_primary_heard > MISSED_PERIODS * self.period
        ):
            primary_peer = self.peers.get(self.primary) if self.primary else None
            if (
                primary_peer is None
                or not primary_peer.alive(mono, self.period)
                or primary_peer.role != Role.PRIMARY
            ):
                out += self._elect(now)
        if mono >= self.next_announce:
            self.next_announce = mono + self.period
            out += self._announce(now)
        elif any(gs.delta or gs.removed for gs in self.groups_state.values()):
            out += self._announce(now)  # tell the others about new members at once
        return out

    def _peer_timer(self, peer: Peer, now: float) -> Outgoing:
        out: Outgoing = []
        mono = self._mono
        if peer.initiator is not None:
            if peer.initiator_due is not None and mono >= peer.initiator_due:
                # Due on the monotonic clock: the machine is told its deadline has come
                # even if the wall clock went back.
                given = max(now, peer.initiator.deadline or now)
                mm_out = peer.initiator.on_timeout(given)
                self._track_initiator(peer, given)
                out += [(d, peer.addr) for d in mm_out.send]
                for ev in mm_out.events:
                    out += self._phase1_event(peer, ev, now)
        elif self._usable_sa(peer, now) is None and mono >= peer.next_attempt:
            if peer.ike_status == "Established":
                peer.ike_status = "Expired"
            out += self._start_phase1(peer, now)
        if peer.reachable and not peer.alive(mono, self.period):
            peer.reachable = False
            for g in self.host.groups.values():
                log.emit(
                    self.log,
                    log.COOP_KS_UNREACH,
                    peer=str(peer.address),
                    group=g.name,
                    status=peer.ike_status,
                )
        self._recheck(peer, now)
        return out

    def _recheck(self, peer: Peer, now: float) -> None:
        """Note when the peer's SA needs looking at again (its lifetime is wall time)."""
        sa = self._usable_sa(peer, now)
        if sa is not None:
            peer.recheck_at = self._mono + max(0.0, sa.expires_at - now) + LATE
        else:
            peer.recheck_at = peer.next_attempt

    # --- reload ----------------------------------------------------------------------------

    def reload(self, config: CoopConfig, phase1: Phase1Config, now: float) -> None:
        """Adopt a reloaded [coop] and phase-1 config: new credentials apply to new SAs at once.

        A peer whose address, port or credentials changed starts over: its SAs (proved
        with the old credentials) are dropped and phase 1 is redone.
        """
        self.config = config
        self.phase1 = phase1
        self.priority = config.priority
        self.period = config.announce_interval
        before = set(self.peers)
        wanted = {p.address: p for p in config.peers}
        for address in list(self.peers):
            old = self.peers[address]
            conf = wanted.get(address)
            if conf is None or conf != old.config:
                self._forget_peer(old)
                del self.peers[address]
        for address, conf in wanted.items():
            if address not in self.peers:
                self.peers[address] = Peer(
                    address, conf.port, conf, next_attempt=self._mono_at(now)
                )
        if set(self.peers) != before:  # the SID space is sliced anew; added groups on first use
            for g in self.host.groups.values():
                if g.number in self.groups_state:
                    self._slice(g)

    def _forget_peer(self, peer: Peer) -> None:
        self.host.drop_phase1_sas(peer.address)
        peer.sa = None
        peer.initiator = peer.initiator_due = None
        peer.recheck_at = 0.0

    # --- show ------------------------------------------------------------------------------

    def key_servers(self) -> list[tuple[IPv4Address, SoftwareVersion | None]]:
        """Every KS of the group with its version: ours, and each peer's from its ANNs."""
        peers = sorted(self.peers.values(), key=lambda p: p.address)
        return [(self.address, self.version), *((p.address, p.version) for p in peers)]

    def describe(self, now: float) -> dict[str, Any]:
        mono = self._mono_at(now)
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
                    "role": "Primary"
                    if p.role == Role.PRIMARY
                    else "Secondary"
                    if p.role == Role.SECONDARY
                    else "Unknown",
                    "version": str(p.version) if p.version else "unknown",
                    "status": "Sync refused"
                    if p.sync_refused
                    else "Alive"
                    if p.alive(mono, self.period)
                    else "Dead",
                    "ann_sent": p.ann_sent,
                    "ann_received": p.ann_received,
                    "ann_rejected": p.ann_rejected,
                    "rejected": dict(p.rejected),
                    "sync": "; ".join(p.sync_refused.values()) or None,
                    "auth": ("psk" if p.config and p.config.psk is not None else "")
                    + ("+" if p.config and p.config.psk is not None and p.config.identities else "")
                    + ("certificate" if p.config and p.config.identities else ""),
                    "last_heard": None if p.last_heard is None else round(mono - p.last_heard, 1),
                    "ike_status": p.ike_status,
                }
                for p in self.peers.values()
            ],
        }
