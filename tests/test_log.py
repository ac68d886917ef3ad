"""gdoid.log: exact IOS texts, both renderers, redaction of key material."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from gdoid import log
from gdoid.log import (
    GM_RECV_DELETE,
    GM_RECV_DELETE_IMMEDIATE,
    GM_REGS_COMPL,
    KS_SEND_GM_REMOVAL,
    KS_SEND_UNICAST_REKEY,
    MNEMONICS,
    PHASE1_FAILED,
    POLICY_CHANGE,
    REDACTED,
    Mnemonic,
    configure_logging,
    emit,
    get_logger,
)

# IOS "service timestamps log datetime msec": "*Jan 28 08:37:03.103: %GDOI-..." ("*": unsynced).
IOS_LINE = re.compile(r"^\*?[A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d\.\d{3}: (?P<text>.*)$")


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _configure(fmt: str, level: int = logging.DEBUG) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt, stream=stream, level=level)  # type: ignore[arg-type]  # parametrized with format names, some invalid on purpose
    return stream


def _ios_texts(stream: io.StringIO) -> list[str]:
    texts = []
    for line in stream.getvalue().splitlines():
        m = IOS_LINE.match(line)
        assert m, f"not an IOS log line: {line!r}"
        texts.append(m["text"])
    return texts


# --------------------------------------------------------------------------- texts


def test_policy_change_text_matches_spec() -> None:
    assert POLICY_CHANGE.text(group="GET") == (
        "%GDOI-5-POLICY_CHANGE: GDOI group GET policy has changed. Use 'crypto gdoi ks "
        "rekey' to send a rekey, or the changes will be send in the next scheduled rekey"
    )


def test_removal_now_text_matches_spec() -> None:
    assert GM_RECV_DELETE_IMMEDIATE.text(group="GET", seconds=34) == (
        "%GDOI-4-GM_RECV_DELETE_IMMEDIATE: GM receive REMOVAL-NOW in group GET to cleanup "
        "downloaded policy now. Re-registration will start in a randomly chosen period of 34 sec"
    )


def test_unicast_rekey_with_policy_replace_matches_spec() -> None:
    text = KS_SEND_UNICAST_REKEY.text(
        extra="with policy-replace ", group="GET", address="10.0.8.1", seq=2
    )
    assert text == (
        "%GDOI-5-KS_SEND_UNICAST_REKEY: Sending Unicast Rekey with policy-replace "
        "for group GET from address 10.0.8.1 with seq # 2"
    )
    plain = KS_SEND_UNICAST_REKEY.text(extra="", group="GET", address="10.0.8.1", seq=3)
    assert "Sending Unicast Rekey for group GET from" in plain


def test_other_spec_texts() -> None:
    assert GM_RECV_DELETE.text(group="GET") == (
        "%GDOI-4-GM_RECV_DELETE: GM received delete-msg from KS in group GET. "
        "TEKs lifetime are reduced and re-registration will start before SA expiry"
    )
    assert (
        KS_SEND_GM_REMOVAL.text(group="GET")
        == "%GDOI-5-KS_SEND_GM_REMOVAL: Sending GM-Removal message to group GET..."
    )
    assert GM_REGS_COMPL.text(ks="10.0.8.1", group="GET", address="10.0.0.2") == (
        "%GDOI-5-GM_REGS_COMPL: Registration to KS 10.0.8.1 complete for group GET "
        "using address 10.0.0.2"
    )


def test_facility_override() -> None:
    assert PHASE1_FAILED.tag == "IKE-4-PHASE1_FAILED"
    assert PHASE1_FAILED.text(peer="10.0.0.2", reason="bad PSK").startswith(
        "%IKE-4-PHASE1_FAILED: IKE phase 1 with 10.0.0.2"
    )


def test_registry_is_complete_and_consistent() -> None:
    constants = {v.name: v for v in vars(log).values() if isinstance(v, Mnemonic)}
    assert constants == dict(MNEMONICS)
    for name, m in MNEMONICS.items():
        assert m.name == name
        assert 0 <= m.severity <= 7


def test_mnemonic_is_frozen_and_validated() -> None:
    with pytest.raises(AttributeError):
        POLICY_CHANGE.severity = 3  # type: ignore[misc]  # assigning a frozen field on purpose
    with pytest.raises(ValueError):
        Mnemonic(9, "X", "x")


# --------------------------------------------------------------------------- rendering


def test_ios_mode_renders_exact_console_text() -> None:
    stream = _configure("ios")
    logger = get_logger("gdoid.ks")
    emit(logger, POLICY_CHANGE, group="GET")
    emit(logger, GM_RECV_DELETE_IMMEDIATE, group="GET", seconds=34, spi=0x1234)
    assert _ios_texts(stream) == [
        POLICY_CHANGE.text(group="GET"),
        GM_RECV_DELETE_IMMEDIATE.text(group="GET", seconds=34),  # extra field not in IOS text
    ]


def test_ios_mode_ordinary_event_is_key_value() -> None:
    stream = _configure("ios")
    get_logger("gdoid.gm").info("sa installed", spi=4660, group="GET", note="two words")
    assert _ios_texts(stream) == ['sa installed spi=4660 group=GET note="two words"']


def test_json_mode_carries_mnemonic_and_fields() -> None:
    stream = _configure("json")
    emit(
        get_logger("gdoid.ks"),
        KS_SEND_UNICAST_REKEY,
        extra="with policy-replace ",
        group="GET",
        address="10.0.8.1",
        seq=2,
    )
    get_logger("gdoid.ks").debug("plain", x=1)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["mnemonic"] == "GDOI-5-KS_SEND_UNICAST_REKEY"
    assert first["event"] == KS_SEND_UNICAST_REKEY.text(
        extra="with policy-replace ", group="GET", address="10.0.8.1", seq=2
    )
    assert first["level"] == "info"
    assert (first["group"], first["address"], first["seq"]) == ("GET", "10.0.8.1", 2)
    assert first["logger_name"] == "gdoid.ks"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", first["timestamp"])
    assert second["event"] == "plain" and second["x"] == 1 and "mnemonic" not in second


def test_severity_maps_to_level_and_filtering() -> None:
    stream = _configure("json", level=logging.WARNING)
    logger = get_logger("t")
    emit(logger, POLICY_CHANGE, group="GET")  # severity 5 -> info: filtered out
    emit(logger, GM_RECV_DELETE, group="GET")  # severity 4 -> warning
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["mnemonic"], e["level"]) for e in lines] == [("GDOI-4-GM_RECV_DELETE", "warning")]
    assert [log.severity_to_level(s) for s in range(8)] == [
        logging.ERROR,
        logging.ERROR,
        logging.ERROR,
        logging.ERROR,
        logging.WARNING,
        logging.INFO,
        logging.INFO,
        logging.DEBUG,
    ]


def test_emit_rejects_missing_fields() -> None:
    _configure("ios")
    with pytest.raises(TypeError, match="seconds"):
        emit(get_logger("t"), GM_RECV_DELETE_IMMEDIATE, group="GET")


def test_logger_follows_reconfiguration() -> None:
    logger = get_logger("early")  # created before configure, as module-level loggers are
    stream = _configure("json")
    logger.info("hello")
    assert json.loads(stream.getvalue())["event"] == "hello"


# --------------------------------------------------------------------------- redaction


SECRET = b"\x8a\x11supersecretkeymaterial\x00\xff"


@pytest.mark.parametrize("fmt", ["ios", "json"])
def test_keys_never_appear_in_logs(fmt: str) -> None:
    stream = _configure(fmt)
    logger = get_logger("gdoid.ks")
    logger.info(
        "tek installed",
        key=b"0123456789abcdef",
        kek_key="hunter2",
        psk="cisco123",
        SKEYID_e=b"\xaa\xbb",
        admin_password="pw-hunter3",
        blob=bytes(range(16)),
        spi=0xDEADBEEF,
        cookie=b"\x01\x02\x03\x04\x05\x06\x07\x08",
        group="GET",
        peer="10.0.0.2",
    )
    emit(logger, log.MALFORMED_DROP, peer="10.0.0.3", reason="x", secret_value=SECRET)
    out = stream.getvalue()
    for leaked in (
        "0123456789abcdef",
        "hunter2",
        "cisco123",
        "aabb",
        "hunter3",
        "supersecret",
        bytes(range(16)).hex(),
        SECRET.hex(),
    ):
        assert leaked not in out, leaked
    if fmt == "json":
        ev, drop = (json.loads(line) for line in out.splitlines())
        for name in ("key", "kek_key", "psk", "SKEYID_e", "admin_password", "blob"):
            assert ev[name] == REDACTED, name
        assert ev["spi"] == 0xDEADBEEF and ev["group"] == "GET" and ev["peer"] == "10.0.0.2"
        assert ev["cookie"] == "0102030405060708"  # 8 octets: an identifier, shown as hex
        assert drop["secret_value"] == REDACTED
    else:
        assert "key=<redacted>" in out and "blob=<redacted>" in out and "group=GET" in out


def test_redact_processor_nested_values() -> None:
    ev = log.redact(None, "info", {"event": "x", "payload": {"psk": "a", "n": [b"z" * 20, 1]}})
    assert ev["payload"] == {"psk": REDACTED, "n": [REDACTED, 1]}


# --------------------------------------------------------------------------- ios timestamps


def test_ios_timestamp_is_ios_datetime_msec_form() -> None:
    """``service timestamps log datetime msec``: month, space-padded day, time with ms."""
    assert log.ios_timestamp(datetime(2026, 1, 28, 8, 37, 3, 103_999), False) == (
        "*Jan 28 08:37:03.103"
    )
    assert log.ios_timestamp(datetime(2026, 3, 1, 0, 0, 53, 5_000), True) == "Mar  1 00:00:53.005"
    stamp = datetime(2026, 12, 1, 23, 59, 59, 999_000)
    assert log.ios_line_time(log.ios_timestamp(stamp, False) + ": x", 2026) == stamp.timestamp()


@pytest.mark.parametrize(("synced", "mark"), [(True, ""), (False, "*")])
def test_ios_line_marks_an_unsynchronized_clock(synced: bool, mark: str) -> None:
    stream = io.StringIO()
    configure_logging("ios", stream=stream, clock_synchronized=lambda: synced)
    emit(get_logger("t"), GM_RECV_DELETE, group="GET")
    get_logger("t").info("plain", a=1)
    first, second = stream.getvalue().splitlines()
    stamp = r"[A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d\.\d{3}: "
    assert re.fullmatch(
        re.escape(mark) + stamp + re.escape(GM_RECV_DELETE.text(group="GET")), first
    )
    assert re.fullmatch(re.escape(mark) + stamp + "plain a=1", second)
    assert abs(log.ios_line_time(first) - time.time()) < 5  # the local time of now


def test_kernel_clock_query_answers() -> None:
    """adjtimex(2) answers here (a container may well be unsynchronized: either is fine)."""
    assert log.kernel_clock_synchronized() in (True, False)
