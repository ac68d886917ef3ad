"""A layer-3 TUN device for the userspace ESP data path.

The device is opened without packet information (``IFF_NO_PI``), so every
``read`` returns exactly one IPv4 or IPv6 packet and every ``write`` takes one
(the kernel tells the families apart by the version nibble).  No IPv6 address
is generated on it (``addr_gen_mode`` 1): a link-local address would make the
kernel send router solicitations and MLD reports into the data path.  It is
not persistent: closing the file descriptor removes the interface (and with it
every route that pointed at it).

Blocking netlink work (MTU, link up) goes through a synchronous pyroute2
``IPRoute``; from asyncio call :meth:`TunDevice.open` in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from pathlib import Path

from pyroute2 import IPRoute

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
READ_SIZE = 65535


def _no_ipv6_link_local(name: str) -> None:
    path = Path("/proc/sys/net/ipv6/conf", name, "addr_gen_mode")
    # No IPv6 here, or a read-only /proc/sys: harmless either way.
    with contextlib.suppress(OSError):
        path.write_text("1\n")


class TunDevice:
    """An open, up, non-blocking TUN interface."""

    def __init__(self, name: str, fd: int, ifindex: int, mtu: int) -> None:
        self.name = name
        self.fd = fd
        self.ifindex = ifindex
        self.mtu = mtu

    @classmethod
    def open(cls, name: str = "gdoi0", mtu: int = 1400, txqlen: int = 1000) -> TunDevice:
        """Create the interface ``name``, set its MTU and queue length, bring it up."""
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"bad interface name {name!r}")
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TUN | IFF_NO_PI)
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
            actual = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
            with IPRoute() as ipr:
                (ifindex,) = ipr.link_lookup(ifname=actual)
                _no_ipv6_link_local(actual)
                ipr.link("set", index=ifindex, mtu=mtu, txqlen=txqlen)
                ipr.link("set", index=ifindex, state="up")
        except BaseException:
            os.close(fd)
            raise
        return cls(actual, fd, ifindex, mtu)

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes:
        """One packet; raises ``BlockingIOError`` when none is queued."""
        return os.read(self.fd, READ_SIZE)

    def write(self, packet: bytes) -> int:
        return os.write(self.fd, packet)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the descriptor, which removes the (non-persistent) interface."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TunDevice(name={self.name!r}, fd={self.fd}, ifindex={self.ifindex}, mtu={self.mtu})"
        )
