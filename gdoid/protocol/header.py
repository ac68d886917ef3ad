"""The 28-octet ISAKMP header (RFC 2408 §3.1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gdoid.protocol.constants import ISAKMP_VERSION, HeaderFlag
from gdoid.protocol.errors import DecodeError

HEADER_LEN = 28
_FMT = struct.Struct("!8s8sBBBBII")


@dataclass(frozen=True)
class IsakmpHeader:
    initiator_cookie: bytes
    responder_cookie: bytes
    next_payload: int
    exchange_type: int
    flags: HeaderFlag
    message_id: int
    length: int
    version: int = ISAKMP_VERSION

    def __post_init__(self) -> None:
        if len(self.initiator_cookie) != 8 or len(self.responder_cookie) != 8:
            raise ValueError("ISAKMP cookies are 8 octets")

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & HeaderFlag.ENCRYPTION)

    @property
    def cookies(self) -> bytes:
        return self.initiator_cookie + self.responder_cookie

    def encode(self) -> bytes:
        return _FMT.pack(
            self.initiator_cookie,
            self.responder_cookie,
            self.next_payload,
            self.version,
            self.exchange_type,
            int(self.flags),
            self.message_id,
            self.length,
        )

    @classmethod
    def decode(cls, data: bytes) -> IsakmpHeader:
        """Decode and check the header of a whole datagram ``data``."""
        if len(data) < HEADER_LEN:
            raise DecodeError("ISAKMP header", "length", f"datagram of {len(data)} octets")
        icky, rcky, np, version, xchg, flags, mid, length = _FMT.unpack_from(data)
        if version >> 4 != 1:
            raise DecodeError("ISAKMP header", "version", f"major version {version >> 4}")
        if length != len(data):
            raise DecodeError(
                "ISAKMP header", "length", f"says {length} octets, datagram has {len(data)}"
            )
        if flags & ~0x07:
            raise DecodeError("ISAKMP header", "flags", f"unknown flags 0x{flags:02x}")
        if icky == bytes(8):
            raise DecodeError("ISAKMP header", "initiator_cookie", "must not be zero")
        return cls(icky, rcky, np, xchg, HeaderFlag(flags), mid, length, version)
