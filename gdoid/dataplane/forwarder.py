"""The I/O side of a GM's userspace ESP data path (asyncio).

::

    LAN --(routing, table T)--> TUN --read--> dataplane.outbound --> raw send socket (mark M) --> WAN
    WAN --(rule 99, table L)--> raw ESP socket --> dataplane.inbound --> TUN --write--> (routing) --> LAN

The :class:`Forwarder` owns the TUN device, the policy routing
(:class:`~gdoid.dataplane.routing.RouteSetup`) and two raw sockets; every packet
goes through the sans-I/O dataplane (``outbound`` / ``inbound``), whose
``Result.to_network`` packets are sent with the IP_HDRINCL socket and whose
``Result.to_tun`` packets are written to the TUN.

IPv6 has its own pair of raw sockets.  Sending is the same (an AF_INET6
IPPROTO_RAW socket takes the whole IPv6 header).  Receiving is not: an AF_INET6
raw socket delivers the packet from the ESP header on, without the IPv6 header.
The forwarder asks for the missing parts as ancillary data (``recvmsg`` with
IPV6_RECVPKTINFO for the destination, IPV6_RECVTCLASS for ECN, IPV6_RECVHOPLIMIT;
the source is the sender address) and rebuilds a plain 40-octet header in front,
so the engine sees the packet as it was on the wire.  The kernel has already
processed any extension header before ESP; IPV6_RECVHOPOPTS / RECVDSTOPTS /
RECVRTHDR report them, and such a packet is handed on with that extension
header's type as next header, which the engine drops as ``ipv6-ext-header``.
(A packet socket would give the real header, but would also see every frame on
the WAN and bypass the local-delivery routing; the raw socket keeps the kernel's
filtering.)  Readers drain up to
``batch`` packets per wakeup.  Send errors are counted, never raised; an
exception from the dataplane (which catches its own: this is the last net) is
counted and its traceback logged at most once per
:data:`~gdoid.dataplane.engine.INTERNAL_ERROR_LOG_INTERVAL`, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Protocol

from gdoid.dataplane.engine import (
    INTERNAL_ERROR_LOG_INTERVAL,
    IntervalLogLimiter,
    log_internal_error,
)
from gdoid.dataplane.routing import (
    DEFAULT_LOCAL_TABLE,
    DEFAULT_MARK,
    DEFAULT_TABLE,
    IPPROTO_ESP,
    RouteSetup,
)
from gdoid.dataplane.tun import READ_SIZE, TunDevice
from gdoid.log import get_logger

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SOCKET_BUFFER = 4 * 1024 * 1024
DEFAULT_BATCH = 64
_ANC_SIZE = socket.CMSG_SPACE(20) * 3 + socket.CMSG_SPACE(4096)
# Extension-header cmsgs (Linux values as fallback) -> the header's next-header value.
_EXT_CMSGS = {
    getattr(socket, "IPV6_HOPOPTS", 54): 0,
    getattr(socket, "IPV6_RTHDR", 57): 43,
    getattr(socket, "IPV6_DSTOPTS", 59): 60,
}
_RECV6_OPTS = (
    ("IPV6_RECVPKTINFO", 49),
    ("IPV6_RECVTCLASS", 66),
    ("IPV6_RECVHOPLIMIT", 51),
    ("IPV6_RECVHOPOPTS", 53),
    ("IPV6_RECVDSTOPTS", 58),
    ("IPV6_RECVRTHDR", 56),
)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", 67)
_IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)

log = get_logger("gdoid.dataplane")


class ResultLike(Protocol):
    to_network: list[bytes]
    to_tun: list[bytes]
    drop: Any


class DataplaneLike(Protocol):
    def outbound(self, packet: bytes, now: float) -> ResultLike: ...

    def inbound(self, packet: bytes, now: float) -> ResultLike: ...

    def protected_prefixes(self) -> Sequence[IPv4Network | IPv6Network]: ...


@dataclass
class ForwarderStats:
    tun_read: int = 0  # plaintext packets read from the TUN
    tun_written: int = 0  # packets written to the TUN
    net_read: int = 0  # packets read from the raw ESP socket
    net_sent: int = 0  # packets sent with the raw send socket
    send_errors: int = 0
    tun_write_errors: int = 0
    read_errors: int = 0
    dataplane_errors: int = 0
    drops: Counter[str] = field(default_factory=Counter)  # by DropReason
    send_errnos: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["drops"] = dict(self.drops)
        out["send_errnos"] = dict(self.send_errnos)
        return out


def _reason(drop: Any) -> str:
    return str(getattr(drop, "name", drop))


def _errno_name(e: OSError) -> str:
    if not e.errno:
        return type(e).__name__
    return errno.errorcode.get(e.errno, str(e.errno))


class Forwarder:
    """Moves packets between the TUN, the dataplane and the raw sockets."""

    def __init__(
        self,
        dataplane: DataplaneLike,
        *,
        tun_name: str = "gdoi0",
        mtu: int = 1400,
        wan_interface: str | None = None,
        mark: int = DEFAULT_MARK,
        table: int = DEFAULT_TABLE,
        local_table: int = DEFAULT_LOCAL_TABLE,
        clock: Callable[[], float] = time.time,
        batch: int = DEFAULT_BATCH,
        socket_buffer: int = SOCKET_BUFFER,
    ) -> None:
        self.dataplane = dataplane
        self.tun_name = tun_name
        self.mtu = mtu
        self.wan_interface = wan_interface
        self.mark = mark
        self.clock = clock
        self.batch = batch
        self.socket_buffer = socket_buffer
        self.stats = ForwarderStats()
        self._error_log = IntervalLogLimiter(INTERNAL_ERROR_LOG_INTERVAL)
        self.routes = RouteSetup(
            tun_name,
            wan_interface=wan_interface,
            mark=mark,
            table=table,
            local_table=local_table,
        )
        self.tun: TunDevice | None = None
        self._send: socket.socket | None = None
        self._recv: socket.socket | None = None
        self._send6: socket.socket | None = None
        self._recv6: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[int] = []
        self._route_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._started = False

    # --- lifecycle ------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._readers)

    async def start(self) -> None:
        """TUN, sockets, routes, then the readers; on any failure everything is undone."""
        if self.tun is not None:
            raise RuntimeError("forwarder already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._started = True
        try:
            self.tun = await asyncio.to_thread(TunDevice.open, self.tun_name, self.mtu)
            self._send = self._send_socket()
            # The ESP socket exists before rule 99 does: without a raw socket the kernel
            # would answer ESP it has no handler for with ICMP protocol-unreachable.
            self._recv = self._recv_socket()
            if socket.has_ipv6:
                try:
                    self._send6 = self._send_socket(socket.AF_INET6)
                    self._recv6 = self._recv_socket(socket.AF_INET6)
                except OSError as e:  # IPv6 disabled in this host: IPv4 only
                    log.warning("dataplane_no_ipv6", error=_errno_name(e))
                    for s6 in (self._send6, self._recv6):
                        if s6 is not None:
                            s6.close()
                    self._send6 = self._recv6 = None
            prefixes = list(self.dataplane.protected_prefixes())
            async with self._route_lock:
                await asyncio.to_thread(self.routes.apply, prefixes)
            loop.add_reader(self.tun.fd, self._on_tun_readable)
            self._readers.append(self.tun.fd)
            loop.add_reader(self._recv.fileno(), self._on_net_readable)
            self._readers.append(self._recv.fileno())
            if self._recv6 is not None:
                loop.add_reader(self._recv6.fileno(), self._on_net6_readable)
                self._readers.append(self._recv6.fileno())
        except BaseException:
            await self.close()
            raise
        log.info(
            "dataplane_forwarder_started",
            tun=self.tun.name,
            mtu=self.mtu,
            wan=self.wan_interface,
            prefixes=sorted(str(p) for p in prefixes),
        )

    def update_routes(self) -> asyncio.Task[bool]:
        """Re-read ``dataplane.protected_prefixes()`` and replace the TUN routes.

        Netlink blocks, so the work runs in a thread; the returned task may be
        awaited to know when the routes are in place (updates are serialised).
        Its result is False when the update failed (logged) or the forwarder is
        not running.
        """
        prefixes = list(self.dataplane.protected_prefixes())
        task = asyncio.get_running_loop().create_task(self._update_routes(prefixes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _update_routes(self, prefixes: Iterable[IPv4Network | IPv6Network]) -> bool:
        async with self._route_lock:
            if self.tun is None:
                return False
            try:
                await asyncio.to_thread(self.routes.update, prefixes)
            except Exception:
                log.exception("dataplane_route_update_failed")
                return False
            return True

    async def close(self) -> None:
        """Stop reading, remove the routes, close the sockets and the TUN (idempotent)."""
        loop = self._loop
        if loop is not None:
            for fd in self._readers:
                loop.remove_reader(fd)
        self._readers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._started:
            self._started = False
            async with self._route_lock:
                try:
                    await asyncio.to_thread(self.routes.remove)
                except Exception:
                    log.exception("dataplane_route_remove_failed")
        for sock in (self._send, self._recv, self._send6, self._recv6):
            if sock is not None:
                sock.close()
        self._send = self._recv = self._send6 = self._recv6 = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
            log.info("dataplane_forwarder_closed", **self.stats.as_dict())

    async def __aenter__(self) -> Forwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- sockets --------------------------------------------------------

    def _send_socket(self, family: int = socket.AF_INET) -> socket.socket:
        # IPPROTO_RAW implies IP_HDRINCL, for AF_INET6 as well (Linux raw(7), raw6).
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            self._grow(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _recv_socket(self, family: int = socket.AF_INET) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_RAW, IPPROTO_ESP)
        try:
            if family == socket.AF_INET6:
                for name, value in _RECV6_OPTS:
                    sock.setsockopt(socket.IPPROTO_IPV6, getattr(socket, name, value), 1)
            self._grow(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _grow(self, sock: socket.socket, force: int, plain: int) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, self.socket_buffer)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, self.socket_buffer)

    # --- the hot path ---------------------------------------------------
    #
    # Both readers drain up to ``batch`` packets, count in locals and add to the
    # stats once per wakeup; the usual result (one packet, one direction) is
    # handled inline, anything else by _deliver.

    def _on_tun_readable(self) -> None:
        tun = self.tun
        sock = self._send
        if tun is None or sock is None:
            return
        fd = tun.fd
        read = os.read
        sendto = sock.sendto
        ntoa = socket.inet_ntoa
        outbound = self.dataplane.outbound
        stats = self.stats
        now = self.clock()
        n_read = n_sent = 0
        try:
            for _ in range(self.batch):
                try:
                    packet = read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    stats.read_errors += 1
                    break
                n_read += 1
                try:
                    result = outbound(packet, now)
                    out = result.to_network
                    if len(out) == 1 and not result.to_tun and result.drop is None:
                        packet = out[0]
                        try:
                            if packet[0] >> 4 == 6:
                                self._sendto6(packet)
                            else:
                                sendto(packet, (ntoa(packet[16:20]), 0))
                            n_sent += 1
                        except OSError as e:
                            self._send_failed(e)
                    else:
                        self._deliver(result, tun, sock)
                except Exception:
                    self._dataplane_failed("outbound")
        finally:
            stats.tun_read += n_read
            stats.net_sent += n_sent

    def _on_net_readable(self) -> None:
        sock = self._recv
        tun = self.tun
        send = self._send
        if sock is None or tun is None or send is None:
            return
        fd = tun.fd
        recv = sock.recv
        write = os.write
        inbound = self.dataplane.inbound
        stats = self.stats
        now = self.clock()
        n_read = n_written = 0
        try:
            for _ in range(self.batch):
                try:
                    packet = recv(READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    stats.read_errors += 1
                    break
                n_read += 1
                try:
                    result = inbound(packet, now)
                    out = result.to_tun
                    if len(out) == 1 and not result.to_network and result.drop is None:
                        try:
                            write(fd, out[0])
                            n_written += 1
                        except OSError:
                            stats.tun_write_errors += 1
                    else:
                        self._deliver(result, tun, send)
                except Exception:
                    self._dataplane_failed("inbound")
        finally:
            stats.net_read += n_read
            stats.tun_written += n_written

    def _sendto6(self, packet: bytes) -> None:
        sock = self._send6
        if sock is None:
            raise OSError(errno.EAFNOSUPPORT, "no IPv6 socket")
        sock.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))

    def _on_net6_readable(self) -> None:
        sock = self._recv6
        tun = self.tun
        send = self._send
        if sock is None or tun is None or send is None:
            return
        fd = tun.fd
        write = os.write
        inbound = self.dataplane.inbound
        stats = self.stats
        now = self.clock()
        n_read = n_written = 0
        try:
            for _ in range(self.batch):
                try:
                    data, anc, _flags, peer = sock.recvmsg(READ_SIZE, _ANC_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    stats.read_errors += 1
                    break
                n_read += 1
                try:
                    result = inbound(ipv6_header(data, anc, peer[0]) + data, now)
                    out = result.to_tun
                    if len(out) == 1 and not result.to_network and result.drop is None:
                        try:
                            write(fd, out[0])
                            n_written += 1
                        except OSError:
                            stats.tun_write_errors += 1
                    else:
                        self._deliver(result, tun, send)
                except Exception:
                    self._dataplane_failed("inbound")
        finally:
            stats.net_read += n_read
            stats.tun_written += n_written

    def _deliver(self, result: ResultLike, tun: TunDevice, sock: socket.socket) -> None:
        """The general case: any number of packets both ways, and a drop reason."""
        stats = self.stats
        if result.drop is not None:
            stats.drops[_reason(result.drop)] += 1
        if result.to_network:
            for packet in result.to_network:
                try:
                    if packet[0] >> 4 == 6:
                        self._sendto6(packet)
                    else:
                        sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
                    stats.net_sent += 1
                except OSError as e:
                    self._send_failed(e)
        if result.to_tun:
            fd = tun.fd
            for packet in result.to_tun:
                try:
                    os.write(fd, packet)
                    stats.tun_written += 1
                except OSError:
                    stats.tun_write_errors += 1

    def _send_failed(self, e: OSError) -> None:
        self.stats.send_errors += 1
        self.stats.send_errnos[_errno_name(e)] += 1

    def _dataplane_failed(self, direction: str) -> None:
        self.stats.dataplane_errors += 1
        log_internal_error(
            self._error_log, self.clock(), "dataplane_error",
            direction=direction, count=self.stats.dataplane_errors,
        )  # fmt: skip


def ipv6_header(payload: bytes, ancillary: list[tuple[int, int, bytes]], source: str) -> bytes:
    """The 40-octet IPv6 header an AF_INET6 raw socket stripped from ``payload``, rebuilt
    from ``recvmsg`` ancillary data (module docstring).  Without IPV6_PKTINFO the
    destination is ``::`` (the engine then fails the address check)."""
    dst = bytes(16)
    tclass = 0
    hoplimit = 0
    nh = IPPROTO_ESP
    for level, kind, value in ancillary:
        if level != socket.IPPROTO_IPV6:
            continue
        if kind == _IPV6_PKTINFO and len(value) >= 16:
            dst = value[:16]
        elif kind == _IPV6_TCLASS and len(value) >= 4:
            tclass = int.from_bytes(value[:4], sys.byteorder) & 0xFF
        elif kind == _IPV6_HOPLIMIT and len(value) >= 4:
            hoplimit = int.from_bytes(value[:4], sys.byteorder) & 0xFF
        elif kind in _EXT_CMSGS and nh == IPPROTO_ESP:
            nh = _EXT_CMSGS[kind]
    src = socket.inet_pton(socket.AF_INET6, source.partition("%")[0])
    first = (6 << 28) | (tclass << 20)
    return struct.pack("!IHBB16s16s", first, len(payload), nh, hoplimit, src, dst)
