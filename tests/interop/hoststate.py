"""What a compose lab may leave on the Docker host, to compare before and after a test.

:func:`snapshot` lists the host objects a topology can create: rules in the
``DOCKER-USER`` chain (iptables, or iptables-legacy when the engine uses that),
Linux bridges, and Docker containers, networks and volumes.  :func:`leftovers`
is what a later snapshot has that an earlier one had not.  Taken under the
shared test lock, anything new is ours.
"""

from __future__ import annotations

import shutil
import subprocess

HostState = dict[str, set[str]]


def _lines(*cmd: str) -> set[str] | None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


def snapshot() -> HostState:
    rules: set[str] = set()
    # The engine's backend: iptables (nft) when it has the chain, else iptables-legacy
    # (only then: listing a legacy table would load it on a host that has none).
    for ipt in ("iptables", "iptables-legacy"):
        got = _lines(ipt, "-w", "-S", "DOCKER-USER") if shutil.which(ipt) else None
        if got is not None:
            rules = {f"{ipt} {rule}" for rule in got}
            break
    bridges = {
        line.split(":")[1].strip().split("@")[0]
        for line in _lines("ip", "-o", "link", "show", "type", "bridge") or ()
    }
    return {
        "DOCKER-USER rules": rules,
        "bridges": bridges,
        "containers": _lines("docker", "ps", "-a", "--format", "{{.Names}}") or set(),
        "networks": _lines("docker", "network", "ls", "--format", "{{.Name}}") or set(),
        "volumes": _lines("docker", "volume", "ls", "--format", "{{.Name}}") or set(),
    }


def leftovers(before: HostState, after: HostState) -> HostState:
    """What ``after`` has that ``before`` had not, per kind (empty: the host is as it was)."""
    return {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind]}
