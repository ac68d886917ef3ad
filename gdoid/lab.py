"""``gdoid lab``: a whole group (one KS, N GMs) on loopback, in one process.

The lab writes real config files and keys (to a temp dir, or to ``--export
DIR``) and loads them with the same code the daemons use, so an exported lab
runs unchanged as separate ``gdoid ks`` / ``gdoid gm`` processes.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gdoid.config.loader import load_gm_config, load_ks_config
from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth, sa_ipsec
from gdoid.control import ControlRequest
from gdoid.groupmember.daemon import GroupMemberDaemon
from gdoid.keyserver.daemon import KeyServerDaemon
from gdoid.protocol.constants import GDOI_PORT

KS_ADDRESS = "127.0.0.1"
GROUP_NAME = "GET"
GROUP_NUMBER = 1234


def ks_address(index: int) -> str:
    """KS ``index`` (1-based): the first on 127.0.0.1, the others on 127.0.1.N."""
    if not 1 <= index <= 250:
        raise ValueError("the lab supports 1 to 250 KSs")
    return KS_ADDRESS if index == 1 else f"127.0.1.{index}"


def gm_address(index: int) -> str:
    """GM ``index`` (1-based) lives on 127.0.0.(index+1)."""
    if not 1 <= index <= 250:
        raise ValueError("the lab supports 1 to 250 GMs")
    return f"127.0.0.{index + 1}"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


# Loopback lab: AES-256/SHA-256 phase 1, ECP-256 or MODP-2048.
_LAB_IKE = {"ciphers": ["aes-cbc-256"], "hashes": ["sha256"], "dh_groups": [19, 14]}


def lab_ks_config(
    directory: Path, name: str, address: str, port: int, coop: dict[str, Any] | None
) -> str:
    """The config of lab KS ``name``: group GET with one GCM-256 SA, PSK auth on loopback."""
    group = ks_group(
        name=GROUP_NAME,
        number=GROUP_NUMBER,
        kek={"algorithm": "aes-cbc-256", "lifetime": 86400},
        sas=[sa_ipsec(match={"protocol": "any"})],
    )
    return ks_config(
        address,
        port=port,
        software_version="1.0.2",
        control_socket=f"{directory}/{name}.sock",
        state_dir=f"{directory}/{name}-state",
        ike=_LAB_IKE,
        auth=psk_auth("127.0.0.0/8", "psk.secret"),
        groups=[group],
        coop=coop,
        comment=f"gdoid lab key server: group {GROUP_NAME} ({GROUP_NUMBER}) on {address}:{port}",
    )


def lab_gm_config(directory: Path, index: int, port: int, servers: list[str]) -> str:
    """The config of lab GM ``index``, registering with ``servers`` in order."""
    return gm_config(
        gm_address(index),
        port=port,
        software_version="1.0.2",
        control_socket=f"{directory}/gm{index}.sock",
        tun_name=f"gdoi{index}",
        ike=_LAB_IKE,
        auth=psk_auth("127.0.0.0/8", "psk.secret"),
        groups=[gm_group(servers, name=GROUP_NAME, number=GROUP_NUMBER, server_port=port)],
        comment=f"gdoid lab group member {index}",
    )


@dataclass(frozen=True)
class LabFiles:
    directory: Path
    kss: tuple[Path, ...]
    gms: tuple[Path, ...]

    @property
    def ks(self) -> Path:
        return self.kss[0]


def export(directory: Path, gms: int = 2, port: int = GDOI_PORT, kss: int = 1) -> LabFiles:
    """Write configs and freshly generated keys for a lab of ``gms`` members."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    _write_private(directory / "psk.secret", (secrets.token_hex(24) + "\n").encode())
    if kss > 1:  # the KSs' own COOP key: a GM's PSK must not make it a KS
        _write_private(directory / "coop.psk", (secrets.token_hex(24) + "\n").encode())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(directory / "rekey.key", pem)
    addresses = [ks_address(k) for k in range(1, kss + 1)]
    ks_paths = []
    for k, addr in enumerate(addresses, 1):
        name = "ks" if kss == 1 else f"ks{k}"
        coop = None
        if kss > 1:
            peers = [
                {"address": a, "port": port, "psk_file": "coop.psk"} for a in addresses if a != addr
            ]
            coop = {"priority": 100 - 10 * (k - 1), "announce_interval": 1.0, "peer": peers}
        path = directory / f"{name}.toml"
        path.write_text(lab_ks_config(directory, name, addr, port, coop))
        ks_paths.append(path)
    gm_paths = []
    for i in range(1, gms + 1):
        # Spread the GMs: each starts with a different KS, the others as fallbacks.
        first = (i - 1) % kss
        order = addresses[first:] + addresses[:first]
        p = directory / f"gm{i}.toml"
        p.write_text(lab_gm_config(directory, i, port, order))
        gm_paths.append(p)
    return LabFiles(directory, tuple(ks_paths), tuple(gm_paths))


async def _one_primary(kss: list[KeyServerDaemon]) -> KeyServerDaemon:
    """Wait until exactly one KS is primary (role changes are events on each daemon)."""
    changed = asyncio.Event()
    for ks in kss:
        if ks.coop is not None:
            ks.coop.on_role_change = changed.set
    while True:
        primaries = [k for k in kss if k.is_primary]
        if len(primaries) == 1 and all(k.coop is None or k.coop.role is not None for k in kss):
            return primaries[0]
        changed.clear()
        await changed.wait()


async def run_lab(
    gms: int = 2,
    port: int = GDOI_PORT,
    keylog: Path | None = None,
    duration: float = 0.0,
    timeout: float = 30.0,
    kss: int = 1,
) -> int:
    with tempfile.TemporaryDirectory(prefix="gdoid-lab-") as tmp:
        files = export(Path(tmp), gms, port, kss)
        servers = [
            KeyServerDaemon(load_ks_config(p), keylog_dir=keylog, config_path=p) for p in files.kss
        ]
        members = [GroupMemberDaemon(load_gm_config(p), keylog_dir=keylog) for p in files.gms]
        for k in servers:
            await k.start()
        ks = servers[0]
        try:
            try:
                ks = await asyncio.wait_for(_one_primary(servers), timeout)
            except TimeoutError:
                print(
                    f"gdoid lab: no single primary KS elected within {timeout:g} s", file=sys.stderr
                )
                return 1
            for m in members:
                await m.start()
            waits = [asyncio.create_task(m.registered.wait()) for m in members]
            done, pending = await asyncio.wait(waits, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                missing = [
                    str(m.config.address)
                    for m, w in zip(members, waits, strict=True)
                    if w in pending
                ]
                print(
                    f"gdoid lab: {len(missing)} of {gms} GMs did not register within {timeout:g} s: "
                    f"{', '.join(missing)}",
                    file=sys.stderr,
                )
                return 1
            # COOP: members registered at secondaries reach the primary with the next ANN.
            deadline = asyncio.get_running_loop().time() + timeout
            while sum(len(g.members) for g in ks.groups.values()) < gms:
                if asyncio.get_running_loop().time() > deadline:
                    print("gdoid lab: the primary KS never learned every member", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.05)
            if duration > 0:
                await asyncio.sleep(duration)
            summary = await ks.handle(ControlRequest(("show", "crypto", "gdoi")))
            members_text = await ks.handle(
                ControlRequest(("show", "crypto", "gdoi", "ks", "members"))
            )
            print(summary.output)
            print(members_text.output)
            if kss > 1:
                coop = await ks.handle(ControlRequest(("show", "crypto", "gdoi", "ks", "coop")))
                print(coop.output)
                print(
                    f"gdoid lab: primary KS {ks.config.address}; all {gms} group members registered"
                )
            else:
                print(f"gdoid lab: all {gms} group members registered to KS {KS_ADDRESS}:{port}")
            return 0
        finally:
            for m in members:
                await m.close()
            for k in servers:
                await k.close()


# --- gdoid lab --dataplane: real ESP between namespaces --------------------------------


def dataplane_ks_config(directory: Path, transform: str) -> str:
    """The ``gdoid lab --dataplane`` KS, on the core network."""
    from gdoid import netlab

    return ks_config(
        netlab.KS,
        control_socket=f"{directory}/ks.sock",
        state_dir=f"{directory}/ks-state",
        auth=psk_auth("192.0.2.0/24", "psk.secret"),
        groups=[
            ks_group(name=GROUP_NAME, number=GROUP_NUMBER, sas=[sa_ipsec(transform=transform)])
        ],
        comment="gdoid lab --dataplane key server, on the core network",
    )


def dataplane_gm_config(directory: Path, index: int, address: str) -> str:
    """``gdoid lab --dataplane`` GM ``index``: LAN behind it, WAN on the core."""
    from gdoid import netlab

    return gm_config(
        address,
        control_socket=f"{directory}/gm{index}.sock",
        tun_name="gdoi0",
        dataplane={"enabled": True, "wan_interface": "wan"},
        auth=psk_auth("192.0.2.0/24", "psk.secret"),
        groups=[gm_group([netlab.KS], name=GROUP_NAME, number=GROUP_NUMBER)],
        comment=f"gdoid lab --dataplane group member {index}: LAN behind it, WAN on the core",
    )


def _wait_registered(sockets: list[Path], timeout: float) -> bool:
    import time

    from gdoid.control import request_sync

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = [
                request_sync(s, ControlRequest(("show", "crypto", "gdoi")), timeout=2).data[
                    "groups"
                ][0]["state"]
                for s in sockets
            ]
            if all(st == "REGISTERED" for st in states):
                return True
        except (OSError, TimeoutError, KeyError, TypeError, ValueError):
            pass  # not up yet
        time.sleep(0.2)
    return False


def run_dataplane_lab(
    pings: int = 5,
    keylog: Path | None = None,
    timeout: float = 30.0,
    transform: str = "esp-gcm-256",
) -> int:
    """hostA -- GM1 -- core(+KS) -- GM2 -- hostB in namespaces; ping A->B through the group SA."""
    import signal
    import subprocess

    from gdoid import netlab
    from gdoid.control import request_sync

    reason = netlab.netns_unavailable_reason()
    if reason is not None:
        print(f"gdoid lab --dataplane: cannot build namespaces: {reason}", file=sys.stderr)
        return 2
    netlab.remove_stale_namespaces()
    with tempfile.TemporaryDirectory(prefix="gdoid-dplab-") as tmp, netlab.Topology() as topo:
        d = Path(tmp)
        _write_private(d / "psk.secret", (secrets.token_hex(24) + "\n").encode())
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(
            d / "rekey.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        (d / "ks.toml").write_text(dataplane_ks_config(d, transform))
        for i, addr in ((1, netlab.GM1_WAN), (2, netlab.GM2_WAN)):
            (d / f"gm{i}.toml").write_text(dataplane_gm_config(d, i, addr))
        extra = ["--keylog", str(keylog)] if keylog else []
        cmd = [sys.executable, "-m", "gdoid.cli.daemon"]
        procs = [topo.popen("ks", *cmd, "ks", "--config", str(d / "ks.toml"), *extra)]
        try:
            procs += [
                topo.popen(f"gm{i}", *cmd, "gm", "--config", str(d / f"gm{i}.toml"), *extra)
                for i in (1, 2)
            ]
            sockets = [d / "gm1.sock", d / "gm2.sock"]
            if not _wait_registered(sockets, timeout):
                print("gdoid lab --dataplane: the GMs did not register", file=sys.stderr)
                return 1
            replies = topo.ping("hostA", netlab.HOST_B, count=pings)
            print(
                f"gdoid lab --dataplane: {replies} of {pings} pings from hostA {netlab.HOST_A} "
                f"to hostB {netlab.HOST_B} answered"
            )
            counters = []
            for name, sock in (("GM1", sockets[0]), ("GM2", sockets[1])):
                resp = request_sync(sock, ControlRequest(("show", "crypto", "ipsec", "sa")))
                print(f"--- {name}: show crypto ipsec sa\n{resp.output}")
                counters.append(resp.data)
            encaps = sum(sa["pkts_encaps"] for sa in counters[0]["sas"])
            decaps = sum(sa["pkts_decaps"] for sa in counters[1]["sas"])
            crossed = replies > 0 and encaps >= replies and decaps >= replies
            if replies == pings and crossed:
                print(
                    f"gdoid lab --dataplane: OK: pings crossed as ESP (GM1 encaps {encaps}, GM2 decaps {decaps})"
                )
                return 0
            print(
                f"gdoid lab --dataplane: FAILED (GM1 encaps {encaps}, GM2 decaps {decaps})",
                file=sys.stderr,
            )
            return 1
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
