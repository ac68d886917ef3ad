"""Userspace ESP tunnel throughput: iperf3 hostA -> hostB through two GMs.

    python benchmarks/tunnel.py [--seconds 10] [--crypto gcm] [--baseline null]

Builds the test topology (gdoid/netlab.py: hostA -- gm1 -- core -- gm2 -- hostB,
network namespaces), then for each dataplane (the baseline first, then the
crypto one) starts ``python -m gdoid.dataplane`` in gm1 and gm2 over the same
TUN / policy-routing setup and runs iperf3 TCP (``--seconds``) and UDP
(``--seconds``, unlimited rate, 1300-octet datagrams: received rate and loss)
from hostA to hostB.  ``gcm`` is the real engine with one AES-GCM-256 TEK made
up here (same key and SPI in both GMs, no key server); ``null`` is the engine's
NullDataplane (ESP framing, no cryptography).

Prints both sets of figures and the TCP ratio crypto / baseline (target >= 0.7),
plus the forwarders' CPU time per packet (less sensitive to other load on a
shared machine than throughput), and one JSON line with everything.  With
``--rounds N`` baseline and crypto runs alternate N times and medians are
compared.  ``--family both`` (default) also gives every GM IPv6 ULAs (LANs
fd00:1::/64, fd00:2::/64, core fd01::/64), a second TEK for fd00::/16 and runs
the same iperf3 pair over IPv6 (ESP over IPv6): the figures appear per family.
Needs root, iproute2, iperf3.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gdoid.dataplane.__main__ import BUILTIN  # noqa: E402
from gdoid.netlab import HOST_B, Topology, netns_unavailable_reason  # noqa: E402

TUN = "gdoi0"
HOST_B6 = "fd00:2::2"
# (namespace, interface, address, LAN default route via) for the IPv6 half.
IPV6_ADDRESSES = (
    ("hostA", "eth0", "fd00:1::2/64", "fd00:1::1"),
    ("gm1", "lan", "fd00:1::1/64", None),
    ("hostB", "eth0", "fd00:2::2/64", "fd00:2::1"),
    ("gm2", "lan", "fd00:2::1/64", None),
    ("gm1", "wan", "fd01::1/64", None),
    ("gm2", "wan", "fd01::2/64", None),
)


def add_ipv6(topo: Topology) -> None:
    """ULAs on the netlab topology (which switches IPv6 off), no DAD, GM WAN routes."""
    for ns in ("hostA", "gm1", "gm2", "hostB"):
        for key, value in (("accept_dad", "0"), ("accept_ra", "0"), ("disable_ipv6", "0")):
            for dev in ("all", "default"):
                topo.sysctl(ns, f"net.ipv6.conf.{dev}.{key}", value)
    for ns, ifname, address, via in IPV6_ADDRESSES:
        topo.sysctl(ns, f"net.ipv6.conf.{ifname}.disable_ipv6", "0")
        topo.ip(ns, "-6", "addr", "add", address, "dev", ifname, "nodad")
        if via is not None:
            topo.ip(ns, "-6", "route", "add", "default", "via", via)
    topo.ip("gm1", "-6", "route", "add", "fd00:2::/64", "via", "fd01::2", "dev", "wan")
    topo.ip("gm2", "-6", "route", "add", "fd00:1::/64", "via", "fd01::1", "dev", "wan")


def start_forwarder(
    topo: Topology, ns: str, spec: str, prefix: str, options: dict[str, str]
) -> subprocess.Popen[str]:
    args = ["--dataplane", spec, "--tun", TUN, "--wan", "wan"]
    if spec not in BUILTIN:
        args += ["--prefix", prefix]  # the engine's prefixes come from its TEK's selector
    for k, v in options.items():
        args += ["--option", f"{k}={v}"]
    proc = topo.popen(
        ns,
        sys.executable,
        "-m",
        "gdoid.dataplane",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("event") == "ready":
            return proc
    err = proc.stderr.read() if proc.stderr else ""
    raise RuntimeError(f"forwarder ({spec}) in {ns} did not start (exit {proc.wait()}):\n{err}")


def stop_forwarder(proc: subprocess.Popen[str]) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    stats: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("event") == "stats":
            stats = msg
    proc.wait(30)
    return stats


def iperf(topo: Topology, seconds: int, udp: bool, dst: str = HOST_B) -> dict[str, float]:
    server = topo.popen(
        "hostB", "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        cmd = ["iperf3", "-c", dst, "-t", str(seconds), "-J"]
        if udp:
            cmd += ["-u", "-b", "0", "-l", "1300"]
        res = topo.run("hostA", *cmd, check=False, timeout=seconds + 60)
        data = json.loads(res.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        end = data["end"]
        if udp:
            s = end["sum"]
            return {
                "sent_mbps": s["bits_per_second"] / 1e6,
                "received_mbps": s["bits_per_second"] * (1 - s["lost_percent"] / 100) / 1e6,
                "lost_percent": s["lost_percent"],
            }
        return {
            "sent_mbps": end["sum_sent"]["bits_per_second"] / 1e6,
            "received_mbps": end["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": end["sum_sent"].get("retransmits", 0),
        }
    finally:
        if server.poll() is None:
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    topo: Topology, spec: str, seconds: int, options: dict[str, str], ipv6: bool = False
) -> dict[str, Any]:
    # The same TEK in both GMs, each with its own RFC 6054 sender ID.
    gm1 = start_forwarder(topo, "gm1", spec, "10.2.0.0/16", {**options, "sid": "1"})
    gm2 = start_forwarder(topo, "gm2", spec, "10.1.0.0/16", {**options, "sid": "2"})
    try:
        if topo.ping("hostA", HOST_B, count=3) == 0:
            raise RuntimeError(f"no connectivity through the {spec} tunnel")
        cpu0 = cpu_seconds(gm1.pid) + cpu_seconds(gm2.pid)
        tcp = iperf(topo, seconds, udp=False)
        udp = iperf(topo, seconds, udp=True)
        six: dict[str, Any] = {}
        if ipv6:
            six = {
                "tcp6": iperf(topo, seconds, False, HOST_B6),
                "udp6": iperf(topo, seconds, True, HOST_B6),
            }
        cpu = cpu_seconds(gm1.pid) + cpu_seconds(gm2.pid) - cpu0
    finally:
        s1 = stop_forwarder(gm1)
        s2 = stop_forwarder(gm2)
    packets = sum(s.get("tun_read", 0) + s.get("net_read", 0) for s in (s1, s2))
    return {
        "dataplane": spec,
        "tcp": tcp,
        "udp": udp,
        **six,
        "forwarder_cpu_s": cpu,
        # CPU of both forwarder processes per packet handled (TCP + UDP runs): less
        # sensitive than throughput to other load on the machine.
        "cpu_us_per_packet": cpu / max(packets, 1) * 1e6,
        "gm1": s1,
        "gm2": s2,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--baseline", default="null", help="no-crypto dataplane spec (default null)")
    p.add_argument("--crypto", default="gcm", help="crypto dataplane spec (default gcm)")
    p.add_argument("--transform", default="esp-gcm-256")
    p.add_argument(
        "--rounds", type=int, default=1, help="alternating baseline/crypto rounds (medians)"
    )
    p.add_argument(
        "--family", choices=["4", "both"], default="both", help="IPv4 only, or IPv4 and IPv6"
    )
    args = p.parse_args(argv)

    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"tunnel benchmark skipped: {reason}", file=sys.stderr)
        return 2
    # One TEK for both GMs, made up here: no key server in this benchmark.
    # 64 random octets: enough for every transform (cipher key, salt, integrity key).
    options = {"key": secrets.token_hex(64), "spi": str(0x1000_0001), "transform": args.transform}
    ipv6 = args.family == "both"
    if ipv6:  # a second TEK (own key: never an IV reused under one key) for fd00::/16
        options.update(src6="fd00::/16", dst6="fd00::/16", key6=secrets.token_hex(64))
    runs: dict[str, list[dict[str, Any]]] = {args.baseline: [], args.crypto: []}
    with Topology() as topo:
        if ipv6:
            add_ipv6(topo)
        # Alternate baseline and crypto rounds so both see the same machine load.
        for rnd in range(args.rounds):
            for spec in (args.baseline, args.crypto):
                r = measure(topo, spec, args.seconds, options, ipv6)
                runs[spec].append(r)
                print(
                    f"round {rnd + 1} {spec:>8}: TCP {r['tcp']['received_mbps']:7.1f} Mbit/s"
                    f" (retransmits {r['tcp']['retransmits']}),"
                    f" UDP {r['udp']['received_mbps']:7.1f} Mbit/s received"
                    f" of {r['udp']['sent_mbps']:.1f} sent ({r['udp']['lost_percent']:.1f}% lost),"
                    f" forwarder CPU {r['cpu_us_per_packet']:.1f} us/packet",
                    flush=True,
                )
                if ipv6:
                    print(
                        f"round {rnd + 1} {spec:>8} IPv6: TCP {r['tcp6']['received_mbps']:7.1f} Mbit/s"
                        f" (retransmits {r['tcp6']['retransmits']}),"
                        f" UDP {r['udp6']['received_mbps']:7.1f} Mbit/s received"
                        f" of {r['udp6']['sent_mbps']:.1f} sent ({r['udp6']['lost_percent']:.1f}% lost)",
                        flush=True,
                    )

    def med(spec: str, *path: str) -> float:
        values = []
        for r in runs[spec]:
            v: Any = r
            for key in path:
                v = v[key]
            values.append(float(v))
        return median(values)

    summary: dict[str, Any] = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "transform": args.transform,
    }
    for spec in (args.baseline, args.crypto):
        summary[spec] = {
            "tcp_mbps": med(spec, "tcp", "received_mbps"),
            "udp_mbps": med(spec, "udp", "received_mbps"),
            "cpu_us_per_packet": med(spec, "cpu_us_per_packet"),
        }
        if ipv6:
            summary[spec]["tcp6_mbps"] = med(spec, "tcp6", "received_mbps")
            summary[spec]["udp6_mbps"] = med(spec, "udp6", "received_mbps")
        print(
            f"{spec:>8}: TCP {summary[spec]['tcp_mbps']:7.1f} Mbit/s,"
            f" UDP {summary[spec]['udp_mbps']:7.1f} Mbit/s received,"
            f" {summary[spec]['cpu_us_per_packet']:.1f} us CPU/packet"
            + (" (medians)" if args.rounds > 1 else "")
        )
        if ipv6:
            print(
                f"{spec:>8}: TCP {summary[spec]['tcp6_mbps']:7.1f} Mbit/s,"
                f" UDP {summary[spec]['udp6_mbps']:7.1f} Mbit/s received over IPv6"
            )
    base, crypto = summary[args.baseline], summary[args.crypto]
    tcp_ratio = crypto["tcp_mbps"] / max(base["tcp_mbps"], 1e-9)
    udp_ratio = crypto["udp_mbps"] / max(base["udp_mbps"], 1e-9)
    summary.update(tcp_ratio=tcp_ratio, udp_ratio=udp_ratio, loadavg=os.getloadavg())
    verdict = "OK" if tcp_ratio >= 0.7 else "BELOW TARGET"
    print(
        f"ratio {args.crypto}/{args.baseline}: TCP {tcp_ratio:.2f} (target >= 0.70: {verdict}),"
        f" UDP {udp_ratio:.2f}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(json.dumps({"summary": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
