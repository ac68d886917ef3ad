"""Issue 9 §1 end to end: a GM killed and restarted under the same TEK never reuses a GCM IV.

hostA -- GM1 -- core(+KS) -- GM2 -- hostB in namespaces (:mod:`gdoid.netlab`),
real KS/GM daemons with the data path, UDP running both ways the whole time,
tshark on the core bridge.  GM1 is SIGKILLed and started again while the TEK
stays the same: its new registration must bring new sender IDs, so no
(SPI, explicit IV) pair is ever seen twice under the group key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gdoid.netlab import HOST_A, HOST_B, Topology
from tests.dpnet import (
    CoreCapture,
    DpGroup,
    NsDaemon,
    addr,
    ip_packets,
    read_pcap,
    total,
    wait_until,
)
from tests.netns import require_netns
from tests.procs import gdoictl_json

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("netns_required")]

BLASTER = r"""
import socket, sys, time
dst = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
i = 0
while True:
    try:
        s.sendto(b"sid-test %08d" % i, (dst, 5009))
    except OSError:
        pass  # GM1's TUN is gone while it is down: keep going
    i += 1
    time.sleep(0.002)
"""


def esp_from(packets: list[bytes], prefix: str) -> list[tuple[bytes, bytes]]:
    """(SPI, explicit IV) of the ESP packets whose (address-preserving) source is in ``prefix``."""
    out = []
    for p in packets:
        if p[9] == 50 and addr(p, 12).startswith(prefix):
            hl = (p[0] & 15) * 4
            out.append((p[hl : hl + 4], p[hl + 8 : hl + 16]))
    return out


def test_gm_restarted_under_the_same_tek_never_repeats_an_iv(tmp_path: Path) -> None:
    require_netns()
    with Topology() as topo, DpGroup(topo, tmp_path) as g:
        old_sids = set(g.show(1)["sender_ids"])
        tek_before = {sa["spi"] for sa in g.ipsec(1)["sas"]}
        pcap = tmp_path / "core.pcap"
        blasters = [
            topo.popen(
                ns,
                sys.executable,
                "-c",
                BLASTER,
                dst,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for ns, dst in (("hostA", HOST_B), ("hostB", HOST_A))
        ]
        try:
            with CoreCapture(topo, pcap):
                # Traffic flows both ways under GM1's first registration.
                g.wait_counter(1, "encaps", lambda s: total(s, "pkts_encaps"), 1000, timeout=20)
                g.wait_counter(2, "encaps", lambda s: total(s, "pkts_encaps"), 1000, timeout=20)
                gm1 = g.daemons[1]
                assert isinstance(gm1, NsDaemon) and gm1.role == "gm@gm1"
                gm1.proc.kill()  # SIGKILL: no goodbye, the KS keeps its row
                gm1.proc.wait(10)
                restarted = NsDaemon(
                    topo, "gm1", "gm", g.dir / "gm1.toml", "--keylog", str(g.keylog)
                )
                g.daemons.append(restarted)
                g.wait_registered(1)
                new_sids = set(g.show(1)["sender_ids"])
                # Same TEK: the KS did not rekey in between.
                assert {sa["spi"] for sa in g.ipsec(1)["sas"]} == tek_before
                # Traffic both ways again, from the restarted GM1 too.
                g.wait_counter(
                    1,
                    "encaps after the restart",
                    lambda s: total(s, "pkts_encaps"),
                    1000,
                    timeout=20,
                )
                wait_until("GM2 decrypts GM1 again", lambda: total(g.ipsec(2), "pkts_decaps") > 0)
        finally:
            for b in blasters:
                b.kill()
                b.wait(10)
        shown = gdoictl_json(g.ks_sock, "show", "crypto", "gdoi", "ks", "members")
        ks_members = {m["address"]: m for m in shown["groups"][0]["members"]}
    packets = ip_packets(read_pcap(pcap))
    gm1_esp = esp_from(packets, "10.1.")
    gm2_esp = esp_from(packets, "10.2.")
    assert len(gm1_esp) >= 1500 and len(gm2_esp) >= 1500
    every = gm1_esp + gm2_esp
    assert len({spi for spi, _ in every}) == 1  # one TEK throughout
    repeated = len(every) - len(set(every))
    assert repeated == 0, f"{repeated} (SPI, IV) pairs repeated under the group key"
    assert old_sids and new_sids and not old_sids & new_sids, (old_sids, new_sids)
    assert set(ks_members["192.0.2.1"]["sender_ids"]) == new_sids
    # GM1's IVs: the old SIDs, then (after the restart) only the new ones, never the old again.
    prefixes = [iv[0] for _, iv in gm1_esp]
    first_new = next(i for i, p in enumerate(prefixes) if p in new_sids)
    assert set(prefixes[:first_new]) <= old_sids
    assert set(prefixes[first_new:]) <= new_sids
