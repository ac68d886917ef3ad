"""Show commands of the real KS and GM daemons over their control sockets.

The daemons run in this process without UDP sockets: their engines exchange the
registration (and a removal) in memory, and each daemon's command handler serves a
real control socket in tmp_path.  Covers issue 10 §6 (abbreviations, ambiguity) and
the show items of issue 12 §1.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gdoid import log
from gdoid.config.loader import load_gm_config, load_ks_config
from gdoid.control import ControlRequest, ControlResponse, ControlServer, request
from gdoid.groupmember.daemon import GroupMemberDaemon
from gdoid.keyserver.daemon import KeyServerDaemon
from gdoid.protocol.datagram import Outgoing
from gdoid.protocol.push import RemovalMode
from tests.procs import write_private, write_signing_key

KS_TOML = """
[ks]
address = "127.0.0.1"
control_socket = "{d}/ks.sock"
state_dir = "{d}/ks-state"
[[auth.psk]]
peer = "127.0.0.0/8"
key_file = "psk"

[[group]]
name = "GET"
number = 1234
[group.kek]
signing_key = "rekey.key"
[[group.sa_ipsec]]
number = 1
profile = "gdoi-p"
transform = "{transform}"
lifetime = 3600
replay_window = 64
tbar_window_ms = 5000
[group.sa_ipsec.match]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
"""

GM_TOML = """
[gm]
address = "127.0.0.2"
control_socket = "{d}/gm.sock"
[[auth.psk]]
peer = "127.0.0.0/8"
key_file = "psk"
[[group]]
name = "GET"
number = 1234
servers = ["127.0.0.1"]
"""

POLICY_CHANGE = log.POLICY_CHANGE.text(group="GET") + "\n"


@dataclass
class Pair:
    """A KS and a GM registered with it, each daemon's handler on a control socket."""

    dir: Path
    ks: KeyServerDaemon
    gm: GroupMemberDaemon

    def deliver(self, out: Outgoing, now: float) -> None:
        queue = list(out)
        while queue:
            data, dst = queue.pop(0)
            if dst[0] == "127.0.0.1":
                queue += self.ks.engine.datagram_received(data, ("127.0.0.2", 848), now)
            else:
                queue += self.gm.engine.datagram_received(data, ("127.0.0.1", 848), now)

    async def ask(self, role: str, line: str) -> ControlResponse:
        return await request(self.dir / f"{role}.sock", ControlRequest(tuple(line.split())))

    async def text(self, role: str, line: str) -> str:
        res = await self.ask(role, line)
        assert res.ok, res.error
        return res.output


@pytest.fixture
async def pair(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    write_private(tmp_path / "psk", "secret\n")
    write_signing_key(tmp_path / "rekey.key")
    ks_toml = KS_TOML.format(d=tmp_path, transform="esp-gcm-256")
    # Indirect parametrization: a test may give its own TBAR line for the SA.
    ks_toml = ks_toml.replace(
        "tbar_window_ms = 5000", getattr(request, "param", "tbar_window_ms = 5000")
    )
    (tmp_path / "ks.toml").write_text(ks_toml)
    (tmp_path / "gm.toml").write_text(GM_TOML.format(d=tmp_path))
    ks = KeyServerDaemon(load_ks_config(tmp_path / "ks.toml"), config_path=tmp_path / "ks.toml")
    gm = GroupMemberDaemon(load_gm_config(tmp_path / "gm.toml"))
    p = Pair(tmp_path, ks, gm)
    p.deliver(gm.engine.start(time.time()), time.time())
    assert gm.registered.is_set()
    servers = [
        ControlServer(tmp_path / "ks.sock", ks.handle),
        ControlServer(tmp_path / "gm.sock", gm.handle),
    ]
    for s in servers:
        await s.start()
    try:
        yield p
    finally:
        for s in servers:
            await s.close()


FEATURE_TABLE = """
 Group Name: GET
 Key Server ID Version Feature Supported
 127.0.0.1 1.0.2 Yes

 Group Member ID Version Feature Supported
 127.0.0.2 1.0.2 Yes
"""


async def test_abbreviated_commands_on_both_daemons(pair: Pair) -> None:
    for role in ("ks", "gm"):
        assert await pair.text(role, "sh cry gdoi fea gm-rem") == FEATURE_TABLE
        assert await pair.text(role, "sh cry gdoi fea po") == FEATURE_TABLE
        assert await pair.text(role, "s cr gd gr GET fea gm-removal") == FEATURE_TABLE
    assert "Group Member ID    : 127.0.0.2" in await pair.text("ks", "sh cry gd ks mem")
    assert "Anti-replay Information For Group GET:" in await pair.text("gm", "sh cry gd gm rep")
    assert "spi: 0x" in await pair.text("gm", "sh cry ips sa")


async def test_ambiguous_prefixes_are_refused_as_ios_does(pair: Pair) -> None:
    for role in ("ks", "gm"):
        for line, upto in (
            ("sh cry gdoi g", "sh cry gdoi g"),
            ("sh cry gdoi fea g", "sh cry gdoi fea g"),
            ("c cry gdoi", "c"),
        ):  # quoted up to the ambiguous word, as IOS does
            res = await pair.ask(role, line)
            assert (res.ok, res.error) == (False, f'% Ambiguous command: "{upto}"')
        res = await pair.ask(role, "sh cry")
        assert (res.ok, res.error) == (False, "% Incomplete command.")
    res = await pair.ask("ks", "sh cry ips sa")
    assert res.error == '% "sh cry ips sa" is a group-member command; this is a key server'


async def test_feature_without_a_name_prints_every_feature_table(pair: Pair) -> None:
    want = "".join(f"\n Feature: {f}\n" + FEATURE_TABLE for f in ("gm-removal", "policy-replace"))
    for role in ("ks", "gm"):  # the GM: its KS's version and its own
        res = await pair.ask(role, "show crypto gdoi feature")
        assert res.ok and res.output == want, (role, res.output)
        tables = res.data["features"]
        assert set(tables) == {"gm-removal", "policy-replace"}
        assert tables["gm-removal"][0]["key_servers"] == [
            {"address": "127.0.0.1", "version": "1.0.2", "supported": True}
        ]
        assert tables["gm-removal"][0]["members"] == [
            {"address": "127.0.0.2", "version": "1.0.2", "supported": True}
        ]


async def test_gm_without_the_data_path_shows_its_sas_from_the_control_plane(pair: Pair) -> None:
    assert pair.gm.dataplane is None
    [tek] = pair.ks.groups[1234].teks
    spi = f"0x{tek.spi:08X}({tek.spi})"

    res = await pair.ask("gm", "show crypto ipsec sa")
    assert res.ok and res.data["enabled"] is False
    [sa] = res.data["sas"]
    assert (sa["spi"], sa["replay_window"], sa["tbar_window_ms"]) == (tek.spi, 64, 5000)
    assert 3590 <= sa["remaining"] <= 3600
    text = res.output
    assert f"   group 1234 spi: {spi}\n" in text
    assert re.search(r"sa timing: remaining key lifetime \(sec\): \(35\d\d|3600\)", text), text
    assert "replay detection (counter based): 64\n" in text
    assert "replay detection (time based): 5000 msec\n" in text
    assert "#pkts" not in text  # no counters without the data path

    res = await pair.ask("gm", "show crypto gdoi gm replay")
    assert res.ok
    assert "      Replay Window      : 5000 msec\n" in res.output
    assert "      Window Size        : 64\n" in res.output
    assert re.search(r"Local Pseudotime   : \d+\.\d{3} secs\n", res.output), res.output
    [g] = res.data["groups"]
    assert (g["group"], g["replay_window"], g["tbar_window_ms"]) == (1234, 64, 5000)

    text = await pair.text("gm", "show crypto gdoi")
    assert f"        spi: {spi}\n" in text
    assert "        Anti-Replay(Time Based) : 5 sec interval\n" in text
    assert "        Anti-Replay(Counter Based) : 64\n" in text


async def test_after_a_removal_the_gm_shows_the_announced_reregistration_timer(pair: Pair) -> None:
    now = time.time()
    with capture_logs() as logs:
        pair.deliver(pair.ks.engine.remove_members(pair.ks.groups[1234], now, RemovalMode.NOW), now)
    [line] = [e for e in logs if e["event"] == log.GM_RECV_DELETE_IMMEDIATE.name]
    text = await pair.text("gm", "show crypto gdoi")
    m = re.search(r"Re-registers in       : (\d+) sec\n", text)
    assert m is not None, text
    assert line["seconds"] - 1 <= int(m.group(1)) <= line["seconds"]
    [g] = (await pair.ask("gm", "show crypto gdoi")).data["groups"]
    assert g["rereg_in"] == int(m.group(1)) or abs(g["rereg_in"] - int(m.group(1))) <= 1


async def test_reload_announces_a_staged_policy_change_once(pair: Pair) -> None:
    d = pair.dir
    (d / "ks.toml").write_text(KS_TOML.format(d=d, transform="esp-gcm-128"))
    with capture_logs() as logs:
        first = await pair.ask("ks", "reload")
        again = await pair.ask("ks", "rel")
    assert first.output == POLICY_CHANGE
    assert (again.ok, again.output) == (True, "% configuration unchanged\n")
    assert [e["event"] for e in logs].count(log.POLICY_CHANGE.name) == 1
    # A further edit is a new change, announced again.
    (d / "ks.toml").write_text(KS_TOML.format(d=d, transform="esp-cbc-256-sha256"))
    assert (await pair.ask("ks", "reload")).output == POLICY_CHANGE


@pytest.mark.parametrize(
    ("pair", "shown"),
    [
        ("replay_time_window_size = 5", "5 sec interval"),  # IOS: replay time window-size 5
        ("replay_time_window_size = 100", "100 sec interval"),
        ("tbar_window_ms = 500", "500 msec interval"),
    ],
    indirect=["pair"],
)
async def test_tbar_window_as_ios_configures_and_shows_it(pair: Pair, shown: str) -> None:
    """``replay time window-size N`` (seconds): KS and GM show ``Anti-Replay(Time Based)``."""
    for role in ("ks", "gm"):
        text = await pair.text(role, "show crypto gdoi")
        assert f"        Anti-Replay(Time Based) : {shown}\n" in text, (role, text)
