"""KeyServerEngine and GroupMemberEngine wired together in memory."""

from __future__ import annotations

import random
import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.groupmember.sadb import (
    TEK_SLT_CAP,
    TEK_SLT_FLOOR,
    Sadb,
    shortened_lifetime,
)
from gdoid.keyserver.engine import MM1_STATE_LIFETIME, KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.constants import ExchangeType
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.pki import load_private_key
from gdoid.protocol.policy import GroupKeys, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.transforms import TekTransform
from gdoid.protocol.version import SoftwareVersion
from tests.enginenet import (
    GM,
    GROUP,
    KS,
    T0,
    Net,
    gm_text,
    ks_text,
    make_gm,
    make_ks,
    register,
)

# --- registration -----------------------------------------------------------------


def test_registration_installs_the_ks_keys(files: Path) -> None:
    ks = make_ks(files)
    gm = make_gm(files)
    register(ks, gm)
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.REGISTERED
    assert reg.registered_ks == IPv4Address(KS)
    assert reg.ks_version == "1.0.2"
    group = ks.groups[GROUP]
    sas = gm.sadb.groups[GROUP]
    assert set(sas.teks) == {t.spi for t in group.teks}
    assert len(sas.teks) == 2
    assert sas.kek is not None and sas.kek.spi == group.kek.spi
    assert sas.kek.key == group.kek.key and sas.kek.iv == group.kek.iv
    for t in group.teks:
        mine = sas.teks[t.spi]
        assert mine.cipher_key == t.cipher_key and mine.integrity_key == t.integrity_key
    assert sas.seq == group.seq
    assert sas.sender_ids is not None and sas.sender_ids.values  # GCM: SIDs allocated
    member = group.members[IPv4Address(GM)]
    assert member.version == SoftwareVersion(1, 0, 2)
    assert member.kek_spi == group.kek.spi
    assert set(member.tek_spis) == set(sas.teks)
    assert member.sender_ids == sas.sender_ids.values
    assert ks.counters["registrations"] == 1
    assert ks.counters["phase1_established"] == 1
    assert gm.counters["registrations"] == 1
    assert ks.half_open == 0


def test_old_gm_version_is_recorded(files: Path) -> None:
    ks = make_ks(files)
    gm = make_gm(files, version="1.0.1")
    register(ks, gm)
    assert gm.registrations[GROUP].state == RegState.REGISTERED
    assert ks.groups[GROUP].members[IPv4Address(GM)].version == SoftwareVersion(1, 0, 1)


def test_two_gms_get_distinct_sender_ids(files: Path) -> None:
    ks = make_ks(files)
    gm1 = make_gm(files)
    gm2 = make_gm(files, address="127.0.0.3")
    register(ks, gm1)
    register(ks, gm2)
    s1 = gm1.sadb.groups[GROUP].sender_ids
    s2 = gm2.sadb.groups[GROUP].sender_ids
    assert s1 is not None and s2 is not None
    assert not set(s1.values) & set(s2.values)
    assert len(ks.groups[GROUP].members) == 2


@pytest.mark.parametrize("lost", ["MM2", "MM4", "MM6", "PULL2", "PULL4"])
def test_registration_survives_one_lost_ks_message(files: Path, lost: str) -> None:
    ks = make_ks(files)
    gm = make_gm(files)
    from_ks: list[bytes] = []
    names = ["MM2", "MM4", "MM6", "PULL2", "PULL4"]

    def drop(data: bytes, frm: tuple[str, int], to: tuple[str, int]) -> bool:
        if frm[0] != KS:
            return False
        from_ks.append(data)
        return names[len(from_ks) - 1] == lost if len(from_ks) <= len(names) else False

    net = Net(ks, {GM: gm}, drop)
    net.run(gm.start(T0), GM, T0)
    assert net.lost == 1
    assert gm.registrations[GROUP].state != RegState.REGISTERED
    now = T0
    for _ in range(3):
        now += 2.0
        net.run(gm.on_timer(now), GM, now)
        net.run(ks.on_timer(now), KS, now)
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.REGISTERED, reg.last_failure
    assert reg.failures == 0  # recovered by retransmission, not by starting over
    assert ks.counters["registrations"] == 1


def test_second_ks_tried_after_registration_timeout(files: Path) -> None:
    ks = make_ks(files)
    gm = make_gm(files, servers=("127.0.0.9", KS), registration_timeout=10.0)
    net = Net(ks, {GM: gm})
    first = gm.start(T0)
    assert [dst for _, dst in first] == [("127.0.0.9", 848)]
    net.run(first, GM, T0)  # nobody answers at .9
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.PHASE1
    # Retransmissions to the first KS before the timeout, none to the second.
    now = T0
    while now < T0 + 9.0:
        now += 1.0
        out = gm.on_timer(now)
        assert all(dst == ("127.0.0.9", 848) for _, dst in out)
        net.run(out, GM, now)
    assert reg.state == RegState.PHASE1 and reg.ks == IPv4Address("127.0.0.9")
    now = T0 + 10.0
    out = gm.on_timer(now)
    assert ("127.0.0.1", 848) in [dst for _, dst in out]
    net.run(out, GM, now)
    assert reg.state == RegState.REGISTERED
    assert reg.registered_ks == IPv4Address(KS)
    assert reg.failures == 1
    assert IPv4Address(GM) in ks.groups[GROUP].members


def test_gm_backs_off_when_every_ks_is_silent(files: Path) -> None:
    gm = make_gm(files, servers=("127.0.0.9",), registration_timeout=5.0)
    gm.start(T0)
    gm.on_timer(T0 + 5.0)
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.BACKOFF
    assert reg.retry_at is not None and reg.retry_at > T0 + 5.0
    out = gm.on_timer(reg.retry_at)
    assert reg.state == RegState.PHASE1
    assert [dst for _, dst in out] == [("127.0.0.9", 848)]


def test_gm_reports_ks_refusal(files: Path) -> None:
    """A GM asking for a group the KS does not serve fails with INVALID_ID_INFORMATION."""
    ks = make_ks(files)
    cfg = parse_gm_config(gm_text(group=4321), files)
    gm = GroupMemberEngine(
        cfg.address, cfg.groups, phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    )
    net = Net(ks, {GM: gm})
    net.run(gm.start(T0), GM, T0)
    reg = gm.registrations[4321]
    assert reg.state == RegState.BACKOFF
    assert "INVALID_ID_INFORMATION" in reg.last_failure and "received" in reg.last_failure
    assert ks.counters["registrations_failed"] == 1
    assert GROUP not in gm.sadb.groups and 4321 not in gm.sadb.groups


def test_unsupported_transform_installs_nothing(files: Path) -> None:
    """One SAT the GM cannot implement: the whole policy is refused (no partial install)."""
    ks = make_ks(files)
    group = ks.groups[GROUP]
    t = group.teks[1]
    group.teks[1] = replace(
        t,
        policy=replace(t.policy, transform=TekTransform(3, 128, t.policy.transform.integrity)),  # type: ignore[arg-type]  # an unsupported transform on purpose
    )
    gm = make_gm(files)
    register(ks, gm)
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.BACKOFF
    assert "INVALID_TRANSFORM_ID" in reg.last_failure and "sent" in reg.last_failure
    assert not gm.sadb.groups.get(GROUP) or not gm.sadb.groups[GROUP].teks
    assert IPv4Address(GM) not in group.members
    assert ks.counters["registrations"] == 0


# --- KS robustness ------------------------------------------------------------------


def test_max_half_open(files: Path) -> None:
    """A full half-open table evicts its oldest entry (issue 9 §4): newcomers are never refused."""
    ks = make_ks(files, max_half_open=2)
    p1 = make_gm(files).phase1
    replies = []
    for i in range(3):
        mm = MainModeInitiator(p1, IPv4Address(KS), T0)
        [mm1] = mm.start(T0).send
        replies.append(ks.datagram_received(mm1, (f"127.0.1.{i}", 848), T0))
    assert [len(r) for r in replies] == [1, 1, 1]
    assert ks.counters["half_open_evicted"] == 1
    assert ks.counters["half_open_refused"] == 0
    assert ks.half_open == 2
    # Unanswered message-1 state expires within seconds.
    ks.on_timer(T0 + MM1_STATE_LIFETIME)
    assert ks.half_open == 0
    assert ks.counters["half_open_expired"] == 2
    mm = MainModeInitiator(p1, IPv4Address(KS), T0 + 31)
    assert len(ks.datagram_received(mm.start(T0 + 31).send[0], ("127.0.1.9", 848), T0 + 31)) == 1


def _random_datagrams(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:  # plain noise
            out.append(rng.randbytes(rng.randrange(0, 120)))
        else:  # a well-formed header for no known exchange, then noise
            body = rng.randbytes(rng.randrange(0, 200))
            xchg = rng.choice([ExchangeType.GROUPKEY_PULL, ExchangeType.INFORMATIONAL, 2, 33, 99])
            rcky = rng.randbytes(8)  # nonzero: never a new Main Mode
            flags = rng.choice([0, 1])
            hdr = struct.pack(
                "!BBBBII",
                rng.randrange(256),
                0x10,
                xchg,
                flags,
                rng.randrange(2**32),
                HEADER_LEN + len(body),
            )
            out.append(rng.randbytes(8) + rcky + hdr + body)
    return out


def test_random_bytes_never_raise(files: Path) -> None:
    ks = make_ks(files)
    gm = make_gm(files)
    register(ks, gm)  # so there are SAs to confuse
    rng = random.Random(1)
    datagrams = _random_datagrams(rng, 500)
    before = ks.counters["dropped"]
    for d in datagrams:
        assert ks.datagram_received(d, ("127.0.0.66", 848), T0) == []
    assert ks.counters["dropped"] - before == len(datagrams)
    gm_before = gm.counters["dropped"]
    for d in datagrams:
        assert gm.datagram_received(d, (KS, 848), T0) == []
    assert gm.counters["dropped"] - gm_before == len(datagrams)
    # Still serving.
    gm2 = make_gm(files, address="127.0.0.3")
    register(ks, gm2)
    assert gm2.registrations[GROUP].state == RegState.REGISTERED


def test_random_bodies_with_live_cookies_never_raise(files: Path) -> None:
    """Noise carrying the cookies of a real phase-1 SA / half-open exchange."""
    ks = make_ks(files)
    gm = make_gm(files)
    register(ks, gm)
    assert ks.sas == {}  # a registered GM's phase-1 SA is let go at once...
    [(cookies, _mid)] = list(ks.pulls_done)  # ...keeping only what a retransmission needs
    # and a half-open exchange
    p1 = gm.phase1
    mm = MainModeInitiator(p1, IPv4Address(KS), T0)
    [mm1] = mm.start(T0).send
    ks.datagram_received(mm1, (GM, 848), T0)
    [half_open] = ks.half_open_mm1  # the cookie pair of a half-open exchange
    rcky = half_open[8:]
    rng = random.Random(2)
    for i in range(300):
        body = rng.randbytes(rng.randrange(0, 100))
        xchg = rng.choice([2, 5, 32])
        ck = cookies if i % 2 else mm.icky + rcky
        hdr = struct.pack(
            "!BBBBII",
            rng.randrange(30),
            0x10,
            xchg,
            rng.choice([0, 1]),
            rng.randrange(1, 2**32),
            HEADER_LEN + len(body),
        )
        data = ck + hdr + body
        ks.datagram_received(data, (GM, 848), T0)  # must not raise
        gm.datagram_received(data, (KS, 848), T0)
    assert ks.counters["dropped"] > 0


# --- lifetimes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "configured", "expected"),
    [
        (10_000, 600, 90),  # 5% = 30 -> 90 s floor
        (10_000, 1800, 90),  # 5% = 90 exactly
        (10_000, 3600, 180),  # 5%
        (100_000, 72_000, 3600),  # 5% = 3600 exactly
        (100_000, 86_400, 3600),  # 5% = 4320 -> 3600 s cap
        (100_000, 10**7, 3600),
        (50, 3600, 50),  # never longer than what is left
        (120, 86_400, 120),
        (0, 3600, 0),
        (89, 600, 89),
    ],
)
def test_shortened_lifetime(remaining: float, configured: float, expected: float) -> None:
    assert shortened_lifetime(remaining, configured) == expected


def test_shortened_lifetime_whole_range() -> None:
    for configured in range(60, 200_000, 997):
        for remaining in (0, 30, 89, 90, 91, 500, 3599, 3600, 3601, configured, 10**6):
            slt = shortened_lifetime(remaining, configured)
            assert slt <= remaining
            assert slt <= TEK_SLT_CAP
            assert slt >= min(remaining, TEK_SLT_FLOOR)
            assert slt == min(remaining, max(90, min(0.05 * configured, 3600)))


def _tek(spi: int, configured: int, now: float, remaining: float) -> Tek:
    policy = TekPolicy(
        1,
        TekTransform.from_name("esp-gcm-128"),
        TrafficSelector(IPv4Network("10.0.0.0/8"), IPv4Network("10.0.0.0/8")),
        configured,
    )
    return Tek(spi, policy, bytes(20), b"", now - 1, now + remaining)


def test_sadb_shorten_teks() -> None:
    sadb = Sadb()
    now = T0
    teks = (
        _tek(0x101, 86_400, now, 80_000),  # -> 3600
        _tek(0x102, 3600, now, 3000),  # -> 180
        _tek(0x103, 600, now, 500),  # -> 90
        _tek(0x104, 86_400, now, 60),  # -> 60 (already shorter)
    )
    sadb.install(GroupKeys(GROUP, None, teks, 1), None, now)
    sadb.install(GroupKeys(99, None, (_tek(0x201, 86_400, now, 80_000),), 1), None, now)
    sadb.shorten_teks(GROUP, now)
    got = {spi: t.expires_at - now for spi, t in sadb.groups[GROUP].teks.items()}
    assert got == {0x101: 3600, 0x102: 180, 0x103: 90, 0x104: 60}
    # other groups untouched, keys unchanged
    assert sadb.groups[99].teks[0x201].expires_at == now + 80_000
    assert sadb.groups[GROUP].teks[0x101].cipher_key == bytes(20)
    # expiry removes them at the new time
    assert {t.spi for t in sadb.expire(now + 90)} == {0x104, 0x103}
    assert set(sadb.groups[GROUP].teks) == {0x101, 0x102}


# --- re-registration -------------------------------------------------------------------


class _FixedRng(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999999])
def test_reregistration_in_80_to_90_percent_window(files: Path, r: float) -> None:
    ks = make_ks(files, lifetime=3600)
    gm = make_gm(files, rng=_FixedRng(r))
    now = T0 + 1000.0  # KS keys were made at T0: 2600 s left
    register(ks, gm, now)
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.REGISTERED
    assert reg.rereg_at is not None
    remaining = 2600.0
    frac = (reg.rereg_at - now) / remaining
    assert 0.8 - 1e-9 <= frac <= 0.9 + 1e-9
    assert frac == pytest.approx(0.9 - 0.1 * r)
    # Nothing before it; a new registration (Main Mode) when it comes.
    due = reg.rereg_at
    assert gm.on_timer(due - 1) == []
    out = gm.on_timer(due)
    assert len(out) == 1 and IsakmpHeader.decode(out[0][0]).exchange_type == 2
    assert reg.state == RegState.PHASE1
    # The old keys stay installed while re-registering.
    assert len(gm.sadb.groups[GROUP].teks) == 2
    Net(ks, {GM: gm}).run(out, GM, due)
    assert reg.state == RegState.REGISTERED and reg.registrations == 2
    assert ks.groups[GROUP].members[IPv4Address(GM)].registrations == 2


def test_reregistration_window_with_random_rng(files: Path) -> None:
    ks = make_ks(files, lifetime=3600)
    for seed in range(5):
        gm = make_gm(files, address=f"127.0.0.{10 + seed}", rng=random.Random(seed))
        register(ks, gm, T0)
        reg = gm.registrations[GROUP]
        assert reg.rereg_at is not None
        assert 0.8 * 3600 <= reg.rereg_at - T0 <= 0.9 * 3600


class RecordingDataplane:
    """Stands in for gdoid.dataplane.Dataplane to see what the engine installs."""

    def __init__(self) -> None:
        self.installs: list[tuple[int, set[int], float]] = []

    def install(self, group, teks, sender_ids, pseudotime_ms, now, activation_delay=0):
        self.installs.append((group, {t.spi for t in teks}, activation_delay))

    def remove_group(self, group: int) -> None:
        self.installs.append((group, set(), 0))


def test_rekeys_carry_activation_and_deactivation_delays(files: Path) -> None:
    """GAP delays reach the GM in registration and rekeys: new TEKs wait for activation,
    replaced ones go deactivation + activation seconds later."""
    cfg = parse_ks_config(ks_text(activation_delay=2, deactivation_delay=3), files)
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    g = cfg.groups[0]
    ks = KeyServerEngine(
        p1, {g.number: Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, T0)}
    )
    dp = RecordingDataplane()
    gm = make_gm(files, dataplane=dp)
    net = Net(ks, {GM: gm})
    net.run(gm.start(T0), GM, T0)
    group = gm.sadb.groups[GROUP]
    assert (group.activation_delay, group.deactivation_delay) == (2, 3)
    old = set(group.teks)
    assert dp.installs[-1] == (GROUP, old, 2)
    now = T0 + 100
    net.run(ks.rekey(ks.groups[GROUP], now), KS, now)
    new = set(group.teks) - old
    assert len(new) == 2 and dp.installs[-1] == (GROUP, old | new, 2)
    assert all(group.teks[s].expires_at == now + 2 + 3 for s in old)  # retired
    assert all(group.teks[s].expires_at > now + 3000 for s in new)
