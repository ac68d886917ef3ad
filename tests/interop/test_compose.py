"""Interop tests: the compose topologies of compose/ on a real Docker engine.

A session fixture runs ``compose/build-base.sh`` once (debootstrap'd base image,
host-built wheels, offline ``docker build``; cached after the first run).  Each
test brings a topology up, waits (polling the daemons' control sockets with a
deadline) until the group is formed, checks it, and always tears it down with
``docker-compose down -v``.  The capture of the last run stays in
``compose/<topology>/capture/`` for post-mortems.

Skipped when docker / docker-compose are missing or the engine cannot be
reached, or with ``GDOID_SKIP_INTEROP=1``.  ``GDOID_IMAGE`` names the gdoid
image that build-base.sh builds and the daemons run (default ``gdoid:latest``);
``GDOID_SKIP_BUILD=1`` skips build-base.sh and uses the images as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
BASE_IMAGE = os.environ.get("GDOID_BASE_IMAGE", "gdoid-base:bookworm")

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _docker_usable() -> str | None:
    """Why the interop tests cannot run here, or None."""
    if os.environ.get("GDOID_SKIP_INTEROP") == "1":
        return "GDOID_SKIP_INTEROP=1"
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io docker-compose)"
    ok = subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    if not ok and (os.geteuid() != 0 or shutil.which("dockerd") is None):
        return (
            "the Docker engine is not running and cannot be started here (needs root and dockerd)"
        )
    return None


_WHY_NOT = _docker_usable()
if _WHY_NOT is not None:
    pytestmark.append(pytest.mark.skip(reason=f"compose interop tests need Docker: {_WHY_NOT}"))


@pytest.fixture(scope="session")
def images() -> None:
    """Build gdoid-base:bookworm, the wheelhouse and gdoid:latest once per session
    (``GDOID_SKIP_BUILD=1``: use the images as they are)."""
    if os.environ.get("GDOID_SKIP_BUILD") == "1":
        return
    start = time.monotonic()
    proc = subprocess.run(
        [str(COMPOSE_DIR / "build-base.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        # Build the wheels with the interpreter under test (it has pip; Debian's python3 may not).
        env={**os.environ, "PYTHON": sys.executable},
    )
    if proc.returncode != 0:
        pytest.fail(f"compose/build-base.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"build-base.sh: {time.monotonic() - start:.0f} s")


class Topology:
    """``docker-compose`` in one compose/<name> directory."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = COMPOSE_DIR / name
        self.capture = self.dir / "capture"

    def compose(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["docker-compose", "--ansi", "never", *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} failed ({proc.returncode}) in {self.dir}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{self.logs()}"
            )
        return proc

    def exec(
        self, service: str, *cmd: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *cmd, timeout=timeout, check=check)

    def ctl(self, service: str, *words: str) -> Any:
        """``gdoictl --json WORDS`` in a daemon container; None while it does not answer."""
        proc = self.exec(service, "gdoictl", "--json", "--timeout", "3", *words, check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout)

    def logs(self, *services: str) -> str:
        proc = subprocess.run(
            ["docker-compose", "--ansi", "never", "logs", "--no-color", "--tail", "60", *services],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout[-8000:]

    def exited_daemons(self, services: tuple[str, ...]) -> list[str]:
        """Daemon services whose container is no longer running."""
        dead = []
        for svc in services:
            cid = self.compose("ps", "-q", svc, check=False).stdout.strip()
            if not cid:
                dead.append(f"{svc} (no container)")
                continue
            state = subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", cid],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            if not state.startswith("running"):
                dead.append(f"{svc} ({state})")
        return dead

    def wait_for(
        self,
        what: str,
        probe: Callable[[], tuple[bool, Any]],
        daemons: tuple[str, ...],
        timeout: float = 60,
    ) -> Any:
        """Poll ``probe`` until it reports success; fail at once if a daemon exits."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            ok, last = probe()
            if ok:
                return last
            dead = self.exited_daemons(daemons)
            if dead:
                pytest.fail(
                    f"{self.name}: {', '.join(dead)} exited while waiting for {what}:\n{self.logs()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: no {what} within {timeout:g} s (last: {last!r}):\n{self.logs()}"
                )
            time.sleep(0.5)

    def tshark(self, display_filter: str, *fields: str) -> list[list[str]]:
        """Frames of the capture matching ``display_filter``, decoded with the key log
        (WIRESHARK_CONFIG_DIR=capture/keys), run in the base image (no host tshark needed)."""
        cmd = [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{self.capture}:/capture:ro",
            "-e",
            "WIRESHARK_CONFIG_DIR=/capture/keys",
            BASE_IMAGE,
            "tshark",
            "-n",
            "-r",
            "/capture/capture.pcap",
            "-Y",
            display_filter,
            "-T",
            "fields",
        ]
        for f in fields or ("frame.number",):
            cmd += ["-e", f]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"tshark -Y {display_filter!r} failed:\n{proc.stderr[-2000:]}"
        return [line.split("\t") for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture
def topology(request: pytest.FixtureRequest, images: None) -> Iterator[Topology]:
    topo = Topology(request.param)
    topo.compose("down", "-v", "--remove-orphans", check=False)  # leftovers of an aborted run
    start = time.monotonic()
    try:
        topo.compose("up", "-d", timeout=300)
        print(f"{topo.name}: up in {time.monotonic() - start:.1f} s")
        yield topo
    finally:
        text = (topo.dir / "docker-compose.yml").read_text()
        if "fabric.sh" in text:  # remove the DOCKER-USER rules of compose/lib/fabric.sh
            bridges = re.findall(r"com\.docker\.network\.bridge\.name:\s*([\w.-]+)", text)
            topo.compose(
                "run",
                "--rm",
                "--no-deps",
                "fabric",
                "/compose-lib/fabric.sh",
                "close",
                *bridges,
                check=False,
            )
        topo.compose("down", "-v", "--remove-orphans", timeout=180, check=False)


def _members(data: Any) -> set[str]:
    if not data:
        return set()
    return {m["address"] for g in data["groups"] for m in g["members"]}


# --- basic: one KS, two GMs, a LAN host behind each ---------------------------------

BASIC_GMS = {"198.18.48.21", "198.18.48.22"}


@pytest.mark.parametrize("topology", ["basic"], indirect=True)
def test_basic_registration_ping_tcp_and_decrypted_capture(topology: Topology) -> None:
    t = topology
    daemons = ("ks", "gm1", "gm2")
    t0 = time.monotonic()

    # 1. Both GMs registered (the KS's member list, and each GM's own log line).
    t.wait_for(
        "registration of both GMs at the KS",
        lambda: (lambda m: (m >= BASIC_GMS, m))(
            _members(t.ctl("ks", "show", "crypto", "gdoi", "ks", "members"))
        ),
        daemons,
        timeout=60,
    )
    logs = t.compose("logs", "--no-color", "gm1", "gm2").stdout
    assert logs.count("%GDOI-5-GM_REGS_COMPL") >= 2, logs
    print(f"basic: both GMs registered {time.monotonic() - t0:.1f} s after up")

    # 2. LAN host A pings LAN host B through gm1 -> ESP -> gm2.
    ping = t.exec("host-a", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.48.2.10", check=False)
    assert ping.returncode == 0, (
        f"ping 10.48.2.10 from host-a failed:\n{ping.stdout}\n{ping.stderr}\n{t.logs('gm1', 'gm2')}"
    )

    # 3. TCP: host-a fetches http://10.48.2.10:8080/ from host-b's server.
    fetch = (
        "import urllib.request as u; print(u.urlopen('http://10.48.2.10:8080/', timeout=5).status)"
    )
    tcp = t.exec("host-a", "python3", "-c", fetch, check=False)
    assert tcp.returncode == 0 and tcp.stdout.strip() == "200", (
        f"TCP to host-b failed:\n{tcp.stdout}\n{tcp.stderr}"
    )

    # 4. The capture of the core network: stop tshark so the pcap is complete.
    t.compose("stop", "capture", timeout=60)
    esp = t.tshark("esp", "esp.spi")
    assert esp, "no ESP on the core network"
    # Decrypted with the key log: the inner ICMP echo request and reply, and the TCP.
    requests = t.tshark("esp && icmp.type == 8 && ip.src == 10.48.1.10 && ip.dst == 10.48.2.10")
    replies = t.tshark("esp && icmp.type == 0 && ip.src == 10.48.2.10 && ip.dst == 10.48.1.10")
    assert len(requests) >= 3 and len(replies) >= 3, (
        f"ESP did not decrypt to the ICMP echo (requests {len(requests)}, replies {len(replies)}) "
        f"with WIRESHARK_CONFIG_DIR={t.capture / 'keys'}"
    )
    assert t.tshark("esp && tcp.port == 8080"), "no decrypted TCP (port 8080) inside ESP"
    # Nothing malformed; no LAN traffic in the clear on the core.
    assert not t.tshark("_ws.malformed"), "malformed frames in the capture"
    clear = t.tshark("ip.addr == 10.48.0.0/16 && !esp", "ip.src", "ip.dst", "ip.proto")
    assert not clear, f"LAN traffic in the clear on the core network: {clear[:5]}"
    # The registrations are there too (GDOI on UDP 848 decoded as ISAKMP).
    assert t.tshark("isakmp"), "no ISAKMP/GDOI in the capture"
    print(
        f"basic: {len(esp)} ESP frames, {len(requests)} echo requests decrypted; "
        f"{time.monotonic() - t0:.1f} s after up"
    )


# --- coop: three cooperative KSs, four GMs --------------------------------------------

COOP_KSS = {"ks1": "198.18.49.11", "ks2": "198.18.49.12", "ks3": "198.18.49.13"}
COOP_GMS = {f"198.18.49.2{i}" for i in range(1, 5)}


@pytest.mark.parametrize("topology", ["coop"], indirect=True)
def test_coop_one_primary_and_all_members(topology: Topology) -> None:
    t = topology
    daemons = (*COOP_KSS, "gm1", "gm2", "gm3", "gm4")

    def roles() -> tuple[bool, Any]:
        got = {svc: t.ctl(svc, "show", "crypto", "gdoi", "ks", "coop") for svc in COOP_KSS}
        summary = {svc: (d or {}).get("role") for svc, d in got.items()}
        settled = all(r in ("Primary", "Secondary") for r in summary.values())
        return settled, (summary, got)

    summary, got = t.wait_for("a settled COOP election", roles, daemons, timeout=60)
    primaries = [svc for svc, role in summary.items() if role == "Primary"]
    assert primaries == ["ks1"], f"expected ks1 (priority 250) as the only primary: {summary}"
    assert all(d["primary"] == COOP_KSS["ks1"] for d in got.values()), got

    # Members registered at secondaries reach the primary with the announcements.
    t.wait_for(
        "all four GMs in the primary's member list",
        lambda: (lambda m: (m >= COOP_GMS, m))(
            _members(t.ctl("ks1", "show", "crypto", "gdoi", "ks", "members"))
        ),
        daemons,
        timeout=60,
    )
    assert t.compose("stop", "capture", timeout=60).returncode == 0
    assert t.tshark("isakmp"), "no ISAKMP/GDOI in the capture"
    assert not t.tshark("_ws.malformed"), "malformed frames in the capture"


# --- mixed-versions: GMs on 1.0.1 and 1.0.2 ---------------------------------------------

MIXED_GMS = {"198.18.50.21", "198.18.50.22"}


@pytest.mark.parametrize("topology", ["mixed-versions"], indirect=True)
def test_mixed_versions_feature_table(topology: Topology) -> None:
    t = topology
    daemons = ("ks", "gm1", "gm2")
    t.wait_for(
        "registration of both GMs",
        lambda: (lambda m: (m >= MIXED_GMS, m))(
            _members(t.ctl("ks", "show", "crypto", "gdoi", "ks", "members"))
        ),
        daemons,
        timeout=60,
    )
    for feature in ("gm-removal", "policy-replace"):
        out = t.exec("ks", "gdoictl", "show", "crypto", "gdoi", "feature", feature).stdout
        lines = [" ".join(line.split()) for line in out.splitlines()]
        assert "198.18.50.21 1.0.1 No" in lines, out
        assert "198.18.50.22 1.0.2 Yes" in lines, out
        assert "198.18.50.10 1.0.2 Yes" in lines, out
