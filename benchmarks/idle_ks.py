"""CPU an idle key server costs with N registered members (issue 10 §2).

    python benchmarks/idle_ks.py --members 10000 --seconds 30

Runs the real KS daemon (UdpShell + KeyServerEngine, a real UDP socket on a high
port, the control socket, the state saver) in this process, with N members
injected into its group's table as registrations would leave them, and no
traffic.  Prints the CPU the process used while idle (user + system, from
resource.getrusage) as a percentage of one core, the same with 0 members as the
baseline, the load average, and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdoid.config.loader import load_ks_config  # noqa: E402
from gdoid.keyserver.daemon import KeyServerDaemon  # noqa: E402
from gdoid.keyserver.group import Member  # noqa: E402
from tests.procs import auth_toml, ks_toml, write_private, write_signing_key  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def idle_run(members: int, seconds: float, port: int) -> tuple[float, float | None]:
    """CPU % of one core over ``seconds`` with ``members`` registered GMs, and timer runs a second."""
    with tempfile.TemporaryDirectory(prefix="gdoid-idle-") as tmp:
        d = Path(tmp)
        write_private(d / "psk.secret", "idle-secret\n")
        write_signing_key(d / "rekey.key")
        config = load_ks_config(
            ks_toml(d, address="127.0.0.1", port=port, auth=auth_toml("psk.secret"))
        )
        ks = KeyServerDaemon(config)
        now = time.time()
        for g in ks.groups.values():
            base = int(IPv4Address("10.0.0.0"))
            kek_spi = g.kek.spi
            teks = tuple(t.spi for t in g.teks)
            for i in range(members):
                address = IPv4Address(base + 1 + i)
                g.members[address] = Member(address, f"gm{i}", None, now, kek_spi, teks, port=848)
        await ks.start()
        try:
            await asyncio.sleep(1.0)  # start-up work (first state save) is not idle time
            r0 = getattr(ks.shell, "timer_runs", None)  # (absent before issue 10 §2)
            c0, t0 = cpu_seconds(), time.monotonic()
            await asyncio.sleep(seconds)
            c1, t1 = cpu_seconds(), time.monotonic()
            r1 = getattr(ks.shell, "timer_runs", None)
        finally:
            await ks.close()
    runs = (r1 - r0) / (t1 - t0) if r0 is not None and r1 is not None else None
    return 100.0 * (c1 - c0) / (t1 - t0), runs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=28848)
    args = parser.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    base, base_runs = asyncio.run(idle_run(0, args.seconds, args.port))
    loaded, runs = asyncio.run(idle_run(args.members, args.seconds, args.port))
    load1, load5, _ = os.getloadavg()
    for n, cpu, r in ((0, base, base_runs), (args.members, loaded, runs)):
        extra = f", on_timer {r:.2f} times a second" if r is not None else ""
        print(f"idle KS, {n} members: {cpu:.3f} % of one core over {args.seconds:g} s{extra}")
    print(f"ratio {args.members} / 0 members: {loaded / base if base > 0 else float('inf'):.2f}")
    print(f"load average (1 min, 5 min): {load1:.2f} {load5:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
