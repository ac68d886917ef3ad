"""Network-namespace lab topologies (root only), used by ``gdoid lab --dataplane`` and tests.

:class:`Topology` builds::

    hostA(eth0 10.1.0.2/24) --- (lan 10.1.0.1/24) gm1 (wan 192.0.2.1/24) ---+
                                                                           |  core: bridge br0
    hostB(eth0 10.2.0.2/24) --- (lan 10.2.0.1/24) gm2 (wan 192.0.2.2/24) ---+  (ports gm1, gm2, ks)
                                                                           |
                                                     ks(eth0 192.0.2.10/24) +

Hosts route by default via their GM's ``lan`` address; gm1 has
``10.2.0.0/16 via 192.0.2.2 dev wan`` and gm2 ``10.1.0.0/16 via 192.0.2.1
dev wan`` in their main tables (the routes the address-preserving ESP uses).
Namespace names carry the pid and a counter (``gd<pid>n<k>-gm1``...), so
parallel runs never collide; interface names live inside the namespaces.
Everything is removed on exit, also when the build fails half-way.

Use it as ``with Topology() as topo: topo.run("gm1", "ip", "route")``; the
logical names (``hostA``, ``gm1``, ``core``, ``gm2``, ``hostB``, ``ks``) are
translated to the real namespace names by :meth:`Topology.run` / :meth:`popen`.

:class:`CoopTopology` is the same idea for cooperative KSs: K KSs and N GMs
(each with a LAN host) on one core bridge, with :meth:`CoopTopology.partition`
/ :meth:`CoopTopology.heal` to split and rejoin the core.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAMES = ("hostA", "gm1", "core", "gm2", "hostB", "ks")
HOST_A = "10.1.0.2"
HOST_B = "10.2.0.2"
GM1_LAN = "10.1.0.1"
GM2_LAN = "10.2.0.1"
GM1_WAN = "192.0.2.1"
GM2_WAN = "192.0.2.2"
KS = "192.0.2.10"
CORE_BRIDGE = "br0"

_counter = itertools.count()

# ICMP echo without iputils (not installed everywhere): prints the number of replies.
PING_SCRIPT = r"""
import os, select, socket, struct, sys, time
dst, count, timeout, interval, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, got = os.getpid() & 0xFFFF, 0
for seq in range(count):
    body = bytes(size)
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + body), ident, seq) + body, (dst, 0))
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        pkt = s.recv(65535)
        icmp = pkt[(pkt[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            got += 1
            break
    if seq + 1 < count:
        time.sleep(interval)
print(got)
"""


def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    probe = f"gdprobe{os.getpid()}"
    try:
        res = subprocess.run(
            ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"ip netns does not work: {e}"
    if res.returncode != 0:
        return f"ip netns does not work: {res.stderr.strip()}"
    try:
        res = subprocess.run(
            ["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if res.returncode != 0:
            return f"ip netns exec does not work: {res.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


class Topology:
    """hostA -- gm1 -- core(+ks) -- gm2 -- hostB in network namespaces."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"gd{os.getpid()}n{next(_counter)}"
        self.ns = {name: f"{self.tag}-{name}" for name in NAMES}
        self._created: list[str] = []

    # --- helpers --------------------------------------------------------

    def name(self, ns: str) -> str:
        return self.ns.get(ns, ns)

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", self.name(ns)]

    def run(
        self, ns: str, *cmd: str, check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside namespace ``ns`` (output captured as text)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        res = subprocess.run([*self.exec_prefix(ns), *cmd], text=True, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise AssertionError(
                f"[{ns}] {' '.join(cmd)} exited {res.returncode}\n{res.stdout}{res.stderr}"
            )
        return res

    def popen(self, ns: str, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside namespace ``ns``."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([*self.exec_prefix(ns), *cmd], **kw)

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._ip(["-n", self.name(ns), *args], check=check)

    def _ip(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
        return res

    def ping(
        self,
        ns: str,
        dst: str,
        count: int = 3,
        timeout: float = 2.0,
        interval: float = 0.1,
        size: int = 56,
    ) -> int:
        """ICMP echo from ``ns`` to ``dst``; the number of replies received."""
        res = self.run(
            ns,
            sys.executable,
            "-c",
            PING_SCRIPT,
            dst,
            str(count),
            str(timeout),
            str(interval),
            str(size),
            timeout=count * (timeout + interval) + 30,
        )
        return int(res.stdout.strip())

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, "sysctl", "-q", "-w", f"{key}={value}")

    # --- build / tear down ----------------------------------------------

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair made directly inside the namespaces (names never meet in the root ns)."""
        self.ip(
            ns_a,
            "link",
            "add",
            if_a,
            "type",
            "veth",
            "peer",
            "name",
            if_b,
            "netns",
            self.name(ns_b),
        )

    def build(self) -> None:
        for name in NAMES:
            self._ip(["netns", "add", self.ns[name]])
            self._created.append(self.ns[name])
        for name in NAMES:
            self.ip(name, "link", "set", "lo", "up")
            # No IPv6 chatter on the captures.
            self.run(name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", check=False)
            self.run(
                name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1", check=False
            )

        # LAN sides.
        for gm, host, lan, addr in (
            ("gm1", "hostA", GM1_LAN, HOST_A),
            ("gm2", "hostB", GM2_LAN, HOST_B),
        ):
            self._veth(gm, "lan", host, "eth0")
            self.ip(gm, "addr", "add", f"{lan}/24", "dev", "lan")
            self.ip(gm, "link", "set", "lan", "up")
            self.ip(host, "addr", "add", f"{addr}/24", "dev", "eth0")
            self.ip(host, "link", "set", "eth0", "up")
            self.ip(host, "route", "add", "default", "via", lan)

        # The core: a bridge with the GMs' WANs and the KS on it.
        self.ip(
            "core",
            "link",
            "add",
            CORE_BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        )
        self.ip("core", "link", "set", CORE_BRIDGE, "up")
        for ns, ifname, port, addr in (
            ("gm1", "wan", "gm1", GM1_WAN),
            ("gm2", "wan", "gm2", GM2_WAN),
            ("ks", "eth0", "ks", KS),
        ):
            self._veth(ns, ifname, "core", port)
            self.ip("core", "link", "set", port, "master", CORE_BRIDGE)
            self.ip("core", "link", "set", port, "up")
            self.ip(ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self.ip(ns, "link", "set", ifname, "up")

        # WAN routes for the address-preserving ESP, and forwarding on the GMs.
        self.ip("gm1", "route", "add", "10.2.0.0/16", "via", GM2_WAN, "dev", "wan")
        self.ip("gm2", "route", "add", "10.1.0.0/16", "via", GM1_WAN, "dev", "wan")
        for gm in ("gm1", "gm2"):
            self.sysctl(gm, "net.ipv4.ip_forward", "1")

    def destroy(self) -> None:
        errors: list[str] = []
        while self._created:
            name = self._created.pop()
            res = self._ip(["netns", "del", name], check=False)
            if res.returncode != 0 and "No such file" not in res.stderr:
                errors.append(f"{name}: {res.stderr.strip()}")
        if errors:
            raise RuntimeError("netns cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> Topology:
        remove_stale_namespaces()
        try:
            self.build()
        except BaseException:
            with contextlib.suppress(Exception):
                self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def existing_namespaces() -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


_OURS = re.compile(r"^gd(\d+)n\d+-")


def remove_stale_namespaces() -> list[str]:
    """Delete topologies left behind by test processes that died (pid no longer alive)."""
    removed = []
    for name in existing_namespaces():
        m = _OURS.match(name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        if (
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20).returncode
            == 0
        ):
            removed.append(name)
    return removed


class CoopTopology(Topology):
    """Cooperative KSs and GMs on one core bridge, a LAN host behind every GM.

    ::

        ks<k>   (eth0 192.0.2.1<k>/24)  ---+
                                          |  core: bridge br0, one port per
        gm<i>   (wan  192.0.2.2<i>/24)  ---+  KS / GM, named like its namespace
          (lan 10.<i>.0.1/24) --- host<i> (eth0 10.<i>.0.2/24, default via 10.<i>.0.1)

    Every GM routes each other GM's LAN ``10.<j>.0.0/16 via 192.0.2.2<j> dev
    wan`` (the routes the address-preserving ESP uses).  :meth:`partition`
    drops frames between two sets of core ports with an nftables bridge
    table in the core namespace; :meth:`heal` removes it.  Names, cleanup and
    :meth:`run` / :meth:`popen` / :meth:`ping` work as in :class:`Topology`.
    """

    NFT_TABLE = "gdoid_partition"

    def __init__(self, kss: int = 3, gms: int = 4, tag: str | None = None) -> None:
        if not 1 <= kss <= 9:
            raise ValueError("CoopTopology supports 1 to 9 KSs")
        if not 1 <= gms <= 99:
            raise ValueError("CoopTopology supports 1 to 99 GMs")
        super().__init__(tag)
        self.kss = tuple(f"ks{k}" for k in range(1, kss + 1))
        self.gms = tuple(f"gm{i}" for i in range(1, gms + 1))
        self.hosts = tuple(f"host{i}" for i in range(1, gms + 1))
        self.ns = {
            name: f"{self.tag}-{name}" for name in ("core", *self.kss, *self.gms, *self.hosts)
        }

    # --- addressing -----------------------------------------------------

    @staticmethod
    def ks_address(k: int) -> str:
        """KS ``k`` (1-based) on the core."""
        return f"192.0.2.{10 + k}"

    @staticmethod
    def gm_address(i: int) -> str:
        """GM ``i``'s WAN address on the core."""
        return f"192.0.2.{20 + i}"

    @staticmethod
    def gm_lan(i: int) -> str:
        return f"10.{i}.0.1"

    @staticmethod
    def host_address(i: int) -> str:
        """The LAN host behind GM ``i``."""
        return f"10.{i}.0.2"

    # --- build ----------------------------------------------------------

    def build(self) -> None:
        for name in self.ns:
            self._ip(["netns", "add", self.ns[name]])
            self._created.append(self.ns[name])
        for name in self.ns:
            self.ip(name, "link", "set", "lo", "up")
            self.run(name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", check=False)
            self.run(
                name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1", check=False
            )

        self.ip(
            "core",
            "link",
            "add",
            CORE_BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        )
        self.ip("core", "link", "set", CORE_BRIDGE, "up")
        ports = [(ks, "eth0", self.ks_address(k)) for k, ks in enumerate(self.kss, 1)]
        ports += [(gm, "wan", self.gm_address(i)) for i, gm in enumerate(self.gms, 1)]
        for ns, ifname, addr in ports:
            self._veth(ns, ifname, "core", ns)
            self.ip("core", "link", "set", ns, "master", CORE_BRIDGE)
            self.ip("core", "link", "set", ns, "up")
            self.ip(ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self.ip(ns, "link", "set", ifname, "up")

        for i, (gm, host) in enumerate(zip(self.gms, self.hosts, strict=True), 1):
            self._veth(gm, "lan", host, "eth0")
            self.ip(gm, "addr", "add", f"{self.gm_lan(i)}/24", "dev", "lan")
            self.ip(gm, "link", "set", "lan", "up")
            self.ip(host, "addr", "add", f"{self.host_address(i)}/24", "dev", "eth0")
            self.ip(host, "link", "set", "eth0", "up")
            self.ip(host, "route", "add", "default", "via", self.gm_lan(i))
            for j in range(1, len(self.gms) + 1):
                if j != i:
                    self.ip(
                        gm,
                        "route",
                        "add",
                        f"10.{j}.0.0/16",
                        "via",
                        self.gm_address(j),
                        "dev",
                        "wan",
                    )
            self.sysctl(gm, "net.ipv4.ip_forward", "1")

    # --- partitions -----------------------------------------------------

    def partition(self, side_a: Sequence[str], side_b: Sequence[str]) -> None:
        """Drop every frame the core bridge would forward between ``side_a`` and ``side_b``
        (KS / GM names); replaces an earlier partition."""
        self.heal()
        a, b = ", ".join(side_a), ", ".join(side_b)  # core port = logical namespace name
        script = (
            f"table bridge {self.NFT_TABLE} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"    iifname {{ {a} }} oifname {{ {b} }} counter drop\n"
            f"    iifname {{ {b} }} oifname {{ {a} }} counter drop\n"
            "  }\n"
            "}\n"
        )
        self.run("core", "nft", "-f", "-", input=script, stdin=None)

    def heal(self) -> None:
        """Remove the partition (if any)."""
        self.run("core", "nft", "delete", "table", "bridge", self.NFT_TABLE, check=False)
