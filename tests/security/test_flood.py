"""Issue 9 §4: floods of spoofed Main Mode message 1 cannot lock real GMs out.

In-memory KS and GM engines with an injected clock; the flood is thousands of
message 1s (a real GM's offer with fresh cookies) from thousands of distinct
addresses, the way a spoofing attacker sends them.  Each test replays one attack.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import re
import struct
import time
import tracemalloc
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import structlog

from gdoid import log
from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.protocol.constants import ExchangeType, NotifyType
from gdoid.protocol.crypto import DhKeyPair
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.message import decode_plain
from gdoid.protocol.payloads import NotifyPayload
from tests.enginenet import GROUP, KS, T0, make_gm, make_ks
from tests.ikecraft import (
    mm1_with,
)

CAP = 4096
RATE = 5000.0  # flood packets per second of the injected clock


class Flood:
    """Spoofed copies of one real message 1: fresh initiator cookie, next source address."""

    def __init__(self, ks: KeyServerEngine, mm1: bytes) -> None:
        self.ks = ks
        self.mm1 = mm1
        self.n = 0
        self.max_half_open = 0
        self.replies = 0

    def send(self, count: int, now: float) -> float:
        for _ in range(count):
            i = self.n
            self.n += 1
            src = f"127.{10 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
            data = os.urandom(8) + self.mm1[8:]
            self.replies += len(self.ks.datagram_received(data, (src, 500 + i % 1000), now))
            mm1_state = len(getattr(self.ks, "half_open_mm1", ())) or self.ks.half_open
            self.max_half_open = max(self.max_half_open, mm1_state)
            now += 1 / RATE
        return now


def gm_mm1(files: Path) -> bytes:
    mm = MainModeInitiator(make_gm(files).phase1, IPv4Address(KS), T0)
    [mm1] = mm.start(T0).send
    return mm1


class Link:
    """One GM and the KS; a flood burst runs between every two datagrams of the GM."""

    def __init__(
        self, ks: KeyServerEngine, gm: GroupMemberEngine, flood: Flood, burst: int
    ) -> None:
        self.ks, self.gm, self.flood, self.burst = ks, gm, flood, burst
        self.gm_addr = (str(gm.address), 848)

    def run(self, sends: list[tuple[bytes, tuple[str, int]]], now: float) -> float:
        queue = list(sends)
        while queue:
            data, _ = queue.pop(0)
            now = self.flood.send(self.burst, now)  # the GM's datagram waits behind the flood
            for reply, _dst in self.ks.datagram_received(data, self.gm_addr, now):
                now = self.flood.send(self.burst, now)
                queue += self.gm.datagram_received(reply, (KS, 848), now)
        return now


def test_spoofed_mm1_flood_fills_no_more_than_the_cap_and_a_gm_registers_mid_flood(
    files: Path,
) -> None:
    ks = make_ks(files, max_half_open=CAP)
    flood = Flood(ks, gm_mm1(files))
    now = flood.send(3 * CAP, T0)  # the table is full long before the GM starts
    assert ks.half_open == CAP
    gm = make_gm(files, address="127.0.0.2")
    link = Link(ks, gm, flood, burst=CAP // 4)  # 2 bursts between its MM1 and MM3
    start = now
    now = link.run(gm.start(now), now)
    reg = gm.registrations[GROUP]
    # ...without a single retransmission: Link never runs the GM's timers.
    assert reg.state == RegState.REGISTERED, reg.last_failure
    assert reg.registered_at is not None and reg.registered_at > start
    assert flood.max_half_open <= CAP
    assert ks.counters["half_open_evicted"] >= 2 * CAP  # newcomers evict; never refused
    assert ks.counters["half_open_refused"] == 0
    assert flood.replies == flood.n  # every spoofed message 1 got its (small) message 2
    # Diffie-Hellman only for the peer that proved its address with message 3.
    assert ks.counters["dh_computations"] == 1


def test_gm_starts_over_from_mm1_when_the_flood_evicted_its_state(files: Path) -> None:
    """More spoofed MM1s between our MM2 and MM3 than the table holds: the KS says so."""
    ks = make_ks(files, max_half_open=CAP)
    flood = Flood(ks, gm_mm1(files))
    gm = make_gm(files, address="127.0.0.2")
    # MM1 -> MM2 at once, then a burst of CAP + 1 (evicts our entry) before MM3 arrives.
    start = T0
    [(mm1, _)] = gm.start(start)
    [(mm2, _)] = ks.datagram_received(mm1, (str(gm.address), 848), start)
    [(mm3, _)] = gm.datagram_received(mm2, (KS, 848), start)
    now = flood.send(CAP + 1, start)
    [(notify, _)] = ks.datagram_received(mm3, (str(gm.address), 848), now)
    msg = decode_plain(notify)
    n = msg.get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_COOKIE
    assert len(notify) <= len(mm3)
    assert ks.counters["half_open_lost"] == 1
    assert ks.counters["dh_computations"] == 0  # nothing computed for a lost exchange
    # The GM sends its message 1 again at once (no timer), and now completes.
    again = gm.datagram_received(notify, (KS, 848), now)
    assert [d for d, _ in again] == [mm1]
    link = Link(ks, gm, flood, burst=100)
    link.run(again, now)
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.REGISTERED, reg.last_failure
    assert reg.registered_at is not None and reg.registered_at - start < 2.0


def test_half_open_state_is_tiny_and_holds_no_dh_key(files: Path) -> None:
    ks = make_ks(files, max_half_open=100_000)
    flood = Flood(ks, gm_mm1(files))
    flood.send(200, T0)  # warm-up: caches, dict growth
    gc.collect()
    keys_before = sum(isinstance(o, DhKeyPair) for o in gc.get_objects())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flood.send(5000, T0 + 1)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / 5000
    finally:
        tracemalloc.stop()
    assert ks.half_open == 5200
    assert per_entry < 600, f"{per_entry:.0f} bytes per half-open message 1"
    gc.collect()
    assert sum(isinstance(o, DhKeyPair) for o in gc.get_objects()) == keys_before
    assert ks.counters["dh_computations"] == 0


def test_unanswered_mm1_state_expires_within_seconds(files: Path) -> None:
    ks = make_ks(files)
    flood = Flood(ks, gm_mm1(files))
    flood.send(1000, T0)
    ks.on_timer(T0 + 6.0)
    assert ks.half_open == 0
    assert ks.counters["half_open_expired"] == 1000


class _LookupSpy(dict):
    """Counts lookups of the KS's half-open state (observable, no crypto mocked)."""

    lookups = 0

    def get(self, *a: object) -> object:
        type(self).lookups += 1
        return super().get(*a)

    def pop(self, *a: object) -> object:
        type(self).lookups += 1
        return super().pop(*a)

    def __getitem__(self, k: object) -> object:
        type(self).lookups += 1
        return super().__getitem__(k)

    def __contains__(self, k: object) -> bool:
        type(self).lookups += 1
        return super().__contains__(k)


def test_mm3_with_a_forged_responder_cookie_is_dropped_before_any_lookup(files: Path) -> None:
    ks = make_ks(files)
    gm = make_gm(files, address="127.0.0.2")
    peer = (str(gm.address), 848)
    [(mm1, _)] = gm.start(T0)
    [(mm2, _)] = ks.datagram_received(mm1, peer, T0)
    [(mm3, _)] = gm.datagram_received(mm2, (KS, 848), T0)
    for table in ("half_open_mm1", "responders", "completed"):
        if hasattr(ks, table):
            setattr(ks, table, _LookupSpy(getattr(ks, table)))
    _LookupSpy.lookups = 0
    forged = [mm3[:8] + os.urandom(8) + mm3[16:], mm3[:8] + bytes([mm3[8] ^ 1]) + mm3[9:]]
    for d in forged:  # the real GM's initiator cookie and address, a guessed responder cookie
        assert ks.datagram_received(d, peer, T0) == []
    assert ks.datagram_received(mm3, ("127.0.0.99", 848), T0) == []  # right cookies, wrong address
    assert _LookupSpy.lookups == 0
    assert ks.counters["bad_responder_cookie"] == 3
    assert ks.counters["dh_computations"] == 0
    # The real exchange is untouched and completes.
    net_out = ks.datagram_received(mm3, peer, T0)
    assert (
        len(net_out) == 1
        and IsakmpHeader.decode(net_out[0][0]).exchange_type == ExchangeType.IDENTITY_PROTECTION
    )


# --- cheap refusal, bounded and rate-limited log lines -------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure_logging("ios", stream=stream, level=logging.INFO)
    yield stream
    structlog.reset_defaults()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_oversized_mm1_is_refused_cheaply_with_a_bounded_log_line(
    files: Path, log_stream: io.StringIO
) -> None:
    ks = make_ks(files)
    big = mm1_with(9, 244, cipher=5)  # about 61 KB: 2,196 transforms, none acceptable
    assert 60_000 < len(big) < 65_000
    t = time.perf_counter()
    out = ks.datagram_received(big, ("10.9.9.9", 500), T0)
    elapsed = time.perf_counter() - t
    assert sum(len(d) for d, _ in out) <= len(big)
    assert ks.half_open == 0
    assert elapsed < 0.03, f"{elapsed * 1000:.0f} ms for one message 1"  # old main: ~180 ms
    lines = _lines(log_stream)
    assert lines and all(len(line) <= 400 for line in lines), max(map(len, lines))
    # Under 4 KiB but 9 proposals / 40 transforms: refused before the offer is decoded.
    for many in (mm1_with(9, 1), mm1_with(1, 40)):
        assert len(many) <= 4096
        t = time.perf_counter()
        out = ks.datagram_received(many, ("10.9.9.8", 500), T0)
        assert time.perf_counter() - t < 0.01
        assert ks.half_open == 0
        assert sum(len(d) for d, _ in out) <= len(many)


def test_a_burst_of_bad_mm1s_logs_n_lines_then_one_summary(
    files: Path, log_stream: io.StringIO
) -> None:
    ks = make_ks(files)
    clock = Clock()
    ks.log_limit = log.LogLimiter(clock=clock)
    bad = [
        mm1_with(9, 244, cipher=5),
        mm1_with(9, 1),
        mm1_with(1, 1, vid_bytes=3000)[:40],
    ]  # big, many, truncated
    for i in range(300):
        ks.datagram_received(bad[i % 3], (f"10.1.{i // 250}.{i % 250 + 1}", 500), T0)
    lines = _lines(log_stream)
    assert len(lines) <= 2 * log.LIMIT_LINES, len(lines)  # MALFORMED_DROP and PHASE1_FAILED
    assert all(len(line) <= 400 for line in lines)
    clock.t += log.LIMIT_INTERVAL
    ks.on_timer(T0 + 1)
    summaries = [line for line in _lines(log_stream) if "similar messages suppressed" in line]
    assert summaries, _lines(log_stream)[-3:]
    counts = [
        int(m[1])
        for s in summaries
        if (m := re.search(r": (\d+) similar messages suppressed in the last 10 s", s))
    ]
    assert len(counts) == len(summaries)
    assert sum(counts) + len(lines) >= 300
    assert len(_lines(log_stream)) == len(lines) + len(summaries)


def test_log_limiter_bounds_fields_and_summarises(log_stream: io.StringIO) -> None:
    clock = Clock()
    limiter = log.LogLimiter(lines=3, interval=5.0, clock=clock)
    logger = log.get_logger("test")
    for _ in range(10):
        limiter.emit(logger, log.MALFORMED_DROP, peer="10.0.0.1", reason="x" * 100_000)
    clock.t += 5.0
    limiter.flush()
    lines = _lines(log_stream)
    assert len(lines) == 4
    assert all(len(line) < 400 for line in lines[:3])
    assert lines[3].endswith(
        "%GDOI-4-MALFORMED_DROP: 7 similar messages suppressed in the last 5 s"
    )


def test_forged_rekeys_log_a_bounded_number_of_lines(files: Path, log_stream: io.StringIO) -> None:
    from tests.enginenet import register

    ks = make_ks(files)
    gm = make_gm(files)
    register(ks, gm)
    kek = gm.sadb.groups[GROUP].kek
    assert kek is not None
    before = len(_lines(log_stream))
    for i in range(200):  # garbage under the group's KEK cookies: each fails verification
        body = os.urandom(64 + i % 32)
        hdr = kek.spi + struct.pack(
            "!BBBBII", 8, 0x10, ExchangeType.GROUPKEY_PUSH, 1, 0, HEADER_LEN + len(body)
        )
        assert gm.datagram_received(hdr + body, (KS, 848), T0) == []
    rejected = [line for line in _lines(log_stream)[before:] if "GM_REKEY_REJECTED" in line]
    assert gm.counters["rekeys_rejected"] == 200
    assert len(rejected) <= log.LIMIT_LINES


def test_novel_mm1_bodies_cost_a_bounded_budget_and_proven_offers_stay_answered(
    files: Path,
) -> None:
    """A flood whose every message 1 differs (random VID) cannot use the parse cache:
    decoding is budgeted, and the offer of a GM that once reached message 3 stays cached."""
    ks = make_ks(files)
    register_at = T0
    gm = make_gm(files, address="127.0.0.2")
    link = Link(ks, gm, Flood(ks, gm_mm1(files)), burst=0)
    link.run(gm.start(register_at), register_at)  # proves this configuration's offer
    assert gm.registrations[GROUP].state == RegState.REGISTERED
    now, parsed = T0 + 10, 0
    for i in range(20_000):  # 20,000 novel bodies in one second
        data = mm1_with(1, 1, vid_bytes=16 + i % 200, cipher=7)
        data = data[:-16] + os.urandom(16)
        parsed += bool(
            ks.datagram_received(data, (f"127.20.{i >> 8}.{i & 255}", 500), now + i / 20_000)
        )
    assert ks.counters["mm1_shed"] > 10_000
    assert parsed < 3_000  # about PARSE_BUDGET / (cost of one body) per second
    gm2 = make_gm(files, address="127.0.0.3")  # same configuration: same message 1 body
    Link(ks, gm2, Flood(ks, gm_mm1(files)), burst=0).run(gm2.start(now + 1), now + 1)
    assert gm2.registrations[GROUP].state == RegState.REGISTERED
