"""The GM data path end to end: real KS/GM daemons in network namespaces (issue #3).

hostA -- GM1 -- core(+KS) -- GM2 -- hostB (:mod:`gdoid.netlab`); the GMs run
``[dataplane]`` and protect 10.0.0.0/8 <-> 10.0.0.0/8 with the group TEK.
Waits are event-driven: log lines, tshark probes, or ``gdoictl`` polled with
a deadline (:func:`tests.dpnet.wait_until`).
"""

from __future__ import annotations

import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from gdoid.netlab import HOST_A, HOST_B, KS, Topology
from tests.dpnet import (
    CoreCapture,
    DpGroup,
    addr,
    drops,
    ip_packets,
    read_pcap,
    total,
    tshark_fields,
    udp,
    wait_until,
)
from tests.dpnet import ipv4 as ip_packet
from tests.netns import require_netns
from tests.procs import gdoictl

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("netns_required")]

TENANT = IPv4Network("10.0.0.0/8")
MARKER = b"gdoid-known-plaintext:"
SIZE = 20 * 1024 * 1024
TCP_PORT = 5001
UDP_PORT = 5002
SPOOF = "10.1.0.77"  # a sender behind GM1 that does not exist

TCP_SERVER = r"""
import hashlib, socket, sys
s = socket.socket()
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
view = memoryview(data)
for off in range(0, len(data), 1 << 20):
    c.sendall(view[off:off + (1 << 20)])
c.shutdown(socket.SHUT_WR)
reply = b""
while d := c.recv(100):
    reply += d
print(len(data), hashlib.sha256(data).hexdigest(), reply.decode(), flush=True)
"""

UDP_SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    print(peer[0], data.decode(errors="replace"), flush=True)
"""


class UdpSink:
    """A UDP listener in a namespace; received datagrams arrive as lines in :attr:`lines`."""

    def __init__(self, topo: Topology, ns: str, address: str, port: int = UDP_PORT) -> None:
        self.proc = topo.popen(ns, sys.executable, "-c", UDP_SINK, address, str(port),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        assert self.expect("ready") == "ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"UDP sink never got {text!r}; got {self.seen}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> UdpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def in_tenant(a: str) -> bool:
    return IPv4Address(a) in TENANT


def tenant_packets(pcap: Path) -> list[bytes]:
    """IPv4 packets on the core with a 10.0.0.0/8 source or destination."""
    return [
        p for p in ip_packets(read_pcap(pcap)) if in_tenant(addr(p, 12)) or in_tenant(addr(p, 16))
    ]


def between(packets: list[bytes], src: str, dst: str, proto: int) -> list[bytes]:
    return [p for p in packets if p[9] == proto and addr(p, 12) == src and addr(p, 16) == dst]


def route_table(topo: Topology, ns: str) -> str:
    return topo.run(ns, "ip", "route", "show", "table", "26468", check=False).stdout


# --- one group for the 20 MB transfer, replay and garbage tests ----------------------------


@dataclass
class Shared:
    topo: Topology
    g: DpGroup


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    require_netns()
    d = tmp_path_factory.mktemp("dpshared")
    with Topology() as topo, DpGroup(topo, d, sa_extra="replay_window = 64") as g:
        yield Shared(topo, g)


@dataclass
class Transfer:
    pcap: Path
    before: dict[int, dict[str, Any]]
    after: dict[int, dict[str, Any]]
    client: list[str]
    server: list[str]
    pings: tuple[int, int]


@pytest.fixture(scope="module")
def transfer(shared: Shared, tmp_path_factory: pytest.TempPathFactory) -> Transfer:
    """Pings both ways and 20 MB of TCP hostA -> hostB, captured on the core bridge."""
    topo, g = shared.topo, shared.g
    pcap = tmp_path_factory.mktemp("dpcap") / "core.pcap"
    before = {i: g.ipsec(i) for i in (1, 2)}
    with CoreCapture(topo, pcap):
        pings = (topo.ping("hostA", HOST_B, count=5), topo.ping("hostB", HOST_A, count=3))
        server = topo.popen("hostB", sys.executable, "-c", TCP_SERVER, HOST_B, str(TCP_PORT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "listening"
            client = topo.run("hostA", sys.executable, "-c", TCP_CLIENT, HOST_B, str(TCP_PORT), str(SIZE),
                              MARKER.decode(), timeout=120)  # fmt: skip
            out, _ = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    after = {i: g.ipsec(i) for i in (1, 2)}
    return Transfer(pcap, before, after, client.stdout.split(), out.split(), pings)


def test_ping_and_20mb_tcp_cross_the_core_only_as_esp(shared: Shared, transfer: Transfer) -> None:
    t = transfer
    assert t.pings == (5, 3)
    n, digest, server_digest = t.client
    assert int(n) == SIZE and digest == server_digest
    assert t.server[:3] == [str(SIZE), digest, HOST_A]

    # Counters: everything went through encap on one GM and decap on the other.
    b1, b2, a1, a2 = t.before[1], t.before[2], t.after[1], t.after[2]
    data_pkts = SIZE // 1400
    assert total(a1, "pkts_encaps") - total(b1, "pkts_encaps") >= data_pkts + 5
    assert total(a1, "bytes_encaps") - total(b1, "bytes_encaps") >= SIZE
    assert total(a2, "pkts_decaps") - total(b2, "pkts_decaps") >= data_pkts + 5
    assert total(a2, "bytes_decaps") - total(b2, "bytes_decaps") >= SIZE
    assert (
        total(a2, "pkts_encaps") - total(b2, "pkts_encaps") >= 3 + 5
    )  # echo requests + replies, ACKs
    assert total(a1, "pkts_decaps") - total(b1, "pkts_decaps") >= 3 + 5
    for a, b in ((a1, b1), (a2, b2)):
        assert a["clear_out"] == b["clear_out"]
        assert {k: v - b["drops"][k] for k, v in a["drops"].items() if v != b["drops"][k]} == {}
        assert a["forwarder"]["send_errors"] == 0 and a["forwarder"]["dataplane_errors"] == 0

    # The core saw only ESP between the hosts, and never the plaintext.
    tenant = tenant_packets(t.pcap)
    assert [p[:20].hex() for p in tenant if p[9] != 50] == []
    assert len(between(tenant, HOST_A, HOST_B, 50)) >= data_pkts + 5
    assert len(between(tenant, HOST_B, HOST_A, 50)) >= 3 + 5
    assert MARKER not in t.pcap.read_bytes()
    assert MARKER[:12] not in t.pcap.read_bytes()


def test_keylog_decrypts_the_core_capture(shared: Shared, transfer: Transfer) -> None:
    keylog = shared.g.keylog
    assert (keylog / "esp_sa").exists() and (keylog / "preferences").exists()
    # Without the key log tshark sees opaque ESP only.
    tenant = "ip.addr == 10.0.0.0/8"
    assert tshark_fields(transfer.pcap, None, f"{tenant} and (icmp or tcp)", "frame.number") == []
    rows = tshark_fields(transfer.pcap, keylog, "esp", "frame.protocols", "esp.icv_good", "esp.icv_bad",
                         "ip.src")  # fmt: skip
    assert len(rows) >= SIZE // 1400
    protos = [r[0] for r in rows]
    assert all(r[1] in ("1", "True") for r in rows), {r[1] for r in rows}
    assert not any(r[2] in ("1", "True") for r in rows)
    assert not any("malformed" in p for p in protos)
    inner = {
        "eth:ethertype:ip:esp:ip:icmp:data",
        "eth:ethertype:ip:esp:ip:tcp",
        "eth:ethertype:ip:esp:ip:tcp:data",
    }
    assert set(protos) <= inner, set(protos) - inner
    assert sum(":icmp" in p for p in protos) == 16  # 5 + 3 pings, both ways
    assert sum(":tcp" in p for p in protos) >= SIZE // 1400
    assert (
        tshark_fields(transfer.pcap, keylog, "_ws.malformed or esp.icv_bad == 1", "frame.number")
        == []
    )
    # The decrypted TCP payload is the known plaintext.
    shown = tshark_fields(
        transfer.pcap, keylog, f'tcp.payload contains "{MARKER.decode()}"', "frame.number"
    )
    assert len(shown) >= SIZE // 1400


def test_gcm_ivs_unique_across_the_two_gms(shared: Shared, transfer: Transfer) -> None:
    """Both GMs send on the same AES-GCM TEK: every (SPI, explicit IV) is unique and the
    IVs carry each GM's own sender ID (RFC 6054, 8 bits) as prefix."""
    g = shared.g
    sids = {i: set(g.show(i)["sender_ids"]) for i in (1, 2)}
    assert sids[1] and sids[2] and not sids[1] & sids[2], sids
    seen: list[tuple[bytes, bytes]] = []
    prefixes: dict[int, set[int]] = {1: set(), 2: set()}
    for p in tenant_packets(transfer.pcap):
        assert p[9] == 50
        hl = (p[0] & 15) * 4
        spi, iv = p[hl : hl + 4], p[hl + 8 : hl + 16]
        seen.append((spi, iv))
        prefixes[1 if addr(p, 12).startswith("10.1.") else 2].add(iv[0])
    assert len(seen) >= SIZE // 1400
    assert len({spi for spi, _ in seen}) == 1
    assert len(set(seen)) == len(seen), "an explicit IV repeated under the group key"
    assert prefixes[1] and prefixes[1] <= sids[1], (prefixes, sids)
    assert prefixes[2] and prefixes[2] <= sids[2], (prefixes, sids)
    assert not prefixes[1] & prefixes[2]


def test_replayed_esp_packet_is_dropped(shared: Shared, tmp_path: Path) -> None:
    topo, g = shared.topo, shared.g
    pcap = tmp_path / "one.pcap"
    with CoreCapture(topo, pcap):
        assert topo.ping("hostA", HOST_B, count=1) == 1
    (esp,) = between(tenant_packets(pcap), HOST_A, HOST_B, 50)
    before, rep = g.ipsec(2), g.replay(2)
    assert rep["replay_window"] == 64
    assert g.inject([esp, esp, esp]) == 3
    after = g.wait_counter(
        2, "replay drops", lambda s: drops(s, "replay"), drops(before, "replay") + 3
    )
    assert drops(after, "replay") == drops(before, "replay") + 3
    assert after["forwarder"]["tun_written"] == before["forwarder"]["tun_written"]
    assert g.replay(2)["drops"]["replay"] == rep["drops"]["replay"] + 3
    assert (
        after["sas"][0]["drops"].get("replay", 0) == before["sas"][0]["drops"].get("replay", 0) + 3
    )
    # Normal traffic carries on.
    assert topo.ping("hostA", HOST_B, count=3) == 3
    assert drops(g.ipsec(2), "replay") == drops(before, "replay") + 3


def test_garbage_esp_is_dropped_by_reason(shared: Shared) -> None:
    """Corrupted, truncated, unknown-SPI and random protocol-50 packets to hostB
    arrive on GM2's WAN: each is dropped and counted by its reason."""
    topo, g = shared.topo, shared.g
    sa = g.crafter()
    # From another (made-up) hostA-side address: hostA's replay window is far ahead of us.
    good = sa.encapsulate(udp(SPOOF, HOST_B, 40000, UDP_PORT, b"z" * 64))
    esp = good[20:]
    spi = struct.unpack_from("!I", esp)[0]
    corrupt_ct = bytearray(esp)
    corrupt_ct[20] ^= 0x01  # ciphertext
    corrupt_icv = bytearray(esp)
    corrupt_icv[-1] ^= 0x80  # ICV
    other_spi = (spi ^ 0x5A5A5A5A) or 1

    def random_esp() -> bytes:
        while True:
            b = os.urandom(120)
            if struct.unpack_from("!I", b)[0] != spi:
                return b

    packets = {
        "icv": [bytes(corrupt_ct), bytes(corrupt_icv)],
        "malformed": [esp[:16], esp[:30], esp[:4]],  # ESP header (+IV), cut short, a bare SPI
        "no-sa": [struct.pack("!I", other_spi) + esp[4:], random_esp(), random_esp()],
    }
    before = g.ipsec(2)
    sent = [ip_packet(SPOOF, HOST_B, 50, p) for ps in packets.values() for p in ps]
    assert g.inject(sent) == len(sent)

    def settled() -> dict[str, Any] | None:
        s = g.ipsec(2)
        done = all(drops(s, r) - drops(before, r) >= len(ps) for r, ps in packets.items())
        return s if done else None

    after = wait_until("GM2 counted every garbage packet", settled, 10)
    delta = {r: drops(after, r) - drops(before, r) for r in after["drops"]}
    assert delta == {**{r: 0 for r in after["drops"]}, **{r: len(ps) for r, ps in packets.items()}}
    assert after["forwarder"]["tun_written"] == before["forwarder"]["tun_written"]
    assert after["forwarder"]["net_read"] - before["forwarder"]["net_read"] == len(sent)
    # Those with the group's SPI are also counted on the SA.
    sa_before, sa_after = before["sas"][0]["drops"], after["sas"][0]["drops"]
    assert sa_after.get("icv", 0) - sa_before.get("icv", 0) == 2
    assert (
        sa_after.get("malformed", 0) - sa_before.get("malformed", 0) == 2
    )  # the bare SPI has no SA lookup
    # The uncorrupted packet still goes through, and so do pings.
    with UdpSink(topo, "hostB", HOST_B) as sink:
        g.inject([good])
        sink.expect("z" * 64)
    assert topo.ping("hostA", HOST_B, count=3) == 3
    assert topo.ping("hostB", HOST_A, count=1) == 1


# --- separate groups -------------------------------------------------------------------------


def _block_ks(topo: Topology) -> None:
    """GMs can still hear the KS but no longer reach it (no re-registration)."""
    for ns in ("gm1", "gm2"):
        topo.run(ns, "iptables", "-A", "OUTPUT", "-d", KS, "-p", "udp", "-j", "DROP")


@pytest.mark.parametrize(
    ("trigger", "fail_close"),
    [("ks-removal", False), ("ks-removal", True), ("gm-clear", True)],
    ids=["ks-removal-fail-open", "ks-removal-fail-close", "gm-clear-fail-close"],
)
def test_no_tek_fail_open_vs_fail_close(tmp_path: Path, trigger: str, fail_close: bool) -> None:
    """The GMs keep the selectors but lose the TEK (``clear crypto gdoi ks members now``
    on the KS, or ``clear crypto gdoi`` on GM1) and cannot re-register: fail-open
    sends matching traffic in the clear, fail-close drops it."""
    with Topology() as topo, DpGroup(topo, tmp_path, fail_close=(fail_close, fail_close)) as g:
        assert topo.ping("hostA", HOST_B, count=2) == 2  # ESP while the TEK is there
        _block_ks(topo)
        if trigger == "ks-removal":
            g.ks_ctl("clear", "crypto", "gdoi", "ks", "members", "now")
            cleared = (1, 2)
        else:
            res = gdoictl(g.gm_socks[1], "clear", "crypto", "gdoi")
            assert res.returncode == 0, res.stdout + res.stderr
            cleared = (1,)
        for i in cleared:
            wait_until(
                f"GM{i} without TEKs",
                lambda i=i: not g.ipsec(i)["sas"] and g.show(i)["state"] != "REGISTERED",
            )
            # The selectors stay: the protected prefix still routes into the TUN.
            assert "10.0.0.0/8 dev gdoi0" in route_table(topo, f"gm{i}")
        before = {i: g.ipsec(i) for i in (1, 2)}
        with CoreCapture(topo, tmp_path / "core.pcap"):
            replies = topo.ping("hostA", HOST_B, count=3, timeout=0.5 if fail_close else 2.0)
        after = {i: g.ipsec(i) for i in (1, 2)}
        tenant = tenant_packets(tmp_path / "core.pcap")
        if fail_close:
            assert replies == 0
            assert drops(after[1], "fail-close") - drops(before[1], "fail-close") == 3
            assert after[1]["clear_out"] == before[1]["clear_out"]
            assert total(after[1], "pkts_encaps") == total(before[1], "pkts_encaps") == 0
            assert tenant == []  # nothing left GM1, in the clear or otherwise
        else:
            assert replies == 3
            assert after[1]["clear_out"] - before[1]["clear_out"] == 3
            assert after[2]["clear_out"] - before[2]["clear_out"] == 3
            assert len(between(tenant, HOST_A, HOST_B, 1)) == 3  # ICMP in the clear
            assert len(between(tenant, HOST_B, HOST_A, 1)) == 3
            assert not [p for p in tenant if p[9] == 50]
            for i in (1, 2):
                assert drops(after[i], "fail-close") == 0
        text = gdoictl(g.gm_socks[1], "show", "crypto", "gdoi").stdout
        assert "Fail-close            : " + ("enabled" if fail_close else "disabled") in text


def test_receive_only_sends_clear_but_decrypts(tmp_path: Path) -> None:
    with Topology() as topo, DpGroup(topo, tmp_path, sa_extra="receive_only = true") as g:
        for i in (1, 2):
            assert all(sa["receive_only"] for sa in g.ipsec(i)["sas"])
        before = {i: g.ipsec(i) for i in (1, 2)}
        with CoreCapture(topo, tmp_path / "core.pcap"):
            assert topo.ping("hostA", HOST_B, count=3) == 3
        after = {i: g.ipsec(i) for i in (1, 2)}
        tenant = tenant_packets(tmp_path / "core.pcap")
        assert len(between(tenant, HOST_A, HOST_B, 1)) == 3
        assert len(between(tenant, HOST_B, HOST_A, 1)) == 3
        assert not [p for p in tenant if p[9] == 50]
        for i in (1, 2):
            assert after[i]["clear_out"] - before[i]["clear_out"] == 3
            assert total(after[i], "pkts_encaps") == 0
        # ESP that does arrive (from a sender that is not receive-only) is decrypted.
        sa = g.crafter()
        with UdpSink(topo, "hostB", HOST_B) as sink:
            assert (
                g.inject(
                    [sa.encapsulate(udp(HOST_A, HOST_B, 40000, UDP_PORT, b"esp-to-receive-only"))]
                )
                == 1
            )
            assert sink.expect("esp-to-receive-only").startswith(HOST_A)
        assert total(g.ipsec(2), "pkts_decaps") == 1


def test_tbar_window(tmp_path: Path) -> None:
    window = 1000
    with Topology() as topo, DpGroup(topo, tmp_path, sa_extra=f"tbar_window_ms = {window}") as g:
        assert topo.ping("hostA", HOST_B, count=3) == 3  # TBAR-stamped ESP passes
        assert total(g.ipsec(2), "pkts_decaps") >= 3
        rep = g.replay(2)
        assert rep["tbar_window_ms"] == window and rep["drops"]["tbar"] == 0
        sa = g.crafter(tbar_window_ms=window)
        before = g.ipsec(2)
        # The group pseudotime starts at 0 with the KS: wait until "3 windows ago" exists.
        wait_until(
            "pseudotime > 3 windows", lambda: g.replay(2)["pseudotime_ms"] > 3 * window + 200
        )
        with UdpSink(topo, "hostB", HOST_B) as sink:
            t0 = time.monotonic()
            pseudotime = g.replay(2)["pseudotime_ms"]
            assert pseudotime is not None

            def stamp(offset_ms: int) -> int:
                return pseudotime + int((time.monotonic() - t0) * 1000) + offset_ms

            old = sa.encapsulate(
                udp(HOST_A, HOST_B, 40000, UDP_PORT, b"tbar-too-old"), stamp(-3 * window)
            )
            future = sa.encapsulate(
                udp(HOST_A, HOST_B, 40000, UDP_PORT, b"tbar-too-new"), stamp(3 * window)
            )
            fresh = sa.encapsulate(udp(HOST_A, HOST_B, 40000, UDP_PORT, b"tbar-fresh"), stamp(0))
            assert g.inject([old, future, fresh]) == 3
            sink.expect("tbar-fresh")
            assert not [x for x in sink.seen if "too" in x]
        wait_until("GM2 TBAR drops", lambda: g.replay(2)["drops"]["tbar"] == 2)
        after = g.ipsec(2)
        assert drops(after, "tbar") - drops(before, "tbar") == 2
        assert after["forwarder"]["tun_written"] - before["forwarder"]["tun_written"] == 1
        assert topo.ping("hostA", HOST_B, count=2) == 2
        assert g.replay(2)["drops"]["tbar"] == 2
