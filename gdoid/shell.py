"""The asyncio shell both daemons share: one UDP socket, a timer tick, a control socket.

A daemon supplies an *engine* (sans-I/O: ``datagram_received(data, peer,
now)`` and ``on_timer(now)`` return datagrams to send) and a control handler;
this class owns the socket, the clock and the tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import asyncio_dgram

from gdoid import log
from gdoid.control import ControlAccess, ControlRequest, ControlResponse, ControlServer

RECEIVE_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; Python does not export it

Address = tuple[str, int]
Outgoing = list[tuple[bytes, Address]]


class Engine(Protocol):
    def datagram_received(self, data: bytes, peer: Address, now: float) -> Outgoing: ...

    def on_timer(self, now: float) -> Outgoing: ...


def wall_clock() -> float:
    # Lifetimes are absolute (they survive restarts and are shown as dates): wall time.
    return time.time()


class UdpShell:
    def __init__(
        self,
        name: str,
        bind: Address,
        control_socket: Path | None,
        tick: float = 0.25,
        logger: object | None = None,
        control_group: str | None = None,
    ) -> None:
        self.name = name
        self.bind = bind
        self.control_socket = control_socket
        self.control_group = control_group
        self.tick = tick
        self.log = logger or log.get_logger(f"gdoid.{name}")
        self.engine: Engine | None = None
        self._stream: asyncio_dgram.DatagramServer | None = None
        self._control: ControlServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.handler: Callable[[ControlRequest], Awaitable[ControlResponse]] | None = None

    async def open(self, engine: Engine, handler: Callable[[ControlRequest], Awaitable[ControlResponse]]) -> None:
        self.engine = engine
        self.handler = handler
        self._stream = await asyncio_dgram.bind(self.bind)
        # A burst of registrations must not overflow the kernel's default ~208 KiB
        # buffer: every lost datagram costs a GM a retransmission timeout.
        sock = self._stream.socket
        try:  # FORCE passes net.core.rmem_max when we have CAP_NET_ADMIN
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        if self.control_socket is not None:
            access = ControlAccess(self.control_group)
            self._control = ControlServer(self.control_socket, handler, access)
            await self._control.start()
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name=f"{self.name}-udp"),
            asyncio.create_task(self._tick_loop(), name=f"{self.name}-tick"),
        ]

    async def send_all(self, out: Outgoing) -> None:
        assert self._stream is not None
        for data, addr in out:
            try:
                await self._stream.send(data, addr)
            except OSError as exc:
                self.log.warning("send_failed", peer=addr[0], error=str(exc))

    async def _receive_loop(self) -> None:
        assert self._stream is not None and self.engine is not None
        while True:
            try:
                data, peer = await self._stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as exc:  # e.g. ICMP port unreachable surfaced as ECONNREFUSED
                self.log.debug("receive_error", error=str(exc))
                continue
            try:
                out = self.engine.datagram_received(data, (peer[0], peer[1]), wall_clock())
            except Exception:  # a bug must cost one datagram, never the daemon
                self.log.exception("datagram_handler_failed", peer=peer[0])
                continue
            await self.send_all(out)

    async def _tick_loop(self) -> None:
        assert self.engine is not None
        while True:
            await asyncio.sleep(self.tick)
            try:
                out = self.engine.on_timer(wall_clock())
            except Exception:
                self.log.exception("timer_handler_failed")
                continue
            await self.send_all(out)

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._control is not None:
            await self._control.close()
            self._control = None
