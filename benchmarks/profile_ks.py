"""Where the key server's time and memory go during registrations (no sockets).

    python benchmarks/profile_ks.py --gms 500 --dh 19 [--top 25]

A KeyServerEngine and N GroupMemberEngines in one process, datagrams handed
over by function calls.  The KS's ``datagram_received`` / ``on_timer`` run
under cProfile (GM time is not counted), and tracemalloc reports the KS
objects still allocated per registered GM (after the GM engines are freed),
grouped by line.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import pstats
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdoid.config.loader import load_gm_config, load_ks_config  # noqa: E402
from gdoid.groupmember.engine import GroupMemberEngine  # noqa: E402
from gdoid.keyserver.engine import SA_LINGER, KeyServerEngine  # noqa: E402
from gdoid.keyserver.group import Group  # noqa: E402
from gdoid.phase1 import phase1_config  # noqa: E402
from gdoid.protocol.pki import load_private_key  # noqa: E402
from tests.procs import auth_toml, gm_toml, ks_toml, write_private, write_signing_key  # noqa: E402

KS = ("127.0.1.1", 848)


class QuietLogger:
    def __getattr__(self, name: str):  # noqa: ANN204
        return lambda *args, **kwargs: None


def gm_addresses(n: int) -> list[str]:
    out, value = [], int(IPv4Address("127.0.1.2"))
    while len(out) < n:
        if value & 0xFF not in (0, 255):
            out.append(str(IPv4Address(value)))
        value += 1
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gms", type=int, default=500)
    parser.add_argument("--dh", type=int, default=19, choices=(14, 19, 20))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gdoid-prof-") as tmp:
        d = Path(tmp)
        write_private(d / "psk.secret", "profile-secret\n")
        write_signing_key(d / "rekey.key")
        auth = auth_toml("psk.secret")
        ks_path = ks_toml(d, address=KS[0], auth=auth, ike="[ike]\ndh_groups = [19, 14, 20]\n")
        ks_path.write_text(
            ks_path.read_text().replace(
                "number = 1234\n", "number = 1234\nsender_id_bits = 16\n", 1
            )
        )
        ks_cfg = load_ks_config(ks_path)
        gm_cfg = load_gm_config(
            gm_toml(
                d,
                address="127.0.1.2",
                name="gm",
                auth=auth,
                servers=(KS[0],),
                ike=f"[ike]\ndh_groups = [{args.dh}]\n",
            )
        )
        now = time.time()
        groups = {
            g.number: Group(
                g, load_private_key(g.kek.signing_key), ks_cfg.address, ks_cfg.port, now
            )
            for g in ks_cfg.groups
        }
    ks = KeyServerEngine(
        phase1_config(ks_cfg.ike, ks_cfg.auth, ks_cfg.address, ks_cfg.software_version),
        groups,
        max_half_open=10**6,
        logger=QuietLogger(),
    )

    def make_gm(address: str) -> GroupMemberEngine:
        cfg = dataclasses.replace(gm_cfg, address=IPv4Address(address))
        return GroupMemberEngine(
            cfg.address,
            cfg.groups,
            phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version),
            logger=QuietLogger(),
        )

    def run(gms: list[tuple[str, GroupMemberEngine]], profile: cProfile.Profile | None) -> float:
        queue: deque[tuple[bytes, tuple[str, int]]] = (
            deque()
        )  # (datagram, GM address) towards the KS
        by_addr = {(a, 5000): gm for a, gm in gms}
        t = time.time()
        for a, gm in gms:
            for data, _ in gm.start(t):
                queue.append((data, (a, 5000)))
        ks_time = 0.0
        while queue:
            data, peer = queue.popleft()
            t = time.time()
            c0 = time.perf_counter()
            if profile is not None:
                profile.enable()
            out = ks.datagram_received(data, peer, t)
            if profile is not None:
                profile.disable()
            ks_time += time.perf_counter() - c0
            for reply, to in out:
                for d2, _ in by_addr[to].datagram_received(reply, KS, t):
                    queue.append((d2, to))
        return ks_time

    addresses = gm_addresses(args.gms + 1)
    run([(addresses[0], make_gm(addresses[0]))], None)  # warm-up
    gms = [(a, make_gm(a)) for a in addresses[1:]]
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    profile = cProfile.Profile()
    ks_time = run(gms, profile)
    registered = sum(1 for _, gm in gms if gm.registrations[1234].registered_at is not None)
    gms.clear()  # what stays allocated now is the KS's
    gc.collect()
    after = tracemalloc.take_snapshot()
    print(
        f"{registered}/{args.gms} registered, DH group {args.dh}: KS time {ks_time:.3f} s "
        f"(under cProfile and tracemalloc) = {ks_time / max(1, registered) * 1000:.3f} ms per registration\n"
    )
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    report("KS memory while the phase-1 SAs linger", before, after, registered, args.top)
    # Let the SAs and finished exchanges age out (SA_LINGER): what stays is per member.
    ks.on_timer(time.time() + SA_LINGER + 1)
    gc.collect()
    aged = tracemalloc.take_snapshot()
    tracemalloc.stop()
    print(
        f"\nafter {SA_LINGER:g} s: {len(ks.sas)} phase-1 SAs, {len(ks.pulls)} PULL exchanges, "
        f"{sum(len(g.members) for g in ks.groups.values())} members"
    )
    report("KS memory in steady state (member table)", before, aged, registered, args.top)
    return 0


def report(
    title: str, before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, registered: int, top: int
) -> None:
    diff = [s for s in after.compare_to(before, "lineno") if s.size_diff > 0]
    total = sum(s.size_diff for s in diff)
    print(
        f"{title}: {total / 1024 / max(1, registered):.2f} KiB per registered GM (Python heap), by line:"
    )
    for s in diff[:top]:
        frame = s.traceback[0]
        print(
            f"  {s.size_diff / max(1, registered):8.1f} B/GM  {frame.filename.split('/work/main/')[-1]}:{frame.lineno}"
        )


if __name__ == "__main__":
    sys.exit(main())
