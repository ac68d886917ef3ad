"""Spoofed Main Mode message 1 floods against a real ``gdoid ks`` while real GMs register.

    python benchmarks/dos.py [--rates 1000,5000,20000] [--duration 60] [--gms 20]

For each rate a fresh KS process is started on 127.0.1.1:848.  A separate sender
process floods it with copies of a real GM's message 1 (fresh initiator cookie
each) from ``--sources`` distinct loopback addresses (127.16.0.1 upwards, raw
socket with IP_HDRINCL, one fixed source port per address so that conntrack keeps
one entry per address), at the rate asked or as fast as it manages, for
``--duration`` seconds.  Meanwhile ``--gms`` in-process GroupMemberEngine
initiators (127.0.1.2 upwards) start registering one after the other, spread over
the flood.  Printed per rate: each GM's registration time (first attempt ->
registered), KS CPU and RSS growth, half-open entries (maximum sampled), what the
flood cost (evictions, message-3s that found their state evicted) and bytes out /
bytes in for every kind of unauthenticated datagram (the KS's own counters).

Baselines in the same run: the same GMs registering with no flood (the ratio of
registration times), and a wire measurement of every unauthenticated message type
(tests/security/test_amplification.py's probes) before any flood.

Needs root (UDP 848, raw socket).  Only loopback is ever a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = (
    str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
)  # daemons run this tree

from benchmarks.registration import (  # noqa: E402
    GmEndpoint,
    QuietLogger,
    cpu_seconds,
    gm_addresses,
    rss_kib,
    udp_rcvbuf_errors,
)
from gdoid.config.loader import load_gm_config  # noqa: E402
from gdoid.config.model import GmConfig  # noqa: E402
from gdoid.groupmember.engine import GroupMemberEngine, Registration  # noqa: E402
from gdoid.phase1 import phase1_config  # noqa: E402
from gdoid.protocol.main_mode_initiator import MainModeInitiator  # noqa: E402
from tests.ikecraft import Prober, run_probes  # noqa: E402
from tests.procs import (  # noqa: E402
    Daemon,
    auth_toml,
    gdoictl_json,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)

KS_ADDRESS = "127.0.1.1"
KS_PORT = 848
PROBER = "127.0.1.250"
FIRST_SOURCE = "127.16.0.1"
TICK = 0.05
TARGET_SECONDS = 2.0  # every GM registers within 2 s of its first attempt (1,000 and 5,000/s)
TARGET_RSS_MIB = 30.0
KINDS = ("mm1", "mm3", "mm5", "notify", "malformed")

SENDER = r"""
import json, os, socket, struct, sys, time
target, port, rate, duration, nsrc, first = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
novel = sys.argv[7] == "1"  # every message 1 body differs (its last 3 octets: the version VID)
mm1 = bytes.fromhex(sys.stdin.readline().strip())
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL implied
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
assert target.startswith("127."), "loopback only"
dst = socket.inet_aton(target)
heads = []
v = int.from_bytes(socket.inet_aton(first), "big")
ip = struct.pack("!BBHHHBBH", 0x45, 0, 28 + len(mm1), 0, 0, 64, 17, 0)  # ID and checksum: the kernel's
udp = struct.pack("!HHHH", 500, port, 8 + len(mm1), 0)  # no UDP checksum (allowed in IPv4)
while len(heads) < nsrc:
    if v & 0xFF not in (0, 255):
        heads.append(ip + v.to_bytes(4, "big") + dst + udp)
    v += 1
assert heads[-1][12] == 127, "sources stay in 127/8"
rest = mm1[8:]
rnd = os.urandom
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic(); sent = errors = i = 0
while True:
    el = time.monotonic() - t0
    if el >= duration:
        break
    due = int(el * rate) if rate > 0 else sent + 256
    if sent >= due:
        time.sleep(0.0005)
        continue
    for _ in range(min(256, due - sent)):
        try:
            s.sendto(heads[i] + rnd(8) + (rest[:-3] + rnd(3) if novel else rest), (target, 0))
        except OSError:
            errors += 1
        sent += 1
        i = i + 1 if i + 1 < nsrc else 0
print(json.dumps({"sent": sent, "errors": errors, "elapsed": time.monotonic() - t0}), flush=True)
"""


@dataclasses.dataclass
class Run:
    rate: int
    times: list[float | None]  # per GM: first attempt -> registered (None: never)
    attempts: list[int]
    sent: int = 0
    send_errors: int = 0
    flood_seconds: float = 0.0
    ks_cpu: float = 0.0
    rss_before: int = 0
    rss_max: int = 0
    rss_after: int = 0
    half_open_max: int = 0
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    rcvbuf_drops: int = 0
    wall: float = 0.0


def counters(sock: Path) -> dict[str, int]:
    return {
        k: v
        for k, v in gdoictl_json(sock, "show", "gdoid", "counters").items()
        if isinstance(v, int)
    }


async def register_gms(
    template: GmConfig,
    addresses: list[str],
    starts: list[float],
    deadline: float,
    on_tick: Callable[[], None],
) -> tuple[list[float | None], list[int]]:
    """Start GM i at ``starts[i]`` seconds; registration time per GM (None if not by ``deadline``)."""
    loop = asyncio.get_running_loop()
    n = len(addresses)
    started: dict[int, float] = {}
    done: dict[int, float] = {}
    attempts = [0] * n
    all_done = asyncio.Event()

    def on_event_for(i: int) -> Callable[[str, Registration], None]:
        def on_event(what: str, reg: Registration) -> None:
            if what == "registered" and i not in done:
                done[i] = time.monotonic()
                if len(done) == n:
                    all_done.set()
            elif what == "failed":
                attempts[i] += 1

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
    t0 = time.monotonic()

    async def timers() -> None:
        last_sample = 0.0
        while True:
            await asyncio.sleep(TICK)
            now_m = time.monotonic()
            for i, ep in enumerate(endpoints):
                if i not in started and now_m - t0 >= starts[i]:
                    started[i] = now_m
                    attempts[i] += 1
                    ep.send(ep.engine.start(time.time()))
                elif i in started and i not in done:
                    ep.send(ep.engine.on_timer(time.time()))
            if now_m - last_sample >= 1.0:
                last_sample = now_m
                on_tick()

    ticker = asyncio.create_task(timers())
    try:
        await asyncio.wait_for(all_done.wait(), max(0.1, deadline))
    except TimeoutError:
        pass
    finally:
        ticker.cancel()
        for ep in endpoints:
            assert ep.transport is not None
            ep.transport.close()
    return [done[i] - started[i] if i in done else None for i in range(n)], attempts


def write_lab(directory: Path) -> tuple[Path, GmConfig]:
    write_private(directory / "psk.secret", "dos-benchmark-secret\n")
    write_signing_key(directory / "rekey.key")
    auth = auth_toml("psk.secret")
    ks = ks_toml(
        directory, address=KS_ADDRESS, port=KS_PORT, auth=auth, ike="[ike]\ndh_groups = [19, 14]\n"
    )
    template = load_gm_config(
        gm_toml(
            directory,
            address="127.0.1.2",
            name="gm",
            auth=auth,
            servers=(KS_ADDRESS,),
            ike="[ike]\ndh_groups = [19]\n",
        )
    )
    return ks, template


def measure(
    directory: Path,
    ks_cfg: Path,
    template: GmConfig,
    rate: int,
    duration: float,
    gms: int,
    sources: int,
    grace: float,
    novel: bool = False,
) -> Run:
    shutil.rmtree(directory / "ks-state", ignore_errors=True)
    addresses = gm_addresses(gms + 1)
    sock = directory / "ks.sock"
    p1 = phase1_config(template.ike, template.auth, template.address, template.software_version)
    [mm1] = MainModeInitiator(p1, IPv4Address(KS_ADDRESS), 0.0).start(0.0).send
    with Daemon("ks", ks_cfg) as ks:
        ks.wait_for("ks_started")
        warm, _ = asyncio.run(register_gms(template, addresses[:1], [0.0], 20.0, lambda: None))
        if warm[0] is None:
            raise SystemExit(f"warm-up registration failed; KS log:\n{ks.text()[-3000:]}")
        pid = ks.proc.pid
        sender = None
        if rate:
            sender = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SENDER,
                    KS_ADDRESS,
                    str(KS_PORT),
                    str(rate),
                    str(duration),
                    str(sources),
                    FIRST_SOURCE,
                    "1" if novel else "0",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert sender.stdin is not None and sender.stdout is not None
            sender.stdin.write(mm1.hex() + "\n")
            sender.stdin.flush()
            if sender.stdout.readline().strip() != "ready":
                raise SystemExit("flood sender failed to start")
        run = Run(rate, [], [])
        c0 = counters(sock)
        run.rss_before = run.rss_max = rss_kib(pid)
        cpu0, drops0, t0 = cpu_seconds(pid), udp_rcvbuf_errors(), time.monotonic()
        if sender is not None:
            assert sender.stdin is not None
            sender.stdin.write("go\n")
            sender.stdin.flush()
        span = duration if rate else gms * 0.25
        # GM i starts at 1 s + i/gms of the flood, the last one >= 10 s before its end.
        starts = (
            [1.0 + i * max(0.0, span - 11.0) / max(1, gms - 1) for i in range(gms)]
            if rate
            else [i * 0.25 for i in range(gms)]
        )

        def sample() -> None:
            run.rss_max = max(run.rss_max, rss_kib(pid))
            with contextlib.suppress(Exception):  # a control round trip may time out: a sample lost
                run.half_open_max = max(run.half_open_max, counters(sock).get("half_open", 0))

        run.times, run.attempts = asyncio.run(
            register_gms(template, addresses[1:], starts, span + grace, sample)
        )
        if sender is not None:
            assert sender.stdout is not None
            result = json.loads(sender.stdout.readline())
            sender.wait()
            run.sent, run.send_errors, run.flood_seconds = (
                result["sent"],
                result["errors"],
                result["elapsed"],
            )
        run.wall = time.monotonic() - t0
        sample()
        run.rss_after = rss_kib(pid)
        run.ks_cpu = cpu_seconds(pid) - cpu0
        run.rcvbuf_drops = udp_rcvbuf_errors() - drops0
        c1 = counters(sock)
        run.counters = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        if "Traceback" in ks.text():
            print("  warning: the KS log has a traceback")
    return run


def wire_probes(directory: Path, ks_cfg: Path, template: GmConfig) -> list[Any]:
    shutil.rmtree(directory / "ks-state", ignore_errors=True)
    p1 = phase1_config(template.ike, template.auth, IPv4Address(PROBER), template.software_version)
    with Daemon("ks", ks_cfg) as ks:
        ks.wait_for("ks_started")
        sock = directory / "ks.sock"
        prober = Prober(PROBER, (KS_ADDRESS, KS_PORT), lambda: counters(sock).get("received", 0))
        try:
            return run_probes(prober, p1)
        finally:
            prober.close()


def fmt_times(times: list[float | None]) -> str:
    return " ".join(f"{t:.2f}" if t is not None else "never" for t in times)


def show(run: Run, baseline: Run | None) -> None:
    done = [t for t in run.times if t is not None]
    title = f"flood {run.rate}/s asked" if run.rate else "no flood (baseline)"
    print(f"\n== {title}")
    if run.rate:
        achieved = run.sent / run.flood_seconds if run.flood_seconds else 0.0
        processed = run.counters.get("unauth_in_mm1", 0)
        print(
            f"  flood             {run.sent} MM1s sent in {run.flood_seconds:.1f} s = {achieved:.0f}/s achieved "
            f"({run.send_errors} send errors); KS handled {processed} "
            f"({processed / max(1, run.sent):.0%}); {run.rcvbuf_drops} UDP receive-buffer drops (system-wide)"
        )
    print(
        f"  GMs registered    {len(done)}/{len(run.times)}; attempts {sum(run.attempts)} "
        f"(registration restarts {sum(run.attempts) - len(run.times)})"
    )
    print(f"  registration s    {fmt_times(run.times)}")
    if done:
        print(f"                    median {statistics.median(done):.2f}  max {max(done):.2f}")
        if baseline is not None and run is not baseline:
            base = [t for t in baseline.times if t is not None]
            if base:
                print(
                    f"                    vs no flood: median {statistics.median(done) / statistics.median(base):.1f}x  "
                    f"max {max(done) / max(base):.1f}x"
                )
    print(
        f"  KS CPU            {run.ks_cpu:.1f} s in {run.wall:.1f} s ({run.ks_cpu / max(run.wall, 1e-9):.0%} of one core)"
    )
    print(
        f"  KS RSS            {run.rss_before / 1024:.1f} -> max {run.rss_max / 1024:.1f} -> {run.rss_after / 1024:.1f} MiB "
        f"(growth {(run.rss_max - run.rss_before) / 1024:.1f} MiB)"
    )
    c = run.counters
    print(
        f"  half-open         max {run.half_open_max} sampled; evicted {c.get('half_open_evicted', 0)}, "
        f"expired {c.get('half_open_expired', 0)}, MM3 after eviction {c.get('half_open_lost', 0)}, "
        f"novel MM1s shed {c.get('mm1_shed', 0)}, "
        f"DH computations {c.get('dh_computations', 0)}, amplification drops {c.get('amplification_dropped', 0)}"
    )
    print("  unauthenticated   kind       datagrams     bytes in    bytes out  out/in")
    for kind in KINDS:
        n, bi, bo = (
            c.get(f"unauth_in_{kind}", 0),
            c.get(f"unauth_bytes_in_{kind}", 0),
            c.get(f"unauth_bytes_out_{kind}", 0),
        )
        if n:
            print(
                f"                    {kind:9s} {n:10d} {bi:12d} {bo:12d}  {bo / bi if bi else 0:.3f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates",
        default="1000,5000,20000",
        help="flood rates in packets/s (default 1000,5000,20000)",
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of flood per rate (default 60)"
    )
    parser.add_argument(
        "--gms", type=int, default=20, help="real GMs registering during each flood (default 20)"
    )
    parser.add_argument(
        "--sources",
        type=int,
        default=50_000,
        help="distinct spoofed source addresses (default 50000)",
    )
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds GMs may take after the flood ends"
    )
    parser.add_argument(
        "--novel-bodies",
        action="store_true",
        help="every spoofed message 1 differs (random version VID): defeats the KS's offer cache",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (UDP 848, raw socket)", file=sys.stderr)
        return 2
    rates = [int(r) for r in args.rates.split(",") if r]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"Python {sys.version.split()[0]}; KS {KS_ADDRESS}:{KS_PORT}; {args.gms} GMs; "
        f"{args.sources} spoofed sources from {FIRST_SOURCE}; {args.duration:g} s per rate"
        f"{'; novel message 1 bodies' if args.novel_bodies else ''}"
    )
    with tempfile.TemporaryDirectory(prefix="gdoid-dos-") as tmp:
        directory = Path(tmp)
        ks_cfg, template = write_lab(directory)
        probes = wire_probes(directory, ks_cfg, template)
        print("\nWire, before any flood: every unauthenticated message type, bytes out / bytes in")
        for p in probes:
            print(
                f"  {p.name:40s} in {p.sent:6d}  out {p.out:5d}  ratio {p.out / p.sent if p.sent else 0:.2f}"
            )
        baseline = measure(
            directory, ks_cfg, template, 0, args.duration, args.gms, args.sources, args.grace
        )
        show(baseline, None)
        runs = []
        for rate in rates:
            run = measure(
                directory,
                ks_cfg,
                template,
                rate,
                args.duration,
                args.gms,
                args.sources,
                args.grace,
                args.novel_bodies,
            )
            runs.append(run)
            show(run, baseline)
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\nTargets")
    ok = True
    wire_amp = max((p.out / p.sent for p in probes if p.sent), default=0.0)
    print(
        f"  amplification <= 1.0 on the wire: max {wire_amp:.2f}  {'met' if wire_amp <= 1.0 else 'NOT met'}"
    )
    ok &= wire_amp <= 1.0
    for run in runs:
        done = [t for t in run.times if t is not None]
        every = len(done) == len(run.times)
        amp = max(
            (
                run.counters.get(f"unauth_bytes_out_{k}", 0) / b
                for k in KINDS
                if (b := run.counters.get(f"unauth_bytes_in_{k}", 0))
            ),
            default=0.0,
        )
        growth = (run.rss_max - run.rss_before) / 1024
        if run.rate <= 5000:
            met = every and max(done) <= TARGET_SECONDS
            print(
                f"  {run.rate}/s: every GM within {TARGET_SECONDS:g} s: max {max(done) if done else float('nan'):.2f} s, "
                f"{len(done)}/{len(run.times)}  {'met' if met else 'NOT met'}"
            )
        else:
            met = every
            print(
                f"  {run.rate}/s: every GM registers: {len(done)}/{len(run.times)}, max "
                f"{max(done) if done else float('nan'):.2f} s  {'met' if met else 'NOT met'}"
            )
        print(
            f"  {run.rate}/s: RSS growth < {TARGET_RSS_MIB:g} MiB: {growth:.1f}  {'met' if growth < TARGET_RSS_MIB else 'NOT met'}; "
            f"amplification {amp:.3f}  {'met' if amp <= 1.0 else 'NOT met'}"
        )
        ok &= met and growth < TARGET_RSS_MIB and amp <= 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
