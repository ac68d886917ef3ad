"""The key server's datagram dispatcher: no sockets, no clock of its own.

``datagram_received(data, peer, now)`` routes a datagram by exchange type and
cookies to a Main Mode responder, an established phase-1 SA, or a
GROUPKEY-PULL responder, and returns the datagrams to send.  Bad input is a
counted, logged drop, never an exception.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from gdoid import log
from gdoid.keylog import KeyLog
from gdoid.keyserver import authorization
from gdoid.keyserver.group import Group, Member, PendingPush, RekeyMessages

if TYPE_CHECKING:
    from gdoid.keyserver.coop import Coop
from gdoid.protocol.constants import ExchangeType, NotifyType
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.ike import (
    IkeSa,
    MainModeResponder,
    Phase1Config,
    Phase1Established,
    Phase1Failed,
)
from gdoid.protocol.payloads import DeletePayload, NotifyPayload
from gdoid.protocol.policy import GroupKeys, SenderIds
from gdoid.protocol.pull import MemberRegistered, PopSigner, PullFailed, PullOutput, PullResponder
from gdoid.protocol.push import GROUPKEY_PUSH_ACK, ack_key, parse_ack, verify_ack
from gdoid.protocol.version import supports_removal_and_replace

Address = tuple[str, int]
Outgoing = list[tuple[bytes, Address]]

SA_LINGER = 30.0  # keep a phase-1 SA this long after its last use (retransmits, errors)
MAX_PULLS_PER_SA = 8
MAX_SAS_PER_PEER = 4


@dataclass
class _SaEntry:
    sa: IkeSa
    addr: Address
    last_used: float


class KeyServerEngine:
    def __init__(
        self,
        phase1: Phase1Config,
        groups: dict[int, Group],
        *,
        max_half_open: int = 4096,
        keylog: KeyLog | None = None,
        logger: object | None = None,
    ) -> None:
        self.phase1 = phase1
        self.groups = groups
        self.max_half_open = max_half_open
        self.keylog = keylog
        self.log = logger or log.get_logger("gdoid.ks")
        self.responders: dict[bytes, tuple[MainModeResponder, Address]] = {}
        # Established exchanges, to answer a retransmitted MM5 whose MM6 was lost:
        # (MM5 received, MM6 sent, peer, when).  Only the two datagrams are kept,
        # not the responder with its DH key, nonces and keys.
        self.completed: dict[bytes, tuple[bytes, bytes, Address, float]] = {}
        # Completed registrations: (cookies, M-ID) -> (message 3, message 4, peer, time).
        # The phase-1 SA is dropped at once; this is all a retransmission needs.
        self.pulls_done: dict[tuple[bytes, int], tuple[bytes, bytes, Address, float]] = {}
        self.sas: dict[bytes, _SaEntry] = {}
        self.pulls: dict[tuple[bytes, int], PullResponder] = {}
        # Indexes, so that no datagram costs a scan of every SA or exchange:
        self._peer_sas: dict[Address, list[bytes]] = {}  # peer -> its SAs' cookies, oldest first
        self._sa_pulls: dict[bytes, set[int]] = {}  # SA cookies -> message IDs in self.pulls
        self.counters: Counter[str] = Counter()
        self.scheduled_rekeys = True
        self.coop: Coop | None = None
        self._coop_out: Outgoing = []
        self.on_state_change: Callable[[], None] | None = None  # persist before sending
        self._last_drop_log = 0.0
        self._now = 0.0  # of the datagram being handled (SID allocation needs it)
        self._refusal: authorization.Refusal | None = None  # from authorize(), logged with its PullFailed
        self._authz_log = authorization.LogLimiter()
        if keylog is not None:
            for g in groups.values():
                for t in g.teks:
                    keylog.esp(t)

    # --- GroupDirectory for the PULL responder -------------------------------

    def pop_signer(self, group_number: int) -> PopSigner:
        # A GM that pins its KS asks for a proof of the KS role in message 4.
        g = self.groups[group_number]
        sig = self.phase1.signature
        return PopSigner(
            sig.certificate if sig else None, sig.private_key if sig else None, g.signing_key, g.kek.sig_hash
        )

    def snapshot(self, group_number: int, now: float) -> GroupKeys | None:
        g = self.groups.get(group_number)
        return g.snapshot(now) if g is not None else None

    def allocate_sender_ids(self, group_number: int, count: int, member: str) -> SenderIds | None:
        g = self.groups[group_number]
        values = g.sids.allocate(member, count, self._now)
        return SenderIds(g.sids.bits, values) if values is not None else None

    def authorize(self, group_number: int, sa: IkeSa) -> str | None:
        """The group's ``authorization address`` / ``identity`` (phase 1 authenticated the peer)."""
        g = self.groups.get(group_number)
        if g is None:
            return None  # the responder refuses an unknown group itself
        self._refusal = authorization.check(g.config.authorization, g.name, sa)
        return self._refusal.reason if self._refusal is not None else None

    # --- input ------------------------------------------------------------------

    def drop(self, peer: Address, reason: str, now: float) -> None:
        self.counters["dropped"] += 1
        # A flood must not turn into a log flood: at most ~10 lines a second.
        if now - self._last_drop_log >= 0.1:
            self._last_drop_log = now
            log.emit(self.log, log.MALFORMED_DROP, peer=peer[0], reason=reason)

    def datagram_received(self, data: bytes, peer: Address, now: float) -> Outgoing:
        self.counters["received"] += 1
        self._now = now
        try:
            header = IsakmpHeader.decode(data)
        except ProtocolError as exc:
            self.drop(peer, str(exc), now)
            return []
        try:
            if header.exchange_type == ExchangeType.IDENTITY_PROTECTION:
                return self._main_mode(header, data, peer, now)
            if header.exchange_type == ExchangeType.GROUPKEY_PULL:
                return self._pull(header, data, peer, now)
            if header.exchange_type == ExchangeType.INFORMATIONAL:
                return self._informational(header, data, peer, now)
            if header.exchange_type == GROUPKEY_PUSH_ACK:
                return self._ack(data, peer, now)
            if header.exchange_type == ExchangeType.COOP_ANN:
                return self._ann(header, data, peer, now)
        except ProtocolError as exc:
            self.drop(peer, str(exc), now)
            return []
        self.drop(peer, f"exchange type {header.exchange_type} not served", now)
        return []

    def _ann(self, header: IsakmpHeader, data: bytes, peer: Address, now: float) -> Outgoing:
        if self.coop is None:
            self.drop(peer, "COOP announcement but no [coop] configured", now)
            return []
        entry = self.sas.get(header.cookies)
        sa = entry.sa if entry is not None else None
        if entry is not None:
            entry.last_used = now
        if sa is None:
            sa = next((p.sa for p in self.coop.peers.values() if p.sa is not None and p.sa.cookies == header.cookies), None)
        if sa is None:
            self.counters["dropped"] += 1
            self.coop.reject_no_sa(peer, now)  # counted by reason, logged once a minute
            return []
        return self.coop.receive_ann(sa, data, peer, now)

    def _main_mode(self, header: IsakmpHeader, data: bytes, peer: Address, now: float) -> Outgoing:
        if self.coop is not None:
            coop_peer = self.coop.owns_initiator(header.initiator_cookie)
            if coop_peer is not None:
                return self.coop.main_mode(coop_peer, data, now)
        entry = self.responders.get(header.initiator_cookie)
        if entry is None:
            done = self.completed.get(header.initiator_cookie)
            if done is not None and done[2] == peer and data == done[0]:
                return [(done[1], peer)]  # our MM6 was lost: send it again
            if header.responder_cookie != bytes(8):
                self.drop(peer, "Main Mode message for an unknown exchange", now)
                return []
            if self.coop is not None and not self.coop.serving and IPv4Address(peer[0]) not in self.coop.peers:
                self.counters["not_serving"] += 1
                self.drop(peer, "not serving registrations before COOP election and sync", now)
                return []
            if len(self.responders) >= self.max_half_open:
                self.counters["half_open_refused"] += 1
                self.drop(peer, f"half-open phase-1 limit {self.max_half_open} reached", now)
                return []
            responder = MainModeResponder(self.phase1, IPv4Address(peer[0]), now)
            self.responders[header.initiator_cookie] = (responder, peer)
        else:
            responder, known = entry
            if known != peer:
                self.drop(peer, "Main Mode cookie from another address", now)
                return []
            if header.responder_cookie not in (bytes(8), responder.rcky):
                self.drop(peer, "Main Mode responder cookie mismatch", now)
                return []
        out = responder.receive(data, now)
        self._phase1_events(out.events, header.initiator_cookie, peer, now)
        sends = [(d, peer) for d in out.send] + self._coop_out
        self._coop_out = []
        return sends

    def _phase1_events(self, events: Iterable[object], icky: bytes, peer: Address, now: float) -> None:
        for ev in events:
            if isinstance(ev, Phase1Established):
                entry = self.responders.pop(icky, None)
                if entry is not None and entry[0].last_received is not None and entry[0].last_sent is not None:
                    self.completed[icky] = (entry[0].last_received, entry[0].last_sent, peer, now)
                self._add_sa(ev.sa, peer, now)
                self.counters["phase1_established"] += 1
                coop_peer = self.coop.peers.get(ev.sa.peer_address) if self.coop is not None else None
                if coop_peer is not None:
                    self._coop_out += self.coop.peer_sa_up(coop_peer, now)
                if self.keylog is not None:
                    self.keylog.ike(ev.sa)
                self.log.info(
                    "phase1_established",
                    peer=peer[0],
                    proposal=ev.sa.proposal.describe(),
                    peer_version=str(ev.sa.peer_version or "unknown"),
                )
            elif isinstance(ev, Phase1Failed):
                self.responders.pop(icky, None)
                self.counters["phase1_failed"] += 1
                if ev.notify is not None or ev.received:
                    log.emit(self.log, log.PHASE1_FAILED, peer=peer[0], reason=_with_notify(ev.reason, ev.notify, ev.received))

    def _add_sa(self, sa: IkeSa, peer: Address, now: float) -> None:
        same_peer = self._peer_sas.setdefault(peer, [])
        while len(same_peer) >= MAX_SAS_PER_PEER:
            self._drop_sa(same_peer.pop(0))
        same_peer.append(sa.cookies)
        self._peer_sas[peer] = same_peer  # (_drop_sa removes a peer's empty list)
        self.sas[sa.cookies] = _SaEntry(sa, peer, now)

    def _drop_sa(self, cookies: bytes) -> None:
        entry = self.sas.pop(cookies, None)
        if entry is not None:
            same_peer = self._peer_sas.get(entry.addr, [])
            if cookies in same_peer:
                same_peer.remove(cookies)
            if not same_peer:
                self._peer_sas.pop(entry.addr, None)
        for mid in self._sa_pulls.pop(cookies, ()):
            self.pulls.pop((cookies, mid), None)

    def _pull(self, header: IsakmpHeader, data: bytes, peer: Address, now: float) -> Outgoing:
        done = self.pulls_done.get((header.cookies, header.message_id))
        if done is not None:
            # A registration we completed (and whose phase-1 SA we let go): the GM
            # retransmits message 3 because message 4 was lost.
            if data == done[0] and peer == done[2]:
                return [(done[1], peer)]
            self.drop(peer, "GROUPKEY-PULL message for a completed exchange", now)
            return []
        entry = self.sas.get(header.cookies)
        if entry is None:
            self.drop(peer, "GROUPKEY-PULL for no phase-1 SA", now)
            return []
        entry.last_used = now
        if self._is_coop_peer(entry):  # a COOP peer address is a KS's: it never registers as a GM
            self.drop(peer, "GROUPKEY-PULL from a COOP key server address", now)
            return []
        key = (header.cookies, header.message_id)
        pull = self.pulls.get(key)
        if pull is None:
            mids = self._sa_pulls.setdefault(header.cookies, set())
            if len(mids) >= MAX_PULLS_PER_SA:
                self.drop(peer, "too many GROUPKEY-PULL exchanges on one SA", now)
                return []
            pull = PullResponder(entry.sa, self, header.message_id, now)
            self.pulls[key] = pull
            mids.add(header.message_id)
        out = pull.receive(data, now)
        self._pull_events(out, entry, now)
        if pull.finished and any(isinstance(ev, MemberRegistered) for ev in out.events) and not self._is_coop_peer(entry):
            assert pull.last_received is not None and pull.last_sent is not None
            self.pulls_done[key] = (pull.last_received, pull.last_sent, entry.addr, now)
            self._drop_sa(header.cookies)  # a registered GM needs no phase-1 SA on the KS
        if out.send and not self._sids_durable():
            self.pulls_done.pop(key, None)  # not sent, so never resent from there either
            return []
        return [(d, entry.addr) for d in out.send]

    def _sids_durable(self) -> bool:
        """Persist a new SID reservation before message 4 carrying its SIDs leaves."""
        pending = [g for g in self.groups.values() if g.sids.needs_save]
        if not pending:
            return True
        if self.on_state_change is not None:
            try:
                self.on_state_change()
            except OSError as exc:
                self.log.error("state_save_failed", error=str(exc), detail="message 4 withheld")
                return False
        for g in pending:
            g.sids.needs_save = False
        return True

    def _is_coop_peer(self, entry: _SaEntry) -> bool:
        return self.coop is not None and entry.sa.peer_address in self.coop.peers

    def _pull_events(self, out: PullOutput, entry: _SaEntry, now: float) -> None:
        for reason in out.drops:
            self.drop(entry.addr, reason, now)
        for ev in out.events:
            if isinstance(ev, MemberRegistered):
                g = self.groups[ev.group_number]
                member = g.record_member(
                    IPv4Address(entry.addr[0]),
                    entry.sa.peer_identity(),
                    entry.sa.peer_version,
                    ev.keys,
                    ev.sender_ids,
                    now,
                    port=entry.addr[1],
                    ack_key=ack_key(entry.sa.hash, entry.sa.keys.skeyid_a, g.number),
                    ack_hash=entry.sa.hash,
                )
                self.counters["registrations"] += 1
                if self.coop is not None:
                    self.coop.member_changed(g, member)
                log.emit(self.log, log.KS_REGS_COMPL, group=g.name, gm=entry.addr[0])
            elif isinstance(ev, PullFailed):
                self.counters["registrations_failed"] += 1
                refusal, self._refusal = self._refusal, None
                if refusal is not None:
                    self._unauthorized(refusal, entry.addr[0], now)
                    continue
                g = self.groups.get(ev.group_number or -1)
                name = g.name if g else str(ev.group_number)
                log.emit(
                    self.log,
                    log.KS_REGS_FAILURE,
                    gm=entry.addr[0],
                    group=name,
                    reason=_with_notify(ev.reason, ev.notify, ev.received),
                )

    def _unauthorized(self, refusal: authorization.Refusal, peer: str, now: float) -> None:
        self.counters["unauthorized"] += 1
        # An authenticated but unauthorized GM can retry at will: bound what it costs in logs.
        emit, suppressed = self._authz_log.allow(now)
        if not emit:
            return
        if suppressed:
            self.log.warning("unauthorized_log_suppressed", count=suppressed)
        if refusal.kind == "address":
            log.emit(self.log, log.UNAUTHORIZED_IPADDR, group=refusal.group, address=refusal.value)
        else:
            log.emit(self.log, log.UNAUTHORIZED_IDENTITY, group=refusal.group, identity=refusal.value, peer=peer)

    def _informational(self, header: IsakmpHeader, data: bytes, peer: Address, now: float) -> Outgoing:
        if not header.encrypted:
            entry = self.responders.get(header.initiator_cookie)
            if entry is not None and entry[1] == peer:
                out = entry[0].receive(data, now)
                self._phase1_events(out.events, header.initiator_cookie, peer, now)
                return []
            self.drop(peer, "unprotected Informational for no exchange", now)
            return []
        entry_sa = self.sas.get(header.cookies)
        if entry_sa is None:
            self.drop(peer, "Informational for no phase-1 SA", now)
            return []
        msg = entry_sa.sa.open_informational(data)
        for n in msg.all(NotifyPayload):
            self.log.warning("notify_received", peer=peer[0], notify=_notify_name(n.notify_type), text=n.data[:200].decode("utf-8", "replace"))
            for mid in list(self._sa_pulls.get(header.cookies, ())):
                pull = self.pulls.get((header.cookies, mid))
                if pull is not None and not pull.finished:
                    pull.abort()  # the GM gave up on this exchange
        for d in msg.all(DeletePayload):
            if d.spis and d.spis[0] == header.cookies:
                self._drop_sa(header.cookies)
        return []

    # --- rekeys ------------------------------------------------------------------

    def send_rekey(self, group: Group, messages: RekeyMessages, now: float) -> Outgoing:
        """Unicast one rekey to every registered GM and arm its retransmission."""
        rekey = group.config.rekey
        out: Outgoing = []
        for m in group.members.values():
            data = messages.modern if supports_removal_and_replace(m.version) else messages.legacy
            if m.pending is not None:
                self._missed(group, m, now)  # the previous rekey was never acknowledged
                if m.address not in group.members:
                    continue
            m.pending = PendingPush(messages.seq, data, rekey.retransmit_count, now + rekey.retransmit_interval)
            m.rekeys_sent += 1
            out.append((data, (str(m.address), m.port)))
        self.counters["rekeys_sent"] += len(out)
        return out

    def _missed(self, group: Group, m: Member, now: float) -> None:
        m.pending = None
        m.missed_rekeys += 1
        if m.missed_rekeys >= group.config.rekey.max_missed:
            group.remove_member(m.address)
            if self.coop is not None:
                self.coop.member_removed(group, m.address, now)
            self.counters["members_dropped"] += 1
            log.emit(self.log, log.KS_MEMBER_DROPPED, gm=str(m.address), group=group.name, missed=m.missed_rekeys)

    def _ack(self, data: bytes, peer: Address, now: float) -> Outgoing:
        ack = parse_ack(data)
        member, group = None, None
        for g in self.groups.values():
            m = g.members.get(IPv4Address(ack.gm_address))
            if m is not None:
                member, group = m, g
                break
        if member is None or group is None or not member.ack_key:
            # Not malformed: e.g. every GM acks a GM-removal push after the table was cleared.
            self.counters["acks_unmatched"] += 1
            return []
        if not verify_ack(ack, member.ack_hash, member.ack_key):
            self.drop(peer, "acknowledgement with a bad HASH", now)
            return []
        if member.pending is not None and ack.seq == member.pending.seq:
            member.pending = None
            member.missed_rekeys = 0
            member.acks_received += 1
            self.counters["acks_received"] += 1
        return []

    def _retransmit(self, now: float) -> Outgoing:
        out: Outgoing = []
        for g in self.groups.values():
            for m in list(g.members.values()):
                p = m.pending
                if p is None or now < p.next_at:
                    continue
                if p.retries_left <= 0:
                    self._missed(g, m, now)
                    continue
                p.retries_left -= 1
                p.next_at = now + g.config.rekey.retransmit_interval
                m.rekey_retries += 1
                out.append((p.data, (str(m.address), m.port)))
        return out

    # --- time ------------------------------------------------------------------

    def on_timer(self, now: float) -> Outgoing:
        out = self._retransmit(now)
        if self.coop is not None:
            out += self.coop.on_timer(now)
        if self.scheduled_rekeys:
            for g in self.groups.values():
                if now >= g.next_rekey_at():
                    out += self.rekey(g, now)
                elif g.sid_rekey_due(now):
                    g.last_sid_rekey_at = now
                    log.emit(self.log, log.KS_SID_EXHAUSTION_REKEY, group=g.name, free=g.sids.free_count,
                             size=g.sids.size, released=g.sids.reclaimable())
                    out += self.rekey(g, now, replace=True)
        for icky, (responder, peer) in list(self.responders.items()):
            mm_out = responder.on_timeout(now)  # not ``out``: that holds the rekey datagrams
            if responder.failed:
                self.responders.pop(icky, None)
                self.counters["half_open_expired"] += 1
            self._phase1_events(mm_out.events, icky, peer, now)
        for key, (_, _, _, at) in list(self.pulls_done.items()):
            if now - at > SA_LINGER:
                del self.pulls_done[key]
        for icky, (_, _, _, at) in list(self.completed.items()):
            if now - at > SA_LINGER:
                del self.completed[icky]
        for key, pull in list(self.pulls.items()):
            pull.on_timeout(now)
            entry = self.sas.get(key[0])
            if pull.finished and (entry is None or now - entry.last_used > SA_LINGER):
                del self.pulls[key]
                mids = self._sa_pulls.get(key[0])
                if mids is not None:
                    mids.discard(key[1])
                    if not mids:
                        del self._sa_pulls[key[0]]
        for cookies, entry in list(self.sas.items()):
            # A COOP peer's SA stays until it expires: the peer may announce on it after a partition.
            coop_peer = self.coop is not None and entry.sa.peer_address in self.coop.peers
            if now >= entry.sa.expires_at or (now - entry.last_used > SA_LINGER and not coop_peer):
                self._drop_sa(cookies)
        return out

    def rekey(self, group: Group, now: float, *, replace: bool = False, replace_now: bool = False) -> Outgoing:
        messages = group.plan_rekey(now, replace=replace, replace_now=replace_now)
        self._after_new_keys(group)
        extra = "with policy-replace " if replace else ""
        log.emit(self.log, log.KS_SEND_UNICAST_REKEY, extra=extra, group=group.name, address=str(group.ks_address), seq=messages.seq)
        return self.send_rekey(group, messages, now)

    def remove_members(self, group: Group, now: float, mode: int) -> Outgoing:
        members = list(group.members.values())
        messages = group.plan_removal(now, mode)
        if self.coop is not None:
            for m in members:
                self.coop.member_removed(group, m.address, now)
        self._after_new_keys(group)
        # The removal goes to every GM that was registered, even though the table is now clear.
        out: Outgoing = []
        for m in members:
            out.append((messages.modern, (str(m.address), m.port)))
        self.counters["removals_sent"] += len(out)
        return out

    def _after_new_keys(self, group: Group) -> None:
        if self.keylog is not None:
            for t in group.teks:
                self.keylog.esp(t)
        if self.on_state_change is not None:
            self.on_state_change()

    @property
    def half_open(self) -> int:
        return len(self.responders)


def _notify_name(value: int) -> str:
    try:
        return NotifyType(value).name
    except ValueError:
        return str(value)


def _with_notify(reason: str, notify: NotifyType | None, received: bool) -> str:
    if notify is None:
        return reason
    return f"{reason} ({'received' if received else 'sent'} {notify.name})"
