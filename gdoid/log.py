"""Every IOS-style console message of gdoid, and the structlog setup rendering them.

Messages are :class:`Mnemonic` constants so the exact console texts of the
GET VPN documentation live in one place and tests can compare them verbatim.
Daemons log them with :func:`emit`; ordinary diagnostics use plain structlog
calls on a logger from :func:`get_logger`.

Two output formats:

* ``ios``:  ``*May  1 12:00:00.123: %GDOI-5-GM_REGS_COMPL: Registration to ...``
  (ordinary events: ``*May  1 12:00:00.123: event key=value ...``), the stamp of IOS's
  ``service timestamps log datetime msec``; the ``*`` only while the clock is unsynchronized.
* ``json``: one object per line with ``timestamp``, ``level``, ``event`` (the
  full IOS text for mnemonic events), ``mnemonic`` and every field.

Over 600 lines because the mnemonic catalogue is one list on purpose: every
console text an operator can see is in one place, next to the renderers that
print it.

Key material never reaches a log line: :func:`redact` runs before rendering.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import re
import socket
import string
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Literal, Protocol, TextIO

import structlog

__all__ = [
    "GM_RECV_DELETE",
    "GM_RECV_DELETE_IMMEDIATE",
    "GM_RECV_REKEY",
    "GM_REG_FAILURE",
    "GM_REGS_COMPL",
    "GM_REKEY_REJECTED",
    "KS_MEMBER_DROPPED",
    "KS_REGS_COMPL",
    "KS_REGS_FAILURE",
    "KS_SEND_GM_REMOVAL",
    "KS_SEND_UNICAST_REKEY",
    "KS_SID_EXHAUSTION_REKEY",
    "MALFORMED_DROP",
    "MAX_FIELD_LEN",
    "MNEMONICS",
    "PHASE1_FAILED",
    "POLICY_CHANGE",
    "REDACTED",
    "UNAUTHORIZED_IDENTITY",
    "UNAUTHORIZED_IPADDR",
    "LogLimiter",
    "Logger",
    "Mnemonic",
    "bound_field",
    "configure_logging",
    "emit",
    "get_logger",
    "ios_line_time",
    "ios_timestamp",
    "kernel_clock_synchronized",
    "redact",
    "severity_to_level",
    "with_notify",
]

REDACTED = "<redacted>"

# Internal event-dict keys used to carry a mnemonic from emit() to the renderer.
_MNEMONIC_KEY = "_gdoi_mnemonic"
_LOGGER_KEY = "logger_name"  # "logger" is a reserved wrap_logger() argument


class Logger(Protocol):
    """What engines and shells call on a logger: structlog's bound logger, or a test recorder.

    ``log`` carries :func:`emit`'s mnemonics (a stdlib level and the mnemonic's name);
    the others are plain structured events (``log.info("event", field=value)``).  Return
    values are ignored (structlog's are ``Any``, a recorder's ``None``).
    """

    def log(self, level: int, event: str, /, **fields: Any) -> object: ...
    def debug(self, event: str, /, **fields: Any) -> object: ...
    def info(self, event: str, /, **fields: Any) -> object: ...
    def warning(self, event: str, /, **fields: Any) -> object: ...
    def error(self, event: str, /, **fields: Any) -> object: ...
    def exception(self, event: str, /, **fields: Any) -> object: ...


@dataclass(frozen=True)
class Mnemonic:
    """One IOS syslog message: ``%FACILITY-SEVERITY-NAME: text``."""

    severity: int
    name: str
    template: str
    facility: str = "GDOI"

    def __post_init__(self) -> None:
        if not 0 <= self.severity <= 7:
            raise ValueError(f"severity {self.severity} outside 0..7")

    @property
    def tag(self) -> str:
        """``GDOI-5-GM_REGS_COMPL``: the mnemonic as IOS prints it, without ``%``."""
        return f"{self.facility}-{self.severity}-{self.name}"

    @property
    def fields(self) -> frozenset[str]:
        """Names of the template's placeholders (all required by :meth:`text`)."""
        return frozenset(
            name.split(".")[0].split("[")[0]
            for _, name, _, _ in string.Formatter().parse(self.template)
            if name
        )

    def text(self, **fields: Any) -> str:
        return f"%{self.tag}: {self.template.format(**fields)}"


GM_REGS_COMPL = Mnemonic(
    5, "GM_REGS_COMPL", "Registration to KS {ks} complete for group {group} using address {address}"
)
KS_REGS_COMPL = Mnemonic(
    5, "KS_REGS_COMPL", "KS completed successful registration in group {group} with GM {gm}"
)
GM_REG_FAILURE = Mnemonic(
    4, "GM_REG_FAILURE", "Registration to KS {ks} failed for group {group}: {reason}"
)
KS_REGS_FAILURE = Mnemonic(
    4, "KS_REGS_FAILURE", "KS registration of GM {gm} failed for group {group}: {reason}"
)
PHASE1_FAILED = Mnemonic(
    4, "PHASE1_FAILED", "IKE phase 1 with {peer} failed: {reason}", facility="IKE"
)
GM_RECV_REKEY = Mnemonic(
    5, "GM_RECV_REKEY", "Received Rekey for group {group} from {ks} to {address} with seq # {seq}"
)
# ``extra`` is "" or a qualifier ending in a space, e.g. "with policy-replace ".
KS_SEND_UNICAST_REKEY = Mnemonic(
    5,
    "KS_SEND_UNICAST_REKEY",
    "Sending Unicast Rekey {extra}for group {group} from address {address} with seq # {seq}",
)
GM_RECV_DELETE = Mnemonic(
    4,
    "GM_RECV_DELETE",
    "GM received delete-msg from KS in group {group}. "
    "TEKs lifetime are reduced and re-registration will start before SA expiry",
)
GM_RECV_DELETE_IMMEDIATE = Mnemonic(
    4,
    "GM_RECV_DELETE_IMMEDIATE",
    "GM receive REMOVAL-NOW in group {group} to cleanup downloaded policy now. "
    "Re-registration will start in a randomly chosen period of {seconds} sec",
)
# "will be send" is Cisco's wording; reproduced verbatim.
POLICY_CHANGE = Mnemonic(
    5,
    "POLICY_CHANGE",
    "GDOI group {group} policy has changed. Use 'crypto gdoi ks rekey' to send a rekey, "
    "or the changes will be send in the next scheduled rekey",
)
GM_REKEY_REJECTED = Mnemonic(
    4, "GM_REKEY_REJECTED", "Rekey for group {group} from {ks} rejected: {reason}"
)
KS_MEMBER_DROPPED = Mnemonic(
    4, "KS_MEMBER_DROPPED", "GM {gm} dropped from group {group} after {missed} missed rekeys"
)
KS_SEND_GM_REMOVAL = Mnemonic(
    5, "KS_SEND_GM_REMOVAL", "Sending GM-Removal message to group {group}..."
)
KS_SID_EXHAUSTION_REKEY = Mnemonic(
    5,
    "KS_SID_EXHAUSTION_REKEY",
    "Sender-ID space of group {group} low ({free} of {size} free, {released} held by departed GMs): rekeying",
)
MALFORMED_DROP = Mnemonic(4, "MALFORMED_DROP", "Dropped malformed message from {peer}: {reason}")
COOP_KS_TRANS_TO_PRI = Mnemonic(
    5,
    "COOP_KS_TRANS_TO_PRI",
    "KS {ks} in group {group} transitioned to Primary (Previous Primary = {previous})",
)
COOP_KS_TRANS_TO_SEC = Mnemonic(
    5,
    "COOP_KS_TRANS_TO_SEC",
    "KS {ks} in group {group} transitioned to Secondary (Primary = {primary})",
)
COOP_KS_ELECTION = Mnemonic(
    5,
    "COOP_KS_ELECTION",
    "KS entering election mode in group {group} (Previous Primary = {previous})",
)
COOP_KS_REACH = Mnemonic(
    5, "COOP_KS_REACH", "Reachability restored with Cooperative KS {peer} in group {group}."
)
COOP_KS_UNREACH = Mnemonic(
    3,
    "COOP_KS_UNREACH",
    "Cooperative KS {peer} Unreachable in group {group}. IKE SA Status = {status}",
)
COOP_ANN_REJECTED = Mnemonic(4, "COOP_ANN_REJECTED", "ANN from {peer} dropped: {reason}")
# IOS's texts for a GM outside a group's ``authorization address ipv4`` / ``identity``.
UNAUTHORIZED_IPADDR = Mnemonic(
    1,
    "UNAUTHORIZED_IPADDR",
    "Group {group} received registration from unauthorized ip address: {address}",
)
UNAUTHORIZED_IDENTITY = Mnemonic(
    1,
    "UNAUTHORIZED_IDENTITY",
    "Group {group} received registration from unauthorized identity: {identity}",
)

MNEMONICS: Mapping[str, Mnemonic] = {
    m.name: m
    for m in (
        GM_REGS_COMPL,
        KS_REGS_COMPL,
        GM_REG_FAILURE,
        KS_REGS_FAILURE,
        PHASE1_FAILED,
        GM_RECV_REKEY,
        KS_SEND_UNICAST_REKEY,
        GM_RECV_DELETE,
        GM_RECV_DELETE_IMMEDIATE,
        POLICY_CHANGE,
        GM_REKEY_REJECTED,
        KS_MEMBER_DROPPED,
        KS_SEND_GM_REMOVAL,
        KS_SID_EXHAUSTION_REKEY,
        MALFORMED_DROP,
        COOP_KS_TRANS_TO_PRI,
        COOP_KS_TRANS_TO_SEC,
        COOP_KS_ELECTION,
        COOP_KS_REACH,
        COOP_KS_UNREACH,
        COOP_ANN_REJECTED,
        UNAUTHORIZED_IPADDR,
        UNAUTHORIZED_IDENTITY,
    )
}


def severity_to_level(severity: int) -> int:
    """IOS severity (0 emergencies .. 7 debugging) to a stdlib logging level."""
    if severity <= 3:
        return logging.ERROR
    if severity == 4:
        return logging.WARNING
    if severity <= 6:  # 5 notifications, 6 informational: stdlib has no NOTICE
        return logging.INFO
    return logging.DEBUG


# --------------------------------------------------------------------------- redaction

_SECRET_NAME_PARTS = ("key", "secret", "psk", "password", "skeyid")
_MAX_CLEAR_BYTES = 8  # SPIs and cookies are <= 8 octets; anything longer may be key material


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_NAME_PARTS)


def _redact_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return REDACTED if len(raw) > _MAX_CLEAR_BYTES else raw.hex()
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _is_secret_name(k) else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return value


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: hide secret-named fields and long byte strings.

    Short byte strings (SPIs, cookies) are shown as hex so JSON can carry them.
    """
    for name, value in list(event_dict.items()):
        if name in ("event", _MNEMONIC_KEY):
            continue
        event_dict[name] = REDACTED if _is_secret_name(name) else _redact_value(value)
    return event_dict


# --------------------------------------------------------------------------- rendering


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronized (STA_UNSYNC or STA_CLOCKERR)
_libc: ctypes.CDLL | None = None


def kernel_clock_synchronized() -> bool:
    """Whether the kernel says the clock is synchronized (a read-only adjtimex(2))."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex, modes = 0: only read
        state = _libc.adjtimex(timex)
    except (OSError, AttributeError):
        return False  # no way to know: mark the stamp as IOS does an unsynchronized clock
    return state >= 0 and state != _TIME_ERROR


# Which clock-sync query the ios renderer asks; configure_logging() sets it (tests inject one).
_clock_synchronized: Callable[[], bool] = kernel_clock_synchronized


def ios_timestamp(stamp: datetime, synchronized: bool) -> str:
    """IOS ``service timestamps log datetime msec``: ``*Jan  8 08:37:03.103`` (``*``: unsynced)."""
    mark = "" if synchronized else "*"
    return (
        f"{mark}{_MONTHS[stamp.month - 1]} {stamp.day:2d} "
        f"{stamp:%H:%M:%S}.{stamp.microsecond // 1000:03d}"
    )


_IOS_STAMP = re.compile(r"^\*?([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d)\.(\d{3}): ")


def ios_line_time(line: str, year: int | None = None) -> float:
    """The time (epoch seconds, local time) of an ``ios`` log line; IOS stamps carry no year."""
    m = _IOS_STAMP.match(line)
    if m is None:
        raise ValueError(f"not an ios log line: {line!r}")
    mon, day, hh, mm, ss, ms = m.groups()
    stamp = datetime(
        datetime.now().year if year is None else year,
        _MONTHS.index(mon) + 1,
        int(day),
        int(hh),
        int(mm),
        int(ss),
        int(ms) * 1000,
    )
    return stamp.timestamp()


def _add_timestamp(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["timestamp"] = datetime.now().astimezone()
    return event_dict


def _add_level(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # "exception" is structlog's alias for error-with-traceback.
    event_dict["level"] = "error" if method == "exception" else method
    return event_dict


def _render_mnemonic(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Turn an emit() event into its IOS text; runs after redaction on purpose."""
    mnemonic = event_dict.pop(_MNEMONIC_KEY, None)
    if isinstance(mnemonic, Mnemonic):
        event_dict["event"] = mnemonic.text(**event_dict)
        event_dict["mnemonic"] = mnemonic.tag
        event_dict["severity"] = mnemonic.severity
    return event_dict


def _kv_value(value: Any) -> str:
    text = (
        value
        if isinstance(value, str)
        else str(value)
        if isinstance(value, int | float)
        else repr(value)
    )
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def _ios_renderer(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    stamp: datetime = event_dict.pop("timestamp")
    head = ios_timestamp(stamp, _clock_synchronized()) + ":"
    exc = event_dict.pop("exception", None)
    event = str(event_dict.pop("event", ""))
    if "mnemonic" in event_dict:
        line = f"{head} {event}"  # the IOS text alone, exactly as on the console
    else:
        for internal in ("level", _LOGGER_KEY):
            event_dict.pop(internal, None)
        pairs = " ".join(f"{k}={_kv_value(v)}" for k, v in event_dict.items())
        line = f"{head} {event} {pairs}" if pairs else f"{head} {event}"
    if exc:
        line = f"{line}\n{exc}"
    return line


def _json_renderer(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    stamp: datetime = event_dict["timestamp"]
    event_dict["timestamp"] = stamp.isoformat(timespec="milliseconds")
    return json.dumps(dict(event_dict), default=str)


JOURNAL_SOCKET = "/run/systemd/journal/socket"
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_FIELD_OK = re.compile(r"[^A-Z0-9_]")


def journal_fields(event_dict: MutableMapping[str, Any]) -> dict[str, str]:
    """An event as journald fields: MESSAGE is the IOS line, every field its own KEY."""
    message = str(event_dict.get("event", ""))
    if "mnemonic" not in event_dict:
        # No IOS text: MESSAGE carries the details too (journalctl shows only MESSAGE).
        pairs = " ".join(
            f"{k}={_kv_value(v)}"
            for k, v in event_dict.items()
            if k not in ("event", "level", "timestamp", "severity", _LOGGER_KEY)
        )
        message = f"{message} {pairs}" if pairs else message
    fields = {
        "MESSAGE": message,
        # IOS severities are syslog severities: %GDOI-5-... is PRIORITY=5 (notice).
        "PRIORITY": str(
            event_dict.get(
                "severity", _SYSLOG_PRIORITY.get(str(event_dict.get("level", "info")), 6)
            )
        ),
        "SYSLOG_IDENTIFIER": "gdoid",
    }
    if "mnemonic" in event_dict:
        fields["GDOI_MNEMONIC"] = str(event_dict["mnemonic"])
    for key, value in event_dict.items():
        if key in ("event", "level", "timestamp", "mnemonic"):
            continue
        name = "GDOI_" + _FIELD_OK.sub("_", key.upper())
        fields[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return fields


def encode_journal(fields: Mapping[str, str]) -> bytes:
    """systemd's native journal protocol: KEY=value lines, binary-safe form for newlines."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """A structlog logger that sends each rendered event to journald's socket."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO = sys.stderr) -> None:
        self.path = path
        self.fallback = fallback
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def msg(self, message: bytes) -> None:
        try:
            self.sock.sendto(message, self.path)
        except OSError:  # no journald (or a message too large): keep the line on stderr
            self.fallback.write(message.decode("utf-8", "replace") + "\n")
            self.fallback.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg


def _journal_renderer(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> bytes:
    event_dict.pop("timestamp", None)  # journald stamps entries itself
    exc = event_dict.pop("exception", None)
    fields = journal_fields(event_dict)
    if exc:
        fields["GDOI_EXCEPTION"] = str(exc)
    return encode_journal(fields)


def configure_logging(
    fmt: Literal["ios", "json", "journal"] = "ios",
    stream: TextIO = sys.stderr,
    level: int = logging.INFO,
    journal_socket: str = JOURNAL_SOCKET,
    clock_synchronized: Callable[[], bool] = kernel_clock_synchronized,
) -> None:
    """Configure structlog process-wide; callable again (tests, SIGHUP) to switch.

    ``clock_synchronized`` decides the ``*`` of ``ios`` stamps (the kernel's view by default).

    ``journal`` sends entries to journald natively: MESSAGE is the IOS line and
    every structured field is a GDOI_* journal field (``journalctl -o verbose``).
    """
    global _clock_synchronized
    _clock_synchronized = clock_synchronized
    if fmt not in ("ios", "json", "journal"):
        raise ValueError(f"unknown log format {fmt!r} (expected 'ios', 'json' or 'journal')")
    if fmt == "journal":
        journal = JournalLogger(journal_socket, stream)
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                _add_level,
                _add_timestamp,
                structlog.processors.format_exc_info,
                redact,
                _render_mnemonic,
                _journal_renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=lambda *_args: journal,
            cache_logger_on_first_use=False,
        )
        return
    renderer = _ios_renderer if fmt == "ios" else _json_renderer
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_level,
            _add_timestamp,
            structlog.processors.format_exc_info,
            redact,
            _render_mnemonic,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Not cached: loggers created at import time must follow a later reconfigure.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Logger:
    """A structlog logger whose events carry ``logger_name=<name>`` (shown in JSON only)."""
    logger: Logger = structlog.get_logger(**{_LOGGER_KEY: name})
    return logger


def emit(logger: Logger, mnemonic: Mnemonic, **fields: Any) -> None:
    """Log ``mnemonic`` at the level its severity implies.

    Missing template fields raise at once (a programming error, better caught in
    tests than logged as a broken line). Extra fields go to JSON output only.
    """
    missing = mnemonic.fields - fields.keys()
    if missing:
        raise TypeError(f"{mnemonic.name}: missing field(s) {', '.join(sorted(missing))}")
    logger.log(
        severity_to_level(mnemonic.severity), mnemonic.name, **{_MNEMONIC_KEY: mnemonic}, **fields
    )


# --------------------------------------------------------------------------- rate limiting

# Lines that unauthenticated or unverified input can trigger go through a LogLimiter:
# a flood of bad datagrams must not become a flood of log lines (or a 176 KB line).
MAX_FIELD_LEN = 200  # characters of any one field; the rest is cut and counted
LIMIT_LINES = 10  # lines per mnemonic (and key) per interval ...
LIMIT_INTERVAL = 10.0  # ... seconds; then one summary line per interval


def bound_field(value: Any, limit: int = MAX_FIELD_LEN) -> Any:
    """``value`` cut to ``limit`` characters if it is a string (peer-derived text)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}...[{len(value) - limit} more characters]"
    return value


def with_notify(reason: str, notify: Enum | None, received: bool) -> str:
    """``reason`` plus the notify sent or received: ``"... (received INVALID_ID_INFORMATION)"``."""
    reason = bound_field(reason, 140)  # peer-derived text: cut here, so the notify name stays
    if notify is None:
        return reason
    return f"{reason} ({'received' if received else 'sent'} {notify.name})"


@dataclass
class _Window:
    mnemonic: Mnemonic
    logger: Logger
    started: float
    lines: int = 0
    suppressed: int = 0


class LogLimiter:
    """Per-mnemonic (optionally per-key) rate limit for :func:`emit`.

    At most ``lines`` lines per ``interval`` seconds; what is held back is counted
    and reported as one summary line (``%GDOI-4-MALFORMED_DROP: 1234 similar
    messages suppressed in the last 10 s``) once the interval is over: at the next
    emit of that mnemonic or at :meth:`flush` (the daemons call it from their timer).
    Every string field is cut to ``field_limit`` characters.  Its clock is its own
    (log volume is about real time), injectable for tests.
    """

    def __init__(
        self,
        lines: int = LIMIT_LINES,
        interval: float = LIMIT_INTERVAL,
        field_limit: int = MAX_FIELD_LEN,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        self.lines = lines
        self.interval = interval
        self.field_limit = field_limit
        self.clock = clock
        self.max_keys = max_keys  # keys may be peer-derived: the table itself is bounded
        self.suppressed_total = 0
        self._windows: dict[tuple[str, str], _Window] = {}

    def emit(self, logger: Logger, mnemonic: Mnemonic, *, key: str = "", **fields: Any) -> bool:
        """Log ``mnemonic`` unless its budget is spent; True if a line was written."""
        now = self.clock()
        wkey = (mnemonic.name, key)
        w = self._windows.get(wkey)
        if w is not None and now - w.started >= self.interval:
            self._close(w, now)
            w = None
            del self._windows[wkey]
        if w is None:
            if key and len(self._windows) >= self.max_keys:
                return self.emit(logger, mnemonic, **fields)  # too many keys: share one budget
            w = self._windows[wkey] = _Window(mnemonic, logger, now)
        if w.lines >= self.lines:
            w.suppressed += 1
            self.suppressed_total += 1
            return False
        w.lines += 1
        emit(logger, mnemonic, **{k: bound_field(v, self.field_limit) for k, v in fields.items()})
        return True

    def flush(self, force: bool = False) -> None:
        """Write the summaries of intervals that are over (all of them with ``force``)."""
        now = self.clock()
        for wkey, w in list(self._windows.items()):
            if force or now - w.started >= self.interval:
                self._close(w, now)
                del self._windows[wkey]

    def _close(self, w: _Window, now: float) -> None:
        if not w.suppressed:
            return
        seconds = max(1, round(min(now - w.started, self.interval)))
        summary = Mnemonic(
            w.mnemonic.severity,
            w.mnemonic.name,
            "{count} similar messages suppressed in the last {seconds} s",
            w.mnemonic.facility,
        )
        emit(w.logger, summary, count=w.suppressed, seconds=seconds, suppressed=w.suppressed)
