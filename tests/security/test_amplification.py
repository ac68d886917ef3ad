"""Issue 9 §4: no amplification.  A peer that has not completed phase 1 never gets
back more bytes than it sent, measured on the wire against a real ``gdoid ks``.

One UDP socket on loopback sends each unauthenticated input (bare headers, message 1
variants, message 3/5 variants inside a live exchange, garbage) and collects every
reply; a ``show gdoid counters`` round trip after each datagram tells when the KS
has handled it (its replies are sent before it serves the next request).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from gdoid.config.loader import load_gm_config
from gdoid.phase1 import phase1_config
from gdoid.protocol.constants import MAIN_MODE, ExchangeType, NotifyType
from gdoid.protocol.ike import MainModeInitiator, Phase1Config, plain_notify
from gdoid.protocol.message import encode_plain
from gdoid.protocol.payloads import KePayload, NoncePayload
from tests.procs import (
    Daemon,
    auth_toml,
    gdoictl_json,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)
from tests.security.test_flood import mm1_with

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binds UDP 848: needs root")

KS_ADDRESS = "127.0.1.1"
KS_PORT = 848
PROBER = "127.0.1.5"
HEADER_LEN = 28


def header(icky: bytes, rcky: bytes, exchange: int, next_payload: int = 0, flags: int = 0, body: bytes = b"") -> bytes:
    return icky + rcky + struct.pack("!BBBBII", next_payload, 0x10, exchange, flags, 0, HEADER_LEN + len(body)) + body


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
    short = encode_plain(init.icky, init.rcky, MAIN_MODE, 0, [KePayload(init.gxi), NoncePayload(rnd(8))])
    [mm4] = prober.send("MM3 with an 8-octet nonce", short)
    assert mm4[18] == MAIN_MODE  # answered with message 4 (no longer than message 3)
    prober.send("MM5 16 octets of garbage ciphertext", header(init.icky, init.rcky, MAIN_MODE, 5, 1, rnd(16)))

    init, mm3 = live("MM1 of a real GM (2)")
    prober.send("unprotected notify (abandon)", plain_notify(init.icky, init.rcky, NotifyType.PAYLOAD_MALFORMED))
    prober.send("MM3 after its MM1 state is gone", mm3)

    init, mm3 = live("MM1 of a real GM (3)")
    prober.send("MM3 with a bad KE", mm3[:32] + bytes(len(mm3) - 32))
    assert peer  # (the source address every probe came from)
    return prober.probes


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    write_private(tmp_path / "psk.secret", "amplification-secret\n")
    write_signing_key(tmp_path / "rekey.key")
    return tmp_path


def test_no_reply_to_an_unauthenticated_peer_is_larger_than_its_datagram(lab: Path) -> None:
    auth = auth_toml("psk.secret")
    ks_cfg = ks_toml(lab, address=KS_ADDRESS, port=KS_PORT, auth=auth)
    gm = load_gm_config(gm_toml(lab, address=PROBER, name="prober", auth=auth, servers=(KS_ADDRESS,)))
    p1 = phase1_config(gm.ike, gm.auth, gm.address, gm.software_version)
    with Daemon("ks", ks_cfg) as ks:
        ks.wait_for("ks_started")
        prober = Prober(PROBER, (KS_ADDRESS, KS_PORT), lambda: gdoictl_json(lab / "ks.sock", "show", "gdoid", "counters").get("received", 0))
        try:
            probes = run_probes(prober, p1)
        finally:
            prober.close()
        assert ks.proc.poll() is None
    for p in probes:
        print(f"{p.name:40s} in {p.sent:6d}  out {p.out:5d}  ({len(p.received)} datagrams)")
    too_big = [(p.name, p.sent, p.received) for p in probes if p.out > p.sent]
    assert too_big == []
    assert sum(p.out for p in probes) <= sum(p.sent for p in probes)
    assert any(p.out for p in probes)  # the KS did answer (message 2s, notifies): not a dead socket
    assert "Traceback" not in ks.text()
