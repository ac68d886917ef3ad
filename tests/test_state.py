"""KS state survives restarts: atomic file, corrupt files moved aside, SEQ never backwards."""

from __future__ import annotations

import json
import os
import signal
import stat
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from gdoid.config.loader import parse_ks_config
from gdoid.keyserver import state
from gdoid.keyserver.fields import FieldInvalid
from gdoid.keyserver.group import Group
from gdoid.keyserver.group_keys import GroupKeyState
from gdoid.protocol.pki import load_private_key
from gdoid.protocol.policy import GroupKeys
from tests.procs import (
    Daemon,
    auth_toml,
    gdoictl,
    gdoictl_json,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)

NOW = 1_800_000_000.0


def _group(tmp_path: Path) -> Group:
    write_private(tmp_path / "psk.secret", "s3cret\n")
    write_signing_key(tmp_path / "rekey.key")
    cfg = parse_ks_config(ks_toml(tmp_path, auth=auth_toml("psk.secret")).read_text(), tmp_path)
    g = cfg.groups[0]
    return Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, NOW)


def test_round_trip_restores_keys_seq_members(tmp_path: Path) -> None:
    g = _group(tmp_path)
    keys: GroupKeys = g.snapshot(NOW)
    g.record_member(
        IPv4Address("10.0.0.2"), "10.0.0.2", None, keys, None, NOW, port=848, ack_key=b"k" * 32
    )
    g.plan_rekey(NOW + 5, replace=True)
    path = tmp_path / "state" / "state.json"
    state.save(path, {g.number: g})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_name("state.json.tmp").exists()

    fresh = _group(tmp_path)
    assert fresh.kek.spi != g.kek.spi
    state.apply(fresh, state.load(path)[g.number])
    assert fresh.kek == g.kek
    assert fresh.teks == g.teks
    assert fresh.seq == g.seq == 2
    assert fresh.members[IPv4Address("10.0.0.2")].ack_key == b"k" * 32


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-type", "bad-key-length"])
def test_corrupt_state_is_refused_whole(tmp_path: Path, damage: str) -> None:
    g = _group(tmp_path)
    path = tmp_path / "state.json"
    state.save(path, {g.number: g})
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(200))
    elif damage == "wrong-type":
        path.write_text(text.replace('"seq":1', '"seq":"one"'))
    else:
        key = g.teks[0].cipher_key.hex()
        path.write_text(text.replace(key, key[:-2]))
    with pytest.raises(state.StateError):
        state.load(path)


@pytest.mark.root
def test_ks_sigkill_then_restart_resumes_with_higher_seq(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "s3cret\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    ks_cfg = ks_toml(tmp_path, auth=auth)
    with Daemon("gm", gm_toml(tmp_path, address="127.0.0.2", name="gm1", auth=auth)) as gm:
        ks = Daemon("ks", ks_cfg)
        try:
            gm.wait_for("GM_REGS_COMPL")
            assert gdoictl(tmp_path / "ks.sock", "crypto", "gdoi", "ks", "rekey").returncode == 0
            gm.wait_for(r"GM_RECV_REKEY: .* seq # 2")
            before = gdoictl_json(tmp_path / "ks.sock", "show", "crypto", "gdoi")["groups"][0]
        finally:
            ks.proc.send_signal(signal.SIGKILL)
            ks.stop()
        with Daemon("ks", ks_cfg) as ks2:
            ks2.wait_for("state_restored group=GET seq=2 members=1")
            after = gdoictl_json(tmp_path / "ks.sock", "show", "crypto", "gdoi")["groups"][0]
            assert after["kek_spi"] == before["kek_spi"] and after["tek_spis"] == before["tek_spis"]
            assert gdoictl(tmp_path / "ks.sock", "crypto", "gdoi", "ks", "rekey").returncode == 0
            gm.wait_for(r"GM_RECV_REKEY: .* seq # 3")
            status = gdoictl_json(tmp_path / "gm1.sock", "show", "crypto", "gdoi")["groups"][0]
            assert status["registrations"] == 1  # accepted without re-registering
            assert "REKEY_REJECTED" not in gm.text()


@pytest.mark.root
def test_corrupt_state_file_reported_and_moved_aside(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "s3cret\n")
    write_signing_key(tmp_path / "rekey.key")
    ks_cfg = ks_toml(tmp_path, auth=auth_toml("psk.secret"))
    state_dir = tmp_path / "ks-state"
    state_dir.mkdir(mode=0o700)
    (state_dir / "state.json").write_text('{"format": 1, "groups": [{"number": 1234')
    with Daemon("ks", ks_cfg) as ks:
        line = ks.wait_for("state_file_corrupt")
        assert "cannot parse" in line
        ks.wait_for("ks_started")
    moved = [p.name for p in state_dir.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(moved) == 1
    assert (state_dir / "state.json").exists()  # a fresh, valid state was written
    state.load(state_dir / "state.json")


def test_state_file_of_format_1_still_loads(tmp_path: Path) -> None:
    """A state file written before the keys became one GroupKeyState (main at issue 10) loads as it did."""
    old = Path(__file__).parent / "data" / "ks-state-format1.json"
    restored = state.load(old)[1234]
    keys = restored["keys"]
    assert keys.seq == restored["seq"] == 2 and keys.rekeys_sent == 1
    assert keys.kek.spi.hex() == "b0313769f31e02089411d227dbf7a12d"
    assert keys.kek.key_bits == 256 and len(keys.kek.key) == 32
    assert [t.policy.transform.name for t in keys.teks] == ["esp-gcm-256"]
    assert [m.address for m in restored["members"]] == [IPv4Address("10.0.0.2")]
    g = _group(tmp_path)
    state.apply(g, restored)
    assert g.kek == keys.kek and g.teks == list(keys.teks) and g.seq == 2
    # Saved again, it is written in the current format and reads back the same.
    path = tmp_path / "state.json"
    state.save(path, {g.number: g})
    assert json.loads(path.read_text())["format"] == state.FORMAT
    assert state.load(path)[1234]["keys"] == keys


def test_group_key_state_json_round_trip_and_typed_errors(tmp_path: Path) -> None:
    keys = GroupKeyState.of(_group(tmp_path))
    doc = keys.to_json()
    assert doc["version"] == 1
    assert GroupKeyState.from_json(json.loads(json.dumps(doc))) == keys
    with pytest.raises(FieldInvalid, match=r"^keys\.version: unknown version 2") as exc:
        GroupKeyState.from_json({**doc, "version": 2})
    assert exc.value.field == "keys.version"
    bad_tek = {**doc["teks"][0], "cipher_key": doc["teks"][0]["cipher_key"][:-2]}
    with pytest.raises(FieldInvalid) as exc:
        GroupKeyState.from_json({**doc, "teks": [bad_tek]})
    assert exc.value.field == "keys.teks[0].cipher_key"
    with pytest.raises(FieldInvalid) as exc:
        GroupKeyState.from_json({**doc, "seq": True})
    assert exc.value.field == "keys.seq"
    with pytest.raises(FieldInvalid) as exc:
        GroupKeyState.from_json(doc, signing_key_der=b"another key")
    assert exc.value.field == "keys.kek.public_key"


def test_state_file_with_unknown_key_version_is_refused(tmp_path: Path) -> None:
    g = _group(tmp_path)
    path = tmp_path / "state.json"
    state.save(path, {g.number: g})
    path.write_text(path.read_text().replace('"keys":{"version":1,', '"keys":{"version":7,'))
    with pytest.raises(state.StateError, match=r"group 1234\.keys\.version: unknown version 7"):
        state.load(path)
