"""Control-socket protocol shared by the KS and GM daemons and ``gdoictl``.

Transport: a Unix stream socket, one JSON object per line in each direction,
any number of request/response pairs per connection, answered in order.

Request::

    {"command": ["clear", "crypto", "gdoi", "ks", "members"], "confirm": 0}

Response::

    {"ok": false, "output": "", "data": null, "error": null,
     "prompts": ["\\n% This GM-Removal message ...\\nAre you sure you want to proceed? ? [yes/no]: "]}

Confirmation flow: a command needing confirmation answers ``ok=false`` with
its prompt texts while ``confirm < len(prompts)``; the daemon chooses the
texts (it alone knows whether e.g. the "some devices cannot support" warning
applies). The client shows them one by one and, when every answer is
``yes``, resends the same command with ``confirm=len(prompts)``. Nothing is
executed before that, so an aborted prompt has no side effect.

Access: the socket file is 0600 (0660 with ``control_group``), and every
request is checked against the caller's kernel-reported credentials
(``SO_PEERCRED``/``SO_PEERGROUPS``, fixed at connect time): only root, the
daemon's own user and members of ``control_group`` are served; anyone else
gets ``% Permission denied`` and a rate-limited log line.  The file mode is
the first fence, the credential check holds even if the mode is loosened.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gdoid.commands import is_read_only
from gdoid.log import get_logger

__all__ = [
    "MAX_LINE",
    "PERMISSION_DENIED",
    "ControlAccess",
    "ControlRequest",
    "ControlResponse",
    "ControlServer",
    "Handler",
    "request",
    "request_sync",
]

MAX_LINE = 64 * 1024  # requests are a few words; anything bigger is abuse or a bug
_MAX_RESPONSE = 64 * 1024 * 1024  # show output for thousands of GMs stays far below this
_READ_CHUNK = 64 * 1024
_CLOSE_GRACE = 1.0  # seconds a running command may take to finish at shutdown

_log = get_logger("gdoid.control")

PERMISSION_DENIED = "% Permission denied"
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python does not export it
_DENIED_LOG_BURST = 5  # denial log lines per interval; the rest are counted
_DENIED_LOG_INTERVAL = 60.0


def _loads_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"bad JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a JSON object")
    return obj


@dataclass(frozen=True)
class ControlRequest:
    command: tuple[str, ...]
    confirm: int = 0

    def __post_init__(self) -> None:
        if not all(isinstance(w, str) for w in self.command):
            raise ValueError("command must be a list of strings")
        # bool is an int subclass; "confirm": true is a client bug, not 1.
        if isinstance(self.confirm, bool) or not isinstance(self.confirm, int) or self.confirm < 0:
            raise ValueError("confirm must be a non-negative integer")

    def to_json(self) -> str:
        return json.dumps({"command": list(self.command), "confirm": self.confirm})

    @classmethod
    def from_json(cls, text: str | bytes) -> ControlRequest:
        obj = _loads_object(text, "request")
        command = obj.get("command")
        if not isinstance(command, list) or not command:
            raise ValueError("'command' must be a non-empty list of strings")
        return cls(command=tuple(command), confirm=obj.get("confirm", 0))


@dataclass(frozen=True)
class ControlResponse:
    ok: bool
    output: str = ""
    data: Any = None
    error: str | None = None
    prompts: tuple[str, ...] = field(default=())

    @classmethod
    def failure(cls, error: str) -> ControlResponse:
        return cls(ok=False, error=error)

    @classmethod
    def confirm_needed(cls, *prompts: str) -> ControlResponse:
        return cls(ok=False, prompts=tuple(prompts))

    def to_json(self) -> str:
        return json.dumps(
            {
                "ok": self.ok,
                "output": self.output,
                "data": self.data,
                "error": self.error,
                "prompts": list(self.prompts) or None,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ControlResponse:
        obj = _loads_object(text, "response")
        ok, output, error = obj.get("ok"), obj.get("output") or "", obj.get("error")
        prompts = obj.get("prompts") or []
        if not isinstance(ok, bool):
            raise ValueError("'ok' must be a boolean")
        if not isinstance(output, str) or not (error is None or isinstance(error, str)):
            raise ValueError("'output' and 'error' must be strings")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("'prompts' must be a list of strings or null")
        return cls(ok=ok, output=output, data=obj.get("data"), error=error, prompts=tuple(prompts))


Handler = Callable[[ControlRequest], Awaitable[ControlResponse]]


@dataclass(frozen=True)
class PeerCred:
    """A Unix-socket client as the kernel saw it at connect() time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_credentials(sock: Any) -> PeerCred | None:
    """``SO_PEERCRED`` (+ ``SO_PEERGROUPS``) of a connected Unix socket; None if unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except (OSError, struct.error, AttributeError):
        return None
    groups: tuple[int, ...] = ()
    # 256 groups fit Python's getsockopt buffer limit; a peer with more (ERANGE)
    # is judged by uid and primary gid only, which can only deny, never grant.
    with contextlib.suppress(OSError):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return PeerCred(pid, uid, gid, groups)


def _resolve_group(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    try:
        if isinstance(group, int) or group.isdigit():
            return grp.getgrgid(int(group)).gr_gid
        return grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        raise OSError(f"control_group {group!r}: no such group") from None


class ControlAccess:
    """Who may use the control socket, per kind of command (see commands.is_read_only).

    Changing commands (``clear ...``, ``crypto gdoi ks rekey``, ``reload``, and
    anything unrecognised): root, the daemon's user, ``control_group``.
    ``show``: the same principals; nobody else gets anything, since the show
    output names every member, identity and SPI.
    """

    def __init__(self, group: str | int | None = None, owner_uid: int | None = None) -> None:
        self.group = group
        self.gid = _resolve_group(group)
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid

    @property
    def socket_mode(self) -> int:
        return 0o660 if self.gid is not None else 0o600

    def _trusted(self, cred: PeerCred) -> bool:
        return cred.uid in (0, self.owner_uid)

    def _in_group(self, cred: PeerCred) -> bool:
        return self.gid is not None and (cred.gid == self.gid or self.gid in cred.groups)

    def permits(self, cred: PeerCred | None, command: tuple[str, ...]) -> bool:
        if cred is None:  # credentials unknown: fail closed
            return False
        # Both kinds go to the same principals (issue 9 §5); is_read_only() is the
        # one place that tells them apart, here and in the denial log.
        return self._trusted(cred) or self._in_group(cred)


class _LogLimiter:
    """At most ``burst`` lines per ``interval``; the next line reports what was dropped."""

    def __init__(
        self, burst: int = _DENIED_LOG_BURST, interval: float = _DENIED_LOG_INTERVAL
    ) -> None:
        self.burst = burst
        self.interval = interval
        self._window_start = float("-inf")
        self._used = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if now - self._window_start >= self.interval:
            self._window_start, self._used = now, 0
        if self._used < self.burst:
            self._used += 1
            return True
        self.suppressed += 1
        return False


class _LineTooLong:
    """Marker yielded by :func:`_lines` once per oversized line."""


_TOO_LONG = _LineTooLong()


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes | _LineTooLong]:
    """Split a stream into lines, reporting (once) and skipping lines > MAX_LINE.

    StreamReader.readline() would resynchronise mid-line after an overrun and
    parse the tail of a huge line as a request; this keeps line boundaries.
    """
    buf = bytearray()
    discarding = False
    while chunk := await reader.read(_READ_CHUNK):
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:
                    if not discarding:
                        discarding = True
                        yield _TOO_LONG
                    buf.clear()
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if discarding:
                discarding = False
            elif len(line) > MAX_LINE:
                yield _TOO_LONG
            else:
                yield line


class ControlServer:
    """Serves ``handler`` on a Unix socket, mode 0600 (0660 with a control group),
    to the callers ``access`` permits."""

    def __init__(self, path: Path, handler: Handler, access: ControlAccess | None = None) -> None:
        self.path = Path(path)
        self._handler = handler
        self.access = access if access is not None else ControlAccess()
        self._denied_log = _LogLimiter()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("control server already started")
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        await self._remove_stale()
        self._closing = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bind under a tight umask so the socket is never reachable by others,
            # not even between bind() and chmod(). No await in between: nothing
            # else in this loop sees the changed umask.
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            if self.access.gid is not None and os.stat(self.path).st_gid != self.access.gid:
                # Group first, then mode: never 0660 for the wrong group.
                os.chown(self.path, -1, self.access.gid)
            os.chmod(self.path, self.access.socket_mode)
            sock.setblocking(False)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise

    async def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), 1.0)
        except (OSError, TimeoutError):
            self.path.unlink(missing_ok=True)  # nobody listening: left over from a crash
            return
        writer.close()
        raise RuntimeError(f"{self.path} is in use by a running daemon")

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        # Closing the transports ends each connection loop with EOF; only a
        # handler still busy after the grace period gets cancelled.
        for writer in list(self._conns.values()):
            writer.close()
        if self._conns:
            _, busy = await asyncio.wait(list(self._conns), timeout=_CLOSE_GRACE)
            for task in busy:
                task.cancel()
            if busy:
                await asyncio.wait(busy)
        await server.wait_closed()
        # Only unlink our own socket, not one a newer daemon has bound since.
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing:  # accepted just before close(): nothing will be served
            writer.close()
            return
        self._conns[task] = writer
        cred = peer_credentials(writer.get_extra_info("socket"))
        try:
            async for line in _lines(reader):
                if isinstance(line, _LineTooLong):
                    error = f"request line longer than {MAX_LINE} bytes"
                    answer = ControlResponse.failure(error).to_json()
                elif not line.strip():
                    continue
                else:
                    answer = await self._dispatch(line, cred)
                writer.write(answer.encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass  # client went away; nothing to answer
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly. (3.11's stream callback logs an
            # error for a connection task that ends cancelled.)
            if not self._closing:
                raise
        finally:
            self._conns.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _deny(self, cred: PeerCred | None, command: tuple[str, ...]) -> str:
        if self._denied_log.allow(time.monotonic()):
            suppressed, self._denied_log.suppressed = self._denied_log.suppressed, 0
            # Who and what kind, never the command text: it is the caller's input.
            _log.warning(
                "control_permission_denied",
                uid=cred.uid if cred else None,
                gid=cred.gid if cred else None,
                pid=cred.pid if cred else None,
                kind="show" if is_read_only(command) else "change",
                suppressed=suppressed,
            )
        return ControlResponse.failure(PERMISSION_DENIED).to_json()

    async def _dispatch(self, line: bytes, cred: PeerCred | None) -> str:
        """Run one request line through the handler; always returns a JSON answer."""
        try:
            req = ControlRequest.from_json(line)
        except ValueError as exc:
            if not self.access.permits(cred, ()):
                return self._deny(cred, ())
            return ControlResponse.failure(f"bad request: {exc}").to_json()
        if not self.access.permits(cred, req.command):
            return self._deny(cred, req.command)
        try:
            resp = await self._handler(req)
            if not isinstance(resp, ControlResponse):
                raise TypeError(f"handler returned {type(resp).__name__}, not ControlResponse")
            # Serialised here so non-JSON data is reported as a handler bug too.
            return resp.to_json()
        except Exception as exc:  # one broken command must not take the console down
            _log.exception("control handler failed", command=" ".join(req.command))
            error = f"internal error: {type(exc).__name__}: {exc}"
            return ControlResponse.failure(error).to_json()


async def request(path: Path, req: ControlRequest, timeout: float = 10.0) -> ControlResponse:
    """Send one request on a fresh connection and return the response.

    Raises OSError (ConnectionRefusedError, FileNotFoundError, PermissionError)
    when the daemon cannot be reached, TimeoutError when it does not answer, and
    ValueError on a malformed answer.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(path), limit=_MAX_RESPONSE)
        try:
            writer.write(req.to_json().encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    if not line.endswith(b"\n"):
        raise ConnectionResetError("daemon closed the control connection without answering")
    return ControlResponse.from_json(line)


def request_sync(path: Path, req: ControlRequest, timeout: float = 10.0) -> ControlResponse:
    """Blocking :func:`request` for callers without an event loop (gdoictl)."""
    return asyncio.run(request(path, req, timeout))
