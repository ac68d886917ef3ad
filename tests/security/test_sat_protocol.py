"""Issue 9 §6: SA TEKs of a protocol other than ESP (RFC 6407 §5.4).

A SAT's Protocol-ID selects the layout of the rest of it.  Before the fix a GM
decoded every SAT with the ESP layout: an authentic message 2 carrying, say, an
RFC 8052 TEK was dropped as garbage (``SAT.src_id_data: truncated``) and the GM
reported "no answer from KS".  Now (docs/wire.md, "SATs of other protocols"):
the codec keeps such SATs opaque; the GM installs its ESP TEKs, skips the
others with a warning, and refuses an SA with no ESP TEK with
INVALID_PROTOCOL_ID, logging "unsupported SA TEK protocol N".

The KS only builds ESP SATs, so these tests make it offer more by wrapping the
``build_sa`` / ``build_kd`` its PULL responder and rekey planner call: every
hash, signature and encryption on the way is the real one.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gdoid.keyserver.group as ks_group
from gdoid import log
from gdoid.dataplane.engine import Dataplane
from gdoid.groupmember.engine import RegState
from gdoid.protocol import pull
from gdoid.protocol.attributes import Attribute
from gdoid.protocol.constants import KeyPacketType, NotifyType, PayloadType, TekKeyAttribute
from gdoid.protocol.errors import NotifyError
from gdoid.protocol.events import PullFailed, Registered
from gdoid.protocol.gdoi_payloads import (
    GdoiSaPayload,
    KdPayload,
    KeyPacket,
    OpaqueSatPayload,
    SatPayload,
    TrafficId,
)
from gdoid.protocol.message import decode_plain, encode_plain
from gdoid.protocol.payloads import NotifyPayload
from gdoid.protocol.policy import GroupKeys, build_kd, build_sat, parse_keys, parse_sa
from tests.enginenet import GM, GROUP, KS, T0, Net, make_gm, make_ks
from tests.pullsim import directory, make_kek, make_tek, run_pull

# An RFC 8052 (IEC 61850) style SAT body after the Protocol-ID: not the ESP layout.  Read as
# ESP it claims a 0x2b06-octet source ID and so was "truncated".
IEC_BODY = bytes.fromhex("06 2b06 0104 01 8237 0a 0001 0203 0405 0607 0809 0a0b 0c0d 0e0f")
IEC_SAT = OpaqueSatPayload(6, IEC_BODY)
IEC_KEYS = KeyPacket(
    KeyPacketType.TEK,
    bytes.fromhex("0a0b0c0d"),
    (Attribute(TekKeyAttribute.TEK_ALGORITHM_KEY, bytes(range(16))),),
)
# AH (RFC 6407 §5.4.1): the ESP layout, a protocol this data path does not implement.
AH_SAT = SatPayload(
    2,
    0,
    TrafficId(1, 0, bytes(4)),
    TrafficId(1, 0, bytes(4)),
    5,  # AH_SHA2-256
    0x0A0B0C0E,
    (Attribute(1, 1), Attribute.long(2, 3600)),
)
AH_KEYS = KeyPacket(
    KeyPacketType.TEK,
    (0x0A0B0C0E).to_bytes(4, "big"),
    (Attribute(TekKeyAttribute.TEK_ALGORITHM_KEY, bytes(32)),),
)

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _log_stream() -> io.StringIO:
    stream = io.StringIO()
    log.configure_logging("ios", stream=stream, level=logging.DEBUG)
    return stream


def _offer(
    monkeypatch: pytest.MonkeyPatch, module: object, sats: list, keys: list, esp: bool = True
) -> None:
    """Make ``module``'s build_sa/build_kd add ``sats``/``keys`` (and drop ESP if not ``esp``)."""
    real_sa, real_kd = module.build_sa, module.build_kd  # type: ignore[attr-defined]  # module is one of the protocol modules with these builders

    def build_sa(k: GroupKeys, now: float, extra: tuple = ()) -> GdoiSaPayload:
        sa = real_sa(k, now, [*sats, *extra])
        keep = [p for p in sa.attributes if esp or not isinstance(p, SatPayload) or p in sats]
        return GdoiSaPayload(tuple(keep), sa.situation)

    def build_kd(k: GroupKeys, sids: object = None) -> KdPayload:
        kd = real_kd(k, sids)
        packets = [p for p in kd.packets if esp or p.kd_type != KeyPacketType.TEK]
        return KdPayload((*packets, *keys))

    monkeypatch.setattr(module, "build_sa", build_sa)
    monkeypatch.setattr(module, "build_kd", build_kd)


# --- codec ------------------------------------------------------------------------------------

other_protocols = st.integers(0, 255).filter(lambda p: p not in (1, 2))
opaque_sats = st.builds(OpaqueSatPayload, other_protocols, st.binary(max_size=64))


def test_rfc8052_style_sat_decodes_by_protocol_id() -> None:
    """The bytes that were 'SAT.src_id_data: truncated' decode, inside an SA, as protocol 6."""
    sa_bytes = GdoiSaPayload((IEC_SAT,)).encode_body()
    assert sa_bytes[12:] == bytes([0, 0, 0, 4 + 1 + len(IEC_BODY), 6]) + IEC_BODY
    sa = GdoiSaPayload.decode_body(sa_bytes)
    assert sa.all_sats == (IEC_SAT,) and sa.sats == ()


@SETTINGS
@given(others=st.lists(opaque_sats, min_size=1, max_size=3), data=st.data())
def test_non_esp_sat_round_trip(others: list[OpaqueSatPayload], data: st.DataObject) -> None:
    """Any Protocol-ID without the ESP/AH layout survives encode/decode in a message, in any
    order beside an ESP SAT, and re-encodes to the same octets."""
    esp = SatPayload(1, 17, TrafficId(4, 0, bytes(8)), TrafficId(1, 53, bytes(4)), 20, 0x1234, ())
    order = data.draw(st.permutations([esp, *others]))
    sa = GdoiSaPayload(tuple(order))
    wire = encode_plain(b"\x01" * 8, bytes(8), 32, 1, [sa])
    [decoded] = [d.payload for d in decode_plain(wire).payloads]
    assert decoded == sa
    assert decoded.all_sats == tuple(order) and decoded.sats == (esp,)
    assert OpaqueSatPayload.decode_body(others[0].encode_body()) == others[0]


@SETTINGS
@given(proto=other_protocols, body=st.binary(max_size=64))
def test_sat_layout_is_chosen_by_protocol_id_only(proto: int, body: bytes) -> None:
    """Whatever follows a non-ESP/AH Protocol-ID is kept, never parsed as ESP."""
    sa = GdoiSaPayload.decode_body(GdoiSaPayload((OpaqueSatPayload(proto, body),)).encode_body())
    assert sa.all_sats == (OpaqueSatPayload(proto, body),)


# --- policy -----------------------------------------------------------------------------------


def test_policy_skips_non_esp_and_discards_its_keys() -> None:
    tek = make_tek("esp-gcm-256", T0)
    keys = GroupKeys(GROUP, None, (tek,), 1)
    sa = GdoiSaPayload((build_sat(tek, T0), IEC_SAT, AH_SAT))
    parsed = parse_sa(sa, T0)
    assert [spi for spi, _, _ in parsed.teks] == [tek.spi] and parsed.skipped == (6, 2)
    assert parsed.skipped_reason == "unsupported SA TEK protocol 6, 2 (GDOI_PROTO_IPSEC_AH)"
    kd = build_kd(keys)
    got, _ = parse_keys(parsed, KdPayload((*kd.packets, IEC_KEYS, AH_KEYS)), 1, GROUP, T0, False)
    assert [t.spi for t in got.teks] == [tek.spi]
    # One key packet per skipped SAT, no more.
    extra = KeyPacket(KeyPacketType.TEK, b"\x00\x00\x00\x09", IEC_KEYS.attributes)
    with pytest.raises(NotifyError) as exc:
        parse_keys(parsed, KdPayload((*kd.packets, IEC_KEYS, AH_KEYS, extra)), 1, GROUP, T0, False)
    assert exc.value.notify == NotifyType.INVALID_SPI


# --- GROUPKEY-PULL in memory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sat", "keys", "reason"),
    [
        (IEC_SAT, IEC_KEYS, "unsupported SA TEK protocol 6"),
        (AH_SAT, AH_KEYS, "unsupported SA TEK protocol 2 (GDOI_PROTO_IPSEC_AH)"),
    ],
    ids=["rfc8052", "ah"],
)
def test_pull_with_only_an_unsupported_tek_is_refused(
    monkeypatch: pytest.MonkeyPatch, sat: object, keys: KeyPacket, reason: str
) -> None:
    _offer(monkeypatch, pull, [sat], [keys])
    r = run_pull(directory(kek=make_kek(T0)))
    assert len(r.seen) == 2  # (1), (2), then the GM's notify
    [ev] = r.gm_events
    assert isinstance(ev, PullFailed) and not ev.received
    assert ev.notify == NotifyType.INVALID_PROTOCOL_ID and ev.reason == reason
    assert r.gm.finished
    n = r.p1.ks.open_informational(r.wire[-1]).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_PROTOCOL_ID
    assert n.data == reason.encode()


def test_pull_uses_the_esp_tek_beside_an_unsupported_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _offer(monkeypatch, pull, [IEC_SAT], [IEC_KEYS])
    tek = make_tek("esp-gcm-256", T0)
    r = run_pull(directory(tek, kek=make_kek(T0)))
    assert len(r.seen) == 4
    [ev] = r.gm_events
    assert isinstance(ev, Registered)
    assert [(t.spi, t.cipher_key) for t in ev.keys.teks] == [(tek.spi, tek.cipher_key)]
    assert r.gm.parsed is not None and r.gm.parsed.skipped == (6,)
    # The SA on the wire really carried the RFC 8052 SAT after the ESP one.
    sa = GdoiSaPayload.decode_body(r.seen[1].body(PayloadType.SA))
    assert sa.all_sats[1:] == (IEC_SAT,)


# --- the GM engine: registration and rekeys ---------------------------------------------------


def test_gm_logs_the_real_reason(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    stream = _log_stream()
    _offer(monkeypatch, pull, [IEC_SAT], [IEC_KEYS], esp=False)
    ks, gm = make_ks(files), make_gm(files)
    Net(ks, {GM: gm}).run(gm.start(T0), GM, T0)
    reg = gm.registrations[GROUP]
    assert reg.failures == 1 and reg.state in (RegState.PHASE1, RegState.BACKOFF)
    assert reg.last_failure == "unsupported SA TEK protocol 6 (sent INVALID_PROTOCOL_ID)"
    text = stream.getvalue()
    assert (
        f"%GDOI-4-GM_REG_FAILURE: Registration to KS {KS} failed for group GET: "
        "unsupported SA TEK protocol 6 (sent INVALID_PROTOCOL_ID)" in text
    )
    assert "no answer" not in text and "truncated" not in text
    assert GROUP not in gm.sadb.groups or not gm.sadb.groups[GROUP].teks
    assert ks.counters["registrations"] == 0  # the KS heard the refusal, not message 3


def test_gm_registers_with_the_esp_teks_and_warns(
    files: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    stream = _log_stream()
    _offer(monkeypatch, pull, [IEC_SAT], [IEC_KEYS])
    dp = Dataplane()
    ks, gm = make_ks(files), make_gm(files, dataplane=dp)
    Net(ks, {GM: gm}).run(gm.start(T0), GM, T0)
    assert gm.registrations[GROUP].state == RegState.REGISTERED
    want = {t.spi for t in ks.groups[GROUP].teks}
    assert len(want) == 2 and set(gm.sadb.groups[GROUP].teks) == want
    assert {sa["spi"] for sa in dp.stats(T0)["sas"]} == want  # in the data path too
    assert 'sa_tek_skipped group=GET ks=127.0.0.1 reason="unsupported SA TEK protocol 6"' in (
        stream.getvalue()
    )


@pytest.mark.parametrize("with_esp", [True, False], ids=["esp-and-rfc8052", "rfc8052-only"])
def test_rekey_with_an_unsupported_tek_loses_nothing(
    files: Path,
    monkeypatch: pytest.MonkeyPatch,
    with_esp: bool,  # noqa: F811
) -> None:
    dp = Dataplane()
    ks, gm = make_ks(files), make_gm(files, dataplane=dp)
    net = Net(ks, {GM: gm})
    net.run(gm.start(T0), GM, T0)
    reg, group = gm.registrations[GROUP], gm.sadb.groups[GROUP]
    before = {spi: (t.cipher_key, t.expires_at) for spi, t in group.teks.items()}
    seq = group.seq
    stream = _log_stream()
    _offer(monkeypatch, ks_group, [IEC_SAT], [IEC_KEYS], esp=with_esp)
    now = T0 + 100
    net.run(ks.rekey(ks.groups[GROUP], now), KS, now)
    assert "GM_REKEY_REJECTED" not in stream.getvalue()
    assert group.seq == seq + 1 and reg.rekeys == 1
    assert "unsupported SA TEK protocol 6" in stream.getvalue()
    # Every TEK installed before is still there, with its keys (retired if replaced).
    assert all(group.teks[spi].cipher_key == key for spi, (key, _) in before.items())
    new = set(group.teks) - set(before)
    if with_esp:
        assert len(new) == 2 and new <= {t.spi for t in ks.groups[GROUP].teks}
    else:
        assert new == set()
        assert {spi: (t.cipher_key, t.expires_at) for spi, t in group.teks.items()} == before
    assert {sa["spi"] for sa in dp.stats(now)["sas"]} == set(group.teks)
    assert 0x0A0B0C0D not in group.teks
