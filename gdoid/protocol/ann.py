"""COOP key-server announcements (ANN), project-private (wire.md §6.3).

    KS -> KS : HDR*, HASH(1), ANN        exchange 240, protected by a KS-KS phase-1 SA
    HASH(1) = prf(SKEYID_a, M-ID | ANN)

ANN payload (private type 128): version (3), priority (1), role (1), flags (1),
reserved (2), sender ANN sequence number (8), group number (4), policy epoch
(4), then blocks of type (2), length (2), data.  Block data is UTF-8 JSON
(documented in docs/wire.md); a datagram stays below 32 KiB, larger member
lists are split across several ANNs.
"""

from __future__ import annotations

import json
import secrets
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from gdoid.protocol import crypto
from gdoid.protocol.constants import ExchangeType, NotifyType, PayloadType
from gdoid.protocol.errors import DecodeError, NotifyError
from gdoid.protocol.ike import IkeSa
from gdoid.protocol.message import encode_payload, register_payload
from gdoid.protocol.payloads import HashPayload, Payload
from gdoid.protocol.reader import Reader
from gdoid.protocol.version import SoftwareVersion

MAX_ANN_DATAGRAM = 32 * 1024
_FIXED = struct.Struct("!3sBBBHQII")


class Role(IntEnum):
    PRIMARY = 1
    SECONDARY = 2


class AnnFlag(IntEnum):
    REPLY_REQUESTED = 0x01


class BlockType(IntEnum):
    GROUP_KEYS = 1  # KEK, TEKs, SEQ, pseudotime origin, SID slice owner
    MEMBERS_FULL = 2  # a chunk of the full member list: {"chunk": i, "of": n, "members": [...]}
    MEMBERS_DELTA = 3  # members added or changed since the last ANN
    MEMBERS_REMOVED = 4  # addresses removed
    SENDER_IDS = 5  # used-SID records per KS slice (keyserver/sender_ids.py)
    SIGNING_KEY = 6  # {"sha256": hex}: fingerprint of the sender's rekey signing public key (DER)


@dataclass(frozen=True)
class AnnBlock:
    type: int
    data: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except ValueError as exc:
            raise DecodeError("ANN", f"block[{self.type}]", f"not JSON: {exc}") from exc

    @classmethod
    def of(cls, type_: BlockType, value: Any) -> AnnBlock:
        return cls(type_, json.dumps(value, separators=(",", ":")).encode())


@dataclass(frozen=True)
class AnnPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.ANN
    version: SoftwareVersion
    priority: int
    role: int
    flags: int
    sequence: int
    group_number: int
    policy_epoch: int
    blocks: tuple[AnnBlock, ...] = ()

    def encode_body(self) -> bytes:
        out = [_FIXED.pack(bytes(self.version), self.priority, self.role, self.flags, 0,
                           self.sequence, self.group_number, self.policy_epoch)]
        for b in self.blocks:
            if len(b.data) > 0xFFFF:
                raise ValueError("ANN block too large")
            out.append(struct.pack("!HH", b.type, len(b.data)) + b.data)
        return b"".join(out)

    @classmethod
    def decode_body(cls, data: bytes) -> AnnPayload:
        r = Reader(data, "ANN")
        version = SoftwareVersion(*r.take(3, "version"))
        priority = r.u8("priority")
        role = r.u8("role")
        if role not in (Role.PRIMARY, Role.SECONDARY):
            raise DecodeError("ANN", "role", f"{role}")
        flags = r.u8("flags")
        r.zero(2, "reserved")
        seq = r.u64("sequence")
        group = r.u32("group_number")
        epoch = r.u32("policy_epoch")
        blocks = []
        while r.remaining:
            btype = r.u16(f"block[{len(blocks)}].type")
            blen = r.u16(f"block[{len(blocks)}].length")
            blocks.append(AnnBlock(btype, r.take(blen, f"block[{len(blocks)}].data")))
        return cls(version, priority, role, flags, seq, group, epoch, tuple(blocks))

    def block(self, type_: BlockType) -> AnnBlock | None:
        return next((b for b in self.blocks if b.type == type_), None)


register_payload(PayloadType.ANN, AnnPayload)


def seal_ann(sa: IkeSa, ann: AnnPayload) -> bytes:
    mid = secrets.randbits(32) or 1
    h = sa.prf_a(mid.to_bytes(4, "big") + encode_payload(ann))
    data = sa.seal(ExchangeType.COOP_ANN, mid, [HashPayload(h), ann])
    sa.forget_exchange(mid)
    if len(data) > MAX_ANN_DATAGRAM:
        raise ValueError(f"ANN of {len(data)} octets exceeds 32 KiB: split it")
    return data


def open_ann(sa: IkeSa, data: bytes) -> AnnPayload:
    opened = sa.open(data)
    msg = opened.message
    if msg.header.exchange_type != ExchangeType.COOP_ANN:
        raise DecodeError("ANN", "exchange_type", str(msg.header.exchange_type))
    if len(msg.payloads) != 2 or not isinstance(msg.payloads[0].payload, HashPayload):
        raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, "ANN must be HASH, ANN")
    ann = msg.payloads[1].payload
    if not isinstance(ann, AnnPayload):
        raise DecodeError("ANN", "payload", "second payload is not ANN")
    want = sa.prf_a(msg.header.message_id.to_bytes(4, "big") + msg.payloads[1].raw)
    if not crypto.constant_time_equal(want, msg.payloads[0].payload.data):
        raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, "ANN HASH(1) mismatch")
    sa.forget_exchange(msg.header.message_id)
    return ann
