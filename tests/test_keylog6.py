"""Issue 11 §3: the ESP key log names the TEK's family.

Wireshark's ESP SA table matches a row only against ESP of the row's protocol: an
"IPv4" row decrypts no ESP over IPv6.  ``esp_sa_line`` writes "IPv6" for a TEK
with IPv6 selectors; tshark then decrypts ESPv6 our data path built.
"""

from __future__ import annotations

import shutil
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from gdoid.keylog import ESP_TABLE, KeyLog, esp_sa_line
from gdoid.protocol.policy import TrafficSelector
from tests.dpnet import tshark_fields
from tests.esp6data import T0, make_tek, pair, udp6

NET4 = IPv4Network("10.0.0.0/8")


def test_esp_sa_line_names_the_family() -> None:
    assert esp_sa_line(make_tek()).startswith('"IPv6","*","*","0x66000001",')
    tek4 = make_tek(selector=TrafficSelector(NET4, NET4))
    assert esp_sa_line(tek4).startswith('"IPv4","*","*","0x66000001",')


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
@pytest.mark.parametrize("name", ["esp-gcm-256", "esp-cbc-128-sha256"])
def test_tshark_decrypts_our_esp6_with_the_key_log(tmp_path: Path, name: str) -> None:
    tek = make_tek(name)
    keylog = tmp_path / "keylog"
    log = KeyLog(keylog)
    log.esp(tek)
    log.close()
    assert (keylog / ESP_TABLE).read_text().startswith('"IPv6"')
    a, _ = pair(tek)
    outer = [a.outbound(udp6(size=200), T0).to_network[0] for _ in range(3)]
    pcap = tmp_path / "esp6.pcap"
    wrpcap(str(pcap), [Ether(type=0x86DD) / IPv6(o) for o in outer])
    rows = tshark_fields(pcap, keylog, "esp", "frame.protocols", "esp.icv_good", "udp.dstport")
    assert len(rows) == 3
    assert all(r[0] == "eth:ethertype:ipv6:esp:ipv6:udp:data" for r in rows), rows
    assert all(r[1] in ("1", "True") and r[2] == "2000" for r in rows), rows
