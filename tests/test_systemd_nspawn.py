"""The systemd units under a real systemd: a Debian bookworm root booted by systemd-nspawn.

The project is installed in it by running docs/deploy.md's "Install" block as written
(pip reads a wheelhouse built on the host instead of an index), then the units are
started, reloaded, stopped, watchdog-killed and misconfigured, and the journal and the
unit state are checked with systemctl/journalctl inside the container (entered with
nsenter: ``--register=no`` leaves machinectl/systemd-run without the machine).

The container has its own network namespace (``--private-network``): its UDP 848 and
its routes are its own.  The rootfs is cached by tests/systemd/make-root.sh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth

REPO = Path(__file__).resolve().parent.parent
MAKE_ROOT = REPO / "tests" / "systemd" / "make-root.sh"
NEEDS = ("systemd-nspawn", "nsenter", "debootstrap", "tar")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in NEEDS),
        reason=f"needs {', '.join(NEEDS)} (apt-get install systemd-container debootstrap)",
    ),
]

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The configs the units run with (paths inside the container).
KS_TOML = ks_config(
    "127.0.0.1",
    control_socket="/run/gdoid/ks.sock",
    state_dir="/var/lib/gdoid/ks",
    keylog_dir="/var/lib/gdoid/ks/keylog",
    auth=psk_auth("127.0.0.0/8", "psk.secret"),
    groups=[ks_group()],
)
GM_TOML = gm_config(
    "127.0.0.2",
    control_socket="/run/gdoid/gm.sock",
    keylog_dir="/var/lib/gdoid/gm/keylog",
    registration_timeout=1.0,
    auth=psk_auth("127.0.0.0/8", "psk.secret"),
    dataplane={"enabled": True},
    groups=[gm_group(["127.0.0.1"])],
)


def _unit_block(doc: Path, heading: str) -> list[str]:
    """The command lines of the first ```sh block after ``heading``."""
    text = doc.read_text()
    start = text.index(heading)
    body = text[text.index("```sh\n", start) + 6 :]
    body = body[: body.index("```")]
    return [
        line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


class Container:
    """systemd as PID 1 in ``root``, booted by systemd-nspawn; commands via nsenter."""

    def __init__(self, root: Path, console_log: Path) -> None:
        self.root = root
        self.systemctl_lines: list[str] = []  # docs/deploy.md's, run by the first test
        self.console_log = console_log.open("wb")
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "-q",
                "-b",
                "-D",
                str(root),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.console_log,
            stderr=subprocess.STDOUT,
        )
        self.pid1 = self._find_init()
        # Until boot finished (degraded is fine): systemd-tmpfiles empties /tmp during boot.
        # --wait alone fails at once while PID 1's socket is not up yet.
        self.wait(
            "the container's boot",
            lambda: (
                self.sh(
                    "systemctl is-system-running --wait", check=False, timeout=60
                ).stdout.strip()
                in ("running", "degraded")
            ),
            timeout=60,
        )

    def _find_init(self) -> int:
        # nspawn forks the container's init: wait for that child to appear (bounded).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"systemd-nspawn exited {self.proc.returncode}; see {self.console_log.name}"
                )
            for child in (
                Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            ):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            time.sleep(0.05)
        raise AssertionError("the container's systemd never started")

    def sh(
        self, script: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.pid1),
                "-a",
                "--",
                "/usr/bin/env",
                "-i",
                f"PATH={PATH}",
                "LANG=C.UTF-8",
                "/bin/sh",
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            journal = (
                self.sh("journalctl -n 40 --no-pager", check=False).stdout
                if "systemctl" in script
                else ""
            )
            raise AssertionError(
                f"{script!r} exited {res.returncode}:\n{res.stdout}\n{res.stderr}\n{journal}"
            )
        return res

    def prop(self, unit: str, name: str) -> str:
        return self.sh(f"systemctl show -P {name} {unit}").stdout.strip()

    def journal(self, unit: str, *args: str) -> list[dict[str, str]]:
        out = self.sh(f"journalctl -u {unit} -o json --no-pager {' '.join(args)}").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait(self, what: str, probe: object, timeout: float = 30) -> None:
        """Poll a condition that lives in another process (systemd) at 0.1 s."""
        deadline = time.monotonic() + timeout
        while not probe():  # type: ignore[operator]  # probe is a callable
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid1, signal.SIGRTMIN + 4)  # systemd: poweroff
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.console_log.close()


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    # Not under pytest's basetemp: concurrent pytest runs prune old basetemps, and this
    # tree is in use by a booted container for the whole module.
    tmp = Path(tempfile.mkdtemp(prefix="gdoid-nspawn-", dir="/var/tmp"))
    try:
        yield from _boot(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _boot(tmp: Path) -> Iterator[Container]:
    tarball = subprocess.run([str(MAKE_ROOT)], capture_output=True, text=True, timeout=900)
    assert tarball.returncode == 0, tarball.stderr
    root = tmp / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", tarball.stdout.strip()], check=True)
    root.chmod(0o755)  # "/" of the booted system: the gdoid user must reach it
    # A checkout (what docs/deploy.md's block runs in) and a wheelhouse for pip.
    src = root / "root" / "gdoid"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".venv", "wheels")
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("gdoid", "docs", "systemd"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    wheels = root / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--wheel-dir",
            str(wheels),
            str(REPO),
            "setuptools",
            "wheel",
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    box = Container(root, tmp / "console.log")
    try:
        lines = _unit_block(REPO / "docs" / "deploy.md", "### Install")
        setup = [line for line in lines if not line.startswith("systemctl")]
        for line in setup:  # one by one: "a && b" would hide a failing "a" from set -e
            box.sh(
                "cd /root/gdoid; export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; " + line, timeout=600
            )
        # The configuration the block's comment asks for: owned by gdoid, keys 0600.
        etc = root / "etc" / "gdoid"
        (etc / "ks.toml").write_text(KS_TOML)
        (etc / "gm.toml").write_text(GM_TOML)
        box.sh(
            "set -e; cd /etc/gdoid; gdoid lab --export /tmp/lab >/dev/null;"
            " cp /tmp/lab/psk.secret /tmp/lab/rekey.key .; chmod 0600 psk.secret rekey.key;"
            " chown -R gdoid:gdoid /etc/gdoid"
        )
        # A host's udev makes /dev/net/tun 0666 (50-udev-default.rules); nspawn's copy is
        # 0600 root, which the gdoid user (capabilities, no DAC override) cannot open.
        box.sh("chmod 0666 /dev/net/tun")
        box.systemctl_lines = [line for line in lines if line.startswith("systemctl")]
        yield box
    finally:
        box.close()


def test_install_start_ready_with_routes_and_health(box: Container) -> None:
    # The block's systemctl lines: enable --now returns once READY=1 came.
    for line in box.systemctl_lines:
        box.sh(line)
    # READY=1 only once the data-path routes exist: they are there when start returns.
    routes = box.sh("ip route show table 26468").stdout
    assert "10.0.0.0/8 dev gdoi0" in routes, routes
    assert box.prop("gdoid-gm", "ActiveState") == "active"
    assert box.prop("gdoid-gm", "StatusText").startswith("registered: group GET with KS 127.0.0.1")
    assert box.prop("gdoid-ks", "StatusText") == "listening"
    for role in ("ks", "gm"):
        res = box.sh(f"gdoictl --socket /run/gdoid/{role}.sock health")
        assert res.stdout.startswith(f"{role} {'listening' if role == 'ks' else 'registered'}:")
    assert (
        "1 member(s)"
        in box.sh("gdoictl --socket /run/gdoid/ks.sock wait registered --timeout 10").stdout
    )
    # Documentation= exists after the documented install; the key log is writable.
    for unit in ("gdoid-ks", "gdoid-gm"):
        doc = box.prop(unit, "Documentation")
        assert doc == "file:/usr/share/doc/gdoid/deploy.md"
        box.sh(f"test -s {doc[len('file:') :]}")
        box.sh(f"systemd-analyze verify /etc/systemd/system/{unit}.service")
    box.sh("test -s /var/lib/gdoid/ks/keylog/ikev1_decryption_table")
    box.sh("test -s /var/lib/gdoid/gm/keylog/esp_sa")
    # /run/gdoid: 0750 group gdoid (control_group access), the socket the gdoid user's.
    assert box.sh("stat -c '%a %G' /run/gdoid").stdout.split() == ["750", "gdoid"]
    # The journal: an event without mnemonic has its details in MESSAGE.
    messages = [e["MESSAGE"] for e in box.journal("gdoid-ks")]
    assert any(
        m.startswith("ks_started address=127.0.0.1 port=848 groups=GET") for m in messages
    ), messages
    regs = [e for e in box.journal("gdoid-ks") if e.get("GDOI_MNEMONIC") == "GDOI-5-KS_REGS_COMPL"]
    assert regs and regs[0]["PRIORITY"] == "5" and regs[0]["GDOI_GM"] == "127.0.0.2"


def test_reload_gm_keeps_it_running_and_ks_reload_reports_failure(box: Container) -> None:
    box.sh("systemctl is-active gdoid-gm gdoid-ks")
    pid = box.prop("gdoid-gm", "MainPID")
    box.sh("systemctl reload gdoid-gm")
    assert (
        box.prop("gdoid-gm", "MainPID") == pid and box.prop("gdoid-gm", "ActiveState") == "active"
    )
    assert any(e["MESSAGE"].startswith("reload_config_unchanged") for e in box.journal("gdoid-gm"))
    box.sh("gdoictl --socket /run/gdoid/gm.sock health")  # still registered
    # SIGHUP (docker kill -s HUP, kill -HUP) does the same and does not kill the GM.
    box.sh(f"kill -HUP {pid}")
    box.wait(
        "the GM's second reload line",
        lambda: (
            sum(e["MESSAGE"].startswith("reload_config_unchanged") for e in box.journal("gdoid-gm"))
            == 2
        ),
    )
    assert box.prop("gdoid-gm", "MainPID") == pid
    # KS: unchanged, then broken: the reload fails, the KS keeps running unchanged.
    box.sh("systemctl reload gdoid-ks")
    assert box.prop("gdoid-ks", "StatusText").startswith("reloaded: configuration unchanged")
    box.sh("cp /etc/gdoid/ks.toml /tmp/ks.good; echo 'bogus = ' >> /etc/gdoid/ks.toml")
    try:
        res = box.sh("systemctl reload gdoid-ks", check=False)
        assert res.returncode != 0
        assert box.prop("gdoid-ks", "StatusText").startswith(
            "reload failed, running configuration unchanged: "
        )
        assert box.prop("gdoid-ks", "ActiveState") == "active"
    finally:
        box.sh("cp /tmp/ks.good /etc/gdoid/ks.toml")
    errors = box.journal("gdoid-ks", "-p", "err")
    assert any(e["MESSAGE"].startswith("reload_failed error=") for e in errors)


def test_watchdog_restarts_a_hung_ks(box: Container) -> None:
    dropin = box.root / "etc/systemd/system/gdoid-ks.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "watchdog.conf").write_text("[Service]\nWatchdogSec=2\nTimeoutAbortSec=1\n")
    try:
        box.sh("systemctl daemon-reload && systemctl restart gdoid-ks")
        pid = box.prop("gdoid-ks", "MainPID")
        restarts = int(box.prop("gdoid-ks", "NRestarts"))
        box.sh(f"kill -STOP {pid}")  # a hung event loop: no WATCHDOG=1 any more
        box.wait(
            "the watchdog restart",
            lambda: (
                box.prop("gdoid-ks", "MainPID") not in ("0", pid)
                and box.prop("gdoid-ks", "ActiveState") == "active"
            ),
            timeout=30,
        )
        assert int(box.prop("gdoid-ks", "NRestarts")) == restarts + 1
        assert "Watchdog timeout" in box.sh("journalctl -u gdoid-ks --no-pager").stdout
    finally:
        (dropin / "watchdog.conf").unlink()
        box.sh("systemctl daemon-reload && systemctl restart gdoid-ks")
    box.sh("gdoictl --socket /run/gdoid/gm.sock wait ready --timeout 60")


def test_stop_logs_shutdown_and_removes_routes(box: Container) -> None:
    box.sh("systemctl stop gdoid-gm")
    assert any(e["MESSAGE"] == "shutdown signal=SIGTERM" for e in box.journal("gdoid-gm"))
    assert "26468" not in box.sh("ip rule").stdout
    assert box.sh("ip route show table 26468").stdout.strip() == ""


def test_no_ks_status_per_attempt_and_config_error_stops_restarting(box: Container) -> None:
    box.sh("systemctl stop gdoid-ks gdoid-gm")
    box.sh("systemctl start --no-block gdoid-gm")
    try:
        # Activating, with each failed attempt in STATUS= (systemctl status shows it).
        box.wait(
            "a STATUS line with failed attempts",
            lambda: (
                re.search(
                    r"gm registering: group GET: \w+ with KS 127\.0\.0\.1, [2-9]\d* failed attempt",
                    box.prop("gdoid-gm", "StatusText"),
                )
                is not None
            ),
        )
        assert box.prop("gdoid-gm", "ActiveState") == "activating"
        assert box.prop("gdoid-gm", "TimeoutStartUSec") == "3min"
    finally:
        box.sh("systemctl stop gdoid-gm")
    # A configuration error: exit 2, logged at error priority, no restart loop.
    box.sh("cp /etc/gdoid/gm.toml /tmp/gm.good; echo '[gm.nonsense]' >> /etc/gdoid/gm.toml")
    try:
        box.sh("systemctl reset-failed gdoid-gm; systemctl start gdoid-gm", check=False)
        box.wait("gdoid-gm failed", lambda: box.prop("gdoid-gm", "ActiveState") == "failed")
        assert box.prop("gdoid-gm", "ExecMainStatus") == "2"
        assert box.prop("gdoid-gm", "NRestarts") == "0"
        errors = box.journal("gdoid-gm", "-p", "err")
        assert any(e["MESSAGE"].startswith("startup_failed error=") for e in errors), errors
    finally:
        box.sh("cp /tmp/gm.good /etc/gdoid/gm.toml; systemctl reset-failed gdoid-gm")
