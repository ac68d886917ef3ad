"""GM engines on real UDP sockets in one process, their timers driven by one task."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any, cast

from gdoid.config.model import GmConfig
from gdoid.groupmember.engine import GroupMemberEngine, Registration
from gdoid.phase1 import phase1_config

TICK = 0.05


class QuietLogger:
    """A structlog-shaped logger that drops everything (200 engines' lines are noise here)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class GmEndpoint(asyncio.DatagramProtocol):
    """One GM engine on its own UDP socket: datagrams in, the engine's answers out."""

    def __init__(self, engine: GroupMemberEngine, record: list[bytes] | None = None) -> None:
        self.engine = engine
        self.record = record
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.send(self.engine.datagram_received(data, (addr[0], addr[1]), time.time()))

    def error_received(self, exc: Exception) -> None:  # ICMP errors: the engine retransmits
        pass

    def send(self, out: list[tuple[bytes, tuple[str, int]]]) -> None:
        assert self.transport is not None
        for data, addr in out:
            if self.record is not None:
                self.record.append(data)
            self.transport.sendto(data, addr)


def make_engine(
    template: GmConfig,
    address: str,
    on_event: Callable[[str, Registration], None],
) -> GroupMemberEngine:
    cfg = dataclasses.replace(template, address=IPv4Address(address))
    return GroupMemberEngine(
        cfg.address,
        cfg.groups,
        phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version),
        registration_timeout=cfg.registration_timeout,
        logger=QuietLogger(),
        on_event=on_event,
    )


async def drive_timers(endpoints: list[GmEndpoint], tick: float = TICK) -> None:
    while True:
        await asyncio.sleep(tick)
        now = time.time()
        for ep in endpoints:
            ep.send(ep.engine.on_timer(now))
