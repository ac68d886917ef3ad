"""Issue 9 §6: exceptions inside the data path are internal errors, not malformed packets.

Before the fix an unexpected exception in ``Dataplane.outbound`` / ``inbound`` was
counted as a ``malformed`` drop with no trace: a bug looked like an attacker's bad
packet.  Now it drops as ``internal-error``, its traceback is logged (at most once per
``INTERNAL_ERROR_LOG_INTERVAL`` seconds, with the count suppressed since) and the next
packet is processed as usual.

The errors are provoked through the Dataplane's own API, with state it accepts:

* outbound: a group TBAR clock seeded with the largest pseudotime an 8-octet
  GROUP_PSEUDOTIME carries; one second later the estimate no longer fits the
  TBAR metadata and ``struct.pack`` raises ``struct.error``;
* inbound: a TEK whose policy carries a replay window ``SequenceWindow`` refuses
  (``ValueError``), hit on the first packet from a sender.

Neither state can come from the wire any more: the GM's policy check refuses a
GROUP_PSEUDOTIME of 2**63 or more and a REPLAY_WINDOW above 65536 (last test).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import structlog

from gdoid import log
from gdoid.config.loader import parse_gm_config
from gdoid.configgen import gm_config, gm_group, psk_auth
from gdoid.control import ControlRequest
from gdoid.dataplane.engine import INTERNAL_ERROR_LOG_INTERVAL, Dataplane, DropReason
from gdoid.groupmember.daemon import GroupMemberDaemon
from gdoid.protocol.constants import NotifyType
from gdoid.protocol.errors import NotifyError
from gdoid.protocol.policy import (
    GroupKeys,
    Tek,
    TrafficSelector,
    build_kd,
    build_sa,
    build_sat,
    parse_keys,
    parse_sa,
    parse_sat,
)
from tests.espdata import T0, make_tek, sids, udp
from tests.pullsim import make_kek

TBAR_NET = TrafficSelector(IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16"))
PLAIN_NET = TrafficSelector(IPv4Network("10.3.0.0/16"), IPv4Network("10.4.0.0/16"))
PSEUDOTIME_MAX = (1 << 64) - 1  # GROUP_PSEUDOTIME is TLV 8 octets

TB_HEAD = re.compile(r"^Traceback \(most recent call last\):$", re.M)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _log_stream() -> io.StringIO:
    stream = io.StringIO()
    log.configure_logging("ios", stream=stream, level=logging.DEBUG)
    return stream


def broken_and_sound(dp: Dataplane) -> tuple[Tek, Tek]:
    """Group 1: TBAR with an overflowing clock; group 2: an ordinary GCM TEK."""
    bad = make_tek(spi=0x1111, selector=TBAR_NET, tbar_window_ms=5000)
    good = make_tek(spi=0x2222, selector=PLAIN_NET)
    dp.install(1, [bad], sids(1), PSEUDOTIME_MAX, T0)
    dp.install(2, [good], sids(1), None, T0)
    return bad, good


def per_sa(dp: Dataplane, spi: int, now: float) -> dict[str, int]:
    return next(sa["drops"] for sa in dp.stats(now)["sas"] if sa["spi"] == spi)


def test_outbound_bug_is_internal_error_and_the_next_packet_passes() -> None:
    stream = _log_stream()
    dp = Dataplane()
    bad, good = broken_and_sound(dp)
    receiver = Dataplane()
    receiver.install(2, [good], sids(2), None, T0)
    now = T0 + 1

    r = dp.outbound(udp("10.1.0.1", "10.2.0.1"), now)
    assert r.drop == DropReason.INTERNAL_ERROR and r.to_network == r.to_tun == []
    stats = dp.stats(now)
    assert stats["drops"]["internal-error"] == 1 and stats["internal_errors"] == 1
    assert stats["drops"]["malformed"] == 0
    assert per_sa(dp, bad.spi, now) == {"internal-error": 1}

    # Bad input is still "malformed", not an internal error.
    assert dp.outbound(udp()[:-1], now).drop == DropReason.MALFORMED
    assert dp.inbound(b"\x45" + bytes(30), now).drop == DropReason.MALFORMED
    stats = dp.stats(now)
    assert stats["drops"]["malformed"] == 2 and stats["drops"]["internal-error"] == 1

    # The next good packet is protected, and decrypts at a peer.
    inner = udp("10.3.0.1", "10.4.0.1")
    r = dp.outbound(inner, now)
    assert r.drop is None and len(r.to_network) == 1
    assert receiver.inbound(r.to_network[0], now).to_tun == [inner]

    # The traceback is in the log, naming the real exception and where it came from.
    text = stream.getvalue()
    assert "dataplane_internal_error direction=outbound spi=0x00001111 count=1 suppressed=0" in text
    assert len(TB_HEAD.findall(text)) == 1
    assert "struct.error" in text and "in seal" in text


def test_inbound_bug_is_internal_error() -> None:
    stream = _log_stream()
    tek = make_tek(spi=0x3333, selector=PLAIN_NET)
    sender, receiver = Dataplane(), Dataplane()
    sender.install(2, [tek], sids(1), None, T0)
    # A replay window SequenceWindow cannot have: the receiver's first packet trips on it.
    receiver.install(
        2, [replace(tek, policy=replace(tek.policy, replay_window=-1))], sids(2), None, T0
    )
    inner = udp("10.3.0.1", "10.4.0.1")
    out = [sender.outbound(inner, T0).to_network[0] for _ in range(3)]

    r = receiver.inbound(out[0], T0)
    assert r.drop == DropReason.INTERNAL_ERROR and r.to_tun == []
    stats = receiver.stats(T0)
    assert stats["drops"]["internal-error"] == 1 and stats["drops"]["malformed"] == 0
    assert per_sa(receiver, 0x3333, T0) == {"internal-error": 1}
    # A tampered packet is still an ICV failure, not an internal error.
    bad = bytearray(out[1])
    bad[-1] ^= 1
    assert receiver.inbound(bytes(bad), T0).drop == DropReason.ICV
    # Fix the policy (a rekey with the same keys): the next packet is accepted.
    receiver.install(2, [tek], sids(2), None, T0)
    assert receiver.inbound(out[2], T0).to_tun == [inner]
    assert receiver.stats(T0)["drops"]["internal-error"] == 1
    assert "dataplane_internal_error direction=inbound spi=0x00003333" in stream.getvalue()
    assert "ValueError: window size must be positive" in stream.getvalue()


def test_traceback_log_is_rate_limited() -> None:
    stream = _log_stream()
    dp = Dataplane()
    broken_and_sound(dp)
    packet = udp("10.1.0.1", "10.2.0.1")
    now = T0 + 1
    for i in range(50):  # a burst well inside one interval
        assert dp.outbound(packet, now + i * 0.01).drop == DropReason.INTERNAL_ERROR
    text = stream.getvalue()
    assert len(TB_HEAD.findall(text)) == 1 and text.count("dataplane_internal_error") == 1
    # Still inside the interval: nothing more.
    dp.outbound(packet, now + INTERNAL_ERROR_LOG_INTERVAL - 0.5)
    assert stream.getvalue() == text
    # After it: one line, carrying how many were suppressed.
    dp.outbound(packet, now + INTERNAL_ERROR_LOG_INTERVAL)
    text = stream.getvalue()
    assert len(TB_HEAD.findall(text)) == 2
    assert "count=52 suppressed=50" in text
    assert dp.stats(now)["drops"]["internal-error"] == 52


def test_show_crypto_ipsec_sa_shows_internal_errors(tmp_path: Path) -> None:
    (tmp_path / "psk").write_text("secret\n")
    (tmp_path / "psk").chmod(0o600)
    text = gm_config(
        "127.0.0.2",
        control_socket=tmp_path / "ctl",
        dataplane={"enabled": True},
        auth=psk_auth("127.0.0.0/8", "psk"),
        groups=[gm_group(["127.0.0.1"], number=1)],
    )
    cfg = parse_gm_config(text, tmp_path)
    daemon = GroupMemberDaemon(cfg)  # nothing is opened before start()
    assert daemon.dataplane is not None
    broken_and_sound(daemon.dataplane)
    now = T0 + 1
    for _ in range(3):
        daemon.dataplane.outbound(udp("10.1.0.1", "10.2.0.1"), now)
    resp = asyncio.run(daemon.handle(ControlRequest(("show", "crypto", "ipsec", "sa"))))
    assert resp.ok and resp.data["drops"]["internal-error"] == 3
    assert resp.data["internal_errors"] == 3
    lines = resp.output.splitlines()
    assert "     #drops: internal-error 3" in lines  # the SA's own line
    [total] = [ln for ln in lines if ln.startswith("   drops: ")]
    assert "internal-error 3" in total and "malformed 0" in total


def test_the_wire_cannot_bring_these_states() -> None:
    """A KS (authenticated, but possibly buggy) cannot hand a GM the overflowing clock or a
    replay window bitmap of 2**32 bits: the GM's policy check refuses them."""
    tek = make_tek(spi=0x4444, selector=PLAIN_NET, replay_window=(1 << 32) - 1)
    with pytest.raises(NotifyError, match="replay window 4294967295 above 65536") as exc:
        parse_sat(build_sat(tek, T0), T0)
    assert exc.value.notify == NotifyType.ATTRIBUTES_NOT_SUPPORTED

    tek = make_tek(spi=0x4444, selector=PLAIN_NET, tbar_window_ms=5000)
    keys = GroupKeys(7, make_kek(T0), (tek,), 1, PSEUDOTIME_MAX)
    parsed = parse_sa(build_sa(keys, T0), T0)
    with pytest.raises(NotifyError, match="GROUP_PSEUDOTIME") as exc:
        parse_keys(parsed, build_kd(keys, sids(1)), 1, 7, T0, True)
    assert exc.value.notify == NotifyType.INVALID_KEY_INFORMATION
    # The largest value accepted still leaves the data path room to count.
    keys = replace(keys, pseudotime_ms=(1 << 63) - 1)
    got, _ = parse_keys(parsed, build_kd(keys, sids(1)), 1, 7, T0, True)
    dp = Dataplane()
    dp.install(7, list(got.teks), sids(1), got.pseudotime_ms, T0)
    r = dp.outbound(udp("10.3.0.1", "10.4.0.1"), T0 + 86400 * 365)
    assert r.drop is None and len(r.to_network) == 1
