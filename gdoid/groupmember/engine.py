"""The group member's registration logic: no sockets, no clock of its own.

One :class:`Registration` per configured group walks phase 1 and
GROUPKEY-PULL against the group's key servers in order, installs the result
in the :class:`~gdoid.groupmember.sadb.Sadb`, and schedules re-registration

Over 600 lines because registration, push handling and re-registration all
drive the same per-group :class:`Registration` state; phase 1 and PULL live in
gdoid/protocol, the SA database in sadb.py and the show text in show.py.
before the keys run out.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from ipaddress import IPv4Address
from typing import Protocol

from gdoid import log
from gdoid.config.model import GmGroupConfig, KsPop
from gdoid.groupmember.sadb import Sadb
from gdoid.keylog import KeyLog
from gdoid.protocol import crypto
from gdoid.protocol.constants import ExchangeType, NotifyType
from gdoid.protocol.crypto import HashAlgorithm
from gdoid.protocol.datagram import Address, Outgoing
from gdoid.protocol.errors import NotifyError, ProtocolError
from gdoid.protocol.events import Phase1Established, Phase1Failed, PullFailed, Registered
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.identity import describe_certificate, matching_pattern
from gdoid.protocol.ike_policy import Phase1Config
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.output import PullOutput
from gdoid.protocol.payloads import NotifyPayload
from gdoid.protocol.policy import GroupKeys, ParsedSa, SenderIds, Tek, parse_keys, parse_sa
from gdoid.protocol.pull import (
    KsPinning,
    PopMethod,
    PullInitiator,
    rekey_key_fingerprint,
)
from gdoid.protocol.push import POLICY_REPLACE_NOW, RemovalMode, ack_key, build_ack, open_push
from gdoid.protocol.version import CURRENT_VERSION, SoftwareVersion, supports_removal_and_replace

RETRY_BACKOFF_MAX = 60.0


class DataplaneSync(Protocol):
    """What the engine needs of the ESP data path (gdoid.dataplane.engine.Dataplane)."""

    def install(
        self,
        group: int,
        teks: Sequence[Tek],
        sender_ids: SenderIds | None,
        pseudotime_ms: int | None,
        now: float,
        activation_delay: float = 0,
    ) -> None: ...

    def remove_group(self, group: int) -> None: ...


class RegState(Enum):
    IDLE = auto()
    PHASE1 = auto()
    PULL = auto()
    REGISTERED = auto()
    BACKOFF = auto()


@dataclass
class Registration:
    group: GmGroupConfig
    state: RegState = RegState.IDLE
    ks_index: int = 0
    round_failures: int = 0
    # Retransmission and retry timers are monotonic; rereg_at follows the key
    # lifetimes (wall clock) and is shown to users.
    attempt_deadline: float | None = None  # monotonic
    retry_at: float | None = None  # monotonic
    rereg_at: float | None = None  # wall clock
    mm: MainModeInitiator | None = None
    sa: IkeSa | None = None
    pull: PullInitiator | None = None
    registered_ks: IPv4Address | None = None
    registered_at: float | None = None
    ks_version: str = "unknown"
    last_failure: str = ""
    registrations: int = 0
    failures: int = 0
    rekeys: int = 0
    rekeys_rejected: int = 0
    last_rekey_from: str = ""
    last_rekey_seq: int = 0
    ack_key: bytes = field(default=b"", repr=False)
    ack_hash: HashAlgorithm = HashAlgorithm.SHA2_256
    last_push: bytes = field(default=b"", repr=False)  # to re-acknowledge a retransmission
    last_ack: bytes = field(default=b"", repr=False)
    attempt_cookies: set[bytes] = field(default_factory=set)
    # The running machine's deadline (its wall-clock time) and when it is due (monotonic).
    timer_for: tuple[object, float] | None = field(default=None, repr=False)
    timer_due: float | None = None

    @property
    def ks(self) -> IPv4Address:
        return self.group.servers[self.ks_index % len(self.group.servers)]

    @property
    def ks_addr(self) -> Address:
        return (str(self.ks), self.group.server_port)


class GroupMemberEngine:
    def __init__(
        self,
        local_address: IPv4Address,
        groups: tuple[GmGroupConfig, ...],
        phase1: Phase1Config,
        *,
        registration_timeout: float = 10.0,
        rereg_jitter: float = 0.1,
        keylog: KeyLog | None = None,
        logger: log.Logger | None = None,
        rng: random.Random | None = None,
        on_event: Callable[[str, Registration], None] | None = None,
        software_version: SoftwareVersion = CURRENT_VERSION,
        dataplane: DataplaneSync | None = None,
    ) -> None:
        self.version = software_version
        self.dataplane = dataplane
        self.address = local_address
        self.phase1 = phase1
        self.registration_timeout = registration_timeout
        self.rereg_jitter = rereg_jitter
        self.keylog = keylog
        self.log = logger or log.get_logger("gdoid.gm")
        self.rng = rng or random.Random()
        self.on_event = on_event
        self.sadb = Sadb()
        self.registrations: dict[int, Registration] = {g.number: Registration(g) for g in groups}
        self._by_icky: dict[bytes, Registration] = {}
        self.counters: Counter[str] = Counter()
        self.log_limit = log.LogLimiter()  # for lines unverified input can trigger
        self._mono = 0.0  # monotonic time of the current call
        self._wall_offset = 0.0  # now - mono at the last call that gave both

    def _clock(self, now: float, mono: float | None) -> None:
        """Note this call's monotonic time; callers without one (control commands) map ``now``."""
        if mono is None:
            self._mono = now - self._wall_offset
        else:
            self._mono = mono
            self._wall_offset = now - mono

    def _track_timers(self, now: float) -> None:
        """Map each running machine's (wall-clock) deadline to the monotonic clock when it is set."""
        for reg in self.registrations.values():
            machine = reg.pull if reg.pull is not None else reg.mm
            deadline = machine.deadline if machine is not None else None
            if deadline is None:
                reg.timer_for = reg.timer_due = None
            elif reg.timer_for != (machine, deadline):
                reg.timer_for = (machine, deadline)
                reg.timer_due = self._mono + max(0.0, deadline - now)

    # --- control ------------------------------------------------------------------

    def start(self, now: float, mono: float | None = None) -> Outgoing:
        self._clock(now, mono)
        out: Outgoing = []
        for reg in self.registrations.values():
            out += self._begin(reg, now)
        self._track_timers(now)
        return out

    def clear_keys(self, group_number: int, now: float) -> None:
        """Delete the group's KEK and TEKs, in the SADB and the data path (``clear crypto gdoi``)."""
        self.sadb.clear(group_number)
        self._sync_dataplane(group_number, now)

    def reregister(self, group_number: int, now: float, mono: float | None = None) -> Outgoing:
        self._clock(now, mono)
        reg = self.registrations[group_number]
        self._abandon(reg)
        out = self._begin(reg, now)
        self._track_timers(now)
        return out

    def _abandon(self, reg: Registration) -> None:
        for icky in reg.attempt_cookies:
            self._by_icky.pop(icky, None)
        reg.attempt_cookies.clear()
        reg.mm = None
        reg.pull = None
        reg.sa = None
        reg.attempt_deadline = None

    def _begin(self, reg: Registration, now: float) -> Outgoing:
        self._abandon(reg)
        reg.state = RegState.PHASE1
        reg.retry_at = None
        reg.rereg_at = None
        mm = MainModeInitiator(self.phase1, reg.ks, now)
        out = mm.start(now)
        reg.mm = mm
        reg.attempt_cookies.add(mm.icky)
        self._by_icky[mm.icky] = reg
        reg.attempt_deadline = self._mono + self.registration_timeout
        self.log.info("registration_start", group=reg.group.name, ks=str(reg.ks))
        return [(d, reg.ks_addr) for d in out.send]

    def _failed(self, reg: Registration, reason: str, now: float) -> Outgoing:
        reg.failures += 1
        reg.last_failure = reason
        self.counters["registrations_failed"] += 1
        log.emit(self.log, log.GM_REG_FAILURE, ks=str(reg.ks), group=reg.group.name, reason=reason)
        self._abandon(reg)
        self._notify("failed", reg)
        reg.ks_index += 1
        reg.round_failures += 1
        if reg.round_failures % len(reg.group.servers):
            return self._begin(reg, now)  # try the next KS at once
        rounds = reg.round_failures // len(reg.group.servers)
        delay = min(RETRY_BACKOFF_MAX, 2.0 ** min(rounds, 6)) * (1 + 0.2 * self.rng.random())
        reg.state = RegState.BACKOFF
        reg.retry_at = self._mono + delay
        return []

    def _notify(self, what: str, reg: Registration) -> None:
        if self.on_event is not None:
            self.on_event(what, reg)

    # --- input ---------------------------------------------------------------------

    def datagram_received(
        self, data: bytes, peer: Address, now: float, mono: float | None = None
    ) -> Outgoing:
        self._clock(now, mono)
        out = self._datagram(data, peer, now)
        self._track_timers(now)
        return out

    def _datagram(self, data: bytes, peer: Address, now: float) -> Outgoing:
        try:
            header = IsakmpHeader.decode(data)
        except ProtocolError as exc:
            return self._drop(peer, str(exc))
        if header.exchange_type == ExchangeType.GROUPKEY_PUSH:
            return self._push(header, data, peer, now)
        reg = self._by_icky.get(header.initiator_cookie)
        if reg is None:
            return self._drop(peer, "no exchange with these cookies")
        if peer != reg.ks_addr:
            return self._drop(peer, "datagram from an address that is not our KS")
        try:
            if header.exchange_type == ExchangeType.IDENTITY_PROTECTION or (
                header.exchange_type == ExchangeType.INFORMATIONAL and not header.encrypted
            ):
                if reg.mm is None or reg.state != RegState.PHASE1:
                    return self._drop(peer, "Main Mode message outside phase 1")
                mm_out = reg.mm.receive(data, now)
                out = [(d, reg.ks_addr) for d in mm_out.send]
                for ev in mm_out.events:
                    out += self._phase1_event(reg, ev, now)
                return out
            if reg.sa is None or header.cookies != reg.sa.cookies:
                return self._drop(peer, "message for no established phase-1 SA")
            if header.exchange_type == ExchangeType.GROUPKEY_PULL and reg.pull is not None:
                return self._pull_output(reg, reg.pull.receive(data, now), now)
            if header.exchange_type == ExchangeType.INFORMATIONAL:
                msg = reg.sa.open_informational(data)
                for n in msg.all(NotifyPayload):
                    if reg.pull is not None and not reg.pull.finished:
                        return self._pull_output(
                            reg, reg.pull.notify_received(n.notify_type, n.data), now
                        )
                return []
        except ProtocolError as exc:
            return self._drop(peer, str(exc))
        return self._drop(peer, f"exchange type {header.exchange_type} not expected")

    def _drop(self, peer: Address, reason: str) -> Outgoing:
        self.counters["dropped"] += 1
        self.log.debug("dropped", peer=peer[0], reason=reason)
        return []

    def _phase1_event(self, reg: Registration, ev: object, now: float) -> Outgoing:
        if isinstance(ev, Phase1Failed):
            reason = log.with_notify(ev.reason, ev.notify, ev.received)
            log.emit(self.log, log.PHASE1_FAILED, peer=str(reg.ks), reason=reason)
            return self._failed(reg, reason, now)
        if isinstance(ev, Phase1Established):
            reg.sa = ev.sa
            reg.mm = None
            reg.ks_version = str(ev.sa.peer_version or "unknown")
            if self.keylog is not None:
                self.keylog.ike(ev.sa)
            refusal = self._phase1_ks_refusal(reg, ev.sa)
            if refusal is not None:
                return self._failed(reg, refusal, now)  # nothing installed; next KS
            reg.state = RegState.PULL
            reg.pull = PullInitiator(
                ev.sa,
                reg.group.number,
                retransmit_interval=self.phase1.retransmit_interval,
                retransmit_count=self.phase1.retransmit_count,
                pinning=self._pinning(reg.group),
            )
            return [(d, reg.ks_addr) for d in reg.pull.start(now).send]
        return []

    def _phase1_ks_refusal(self, reg: Registration, sa: IkeSa) -> str | None:
        """Why the peer that completed phase 1 is not a KS this group accepts, or None."""
        pins = reg.group.ks_identities
        if not pins:
            return None
        cert = sa.peer_certificate
        if cert is None:
            if reg.group.ks_pop == KsPop.CERTIFICATE:
                return None  # message 4 must carry a pinned CERT + POP_R
            return "KS authenticated with a pre-shared key: ks_identities need a KS certificate (phase 1 or ks_pop = certificate)"
        if matching_pattern(pins, cert) is None:
            return f"KS certificate {describe_certificate(cert)} matches none of ks_identities"
        return None

    def _pinning(self, group: GmGroupConfig) -> KsPinning | None:
        if group.ks_pop == KsPop.NONE and group.rekey_key_sha256 is None:
            return None
        pop = {KsPop.CERTIFICATE: PopMethod.CERTIFICATE, KsPop.REKEY_KEY: PopMethod.REKEY_KEY}.get(
            group.ks_pop
        )
        validator = self.phase1.signature.validator if self.phase1.signature is not None else None
        return KsPinning(pop, group.ks_identities, validator, group.rekey_key_sha256)

    def _pull_output(self, reg: Registration, out: PullOutput, now: float) -> Outgoing:
        sends = [(d, reg.ks_addr) for d in out.send]
        for reason in out.drops:
            self._drop(reg.ks_addr, reason)
        for ev in out.events:
            if isinstance(ev, Registered):
                sends += self._registered(reg, ev, now)
            elif isinstance(ev, PullFailed):
                reason = log.with_notify(ev.reason, ev.notify, ev.received)
                sends += self._failed(reg, reason, now)
        return sends

    def _registered(self, reg: Registration, ev: Registered, now: float) -> Outgoing:
        if reg.pull is not None and reg.pull.parsed is not None:
            self._log_skipped(reg, reg.pull.parsed, str(reg.ks))
        if ev.ks_proof:
            self.log.info(
                "ks_role_verified", group=reg.group.name, ks=str(reg.ks), proof=ev.ks_proof
            )
        self._install(ev.keys, ev.sender_ids, now)
        if reg.sa is not None:
            reg.ack_hash = reg.sa.hash
            reg.ack_key = ack_key(reg.sa.hash, reg.sa.keys.skeyid_a, reg.group.number)
        reg.state = RegState.REGISTERED
        reg.registered_ks = reg.ks
        reg.registered_at = now
        reg.registrations += 1
        reg.round_failures = 0
        reg.attempt_deadline = None
        reg.pull = None
        reg.mm = None
        self.counters["registrations"] += 1
        reg.rereg_at = self._rereg_time(reg, now)
        log.emit(
            self.log,
            log.GM_REGS_COMPL,
            ks=str(reg.ks),
            group=reg.group.name,
            address=str(self.address),
        )
        self._notify("registered", reg)
        return []

    def _log_skipped(self, reg: Registration, parsed: ParsedSa, ks: str) -> None:
        """SATs of a protocol other than ESP are not installed: say so (docs/wire.md)."""
        if parsed.skipped_reason is not None:
            self.log.warning(
                "sa_tek_skipped", group=reg.group.name, ks=ks, reason=parsed.skipped_reason
            )

    def _install(self, keys: GroupKeys, sender_ids: SenderIds | None, now: float) -> None:
        new = self.sadb.install(keys, sender_ids, now)
        if self.keylog is not None:
            self.keylog.group_keys(keys.kek, new)
        self._sync_dataplane(keys.group_number, now)

    def _sync_dataplane(self, group_number: int, now: float) -> None:
        """Mirror the SADB into the data path.

        A group without SAs is installed empty rather than removed: the data path
        keeps its selectors, so fail-close keeps dropping the traffic and
        fail-open lets it pass in the clear.
        """
        if self.dataplane is None:
            return
        g = self.sadb.groups.get(group_number)
        if g is None:
            self.dataplane.install(group_number, [], None, None, now)
            return
        pseudotime = None
        if g.pseudotime_ms is not None:  # the KS's pseudotime, advanced by our clock since
            pseudotime = g.pseudotime_ms + int((now - g.pseudotime_at) * 1000)
        self.dataplane.install(
            group_number,
            list(g.teks.values()),
            g.sender_ids,
            pseudotime,
            now,
            self.sadb.send_delay(group_number, now),
        )

    # --- GROUPKEY-PUSH ----------------------------------------------------------------

    def _push(self, header: IsakmpHeader, data: bytes, peer: Address, now: float) -> Outgoing:
        g = next(
            (
                g
                for g in self.sadb.groups.values()
                if g.kek is not None and g.kek.spi == header.cookies
            ),
            None,
        )
        if g is None or g.kek is None:
            return self._drop(peer, "GROUPKEY-PUSH under a KEK we do not hold")
        reg = self.registrations.get(g.group_number)
        if reg is None:
            return self._drop(peer, "GROUPKEY-PUSH for a group we are not in")
        if reg.last_push and data == reg.last_push:
            # The KS retransmits because our acknowledgement was lost: acknowledge again,
            # install nothing twice.
            self.counters["rekeys_reacked"] += 1
            self.log.info(
                "push_retransmission", group=reg.group.name, seq=g.seq, action="acknowledged again"
            )
            return [(reg.last_ack, peer)] if reg.last_ack else []
        try:
            push = open_push(data, g.kek, crypto.load_public_key_der(g.kek.public_key_der))
            if push.seq <= g.seq:
                raise NotifyError(
                    NotifyType.INVALID_MESSAGE_ID,
                    f"SEQ {push.seq} is not above {g.seq}: replayed or stale",
                )
        except ProtocolError as exc:
            reg.rekeys_rejected += 1
            self.counters["rekeys_rejected"] += 1
            self.log_limit.emit(
                self.log, log.GM_REKEY_REJECTED, group=reg.group.name, ks=peer[0], reason=str(exc)
            )
            return []
        cookies = header.cookies
        g.seq = push.seq
        reg.rekeys += 1
        reg.last_rekey_from = peer[0]
        reg.last_rekey_seq = push.seq
        self.counters["rekeys"] += 1
        modern = supports_removal_and_replace(self.version)
        removal = push.notify(NotifyType.GM_REMOVAL) if modern else None
        replace = push.notify(NotifyType.POLICY_REPLACE) if modern else None
        ack = (
            [(build_ack(reg.ack_hash, reg.ack_key, cookies, push.seq, self.address.packed), peer)]
            if reg.ack_key
            else []
        )
        reg.last_push = data
        reg.last_ack = ack[0][0] if ack else b""
        if removal is not None and removal.data[:1] in (
            bytes([RemovalMode.TRANSITIONAL]),
            bytes([RemovalMode.NOW]),
        ):
            return ack + self._removal(reg, removal.data[0], now)
        log.emit(
            self.log,
            log.GM_RECV_REKEY,
            group=reg.group.name,
            ks=peer[0],
            address=str(self.address),
            seq=push.seq,
        )
        if push.sa is not None and push.kd is not None:
            try:
                parsed = parse_sa(push.sa, now, require_tek=False)
                keys, _ = parse_keys(parsed, push.kd, push.seq, g.group_number, now, False)
                self._log_skipped(reg, parsed, peer[0])
            except ProtocolError as exc:
                self.log_limit.emit(
                    self.log,
                    log.GM_REKEY_REJECTED,
                    group=reg.group.name,
                    ks=peer[0],
                    reason=f"policy: {exc}",
                )
                return ack
            pin = reg.group.rekey_key_sha256
            if (
                pin is not None
                and keys.kek is not None
                and not crypto.constant_time_equal(
                    rekey_key_fingerprint(keys.kek.public_key_der), pin
                )
            ):
                reason = "policy: the new KEK's rekey key is not the pinned rekey_key_sha256"
                log.emit(
                    self.log, log.GM_REKEY_REJECTED, group=reg.group.name, ks=peer[0], reason=reason
                )
                return ack
            old = set(g.teks)
            if replace is not None:
                if replace.data[:1] == bytes([POLICY_REPLACE_NOW]):
                    self.sadb.delete_teks(g.group_number, old)
                    g.transition_until = 0.0  # replace-now: the new policy applies at once
                else:
                    self.sadb.shorten_teks(g.group_number, now)
            self._install(keys, None, now)
            if replace is None and keys.teks:
                self.sadb.retire_teks(g.group_number, old, now)
                self._sync_dataplane(g.group_number, now)
            self.log.info(
                "rekey_installed",
                group=reg.group.name,
                seq=push.seq,
                new_teks=",".join(f"0x{t.spi:08x}" for t in keys.teks),
                new_kek=keys.kek is not None,
                policy_replace=replace is not None,
            )
        reg.rereg_at = self._rereg_time(reg, now)
        self._notify("rekey", reg)
        return ack

    def _removal(self, reg: Registration, mode: int, now: float) -> Outgoing:
        number = reg.group.number
        g = self.sadb.group(number)
        if mode == RemovalMode.TRANSITIONAL:
            g.kek = None  # deleted at once; the old TEKs carry traffic until TEK_SLT
            self.sadb.shorten_teks(number, now)
            self._sync_dataplane(number, now)
            log.emit(self.log, log.GM_RECV_DELETE, group=reg.group.name)
            reg.rereg_at = self._rereg_time(reg, now)
        else:
            configured = max((t.policy.configured_lifetime for t in g.teks.values()), default=0)
            self.sadb.clear(number)
            self._sync_dataplane(number, now)
            delay = self.rng.uniform(0, 0.02 * configured) if configured else 0.0
            log.emit(
                self.log, log.GM_RECV_DELETE_IMMEDIATE, group=reg.group.name, seconds=round(delay)
            )
            reg.state = RegState.BACKOFF
            reg.rereg_at = now + delay  # shown to users; retry_at is what fires
            reg.retry_at = self._mono + delay
        self.counters["removals"] += 1
        self._notify("removal", reg)
        return []

    def _rereg_time(self, reg: Registration, now: float) -> float | None:
        expiry = self.sadb.next_expiry(reg.group.number)
        if expiry is None:
            return None
        remaining = max(0.0, expiry - now)
        # Re-register at 80-90% of the remaining lifetime: random so GMs spread out.
        return now + remaining * (0.9 - self.rereg_jitter * self.rng.random())

    # --- time ----------------------------------------------------------------------

    def next_deadline(self, now: float, mono: float) -> float | None:
        """The monotonic time ``on_timer`` next has work (wall-clock events mapped at ``now``)."""
        times: list[float] = []
        for reg in self.registrations.values():
            times += [t for t in (reg.timer_due, reg.attempt_deadline) if t is not None]
            if reg.state == RegState.BACKOFF and reg.retry_at is not None:
                times.append(reg.retry_at)
            elif reg.state == RegState.REGISTERED and reg.rereg_at is not None:
                times.append(mono + max(0.0, reg.rereg_at - now))
        for g in self.sadb.groups.values():
            expiries = [t.expires_at for t in g.teks.values()] + (
                [g.kek.expires_at] if g.kek is not None else []
            )
            if expiries:
                times.append(mono + max(0.0, min(expiries) - now))
        return min(times) if times else None

    def on_timer(self, now: float, mono: float | None = None) -> Outgoing:
        self._clock(now, mono)
        mono = self._mono
        out: Outgoing = []
        for reg in self.registrations.values():
            if reg.timer_for is not None and reg.timer_due is not None and mono >= reg.timer_due:
                # Due on the monotonic clock: the machine is told its deadline has come
                # even if the wall clock went back, and its next deadline is mapped from there.
                machine, deadline = reg.timer_for
                given = max(now, deadline)
                if machine is reg.pull and reg.pull is not None:
                    pull = reg.pull
                    pull_out = pull.on_timeout(given)
                    if pull.deadline is not None:
                        reg.timer_for, reg.timer_due = (
                            (pull, pull.deadline),
                            mono + max(0.0, pull.deadline - given),
                        )
                    out += self._pull_output(reg, pull_out, now)
                elif machine is reg.mm and reg.mm is not None:
                    mm = reg.mm
                    mm_out = mm.on_timeout(given)
                    if mm.deadline is not None:
                        reg.timer_for, reg.timer_due = (
                            (mm, mm.deadline),
                            mono + max(0.0, mm.deadline - given),
                        )
                    out += [(d, reg.ks_addr) for d in mm_out.send]
                    for ev in mm_out.events:
                        out += self._phase1_event(reg, ev, now)
            if reg.attempt_deadline is not None and mono >= reg.attempt_deadline:
                out += self._failed(
                    reg, f"no answer from KS {reg.ks} within {self.registration_timeout:g} s", now
                )
            elif (
                reg.state == RegState.BACKOFF and reg.retry_at is not None and mono >= reg.retry_at
            ):
                out += self._begin(reg, now)
            elif (
                reg.state == RegState.REGISTERED
                and reg.rereg_at is not None
                and now >= reg.rereg_at
            ):
                self.log.info("reregistration_due", group=reg.group.name)
                out += self._begin(reg, now)
        self.log_limit.flush()
        expired = self.sadb.expire(now)
        for t in expired:
            self.log.info("tek_expired", spi=f"0x{t.spi:08x}")
        if expired:
            for number in self.sadb.groups:
                self._sync_dataplane(number, now)
        self._track_timers(now)
        return out
