"""One KeyServerEngine and GroupMemberEngines wired together in memory (:class:`Net`).

Key files: the ``files`` fixture (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.config.model import GmConfig, KsConfig
from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth, sa_ipsec
from gdoid.groupmember.engine import GroupMemberEngine
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.pki import load_private_key

KS = "127.0.0.1"
GM = "127.0.0.2"
T0 = 3_000_000.0
GROUP = 1234
# Two SAs (GCM and CBC) on different selectors, one KS and its GMs on loopback.
SAS = (
    ("esp-gcm-256", "10.1.0.0/16", "10.2.0.0/16"),
    ("esp-cbc-128-sha256", "10.3.0.0/16", "10.4.0.0/16"),
)


def ks_text(lifetime: int = 3600, **group: object) -> str:
    """The KS config of these tests; ``group`` adds keys to its group (e.g. ``sender_id_bits``)."""
    sas = [
        sa_ipsec(n, transform=t, lifetime=lifetime, src=src, dst=dst)
        for n, (t, src, dst) in enumerate(SAS, 1)
    ]
    return ks_config(
        KS,
        software_version="1.0.2",
        auth=psk_auth("127.0.0.0/8", "psk"),
        groups=[ks_group(number=GROUP, sas=sas, **group)],
    )


def gm_text(
    address: str = GM, version: str = "1.0.2", servers: tuple[str, ...] = (KS,), group: int = GROUP
) -> str:
    """The config of a GM of group ``group`` registering with ``servers``."""
    return gm_config(
        address,
        software_version=version,
        auth=psk_auth("127.0.0.0/8", "psk"),
        groups=[gm_group(servers, number=group)],
    )


def make_ks(base: Path, now: float = T0, lifetime: int = 3600, **kw: object) -> KeyServerEngine:
    cfg: KsConfig = parse_ks_config(ks_text(lifetime), base)
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
    cfg: GmConfig = parse_gm_config(gm_text(address, version, servers), base)
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
