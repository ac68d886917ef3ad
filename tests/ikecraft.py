"""Hand-built IKE messages (no gdoid encoder) and the amplification prober (tests, benchmarks)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from gdoid.protocol.constants import MAIN_MODE, ExchangeType, NotifyType
from gdoid.protocol.header import HEADER_LEN
from gdoid.protocol.ike_policy import Phase1Config
from gdoid.protocol.informational import plain_notify
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.message import encode_plain
from gdoid.protocol.payloads import KePayload, NoncePayload


def ike_transform(number: int, cipher: int) -> bytes:
    attrs = struct.pack(
        "!HHHHHHHHHH", 0x8001, cipher, 0x800E, 128, 0x8002, 4, 0x8003, 1, 0x8004, 19
    )
    body = struct.pack("!BBH", number & 0xFF, 1, 0) + attrs
    return body


def mm1_with(proposals: int, transforms: int, vid_bytes: int = 0, cipher: int = 7) -> bytes:
    """A message 1 with ``proposals`` proposals of ``transforms`` transforms, plus a big VID.

    ``cipher`` 7 is AES-CBC (acceptable), 5 is 3DES (refused: NO_PROPOSAL_CHOSEN).
    """
    props = b""
    for p in range(proposals):
        ts = b""
        for t in range(transforms):
            body = ike_transform(t + 1, cipher)
            ts += struct.pack("!BBH", 3 if t + 1 < transforms else 0, 0, 4 + len(body)) + body
        pbody = struct.pack("!BBBB", p + 1, 1, 0, transforms & 0xFF) + ts
        props += struct.pack("!BBH", 2 if p + 1 < proposals else 0, 0, 4 + len(pbody)) + pbody
    sa_body = struct.pack("!II", 1, 1) + props
    vid = struct.pack("!BBH", 0, 0, 4 + vid_bytes) + b"V" * vid_bytes if vid_bytes else b""
    sa = struct.pack("!BBH", 13 if vid else 0, 0, 4 + len(sa_body)) + sa_body
    body = sa + vid
    hdr = (
        os.urandom(8) + bytes(8) + struct.pack("!BBBBII", 1, 0x10, 2, 0, 0, HEADER_LEN + len(body))
    )
    return hdr + body


def header(
    icky: bytes,
    rcky: bytes,
    exchange: int,
    next_payload: int = 0,
    flags: int = 0,
    body: bytes = b"",
) -> bytes:
    return (
        icky
        + rcky
        + struct.pack("!BBBBII", next_payload, 0x10, exchange, flags, 0, HEADER_LEN + len(body))
        + body
    )


@dataclass
class Probe:
    name: str
    sent: int
    received: list[int]

    @property
    def out(self) -> int:
        return sum(self.received)


class Prober:
    """Sends datagrams to the KS from one socket; returns what came back for each."""

    def __init__(self, source: str, ks: tuple[str, int], processed: Callable[[], int]) -> None:
        self.ks = ks
        self.processed = processed  # the KS's "received" counter
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.base = processed()
        self.sent = 0
        self.probes: list[Probe] = []

    def send(self, name: str, data: bytes) -> list[bytes]:
        self.sock.sendto(data, self.ks)
        self.sent += 1
        while self.processed() < self.base + self.sent:  # each call is a control round trip
            pass
        replies = []
        while True:
            try:
                replies.append(self.sock.recv(65535, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
        self.probes.append(Probe(name, len(data), [len(r) for r in replies]))
        return replies

    def close(self) -> None:
        self.sock.close()


def run_probes(prober: Prober, phase1: Phase1Config) -> list[Probe]:
    """Every kind of unauthenticated input, the Main Mode ones inside live exchanges."""
    rnd = os.urandom
    peer = IPv4Address(prober.sock.getsockname()[0])
    prober.send("empty datagram", b"")
    prober.send("5 random octets", rnd(5))
    prober.send("bare header, Main Mode", header(rnd(8), bytes(8), MAIN_MODE))
    for xchg in (ExchangeType.INFORMATIONAL, ExchangeType.GROUPKEY_PULL, ExchangeType.COOP_ANN, 33):
        prober.send(f"bare header, exchange {int(xchg)}", header(rnd(8), rnd(8), xchg))
    prober.send("header + 300 random octets", header(rnd(8), bytes(8), MAIN_MODE, 1, 0, rnd(300)))
    prober.send("MM1 minimal, no vendor ID", mm1_with(1, 1))
    prober.send("MM1 no acceptable proposal", mm1_with(1, 3, cipher=5))
    prober.send("MM1 40 transforms", mm1_with(1, 40))
    prober.send("MM1 9 proposals", mm1_with(9, 1))
    prober.send("MM1 61 KB", mm1_with(9, 244, cipher=5))
    prober.send("MM1 truncated", mm1_with(1, 1)[:40])

    def live(name: str) -> tuple[MainModeInitiator, bytes]:
        """A fresh exchange up to our message 3 (the real GM offer: with its vendor ID)."""
        init = MainModeInitiator(phase1, IPv4Address(prober.ks[0]), 0.0)
        [mm1] = init.start(0.0).send
        [mm2] = prober.send(name, mm1)
        [mm3] = init.receive(mm2, 0.0).send
        return init, mm3

    init, mm3 = live("MM1 of a real GM")
    prober.send("MM3 forged responder cookie", mm3[:8] + rnd(8) + mm3[16:])
    short = encode_plain(
        init.icky, init.rcky, MAIN_MODE, 0, [KePayload(init.gxi), NoncePayload(rnd(8))]
    )
    [mm4] = prober.send("MM3 with an 8-octet nonce", short)
    assert mm4[18] == MAIN_MODE  # answered with message 4 (no longer than message 3)
    prober.send(
        "MM5 16 octets of garbage ciphertext",
        header(init.icky, init.rcky, MAIN_MODE, 5, 1, rnd(16)),
    )

    init, mm3 = live("MM1 of a real GM (2)")
    prober.send(
        "unprotected notify (abandon)",
        plain_notify(init.icky, init.rcky, NotifyType.PAYLOAD_MALFORMED),
    )
    prober.send("MM3 after its MM1 state is gone", mm3)

    init, mm3 = live("MM1 of a real GM (3)")
    prober.send("MM3 with a bad KE", mm3[:32] + bytes(len(mm3) - 32))
    assert peer  # (the source address every probe came from)
    return prober.probes
