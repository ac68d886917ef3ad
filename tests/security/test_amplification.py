"""Issue 9 §4: no amplification.  A peer that has not completed phase 1 never gets
back more bytes than it sent, measured on the wire against a real ``gdoid ks``.

One UDP socket on loopback sends each unauthenticated input (bare headers, message 1
variants, message 3/5 variants inside a live exchange, garbage) and collects every
reply; a ``show gdoid counters`` round trip after each datagram tells when the KS
has handled it (its replies are sent before it serves the next request).
"""

from __future__ import annotations

from pathlib import Path

from gdoid.config.loader import load_gm_config
from gdoid.phase1 import phase1_config
from tests.ikecraft import (
    Prober,
    run_probes,
)
from tests.procs import (
    Daemon,
    auth_toml,
    free_udp_port,
    gdoictl_json,
    gm_toml,
    ks_toml,
)

KS_ADDRESS = "127.0.1.1"
KS_PORT = free_udp_port(KS_ADDRESS)  # no root needed, no clash with other daemons
PROBER = "127.0.1.5"
HEADER_LEN = 28


def test_no_reply_to_an_unauthenticated_peer_is_larger_than_its_datagram(lab: Path) -> None:
    auth = auth_toml("psk.secret")
    ks_cfg = ks_toml(lab, address=KS_ADDRESS, port=KS_PORT, auth=auth)
    gm = load_gm_config(
        gm_toml(
            lab,
            address=PROBER,
            name="prober",
            auth=auth,
            servers=(KS_ADDRESS,),
            server_port=KS_PORT,
        )
    )
    p1 = phase1_config(gm.ike, gm.auth, gm.address, gm.software_version)
    with Daemon("ks", ks_cfg) as ks:
        ks.wait_for("ks_started")
        prober = Prober(
            PROBER,
            (KS_ADDRESS, KS_PORT),
            lambda: gdoictl_json(lab / "ks.sock", "show", "gdoid", "counters").get("received", 0),
        )
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
