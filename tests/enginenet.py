"""One KeyServerEngine and GroupMemberEngines wired together in memory (:class:`Net`).

Key files: the ``files`` fixture (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gdoid.config import GmConfig, KsConfig, parse_gm_config, parse_ks_config
from gdoid.groupmember.engine import GroupMemberEngine
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.pki import load_private_key

KS = "127.0.0.1"
GM = "127.0.0.2"
T0 = 3_000_000.0
GROUP = 1234
KS_TOML = """
[ks]
address = "127.0.0.1"
software_version = "1.0.2"
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
transform = "esp-gcm-256"
lifetime = {lifetime}
[group.sa_ipsec.match]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
[[group.sa_ipsec]]
number = 2
profile = "gdoi-p"
transform = "esp-cbc-128-sha256"
lifetime = {lifetime}
[group.sa_ipsec.match]
src = "10.3.0.0/16"
dst = "10.4.0.0/16"
"""
GM_TOML = """
[gm]
address = "{address}"
software_version = "{version}"
[[auth.psk]]
peer = "127.0.0.0/8"
key_file = "psk"
[[group]]
name = "GET"
number = 1234
servers = [{servers}]
"""


def make_ks(base: Path, now: float = T0, lifetime: int = 3600, **kw: object) -> KeyServerEngine:
    cfg: KsConfig = parse_ks_config(KS_TOML.format(lifetime=lifetime), base)
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    groups = {
        g.number: Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, now)
        for g in cfg.groups
    }
    return KeyServerEngine(p1, groups, **kw)  # type: ignore[arg-type]


def make_gm(
    base: Path,
    *,
    address: str = GM,
    version: str = "1.0.2",
    servers: tuple[str, ...] = (KS,),
    **kw: object,
) -> GroupMemberEngine:
    text = GM_TOML.format(
        address=address, version=version, servers=", ".join(f'"{s}"' for s in servers)
    )
    cfg: GmConfig = parse_gm_config(text, base)
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    return GroupMemberEngine(cfg.address, cfg.groups, p1, **kw)  # type: ignore[arg-type]


@dataclass
class Net:
    """Delivers datagrams between one KS engine and any number of GM engines."""

    ks: KeyServerEngine
    gms: dict[str, GroupMemberEngine]
    drop: Callable[[bytes, tuple[str, int], tuple[str, int]], bool] = lambda *_: False
    lost: int = 0

    def run(self, sends: list[tuple[bytes, tuple[str, int]]], src: str, now: float) -> None:
        queue = [(d, (src, 848), dst) for d, dst in sends]
        while queue:
            data, frm, to = queue.pop(0)
            if self.drop(data, frm, to):
                self.lost += 1
                continue
            if to[0] == KS:
                out = self.ks.datagram_received(data, frm, now)
                queue += [(d, (KS, 848), dst) for d, dst in out]
            elif to[0] in self.gms:
                out = self.gms[to[0]].datagram_received(data, frm, now)
                queue += [(d, (to[0], 848), dst) for d, dst in out]
            else:
                self.lost += 1  # nobody there


def register(ks: KeyServerEngine, gm: GroupMemberEngine, now: float = T0) -> Net:
    net = Net(ks, {str(gm.address): gm})
    net.run(gm.start(now), str(gm.address), now)
    return net
