"""Run the real ``gdoid`` / ``gdoictl`` console scripts as OS processes in tests.

Waiting is event-driven: :meth:`Daemon.wait_for` blocks on the daemon's log
lines (read by a thread) until one matches, with a timeout only as a guard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.configgen import (
    gm_config,
    gm_group,
    ks_config,
    ks_group,
    psk_auth,
    render_toml,
    sa_ipsec,
)
from gdoid.protocol.constants import GDOI_PORT


def _script(name: str) -> str:
    """The console script installed next to this interpreter (the venv under test)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or "")


GDOID = _script("gdoid")
GDOICTL = _script("gdoictl")


def gdoid_cmd() -> list[str]:
    return [GDOID] if GDOID else [sys.executable, "-m", "gdoid.cli.daemon"]


def gdoictl_cmd() -> list[str]:
    return [GDOICTL] if GDOICTL else [sys.executable, "-m", "gdoid.cli.gdoictl"]


def free_udp_port(address: str = "127.0.0.1") -> int:
    """A UDP port the kernel just had free on ``address`` (high, ephemeral): tests whose
    daemons only need some port use it instead of 848, so they need neither root nor the lock."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def write_private(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def write_signing_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return write_private(path, pem)


def auth_toml(
    psk_file: str | None = None, pki: dict[str, str] | None = None, peer: str = "127.0.0.0/8"
) -> str:
    """An ``[auth]`` TOML fragment (PSK entry and/or ``[auth.pki]``) for ks_toml/gm_toml."""
    auth: dict[str, Any] = psk_auth(peer, psk_file) if psk_file else {}
    if pki:
        auth["pki"] = dict(pki)
    return render_toml({"auth": auth}) if auth else ""


def toml_tables(*fragments: str) -> dict[str, Any]:
    """The tables and keys of TOML fragments (``[ike]``, ``[auth]``, ``key = value`` ...) that
    tests write as text, merged: to pass them to the gdoid.configgen builders."""
    tables: dict[str, Any] = {}
    for fragment in fragments:
        tables.update(tomllib.loads(fragment))
    return tables


def ks_toml(
    directory: Path,
    *,
    address: str = "127.0.0.1",
    port: int = GDOI_PORT,
    auth: str,
    group_number: int = 1234,
    transform: str = "esp-gcm-256",
    lifetime: int = 3600,
    ike: str = "",
    name: str = "ks",
    kek_lifetime: int = 86400,
    rekey: dict[str, float] | None = None,
) -> Path:
    """Write ``NAME.toml``: a KS with one group (one SA on 10/8), its socket and state in ``directory``."""
    tables = toml_tables(ike, auth)
    group = ks_group(
        number=group_number,
        kek={"lifetime": kek_lifetime},
        rekey=rekey or None,
        sas=[sa_ipsec(transform=transform, lifetime=lifetime)],
    )
    text = ks_config(
        address,
        port=port,
        control_socket=f"{directory}/{name}.sock",
        state_dir=f"{directory}/{name}-state",
        ike=tables.get("ike"),
        auth=tables["auth"],
        groups=[group],
    )
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def gm_toml(
    directory: Path,
    *,
    address: str,
    name: str,
    auth: str,
    servers: tuple[str, ...] = ("127.0.0.1",),
    port: int = GDOI_PORT,
    server_port: int = GDOI_PORT,
    group_number: int = 1234,
    version: str = "1.0.2",
    ike: str = "",
    registration_timeout: float = 5.0,
) -> Path:
    """Write ``NAME.toml``: a GM of one group registering with ``servers``."""
    tables = toml_tables(ike, auth)
    text = gm_config(
        address,
        port=port,
        software_version=version,
        control_socket=f"{directory}/{name}.sock",
        registration_timeout=registration_timeout,
        ike=tables.get("ike"),
        auth=tables["auth"],
        groups=[gm_group(servers, number=group_number, server_port=server_port)],
    )
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


class Daemon:
    """A ``gdoid ks|gm`` process whose log lines are collected as they come."""

    def __init__(
        self,
        role: str,
        config: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        """``prefix`` runs it through another command (``ip netns exec NS``); ``name`` is
        what failure messages call it (default: the role)."""
        self.role = name or role
        self.config = config
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*prefix, *gdoid_cmd(), role, "--config", str(config), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> str:
        """The first log line (from index ``start``) that matches ``pattern``."""
        rx = re.compile(pattern)
        seen = start

        def found() -> str | None:
            nonlocal seen
            for line in self.lines[seen:]:
                seen += 1
                if rx.search(line):
                    return line
            return None

        result: list[str] = []

        def ready() -> bool:
            line = found()
            if line is not None:
                result.append(line)
                return True
            return self.proc.poll() is not None and not self._reader.is_alive()

        with self._cond:
            self._cond.wait_for(ready, timeout)
        if not result:
            result.append(found() or "")
        if not result[0]:
            raise AssertionError(
                f"{self.role} never logged /{pattern}/ (exit {self.proc.poll()}); log:\n"
                + "\n".join(self.lines[-40:])
            )
        return result[0]

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """How many lines so far: pass it to :meth:`since` (or ``wait_for(start=)``)."""
        with self._cond:
            return len(self.lines)

    def since(self, mark: int) -> list[str]:
        with self._cond:
            return self.lines[mark:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gdoictl(
    socket: Path, *words: str, json_out: bool = False, yes: bool = False, answers: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run gdoictl; ``answers`` is typed at its [yes/no] prompts (else stdin is empty)."""
    args = [*gdoictl_cmd(), "--socket", str(socket)]
    if json_out:
        args.append("--json")
    if yes:
        args.append("--yes")
    if answers is not None:
        return subprocess.run(
            [*args, *words], capture_output=True, text=True, timeout=20, input=answers
        )
    return subprocess.run(
        [*args, *words], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    )


def gdoictl_wait(
    socket: Path, state: str = "ready", timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """``gdoictl wait registered|ready``: blocks until the daemon says so (or the timeout)."""
    return subprocess.run(
        [*gdoictl_cmd(), "--socket", str(socket), "wait", state, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 20,
        stdin=subprocess.DEVNULL,
    )


def gdoictl_json(socket: Path, *words: str) -> Any:
    res = gdoictl(socket, *words, json_out=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


class Capture:
    """tshark on ``lo`` writing a pcap, synchronised by probe datagrams to port 9.

    tshark says "Capturing on" before the kernel filter is live, so the start
    (and the end, to flush everything) is confirmed by seeing a probe of ours.
    """

    def __init__(
        self, pcap: Path, bpf: str = "udp port 848", interface: str = "lo", netns: str | None = None
    ) -> None:
        self.pcap = pcap
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(
            [
                *prefix,
                "tshark",
                "-i",
                interface,
                "-f",
                f"({bpf}) or udp port 9",
                "-w",
                str(pcap),
                "-P",
                "-l",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._seen: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.probe_target = "127.0.0.1"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._seen.append(line)
                self._cond.notify_all()

    def _probe(self, marker: str, send: Any) -> None:
        deadline = 30.0
        import time

        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            start = time.monotonic()
            while time.monotonic() - start < deadline:
                s.sendto(marker.encode(), (self.probe_target, 9))
                with self._cond:
                    if self._cond.wait_for(
                        lambda: any(f"Len={len(marker)}" in x and " 9 " in x for x in self._seen),
                        0.2,
                    ):
                        return
            raise AssertionError("tshark never saw the probe datagram")
        finally:
            s.close()

    def __enter__(self) -> Capture:
        self._probe("gdoid-start", None)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._probe("gdoid-capture-end", None)
        finally:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(20)
