"""Issue 9 §6: the replay show commands tell the truth.

``show crypto gdoi group X gm replay`` ignored X, and ``show crypto gdoi ks replay``
printed fixed zeros and only the first SA's TBAR window.  An operator checking that
anti-replay is on for a group must see that group's real settings.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth, sa_ipsec
from gdoid.control import ControlRequest
from gdoid.groupmember.daemon import GroupMemberDaemon
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import TBAR_REKEY_INTERVAL, Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.pki import load_private_key
from tests.procs import Daemon, gdoictl, gdoictl_json, write_private, write_signing_key


def ks_text(d: Path) -> str:
    """Two groups; GET has two SAs with their own replay settings."""
    get = ks_group(
        sas=[
            sa_ipsec(
                1, src="10.1.0.0/16", dst="10.2.0.0/16", replay_window=64, tbar_window_ms=5000
            ),
            sa_ipsec(
                2,
                transform="esp-gcm-128",
                src="10.3.0.0/16",
                dst="10.4.0.0/16",
                replay_window=256,
                tbar_window_ms=900,
            ),
        ]
    )
    other = ks_group(
        name="OTHER", number=5678, sas=[sa_ipsec(src="10.5.0.0/16", dst="10.6.0.0/16")]
    )
    return ks_config(
        "127.0.0.1",
        control_socket=f"{d}/ks.sock",
        state_dir=f"{d}/ks-state",
        auth=psk_auth("127.0.0.0/8", "psk"),
        groups=[get, other],
    )


def gm_text(d: Path) -> str:
    """A GM of both groups, with the data path on."""
    groups = [gm_group(["127.0.0.1"]), gm_group(["127.0.0.1"], name="OTHER", number=5678)]
    return gm_config(
        "127.0.0.2",
        control_socket=f"{d}/gm.sock",
        auth=psk_auth("127.0.0.0/8", "psk"),
        dataplane={"enabled": True},
        groups=groups,
    )


@pytest.fixture
def files(tmp_path: Path) -> Path:
    write_private(tmp_path / "psk", "secret\n")
    write_signing_key(tmp_path / "rekey.key")
    (tmp_path / "ks.toml").write_text(ks_text(tmp_path))
    return tmp_path


# --- GM: the group filter -----------------------------------------------------------------


async def test_gm_replay_honours_the_group(files: Path) -> None:
    """A GM with both groups registered (real engines, real data path engine; no sockets)."""
    now = time.time()
    ks_cfg = parse_ks_config(ks_text(files), files)
    groups = {
        g.number: Group(g, load_private_key(g.kek.signing_key), ks_cfg.address, 848, now)
        for g in ks_cfg.groups
    }
    ks = KeyServerEngine(
        phase1_config(ks_cfg.ike, ks_cfg.auth, ks_cfg.address, ks_cfg.software_version), groups
    )
    gm = GroupMemberDaemon(parse_gm_config(gm_text(files), files))
    queue = gm.engine.start(now)
    while queue:
        data, dst = queue.pop(0)
        if dst[0] == "127.0.0.1":
            queue += ks.datagram_received(data, ("127.0.0.2", 848), now)
        else:
            queue += gm.engine.datagram_received(data, ("127.0.0.1", 848), now)
    assert gm.registered.is_set()

    async def show(*words: str) -> tuple[bool, str, object]:
        res = await gm.handle(ControlRequest(tuple(words)))
        return res.ok, res.output if res.ok else (res.error or res.output), res.data

    ok, text, data = await show("show", "crypto", "gdoi", "group", "OTHER", "gm", "replay")
    assert ok and "Group OTHER:" in text and "Group GET" not in text, text
    assert [g["group"] for g in data["groups"]] == [5678]
    assert "Window Size        : disabled" in text and "Replay Window      : disabled" in text

    ok, text, data = await show("show", "crypto", "gdoi", "group", "GET", "gm", "replay")
    assert ok and "Group GET:" in text and "OTHER" not in text, text
    [g] = data["groups"]
    assert g["group"] == 1234 and g["replay_window"] == 256 and g["tbar_window_ms"] == 5000

    ok, text, data = await show("show", "crypto", "gdoi", "gm", "replay")
    assert ok and [g["group"] for g in data["groups"]] == [1234, 5678]

    ok, text, _ = await show("show", "crypto", "gdoi", "group", "NOPE", "gm", "replay")
    assert not ok and "% Group NOPE not found" in text


# --- KS: the settings in force ------------------------------------------------------------


@pytest.mark.root
def test_ks_replay_shows_each_groups_configured_windows(files: Path) -> None:
    with Daemon("ks", files / "ks.toml") as ks:
        ks.wait_for("ks_started")
        sock = files / "ks.sock"
        res = gdoictl(sock, "show", "crypto", "gdoi", "group", "GET", "ks", "replay")
        assert res.returncode == 0, res.stdout + res.stderr
        text = res.stdout
        assert "Group OTHER" not in text
        # Every SA's windows, from the policy; not the first SA's TBAR window alone.
        assert re.search(
            r"sa ipsec 1:\n\s+Counter-based Replay Window : 64\n\s+Time-based Replay Window\s+: 5000 msec\n",
            text,
        ), text
        assert re.search(
            r"sa ipsec 2:\n\s+Counter-based Replay Window : 256\n\s+Time-based Replay Window\s+: 900 msec\n",
            text,
        ), text
        assert f"TBAR Rekey Period  : {TBAR_REKEY_INTERVAL} secs" in text
        # No packet counters a KS does not have (they were constant zeros).
        assert "Input Packets" not in text and "Output Error Packets" not in text
        # The pseudotime is the group's, and it moves.
        [get] = gdoictl_json(sock, "show", "crypto", "gdoi", "group", "GET", "ks", "replay")
        assert get["tbar"] is True and get["pseudotime_ms"] >= 0
        assert [
            (s["number"], s["replay_window"], s["tbar_window_ms"]) for s in get["sa_ipsec"]
        ] == [(1, 64, 5000), (2, 256, 900)]
        m = re.search(r"Replay Value       : ([0-9.]+) secs", text)
        assert m is not None and abs(float(m.group(1)) * 1000 - get["pseudotime_ms"]) < 5000

        other = gdoictl(sock, "show", "crypto", "gdoi", "group", "OTHER", "ks", "replay").stdout
        assert "Group GET" not in other and "Replay Value       : disabled" in other
        assert re.search(
            r"sa ipsec 1:\n\s+Counter-based Replay Window : disabled\n\s+Time-based Replay Window\s+: disabled\n",
            other,
        ), other
        [o] = gdoictl_json(sock, "show", "crypto", "gdoi", "group", "OTHER", "ks", "replay")
        assert o["tbar"] is False and o["pseudotime_ms"] is None and o["next_rekey_in"] > 3000

        bad = gdoictl(sock, "show", "crypto", "gdoi", "group", "NOPE", "ks", "replay")
        assert bad.returncode != 0 and "% Group NOPE not found" in bad.stdout + bad.stderr
