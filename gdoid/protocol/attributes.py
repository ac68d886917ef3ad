"""ISAKMP data attributes (RFC 2408 §3.3): TV when the AF bit is set, else TLV."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gdoid.protocol.errors import DecodeError

AF_TV = 0x8000


@dataclass(frozen=True)
class Attribute:
    """One data attribute.

    An ``int`` value is encoded TV (basic, 2 octets); a ``bytes`` value TLV
    (variable).  Decoding keeps the form, so encode(decode(x)) == x.
    """

    type: int
    value: int | bytes

    def __post_init__(self) -> None:
        if not 0 <= self.type < AF_TV:
            raise ValueError(f"attribute type {self.type} out of range")
        if isinstance(self.value, int):
            if not 0 <= self.value <= 0xFFFF:
                raise ValueError(f"TV attribute {self.type} value {self.value} exceeds 16 bits")
        elif len(self.value) > 0xFFFF:
            raise ValueError(f"TLV attribute {self.type} too long")

    @classmethod
    def long(cls, type_: int, value: int, size: int = 4) -> Attribute:
        """A TLV attribute carrying an integer in ``size`` octets (e.g. lifetimes)."""
        return cls(type_, value.to_bytes(size, "big"))

    @property
    def int_value(self) -> int:
        if isinstance(self.value, int):
            return self.value
        return int.from_bytes(self.value, "big")

    @property
    def bytes_value(self) -> bytes:
        if isinstance(self.value, bytes):
            return self.value
        return self.value.to_bytes(2, "big")

    def encode(self) -> bytes:
        if isinstance(self.value, int):
            return struct.pack("!HH", AF_TV | self.type, self.value)
        return struct.pack("!HH", self.type, len(self.value)) + self.value


def encode_attributes(attrs: Iterable[Attribute]) -> bytes:
    return b"".join(a.encode() for a in attrs)


def decode_attributes(data: bytes, payload: str) -> tuple[Attribute, ...]:
    """Decode a run of attributes filling ``data`` exactly."""
    out: list[Attribute] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise DecodeError(payload, "attributes", f"{len(data) - pos} trailing octets")
        af_type, value = struct.unpack_from("!HH", data, pos)
        pos += 4
        if af_type & AF_TV:
            out.append(Attribute(af_type & ~AF_TV, value))
            continue
        if pos + value > len(data):
            raise DecodeError(
                payload,
                f"attribute[{af_type}].length",
                f"{value} exceeds the {len(data) - pos} left",
            )
        out.append(Attribute(af_type, bytes(data[pos : pos + value])))
        pos += value
    return tuple(out)


def find(attrs: Sequence[Attribute], type_: int) -> Attribute | None:
    for a in attrs:
        if a.type == type_:
            return a
    return None
