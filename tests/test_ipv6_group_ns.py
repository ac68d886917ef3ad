"""An IPv6 group policy end to end with real daemons (issue 11 §3, control plane to data path).

The dual-stack namespace topology of :mod:`tests.dp6net` (ULA LANs
fd00:1::/64 and fd00:2::/64 behind gm1 and gm2) with a real KS and two GM daemons
(``[dataplane]`` on) instead of static SAs.  The KS and GMs talk over IPv4 on the core
(IPv6 UDP 848 is issue 11 §2); the group's policy is ``fd00::/16 -> fd00::/16``, so the
SA TEK carries ID_IPV6_ADDR_SUBNET identities and the GMs route and encrypt IPv6.
Pings and a TCP transfer cross the core only as ESPv6, and tshark decrypts the capture
with the daemons' own key log (``esp.icv_good``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dp6net import (
    A6,
    B6,
    GM1_WAN6,
    KS6,
    MARKER,
    SIZE,
    TENANT6,
    Capture,
    Topology6,
    _tcp,
    ipv6_packets,
    tenant6,
)
from tests.dpnet import DpGroup, tshark_fields
from tests.netns import require_netns

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("netns_required")]


@dataclass
class Run:
    pcap: Path
    keylog: Path
    routes: tuple[str, str]  # each GM's IPv6 routes in the protected-prefix table
    pings6: tuple[int, int]
    client: list[str]
    server: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require_netns()
    d = tmp_path_factory.mktemp("ipv6group")
    pcap = d / "core.pcap"
    with Topology6(dual=True) as topo:
        # DpGroup adds the KS namespace's routes to the IPv4 LANs itself.
        topo.ip("ks", "route", "del", "10.1.0.0/16")
        topo.ip("ks", "route", "del", "10.2.0.0/16")
        group = DpGroup(topo, d, sa_extra=f'src = "{TENANT6}"\ndst = "{TENANT6}"')
        with group:
            routes = tuple(
                topo.run(gm, "ip", "-6", "route", "show", "table", "26468").stdout
                for gm in ("gm1", "gm2")
            )
            with Capture(topo, pcap, KS6, GM1_WAN6):
                pings6 = (topo.ping6("hostA", B6, 5), topo.ping6("hostB", A6, 3))
                client, server = _tcp(topo, "hostA", B6)
            yield Run(pcap, group.keylog, (routes[0], routes[1]), pings6, client, server)


def test_gms_install_the_ipv6_policy(run: Run) -> None:
    # The TEK's IPv6 selector became the GMs' route into the TUN device.
    for routes in run.routes:
        assert f"{TENANT6} dev gdoi0" in routes, routes
    rows = (run.keylog / "esp_sa").read_text().splitlines()
    assert rows and all(r.startswith('"IPv6",') for r in rows)


def test_ping6_and_tcp_cross_the_core_only_as_esp6(run: Run) -> None:
    assert run.pings6 == (5, 3)
    n, digest, server_digest = run.client
    assert int(n) == SIZE and digest == server_digest
    assert run.server[:3] == [str(SIZE), digest, A6]
    tenant = tenant6(ipv6_packets(run.pcap))
    assert len(tenant) >= SIZE // 1400
    assert [p[:40].hex() for p in tenant if p[6] != 50] == []
    assert MARKER not in run.pcap.read_bytes()


def test_tshark_decrypts_the_esp6_with_the_daemons_key_log(run: Run) -> None:
    tenant = f"ipv6.addr == {TENANT6}"
    assert tshark_fields(run.pcap, None, f"{tenant} and (icmpv6 or tcp)", "frame.number") == []
    rows = tshark_fields(
        run.pcap, run.keylog, f"esp and {tenant}", "frame.protocols", "esp.icv_good"
    )
    assert len(rows) >= SIZE // 1400
    assert all(r[1] in ("1", "True") for r in rows), {r[1] for r in rows}
    assert all(r[0].startswith("eth:ethertype:ipv6:esp:ipv6:") for r in rows)
    assert sum(":icmpv6" in r[0] for r in rows) >= 16  # 5 + 3 echo requests and replies
    shown = tshark_fields(
        run.pcap, run.keylog, f'tcp.payload contains "{MARKER.decode()}"', "frame.number"
    )
    assert len(shown) >= SIZE // 1400
