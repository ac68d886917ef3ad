"""KS group state: rekey schedule (incl. TBAR's 2-hour rule), staged policy, SID slices."""

from __future__ import annotations

from pathlib import Path

import pytest

from gdoid.config.loader import parse_ks_config
from gdoid.keyserver.group import TBAR_REKEY_INTERVAL, Group, SenderIdAllocator
from gdoid.protocol.pki import load_private_key
from tests.procs import auth_toml, ks_toml, write_private, write_signing_key

NOW = 1_800_000_000.0


def _config(tmp_path: Path, extra_sa: str = "", lifetime: int = 28800):
    write_private(tmp_path / "psk.secret", "x\n")
    write_signing_key(tmp_path / "rekey.key")
    text = ks_toml(tmp_path, auth=auth_toml("psk.secret"), lifetime=lifetime).read_text()
    text = text.replace("[group.sa_ipsec.match]", extra_sa + "[group.sa_ipsec.match]")
    return parse_ks_config(text, tmp_path)


def _group(tmp_path: Path, extra_sa: str = "", lifetime: int = 28800) -> Group:
    cfg = _config(tmp_path, extra_sa, lifetime)
    g = cfg.groups[0]
    return Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, NOW)


def test_scheduled_rekey_lead_time_before_tek_expiry(tmp_path: Path) -> None:
    g = _group(tmp_path, lifetime=3600)
    assert g.next_rekey_at() == pytest.approx(NOW + 3600 - g.config.rekey.lead_time)


def test_tbar_rekeys_every_two_hours_whatever_the_lifetime(tmp_path: Path) -> None:
    # getvpn-features §4: lifetime 28800 s with TBAR still rekeys every 7200 s.
    g = _group(tmp_path, "tbar_window_ms = 100000\n", lifetime=28800)
    assert TBAR_REKEY_INTERVAL == 7200
    assert g.next_rekey_at() == pytest.approx(NOW + 7200)
    msgs = g.plan_rekey(NOW + 7200)
    assert msgs.seq == 2 and g.next_rekey_at() == pytest.approx(NOW + 7200 + 7200)
    assert g.snapshot(NOW + 7200).pseudotime_ms == 7200 * 1000


def test_no_tbar_no_two_hour_rule(tmp_path: Path) -> None:
    g = _group(tmp_path, lifetime=28800)
    assert g.next_rekey_at() == pytest.approx(NOW + 28800 - g.config.rekey.lead_time)


def test_staged_policy_applies_only_at_the_next_rekey(tmp_path: Path) -> None:
    g = _group(tmp_path, lifetime=3600)
    old_spis = [t.spi for t in g.teks]
    (tmp_path / "b").mkdir()
    changed = _config(tmp_path / "b", lifetime=1800)
    assert g.stage_config(changed.groups[0], None)
    assert [t.spi for t in g.teks] == old_spis and g.config.sa_ipsec[0].lifetime == 3600
    assert not g.stage_config(g.config, None)  # back to the running policy: nothing pending
    g.stage_config(changed.groups[0], None)
    g.plan_rekey(NOW + 1, replace=True)
    assert g.config.sa_ipsec[0].lifetime == 1800
    assert [t.spi for t in g.teks] != old_spis and len(g.teks) == 1  # replace drops the old TEKs


def test_sid_slices_never_overlap() -> None:
    got: list[set[int]] = []
    for index in range(3):
        alloc = SenderIdAllocator(8)
        alloc.set_slice(index, 3)
        got.append({sid for i in range(90) for sid in (alloc.allocate(f"gm{i}", 1) or ())})
    assert all(got) and not (got[0] & got[1] or got[1] & got[2] or got[0] & got[2])
    assert 0 not in got[0]
