"""A stand-in dataplane for the forwarder tests.

"ESP" = an IP protocol 50 header with the inner addresses, a fake SPI and the
XOR-ed inner packet; ``--dataplane tests.stubdataplane:make_stub`` loads it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

STUB_SPI = b"\x5a\x5a\x00\x01"


@dataclass
class StubResult:
    to_network: list[bytes] = field(default_factory=list)
    to_tun: list[bytes] = field(default_factory=list)
    drop: str | None = None


def _xor(data: bytes) -> bytes:
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(b"\xa5" * n, "big")).to_bytes(n, "big")


class StubDataplane:
    """Trivial "ESP": outer IPv4 (proto 50, inner src/dst), SPI, XOR-ed inner packet.

    ``fail_every=N`` raises on every Nth outbound call (a dataplane bug);
    ``garbage`` adds an unsendable 3-octet packet to every outbound result.
    """

    def __init__(
        self, prefixes: list[IPv4Network], fail_every: int = 0, garbage: bool = False
    ) -> None:
        self.prefixes = list(prefixes)
        self.fail_every = fail_every
        self.garbage = garbage
        self.calls = 0

    def protected_prefixes(self) -> list[IPv4Network]:
        return list(self.prefixes)

    def _protected(self, packet: bytes) -> bool:
        dst = IPv4Address(packet[16:20])
        return any(dst in p for p in self.prefixes)

    def outbound(self, packet: bytes, now: float) -> StubResult:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("stub dataplane bug")
        if len(packet) < 20 or packet[0] >> 4 != 4 or not self._protected(packet):
            return StubResult(drop="NO_POLICY")
        payload = STUB_SPI + struct.pack("!I", self.calls) + _xor(packet)
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            0,
            0,
            64,
            50,
            0,
            packet[12:16],
            packet[16:20],
        )
        out = [header + payload]
        if self.garbage:
            out.append(b"\x45\x00\x00")
        return StubResult(to_network=out)

    def inbound(self, packet: bytes, now: float) -> StubResult:
        ihl = (packet[0] & 15) * 4
        esp = packet[ihl:]
        if esp[:4] != STUB_SPI:
            return StubResult(drop="UNKNOWN_SPI")
        return StubResult(to_tun=[_xor(esp[8:])])


def make_stub(prefixes: list[IPv4Network], options: dict[str, str]) -> StubDataplane:
    """The ``--dataplane tests.stubdataplane:make_stub`` factory."""
    return StubDataplane(
        prefixes,
        fail_every=int(options.get("fail_every", "0")),
        garbage=options.get("garbage") == "1",
    )
