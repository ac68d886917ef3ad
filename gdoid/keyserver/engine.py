"""The key server's datagram dispatcher: no sockets, no clock of its own.

``datagram_received(data, peer, now, mono)`` routes a datagram by exchange type and
cookies to a Main Mode responder, an established phase-1 SA, or a
GROUPKEY-PULL responder, and returns the datagrams to send.  Bad input is a
counted, logged drop, never an exception.

Time comes in twice: ``now`` (wall clock) for key lifetimes, SA lifetimes and
what users see; ``mono`` (monotonic) for retransmissions and the expiry of
half-open and lingering state, so that a wall-clock jump neither fires nor
stalls them.  ``next_deadline(now, mono)`` says when ``on_timer`` next has
work; per-exchange and per-member timers live in a heap with lazy deletion,
so an idle KS does no work per member.

Over 600 lines because it is the one place where the KS's exchanges meet:
dispatch by exchange and cookies, the phase-1 SA table, the timer heap and the
push retransmission state all share the same tables.  What stands alone lives
apart: groups and rekey plans (group.py), COOP (coop.py), sender IDs
(sender_ids.py), authorization (authorization.py), show text (show.py).
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, TypeVar

from gdoid import log
from gdoid.keylog import KeyLog
from gdoid.keyserver import authorization
from gdoid.keyserver.coop import Coop
from gdoid.keyserver.group import Group, Member, PendingPush, RekeyMessages
from gdoid.protocol.constants import ExchangeType, NotifyType
from gdoid.protocol.datagram import Address, Outgoing
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError, ProtocolError
from gdoid.protocol.events import MemberRegistered, Phase1Established, Phase1Failed, PullFailed
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Config, Phase1Proposal
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.informational import plain_notify
from gdoid.protocol.main_mode_responder import (
    MAX_MM1_LEN,
    HalfOpen,
    MainModeResponder,
    ResponderCookies,
    respond_mm1,
)
from gdoid.protocol.output import PullOutput
from gdoid.protocol.payloads import DeletePayload, NotifyPayload
from gdoid.protocol.policy import GroupKeys, SenderIds
from gdoid.protocol.pull import PopSigner, PullResponder
from gdoid.protocol.push import GROUPKEY_PUSH_ACK, ack_key, parse_ack, verify_ack
from gdoid.protocol.version import SoftwareVersion, supports_removal_and_replace

SA_LINGER = 30.0  # keep a phase-1 SA this long after its last use (retransmits, errors)
MAX_PULLS_PER_SA = 8
MAX_SAS_PER_PEER = 4
# Half-open Main Mode (see docs/wire.md, "Responder cookies").  Message 1 leaves only a
# HalfOpen record, evicted oldest first when the table is full (a flood shortens every
# entry's life instead of locking newcomers out) and expired after MM1_STATE_LIFETIME.
MM1_STATE_LIFETIME = 5.0  # seconds: a GM answers message 2 within milliseconds
MAX_HALF_OPEN_BYTES = 16 << 20  # SA bodies kept for HASH_I/HASH_R (+ overhead), all entries
HALF_OPEN_OVERHEAD = 300  # octets an entry costs beyond its SA body (dict, record, key)
MAX_RESPONDERS_PER_PEER = 16  # exchanges past message 3 (with DH state) per address
ZERO_COOKIE = bytes(8)
OFFER_CACHE_SIZE = 64  # distinct message 1 bodies whose answer is kept (each <= MAX_MM1_LEN)
# Decoding message 1 bodies not seen before: a budget per second, each body costing
# PARSE_BASE_COST + one unit per PARSE_OCTETS_PER_UNIT octets.  Some 10-20 % of a core;
# beyond it, novel bodies are dropped unanswered (the GM retransmits).
PARSE_BUDGET = 10_000
PARSE_BASE_COST = 8
PARSE_OCTETS_PER_UNIT = 64
# Kinds of entries in the timer heap.
_PUSH, _RESPONDER, _PULL, _SA = range(4)


@dataclass(frozen=True, slots=True)
class _Offer:
    """A message 1 body already answered: its HalfOpen fields and message 2 after the cookies."""

    key: tuple[bytes, bool]
    sai_b: bytes
    proposal: Phase1Proposal | None  # None: refused with ``notify``
    peer_version: SoftwareVersion | None
    mm2_tail: bytes
    notify: NotifyType | None
    reason: str


@dataclass(frozen=True, slots=True)
class _Pending:
    """One half-open exchange between message 1 and 3: a shared offer and a time."""

    offer: _Offer
    created: float  # wall clock: the HalfOpen record carries it
    expires: float  # monotonic: when the record goes (MM1_STATE_LIFETIME)

    @property
    def sai_b(self) -> bytes:
        return self.offer.sai_b

    def half_open(self) -> HalfOpen:
        assert self.offer.proposal is not None
        return HalfOpen(
            self.offer.sai_b, self.offer.proposal, self.offer.peer_version, self.created
        )


@dataclass
class _SaEntry:
    sa: IkeSa
    addr: Address
    last_used: float  # monotonic


class KeyServerEngine:
    def __init__(
        self,
        phase1: Phase1Config,
        groups: dict[int, Group],
        *,
        max_half_open: int = 16384,
        keylog: KeyLog | None = None,
        logger: log.Logger | None = None,
    ) -> None:
        self.phase1 = phase1
        self.groups = groups
        self.max_half_open = max_half_open
        self.keylog = keylog
        self.log = logger or log.get_logger("gdoid.ks")
        self.cookies = ResponderCookies()
        # Cookie pair -> what message 3 needs, oldest first.  No machine, no DH key.
        self.half_open_mm1: OrderedDict[bytes, _Pending] = OrderedDict()
        self._half_open_bytes = 0
        # Answers to message 1 bodies seen lately, and (apart, so that a flood of novel
        # bodies cannot push them out) those of exchanges that got to message 3.
        self._offers: OrderedDict[tuple[bytes, bool], _Offer] = OrderedDict()
        self._proven_offers: OrderedDict[tuple[bytes, bool], _Offer] = OrderedDict()
        self._offers_for: Phase1Config | None = None
        # Decoding a novel body costs 0.1-0.5 ms: a budget per second, in PARSE_COST units.
        self._parse_tokens = float(PARSE_BUDGET)
        self._parse_at: float | None = None
        # Cookie pair -> the machine of an exchange past message 3 (the peer proved its
        # address), oldest first; and how many of those each address has.
        self.responders: OrderedDict[bytes, tuple[MainModeResponder, Address]] = OrderedDict()
        self._responders_per_peer: Counter[str] = Counter()
        # Established exchanges, to answer a retransmitted MM5 whose MM6 was lost:
        # (MM5 received, MM6 sent, peer, when), by cookie pair.  Only the two datagrams
        # are kept, not the responder with its DH key, nonces and keys.
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
        self.coop: Coop | None = None  # hosted here (this engine is its CoopHost)
        self.on_state_change: Callable[[], None] | None = None  # persist before sending
        self._now = 0.0  # of the datagram being handled (SID allocation needs it)
        self._mono = 0.0  # the monotonic time of the same call
        self._wall_offset = 0.0  # now - mono at the last call that gave both
        # (monotonic due time, tie-breaker, kind, key): lazy deletion, each key
        # carries the deadline it was armed for and is ignored if that changed.
        self._timers: list[tuple[float, int, int, tuple[Any, ...]]] = []
        self._timer_seq = 0
        self._refusal: authorization.Refusal | None = (
            None  # from authorize(), logged with its PullFailed
        )
        self._authz_log = authorization.LogTokenBucket()
        # Lines that unauthenticated input triggers are rate-limited and length-bounded.
        self.log_limit = log.LogLimiter()
        if keylog is not None:
            for g in groups.values():
                keylog.group_keys(g.kek, g.teks)

    # --- GroupDirectory for the PULL responder -------------------------------

    def pop_signer(self, group_number: int) -> PopSigner:
        # A GM that pins its KS asks for a proof of the KS role in message 4.
        g = self.groups[group_number]
        sig = self.phase1.signature
        return PopSigner(
            sig.certificate if sig else None,
            sig.private_key if sig else None,
            g.signing_key,
            g.kek.sig_hash,
        )

    def snapshot(self, group_number: int, now: float) -> GroupKeys | None:
        g = self.groups.get(group_number)
        return g.snapshot(now) if g is not None else None

    def allocate_sender_ids(self, group_number: int, count: int, member: str) -> SenderIds | None:
        g = self.groups[group_number]
        if self.coop is not None:
            self.coop.prepare_group(g)  # this KS's slice of the SID space (a reload may add groups)
        values = g.sids.allocate(member, count, self._now)
        return SenderIds(g.sids.bits, values) if values is not None else None

    def authorize(self, group_number: int, sa: IkeSa) -> str | None:
        """The group's ``authorization address`` / ``identity`` (phase 1 authenticated the peer)."""
        g = self.groups.get(group_number)
        if g is None:
            return None  # the responder refuses an unknown group itself
        self._refusal = authorization.check(g.config.authorization, g.name, sa)
        return self._refusal.reason if self._refusal is not None else None

    # --- CoopHost for COOP -----------------------------------------------------

    def phase1_sas(self, peer: IPv4Address) -> list[IkeSa]:
        return [e.sa for e in self.sas.values() if e.sa.peer_address == peer]

    def drop_phase1_sas(self, peer: IPv4Address) -> None:
        for cookies, entry in list(self.sas.items()):
            if entry.sa.peer_address == peer:
                self._drop_sa(cookies)

    def keys_changed(self, group: Group) -> None:
        if self.keylog is not None:
            self.keylog.group_keys(group.kek, group.teks)

    def persist(self) -> None:
        if self.on_state_change is not None:
            self.on_state_change()

    # --- input ------------------------------------------------------------------

    def drop(self, peer: Address, reason: str, now: float) -> None:
        self.counters["dropped"] += 1
        # A flood must not turn into a log flood: rate-limited, every field bounded.
        self.log_limit.emit(self.log, log.MALFORMED_DROP, peer=peer[0], reason=reason)

    def _clock(self, now: float, mono: float | None) -> float:
        """The monotonic time of this call; callers without one (control commands) map ``now``."""
        if mono is None:
            return now - self._wall_offset
        self._wall_offset = now - mono
        return mono

    def datagram_received(
        self, data: bytes, peer: Address, now: float, mono: float | None = None
    ) -> Outgoing:
        self.counters["received"] += 1
        self._now = now
        self._mono = self._clock(now, mono)
        try:
            header = IsakmpHeader.decode(data)
        except ProtocolError as exc:
            self._unauthenticated("malformed", data, peer, [])
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
            entry.last_used = self._mono
        if sa is None:
            sa = next(
                (
                    p.sa
                    for p in self.coop.peers.values()
                    if p.sa is not None and p.sa.cookies == header.cookies
                ),
                None,
            )
        if sa is None:
            self.counters["dropped"] += 1
            self.coop.reject_no_sa(peer, now, self._mono)  # counted by reason, logged once a minute
            return []
        return self.coop.receive_ann(sa, data, peer, now, self._mono)

    # --- Main Mode responder --------------------------------------------------------

    def _unauthenticated(
        self, kind: str, data: bytes, peer: Address, sends: list[bytes]
    ) -> Outgoing:
        """The one send point for replies to peers that have not completed phase 1.

        Never more bytes back than the datagram had (no amplification): what would
        exceed is dropped and counted.  Bytes in and out are counted per message kind.
        """
        c = self.counters
        c[f"unauth_in_{kind}"] += 1
        c[f"unauth_bytes_in_{kind}"] += len(data)
        budget = len(data)
        out: Outgoing = []
        for d in sends:
            if len(d) > budget:
                c["amplification_dropped"] += 1
                continue
            budget -= len(d)
            out.append((d, peer))
        c[f"unauth_bytes_out_{kind}"] += len(data) - budget
        return out

    def _main_mode(self, header: IsakmpHeader, data: bytes, peer: Address, now: float) -> Outgoing:
        if self.coop is not None:
            coop_peer = self.coop.owns_initiator(header.initiator_cookie)
            if coop_peer is not None:
                # Our own exchange with a configured peer: its initiator cookie is our secret.
                return self.coop.main_mode(coop_peer, data, now, self._mono)
        if header.responder_cookie == ZERO_COOKIE:
            return self._unauthenticated("mm1", data, peer, self._mm1(header, data, peer, now))
        kind = "mm5" if header.encrypted else "mm3"
        icky, rcky, cookies = header.initiator_cookie, header.responder_cookie, header.cookies
        # The cookie proves the sender saw our message 2 at this address: checked
        # (constant time) before any state is looked up.
        if not self.cookies.check(peer[0], peer[1], icky, rcky, self._mono):
            self.counters["bad_responder_cookie"] += 1
            self.drop(peer, "Main Mode responder cookie not issued to this address", now)
            return self._unauthenticated(kind, data, peer, [])
        entry = self.responders.get(cookies)
        if entry is None:
            done = self.completed.get(cookies)
            if done is not None:
                if done[2] == peer and data == done[0]:
                    return [(done[1], peer)]  # our MM6 was lost: the peer authenticated already
                self.drop(peer, "Main Mode message for a completed exchange", now)
                return self._unauthenticated(kind, data, peer, [])
            half = self.half_open_mm1.pop(cookies, None)
            if half is None or header.encrypted:
                if half is not None:
                    self._half_open_bytes -= len(half.sai_b)
                # Message 1's state expired or was evicted: the address is proven, so
                # ask the initiator to start over from message 1 (an INVALID_COOKIE
                # notify, shorter than message 3) instead of letting it time out.
                self.counters["half_open_lost"] += 1
                self.drop(peer, "Main Mode message 3 after its message 1 state expired", now)
                notify = (
                    []
                    if header.encrypted
                    else [plain_notify(icky, rcky, NotifyType.INVALID_COOKIE)]
                )
                return self._unauthenticated(kind, data, peer, notify)
            self._half_open_bytes -= len(half.sai_b)
            if half.offer.key not in self._proven_offers:  # this body leads somewhere: keep it
                if len(self._proven_offers) >= OFFER_CACHE_SIZE:
                    self._proven_offers.popitem(last=False)
                self._proven_offers[half.offer.key] = half.offer
            if self._responders_per_peer[peer[0]] >= MAX_RESPONDERS_PER_PEER:
                self.counters["half_open_refused"] += 1
                self.drop(
                    peer,
                    f"more than {MAX_RESPONDERS_PER_PEER} Main Mode exchanges from one address",
                    now,
                )
                return self._unauthenticated(kind, data, peer, [])
            while len(self.responders) >= self.max_half_open:
                old, (_, old_peer) = self.responders.popitem(last=False)
                self._forget_responder(old_peer)
                self.counters["half_open_evicted"] += 1
            responder = MainModeResponder.resume(
                self.phase1, IPv4Address(peer[0]), icky, rcky, half.half_open(), now
            )
            self.responders[cookies] = (responder, peer)
            self._arm_machine(_RESPONDER, cookies, responder.deadline, now)
            self._responders_per_peer[peer[0]] += 1
        else:
            responder, known = entry
            if known != peer:  # (the cookie binds the port too: only a bug gets here)
                self.drop(peer, "Main Mode cookie from another address", now)
                return self._unauthenticated(kind, data, peer, [])
        had_dh = responder.dh is not None
        out = responder.receive(data, now)
        if responder.dh is not None and not had_dh:
            self.counters["dh_computations"] += 1
        established = any(isinstance(ev, Phase1Established) for ev in out.events)
        coop_sends = self._phase1_events(out.events, cookies, peer, now)
        if established:  # message 6 answers a peer that has just authenticated
            sends = [(d, peer) for d in out.send]
        else:
            sends = self._unauthenticated(kind, data, peer, out.send)
        return sends + coop_sends

    def _mm1(self, header: IsakmpHeader, data: bytes, peer: Address, now: float) -> list[bytes]:
        """Answer message 1 keeping only a HalfOpen record; returns message 2 or a notify."""
        if len(data) > MAX_MM1_LEN:  # refused before any parsing
            self.counters["mm1_oversized"] += 1
            self.drop(
                peer, f"Main Mode message 1 of {len(data)} octets (at most {MAX_MM1_LEN})", now
            )
            return []
        if (
            self.coop is not None
            and not self.coop.serving
            and IPv4Address(peer[0]) not in self.coop.peers
        ):
            self.counters["not_serving"] += 1
            self.drop(peer, "not serving registrations before COOP election and sync", now)
            return []
        icky = header.initiator_cookie
        rcky = self.cookies.make(peer[0], peer[1], icky, self._mono)
        address = IPv4Address(peer[0])
        # Everything after the cookies decides the answer (with whether the peer has a
        # PSK): a flood of one message 1 from many addresses is parsed once.
        if self._offers_for is not self.phase1:
            self._offers.clear()
            self._proven_offers.clear()
            self._offers_for = self.phase1
        key = (data[16:], self.phase1.psk_lookup(address) is not None)
        offer = self._proven_offers.get(key) or self._offers.get(key)
        if offer is None:
            if not self._parse_budget(data, self._mono):
                self.counters["mm1_shed"] += 1
                self.drop(peer, "novel Main Mode message 1 over the decoding budget", now)
                return []
            try:
                answered, mm2 = respond_mm1(self.phase1, address, data, header, rcky, now)
                offer = _Offer(
                    key,
                    answered.sai_b,
                    answered.proposal,
                    answered.peer_version,
                    mm2[16:],
                    None,
                    "",
                )
            except (NotifyError, DecodeError, CryptoError) as exc:
                notify = (
                    NotifyType(exc.notify)
                    if isinstance(exc, NotifyError)
                    else NotifyType.PAYLOAD_MALFORMED
                )
                reason = exc.reason if isinstance(exc, NotifyError) else str(exc)
                offer = _Offer(key, b"", None, None, b"", notify, reason)
            if len(self._offers) >= OFFER_CACHE_SIZE:
                self._offers.popitem(last=False)
            self._offers[key] = offer
        if offer.proposal is None:
            assert offer.notify is not None
            self.counters["phase1_failed"] += 1
            self.log_limit.emit(
                self.log,
                log.PHASE1_FAILED,
                peer=peer[0],
                reason=log.with_notify(offer.reason, offer.notify, False),
            )
            return [plain_notify(icky, rcky, offer.notify)]
        half = _Pending(offer, now, self._mono + MM1_STATE_LIFETIME)
        mm2 = icky + rcky + offer.mm2_tail
        cookies = icky + rcky
        if cookies in self.responders:  # a late duplicate: the exchange is past message 3
            self.drop(peer, "Main Mode message 1 for an exchange past message 3", now)
            return []
        old = self.half_open_mm1.pop(cookies, None)  # a retransmitted message 1: renewed
        if old is not None:
            self._half_open_bytes -= len(old.sai_b)
        size = len(half.sai_b)
        while self.half_open_mm1 and (
            len(self.half_open_mm1) >= self.max_half_open
            or self._half_open_bytes + size + HALF_OPEN_OVERHEAD * len(self.half_open_mm1)
            > MAX_HALF_OPEN_BYTES
        ):
            _, evicted = self.half_open_mm1.popitem(last=False)
            self._half_open_bytes -= len(evicted.sai_b)
            self.counters["half_open_evicted"] += 1
        self.half_open_mm1[cookies] = half
        self._half_open_bytes += size
        return [mm2]

    def _parse_budget(self, data: bytes, now: float) -> bool:
        """Take the cost of decoding ``data`` from the per-second budget, if it is there."""
        if self._parse_at is not None and now > self._parse_at:
            self._parse_tokens = min(
                float(PARSE_BUDGET), self._parse_tokens + (now - self._parse_at) * PARSE_BUDGET
            )
        self._parse_at = now
        cost = PARSE_BASE_COST + len(data) // PARSE_OCTETS_PER_UNIT
        if self._parse_tokens < cost:
            return False
        self._parse_tokens -= cost
        return True

    def _forget_responder(self, peer: Address) -> None:
        self._responders_per_peer[peer[0]] -= 1
        if self._responders_per_peer[peer[0]] <= 0:
            del self._responders_per_peer[peer[0]]

    def _phase1_events(
        self, events: Iterable[object], cookies: bytes, peer: Address, now: float
    ) -> Outgoing:
        """Act on a responder's phase-1 events; returns what COOP sends to a peer KS whose SA came up."""
        out: Outgoing = []
        for ev in events:
            if isinstance(ev, Phase1Established):
                entry = self.responders.pop(cookies, None)
                if entry is not None:
                    self._forget_responder(entry[1])
                    if entry[0].last_received is not None and entry[0].last_sent is not None:
                        self.completed[cookies] = (
                            entry[0].last_received,
                            entry[0].last_sent,
                            peer,
                            self._mono,
                        )
                self._add_sa(ev.sa, peer, now)
                self.counters["phase1_established"] += 1
                coop_peer = (
                    self.coop.peers.get(ev.sa.peer_address) if self.coop is not None else None
                )
                if self.coop is not None and coop_peer is not None:
                    out += self.coop.peer_sa_up(coop_peer, now, self._mono)
                if self.keylog is not None:
                    self.keylog.ike(ev.sa)
                self.log.info(
                    "phase1_established",
                    peer=peer[0],
                    proposal=ev.sa.proposal.describe(),
                    peer_version=str(ev.sa.peer_version or "unknown"),
                )
            elif isinstance(ev, Phase1Failed):
                entry = self.responders.pop(cookies, None)
                if entry is not None:
                    self._forget_responder(entry[1])
                self.counters["phase1_failed"] += 1
                if ev.notify is not None or ev.received:
                    # Unauthenticated input can trigger this line: rate-limited, bounded.
                    self.log_limit.emit(
                        self.log,
                        log.PHASE1_FAILED,
                        peer=peer[0],
                        reason=log.with_notify(ev.reason, ev.notify, ev.received),
                    )
        return out

    def _add_sa(self, sa: IkeSa, peer: Address, now: float) -> None:
        same_peer = self._peer_sas.setdefault(peer, [])
        while len(same_peer) >= MAX_SAS_PER_PEER:
            self._drop_sa(same_peer.pop(0))
        same_peer.append(sa.cookies)
        self._peer_sas[peer] = same_peer  # (_drop_sa removes a peer's empty list)
        entry = self.sas[sa.cookies] = _SaEntry(sa, peer, self._mono)
        self._arm_sa(sa.cookies, entry, now, self._mono)

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
        entry.last_used = self._mono
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
            self._arm_machine(_PULL, key, pull.deadline, now)
        out = pull.receive(data, now)
        self._pull_events(out, entry, now)
        if (
            pull.finished
            and any(isinstance(ev, MemberRegistered) for ev in out.events)
            and not self._is_coop_peer(entry)
        ):
            assert pull.last_received is not None and pull.last_sent is not None
            self.pulls_done[key] = (pull.last_received, pull.last_sent, entry.addr, self._mono)
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
                known = self.groups.get(ev.group_number or -1)
                name = known.name if known else str(ev.group_number)
                log.emit(
                    self.log,
                    log.KS_REGS_FAILURE,
                    gm=entry.addr[0],
                    group=name,
                    reason=log.with_notify(ev.reason, ev.notify, ev.received),
                )

    def _unauthorized(self, refusal: authorization.Refusal, peer: str, now: float) -> None:
        self.counters["unauthorized"] += 1
        # An authenticated but unauthorized GM can retry at will: bound what it costs in logs.
        emit, suppressed = self._authz_log.allow(self._mono)
        if not emit:
            return
        if suppressed:
            self.log.warning("unauthorized_log_suppressed", count=suppressed)
        if refusal.kind == "address":
            log.emit(self.log, log.UNAUTHORIZED_IPADDR, group=refusal.group, address=refusal.value)
        else:
            log.emit(
                self.log,
                log.UNAUTHORIZED_IDENTITY,
                group=refusal.group,
                identity=refusal.value,
                peer=peer,
            )

    def _informational(
        self, header: IsakmpHeader, data: bytes, peer: Address, now: float
    ) -> Outgoing:
        if not header.encrypted:
            self._unauthenticated("notify", data, peer, [])  # never answered
            # An initiator abandoning its exchange (with our cookie, or zero before
            # message 2): only the address the cookie was made for can do that.
            icky, rcky = header.initiator_cookie, header.responder_cookie
            if rcky == ZERO_COOKIE:
                candidates = self.cookies.candidates(peer[0], peer[1], icky, self._mono)
            elif self.cookies.check(peer[0], peer[1], icky, rcky, self._mono):
                candidates = [rcky]
            else:
                candidates = []
            for rc in candidates:
                half = self.half_open_mm1.pop(icky + rc, None)
                if half is not None:
                    self._half_open_bytes -= len(half.sai_b)
                    self.counters["half_open_aborted"] += 1
                entry = self.responders.get(icky + rc)
                if entry is not None and entry[1] == peer:
                    out = entry[0].receive(data, now)
                    return self._phase1_events(out.events, icky + rc, peer, now)
                if half is not None:
                    return []
            self.drop(peer, "unprotected Informational for no exchange", now)
            return []
        entry_sa = self.sas.get(header.cookies)
        if entry_sa is None:
            self.drop(peer, "Informational for no phase-1 SA", now)
            return []
        msg = entry_sa.sa.open_informational(data)
        for n in msg.all(NotifyPayload):
            self.log.warning(
                "notify_received",
                peer=peer[0],
                notify=_notify_name(n.notify_type),
                text=n.data[:200].decode("utf-8", "replace"),
            )
            for mid in list(self._sa_pulls.get(header.cookies, ())):
                pull = self.pulls.get((header.cookies, mid))
                if pull is not None and not pull.finished:
                    pull.abort()  # the GM gave up on this exchange
        for d in msg.all(DeletePayload):
            if d.spis and d.spis[0] == header.cookies:
                self._drop_sa(header.cookies)
        return []

    # --- rekeys ------------------------------------------------------------------

    def send_rekey(
        self, group: Group, messages: RekeyMessages, now: float, mono: float | None = None
    ) -> Outgoing:
        """Unicast one rekey to every registered GM and arm its retransmission."""
        mono = self._clock(now, mono)
        rekey = group.config.rekey
        out: Outgoing = []
        for m in group.members.values():
            data = messages.modern if supports_removal_and_replace(m.version) else messages.legacy
            if m.pending is not None:
                self._missed(group, m, now)  # the previous rekey was never acknowledged
                if m.address not in group.members:
                    continue
            m.pending = PendingPush(
                messages.seq, data, rekey.retransmit_count, mono + rekey.retransmit_interval
            )
            self._arm(m.pending.next_at, _PUSH, (group.number, m.address, m.pending.next_at))
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
            log.emit(
                self.log,
                log.KS_MEMBER_DROPPED,
                gm=str(m.address),
                group=group.name,
                missed=m.missed_rekeys,
            )

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

    # --- time ------------------------------------------------------------------

    def _arm(self, at: float, kind: int, key: tuple[Any, ...]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, kind, key))

    def _arm_machine(self, kind: int, key: object, deadline: float | None, now: float) -> None:
        # A protocol machine's deadline is on the wall clock it was given: it is due
        # at the same distance on the monotonic clock.
        if deadline is not None:
            self._arm(self._mono + max(0.0, deadline - now), kind, (key, deadline))

    def _arm_sa(self, cookies: bytes, entry: _SaEntry, now: float, mono: float) -> None:
        at = mono + max(0.0, entry.sa.expires_at - now)  # the SA lifetime is wall time
        if not self._is_coop_peer(entry):  # a COOP peer's SA stays until it expires
            at = min(at, entry.last_used + SA_LINGER)
        self._arm(at, _SA, (cookies,))

    def next_deadline(self, now: float, mono: float) -> float | None:
        """The monotonic time ``on_timer`` next has work; O(groups), not O(members).

        Wall-clock events (rekeys before key expiry) are mapped with the current
        offset: the shell also wakes at least every tick to notice a wall jump.
        """
        times: list[float] = []
        if self._timers:
            times.append(self._timers[0][0])  # possibly a stale entry: one early wake-up
        if self.half_open_mm1:
            times.append(next(iter(self.half_open_mm1.values())).expires)
        for table in (self.completed, self.pulls_done):
            if table:
                times.append(next(iter(table.values()))[3] + SA_LINGER)
        if self.scheduled_rekeys:
            times += [mono + max(0.0, g.next_rekey_at() - now) for g in self.groups.values()]
        if self.coop is not None:
            coop_at = self.coop.next_deadline(now, mono)  # announcements, election, its peers' SAs
            if coop_at is not None:
                times.append(coop_at)
        return min(times) if times else None

    def _run_timers(self, now: float, mono: float) -> Outgoing:
        out: Outgoing = []
        timers = self._timers
        while timers and timers[0][0] <= mono:
            _, _, kind, key = heapq.heappop(timers)
            if kind == _PUSH:
                out += self._push_due(key, now, mono)
            elif kind == _RESPONDER:
                out += self._responder_due(key, now)
            elif kind == _PULL:
                self._pull_due(key, now)
            else:
                self._sa_due(key, now, mono)
        return out

    def _push_due(self, key: tuple[Any, ...], now: float, mono: float) -> Outgoing:
        number, address, next_at = key
        g = self.groups.get(number)
        m = g.members.get(address) if g is not None else None
        p = m.pending if m is not None else None
        if g is None or m is None or p is None or p.next_at != next_at:
            return []  # acknowledged, replaced or removed since
        if p.retries_left <= 0:
            self._missed(g, m, now)
            return []
        p.retries_left -= 1
        p.next_at = mono + g.config.rekey.retransmit_interval
        self._arm(p.next_at, _PUSH, (number, address, p.next_at))
        m.rekey_retries += 1
        return [(p.data, (str(m.address), m.port))]

    def _responder_due(self, key: tuple[Any, ...], now: float) -> Outgoing:
        cookies, deadline = key
        entry = self.responders.get(cookies)
        if entry is None or entry[0].deadline != deadline:
            return []
        responder, peer = entry
        # Due on the monotonic clock: the machine is told its deadline has come even
        # if the wall clock went back.  Responders send nothing on a timeout.
        mm_out = responder.on_timeout(max(now, deadline))
        if responder.failed and cookies in self.responders:
            del self.responders[cookies]
            self._forget_responder(peer)
            self.counters["half_open_expired"] += 1
        return self._phase1_events(mm_out.events, cookies, peer, now)

    def _pull_due(self, key: tuple[Any, ...], now: float) -> None:
        pkey, deadline = key
        pull = self.pulls.get(pkey)
        if pull is not None and not pull.finished and pull.deadline == deadline:
            pull.on_timeout(max(now, deadline))

    def _sa_due(self, key: tuple[Any, ...], now: float, mono: float) -> None:
        (cookies,) = key
        entry = self.sas.get(cookies)
        if entry is None:
            return
        if now >= entry.sa.expires_at or (
            mono - entry.last_used >= SA_LINGER and not self._is_coop_peer(entry)
        ):
            self._drop_sa(cookies)
        else:
            self._arm_sa(cookies, entry, now, mono)

    def on_timer(self, now: float, mono: float | None = None) -> Outgoing:
        self._now = now
        mono = self._mono = self._clock(now, mono)
        out = self._run_timers(now, mono)
        if self.coop is not None:
            out += self.coop.on_timer(now, mono)
        if self.scheduled_rekeys:
            for g in self.groups.values():
                if now >= g.next_rekey_at():
                    out += self.rekey(g, now)
                elif g.sid_rekey_due(now):
                    g.last_sid_rekey_at = now
                    log.emit(
                        self.log,
                        log.KS_SID_EXHAUSTION_REKEY,
                        group=g.name,
                        free=g.sids.free_count,
                        size=g.sids.size,
                        released=g.sids.reclaimable(),
                    )
                    out += self.rekey(g, now, replace=True)
        self._expire_half_open(mono)
        self.log_limit.flush()
        _forget_lingering(self.pulls_done, mono)
        _forget_lingering(self.completed, mono)
        return out

    def rekey(
        self, group: Group, now: float, *, replace: bool = False, replace_now: bool = False
    ) -> Outgoing:
        messages = group.plan_rekey(now, replace=replace, replace_now=replace_now)
        self._after_new_keys(group)
        extra = "with policy-replace " if replace else ""
        log.emit(
            self.log,
            log.KS_SEND_UNICAST_REKEY,
            extra=extra,
            group=group.name,
            address=str(group.ks_address),
            seq=messages.seq,
        )
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
            self.keylog.group_keys(group.kek, group.teks)
        if self.on_state_change is not None:
            self.on_state_change()

    def _expire_half_open(self, mono: float) -> None:
        while self.half_open_mm1:  # oldest first: stop at the first one still young
            cookies, half = next(iter(self.half_open_mm1.items()))
            if mono < half.expires:
                break
            del self.half_open_mm1[cookies]
            self._half_open_bytes -= len(half.sai_b)
            self.counters["half_open_expired"] += 1

    @property
    def half_open(self) -> int:
        """Main Mode exchanges in progress: message 1 records and machines past message 3."""
        return len(self.half_open_mm1) + len(self.responders)


def _notify_name(value: int) -> str:
    try:
        return NotifyType(value).name
    except ValueError:
        return str(value)


_Key = TypeVar("_Key")


def _forget_lingering(table: dict[_Key, tuple[bytes, bytes, Address, float]], mono: float) -> None:
    """Drop answers kept for retransmissions once SA_LINGER is over (the monotonic time is
    last): oldest first, so stop at a young one."""
    while table:
        key, value = next(iter(table.items()))
        if mono - value[3] < SA_LINGER:
            return
        del table[key]
