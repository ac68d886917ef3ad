"""GROUPKEY-PULL (RFC 6407 §3), exchange 32, protected by a phase-1 SA.

    (1) GM -> KS : HDR*, HASH(1), Ni, ID
    (2) KS -> GM : HDR*, HASH(2), Nr, SA
    (3) GM -> KS : HDR*, HASH(3) [, GAP]
    (4) KS -> GM : HDR*, HASH(4) [, SEQ], KD

HASH(n) = prf(SKEYID_a, M-ID | <prefix> | every payload after HASH as sent),
with the prefix empty for (1), Ni_b for (2) and Ni_b | Nr_b for (3)/(4)
(wire.md §3: no leading zero octet).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Protocol

from gdoid.protocol import crypto
from gdoid.protocol.attributes import Attribute, find
from gdoid.protocol.constants import (
    Doi,
    ExchangeType,
    GapAttribute,
    IdType,
    NotifyType,
)
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError
from gdoid.protocol.gdoi_payloads import GapPayload, GdoiSaPayload, KdPayload, SeqPayload
from gdoid.protocol.ike import IkeSa
from gdoid.protocol.message import Message, encode_payloads
from gdoid.protocol.payloads import HashPayload, IdPayload, NoncePayload, NotifyPayload, Payload
from gdoid.protocol.policy import (
    GroupKeys,
    ParsedSa,
    SenderIds,
    build_kd,
    build_sa,
    gap_payloads,
    parse_keys,
    parse_sa,
)

NONCE_LEN = 32


def group_id(group_number: int) -> IdPayload:
    """ID_KEY_ID, 3 zero octets, group number as 4 octets (wire.md §3)."""
    return IdPayload(IdType.ID_KEY_ID, 0, 0, group_number.to_bytes(4, "big"))


def group_number_of(ident: IdPayload) -> int:
    if ident.id_type != IdType.ID_KEY_ID or len(ident.data) != 4 or ident.protocol_id or ident.port:
        raise NotifyError(
            NotifyType.INVALID_ID_INFORMATION,
            f"group ID must be ID_KEY_ID with a 4-octet group number (type {ident.id_type}, "
            f"{len(ident.data)} octets)",
        )
    return int.from_bytes(ident.data, "big")


def _hash(sa: IkeSa, mid: int, prefix: bytes, covered: bytes) -> bytes:
    return sa.prf_a(mid.to_bytes(4, "big") + prefix + covered)


def _seal_with_hash(sa: IkeSa, mid: int, prefix: bytes, payloads: Sequence[Payload]) -> bytes:
    h = _hash(sa, mid, prefix, encode_payloads(payloads))
    return sa.seal(ExchangeType.GROUPKEY_PULL, mid, [HashPayload(h), *payloads])


def _check_hash(sa: IkeSa, msg: Message, prefix: bytes, which: str) -> None:
    if not msg.payloads or not isinstance(msg.payloads[0].payload, HashPayload):
        raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, f"{which} must start with HASH")
    covered = b"".join(d.raw for d in msg.payloads[1:])
    want = _hash(sa, msg.header.message_id, prefix, covered)
    if not crypto.constant_time_equal(want, msg.payloads[0].payload.data):
        raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, f"{which} mismatch")


def error_notify(sa: IkeSa, notify: NotifyType, data: bytes = b"") -> bytes:
    """An Informational NOTIFY protected by phase 1 (wire.md §3)."""
    return sa.informational(NotifyPayload(Doi.GDOI, 0, notify, b"", data[:200]))


# --- events ---------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    """GM side: the group's policy and keys arrived and validated."""

    group_number: int
    keys: GroupKeys
    sender_ids: SenderIds | None


@dataclass(frozen=True)
class MemberRegistered:
    """KS side: a GM completed registration."""

    group_number: int
    sa: IkeSa
    keys: GroupKeys
    sender_ids: SenderIds | None


@dataclass(frozen=True)
class PullFailed:
    group_number: int | None
    reason: str
    notify: NotifyType | None
    received: bool = False  # the peer told us


PullEvent = Registered | MemberRegistered | PullFailed


@dataclass
class PullOutput:
    send: list[bytes] = field(default_factory=list)
    events: list[PullEvent] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)  # why datagrams were ignored, for the log


class _State(Enum):
    SENT_1 = auto()
    SENT_2 = auto()
    SENT_3 = auto()
    DONE = auto()
    FAILED = auto()


# --- GM: initiator ----------------------------------------------------------


class PullInitiator:
    def __init__(
        self,
        sa: IkeSa,
        group_number: int,
        *,
        retransmit_interval: float = 2.0,
        retransmit_count: int = 4,
        sender_ids_wanted: int = 1,
    ) -> None:
        self.sa = sa
        self.group_number = group_number
        self.message_id = secrets.randbits(32) or 1
        self.ni_b = secrets.token_bytes(NONCE_LEN)
        self.nr_b = b""
        self.state = _State.SENT_1
        self.parsed: ParsedSa | None = None
        self.requested_sids = 0
        self.sender_ids_wanted = sender_ids_wanted
        self.retransmit_interval = retransmit_interval
        self.retransmit_count = retransmit_count
        self.last_sent: bytes | None = None
        self.retries = 0
        self.deadline: float | None = None

    def start(self, now: float) -> PullOutput:
        out = PullOutput()
        msg = _seal_with_hash(self.sa, self.message_id, b"", [NoncePayload(self.ni_b), group_id(self.group_number)])
        self._send(msg, now, out)
        return out

    def _send(self, data: bytes, now: float, out: PullOutput) -> None:
        self.last_sent = data
        self.retries = 0
        self.deadline = now + self.retransmit_interval
        out.send.append(data)

    def _fail(self, out: PullOutput, reason: str, notify: NotifyType | None, tell_peer: bool, received: bool = False) -> PullOutput:
        self.state = _State.FAILED
        self.deadline = None
        if tell_peer and notify is not None:
            out.send.append(error_notify(self.sa, notify, reason.encode()))
        out.events.append(PullFailed(self.group_number, reason, notify, received))
        return out

    @property
    def finished(self) -> bool:
        return self.state in (_State.DONE, _State.FAILED)

    def on_timeout(self, now: float) -> PullOutput:
        out = PullOutput()
        if self.finished or self.deadline is None or now < self.deadline:
            return out
        if self.retries >= self.retransmit_count or self.last_sent is None:
            return self._fail(out, f"no response from KS {self.sa.peer_address}", None, False)
        self.retries += 1
        self.deadline = now + self.retransmit_interval * (2 ** min(self.retries, 4))
        out.send.append(self.last_sent)
        return out

    def notify_received(self, notify: int, data: bytes) -> PullOutput:
        """The KS refused us with an Informational NOTIFY."""
        try:
            name = NotifyType(notify).name
            ntype: NotifyType | None = NotifyType(notify)
        except ValueError:
            name, ntype = str(notify), None
        text = data.decode("utf-8", "replace") if data else ""
        reason = f"KS sent notify {name}" + (f": {text}" if text else "")
        return self._fail(PullOutput(), reason, ntype, False, received=True)

    def receive(self, data: bytes, now: float) -> PullOutput:
        out = PullOutput()
        if self.finished:
            return out
        try:
            opened = self.sa.open(data)
            msg = opened.message
            if msg.header.message_id != self.message_id:
                raise DecodeError("ISAKMP header", "message_id", "not this exchange")
            if self.state == _State.SENT_1:
                self._on_message_2(msg, now, opened.next_iv, out)
            elif self.state == _State.SENT_3:
                self._on_message_4(msg, now, opened.next_iv, out)
            else:
                raise DecodeError("GROUPKEY-PULL", "state", f"unexpected message in {self.state.name}")
        except NotifyError as exc:
            return self._fail(out, exc.reason, NotifyType(exc.notify), True)
        except (DecodeError, CryptoError) as exc:
            # Could be garbage injected with our cookies: drop it, keep waiting.
            out.drops.append(str(exc))
        return out

    def _on_message_2(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        _check_hash(self.sa, msg, self.ni_b, "HASH(2)")
        self.sa.commit_iv(self.message_id, iv)
        nr = msg.require(NoncePayload, "GROUPKEY-PULL message 2")
        sa = msg.require(GdoiSaPayload, "GROUPKEY-PULL message 2")
        self.nr_b = nr.data
        self.parsed = parse_sa(sa, now)
        payloads: list[Payload] = []
        if self.parsed.needs_sender_ids and self.sender_ids_wanted:
            self.requested_sids = self.sender_ids_wanted
            payloads.append(GapPayload((Attribute(GapAttribute.SENDER_ID_REQUEST, self.requested_sids),)))
        self.state = _State.SENT_3
        self._send(_seal_with_hash(self.sa, self.message_id, self.ni_b + self.nr_b, payloads), now, out)

    def _on_message_4(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        _check_hash(self.sa, msg, self.ni_b + self.nr_b, "HASH(4)")
        self.sa.commit_iv(self.message_id, iv)
        kd = msg.require(KdPayload, "GROUPKEY-PULL message 4")
        seq = msg.get(SeqPayload)
        assert self.parsed is not None
        keys, sids = parse_keys(
            self.parsed, kd, seq.seq if seq else 0, self.group_number, now, self.requested_sids > 0
        )
        self.state = _State.DONE
        self.deadline = None
        self.sa.forget_exchange(self.message_id)
        out.events.append(Registered(self.group_number, keys, sids))


# --- KS: responder ----------------------------------------------------------


class GroupDirectory(Protocol):
    """What the PULL responder asks the KS about groups (pure, no I/O)."""

    def snapshot(self, group_number: int, now: float) -> GroupKeys | None: ...

    def allocate_sender_ids(self, group_number: int, count: int, member: str) -> SenderIds | None: ...

    def authorize(self, group_number: int, sa: IkeSa) -> str | None:
        """None if the peer may join; else the reason it may not."""
        ...


MAX_SIDS_PER_MEMBER = 4


class PullResponder:
    def __init__(self, sa: IkeSa, directory: GroupDirectory, message_id: int, now: float, timeout: float = 30.0) -> None:
        self.sa = sa
        self.directory = directory
        self.message_id = message_id
        self.state = _State.SENT_1  # waiting for message 1
        self.group_number: int | None = None
        self.ni_b = self.nr_b = b""
        self.keys: GroupKeys | None = None
        self.last_received: bytes | None = None
        self.last_sent: bytes | None = None
        self.deadline: float | None = now + timeout
        self.notify_text = b""  # Notification Data of a refusal (empty unless said below)

    @property
    def finished(self) -> bool:
        return self.state in (_State.DONE, _State.FAILED)

    def abort(self) -> None:
        self.state = _State.FAILED
        self.deadline = None

    def on_timeout(self, now: float) -> PullOutput:
        out = PullOutput()
        if not self.finished and self.deadline is not None and now >= self.deadline:
            self.state = _State.FAILED
            out.events.append(PullFailed(self.group_number, "GROUPKEY-PULL timed out", None))
        return out

    def receive(self, data: bytes, now: float) -> PullOutput:
        out = PullOutput()
        if data == self.last_received and self.last_sent is not None:
            out.send.append(self.last_sent)  # our answer was lost
            return out
        if self.finished:
            return out
        try:
            opened = self.sa.open(data)
            msg = opened.message
            if self.state == _State.SENT_1:
                self._on_message_1(msg, now, opened.next_iv, out)
            elif self.state == _State.SENT_2:
                self._on_message_3(msg, now, opened.next_iv, out)
            else:
                raise DecodeError("GROUPKEY-PULL", "state", f"unexpected message in {self.state.name}")
            self.last_received = data
        except NotifyError as exc:
            self.state = _State.FAILED
            self.deadline = None
            out.send.append(error_notify(self.sa, NotifyType(exc.notify), self.notify_text))
            out.events.append(PullFailed(self.group_number, exc.reason, NotifyType(exc.notify)))
        except (DecodeError, CryptoError) as exc:
            out.drops.append(str(exc))
        return out

    def _reply(self, prefix: bytes, payloads: Sequence[Payload], out: PullOutput) -> None:
        self.last_sent = _seal_with_hash(self.sa, self.message_id, prefix, payloads)
        out.send.append(self.last_sent)

    def _on_message_1(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        _check_hash(self.sa, msg, b"", "HASH(1)")
        self.sa.commit_iv(self.message_id, iv)
        ni = msg.require(NoncePayload, "GROUPKEY-PULL message 1")
        ident = msg.require(IdPayload, "GROUPKEY-PULL message 1")
        self.ni_b = ni.data
        self.group_number = group_number_of(ident)
        keys = self.directory.snapshot(self.group_number, now)
        if keys is None:
            raise NotifyError(NotifyType.INVALID_ID_INFORMATION, f"unknown group number {self.group_number}")
        refusal = self.directory.authorize(self.group_number, self.sa)
        if refusal is not None:
            # Phase 1 authenticated the GM: it may learn why, though not the list it failed.
            self.notify_text = f"not authorized for group {self.group_number}".encode()
            raise NotifyError(NotifyType.AUTHENTICATION_FAILED, refusal)
        self.keys = keys
        self.nr_b = secrets.token_bytes(NONCE_LEN)
        self.state = _State.SENT_2
        self._reply(self.ni_b, [NoncePayload(self.nr_b), build_sa(keys, now, gap_payloads(keys))], out)

    def _on_message_3(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        _check_hash(self.sa, msg, self.ni_b + self.nr_b, "HASH(3)")
        self.sa.commit_iv(self.message_id, iv)
        assert self.keys is not None and self.group_number is not None
        sids = None
        gap = msg.get(GapPayload)
        if gap is not None:
            req = find(gap.attributes, GapAttribute.SENDER_ID_REQUEST)
            if req is not None and req.int_value:
                count = min(req.int_value, MAX_SIDS_PER_MEMBER)
                sids = self.directory.allocate_sender_ids(self.group_number, count, self.sa.peer_identity())
                if sids is None:
                    raise NotifyError(NotifyType.INVALID_KEY_INFORMATION, "sender-ID space exhausted")
        self.state = _State.DONE
        self.deadline = None
        self._reply(
            self.ni_b + self.nr_b, [SeqPayload(self.keys.seq), build_kd(self.keys, sids)], out
        )
        out.events.append(MemberRegistered(self.group_number, self.sa, self.keys, sids))
