"""A bounds-checked cursor over bytes: every short read names its field."""

from __future__ import annotations

from gdoid.protocol.errors import DecodeError


class Reader:
    __slots__ = ("data", "pos", "payload")

    def __init__(self, data: bytes, payload: str) -> None:
        self.data = data
        self.pos = 0
        self.payload = payload

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(
                self.payload, field, f"truncated: need {n} octets, {self.remaining} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return bytes(out)

    def zero(self, n: int, field: str) -> None:
        """Consume ``n`` reserved octets that must be zero."""
        if any(self.take(n, field)):
            raise DecodeError(self.payload, field, "reserved octets must be zero")

    def end(self, field: str = "length") -> None:
        if self.remaining:
            raise DecodeError(self.payload, field, f"{self.remaining} unexpected trailing octets")
