"""Cooperative key servers in an in-memory network: :class:`Sim` and its helpers.

Three KS engines (10.0.8.1 / 10.0.9.1 / 10.0.10.1, priorities 100 / 75 / 50)
and GM engines on 10.0.0.x exchange datagrams through :class:`Sim`: a queue
with a simulated clock, and a ``blocked`` set of address pairs for
partitions and dead nodes.  No sockets.  Key files: the ``files`` fixture
(tests/conftest.py).
"""

from __future__ import annotations

from collections import deque
from ipaddress import IPv4Address
from pathlib import Path

from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth, sa_ipsec
from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.keyserver.coop import Coop
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.constants import ExchangeType
from gdoid.protocol.gdoi_payloads import Role
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.pki import load_private_key
from gdoid.protocol.version import SoftwareVersion
from tests.recorder import Events

T0 = 5_000_000.0
M0 = 700.0  # the monotonic clock: unrelated to the wall clock, as on a real host
GROUP = 1234
PERIOD = 1.0
STEP = 0.25
KS1, KS2, KS3 = "10.0.8.1", "10.0.9.1", "10.0.10.1"
KSS = (KS1, KS2, KS3)
PRIORITY = {KS1: 100, KS2: 75, KS3: 50}
ELECTED_WITHIN = 2 * PERIOD + 2 * STEP
FAILOVER_WITHIN = 3 * PERIOD + 3 * STEP
# Two SAs (GCM and CBC) on different selectors; GMs on 10.0.0.x with the PSK in "psk".
SAS = (
    ("esp-gcm-256", "10.1.0.0/16", "10.2.0.0/16"),
    ("esp-cbc-128-sha256", "10.3.0.0/16", "10.4.0.0/16"),
)


def ks_text(
    address: str,
    *,
    priority: int | None = None,
    version: str = "1.0.2",
    peers: list[dict[str, object]] | None = None,
    psk: str = "coop.psk",
    gm_psk: str = "psk",
    gm_prefix: str = "10.0.0.0/8",
    signing_key: str = "rekey.key",
    pki: dict[str, str] | None = None,
) -> str:
    """The config of cooperative KS ``address``: its peers are the other KSS (COOP key ``psk``)
    unless ``peers`` are given; ``pki`` adds an ``[auth.pki]`` table."""
    if peers is None:
        peers = [{"address": a, "psk_file": psk} for a in KSS if a != address]
    auth = psk_auth(gm_prefix, gm_psk)
    if pki:
        auth["pki"] = pki
    sas = [sa_ipsec(n, transform=t, src=src, dst=dst) for n, (t, src, dst) in enumerate(SAS, 1)]
    return ks_config(
        address,
        software_version=version,
        auth=auth,
        groups=[ks_group(number=GROUP, sender_id_bits=12, signing_key=signing_key, sas=sas)],
        coop={
            "priority": priority or PRIORITY[address],
            "announce_interval": PERIOD,
            "peer": peers,
        },
    )


def gm_text(address: str, servers: tuple[str, ...]) -> str:
    """The config of a GM at ``address`` registering with ``servers`` in order."""
    return gm_config(
        address,
        software_version="1.0.2",
        auth=psk_auth("10.0.0.0/8", "psk"),
        groups=[gm_group(servers, number=GROUP)],
    )


Node = KeyServerEngine | GroupMemberEngine


class Sim:
    """address -> engine; a FIFO of datagrams; simulated clocks; blocked address pairs."""

    def __init__(self, base: Path, now: float = T0) -> None:
        self.base = base
        self.now = now  # wall clock
        self.mono = M0  # monotonic clock: advances with ``now`` except when the wall clock jumps
        self.nodes: dict[str, Node] = {}
        self.blocked: set[frozenset[str]] = set()
        self.queue: deque[tuple[bytes, str, str]] = deque()
        self.tap: list[tuple[bytes, str, str]] = []  # every datagram delivered
        self.lost = 0
        self.roles: dict[str, list[Role | None]] = {}  # role history per KS

    # --- nodes ------------------------------------------------------------------------

    def add_ks(
        self,
        address: str,
        priority: int | None = None,
        psk: str = "coop.psk",
        version: str = "1.0.2",
    ) -> KeyServerEngine:
        # Each KS pair proves a COOP key of its own, not the GMs' (issue 9 §2).
        return self.start_ks(address, ks_text(address, priority=priority, psk=psk, version=version))

    def start_ks(self, address: str, text: str, logger: object | None = None) -> KeyServerEngine:
        """A cooperative KS engine at ``address`` from config ``text`` (scheduled rekeys off)."""
        cfg = parse_ks_config(text, self.base)
        assert cfg.coop is not None
        p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version, coop=cfg.coop)
        groups = {
            g.number: Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, self.now)
            for g in cfg.groups
        }
        engine = KeyServerEngine(p1, groups, logger=logger or Events())  # type: ignore[arg-type]
        coop = Coop(cfg.coop, cfg.address, cfg.software_version, engine.phase1, engine, self.now)
        engine.coop = coop
        engine.scheduled_rekeys = False
        history: list[Role | None] = []
        self.roles[address] = history
        coop.on_role_change = lambda: history.append(coop.role)
        self.nodes[address] = engine
        return engine

    def add_gm(self, address: str, servers: tuple[str, ...]) -> GroupMemberEngine:
        cfg = parse_gm_config(gm_text(address, servers), self.base)
        p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
        gm = GroupMemberEngine(cfg.address, cfg.groups, p1, logger=Events())
        self.nodes[address] = gm
        return gm

    def ks(self, address: str) -> KeyServerEngine:
        node = self.nodes[address]
        assert isinstance(node, KeyServerEngine)
        return node

    def coop(self, address: str) -> Coop:
        c = self.ks(address).coop
        assert c is not None
        return c

    # --- network ----------------------------------------------------------------------

    def cut(self, side_a: tuple[str, ...], side_b: tuple[str, ...]) -> None:
        self.blocked |= {frozenset((a, b)) for a in side_a for b in side_b}

    def isolate(self, address: str) -> None:
        self.cut((address,), tuple(a for a in self.nodes if a != address))

    def heal(self) -> None:
        self.blocked.clear()

    def send(self, src: str, out: list[tuple[bytes, tuple[str, int]]]) -> None:
        self.queue.extend((data, src, dst[0]) for data, dst in out)
        self.deliver()

    def deliver(self) -> None:
        while self.queue:
            data, src, dst = self.queue.popleft()
            node = self.nodes.get(dst)
            if node is None or frozenset((src, dst)) in self.blocked:
                self.lost += 1
                continue
            self.tap.append((data, src, dst))
            out = node.datagram_received(data, (src, 848), self.now, self.mono)
            self.queue.extend((d, dst, to[0]) for d, to in out)

    def tick(self) -> None:
        self.now += STEP
        self.mono += STEP
        for address, node in list(self.nodes.items()):
            self.queue.extend((d, address, to[0]) for d, to in node.on_timer(self.now, self.mono))
        self.deliver()

    def run(self, seconds: float) -> None:
        end = self.now + seconds - 1e-9
        while self.now < end:
            self.tick()

    def run_until(self, done: object, limit: float) -> float:
        """Tick until ``done()`` holds; return the simulated seconds it took."""
        start = self.now
        while not done():  # type: ignore[operator]
            assert self.now - start < limit, f"not done within {limit} s"
            self.tick()
        return self.now - start

    # --- views ------------------------------------------------------------------------

    def primaries(self, among: tuple[str, ...] = KSS) -> list[str]:
        return [a for a in among if a in self.nodes and self.coop(a).is_primary]

    def group(self, address: str) -> Group:
        return self.ks(address).groups[GROUP]

    def ks_keys(self, address: str) -> tuple[bytes, frozenset[int]]:
        g = self.group(address)
        return g.kek.spi, frozenset(t.spi for t in g.teks)

    def gm(self, address: str) -> GroupMemberEngine:
        node = self.nodes[address]
        assert isinstance(node, GroupMemberEngine)
        return node

    def register(self, gm_address: str, ks_address: str) -> GroupMemberEngine:
        gm = self.add_gm(gm_address, (ks_address,))
        self.send(gm_address, gm.start(self.now, self.mono))
        reg = gm.registrations[GROUP]
        assert reg.state == RegState.REGISTERED, reg.last_failure
        assert reg.registered_ks == IPv4Address(ks_address)
        return gm

    def anns(self, src: str | None = None, dst: str | None = None) -> list[bytes]:
        return [
            d
            for d, s, t in self.tap
            if IsakmpHeader.decode(d).exchange_type == ExchangeType.COOP_ANN
            and (src is None or s == src)
            and (dst is None or t == dst)
        ]


def events(node: Node) -> list[str]:
    assert isinstance(node.log, Events)
    return node.log.names


def gm_keys(gm: GroupMemberEngine) -> tuple[bytes | None, frozenset[int]]:
    g = gm.sadb.groups[GROUP]
    return (g.kek.spi if g.kek else None), frozenset(g.teks)


def member_table(
    g: Group,
) -> dict[IPv4Address, tuple[str, SoftwareVersion | None, float, tuple[int, ...]]]:
    return {a: (m.identity, m.version, m.registered_at, m.sender_ids) for a, m in g.members.items()}


def elected(files: Path) -> Sim:
    """Three KSs started together, an election held, KS1 primary and everyone in sync."""
    sim = Sim(files)
    for a in KSS:
        sim.add_ks(a)
    sim.run_until(
        lambda: sim.primaries() == [KS1] and all(sim.coop(a).serving for a in KSS),
        ELECTED_WITHIN + PERIOD,
    )
    return sim


def assert_converged(sim: Sim, kss: tuple[str, ...] = KSS) -> None:
    keys = {a: sim.ks_keys(a) for a in kss}
    assert len(set(keys.values())) == 1, keys
    seqs = {a: sim.group(a).seq for a in kss}
    assert len(set(seqs.values())) == 1, seqs
    tables = [member_table(sim.group(a)) for a in kss]
    assert all(t == tables[0] for t in tables), tables


def restart(sim: Sim, address: str) -> KeyServerEngine:
    """The KS process comes back with fresh state (a new engine on the same address)."""
    sim.blocked = {pair for pair in sim.blocked if address not in pair}
    return sim.add_ks(address)
