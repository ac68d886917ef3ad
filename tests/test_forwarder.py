"""The GM data path's I/O side: TUN + policy routing + raw sockets, in namespaces.

A Forwarder (``python -m gdoid.dataplane``) runs in gm1 and in gm2 with a
stand-in dataplane (:class:`StubDataplane`: "ESP" = an IP protocol 50 header
with the inner addresses, a fake SPI and the XOR-ed inner packet), and
hostA <-> hostB traffic must cross the core only as protocol 50.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from tests.netns import (
    CORE_BRIDGE,
    GM1_LAN,
    GM2_LAN,
    HOST_A,
    HOST_B,
    KS,
    Topology,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("netns_required")]

REPO = Path(__file__).resolve().parent.parent
TUN = "gdoi0"
MARK = 0x6764
TABLE = 26468
LOCAL_TABLE = 26469


# --- processes ---------------------------------------------------------------


class ForwarderProc:
    """``python -m gdoid.dataplane`` inside a namespace, its JSON lines collected."""

    def __init__(self, topo: Topology, ns: str, *args: str) -> None:
        self.ns = ns
        self.proc = topo.popen(
            ns,
            sys.executable,
            "-m",
            "gdoid.dataplane",
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.stderr.append(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if msg.get("event") == event:
                return msg
        raise AssertionError(
            f"forwarder in {self.ns} never said {event!r} (exit {self.proc.poll()}):\n"
            + "".join(self.stderr[-40:])
        )

    def stats(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGUSR1)
        return self.expect("stats")

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        final = self.expect("stats")
        assert self.proc.wait(20) == 0, "".join(self.stderr[-40:])
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def forwarder_args(prefixes: list[str], wan: str | None = "wan", **options: str) -> list[str]:
    args = ["--dataplane", "tests.stubdataplane:make_stub", "--tun", TUN]
    if wan:
        args += ["--wan", wan]
    for p in prefixes:
        args += ["--prefix", p]
    for k, v in options.items():
        args += ["--option", f"{k}={v}"]
    return args


class CoreCapture:
    """tshark on the core bridge; started for sure once it has seen a probe from the KS."""

    def __init__(self, topo: Topology, pcap: Path) -> None:
        self.topo = topo
        self.pcap = pcap
        self.proc = topo.popen(
            "core",
            "tshark", "-n", "-l", "-P", "-i", CORE_BRIDGE, "-w", str(pcap),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        self.seen: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.seen.append(line)
                self._cond.notify_all()

    def _probe(self, tag: str) -> None:
        """UDP datagrams KS -> gm1:9 until tshark shows one (they stay on the core)."""
        deadline = time.monotonic() + 30
        payload = f"probe-{tag}"
        while time.monotonic() < deadline:
            self.topo.run("ks", "bash", "-c", f"echo {payload} > /dev/udp/192.0.2.1/9", check=False)
            with self._cond:
                if self._cond.wait_for(
                    lambda: any(KS in x and "UDP" in x for x in self.seen[self._mark :]), 0.3
                ):
                    return
        raise AssertionError("tshark never saw the probe")

    def __enter__(self) -> CoreCapture:
        self._mark = 0
        self._probe("start")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with self._cond:
                self._mark = len(self.seen)
            self._probe("end")
        finally:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(20)

    def packets(self) -> list[tuple[int, str, str]]:
        """(IP protocol, src, dst) of every IPv4 packet captured."""
        res = subprocess.run(
            [
                "tshark",
                "-n",
                "-r",
                str(self.pcap),
                "-Y",
                "ip",
                "-T",
                "fields",
                "-e",
                "ip.proto",
                "-e",
                "ip.src",
                "-e",
                "ip.dst",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = []
        for line in res.stdout.splitlines():
            proto, src, dst = line.split("\t")[:3]
            out.append((int(proto.split(",")[0]), src.split(",")[0], dst.split(",")[0]))
        return out


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology() as t:
        yield t


@pytest.fixture
def gms(topo: Topology) -> Iterator[tuple[ForwarderProc, ForwarderProc]]:
    gm1 = ForwarderProc(topo, "gm1", *forwarder_args(["10.2.0.0/16"]))
    gm2 = ForwarderProc(topo, "gm2", *forwarder_args(["10.1.0.0/16"]))
    try:
        gm1.expect("ready")
        gm2.expect("ready")
        yield gm1, gm2
    finally:
        gm1.kill()
        gm2.kill()


def _state(topo: Topology, ns: str) -> dict[str, str]:
    return {
        "link": topo.run(ns, "ip", "-o", "link", "show").stdout,
        "rules": topo.run(ns, "ip", "rule", "show").stdout,
        "table": topo.run(ns, "ip", "route", "show", "table", str(TABLE), check=False).stdout,
        "local_table": topo.run(
            ns, "ip", "route", "show", "table", str(LOCAL_TABLE), check=False
        ).stdout,
    }


def _route_dev(topo: Topology, ns: str, dst: str, *extra: str) -> str:
    words = topo.run(ns, "ip", "-o", "route", "get", dst, *extra).stdout.split()
    return words[words.index("dev") + 1]


# --- tests -------------------------------------------------------------------


def test_ping_crosses_the_core_only_as_esp(
    topo: Topology, gms: tuple[ForwarderProc, ForwarderProc], tmp_path: Path
) -> None:
    gm1, gm2 = gms
    with CoreCapture(topo, tmp_path / "core.pcap") as cap:
        assert topo.ping("hostA", HOST_B, count=5) == 5
        assert topo.ping("hostB", HOST_A, count=2) == 2
    packets = cap.packets()
    inner = ipaddress.IPv4Network("10.0.0.0/8")
    tenant = [p for p in packets if IPv4Address(p[1]) in inner or IPv4Address(p[2]) in inner]
    assert [p for p in tenant if p[0] != 50] == [], "clear tenant traffic on the core"
    assert not [
        p
        for p in packets
        if p[0] == 1 and (IPv4Address(p[1]) in inner or IPv4Address(p[2]) in inner)
    ]
    # Address preservation: the ESP carries the hosts' addresses, both ways.
    assert sum(1 for p in tenant if (p[1], p[2]) == (HOST_A, HOST_B)) >= 7
    assert sum(1 for p in tenant if (p[1], p[2]) == (HOST_B, HOST_A)) >= 7

    s1, s2 = gm1.stats(), gm2.stats()
    assert s1["tun_read"] >= 7 and s1["net_sent"] >= 7
    assert s1["net_read"] >= 7 and s1["tun_written"] >= 7
    assert s2["tun_read"] >= 7 and s2["net_read"] >= 7
    for s in (s1, s2):
        assert s["send_errors"] == 0 and s["dataplane_errors"] == 0 and s["tun_write_errors"] == 0


@pytest.mark.parametrize("spec", ["gcm", "null"])
def test_real_engine_through_the_tunnel(topo: Topology, tmp_path: Path, spec: str) -> None:
    """The real engine (one made-up AES-GCM-256 TEK, 10.0.0.0/8 both ways) in both GMs."""
    pytest.importorskip("gdoid.dataplane.engine")
    key = os.urandom(36).hex()
    common = ["--dataplane", spec, "--tun", TUN, "--wan", "wan", "--option", f"key={key}"]
    gm1 = ForwarderProc(topo, "gm1", *common, "--option", "sid=1")
    gm2 = ForwarderProc(topo, "gm2", *common, "--option", "sid=2")
    try:
        assert gm1.expect("ready")["prefixes"] == ["10.0.0.0/8"]
        gm2.expect("ready")
        table = topo.run("gm1", "ip", "route", "show", "table", str(TABLE)).stdout
        assert f"10.0.0.0/8 dev {TUN}" in table and "throw 10.1.0.0/24" in table
        with CoreCapture(topo, tmp_path / "core.pcap") as cap:
            assert topo.ping("hostA", HOST_B, count=3, size=1300) == 3
        tenant = [p for p in cap.packets() if p[1].startswith("10.") or p[2].startswith("10.")]
        assert tenant and all(p[0] == 50 for p in tenant), tenant
        # The own LAN stays out of the tunnel even though 10.0.0.0/8 is protected.
        assert topo.ping("gm1", HOST_A, count=1) == 1
        s1, s2 = gm1.stop(), gm2.stop()
        assert s1["net_sent"] == 3 and s1["tun_written"] == 3, s1
        assert s2["net_read"] == 3 and s2["tun_written"] == 3, s2
        assert s1["drops"] == {} and s2["drops"] == {}
    finally:
        gm1.kill()
        gm2.kill()


def test_routes_while_running_and_everything_gone_after_close(
    topo: Topology, gms: tuple[ForwarderProc, ForwarderProc]
) -> None:
    gm1, gm2 = gms
    before = _state(topo, "gm1")
    assert f": {TUN}:" in before["link"]
    rules = before["rules"]
    assert f"99:\tfrom all iif wan ipproto esp lookup {LOCAL_TABLE}" in rules
    assert "100:\tfrom all fwmark 0x6764 lookup main" in rules
    assert f"101:\tfrom all lookup {TABLE}" in rules
    assert f"10.2.0.0/16 dev {TUN}" in before["table"]
    assert "throw 10.1.0.0/24" in before["table"] and "throw 192.0.2.0/24" in before["table"]
    assert "local default dev lo" in before["local_table"]
    assert _route_dev(topo, "gm1", HOST_B) == TUN
    assert _route_dev(topo, "gm1", HOST_B, "mark", str(MARK)) == "wan"
    assert topo.run("gm1", "cat", "/proc/sys/net/ipv4/conf/all/rp_filter").stdout.strip() == "0"

    gm1.stop()
    gm2.stop()
    for ns in ("gm1", "gm2"):
        after = _state(topo, ns)
        assert TUN not in after["link"], after["link"]
        assert str(TABLE) not in after["rules"] and str(LOCAL_TABLE) not in after["rules"], after[
            "rules"
        ]
        assert "fwmark" not in after["rules"], after["rules"]
        assert after["table"].strip() == "" and after["local_table"].strip() == ""
    # Back to plain routing: hostA reaches hostB in the clear through the main tables.
    assert _route_dev(topo, "gm1", HOST_B) == "wan"
    assert topo.ping("hostA", HOST_B, count=1) == 1


def test_own_lan_is_not_hijacked(topo: Topology) -> None:
    # The policy covers the GM's own LAN (10.1.0.0/24 inside 10.0.0.0/8).
    gm1 = ForwarderProc(topo, "gm1", *forwarder_args(["10.0.0.0/8"]))
    try:
        gm1.expect("ready")
        table = topo.run("gm1", "ip", "route", "show", "table", str(TABLE)).stdout
        assert f"10.0.0.0/8 dev {TUN}" in table and "throw 10.1.0.0/24" in table
        assert _route_dev(topo, "gm1", HOST_A) == "lan"
        assert _route_dev(topo, "gm1", "10.3.0.1") == TUN
        assert _route_dev(topo, "gm1", KS) == "wan"
        # Traffic to and through the GM's own LAN, and to the KS, never enters the TUN.
        assert topo.ping("gm1", HOST_A, count=2) == 2
        assert topo.ping("hostA", GM1_LAN, count=2) == 2
        assert topo.ping("gm1", KS, count=2) == 2
        assert gm1.stats()["tun_read"] == 0
        # While a remote protected address does.
        assert topo.ping("gm1", "10.3.0.1", count=1, timeout=0.5) == 0
        assert gm1.stats()["tun_read"] >= 1
        gm1.stop()
    finally:
        gm1.kill()


def test_dataplane_bugs_and_send_errors_do_not_stop_the_loop(topo: Topology) -> None:
    gm1 = ForwarderProc(topo, "gm1", *forwarder_args(["10.2.0.0/16"], fail_every="2", garbage="1"))
    gm2 = ForwarderProc(topo, "gm2", *forwarder_args(["10.1.0.0/16"]))
    try:
        gm1.expect("ready")
        gm2.expect("ready")
        # Every second outbound call raises: half the echo requests are lost, the rest get through.
        assert topo.ping("hostA", HOST_B, count=6, timeout=1.0) == 3
        stats = gm1.stop()
        assert stats["tun_read"] == 6
        assert stats["dataplane_errors"] == 3
        assert stats["send_errors"] == 3 and stats["net_sent"] == 3
        assert stats["drops"] == {}
        gm2.stop()
    finally:
        gm1.kill()
        gm2.kill()


def test_update_routes_follows_the_policy(topo: Topology) -> None:
    """RouteSetup.update replaces the TUN routes (run in the namespace via a one-off script)."""
    script = f"""
import json
from gdoid.dataplane.tun import TunDevice
from gdoid.dataplane.routing import RouteSetup
import subprocess
tun = TunDevice.open("{TUN}", 1400)
rs = RouteSetup("{TUN}", ["10.2.0.0/16"], wan_interface="wan")
rs.apply()
rs.apply()  # idempotent
first = subprocess.run(["ip", "route", "show", "table", "{TABLE}"], capture_output=True, text=True).stdout
rules1 = subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
rs.update(["10.3.0.0/16", "10.4.0.0/16"])
second = subprocess.run(["ip", "route", "show", "table", "{TABLE}"], capture_output=True, text=True).stdout
rs.remove()
rs.remove()
third = subprocess.run(["ip", "route", "show", "table", "{TABLE}"], capture_output=True, text=True).stdout
rules2 = subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
tun.close()
print(json.dumps(dict(first=first, second=second, third=third, rules1=rules1, rules2=rules2)))
"""
    out = json.loads(
        topo.run("gm1", sys.executable, "-c", script, cwd=REPO).stdout.splitlines()[-1]
    )
    assert "10.2.0.0/16 dev gdoi0" in out["first"]
    assert out["rules1"].count(f"lookup {TABLE}") == 1
    assert "10.2.0.0/16" not in out["second"]
    assert "10.3.0.0/16 dev gdoi0" in out["second"] and "10.4.0.0/16 dev gdoi0" in out["second"]
    assert "throw 10.1.0.0/24" in out["second"]
    assert out["third"].strip() == ""
    assert str(TABLE) not in out["rules2"] and str(LOCAL_TABLE) not in out["rules2"]


def test_forwarder_update_routes_in_process(topo: Topology) -> None:
    """Forwarder.update_routes() re-reads the dataplane's prefixes (asyncio, in gm1)."""
    script = f"""
import asyncio, json, subprocess
from ipaddress import IPv4Network
from gdoid.dataplane.forwarder import Forwarder
from tests.stubdataplane import StubDataplane

def table():
    return subprocess.run(["ip", "route", "show", "table", "{TABLE}"], capture_output=True, text=True).stdout

async def main():
    dp = StubDataplane([IPv4Network("10.2.0.0/16")])
    fwd = Forwarder(dp, tun_name="{TUN}", wan_interface="wan")
    await fwd.start()
    first = table()
    dp.prefixes = [IPv4Network("10.5.0.0/16")]
    ok = await fwd.update_routes()
    second = table()
    await fwd.close()
    await fwd.close()
    print(json.dumps(dict(first=first, second=second, ok=ok, third=table(), running=fwd.running)))

asyncio.run(main())
"""
    out = json.loads(
        topo.run("gm1", sys.executable, "-c", script, cwd=REPO).stdout.splitlines()[-1]
    )
    assert "10.2.0.0/16 dev gdoi0" in out["first"]
    assert out["ok"] is True
    assert "10.5.0.0/16 dev gdoi0" in out["second"] and "10.2.0.0/16" not in out["second"]
    assert out["third"].strip() == "" and out["running"] is False


def test_lan_ping_unaffected_without_forwarder(topo: Topology) -> None:
    """Sanity of the harness itself: the hosts reach their GM and, in the clear, each other."""
    assert topo.ping("hostA", GM1_LAN, count=1) == 1
    assert topo.ping("hostB", GM2_LAN, count=1) == 1
    assert topo.ping("hostA", HOST_B, count=1) == 1
