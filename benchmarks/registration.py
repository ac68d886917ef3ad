"""Registration throughput, latency, memory and CPU of a real ``gdoid ks`` process.

    python benchmarks/registration.py --gms 500

For DH group 19 and then group 14 (the GMs offer only that group; the KS allows
both) a fresh KS process is started on 127.0.1.1:848 and N in-process
GroupMemberEngine initiators, each on its own loopback address and UDP socket,
start registering at the same instant.  Printed per group: registrations/s,
p50/p99 latency (start -> registered, per GM), KS RSS before/after and per
registered GM, KS CPU seconds (utime+stime from /proc) and registrations per
KS CPU-second.

Baselines measured in the same run, so the figures mean something on a noisy
machine: group 14 relative to group 19, and the group-19 registration rate
relative to a plain UDP echo: a tiny echo server process answering N clients
(same addresses, same socket setup) 5 round trips each, the round trips of one
registration (MM1/2, MM3/4, MM5/6, PULL 1/2, PULL 3/4) with the same sizes.

Needs root (UDP 848).  GMs use 127.0.1.2 upwards (127.0.2.x, ... for more than 253).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdoid.config.loader import load_gm_config  # noqa: E402
from gdoid.config.model import GmConfig  # noqa: E402
from gdoid.groupmember.engine import GroupMemberEngine, Registration  # noqa: E402
from gdoid.phase1 import phase1_config  # noqa: E402
from tests import procs  # noqa: E402
from tests.procs import (  # noqa: E402
    Daemon,
    auth_toml,
    gdoictl_json,
    gdoid_cmd,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)

KS_ADDRESS = "127.0.1.1"
KS_PORT = 848
ECHO_PORT = 7848
GROUP = 1234
TICK = 0.05
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_RATE = 500.0  # registrations/s with group 19
TARGET_KIB_PER_GM = 4.0

ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if int(sys.argv[3]):
    s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), int(sys.argv[3]))
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
"""

# ``gdoid ks`` with a bigger socket receive buffer (--rcvbuf): an experiment, the
# daemon itself does not set one.
KS_WITH_RCVBUF = """
import socket, sys
from gdoid import shell

RCVBUF = int(sys.argv.pop(1))
_open = shell.UdpShell.open

async def _open_with_rcvbuf(self, engine, handler):
    await _open(self, engine, handler)
    self._stream.socket.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), RCVBUF)

shell.UdpShell.open = _open_with_rcvbuf
from gdoid.cli.daemon import main
sys.exit(main())
"""


# --- /proc figures ---------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def run_delay(pid: int | str) -> float:
    """Seconds the process's main thread spent runnable but waiting for a CPU (schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def udp_rcvbuf_errors() -> int:
    """System-wide count of datagrams dropped because a socket's receive buffer was full."""
    lines = [
        line.split()
        for line in Path("/proc/net/snmp").read_text().splitlines()
        if line.startswith("Udp:")
    ]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def gm_addresses(n: int) -> list[str]:
    """127.0.1.2 upwards, skipping .0 and .255 host octets (never 127.0.0.x)."""
    out: list[str] = []
    value = int(IPv4Address("127.0.1.2"))
    while len(out) < n:
        if value & 0xFF not in (0, 255):
            out.append(str(IPv4Address(value)))
        value += 1
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


# --- in-process group members -----------------------------------------------------------


class QuietLogger:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class GmEndpoint(asyncio.DatagramProtocol):
    def __init__(self, engine: GroupMemberEngine) -> None:
        self.engine = engine
        self.transport: asyncio.DatagramTransport | None = None
        self.sent: list[int] = []  # sizes of the datagrams sent

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.send(self.engine.datagram_received(data, (addr[0], addr[1]), time.time()))

    def error_received(self, exc: Exception) -> None:
        pass

    def send(self, out: list[tuple[bytes, tuple[str, int]]]) -> None:
        assert self.transport is not None
        for data, addr in out:
            self.sent.append(len(data))
            self.transport.sendto(data, addr)


@dataclasses.dataclass
class SwarmResult:
    registered: int
    failures: int
    elapsed: float
    latencies: list[float]
    datagrams: int
    sizes: list[int]
    gm_cpu: float


async def run_swarm(
    template: GmConfig, addresses: list[str], timeout: float, ramp: float = 0.0
) -> SwarmResult:
    loop = asyncio.get_running_loop()
    n = len(addresses)
    done_at: dict[int, float] = {}
    started_at: dict[int, float] = {}
    failures = 0
    all_done = asyncio.Event()
    pending: set[int] = set(range(n))

    def on_event_for(i: int) -> Callable[[str, Registration], None]:
        def on_event(what: str, reg: Registration) -> None:
            nonlocal failures
            if what == "registered" and i not in done_at:
                done_at[i] = time.monotonic()
                pending.discard(i)
                if not pending:
                    all_done.set()
            elif what == "failed":
                failures += 1

        return on_event

    endpoints: list[GmEndpoint] = []
    for i, address in enumerate(addresses):
        cfg = dataclasses.replace(template, address=IPv4Address(address))
        engine = GroupMemberEngine(
            cfg.address,
            cfg.groups,
            phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version),
            registration_timeout=cfg.registration_timeout,
            logger=QuietLogger(),
            on_event=on_event_for(i),
        )
        _, ep = await loop.create_datagram_endpoint(
            lambda e=engine: GmEndpoint(e), local_addr=(address, 0)
        )
        endpoints.append(ep)

    async def timers() -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.time()
            for i in list(pending):  # registered engines have nothing due for an hour
                ep = endpoints[i]
                ep.send(ep.engine.on_timer(now))

    cpu0 = time.process_time()
    t0 = time.monotonic()
    if ramp <= 0:  # all at once
        now = time.time()
        for i, ep in enumerate(endpoints):
            started_at[i] = t0
            ep.send(ep.engine.start(now))
    ticker = asyncio.create_task(timers())
    try:
        if ramp > 0:  # spread the starts evenly over ``ramp`` seconds
            for i, ep in enumerate(endpoints):
                await asyncio.sleep(max(0.0, t0 + ramp * i / n - time.monotonic()))
                started_at[i] = time.monotonic()
                ep.send(ep.engine.start(time.time()))
        await asyncio.wait_for(all_done.wait(), timeout)
    except TimeoutError:
        pass
    finally:
        ticker.cancel()
        for ep in endpoints:
            assert ep.transport is not None
            ep.transport.close()
    gm_cpu = time.process_time() - cpu0
    lat = [done_at[i] - started_at[i] for i in sorted(done_at)]
    elapsed = max(done_at.values()) - t0 if done_at else timeout
    return SwarmResult(
        len(done_at),
        failures,
        elapsed,
        lat,
        sum(len(ep.sent) for ep in endpoints),
        endpoints[0].sent if endpoints else [],
        gm_cpu,
    )


# --- echo baseline ----------------------------------------------------------------------


class EchoClient(asyncio.DatagramProtocol):
    """``len(sizes)`` sequential round trips; a lost datagram is sent again after 2 s (like the GM)."""

    def __init__(self, sizes: list[int], server: tuple[str, int], done: Callable[[], None]) -> None:
        self.sizes = sizes
        self.server = server
        self.done = done
        self.step = 0
        self.sent_at = 0.0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.monotonic()
        self.transport.sendto(self.step.to_bytes(1, "big") * self.sizes[self.step], self.server)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.step >= len(self.sizes) or data[:1] != self.step.to_bytes(1, "big"):
            return
        self.step += 1
        if self.step == len(self.sizes):
            self.done()
        else:
            self.send()

    def error_received(self, exc: Exception) -> None:
        pass


async def run_echo(
    addresses: list[str], sizes: list[int], timeout: float
) -> tuple[float, list[float], float]:
    loop = asyncio.get_running_loop()
    n = len(addresses)
    done_at: list[float] = []
    all_done = asyncio.Event()

    def done() -> None:
        done_at.append(time.monotonic())
        if len(done_at) == n:
            all_done.set()

    clients: list[EchoClient] = []
    for address in addresses:
        _, c = await loop.create_datagram_endpoint(
            lambda: EchoClient(sizes, (KS_ADDRESS, ECHO_PORT), done), local_addr=(address, 0)
        )
        clients.append(c)

    async def retransmit() -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for c in clients:
                if c.step < len(sizes) and now - c.sent_at > 2.0:
                    c.send()

    cpu0 = time.process_time()
    t0 = time.monotonic()
    for c in clients:
        c.send()
    ticker = asyncio.create_task(retransmit())
    try:
        await asyncio.wait_for(all_done.wait(), timeout)
    finally:
        ticker.cancel()
        for c in clients:
            assert c.transport is not None
            c.transport.close()
    return max(done_at) - t0, [t - t0 for t in done_at], time.process_time() - cpu0


# --- the KS ----------------------------------------------------------------------------


@dataclasses.dataclass
class GroupFigures:
    dh_group: int
    n: int
    registered: int
    failures: int
    rate: float
    p50: float
    p99: float
    rss_before: int
    rss_after: int
    ks_cpu: float
    gm_cpu: float
    datagrams: int
    sizes: list[int]
    rcvbuf_drops: int
    elapsed: float
    ks_cpu_wait: float
    gm_cpu_wait: float

    @property
    def kib_per_gm(self) -> float:
        return (self.rss_after - self.rss_before) / max(1, self.registered)

    @property
    def per_ks_cpu(self) -> float:
        return self.registered / self.ks_cpu if self.ks_cpu > 0 else float("inf")


def write_lab(directory: Path, n: int) -> tuple[Path, str]:
    write_private(directory / "psk.secret", "benchmark-secret\n")
    write_signing_key(directory / "rekey.key")
    auth = auth_toml("psk.secret")
    ks = ks_toml(
        directory, address=KS_ADDRESS, port=KS_PORT, auth=auth, ike="[ike]\ndh_groups = [19, 14]\n"
    )
    text = ks.read_text()
    text = text.replace("[ks]\n", f"[ks]\nmax_half_open = {max(4096, 2 * n)}\n", 1)
    text = text.replace(
        f'name = "GET"\nnumber = {GROUP}\n',
        f'name = "GET"\nnumber = {GROUP}\nsender_id_bits = 16\n',
        1,
    )
    ks.write_text(text)
    return ks, auth


def measure_group(
    directory: Path,
    ks_cfg: Path,
    auth: str,
    dh: int,
    addresses: list[str],
    timeout: float,
    ramp: float,
    rcvbuf: int,
) -> GroupFigures:
    template = load_gm_config(
        gm_toml(
            directory,
            address=addresses[0],
            name=f"gm-dh{dh}",
            auth=auth,
            servers=(KS_ADDRESS,),
            server_port=KS_PORT,
            ike=f"[ike]\ndh_groups = [{dh}]\n",
            registration_timeout=30.0,
        )
    )
    if rcvbuf:
        procs.gdoid_cmd = lambda: [sys.executable, "-c", KS_WITH_RCVBUF, str(rcvbuf)]
    try:
        ks = Daemon("ks", ks_cfg)
    finally:
        procs.gdoid_cmd = gdoid_cmd
    with ks:
        ks.wait_for("ks_started")
        # Warm up with one GM (imports, caches), so the figures below are per registration.
        warm = asyncio.run(run_swarm(template, addresses[:1], timeout))
        if warm.registered != 1:
            raise SystemExit(f"warm-up registration failed; KS log:\n{ks.text()[-3000:]}")
        pid = ks.proc.pid
        rss0, cpu0, drops0 = rss_kib(pid), cpu_seconds(pid), udp_rcvbuf_errors()
        wait0, gm_wait0 = run_delay(pid), run_delay("self")
        res = asyncio.run(run_swarm(template, addresses[1:], timeout, ramp))
        rss1, cpu1, drops1 = rss_kib(pid), cpu_seconds(pid), udp_rcvbuf_errors()
        wait1, gm_wait1 = run_delay(pid), run_delay("self")
        members = len(
            gdoictl_json(ks_cfg.parent / "ks.sock", "show", "crypto", "gdoi", "ks", "members")[
                "groups"
            ][0]["members"]
        )
        if members != res.registered + 1:
            print(f"  warning: KS lists {members} members, expected {res.registered + 1}")
        if "Traceback" in ks.text():
            print("  warning: the KS log has a traceback")
    return GroupFigures(
        dh,
        len(addresses) - 1,
        res.registered,
        res.failures,
        res.registered / res.elapsed,
        percentile(res.latencies, 0.50) if res.latencies else float("nan"),
        percentile(res.latencies, 0.99) if res.latencies else float("nan"),
        rss0,
        rss1,
        cpu1 - cpu0,
        res.gm_cpu,
        res.datagrams,
        warm.sizes,
        drops1 - drops0,
        res.elapsed,
        wait1 - wait0,
        gm_wait1 - gm_wait0,
    )


def measure_echo(
    addresses: list[str], sizes: list[int], timeout: float, rcvbuf: int
) -> tuple[float, float, float, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, KS_ADDRESS, str(ECHO_PORT), str(rcvbuf)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        cpu0 = cpu_seconds(proc.pid)
        elapsed, lat, client_cpu = asyncio.run(run_echo(addresses, sizes, timeout))
        server_cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.kill()
        proc.wait()
    return (
        len(addresses) / elapsed,
        percentile(lat, 0.5),
        percentile(lat, 0.99),
        server_cpu + client_cpu,
    )


def show(f: GroupFigures) -> None:
    print(f"DH group {f.dh_group}: {f.registered}/{f.n} registered, {f.failures} failures")
    print(
        f"  datagrams         {f.datagrams} sent by GMs ({f.datagrams / max(1, f.n):.2f} per GM, 5 without loss); "
        f"{f.rcvbuf_drops} UDP receive-buffer drops (system-wide)"
    )
    print(f"  rate              {f.rate:8.1f} registrations/s")
    print(f"  latency           p50 {f.p50 * 1000:7.1f} ms   p99 {f.p99 * 1000:7.1f} ms")
    print(
        f"  KS RSS            {f.rss_before / 1024:.1f} -> {f.rss_after / 1024:.1f} MiB   = {f.kib_per_gm:.2f} KiB per registered GM"
    )
    print(
        f"  KS CPU            {f.ks_cpu:.2f} s   = {f.per_ks_cpu:.1f} registrations per KS CPU-second "
        f"(KS busy {f.ks_cpu / f.elapsed:.0%} of the run, waited {f.ks_cpu_wait:.2f} s for a CPU)"
    )
    print(
        f"  GM-side CPU       {f.gm_cpu:.2f} s (this process, {f.n} engines; busy {f.gm_cpu / f.elapsed:.0%}, "
        f"waited {f.gm_cpu_wait:.2f} s for a CPU)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gms", type=int, default=500, help="concurrent group members (default 500)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up after SECONDS per run"
    )
    parser.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="spread the GMs' starts over SECONDS instead of starting all at once",
    )
    parser.add_argument(
        "--rcvbuf",
        type=int,
        default=0,
        metavar="BYTES",
        help="experiment: give the KS (and the echo server) a socket receive buffer of BYTES "
        "(default: the daemon's, i.e. the kernel default)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (binds UDP 848)", file=sys.stderr)
        return 2
    addresses = gm_addresses(args.gms + 1)  # one extra for the warm-up GM
    start = f"starts spread over {args.ramp:g} s" if args.ramp > 0 else "all started at once"
    if args.rcvbuf:
        start += f", KS receive buffer {args.rcvbuf} bytes"
    print(
        f"{args.gms} concurrent GMs ({start}), KS {KS_ADDRESS}:{KS_PORT}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}\n"
    )
    with tempfile.TemporaryDirectory(prefix="gdoid-bench-") as tmp:
        directory = Path(tmp)
        ks_cfg, auth = write_lab(directory, args.gms)
        figures = {
            dh: measure_group(
                directory, ks_cfg, auth, dh, addresses, args.timeout, args.ramp, args.rcvbuf
            )
            for dh in (19, 14)
        }
    for f in figures.values():
        show(f)
    echo_rate, echo_p50, echo_p99, echo_cpu = measure_echo(
        addresses[1:], figures[19].sizes[:5] or [256] * 5, args.timeout, args.rcvbuf
    )
    g19, g14 = figures[19], figures[14]
    print(
        f"\nUDP echo baseline: {echo_rate:.1f} 5-round-trip exchanges/s, p50 {echo_p50 * 1000:.1f} ms, p99 {echo_p99 * 1000:.1f} ms ({echo_cpu:.2f} CPU-s both sides)"
    )
    print("\nRatios")
    print(
        f"  group 14 / group 19:  rate {g14.rate / g19.rate:.2f}x   p50 {g14.p50 / g19.p50:.2f}x   p99 {g14.p99 / g19.p99:.2f}x   "
        f"KS CPU per registration {(g14.ks_cpu / max(1, g14.registered)) / (g19.ks_cpu / max(1, g19.registered)):.2f}x   "
        f"KS KiB per GM {g14.kib_per_gm / g19.kib_per_gm if g19.kib_per_gm else float('nan'):.2f}x"
    )
    print(
        f"  group 19 / UDP echo:  rate {g19.rate / echo_rate:.3f}x  (group 14: {g14.rate / echo_rate:.3f}x)"
    )
    print("\nTargets")
    print(
        f"  >= {TARGET_RATE:.0f} registrations/s (group 19): {g19.rate:.1f}  {'met' if g19.rate >= TARGET_RATE else 'NOT met'}"
    )
    print(
        f"  <= {TARGET_KIB_PER_GM:.0f} KiB KS memory per GM (group 19): {g19.kib_per_gm:.2f}  {'met' if g19.kib_per_gm <= TARGET_KIB_PER_GM else 'NOT met'}"
    )
    ok = all(f.registered == f.n and f.failures == 0 for f in figures.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
