"""ESP over IPv6 end to end in network namespaces (issue 11 §3), v6-only and dual-stack.

hostA -- gm1 -- core(+ks) -- gm2 -- hostB as in :mod:`gdoid.netlab`, addressed with ULAs:
LANs fd00:1::/64 and fd00:2::/64, core fd01::/64 (the dual-stack topology adds the
usual IPv4 addresses).  The GMs run ``python -m gdoid.dataplane --dataplane gcm`` with
a static AES-GCM-256 TEK per family (no key server: the control plane does not speak
IPv6 yet), as ``benchmarks/tunnel.py`` does.  Pings and a TCP transfer with a SHA-256
comparison cross the core; the capture shows only ESP between the LANs, tshark
decrypts it with an ``esp_sa`` key log (``esp.icv_good``).  Waits are event-driven.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Raw, raw

from gdoid.dataplane.esp import EspSa
from gdoid.netlab import (
    CORE_BRIDGE,
    GM1_WAN,
    GM2_WAN,
    HOST_A,
    HOST_B,
    Topology,
)
from gdoid.protocol.policy import SenderIds, Tek, TekPolicy, TekTransform, TrafficSelector
from tests.dpnet import read_pcap, tshark_fields, wait_until
from tests.netns import require_netns

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("netns_required")]

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


@pytest.fixture(scope="module", params=["v6only", "dualstack"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require_netns()
    dual = request.param == "dualstack"
    d = tmp_path_factory.mktemp(request.param)
    key4, key6 = secrets.token_bytes(36), secrets.token_bytes(36)
    keylog = d / "keylog"
    keylog.mkdir()
    rows = esp_sa_line("IPv6", SPI6, key6) + (esp_sa_line("IPv4", SPI4, key4) if dual else "")
    (keylog / "esp_sa").write_text(rows)
    if dual:
        options = {"key": key4.hex(), "spi": hex(SPI4), "src": "10.0.0.0/8", "dst": "10.0.0.0/8",
                   "src6": str(TENANT6), "dst6": str(TENANT6), "key6": key6.hex(), "spi6": hex(SPI6)}  # fmt: skip
    else:
        options = {"key": key6.hex(), "spi": hex(SPI6), "src": str(TENANT6), "dst": str(TENANT6),
                   "wan_mtu": str(WAN_MTU)}  # fmt: skip
    options["transform"] = TRANSFORM
    pcap = d / "core.pcap"
    with Topology6(dual) as topo:
        f1 = Forwarder(topo, "gm1", {**options, "sid": "1"})
        f2 = Forwarder(topo, "gm2", {**options, "sid": "2"})
        try:
            with Capture(topo, pcap, KS6, GM1_WAN6):
                pings6 = (topo.ping6("hostA", B6, 5), topo.ping6("hostB", A6, 3))
                pings4 = (
                    (topo.ping("hostA", HOST_B, 4), topo.ping("hostB", HOST_A, 2))
                    if dual
                    else (0, 0)
                )
                big = 0
                pmtu = ""
                if not dual:
                    # Bigger than the SA's room: the GM answers Packet Too Big, hostA
                    # fragments from then on and the pings go through.
                    big = topo.ping6("hostA", B6, 4, size=1300)
                    pmtu = topo.run("hostA", "ip", "-6", "route", "get", B6).stdout
                client, server = _tcp(topo, "hostA", B6)
            stats = (f1.stats(), f2.stats())
            yield Run(
                topo, pcap, keylog, key6, (f1, f2), stats, pings6, pings4, big, pmtu, client, server
            )
        finally:
            f1.stop()
            f2.stop()


def test_ping6_and_tcp_cross_the_core_only_as_esp(run: Run) -> None:
    assert run.pings6 == (5, 3)
    n, digest, server_digest = run.client
    assert int(n) == SIZE and digest == server_digest
    assert run.server[:3] == [str(SIZE), digest, A6]
    for s in run.stats:
        assert s["send_errors"] == 0 and s["dataplane_errors"] == 0 and s["read_errors"] == 0
        assert s["net_read"] >= 8 and s["tun_written"] >= 8
    tenant = tenant6(ipv6_packets(run.pcap))
    # Only ESP (next header 50, no extension header) between the LANs, in both directions.
    assert [p[:40].hex() for p in tenant if p[6] != 50] == []
    assert sum(p[8:24] == IPv6Address(A6).packed for p in tenant) >= SIZE // 1400
    assert sum(p[8:24] == IPv6Address(B6).packed for p in tenant) >= 3 + 5
    assert MARKER not in run.pcap.read_bytes()


def test_tshark_decrypts_the_esp6_with_the_keylog(run: Run) -> None:
    tenant = "ipv6.addr == fd00::/16"
    assert tshark_fields(run.pcap, None, f"{tenant} and (icmpv6 or tcp)", "frame.number") == []
    rows = tshark_fields(run.pcap, run.keylog, f"esp and {tenant}", "frame.protocols",
                         "esp.icv_good", "esp.icv_bad")  # fmt: skip
    assert len(rows) >= SIZE // 1400
    assert all(r[1] in ("1", "True") for r in rows), {r[1] for r in rows}
    assert not any(r[2] in ("1", "True") for r in rows)
    protos = {r[0] for r in rows}
    assert all(p.startswith("eth:ethertype:ipv6:esp:ipv6:") for p in protos), protos
    assert sum(":icmpv6" in r[0] for r in rows) >= 16  # 5 + 3 echo requests and replies
    shown = tshark_fields(
        run.pcap, run.keylog, f'tcp.payload contains "{MARKER.decode()}"', "frame.number"
    )
    assert len(shown) >= SIZE // 1400
    assert (
        tshark_fields(run.pcap, run.keylog, "_ws.malformed or esp.icv_bad == 1", "frame.number")
        == []
    )


def test_dualstack_carries_ipv4_beside_ipv6(run: Run) -> None:
    if not run.topo.dual:
        pytest.skip("the v6-only topology has no IPv4")
    assert run.pings4 == (4, 2)
    tenant4 = [
        f[14:] for f in read_pcap(run.pcap)
        if f[12:14] == b"\x08\x00" and f[26] == 10 and f[30] == 10
    ]  # fmt: skip
    assert len(tenant4) >= 12 and all(p[9] == 50 for p in tenant4)
    rows = tshark_fields(run.pcap, run.keylog, "esp and ip.addr == 10.0.0.0/8", "frame.protocols",
                         "esp.icv_good", "esp.spi")  # fmt: skip
    assert len(rows) == len(tenant4) and all(r[1] in ("1", "True") for r in rows)
    assert {r[0] for r in rows} == {"eth:ethertype:ip:esp:ip:icmp:data"}
    assert {int(r[2], 16) for r in rows} == {SPI4}


def test_packet_too_big_then_fragments(run: Run) -> None:
    if run.topo.dual:
        pytest.skip("the dual-stack topology runs with the default WAN MTU")
    room = EspSa(_tek(run.key6)).max_inner(WAN_MTU - 20)
    assert f"mtu {room}" in run.pmtu  # hostA learnt the MTU our ICMPv6 Packet Too Big gave
    # The first request dies at gm1 (PTB to hostA), the first reply at gm2 (PTB to hostB);
    # both hosts fragment from then on and the other pings go through.
    assert run.big_pings >= 2
    assert run.stats[0]["drops"].get("TOO_BIG", 0) >= 1


def _tek(key: bytes) -> Tek:
    t = TekTransform.from_name(TRANSFORM)
    sel = TrafficSelector(TENANT6, TENANT6)  # type: ignore[arg-type]  # IPv6 selectors: dataplane only
    return Tek(SPI6, TekPolicy(1, t, sel, 3600), key, b"", 0, time.time() + 3600)


def test_extension_header_before_esp_is_dropped_by_reason(run: Run) -> None:
    """An attacker on the core sends ESP behind a destination-options header: gm2 drops
    and counts it (``ipv6-ext-header``, by name in the forwarder stats); the same ESP without it is delivered."""
    sa = EspSa(_tek(run.key6), SenderIds(8, (0xEE,)))
    inner = raw(IPv6(src=A6, dst=B6, nh=59) / Raw(b"ext-header-probe"))
    outer = sa.encapsulate(inner)
    esp = outer[40:]
    bad = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt(nh=50) / Raw(esp))
    f2 = run.fwd[1]
    before = f2.stats()
    run.topo.run("ks", sys.executable, "-c", INJECT6, input=bad.hex() + "\n", stdin=None)

    def dropped() -> dict[str, Any] | None:
        s = f2.stats()
        return (
            s
            if s["drops"].get("IPV6_EXT_HEADER", 0) > before["drops"].get("IPV6_EXT_HEADER", 0)
            else None
        )

    after = wait_until("gm2 to count the ipv6-ext-header drop", dropped)
    assert after["dataplane_errors"] == 0
    good = sa.encapsulate(inner)
    run.topo.run("ks", sys.executable, "-c", INJECT6, input=good.hex() + "\n", stdin=None)
    wait_until("gm2 to deliver the same ESP without the header",
               lambda: f2.stats()["tun_written"] > after["tun_written"])  # fmt: skip


def test_ipv6_policy_routing_installed_then_removed(run: Run) -> None:
    """gm1 has the IPv6 rules 99/100/101 and table T routes fd00::/16 into the TUN (its own
    LAN thrown back to main); stopping the forwarder removes all of it.  Runs last: it
    stops gm1's forwarder."""
    topo = run.topo
    rules = topo.run("gm1", "ip", "-6", "rule").stdout
    assert "99:" in rules and "ipproto esp" in rules and "lookup 26469" in rules
    assert "100:" in rules and "fwmark 0x6764 lookup main" in rules
    assert "101:" in rules and "lookup 26468" in rules
    table = topo.run("gm1", "ip", "-6", "route", "show", "table", "26468").stdout
    assert "fd00::/16 dev gdoi0" in table and "throw fd00:1::/64" in table
    assert (
        "local default dev lo"
        in topo.run("gm1", "ip", "-6", "route", "show", "table", "26469").stdout
    )
    assert topo.run("gm1", "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    run.fwd[0].stop()
    assert run.fwd[0].proc.returncode == 0
    rules = topo.run("gm1", "ip", "-6", "rule").stdout
    assert "26468" not in rules and "26469" not in rules and "0x6764" not in rules
    assert topo.run("gm1", "ip", "-6", "route", "show", "table", "26468").stdout.strip() == ""
    assert topo.run("gm1", "ip", "-6", "route", "show", "table", "26469").stdout.strip() == ""
