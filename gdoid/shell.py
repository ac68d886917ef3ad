"""The asyncio shell both daemons share: one UDP socket, a deadline timer, a control socket.

A daemon supplies an *engine* (sans-I/O: ``datagram_received(data, peer, now,
mono)`` and ``on_timer(now, mono)`` return datagrams to send,
``next_deadline(now, mono)`` says when ``on_timer`` next has work) and a
control handler; this class owns the socket, the clocks and the tasks.

Two clocks go in: ``now`` (wall time: key lifetimes, pseudotime, what users
see) and ``mono`` (monotonic: retransmissions and expiries, which a wall-clock
jump must neither fire nor stall).  The timer task sleeps until the engine's
next deadline, woken early by a datagram or a control command (either may
bring a deadline forward), and at least every ``tick`` seconds so that events
on the wall clock follow a jump of it.
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
from gdoid.protocol.datagram import Address, Outgoing

RECEIVE_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; Python does not export it


class Engine(Protocol):
    def datagram_received(
        self, data: bytes, peer: Address, now: float, mono: float | None = None
    ) -> Outgoing: ...

    def on_timer(self, now: float, mono: float | None = None) -> Outgoing: ...

    def next_deadline(self, now: float, mono: float) -> float | None: ...


def wall_clock() -> float:
    # Lifetimes are absolute (they survive restarts and are shown as dates): wall time.
    return time.time()


def monotonic_clock() -> float:
    # Retransmissions and expiries: immune to wall-clock jumps (NTP steps, an operator).
    return time.monotonic()


class UdpShell:
    def __init__(
        self,
        name: str,
        bind: Address,
        control_socket: Path | None,
        tick: float = 1.0,
        logger: log.Logger | None = None,
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
        self._wake = asyncio.Event()
        self.timer_runs = 0  # on_timer calls (benchmarks and tests watch it)
        self.handler: Callable[[ControlRequest], Awaitable[ControlResponse]] | None = None

    async def open(
        self, engine: Engine, handler: Callable[[ControlRequest], Awaitable[ControlResponse]]
    ) -> None:
        self.engine = engine

        async def handle(req: ControlRequest) -> ControlResponse:
            try:
                return await handler(req)
            finally:
                self._wake.set()  # a command (rekey, clear, reload) may change deadlines

        self.handler = handle
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
            self._control = ControlServer(self.control_socket, handle, access)
            await self._control.start()
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name=f"{self.name}-udp"),
            asyncio.create_task(self._timer_loop(), name=f"{self.name}-timer"),
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
                data, source = await self._stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as exc:  # e.g. ICMP port unreachable surfaced as ECONNREFUSED
                self.log.debug("receive_error", error=str(exc))
                continue
            if not isinstance(source, tuple):  # an AF_INET socket: always (host, port)
                continue
            peer: Address = (source[0], source[1])
            try:
                out = self.engine.datagram_received(data, peer, wall_clock(), monotonic_clock())
            except Exception:  # a bug must cost one datagram, never the daemon
                self.log.exception("datagram_handler_failed", peer=peer[0])
                continue
            self._wake.set()
            await self.send_all(out)

    async def _timer_loop(self) -> None:
        assert self.engine is not None
        deadline: float | None = None
        last_run = -float("inf")
        while True:
            # Cleared before the engine is asked: input handled from here on wakes us again.
            self._wake.clear()
            now, mono = wall_clock(), monotonic_clock()
            out: Outgoing = []
            try:
                # At a deadline, and at least every tick (wall-clock events after a jump).
                if mono >= last_run + self.tick or (deadline is not None and mono >= deadline):
                    last_run = mono
                    self.timer_runs += 1
                    out = self.engine.on_timer(now, mono)
                deadline = self.engine.next_deadline(now, mono)
            except Exception:
                self.log.exception("timer_handler_failed")
                deadline = None
            if out:
                await self.send_all(out)
            wake_at = (
                last_run + self.tick if deadline is None else min(last_run + self.tick, deadline)
            )
            # A timer handle sets the same event input sets (not asyncio.wait_for: on 3.11
            # it can swallow the cancellation close() sends when both happen at once).
            timer = asyncio.get_running_loop().call_later(
                max(0.0, wake_at - monotonic_clock()), self._wake.set
            )
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

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
