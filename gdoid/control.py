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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gdoid.log import get_logger

__all__ = [
    "MAX_LINE",
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
    """Serves ``handler`` on a Unix socket, mode 0600 (the socket is root's console)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self._handler = handler
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
            os.chmod(self.path, 0o600)
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
        try:
            async for line in _lines(reader):
                if isinstance(line, _LineTooLong):
                    error = f"request line longer than {MAX_LINE} bytes"
                    answer = ControlResponse.failure(error).to_json()
                elif not line.strip():
                    continue
                else:
                    answer = await self._dispatch(line)
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

    async def _dispatch(self, line: bytes) -> str:
        """Run one request line through the handler; always returns a JSON answer."""
        try:
            req = ControlRequest.from_json(line)
        except ValueError as exc:
            return ControlResponse.failure(f"bad request: {exc}").to_json()
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
