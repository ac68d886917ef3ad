"""Issue 11 §3: an IPv6 SA TEK in GROUPKEY-PULL message 2 as Wireshark reads it.

A KS whose policy is ``fd00:1::/48 -> fd00:2::/48`` registers a GM on loopback with
both daemons' ``--keylog``; tshark decrypts the exchange and shows the SAT's source
and destination identities as ID_IPV6_ADDR_SUBNET (type 6, 32 octets: address then
mask, RFC 2407 §4.6.2) with nothing malformed and no expert warning.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from ipaddress import IPv6Network
from pathlib import Path

import pytest

from tests.procs import Capture, Daemon, auth_toml, gdoictl_json, gm_toml, ks_toml

pytestmark = pytest.mark.root

REGISTERED = r"%GDOI-5-GM_REGS_COMPL: Registration to KS 127\.0\.0\.1 complete for group GET"
SRC6, DST6 = IPv6Network("fd00:1::/48"), IPv6Network("fd00:2::/48")


def _id_data(net: IPv6Network) -> str:
    return (net.network_address.packed + net.netmask.packed).hex()


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_tshark_reads_the_ipv6_sat_identities(lab: Path) -> None:
    pcap = lab / "capture.pcap"
    keylog = lab / "keylog"
    auth = auth_toml("psk.secret")
    ks_cfg = ks_toml(lab, auth=auth)
    text = ks_cfg.read_text()
    assert text.count('"10.0.0.0/8"') == 2  # the one SA's match, rewritten to IPv6
    ks_cfg.write_text(
        text.replace('src = "10.0.0.0/8"', f'src = "{SRC6}"').replace(
            'dst = "10.0.0.0/8"', f'dst = "{DST6}"'
        )
    )
    with Capture(pcap), Daemon("ks", ks_cfg, "--keylog", str(keylog)) as ks:
        ks.wait_for("ks_started")
        gm_cfg = gm_toml(lab, address="127.0.0.2", name="gm1", auth=auth)
        with Daemon("gm", gm_cfg, "--keylog", str(keylog)) as gm:
            gm.wait_for(REGISTERED)
            show = gdoictl_json(lab / "gm1.sock", "show", "crypto", "gdoi")["groups"][0]
    env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(keylog)}
    base = ["tshark", "-r", str(pcap), "-d", "udp.port==848,isakmp"]
    fields = ("isakmp.exchangetype", "isakmp.sat.spi", "isakmp.sat.src_id_type",
              "isakmp.sat.src_id_length", "isakmp.sat.src_id_data", "isakmp.sat.dst_id_type",
              "isakmp.sat.dst_id_length", "isakmp.sat.dst_id_data")  # fmt: skip
    out = subprocess.run(
        [*base, "-Y", "isakmp.sat.spi", "-T", "fields", "-E", "separator=|"]
        + [a for f in fields for a in ("-e", f)],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.splitlines()  # fmt: skip
    rows = [line.split("|") for line in out]
    assert len(rows) == 1  # message 2 of GROUPKEY-PULL, decrypted
    exch, spi, stype, slen, sdata, dtype, dlen, ddata = rows[0]
    assert exch == "32" and spi == show["tek_spis"][0]
    assert (stype, slen, sdata.replace(":", "")) == ("6", "32", _id_data(SRC6))
    assert (dtype, dlen, ddata.replace(":", "")) == ("6", "32", _id_data(DST6))
    expert = subprocess.run(
        [*base, "-Y", "udp.port==848 && (_ws.malformed || _ws.expert.severity >= 6291456)"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert expert.stdout.strip() == ""
