"""``compose/demo.sh basic``: one command from a checkout to a decrypted capture, and back
to a clean host.

The demo builds the images only when they are missing (the interop tests usually built
them already), brings ``compose/basic`` up, waits for registration, pings and moves a file
between the LAN hosts through ESP, prints the decrypted capture summary and tears down.
The test asserts its exit status, the evidence in its output, and that the host has no
DOCKER-USER rule, bridge, container, network or volume more than before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop import hoststate

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _why_not() -> str | None:
    if os.environ.get("GDOID_SKIP_INTEROP") == "1":
        return "GDOID_SKIP_INTEROP=1"
    if os.geteuid() != 0:
        return "needs root (Docker, debootstrap)"
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "the Docker engine is not running"
    return None


@pytest.mark.skipif(_why_not() is not None, reason=f"compose demo needs Docker: {_why_not()}")
def test_demo_basic_works_and_leaves_the_host_clean() -> None:
    subprocess.run(  # an aborted earlier run: not part of the host state to compare
        ["docker-compose", "down", "-v", "--remove-orphans"],
        cwd=REPO / "compose" / "basic",
        capture_output=True,
        timeout=180,
    )
    before = hoststate.snapshot()
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "compose" / "demo.sh"), "basic"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},  # build-base.sh's wheels, if it must build
    )
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"compose/demo.sh basic failed ({proc.returncode}):\n{out[-6000:]}"
    assert "3 packets transmitted, 3 received" in out, out[-4000:]
    sums = [line.split()[-1] for line in out.splitlines() if line.strip().startswith("sha256 ")]
    assert len(sums) == 2 and sums[0] == sums[1] and len(sums[0]) == 64, sums
    for exchange in ("Main Mode", "GROUPKEY-PULL"):
        assert f"ISAKMP {exchange}" in out, out[-4000:]
    esp = next(line for line in out.splitlines() if line.startswith("ESP "))
    frames, good = int(esp.split()[1]), int(esp.split()[3])
    assert frames > 0 and good == frames and esp.endswith(" 0 bad"), esp
    left = hoststate.leftovers(before, hoststate.snapshot())
    assert not left, f"compose/demo.sh left on the host: {left}"
    print(f"compose/demo.sh basic: {took:.1f} s wall, ESP {good}/{frames} good ICV")
