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

import secrets
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from typing import Any

import pytest
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Raw, raw

from gdoid.dataplane.esp import EspSa
from gdoid.netlab import (
    HOST_A,
    HOST_B,
)
from gdoid.protocol.policy import SenderIds, Tek, TekPolicy, TekTransform, TrafficSelector
from tests.dp6net import (
    A6,
    B6,
    GM1_WAN6,
    INJECT6,
    KS6,
    MARKER,
    SIZE,
    SPI4,
    SPI6,
    TENANT6,
    TRANSFORM,
    WAN_MTU,
    Capture,
    Forwarder,
    Run,
    Topology6,
    _tcp,
    esp_sa_line,
    ipv6_packets,
    tenant6,
)
from tests.dpnet import read_pcap, tshark_fields, wait_until
from tests.netns import require_netns

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("netns_required")]


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
