"""Timers by deadline on the monotonic clock (issue 10 §2).

Engines get two times: ``now`` (wall clock: key lifetimes, what users see) and
``mono`` (monotonic: retransmissions, expiries of half-open and lingering
state).  Here the clocks are injected and the wall clock jumps by an hour
either way: retransmissions still fire on time, half-open state does not
expire early, and an idle KS's timer work does not touch its member table.
The shell is driven by a real UDP socket and a small engine that records its
calls: it sleeps until the next deadline, not a fixed tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import asyncio_dgram
import pytest

from gdoid.config.loader import load_gm_config, load_ks_config
from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.keyserver.engine import MM1_STATE_LIFETIME, KeyServerEngine
from gdoid.keyserver.group import Group, Member
from gdoid.phase1 import phase1_config
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.pki import load_private_key
from gdoid.protocol.push import GROUPKEY_PUSH_ACK
from gdoid.shell import UdpShell
from tests.procs import auth_toml, gm_toml, ks_toml, write_private, write_signing_key

KS = ("127.0.0.1", 848)
GM = ("127.0.0.2", 848)
T0 = 3_000_000.0  # wall clock
M0 = 500.0  # monotonic clock: unrelated to the wall clock, as on a real host
HOUR = 3600.0
DAY = 86400


class Quiet:
    def __getattr__(self, name: str):  # noqa: ANN204
        return lambda *args, **kwargs: None


@pytest.fixture
def engines(tmp_path: Path) -> tuple[KeyServerEngine, GroupMemberEngine]:
    write_private(tmp_path / "psk.secret", "timers-secret\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    # Lifetimes of days: a one-hour jump of the wall clock must not be a rekey.
    ks_cfg = load_ks_config(
        ks_toml(tmp_path, address=KS[0], auth=auth, lifetime=DAY, kek_lifetime=2 * DAY)
    )
    gm_cfg = load_gm_config(
        gm_toml(tmp_path, address=GM[0], name="gm", auth=auth, servers=(KS[0],))
    )
    groups = {
        g.number: Group(g, load_private_key(g.kek.signing_key), ks_cfg.address, ks_cfg.port, T0)
        for g in ks_cfg.groups
    }
    ks = KeyServerEngine(
        phase1_config(ks_cfg.ike, ks_cfg.auth, ks_cfg.address, ks_cfg.software_version),
        groups,
        logger=Quiet(),
    )
    gm = GroupMemberEngine(
        gm_cfg.address,
        gm_cfg.groups,
        phase1_config(gm_cfg.ike, gm_cfg.auth, gm_cfg.address, gm_cfg.software_version),
        logger=Quiet(),
    )
    return ks, gm


def exchange(
    ks: KeyServerEngine,
    gm: GroupMemberEngine,
    first: list[tuple[bytes, tuple[str, int]]],
    now: float,
    mono: float,
) -> None:
    """Deliver GM -> KS datagrams and every answer both ways until the wire is quiet."""
    to_ks = [d for d, _ in first]
    while to_ks:
        to_gm = [d for data in to_ks for d, _ in ks.datagram_received(data, GM, now, mono)]
        to_ks = [d for data in to_gm for d, _ in gm.datagram_received(data, KS, now, mono)]


def register(
    ks: KeyServerEngine, gm: GroupMemberEngine, now: float = T0, mono: float = M0
) -> Group:
    exchange(ks, gm, gm.start(now, mono), now, mono)
    [group] = ks.groups.values()
    assert IPv4Address(GM[0]) in group.members
    return group


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_rekey_retransmission_follows_the_monotonic_clock(
    engines: tuple[KeyServerEngine, GroupMemberEngine], jump: float
) -> None:
    ks, gm = engines
    group = register(ks, gm)
    interval = group.config.rekey.retransmit_interval
    ks.on_timer(T0 + 1, M0 + 1)
    [(push, to)] = ks.rekey(group, T0 + 1)  # (a control command: no monotonic time given)
    assert to == GM
    # The GM's acknowledgement is lost.  Then the wall clock jumps an hour.
    assert ks.on_timer(T0 + 1 + jump + interval / 2, M0 + 1 + interval / 2) == []  # not early
    assert ks.on_timer(T0 + 1 + jump + interval + 0.01, M0 + 1 + interval + 0.01) == [
        (push, GM)
    ]  # not late
    member = group.members[IPv4Address(GM[0])]
    assert member.rekey_retries == 1 and member.pending is not None


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_registration_survives_a_wall_clock_jump_between_messages(
    engines: tuple[KeyServerEngine, GroupMemberEngine], jump: float
) -> None:
    ks, gm = engines
    [(mm1, _)] = gm.start(T0, M0)
    [(mm2, _)] = ks.datagram_received(mm1, GM, T0, M0)
    assert len(ks.half_open_mm1) == 1
    # The wall clock jumps while message 2 is on its way: neither side gives up early.
    later, mono = T0 + jump, M0 + 1.0
    assert ks.on_timer(later, mono) == [] and len(ks.half_open_mm1) == 1
    assert gm.on_timer(later, mono) == []
    reg = next(iter(gm.registrations.values()))
    assert reg.state == RegState.PHASE1 and reg.failures == 0
    exchange(ks, gm, gm.datagram_received(mm2, KS, later, mono), later, mono)
    assert reg.state == RegState.REGISTERED
    assert IPv4Address(GM[0]) in next(iter(ks.groups.values())).members


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_half_open_state_expires_by_the_monotonic_clock(
    engines: tuple[KeyServerEngine, GroupMemberEngine], jump: float
) -> None:
    ks, gm = engines
    [(mm1, _)] = gm.start(T0, M0)
    ks.datagram_received(mm1, GM, T0, M0)
    ks.on_timer(T0 + jump, M0 + MM1_STATE_LIFETIME - 0.1)
    assert len(ks.half_open_mm1) == 1
    assert ks.next_deadline(T0 + jump, M0 + MM1_STATE_LIFETIME - 0.1) == pytest.approx(
        M0 + MM1_STATE_LIFETIME
    )
    ks.on_timer(T0 + jump, M0 + MM1_STATE_LIFETIME)
    assert len(ks.half_open_mm1) == 0 and ks.counters["half_open_expired"] == 1


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_gm_retransmits_message_1_by_the_monotonic_clock(
    engines: tuple[KeyServerEngine, GroupMemberEngine], jump: float
) -> None:
    _, gm = engines
    [(mm1, to)] = gm.start(T0, M0)
    assert to == KS
    interval = gm.phase1.retransmit_interval
    assert gm.next_deadline(T0, M0) == pytest.approx(M0 + interval)
    assert gm.on_timer(T0 + jump + interval / 2, M0 + interval / 2) == []
    assert gm.on_timer(T0 + jump + interval, M0 + interval) == [(mm1, KS)]
    # The next retransmission doubles the interval, still on the monotonic clock.
    assert gm.next_deadline(T0 + jump + interval, M0 + interval) == pytest.approx(M0 + 3 * interval)
    reg = next(iter(gm.registrations.values()))
    assert reg.failures == 0


class NoScan(dict[IPv4Address, Member]):
    """A member table that fails the test when it is walked (lookups by address are fine)."""

    def __iter__(self) -> Iterator[IPv4Address]:
        raise AssertionError("the member table was scanned")

    def values(self):  # noqa: ANN201
        raise AssertionError("the member table was scanned")

    def items(self):  # noqa: ANN201
        raise AssertionError("the member table was scanned")


def test_idle_ks_timer_work_does_not_scan_members(
    engines: tuple[KeyServerEngine, GroupMemberEngine],
) -> None:
    ks, gm = engines
    group = register(ks, gm)
    ks.on_timer(T0 + 1, M0 + 1)
    [(push, _)] = ks.rekey(group, T0 + 1)
    [(ack, _)] = gm.datagram_received(push, KS, T0 + 1, M0 + 1)
    assert IsakmpHeader.decode(ack).exchange_type == GROUPKEY_PUSH_ACK
    ks.datagram_received(ack, GM, T0 + 1, M0 + 1)
    member = group.members[IPv4Address(GM[0])]
    assert member.pending is None
    for i in range(10_000):  # an idle table of 10,000 registered members
        address = IPv4Address(int(IPv4Address("10.0.0.1")) + i)
        group.members[address] = Member(
            address, f"gm{i}", None, T0, member.kek_spi, member.tek_spis
        )
    group.members = NoScan(group.members)
    for step in range(1, 200):  # idle wake-ups, past the acknowledged push's retransmission time
        now, mono = T0 + 1 + step, M0 + 1 + step
        assert ks.on_timer(now, mono) == []
        deadline = ks.next_deadline(now, mono)
        assert deadline is not None and deadline > mono
    # The acknowledged push's timer was dropped when due (lazily): the next work is the rekey.
    assert deadline > mono + HOUR


class Recorder:
    """A minimal sans-I/O engine: records the shell's calls, answers with a deadline it is told."""

    def __init__(self) -> None:
        self.timer_calls: list[float] = []
        self.deadline: float | None = None

    def datagram_received(
        self, data: bytes, peer: tuple[str, int], now: float, mono: float | None = None
    ) -> list[tuple[bytes, tuple[str, int]]]:
        assert mono is not None
        self.deadline = mono + float(data.decode())  # "seconds from now"
        return []

    def on_timer(
        self, now: float, mono: float | None = None
    ) -> list[tuple[bytes, tuple[str, int]]]:
        assert mono is not None
        self.timer_calls.append(mono)
        if self.deadline is not None and mono >= self.deadline:
            self.deadline = None
        return []

    def next_deadline(self, now: float, mono: float) -> float | None:
        return self.deadline


async def test_shell_sleeps_until_the_deadline_a_datagram_sets() -> None:
    engine = Recorder()
    shell = UdpShell("t", ("127.0.0.1", 0), None, tick=30.0, logger=Quiet())

    async def handler(req: object) -> object:
        raise AssertionError("no control socket here")

    await shell.open(engine, handler)  # type: ignore[arg-type]  # a handler that never runs
    try:
        assert shell._stream is not None
        port = shell._stream.sockname[1]
        await asyncio.sleep(0.3)
        assert len(engine.timer_calls) == 1  # the first run; then nothing to do: no tick for 30 s
        client = await asyncio_dgram.connect(("127.0.0.1", port))
        sent_at = time.monotonic()
        await client.send(b"0.2")  # the engine now has work in 0.2 s
        while len(engine.timer_calls) < 2:
            await asyncio.sleep(0.01)
            assert time.monotonic() - sent_at < 5, "the deadline never fired"
        fired = engine.timer_calls[1]
        assert sent_at + 0.2 <= fired < sent_at + 1.0
        await asyncio.sleep(0.3)
        assert len(engine.timer_calls) == 2  # idle again: no polling
        client.close()
    finally:
        await shell.close()
