"""systemd units verify, and the daemons speak the notify protocol."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gdoid.systemd import Notifier
from tests.journal import (
    journal_entry,
)
from tests.procs import (
    GDOICTL,
    GDOID,
    Daemon,
    auth_toml,
    free_udp_port,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)

UNITS = Path(__file__).resolve().parent.parent / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", ["gdoid-ks.service", "gdoid-gm.service"])
def test_units_verify(tmp_path: Path, unit: str) -> None:
    # Point ExecStart at the gdoid under test; everything else is verified as shipped.
    shipped = (UNITS / unit).read_text()
    text = shipped.replace("/usr/local/bin/gdoictl ", (GDOICTL or sys.executable) + " ")
    text = text.replace("/usr/local/bin/gdoid ", (GDOID or sys.executable) + " ")
    (tmp_path / unit).write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    # Reload through the control socket, so that a config that fails to load fails it.
    assert (
        "Type=notify" in shipped
        and "ExecReload=/usr/local/bin/gdoictl --socket /run/gdoid/" in shipped
    )
    assert "RestartPreventExitStatus=2" in shipped


def _listen(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    s.settimeout(20)
    return s


def test_notifier_sends_to_socket_and_abstract_names(tmp_path: Path) -> None:
    with _listen(tmp_path) as s:
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"})
        assert n.watchdog_interval == 1.0
        assert n.ready("listening")
        msg = s.recv(4096).decode().split("\n")
        assert msg[0] == "READY=1" and "STATUS=listening" in msg
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0gdoid-test-{os.getpid()}")
    with abstract:
        assert Notifier({"NOTIFY_SOCKET": f"@gdoid-test-{os.getpid()}"}).notify("WATCHDOG=1")
        assert abstract.recv(100) == b"WATCHDOG=1"
    assert not Notifier({}).enabled
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_daemons_notify_ready_watchdog_and_reload(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "s3cret\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    port = free_udp_port()
    with (
        _listen(tmp_path) as s,
        Daemon("ks", ks_toml(tmp_path, port=port, auth=auth), env=env) as ks,
    ):
        msgs = [s.recv(4096).decode() for _ in range(3)]
        assert any(m.startswith("READY=1") and "STATUS=listening" in m for m in msgs)
        assert any(m == "WATCHDOG=1" for m in msgs)
        ks.proc.send_signal(1)  # SIGHUP = ExecReload
        seen = []
        while not any(m.startswith("READY=1") and "reloaded" in m for m in seen):
            seen.append(s.recv(4096).decode())
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in seen)
        genv = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        gm_cfg = gm_toml(
            tmp_path,
            address="127.0.0.2",
            name="gm1",
            auth=auth,
            port=free_udp_port("127.0.0.2"),
            server_port=port,
        )
        with Daemon("gm", gm_cfg, env=genv) as gm:
            while True:
                m = s.recv(4096).decode()
                if "STATUS=registered" in m:
                    break
            gm.wait_for("GM_REGS_COMPL")  # READY came only after registration


def test_journal_entries_carry_the_ios_message_and_structured_fields(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "s3cret\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(20)
    env = {"GDOID_JOURNAL_SOCKET": str(tmp_path / "journal.sock")}
    port = free_udp_port()
    ks_daemon = Daemon(
        "ks", ks_toml(tmp_path, port=port, auth=auth), "--log-format", "journal", env=env
    )
    gm_config = gm_toml(
        tmp_path,
        address="127.0.0.2",
        name="gm1",
        auth=auth,
        port=free_udp_port("127.0.0.2"),
        server_port=port,
    )
    with journal, ks_daemon, Daemon("gm", gm_config) as gm:
        gm.wait_for("GM_REGS_COMPL")
        while True:
            entry = journal_entry(journal.recv(65536))
            if entry.get("GDOI_MNEMONIC") == "GDOI-5-KS_REGS_COMPL":
                break
    assert (
        entry["MESSAGE"]
        == "%GDOI-5-KS_REGS_COMPL: KS completed successful registration in group GET with GM 127.0.0.2"
    )
    assert entry["PRIORITY"] == "5" and entry["SYSLOG_IDENTIFIER"] == "gdoid"
    assert entry["GDOI_GROUP"] == "GET" and entry["GDOI_GM"] == "127.0.0.2"
