"""Helpers for the data-path tests with real daemons in network namespaces.

:class:`DpGroup` writes a KS config (192.0.2.10 on the core) and two GM configs
with ``[dataplane]`` on, starts the daemons with a shared ``--keylog`` dir in
their namespaces of a :class:`~gdoid.netlab.Topology` and waits (polling
``gdoictl``) until both GMs are registered.  :class:`CoreCapture` runs tshark
on the core bridge; :func:`read_pcap` / :func:`ip_packets` read what it wrote;
:meth:`DpGroup.inject` sends raw IPv4 packets from the KS namespace (an
attacker on the core) and :meth:`DpGroup.crafter` builds ESP packets with the
group's real TEK (taken from the key log).
"""

from __future__ import annotations

import os
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth, sa_ipsec
from gdoid.dataplane.esp import EspSa, ipv4_checksum
from gdoid.netlab import CORE_BRIDGE, GM1_WAN, GM2_WAN, KS, Topology
from gdoid.protocol.policy import SenderIds, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.transforms import TekTransform
from tests.procs import (
    Daemon,
    gdoictl,
    gdoictl_json,
    gdoictl_wait,
    write_private,
    write_signing_key,
)

GROUP = 1234


def wait_until(
    what: str, probe: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1
) -> Any:
    """Poll ``probe`` until it returns something truthy (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except (OSError, ValueError, KeyError, IndexError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {last!r}")
        time.sleep(interval)


class NsDaemon(Daemon):
    """:class:`tests.procs.Daemon` started inside namespace ``ns`` of ``topo`` (``ip netns exec``
    execs, so the pid is gdoid's own and SIGKILL reaches it)."""

    def __init__(self, topo: Topology, ns: str, role: str, config: Path, *extra: str) -> None:
        super().__init__(role, config, *extra, prefix=topo.exec_prefix(ns), name=f"{role}@{ns}")


# --- raw packets ------------------------------------------------------------------

INJECT_SCRIPT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
n = 0
for line in sys.stdin:
    pkt = bytes.fromhex(line.strip())
    s.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0))
    n += 1
print(n)
"""


def ipv4(
    src: str, dst: str, proto: int, payload: bytes, ident: int = 0x4444, ttl: int = 64
) -> bytes:
    """An IPv4 packet (no options) with a correct header checksum."""
    hdr = bytearray(struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, ttl, proto, 0,
        bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))),
    ))  # fmt: skip
    struct.pack_into("!H", hdr, 10, ipv4_checksum(hdr))
    return bytes(hdr) + payload


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: none)."""
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def read_esp_sa(keylog: Path) -> dict[int, bytes]:
    """SPI -> cipher key (AES-GCM: key | salt) from the key log's ``esp_sa`` file."""
    out: dict[int, bytes] = {}
    for line in (keylog / "esp_sa").read_text().splitlines():
        fields = [f.strip('"') for f in line.split(",")]
        if len(fields) >= 6:
            out[int(fields[3], 16)] = bytes.fromhex(fields[5][2:])
    return out


def make_sa(
    spi: int,
    key: bytes,
    transform: str = "esp-gcm-256",
    sid: int = 0xEE,
    tbar_window_ms: int | None = None,
) -> EspSa:
    """A sending EspSa for the group TEK ``spi`` under sender ID ``sid`` (8 bits)."""
    policy = TekPolicy(
        sa_number=1,
        transform=TekTransform.from_name(transform),
        selector=TrafficSelector(IPv4Network("10.0.0.0/8"), IPv4Network("10.0.0.0/8")),
        configured_lifetime=3600,
        tbar_window_ms=tbar_window_ms,
    )
    now = time.time()
    tek = Tek(spi, policy, key, b"", now, now + 3600)
    return EspSa(tek, SenderIds(8, (sid,)))


# --- capture -----------------------------------------------------------------------


class CoreCapture:
    """tshark on the core bridge (pcap format); start and end are confirmed with a
    UDP probe KS -> gm1:9 that tshark must have shown."""

    def __init__(self, topo: Topology, pcap: Path) -> None:
        self.topo = topo
        self.pcap = pcap
        self.proc = topo.popen(
            "core", "tshark", "-n", "-l", "-P", "-i", CORE_BRIDGE, "-F", "pcap", "-w", str(pcap),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.seen: list[str] = []
        self._mark = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.seen.append(line)
                self._cond.notify_all()

    def _probe(self, tag: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.topo.run(
                "ks", "bash", "-c", f"echo probe-{tag} > /dev/udp/{GM1_WAN}/9", check=False
            )
            with self._cond:
                if self._cond.wait_for(
                    lambda: any(KS in x and " 9 " in x for x in self.seen[self._mark :]), 0.3
                ):
                    return
            if self.proc.poll() is not None:
                break
        raise AssertionError("tshark on the core never showed the probe")

    def __enter__(self) -> CoreCapture:
        self._probe("start")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with self._cond:
                self._mark = len(self.seen)
            self._probe("end")
        finally:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a libpcap file (any byte order, µs or ns timestamps)."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a libpcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    assert linktype == 1, f"link type {linktype}, expected Ethernet"
    rec = struct.Struct(endian + "IIII")
    frames = []
    off = 24
    while off + 16 <= len(data):
        _s, _us, incl, _orig = rec.unpack_from(data, off)
        off += 16
        frames.append(data[off : off + incl])
        off += incl
    return frames


def ip_packets(frames: list[bytes]) -> list[bytes]:
    """The IPv4 packets in Ethernet frames (VLAN-less)."""
    return [f[14:] for f in frames if f[12:14] == b"\x08\x00"]


def addr(packet: bytes, offset: int) -> str:
    return ".".join(str(b) for b in packet[offset : offset + 4])


def tshark_fields(pcap: Path, keylog: Path | None, display: str, *fields: str) -> list[list[str]]:
    """``tshark -r`` field rows (tab-split) for ``display``; decrypting with ``keylog``."""
    env = dict(os.environ)
    opts: list[str] = []
    if keylog is not None:
        env["WIRESHARK_CONFIG_DIR"] = str(keylog)
        opts = [
            "-o",
            "esp.enable_encryption_decode:TRUE",
            "-o",
            "esp.enable_authentication_check:TRUE",
        ]
    cmd = ["tshark", "-n", "-r", str(pcap), *opts, "-o", "tcp.desegment_tcp_streams:FALSE",
           "-Y", display, "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,"]  # fmt: skip
    for f in fields:
        cmd += ["-e", f]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return [line.split("\t") for line in res.stdout.splitlines()]


# --- the group ---------------------------------------------------------------------


class DpGroup:
    """KS + GM1 + GM2 with the data path, in ``topo``; files in ``directory``."""

    def __init__(
        self,
        topo: Topology,
        directory: Path,
        *,
        transform: str = "esp-gcm-256",
        sa_extra: str = "",
        fail_close: tuple[bool, bool] = (False, False),
    ) -> None:
        self.topo = topo
        self.dir = directory
        self.keylog = directory / "keylog"
        self.transform = transform
        d = directory
        write_private(d / "psk.secret", secrets.token_hex(24) + "\n")
        write_signing_key(d / "rekey.key")
        auth = psk_auth("192.0.2.0/24", "psk.secret")
        # sa_extra: more keys of the SA as TOML text, e.g. "replay_window = 64".
        sa = sa_ipsec(transform=transform, **tomllib.loads(sa_extra))
        (d / "ks.toml").write_text(
            ks_config(
                KS,
                control_socket=f"{d}/ks.sock",
                state_dir=f"{d}/ks-state",
                auth=auth,
                groups=[ks_group(number=GROUP, sender_id_bits=8, sas=[sa])],
            )
        )
        for i, address in ((1, GM1_WAN), (2, GM2_WAN)):
            (d / f"gm{i}.toml").write_text(
                gm_config(
                    address,
                    control_socket=f"{d}/gm{i}.sock",
                    tun_name="gdoi0",
                    fail_close=fail_close[i - 1],
                    dataplane={"enabled": True, "wan_interface": "wan"},
                    auth=auth,
                    groups=[gm_group([KS], number=GROUP)],
                )
            )
        self.ks_sock = d / "ks.sock"
        self.gm_socks = {1: d / "gm1.sock", 2: d / "gm2.sock"}
        # The KS namespace doubles as an attacker on the core: it routes the LANs to their GMs.
        topo.ip("ks", "route", "add", "10.1.0.0/16", "via", GM1_WAN)
        topo.ip("ks", "route", "add", "10.2.0.0/16", "via", GM2_WAN)
        self.daemons: list[NsDaemon] = []

    def start(self, timeout: float = 30.0) -> DpGroup:
        kl = ["--keylog", str(self.keylog)]
        self.ks = NsDaemon(self.topo, "ks", "ks", self.dir / "ks.toml", *kl)
        self.daemons.append(self.ks)
        self.ks.wait_for("ks_started", timeout)
        for i in (1, 2):
            self.daemons.append(NsDaemon(self.topo, f"gm{i}", "gm", self.dir / f"gm{i}.toml", *kl))
        for i in (1, 2):
            self.wait_registered(i, timeout)
        return self

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()

    def __enter__(self) -> DpGroup:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- gdoictl ---------------------------------------------------------------

    def show(self, gm: int) -> dict[str, Any]:
        return gdoictl_json(self.gm_socks[gm], "show", "crypto", "gdoi")["groups"][0]

    def ipsec(self, gm: int) -> dict[str, Any]:
        return gdoictl_json(self.gm_socks[gm], "show", "crypto", "ipsec", "sa")

    def replay(self, gm: int) -> dict[str, Any]:
        return gdoictl_json(self.gm_socks[gm], "show", "crypto", "gdoi", "gm", "replay")["groups"][
            0
        ]

    def ks_ctl(self, *words: str) -> subprocess.CompletedProcess[str]:
        res = gdoictl(self.ks_sock, *words, yes=True)
        assert res.returncode == 0, res.stdout + res.stderr
        return res

    def wait_registered(self, gm: int, timeout: float = 30.0) -> dict[str, Any]:
        # gdoictl's own wait (registered, TEKs and routes in place), then the strict check.
        waited = gdoictl_wait(self.gm_socks[gm], "ready", timeout)
        if waited.returncode != 0:
            logs = "\n".join(f"--- {d.role}\n" + "\n".join(d.lines[-30:]) for d in self.daemons)
            raise AssertionError(f"GM{gm} did not register: {waited.stderr}\n{logs}")

        def ready() -> dict[str, Any] | None:
            if not self.gm_socks[gm].exists():
                return None
            g = self.show(gm)
            # Registered, and the TEKs are in the data path.
            return g if g["state"] == "REGISTERED" and self.ipsec(gm)["sas"] else None

        try:
            return wait_until(f"GM{gm} registered", ready, timeout, 0.2)
        except AssertionError:
            logs = "\n".join(f"--- {d.role}\n" + "\n".join(d.lines[-30:]) for d in self.daemons)
            raise AssertionError(f"GM{gm} did not register:\n{logs}") from None

    def wait_counter(
        self,
        gm: int,
        what: str,
        get: Callable[[dict[str, Any]], int],
        target: int,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Poll ``show crypto ipsec sa`` on ``gm`` until ``get(stats) >= target``."""

        def reached() -> dict[str, Any] | None:
            stats = self.ipsec(gm)
            return stats if get(stats) >= target else None

        return wait_until(f"GM{gm} {what} >= {target}", reached, timeout)

    # --- packets ----------------------------------------------------------------

    def tek(self) -> tuple[int, bytes]:
        """(SPI, cipher key) of the group's (single) TEK, from the key log."""
        spis = {sa["spi"] for sa in self.ipsec(1)["sas"]}
        keys = read_esp_sa(self.keylog)
        (spi,) = spis
        return spi, keys[spi]

    def crafter(self, sid: int = 0xEE, tbar_window_ms: int | None = None) -> EspSa:
        spi, key = self.tek()
        return make_sa(spi, key, self.transform, sid, tbar_window_ms)

    def inject(self, packets: list[bytes], ns: str = "ks") -> int:
        """Send complete IPv4 packets with a raw socket (IP_HDRINCL) from ``ns``."""
        res = self.topo.run(ns, sys.executable, "-c", INJECT_SCRIPT,
                            input="".join(p.hex() + "\n" for p in packets), stdin=None)  # fmt: skip
        return int(res.stdout.strip())


def drops(stats: dict[str, Any], reason: str) -> int:
    return int(stats["drops"].get(reason, 0))


def total(stats: dict[str, Any], key: str) -> int:
    return sum(int(sa[key]) for sa in stats["sas"])
