"""Issue 9 §5, local hardening: the key-log directory and files, the KS state file's
temporary, and who may use the control socket (SO_PEERCRED).

Each test fails on the code before the fix: a world-writable or foreign key-log
directory was used, key files were written through symlinks and kept loose
modes, the state temporary was opened with O_TRUNC through a symlink and written
with one unchecked write(), and any local user who could reach the control
socket could run ``clear``/``reload``/``show``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gdoid.config.loader import parse_ks_config
from gdoid.control import PERMISSION_DENIED, ControlAccess, ControlResponse, ControlServer
from gdoid.keylog import ESP_TABLE, IKE_TABLE, PREFERENCES, KeyLog, KeylogError
from gdoid.keyserver import state
from gdoid.keyserver.group import Group
from gdoid.protocol.pki import load_private_key
from tests.procs import (
    Daemon,
    auth_toml,
    free_udp_port,
    gdoictl,
    gdoid_cmd,
    ks_toml,
    write_private,
    write_signing_key,
)

NOW = 1_800_000_000.0
NOBODY = 65534
VICTIM = b"victim file: must stay exactly like this\n"

pytestmark = pytest.mark.root


def _ks_config(directory: Path, port: int = 848, extra_ks: str = "") -> Path:
    write_private(directory / "psk.secret", "s3cret\n")
    write_signing_key(directory / "rekey.key")
    path = ks_toml(directory, port=port, auth=auth_toml("psk.secret"))
    if extra_ks:
        path.write_text(path.read_text().replace("[ks]\n", f"[ks]\n{extra_ks}\n", 1))
    return path


def _group(directory: Path) -> Group:
    cfg = parse_ks_config(_ks_config(directory).read_text(), directory)
    g = cfg.groups[0]
    return Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, NOW)


def _victim(path: Path) -> Path:
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


# --- --keylog DIR ----------------------------------------------------------------------


def test_keylog_world_writable_dir_refused_at_startup(tmp_path: Path) -> None:
    """``gdoid ks --keylog DIR`` with DIR world-writable (a pre-made /tmp/keys) exits
    with the config-error status before doing anything."""
    keys = tmp_path / "keys"
    keys.mkdir()
    keys.chmod(0o1777)
    config = _ks_config(tmp_path, port=free_udp_port())
    try:
        proc = subprocess.run(
            [*gdoid_cmd(), "ks", "--config", str(config), "--keylog", str(keys)],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the KS started with a world-writable key-log directory")
    assert proc.returncode == 2, proc.stderr
    assert "must not be group/world-writable" in proc.stderr, proc.stderr
    assert list(keys.iterdir()) == []  # nothing written into it


@pytest.mark.parametrize("case", ["group-writable", "owned-by-nobody", "symlink-to-dir"])
def test_keylog_unsafe_dir_refused(tmp_path: Path, case: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    if case == "group-writable":
        keys.chmod(0o770)
    elif case == "owned-by-nobody":
        os.chown(keys, NOBODY, NOBODY)
    else:
        real, keys = keys, tmp_path / "link"
        keys.symlink_to(real)
    with pytest.raises(KeylogError):
        KeyLog(keys)
    assert not (tmp_path / "keys" / PREFERENCES).exists()


def test_keylog_planted_symlink_refused_at_startup(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    victim = _victim(tmp_path / "victim")
    (keys / IKE_TABLE).symlink_to(victim)
    with pytest.raises(KeylogError, match="symlinks are refused"):
        KeyLog(keys)
    assert victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_keylog_symlink_planted_while_running_not_followed(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keylog = KeyLog(keys)
    tek = _group(tmp_path).teks[0]
    victim = _victim(tmp_path / "victim")
    (keys / ESP_TABLE).symlink_to(victim)
    keylog.esp(tek)
    assert victim.read_bytes() == VICTIM
    assert (keys / ESP_TABLE).is_symlink()
    # The key is nowhere outside the directory, and a real file works again after cleanup.
    (keys / ESP_TABLE).unlink()
    keylog._esp_spis.clear()
    keylog.esp(tek)
    assert tek.cipher_key.hex() in (keys / ESP_TABLE).read_text()


def test_keylog_files_are_0600(tmp_path: Path) -> None:
    """New files 0600 whatever the umask; a pre-existing loose file is tightened."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / ESP_TABLE).write_text("")
    (keys / ESP_TABLE).chmod(0o644)
    old = os.umask(0)
    try:
        keylog = KeyLog(keys)
        keylog.esp(_group(tmp_path).teks[0])
    finally:
        os.umask(old)
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in (PREFERENCES, ESP_TABLE):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name


def test_lab_keylog_creates_private_dir(tmp_path: Path) -> None:
    """``gdoid lab --keylog DIR`` keeps working: DIR is created 0700, the keys land in it."""
    keys = tmp_path / "new" / "keys"
    proc = subprocess.run(
        [
            *gdoid_cmd(),
            "lab",
            "--gms",
            "1",
            "--base-port",
            str(free_udp_port()),
            "--timeout",
            "20",
            "--keylog",
            str(keys),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in (IKE_TABLE, ESP_TABLE):
        assert (keys / name).read_text().strip(), name
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600


# --- KS state file ----------------------------------------------------------------------


def test_state_temp_symlink_not_followed(tmp_path: Path) -> None:
    g = _group(tmp_path)
    path = tmp_path / "state" / "state.json"
    path.parent.mkdir(mode=0o700)
    victim = _victim(tmp_path / "victim")
    path.with_name("state.json.tmp").symlink_to(victim)
    state.save(path, {g.number: g})
    assert victim.read_bytes() == VICTIM
    assert not path.with_name("state.json.tmp").exists()
    assert not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.load(path)[g.number]["kek"] == g.kek


def test_state_stale_temp_replaced(tmp_path: Path) -> None:
    """A temporary left by a crash (loose mode, junk) is not reused: fresh 0600 file."""
    g = _group(tmp_path)
    path = tmp_path / "state" / "state.json"
    path.parent.mkdir(mode=0o700)
    stale = path.with_name("state.json.tmp")
    stale.write_bytes(b"x" * 100_000)
    stale.chmod(0o644)
    state.save(path, {g.number: g})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state.load(path)[g.number]["teks"] == g.teks


def test_state_save_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write(2) may write less than asked: every call here writes at most 97 bytes
    (for real, into the real file); the saved state must still be complete."""
    g = _group(tmp_path)
    path = tmp_path / "state" / "state.json"
    real_write = os.write
    calls = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:97]))

    monkeypatch.setattr(os, "write", short_write)
    state.save(path, {g.number: g})
    monkeypatch.undo()
    assert state.load(path)[g.number]["kek"] == g.kek
    assert len(calls) > 10  # the state really needed many writes


# --- control socket ---------------------------------------------------------------------


def _other_group() -> grp.struct_group:
    """A group that neither root nor nobody is in, for control_group."""
    for g in grp.getgrall():
        if g.gr_gid not in (0, NOBODY) and "nobody" not in g.gr_mem and "root" not in g.gr_mem:
            return g
    pytest.skip("no spare group on this host")


def _as_user(sock: Path, words: list[str], uid: int, gid: int, groups: tuple[int, ...] = ()) -> Any:
    """Send one request from a forked client running as uid/gid/groups; its JSON answer,
    or {"client_error": ...} when it cannot even connect."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        status = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(sock))
            req = {"command": words, "confirm": 9}  # past any prompt: executes if allowed
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            out = buf or b'{"client_error": "no answer"}'
        except OSError as exc:
            out = json.dumps({"client_error": exc.strerror or str(exc)}).encode()
        except BaseException:
            out, status = b'{"client_error": "crash"}', 1
        with contextlib.suppress(OSError):
            os.write(w, out)
        os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory unprivileged clients can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="gdoid-ctl-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_control_socket_peercred(shared_dir: Path) -> None:
    """A real KS with control_group: root runs everything; a member of the group runs
    show; an outsider gets ``% Permission denied`` for clear, reload and show (even on a
    socket whose mode was loosened), and the denial is logged, rate-limited."""
    group = _other_group()
    config = _ks_config(
        shared_dir, port=free_udp_port(), extra_ks=f'control_group = "{group.gr_name}"'
    )
    sock = shared_dir / "ks.sock"
    with Daemon("ks", config) as ks:
        ks.wait_for("ks_started")
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid

        # The file mode is the first fence: an outsider cannot even connect.
        refused = _as_user(sock, ["show", "crypto", "gdoi"], NOBODY, NOBODY)
        assert refused == {"client_error": "Permission denied"}

        # The credential check holds on its own, e.g. after a careless chmod.
        sock.chmod(0o666)
        for words in (
            ["clear", "crypto", "gdoi", "ks", "members"],
            ["reload"],
            ["show", "crypto", "gdoi"],
            ["sh", "cry", "gdoi", "ks", "mem"],
        ):
            answer = _as_user(sock, words, NOBODY, NOBODY)
            assert answer["ok"] is False and answer["error"] == PERMISSION_DENIED, (words, answer)
            assert not answer["output"] and answer["data"] is None
        ks.wait_for(r"control_permission_denied.*uid=65534.*kind=change")
        ks.wait_for(r"control_permission_denied.*uid=65534.*kind=show")

        # A member of control_group (supplementary group) may show and change.
        shown = _as_user(sock, ["show", "crypto", "gdoi"], NOBODY, NOBODY, (group.gr_gid,))
        assert shown["ok"] is True and "GET" in shown["output"], shown
        rekey = _as_user(sock, ["crypto", "gdoi", "ks", "rekey"], NOBODY, NOBODY, (group.gr_gid,))
        assert rekey["ok"] is True, rekey

        # Root (here also the daemon's user) runs changing commands.
        res = gdoictl(sock, "--yes", "clear", "crypto", "gdoi", "ks", "members")
        assert res.returncode == 0 and PERMISSION_DENIED not in res.stdout + res.stderr, res
        res = gdoictl(sock, "reload")
        assert res.returncode == 0, res.stdout + res.stderr

        # Denials are rate-limited in the log: a burst of 30 adds at most 5 lines.
        before = sum("control_permission_denied" in line for line in ks.lines)
        for _ in range(30):
            _as_user(sock, ["reload"], NOBODY, NOBODY)
        gdoictl(sock, "show", "crypto", "gdoi")  # an allowed request after the burst
        after = sum("control_permission_denied" in line for line in ks.lines)
        assert after - before <= 5, ks.text()


def test_control_socket_root_only_without_group(shared_dir: Path) -> None:
    """No control_group: socket 0600, and only root / the daemon's user are served,
    even when the socket's mode has been loosened."""
    config = _ks_config(shared_dir, port=free_udp_port())
    sock = shared_dir / "ks.sock"
    with Daemon("ks", config) as ks:
        ks.wait_for("ks_started")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        sock.chmod(0o666)
        for words in (["crypto", "gdoi", "ks", "rekey"], ["reload"], ["show", "gdoid", "counters"]):
            answer = _as_user(sock, words, NOBODY, NOBODY)
            assert answer.get("error") == PERMISSION_DENIED, (words, answer)
        ks.wait_for(r"control_permission_denied.*uid=65534")
        assert "GROUPKEY-PUSH" not in ks.text() and "KS_SEND_UNICAST_REKEY" not in ks.text()
        assert gdoictl(sock, "crypto", "gdoi", "ks", "rekey").returncode == 0


async def test_control_daemon_user_allowed_others_denied(shared_dir: Path) -> None:
    """The daemon's own (non-root) user is allowed, another uid is not: a ControlServer
    whose daemon user is 65534, as ``gdoid`` run by that user would have."""
    calls: list[tuple[str, ...]] = []

    async def handler(req: Any) -> ControlResponse:
        calls.append(req.command)
        return ControlResponse(ok=True, output="done\n")

    sock = shared_dir / "d.sock"
    async with ControlServer(sock, handler, ControlAccess(owner_uid=NOBODY)):
        sock.chmod(0o666)
        loop = asyncio.get_running_loop()
        mine = await loop.run_in_executor(None, _as_user, sock, ["reload"], NOBODY, NOBODY)
        other = await loop.run_in_executor(None, _as_user, sock, ["reload"], NOBODY - 1, NOBODY - 1)
    assert mine["ok"] is True and mine["output"] == "done\n"
    assert other["error"] == PERMISSION_DENIED
    assert calls == [("reload",)]
