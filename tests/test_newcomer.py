"""Issue 14, the newcomer's path: health, wait, and messages where silence confused.

Real daemons on loopback (unprivileged ports: no root needed), the real gdoictl.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gdoid import log
from tests.journal import journal_entry
from tests.procs import (
    Daemon,
    auth_toml,
    free_udp_port,
    gdoictl,
    gdoictl_cmd,
    gdoictl_wait,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)

KS_PORT, GM_PORT = free_udp_port("127.0.0.1"), free_udp_port("127.0.0.2")


def _configs(d: Path, registration_timeout: float = 5.0) -> tuple[Path, Path]:
    write_private(d / "psk.secret", "s3cret\n")
    write_signing_key(d / "rekey.key")
    auth = auth_toml("psk.secret")
    ks = ks_toml(d, auth=auth, port=KS_PORT)
    gm = gm_toml(
        d,
        address="127.0.0.2",
        name="gm1",
        auth=auth,
        port=GM_PORT,
        server_port=KS_PORT,
        registration_timeout=registration_timeout,
    )
    return ks, gm


def _ctl(sock: Path, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gdoictl_cmd(), "--socket", str(sock), *words],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_health_and_wait_follow_registration(tmp_path: Path) -> None:
    ks_conf, gm_conf = _configs(tmp_path)
    ks_sock, gm_sock = tmp_path / "ks.sock", tmp_path / "gm1.sock"
    # A wait started before the daemon exists waits for its socket too.
    early = subprocess.Popen(
        [*gdoictl_cmd(), "--socket", str(gm_sock), "wait", "ready", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with Daemon("gm", gm_conf) as gm:
        gm.wait_for("registration_start")
        res = _ctl(gm_sock, "health")
        assert (res.returncode, res.stdout) == (
            1,
            "gm registering: group GET: phase1 with KS 127.0.0.1\n",
        )
        res = gdoictl_wait(gm_sock, "registered", timeout=0.3)
        assert res.returncode == 1
        assert res.stderr == (
            "gdoictl: wait registered: timed out after 0.3 s; "
            "gm registering: group GET: phase1 with KS 127.0.0.1\n"
        )
        with Daemon("ks", ks_conf) as ks:
            ks.wait_for("ks_started")
            assert _ctl(ks_sock, "health").stdout == "ks listening: group GET: 0 member(s)\n"
            res = gdoictl_wait(gm_sock, "ready")
            assert (res.returncode, res.stdout) == (
                0,
                "gm registered: group GET with KS 127.0.0.1\n",
            )
            assert early.wait(30) == 0 and early.stdout and "gm registered" in early.stdout.read()
            res = gdoictl_wait(ks_sock, "registered")
            assert (res.returncode, res.stdout) == (0, "ks listening: group GET: 1 member(s)\n")
            data = json.loads(_ctl(ks_sock, "--json", "show", "gdoid", "health").stdout)
            assert data["healthy"] and data["registered"] and data["state"] == "listening"
            assert _ctl(ks_sock, "health").returncode == 0
            assert _ctl(gm_sock, "health").returncode == 0
    res = gdoictl_wait(gm_sock, "ready", timeout=0.2)
    assert res.returncode == 1 and "daemon not reachable" in res.stderr


def test_wrong_role_commands_and_unattended_confirmation(tmp_path: Path) -> None:
    ks_conf, gm_conf = _configs(tmp_path)
    with Daemon("ks", ks_conf) as ks, Daemon("gm", gm_conf) as gm:
        gm.wait_for("GM_REGS_COMPL")
        res = gdoictl(tmp_path / "gm1.sock", "clear", "crypto", "gdoi", "ks", "members")
        assert res.returncode == 1
        assert (
            res.stdout
            == '% "clear crypto gdoi ks members" is a key-server command; this is a group member\n'
        )
        res = gdoictl(tmp_path / "ks.sock", "show", "crypto", "ipsec", "sa")
        assert (
            res.stdout
            == '% "show crypto ipsec sa" is a group-member command; this is a key server\n'
        )
        assert (
            "% Invalid input: show bogus" in gdoictl(tmp_path / "gm1.sock", "show", "bogus").stdout
        )
        # No --yes, no terminal: say that nothing was done, and why.
        res = gdoictl(tmp_path / "ks.sock", "clear", "crypto", "gdoi", "ks", "members")
        assert res.returncode == 1
        assert res.stderr == (
            "gdoictl: aborted: this command asks for confirmation and stdin is not a "
            "terminal (no answer read); nothing was done. Add --yes to confirm.\n"
        )
        assert "KS_SEND_GM_REMOVAL" not in ks.text()


def test_sighup_and_sigterm_are_logged_and_the_gm_survives_sighup(tmp_path: Path) -> None:
    ks_conf, gm_conf = _configs(tmp_path)
    with Daemon("ks", ks_conf) as ks, Daemon("gm", gm_conf) as gm:
        gm.wait_for("GM_REGS_COMPL")
        ks.proc.send_signal(signal.SIGHUP)
        ks.wait_for(r"reload_config_unchanged path=\S+ks\.toml")
        gm.proc.send_signal(signal.SIGHUP)
        gm.wait_for(r"reload_config_unchanged path=\S+gm1\.toml")
        assert gm.proc.poll() is None
        assert gdoictl(tmp_path / "gm1.sock", "health").returncode == 0
        # A changed GM file: said so, applied on restart, the GM keeps its keys.
        gm_conf.write_text(
            gm_conf.read_text().replace("registration_timeout = 5.0", "registration_timeout = 6.0")
        )
        res = gdoictl(tmp_path / "gm1.sock", "reload")
        assert res.stdout.startswith(
            "% configuration changed; a group member applies it on restart"
        )
        gm.wait_for("reload_config_changed_restart_needed")
        assert gm.stop() == 0 and ks.stop() == 0
    assert gm.lines[-1].endswith(" shutdown signal=SIGTERM")
    assert any(line.endswith(" shutdown signal=SIGTERM") for line in ks.lines)


def _notify_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(20)
    return s


def test_sd_notify_status_per_attempt_and_failed_reload(tmp_path: Path) -> None:
    ks_conf, gm_conf = _configs(tmp_path, registration_timeout=0.5)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    with _notify_socket(tmp_path / "notify.sock") as s, Daemon("gm", gm_conf, env=env):
        statuses: list[str] = []
        while not any("2 failed attempt(s)" in m for m in statuses):
            statuses.append(s.recv(4096).decode())
        assert statuses[0] == "STATUS=gm registering: group GET: phase1 with KS 127.0.0.1"
        assert any(
            m.startswith("STATUS=gm registering: group GET: ")
            and "1 failed attempt(s), last: " in m
            for m in statuses
        )
        assert not any(m.startswith("READY=1") for m in statuses)
    (tmp_path / "notify.sock").unlink()
    with _notify_socket(tmp_path / "notify.sock") as s, Daemon("ks", ks_conf, env=env) as ks:
        first = [s.recv(4096).decode() for _ in range(2)]
        assert first == [
            "STATUS=ks listening: group GET: 0 member(s)",
            f"READY=1\nSTATUS=listening\nMAINPID={ks.proc.pid}",
        ]
        ks_conf.write_text(ks_conf.read_text() + "\nbogus = \n")
        res = gdoictl(tmp_path / "ks.sock", "reload")  # what ExecReload runs
        assert res.returncode == 1 and res.stdout.startswith(
            "% reload failed, running configuration unchanged"
        )
        msgs = [s.recv(4096).decode() for _ in range(2)]
        assert msgs[0].startswith("RELOADING=1")
        assert msgs[1].startswith(
            "READY=1\nSTATUS=reload failed, running configuration unchanged: "
        )
        ks.proc.send_signal(signal.SIGHUP)  # the same through SIGHUP
        msgs = [s.recv(4096).decode() for _ in range(2)]
        assert msgs[1].startswith(
            "READY=1\nSTATUS=reload failed, running configuration unchanged: "
        )
        assert ks.proc.poll() is None


def test_journal_message_carries_details_and_fatal_errors_are_errors(tmp_path: Path) -> None:
    fields = log.journal_fields(
        {
            "event": "ks_started",
            "level": "info",
            "address": "10.0.0.1",
            "port": 848,
            "groups": "GET",
            "logger_name": "gdoid.ks",
        }
    )
    assert fields["MESSAGE"] == "ks_started address=10.0.0.1 port=848 groups=GET"
    assert fields["GDOI_ADDRESS"] == "10.0.0.1" and fields["PRIORITY"] == "6"
    # A configuration error at startup: PRIORITY 3 in the journal, exit 2.
    bad = tmp_path / "ks.toml"
    bad.write_text("[ks]\nbogus = 1\n")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(20)
    with journal:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gdoid.cli.daemon",
                "ks",
                "--config",
                str(bad),
                "--log-format",
                "journal",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "GDOID_JOURNAL_SOCKET": str(tmp_path / "journal.sock")},
        )
        entry = journal_entry(journal.recv(65536))
    assert proc.returncode == 2
    assert entry["PRIORITY"] == "3" and entry["MESSAGE"].startswith("startup_failed error=")
    assert "bogus" in entry["GDOI_ERROR"]


READY_SCRIPT = """
import asyncio, subprocess, sys, tempfile, time
from pathlib import Path
from gdoid.config.loader import load_gm_config, load_ks_config
from gdoid.groupmember.daemon import GroupMemberDaemon
from gdoid.keyserver.daemon import KeyServerDaemon
from gdoid.lab import export

async def main() -> None:
    files = export(Path(tempfile.mkdtemp()), 1)
    with files.gms[0].open("a") as f:
        f.write("\\n[dataplane]\\nenabled = true\\n")
    ks = KeyServerDaemon(load_ks_config(files.kss[0]))
    gm = GroupMemberDaemon(load_gm_config(files.gms[0]))
    real = gm.forwarder.routes.update
    def slow(prefixes):  # netlink on a loaded host: the real update, 0.5 s late
        time.sleep(0.5)
        real(prefixes)
    gm.forwarder.routes.update = slow
    await ks.start()
    await gm.start()
    try:
        await asyncio.wait_for(gm.registered.wait(), 30)  # what sends READY=1
        routes = subprocess.run(["ip", "route", "show", "table", "26468"],
                                capture_output=True, text=True).stdout
        print("ROUTES " + routes.replace("\\n", "|"))
        print("HEALTH " + (gm.health()["line"] if hasattr(gm, "health") else "none"))
    finally:
        await gm.close()
        await ks.close()

asyncio.run(main())
"""


@pytest.mark.root
@pytest.mark.usefixtures("netns_required")
def test_gm_ready_only_once_its_routes_are_in_place() -> None:
    ns = f"gdoid-ready-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        res = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", READY_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(
        line.split(" ", 1)
        for line in res.stdout.splitlines()
        if line.startswith(("ROUTES", "HEALTH"))
    )
    assert "10.0.0.0/8 dev gdoi" in lines["ROUTES"], res.stdout
    assert lines["HEALTH"].startswith("gm registered: group GET with KS 127.0.0.1")
