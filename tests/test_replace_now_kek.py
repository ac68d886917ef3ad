"""`crypto gdoi ks rekey replace-now` replaces the KEK with the TEKs (GET VPN spec §3)."""

from __future__ import annotations

from pathlib import Path

from tests.enginenet import GM, GROUP, KS, T0, Net, make_gm, make_ks


def test_replace_now_replaces_kek_and_gms_accept_the_next_rekey(files: Path) -> None:
    ks = make_ks(files)
    gms = {a: make_gm(files, address=a) for a in (GM, "127.0.0.3")}
    net = Net(ks, gms)
    for a, gm in gms.items():
        net.run(gm.start(T0), a, T0)
    group = ks.groups[GROUP]
    old_kek = group.kek.spi
    assert all(gm.sadb.groups[GROUP].kek.spi == old_kek for gm in gms.values())  # type: ignore[union-attr]
    old_teks = {a: set(gm.sadb.groups[GROUP].teks) for a, gm in gms.items()}

    now = T0 + 100
    net.run(ks.rekey(group, now, replace=True, replace_now=True), KS, now)
    new_kek = group.kek.spi
    assert new_kek != old_kek
    for a, gm in gms.items():
        g = gm.sadb.groups[GROUP]
        assert g.kek is not None and g.kek.spi == new_kek
        assert not set(g.teks) & old_teks[a]  # old TEKs gone at once

    # The next scheduled rekey is sent under the new KEK and every GM installs it.
    later = T0 + 200
    before = {a: set(gm.sadb.groups[GROUP].teks) for a, gm in gms.items()}
    net.run(ks.rekey(group, later), KS, later)
    for a, gm in gms.items():
        g = gm.sadb.groups[GROUP]
        assert set(g.teks) - before[a], "the GM did not install the rekey under the new KEK"
        assert gm.counters["rekeys_rejected"] == 0
