"""The IPv6 namespace topology and helpers shared by the ESPv6 namespace tests.

Used by tests/test_dataplane6_ns.py (static SAs) and tests/test_ipv6_group_ns.py
(daemons).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from gdoid.netlab import (
    CORE_BRIDGE,
    GM1_WAN,
    GM2_WAN,
    Topology,
)
from tests.dpnet import read_pcap

TENANT6 = IPv6Network("fd00::/16")
A6, B6 = "fd00:1::2", "fd00:2::2"
GM1_LAN6, GM2_LAN6 = "fd00:1::1", "fd00:2::1"
GM1_WAN6, GM2_WAN6, KS6 = "fd01::1", "fd01::2", "fd01::10"
TRANSFORM = "esp-gcm-256"
SPI4, SPI6 = 0x10000001, 0x16000001
MARKER = b"gdoid-v6-known-plaintext:"
SIZE = 4 * 1024 * 1024
PORT = 5001
WAN_MTU = 1380  # v6-only: outer packets up to 1380, so the TUN (1400) can overfill an SA

PING6 = r"""
import select, socket, struct, sys, time
dst, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
ident, got = 0x6464, 0
for seq in range(count):
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq) + bytes(size), (dst, 0))
    end = time.monotonic() + 2
    while (left := end - time.monotonic()) > 0 and select.select([s], [], [], left)[0]:
        icmp = s.recv(65535)
        if icmp[0] == 129 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            got += 1
            break
    time.sleep(0.05)
print(got)
"""

TCP_SERVER = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(90)
print("listening", flush=True)
c, peer = s.accept()
c.settimeout(90)
h, n = hashlib.sha256(), 0
while d := c.recv(1 << 20):
    h.update(d)
    n += len(d)
c.sendall(h.hexdigest().encode())
c.close()
print(n, h.hexdigest(), peer[0], flush=True)
"""

TCP_CLIENT = r"""
import hashlib, socket, sys
dst, port, size, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
data = b"".join((marker + b"%010d" % i).ljust(64, b".") for i in range(size // 64))
c = socket.create_connection((dst, port), timeout=90)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
reply = b""
while d := c.recv(100):
    reply += d
print(len(data), hashlib.sha256(data).hexdigest(), reply.decode(), flush=True)
"""

INJECT6 = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
for line in sys.stdin:
    pkt = bytes.fromhex(line.strip())
    s.sendto(pkt, (socket.inet_ntop(socket.AF_INET6, pkt[24:40]), 0))
"""


class Topology6(Topology):
    """The netlab topology with ULA IPv6 on every link (DAD off); ``dual`` keeps IPv4 too."""

    def __init__(self, dual: bool) -> None:
        super().__init__()
        self.dual = dual

    def build(self) -> None:
        if self.dual:
            super().build()
        else:
            for name in self.ns:
                self._ip(["netns", "add", self.ns[name]])
                self._created.append(self.ns[name])
        for name in self.ns:
            self.ip(name, "link", "set", "lo", "up")
            for key, value in (("disable_ipv6", "0"), ("accept_dad", "0"), ("accept_ra", "0")):
                for dev in ("all", "default", "lo"):
                    self.sysctl(name, f"net.ipv6.conf.{dev}.{key}", value)
        links = (
            ("gm1", "lan", GM1_LAN6, "hostA", "eth0", A6),
            ("gm2", "lan", GM2_LAN6, "hostB", "eth0", B6),
        )
        for gm, gif, gaddr, host, hif, haddr in links:
            if not self.dual:
                self._veth(gm, gif, host, hif)
            for ns, ifname, a in ((gm, gif, gaddr), (host, hif, haddr)):
                self.sysctl(ns, f"net.ipv6.conf.{ifname}.disable_ipv6", "0")
                self.ip(ns, "-6", "addr", "add", f"{a}/64", "dev", ifname, "nodad")
                self.ip(ns, "link", "set", ifname, "up")
            self.ip(host, "-6", "route", "add", "default", "via", gaddr)
        if not self.dual:
            self.ip("core", "link", "add", CORE_BRIDGE, "type", "bridge", "stp_state", "0",
                    "forward_delay", "0")  # fmt: skip
            self.ip("core", "link", "set", CORE_BRIDGE, "up")
        for ns, ifname, port, a in (
            ("gm1", "wan", "gm1", GM1_WAN6),
            ("gm2", "wan", "gm2", GM2_WAN6),
            ("ks", "eth0", "ks", KS6),
        ):
            if not self.dual:
                self._veth(ns, ifname, "core", port)
                self.ip("core", "link", "set", port, "master", CORE_BRIDGE)
                self.ip("core", "link", "set", port, "up")
            self.sysctl(ns, f"net.ipv6.conf.{ifname}.disable_ipv6", "0")
            self.ip(ns, "-6", "addr", "add", f"{a}/64", "dev", ifname, "nodad")
            self.ip(ns, "link", "set", ifname, "up")
        # The routes the address-preserving ESP uses; the KS namespace (an attacker on
        # the core) routes the LANs to their GMs.
        for ns, net, via in (
            ("gm1", "fd00:2::/64", GM2_WAN6),
            ("gm2", "fd00:1::/64", GM1_WAN6),
            ("ks", "fd00:1::/64", GM1_WAN6),
            ("ks", "fd00:2::/64", GM2_WAN6),
        ):
            self.ip(
                ns, "-6", "route", "add", net, "via", via, "dev", "wan" if ns != "ks" else "eth0"
            )
        if self.dual:
            self.ip("ks", "route", "add", "10.1.0.0/16", "via", GM1_WAN)
            self.ip("ks", "route", "add", "10.2.0.0/16", "via", GM2_WAN)

    def ping6(self, ns: str, dst: str, count: int = 3, size: int = 56) -> int:
        res = self.run(
            ns, sys.executable, "-c", PING6, dst, str(count), str(size), timeout=count * 3 + 30
        )
        return int(res.stdout.strip())


class Forwarder:
    """``python -m gdoid.dataplane`` in a GM namespace; JSON lines on stdout in a queue."""

    def __init__(self, topo: Topology, ns: str, options: dict[str, str]) -> None:
        args = ["--dataplane", "gcm", "--tun", "gdoi0", "--wan", "wan"]
        for k, v in options.items():
            args += ["--option", f"{k}={v}"]
        repo = Path(__file__).resolve().parent.parent
        self.proc = topo.popen(
            ns, sys.executable, "-m", "gdoid.dataplane", *args, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.expect("ready", 30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                continue

    def expect(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if msg.get("event") == event:
                return msg
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"forwarder never said {event!r} {err}")

    def stats(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGUSR1)
        return self.expect("stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Capture:
    """tshark on the core bridge; start and end confirmed with a UDP probe ks -> gm1:9."""

    def __init__(self, topo: Topology, pcap: Path, src: str, dst: str) -> None:
        self.topo, self.pcap, self.src, self.dst = topo, pcap, src, dst
        self.proc = topo.popen(
            "core", "tshark", "-n", "-l", "-P", "-i", CORE_BRIDGE, "-F", "pcap", "-w", str(pcap),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.seen: list[str] = []
        self._mark = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.seen.append(line)
                self._cond.notify_all()

    def _probe(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.topo.run("ks", "bash", "-c", f"echo probe > /dev/udp/{self.dst}/9", check=False)
            with self._cond:
                if self._cond.wait_for(
                    lambda: any(self.src in x and " 9 " in x for x in self.seen[self._mark :]), 0.3
                ):
                    return
        raise AssertionError("tshark on the core never showed the probe")

    def __enter__(self) -> Capture:
        self._probe()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with self._cond:
                self._mark = len(self.seen)
            self._probe()
        finally:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ipv6_packets(pcap: Path) -> list[bytes]:
    return [f[14:] for f in read_pcap(pcap) if f[12:14] == b"\x86\xdd"]


def tenant6(packets: list[bytes]) -> list[bytes]:
    """IPv6 packets with both addresses in the tenant prefix (LAN to LAN)."""
    return [
        p for p in packets
        if IPv6Address(p[8:24]) in TENANT6 and IPv6Address(p[24:40]) in TENANT6
    ]  # fmt: skip


def esp_sa_line(family: str, spi: int, key: bytes) -> str:
    """One Wireshark ``esp_sa`` row (the format of gdoid.keylog, for the given family)."""
    return (
        f'"{family}","*","*","0x{spi:08x}","AES-GCM with 16 octet ICV [RFC4106]",'
        f'"0x{key.hex()}","NULL",""\n'
    )


@dataclass
class Run:
    topo: Topology6
    pcap: Path
    keylog: Path
    key6: bytes
    fwd: tuple[Forwarder, Forwarder]
    stats: tuple[dict[str, Any], dict[str, Any]]
    pings6: tuple[int, int]
    pings4: tuple[int, int]
    big_pings: int
    pmtu: str
    client: list[str]
    server: list[str]


def _tcp(topo: Topology, src_ns: str, dst: str) -> tuple[list[str], list[str]]:
    server = topo.popen(src_ns.replace("hostA", "hostB"), sys.executable, "-c", TCP_SERVER, dst,
                        str(PORT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        client = topo.run(src_ns, sys.executable, "-c", TCP_CLIENT, dst, str(PORT), str(SIZE),
                          MARKER.decode(), timeout=120)  # fmt: skip
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return client.stdout.split(), out.split()
