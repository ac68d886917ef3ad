"""Interop tests: the compose topologies of compose/ on a real Docker engine.

A session fixture runs ``compose/build-base.sh`` once (debootstrap'd base image,
host-built wheels, offline ``docker build``; cached after the first run).  Each
topology is brought up once for its test class (class-scoped fixture), the
class's tests run in order against it, and it is always torn down with
``docker-compose down -v`` alone, after which the host must be as before: no
DOCKER-USER rule, bridge, container, network or volume more (``hoststate``).  Every wait polls the daemons (``gdoictl --json``)
or their logs with a deadline; a daemon that exits fails the wait at once.
The last test of each class stops the capture service and decodes the pcap
with the daemons' key logs (tshark, run in the base image).  The capture of
the last run stays in ``compose/<topology>/capture/`` for post-mortems.

What is covered (issue #6):

* ``basic`` (1 KS, 2 GMs with the ESP data path, a LAN host behind each;
  TEK lifetime 60 s, rekey lead time 30 s): registration; ping and TCP
  between the LAN hosts; a scheduled rekey reaching both GMs and the traffic
  moving to the new SPI; GM removal with transitional SAs (KEK gone, TEKs
  kept, traffic keeps flowing, GMs re-register before the TEKs run out); GM
  removal ``now`` (SAs deleted, re-registration within 2% of the TEK
  lifetime, new SPIs only); the pcap (Main Mode and GROUPKEY-PULL decrypted,
  ESP decrypted with a good ICV, including the SPI of the scheduled rekey).
* ``coop`` (3 KSs, 4 GMs): one primary; the primary's container killed, a
  secondary elected, a rekey from the new primary acknowledged by every GM
  (also those registered at the dead KS), all GMs and the surviving KSs on
  the same KEK and TEK; the pcap (Main Mode, PULL and COOP ANN decrypted).
* ``mixed-versions`` (GMs on 1.0.1 and 1.0.2): feature tables; a
  policy-replace rekey (1.0.2 installs the new SA and shortens the old one to
  TEK_SLT, 1.0.1 keeps the old lifetime); ``replace-now`` (1.0.2 deletes the
  old SAs, 1.0.1 keeps them); the pcap.

The image: its HEALTHCHECK runs ``gdoictl health`` (a GM with no KS turns unhealthy,
healthy once a KS appears and it registers); ``build-base.sh`` run again on the same
source keeps the image ID and leaves no untagged image.

Skipped when docker / docker-compose are missing or the engine cannot be
reached, or with ``GDOID_SKIP_INTEROP=1``.  ``GDOID_IMAGE`` names the gdoid
image that build-base.sh builds and the daemons run (default ``gdoid:latest``);
``GDOID_SKIP_BUILD=1`` skips build-base.sh and uses the images as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gdoid.log import ios_line_time
from tests.interop import hoststate

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
BASE_IMAGE = os.environ.get("GDOID_BASE_IMAGE", "gdoid-base:bookworm")

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _docker_usable() -> str | None:
    """Why the interop tests cannot run here, or None."""
    if os.environ.get("GDOID_SKIP_INTEROP") == "1":
        return "GDOID_SKIP_INTEROP=1"
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io docker-compose)"
    ok = subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    if not ok and (os.geteuid() != 0 or shutil.which("dockerd") is None):
        return (
            "the Docker engine is not running and cannot be started here (needs root and dockerd)"
        )
    return None


_WHY_NOT = _docker_usable()
if _WHY_NOT is not None:
    pytestmark.append(pytest.mark.skip(reason=f"compose interop tests need Docker: {_WHY_NOT}"))


@pytest.fixture(scope="session")
def images() -> None:
    """Build gdoid-base:bookworm, the wheelhouse and gdoid:latest once per session
    (``GDOID_SKIP_BUILD=1``: use the images as they are)."""
    if os.environ.get("GDOID_SKIP_BUILD") == "1":
        return
    start = time.monotonic()
    proc = subprocess.run(
        [str(COMPOSE_DIR / "build-base.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        # Build the wheels with the interpreter under test (it has pip; Debian's python3 may not).
        env={**os.environ, "PYTHON": sys.executable},
    )
    if proc.returncode != 0:
        pytest.fail(f"compose/build-base.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"build-base.sh: {time.monotonic() - start:.0f} s")


# "*Nov 28 08:49:56.707: %GDOI-4-GM_RECV_DELETE_IMMEDIATE: GM receive ..." (gdoid.log, ios format)
_MNEMONIC_LINE = re.compile(
    r"(\*?[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.\d{3}: )%GDOI-\d-([A-Z0-9_]+): (.*?)\s*$"
)


class Topology:
    """``docker-compose`` in one compose/<name> directory."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = COMPOSE_DIR / name
        self.capture = self.dir / "capture"
        self.host_before: hoststate.HostState = {}

    def compose(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["docker-compose", "--ansi", "never", *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} failed ({proc.returncode}) in {self.dir}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{self.logs()}"
            )
        return proc

    def exec(
        self, service: str, *cmd: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.compose("exec", "-T", service, *cmd, timeout=timeout, check=check)

    def ctl(self, service: str, *words: str) -> Any:
        """``gdoictl --json WORDS`` in a daemon container; None while it does not answer."""
        proc = self.exec(service, "gdoictl", "--json", "--timeout", "3", *words, check=False)
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout)

    def assert_daemon_unprivileged(self, service: str, caps: int = 0) -> None:
        """The gdoid daemon process in ``service`` runs as a non-root uid with exactly
        the effective capabilities ``caps`` (a CapEff bit mask; /proc of the container)."""
        probe = (
            "import os\n"
            "for p in os.listdir('/proc'):\n"
            "    try:\n"
            "        argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')\n"
            "        st = dict(line.split(':', 1) for line in open(f'/proc/{p}/status'))\n"
            "    except (OSError, ValueError):\n"
            "        continue\n"
            "    if any(a.endswith(b'bin/gdoid') for a in argv):\n"
            "        print(p, st['Uid'].split()[1], int(st['CapEff'], 16), b' '.join(argv).decode())\n"
        )
        out = self.exec(service, "python3", "-c", probe).stdout
        daemons = [line.split(maxsplit=3) for line in out.splitlines() if line.strip()]
        assert daemons, f"{service}: no gdoid daemon process found"
        for _pid, euid, cap_eff, cmd in daemons:
            assert int(euid) != 0, f"{service}: {cmd!r} runs as root"
            assert int(cap_eff) == caps, (
                f"{service}: {cmd!r} has CapEff {int(cap_eff):#x}, not {caps:#x}"
            )

    def logs(self, *services: str) -> str:
        proc = subprocess.run(
            ["docker-compose", "--ansi", "never", "logs", "--no-color", "--tail", "60", *services],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout[-8000:]

    def events(self, service: str, mnemonic: str) -> list[tuple[float, str]]:
        """(time, text) of each ``%GDOI-n-MNEMONIC`` line in the service's whole log."""
        proc = subprocess.run(
            ["docker-compose", "--ansi", "never", "logs", "--no-color", service],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        found = []
        for line in proc.stdout.splitlines():
            m = _MNEMONIC_LINE.search(line)
            if m and m.group(2) == mnemonic:
                stamp = ios_line_time(m.group(1))
                found.append((stamp, m.group(3)))
        return found

    def exited_daemons(self, services: tuple[str, ...]) -> list[str]:
        """Daemon services whose container is no longer running (one docker-compose call)."""
        proc = self.compose("ps", "--services", "--filter", "status=running", check=False)
        running = set(proc.stdout.split())
        return [svc for svc in services if svc not in running]

    def wait_for(
        self,
        what: str,
        probe: Callable[[], tuple[bool, Any]],
        daemons: tuple[str, ...],
        timeout: float = 60,
    ) -> Any:
        """Poll ``probe`` until it reports success; fail at once if a daemon exits."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            ok, last = probe()
            if ok:
                return last
            dead = self.exited_daemons(daemons)
            if dead:
                pytest.fail(
                    f"{self.name}: {', '.join(dead)} exited while waiting for {what}:\n"
                    f"{self.compose('ps', check=False).stdout}\n{self.logs()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: no {what} within {timeout:g} s (last: {last!r}):\n{self.logs()}"
                )
            time.sleep(0.5)

    def wait_events(
        self,
        services: tuple[str, ...],
        mnemonic: str,
        after: dict[str, int],
        daemons: tuple[str, ...],
        timeout: float = 60,
    ) -> dict[str, list[tuple[float, str]]]:
        """Wait until every service logged ``mnemonic`` more often than ``after[svc]``;
        returns the new lines of each."""

        def probe() -> tuple[bool, Any]:
            new = {svc: self.events(svc, mnemonic)[after.get(svc, 0) :] for svc in services}
            return all(new.values()), new

        return self.wait_for(f"{mnemonic} from {', '.join(services)}", probe, daemons, timeout)

    def counts(self, services: tuple[str, ...], mnemonic: str) -> dict[str, int]:
        return {svc: len(self.events(svc, mnemonic)) for svc in services}

    # --- daemon state --------------------------------------------------------------

    def members(self, ks: str) -> set[str]:
        data = self.ctl(ks, "show", "crypto", "gdoi", "ks", "members")
        if not data:
            return set()
        return {m["address"] for g in data["groups"] for m in g["members"]}

    def wait_members(
        self, ks: str, want: set[str], daemons: tuple[str, ...], timeout: float = 60
    ) -> set[str]:
        return self.wait_for(
            f"{sorted(want)} in the member list of {ks}",
            lambda: (lambda m: (m >= want, m))(self.members(ks)),
            daemons,
            timeout,
        )

    def gm(self, service: str) -> dict[str, Any]:
        """The GM's one group from ``show crypto gdoi --json`` ({} while it does not answer)."""
        data = self.ctl(service, "show", "crypto", "gdoi")
        return data["groups"][0] if data else {}

    def ipsec_sas(self, service: str) -> dict[int, dict[str, Any]]:
        """The GM data path's SAs by SPI (``show crypto ipsec sa --json``)."""
        data = self.ctl(service, "show", "crypto", "ipsec", "sa")
        assert data and data["enabled"], f"{service}: no data path: {data!r}"
        return {sa["spi"]: sa for sa in data["sas"]}

    def ping(self, src: str, dst: str, count: int = 3) -> subprocess.CompletedProcess[str]:
        return self.exec(
            src, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dst, check=False
        )

    # --- capture ---------------------------------------------------------------------

    def tshark(self, display_filter: str, *fields: str) -> list[list[str]]:
        """Frames of the capture matching ``display_filter``, decoded with the key log
        (WIRESHARK_CONFIG_DIR=capture/keys), run in the base image (no host tshark needed)."""
        cmd = [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{self.capture}:/capture:ro",
            "-e",
            "WIRESHARK_CONFIG_DIR=/capture/keys",
            BASE_IMAGE,
            "tshark",
            "-n",
            "-r",
            "/capture/capture.pcap",
            "-Y",
            display_filter,
            "-T",
            "fields",
        ]
        for f in fields or ("frame.number",):
            cmd += ["-e", f]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"tshark -Y {display_filter!r} failed:\n{proc.stderr[-2000:]}"
        return [line.split("\t") for line in proc.stdout.splitlines() if line.strip()]

    def check_capture(self, *, esp: bool) -> dict[str, Any]:
        """Stop the capture and check it decodes with the key logs:

        * every encrypted Main Mode (exchange type 2) message and every GROUPKEY-PULL
          (32) message is decrypted (its Hash payload is dissected; the KS's last
          PULL message shows its SEQ and KD payloads), and so is every COOP ANN (240);
          GROUPKEY-PUSH (33), encrypted under the KEK, is not in Wireshark's key log;
        * with ``esp``: there is ESP, every ESP packet is decrypted (inner IPv4) with
          a good ICV, none has a bad one;
        * no frame is malformed.
        """
        self.compose("stop", "capture", timeout=60)
        assert (self.capture / "capture.pcap").stat().st_size > 0, "empty capture"
        # Not ISAKMP quoted in ICMP errors (an ANN to a KS not yet listening): truncated.
        rows = self.tshark("isakmp && !icmp", "isakmp.exchangetype", "isakmp.flags", "isakmp.hash")
        assert rows, "no ISAKMP/GDOI in the capture"
        by_type: dict[int, list[tuple[bool, bool]]] = {}
        for exch, flags, hash_data in rows:
            by_type.setdefault(int(exch), []).append((bool(int(flags, 16) & 1), bool(hash_data)))
        summary: dict[str, Any] = {"isakmp": {k: len(v) for k, v in sorted(by_type.items())}}
        for exch in (2, 32, 240):
            encrypted = [decrypted for enc, decrypted in by_type.get(exch, []) if enc]
            if exch in (2, 32):
                assert encrypted, f"no encrypted ISAKMP exchange type {exch} in the capture"
            assert all(encrypted), (
                f"{encrypted.count(False)} of {len(encrypted)} encrypted exchange type {exch} "
                f"messages not decrypted with {self.capture / 'keys'}"
            )
        assert self.tshark("isakmp.exchangetype == 32 && isakmp.seq.seq && isakmp.kd.payload"), (
            "no GROUPKEY-PULL message decrypted down to its SEQ and KD payloads"
        )
        if esp:
            frames = self.tshark("esp", "esp.spi", "esp.icv_good", "esp.protocol")
            assert frames, "no ESP on the core network"
            undecrypted = [f for f in frames if f[1] != "1" or not f[2] or int(f[2], 0) != 4]
            assert not undecrypted, (
                f"{len(undecrypted)} of {len(frames)} ESP frames not decrypted with a good ICV "
                f"(spi, icv_good, next header): {undecrypted[:5]}"
            )
            assert not self.tshark("esp.icv_bad == 1"), "ESP with a bad ICV"
            summary["esp"] = len(frames)
            summary["esp_spis"] = sorted({f[0] for f in frames})
        malformed = self.tshark("_ws.malformed", "frame.number", "frame.protocols")
        assert not malformed, f"malformed frames in the capture: {malformed[:5]}"
        return summary


def _up(name: str) -> Iterator[Topology]:
    """Bring a topology up for a test class; tear it down with ``down -v`` alone (the
    documented command) and fail if the host is not left as it was: no DOCKER-USER
    rule, bridge, container, network or volume of ours may remain."""
    topo = Topology(name)
    topo.compose("down", "-v", "--remove-orphans", check=False)  # leftovers of an aborted run
    before = hoststate.snapshot()
    start = time.monotonic()
    try:
        topo.compose("up", "-d", timeout=300)
        print(f"{topo.name}: up in {time.monotonic() - start:.1f} s")
        topo.host_before = before
        yield topo
    finally:
        topo.compose("down", "-v", timeout=180, check=False)
        print(f"{topo.name}: {time.monotonic() - start:.1f} s from up to down")
    left = hoststate.leftovers(before, hoststate.snapshot())
    assert not left, f"{name}: `docker-compose down -v` left on the host: {left}"


def _tek_lifetime(topology: str) -> int:
    """TEK_CLT of sa ipsec 1 in a topology's (first) KS config."""
    name = "ks1.toml" if topology == "coop" else "ks.toml"
    config = tomllib.loads((COMPOSE_DIR / topology / name).read_text())
    return int(config["group"][0]["sa_ipsec"][0]["lifetime"])


def _tek_slt(remaining: float, configured: float) -> float:
    """TEK_SLT = MIN(TEK_RLT, MAX(90s, MIN(5% of TEK_CLT, 3600s))) (getvpn-features §2.2)."""
    return min(remaining, max(90, min(0.05 * configured, 3600)))


def _spi(text: str) -> int:
    return int(text, 16)


def _teks(gm: dict[str, Any]) -> dict[int, int]:
    """SPI -> remaining lifetime of a GM's TEKs (``show crypto gdoi --json``)."""
    return {_spi(t["spi"]): t["remaining"] for t in gm.get("teks", [])}


def _newest(gm: dict[str, Any]) -> int:
    teks = _teks(gm)
    return max(teks, key=lambda spi: teks[spi])


# --- basic: one KS, two GMs, a LAN host behind each ---------------------------------

BASIC_KS = "198.18.48.10"
BASIC_GMS = {"gm1": "198.18.48.21", "gm2": "198.18.48.22"}
BASIC_DAEMONS = ("ks", "gm1", "gm2")
HOST_B = "10.48.2.10"


@pytest.fixture(scope="class")
def basic(images: None) -> Iterator[Topology]:
    yield from _up("basic")


class TestBasic:
    """compose/basic, brought up once; the tests run in order and build on each other."""

    lifetime = _tek_lifetime("basic")
    facts: ClassVar[dict[str, Any]] = {}

    def _traffic(self, t: Topology, what: str) -> dict[str, dict[int, dict[str, Any]]]:
        """Ping host-a -> host-b and return the GMs' ESP SA counters from before the ping."""
        before = {gm: t.ipsec_sas(gm) for gm in BASIC_GMS}
        ping = t.ping("host-a", HOST_B)
        assert ping.returncode == 0, (
            f"{what}: ping {HOST_B} from host-a failed:\n{ping.stdout}\n{ping.stderr}\n"
            f"{t.logs('gm1', 'gm2')}"
        )
        return before

    @staticmethod
    def _grew(t: Topology, gm: str, before: dict[int, dict[str, Any]], key: str) -> dict[int, int]:
        """Per SPI, how much counter ``key`` grew on a GM since ``before``."""
        now = t.ipsec_sas(gm)
        grown = {spi: sa[key] - before.get(spi, {}).get(key, 0) for spi, sa in now.items()}
        return {spi: n for spi, n in grown.items() if n}

    @staticmethod
    def _away_from_rekey(t: Topology, margin: float = 8.0) -> None:
        """If the KS's next scheduled rekey is due within ``margin`` s, wait until both
        GMs have it, so that a test's before/after snapshots do not straddle it."""
        data = t.ctl("ks", "show", "crypto", "gdoi", "ks", "replay")
        assert data, f"the KS does not answer:\n{t.logs('ks')}"
        left = data[0]["next_rekey_in"]
        if left >= margin:
            return
        seqs = {gm: t.gm(gm)["seq"] for gm in BASIC_GMS}
        t.wait_for(
            "the imminent scheduled rekey",
            lambda: (lambda s: (all(s[gm] > seqs[gm] for gm in s), s))(
                {gm: t.gm(gm).get("seq", 0) for gm in BASIC_GMS}
            ),
            BASIC_DAEMONS,
            left + 10,
        )

    def test_registration_ping_tcp(self, basic: Topology) -> None:
        t = basic
        t0 = time.monotonic()
        # 1. Both GMs registered (the KS's member list, and each GM's own log line).
        t.wait_members("ks", set(BASIC_GMS.values()), BASIC_DAEMONS)
        for gm in BASIC_GMS:
            assert t.events(gm, "GM_REGS_COMPL"), t.logs(gm)
        print(f"basic: both GMs registered {time.monotonic() - t0:.1f} s after up")
        # Healthchecks: the image's `gdoictl health` (not a query that also answers
        # before registration), and every daemon healthy once registered.
        for svc in BASIC_DAEMONS:
            cid = t.compose("ps", "-q", svc).stdout.strip()
            check = json.loads(
                subprocess.run(
                    ["docker", "inspect", "-f", "{{json .Config.Healthcheck.Test}}", cid],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout
            )
            assert check[0] == "CMD" and check[1] == "gdoictl" and check[-1] == "health", check
            out = t.exec(svc, *check[1:], check=False)
            state = "gm registered" if svc.startswith("gm") else "ks listening"
            assert out.returncode == 0 and out.stdout.startswith(state), (svc, out.stdout)
        # The routed LAN traffic and ESP below cross the bridges with no host rule of ours.
        rules = hoststate.snapshot()["DOCKER-USER rules"]
        assert rules == t.host_before["DOCKER-USER rules"], f"DOCKER-USER changed: {rules}"
        # Non-root daemons: the KS without capabilities, the GMs with NET_ADMIN + NET_RAW only.
        t.assert_daemon_unprivileged("ks")
        for gm in BASIC_GMS:
            t.assert_daemon_unprivileged(gm, caps=(1 << 12) | (1 << 13))

        # 2. LAN host A pings LAN host B through gm1 -> ESP -> gm2.
        self._traffic(t, "after registration")

        # 3. TCP: host-a fetches http://10.48.2.10:8080/ from host-b's server.
        fetch = (
            "import urllib.request as u; "
            f"print(u.urlopen('http://{HOST_B}:8080/', timeout=5).status)"
        )
        tcp = t.exec("host-a", "python3", "-c", fetch, check=False)
        assert tcp.returncode == 0 and tcp.stdout.strip() == "200", (
            f"TCP to host-b failed:\n{tcp.stdout}\n{tcp.stderr}"
        )

    def test_scheduled_rekey(self, basic: Topology) -> None:
        """The KS rekeys lead_time before the TEK expires; both GMs install the new TEK
        and the LAN traffic moves to its SPI."""
        t = basic
        t0 = time.monotonic()
        before = {gm: t.gm(gm) for gm in BASIC_GMS}
        recv0 = t.counts(tuple(BASIC_GMS), "GM_RECV_REKEY")
        sent0 = len(t.events("ks", "KS_SEND_UNICAST_REKEY"))

        def rekeyed() -> tuple[bool, Any]:
            now = {gm: t.gm(gm) for gm in BASIC_GMS}
            ok = all(
                now[gm].get("seq", 0) > before[gm]["seq"]
                and set(_teks(now[gm])) - set(_teks(before[gm]))
                for gm in BASIC_GMS
            )
            return ok, now

        after = t.wait_for("a scheduled rekey", rekeyed, BASIC_DAEMONS, self.lifetime + 15)
        seqs = {after[gm]["seq"] for gm in BASIC_GMS}
        assert len(seqs) == 1, f"the GMs are on different SEQs: {after}"
        seq = seqs.pop()
        new_spi = _newest(after["gm1"])
        assert _newest(after["gm2"]) == new_spi, f"the GMs' newest TEKs differ: {after}"
        assert new_spi not in _teks(before["gm1"])
        print(
            f"basic: scheduled rekey seq {seq} (SPI 0x{new_spi:08x}) {time.monotonic() - t0:.1f} s in"
        )

        sent = t.events("ks", "KS_SEND_UNICAST_REKEY")[sent0:]
        assert f"Sending Unicast Rekey for group GET from address {BASIC_KS} with seq # {seq}" in [
            text for _, text in sent
        ], f"no scheduled (non policy-replace) KS_SEND_UNICAST_REKEY with seq # {seq}: {sent}"
        got = t.wait_events(tuple(BASIC_GMS), "GM_RECV_REKEY", recv0, BASIC_DAEMONS, 10)
        for gm, addr in BASIC_GMS.items():
            want = f"Received Rekey for group GET from {BASIC_KS} to {addr} with seq # {seq}"
            assert want in [text for _, text in got[gm]], f"{gm}: {got[gm]}"

        # Traffic keeps flowing, on the new SPI (counters of the GMs' data paths).
        before_sas = self._traffic(t, "after the scheduled rekey")
        for gm, key in (("gm1", "pkts_encaps"), ("gm2", "pkts_decaps")):
            grown = self._grew(t, gm, before_sas[gm], key)
            assert grown.get(new_spi, 0) >= 3 and set(grown) == {new_spi}, (
                f"{gm}: the echo requests did not go on the new SPI 0x{new_spi:08x} "
                f"({key} grew per SPI: {grown})"
            )
        for gm, key in (("gm2", "pkts_encaps"), ("gm1", "pkts_decaps")):
            grown = self._grew(t, gm, before_sas[gm], key)
            assert grown.get(new_spi, 0) >= 1 and set(grown) == {new_spi}, (
                f"{gm}: the echo replies did not go on the new SPI 0x{new_spi:08x} ({key}: {grown})"
            )
        self.facts["rekey_spi"] = new_spi

    def test_gm_removal_transitional(self, basic: Topology) -> None:
        """``clear crypto gdoi ks members``: GMs drop the KEK, keep (shortened) TEKs and
        the traffic on them, and re-register before those run out."""
        t = basic
        gms = tuple(BASIC_GMS)
        t.wait_members("ks", set(BASIC_GMS.values()), BASIC_DAEMONS)
        deletes0 = t.counts(gms, "GM_RECV_DELETE")
        regs0 = t.counts(gms, "GM_REGS_COMPL")
        self._away_from_rekey(t)
        before = {gm: t.gm(gm) for gm in gms}

        t0 = time.monotonic()
        t0_wall = time.time()  # GM log lines carry wall-clock stamps
        out = t.exec("ks", "gdoictl", "--yes", "clear", "crypto", "gdoi", "ks", "members").stdout
        assert "% This GM-Removal message will shorten all GMs' key lifetimes" in out, out
        assert "Sending GM-Removal message to group GET..." in out, out
        assert t.events("ks", "KS_SEND_GM_REMOVAL"), t.logs("ks")

        got = t.wait_events(gms, "GM_RECV_DELETE", deletes0, BASIC_DAEMONS, 10)
        for gm in gms:
            assert [text for _, text in got[gm]] == [
                "GM received delete-msg from KS in group GET. TEKs lifetime are reduced "
                "and re-registration will start before SA expiry"
            ], got[gm]
        # The KEK is deleted at once; the TEKs stay, cut to TEK_SLT.
        during = {gm: t.gm(gm) for gm in gms}
        for gm in gms:
            assert during[gm]["kek_spi"] is None, f"{gm} kept its KEK: {during[gm]}"
            old, now = _teks(before[gm]), _teks(during[gm])
            assert set(now) == set(old), f"{gm}: TEKs changed: {old} -> {now}"
            for spi, rem in now.items():
                assert rem <= _tek_slt(old[spi], self.lifetime) + 1, (gm, spi, old[spi], rem)
        assert t.members("ks") == set(), "the KS still lists members after the removal"

        # Transitional: the traffic keeps flowing on the old SAs.
        before_sas = self._traffic(t, "after a transitional GM removal")
        grown = self._grew(t, "gm1", before_sas["gm1"], "pkts_encaps")
        assert grown and set(grown) <= set(_teks(before["gm1"])), (
            f"gm1 did not encrypt on its old SAs: {grown}"
        )

        # Each GM re-registers on its usual timer, before its (shortened) TEKs run out.
        deadline = max(max(_teks(during[gm]).values()) for gm in gms)
        t.wait_members("ks", set(BASIC_GMS.values()), BASIC_DAEMONS, deadline + 10)
        took = time.monotonic() - t0
        new_regs = {gm: t.events(gm, "GM_REGS_COMPL")[regs0[gm] :] for gm in gms}
        assert all(new_regs.values()), new_regs
        # When the GMs re-registered (their log stamps), not when polling noticed it:
        # `docker-compose exec` alone takes seconds on a loaded machine.
        registered_after = max(regs[0][0] for regs in new_regs.values()) - t0_wall
        assert registered_after < deadline + 1, (
            f"re-registered {registered_after:.1f} s after the removal, TEKs ran {deadline} s"
        )
        after = {gm: t.gm(gm) for gm in gms}
        for gm in gms:
            assert after[gm]["kek_spi"] not in (None, before[gm]["kek_spi"]), after[gm]
        print(
            f"basic: transitional removal, both GMs re-registered after {registered_after:.1f} s (seen after {took:.1f} s)"
        )
        # Both on the KS's new keys: LAN traffic flows again.
        t.wait_for(
            "ping on the new keys",
            lambda: (lambda p: (p.returncode == 0, p.stdout[-300:]))(t.ping("host-a", HOST_B, 1)),
            BASIC_DAEMONS,
            15,
        )

    def test_gm_removal_now(self, basic: Topology) -> None:
        """``clear crypto gdoi ks members now``: GMs delete their SAs at once and
        re-register within 2% of the TEK lifetime, onto new SPIs only."""
        t = basic
        gms = tuple(BASIC_GMS)
        t.wait_members("ks", set(BASIC_GMS.values()), BASIC_DAEMONS)
        deletes0 = t.counts(gms, "GM_RECV_DELETE_IMMEDIATE")
        regs0 = t.counts(gms, "GM_REGS_COMPL")
        self._away_from_rekey(t)
        before = {gm: t.gm(gm) for gm in gms}
        old_spis = {gm: set(_teks(before[gm])) for gm in gms}
        assert all(max(_teks(before[gm]).values()) > 5 for gm in gms), before
        window = 0.02 * self.lifetime

        out = t.exec(
            "ks", "gdoictl", "--yes", "clear", "crypto", "gdoi", "ks", "members", "now"
        ).stdout
        assert "% This GM-Removal immediate message will cleanup all GMs downloaded policies" in out
        assert "Sending GM-Removal message to group GET..." in out, out

        got = t.wait_events(gms, "GM_RECV_DELETE_IMMEDIATE", deletes0, BASIC_DAEMONS, 10)
        removed_at = {}
        for gm in gms:
            (stamp, text), *_ = got[gm]
            m = re.fullmatch(
                r"GM receive REMOVAL-NOW in group GET to cleanup downloaded policy now\. "
                r"Re-registration will start in a randomly chosen period of (\d+) sec",
                text,
            )
            assert m, text
            assert int(m.group(1)) <= window, (
                f"{gm}: re-registration delay {m.group(1)} s > {window} s"
            )
            removed_at[gm] = stamp
        regs = t.wait_events(gms, "GM_REGS_COMPL", regs0, BASIC_DAEMONS, window + 15)
        delays = {gm: regs[gm][0][0] - removed_at[gm] for gm in gms}
        # The random delay, plus the daemon's timer tick and one registration.
        assert all(0 <= d <= window + 1.0 for d in delays.values()), (
            f"re-registration {delays} s after REMOVAL-NOW; 2% of {self.lifetime} s is {window} s"
        )
        print(
            f"basic: removal now, re-registered after "
            f"{ {gm: round(d, 2) for gm, d in delays.items()} } s (window {window:g} s)"
        )

        # The old SAs are gone (not kept beside the new ones, as after a rekey or a
        # transitional removal), in the SADB and in the data path.
        t.wait_members("ks", set(BASIC_GMS.values()), BASIC_DAEMONS, 10)
        for gm in gms:
            state = t.gm(gm)
            assert state["state"] == "REGISTERED" and state["kek_spi"], state
            assert state["kek_spi"] != before[gm]["kek_spi"], state
            assert not set(_teks(state)) & old_spis[gm], (
                f"{gm} kept old TEKs after REMOVAL-NOW: {old_spis[gm]} / {state['teks']}"
            )
            assert not set(t.ipsec_sas(gm)) & old_spis[gm], f"{gm}: old SAs in the data path"
        self._traffic(t, "after GM removal now")

    def test_capture_decrypted(self, basic: Topology) -> None:
        t = basic
        summary = t.check_capture(esp=True)
        # Decrypted with the key log: the inner ICMP echo requests and replies, and the TCP.
        requests = t.tshark(f"esp && icmp.type == 8 && ip.src == 10.48.1.10 && ip.dst == {HOST_B}")
        replies = t.tshark(f"esp && icmp.type == 0 && ip.src == {HOST_B} && ip.dst == 10.48.1.10")
        assert len(requests) >= 3 and len(replies) >= 3, (
            f"ESP did not decrypt to the ICMP echo (requests {len(requests)}, replies {len(replies)})"
        )
        assert t.tshark("esp && tcp.port == 8080"), "no decrypted TCP (port 8080) inside ESP"
        spi = self.facts.get("rekey_spi")
        if spi is not None:  # the traffic after the scheduled rekey, on its SPI
            assert t.tshark(f"esp.spi == 0x{spi:08x} && icmp"), f"no ICMP in ESP SPI 0x{spi:08x}"
        # GROUPKEY-PUSH: the scheduled rekey and the removals went out (and were acked).
        assert t.tshark("isakmp.exchangetype == 33"), "no GROUPKEY-PUSH in the capture"
        # No LAN traffic in the clear on the core.
        clear = t.tshark("ip.addr == 10.48.0.0/16 && !esp", "ip.src", "ip.dst", "ip.proto")
        assert not clear, f"LAN traffic in the clear on the core network: {clear[:5]}"
        print(f"basic: capture {summary}, {len(requests)} echo requests decrypted")


# --- coop: three cooperative KSs, four GMs --------------------------------------------

COOP_KSS = {"ks1": "198.18.49.11", "ks2": "198.18.49.12", "ks3": "198.18.49.13"}
COOP_GMS = {f"gm{i}": f"198.18.49.2{i}" for i in range(1, 5)}
COOP_DAEMONS = (*COOP_KSS, *COOP_GMS)


@pytest.fixture(scope="class")
def coop(images: None) -> Iterator[Topology]:
    yield from _up("coop")


class TestCoop:
    def _roles(self, t: Topology, kss: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        got = {svc: t.ctl(svc, "show", "crypto", "gdoi", "ks", "coop") for svc in kss}
        return {svc: (d or {}).get("role") for svc, d in got.items()}, got

    def test_one_primary_and_all_members(self, coop: Topology) -> None:
        t = coop

        def settled() -> tuple[bool, Any]:
            summary, got = self._roles(t, tuple(COOP_KSS))
            return all(r in ("Primary", "Secondary") for r in summary.values()), (summary, got)

        summary, got = t.wait_for("a settled COOP election", settled, COOP_DAEMONS, 60)
        primaries = [svc for svc, role in summary.items() if role == "Primary"]
        assert primaries == ["ks1"], f"expected ks1 (priority 250) as the only primary: {summary}"
        assert all(d["primary"] == COOP_KSS["ks1"] for d in got.values()), got
        # Members registered at secondaries reach the primary with the announcements.
        t.wait_members("ks1", set(COOP_GMS.values()), COOP_DAEMONS)
        for svc in COOP_DAEMONS:  # no data path here: no capabilities at all
            t.assert_daemon_unprivileged(svc)

    def test_primary_killed_group_survives(self, coop: Topology) -> None:
        """Kill the primary's container: ks2 (next priority) becomes primary, its rekey
        reaches every GM (gm1 and gm4 registered at ks1), and the group stays on one
        set of keys."""
        t = coop
        t.wait_members("ks1", set(COOP_GMS.values()), COOP_DAEMONS)
        gms = tuple(COOP_GMS)
        before = {gm: t.gm(gm) for gm in gms}
        assert {g["registered_ks"] for g in before.values()} >= {COOP_KSS["ks1"]}, before
        recv0 = t.counts(gms, "GM_RECV_REKEY")

        t0 = time.monotonic()
        t.compose("kill", "ks1")
        alive = ("ks2", "ks3", *gms)

        def failed_over() -> tuple[bool, Any]:
            summary, got = self._roles(t, ("ks2", "ks3"))
            ok = summary == {"ks2": "Primary", "ks3": "Secondary"} and all(
                d["primary"] == COOP_KSS["ks2"] for d in got.values()
            )
            return ok, got

        t.wait_for("ks2 elected primary after ks1 was killed", failed_over, alive, 45)
        took = time.monotonic() - t0
        trans = t.events("ks2", "COOP_KS_TRANS_TO_PRI")
        assert (
            f"KS {COOP_KSS['ks2']} in group GET transitioned to Primary "
            f"(Previous Primary = {COOP_KSS['ks1']})"
        ) in [text for _, text in trans], trans
        print(f"coop: ks1 killed, ks2 primary after {took:.1f} s")
        # The new primary knows every GM (COOP synchronises the member list).
        t.wait_members("ks2", set(COOP_GMS.values()), alive, 10)

        # Only the primary may rekey.
        refused = t.exec("ks3", "gdoictl", "crypto", "gdoi", "ks", "rekey", check=False)
        assert refused.returncode != 0
        assert "ERROR for group GET: This command must be executed on Pri-KS" in (
            refused.stdout + refused.stderr
        ), refused

        out = t.exec("ks2", "gdoictl", "crypto", "gdoi", "ks", "rekey").stdout
        m = re.search(
            r"%GDOI-5-KS_SEND_UNICAST_REKEY: Sending Unicast Rekey with policy-replace for group "
            rf"GET from address {re.escape(COOP_KSS['ks2'])} with seq # (\d+)",
            out,
        )
        assert m, out
        seq = int(m.group(1))
        got = t.wait_events(gms, "GM_RECV_REKEY", recv0, alive, 15)
        for gm, addr in COOP_GMS.items():
            want = f"Received Rekey for group GET from {COOP_KSS['ks2']} to {addr} with seq # {seq}"
            assert want in [text for _, text in got[gm]], f"{gm}: {got[gm]}"

        # Every GM acknowledged it to the new primary, and the whole group (GMs and both
        # surviving KSs) is on one KEK and the new TEK.
        def acked() -> tuple[bool, Any]:
            data = t.ctl("ks2", "show", "crypto", "gdoi", "ks", "members") or {"groups": []}
            acks = {m["address"]: m["acks_received"] for g in data["groups"] for m in g["members"]}
            return all(acks.get(a, 0) >= 1 for a in COOP_GMS.values()), (acks, data)

        _, data = t.wait_for("every GM's ack at ks2", acked, alive, 15)
        group = data["groups"][0]
        kek, new_tek = group["kek_spi"], _spi(group["tek_spis"][-1])

        def in_sync() -> tuple[bool, Any]:
            gm_state = {gm: t.gm(gm) for gm in gms}
            ks3 = t.ctl("ks3", "show", "crypto", "gdoi", "ks", "members") or {"groups": [{}]}
            ks3_group = ks3["groups"][0]
            ok = (
                all(
                    s.get("seq") == seq and s.get("kek_spi") == kek and _newest(s) == new_tek
                    for s in gm_state.values()
                )
                and ks3_group.get("kek_spi") == kek
                and f"{new_tek:08x}" in ks3_group.get("tek_spis", [])
            )
            return ok, (gm_state, ks3_group)

        t.wait_for("GMs and ks3 on the new primary's keys", in_sync, alive, 15)
        print(
            f"coop: rekey seq {seq} from ks2 acked by all GMs {time.monotonic() - t0:.1f} s after the kill"
        )

    def test_capture_decrypted(self, coop: Topology) -> None:
        summary = coop.check_capture(esp=False)
        assert 240 in summary["isakmp"], f"no COOP announcements in the capture: {summary}"
        print(f"coop: capture {summary}")


# --- mixed-versions: GMs on 1.0.1 and 1.0.2 ---------------------------------------------

MIXED_KS = "198.18.50.10"
MIXED_GMS = {"gm1": "198.18.50.21", "gm2": "198.18.50.22"}  # gm1 runs 1.0.1, gm2 1.0.2
MIXED_DAEMONS = ("ks", "gm1", "gm2")


@pytest.fixture(scope="class")
def mixed(images: None) -> Iterator[Topology]:
    yield from _up("mixed-versions")


class TestMixedVersions:
    lifetime = _tek_lifetime("mixed-versions")

    def test_feature_table(self, mixed: Topology) -> None:
        t = mixed
        t.wait_members("ks", set(MIXED_GMS.values()), MIXED_DAEMONS)
        for svc in MIXED_DAEMONS:
            t.assert_daemon_unprivileged(svc)
        for feature in ("gm-removal", "policy-replace"):
            out = t.exec("ks", "gdoictl", "show", "crypto", "gdoi", "feature", feature).stdout
            lines = [" ".join(line.split()) for line in out.splitlines()]
            assert "198.18.50.21 1.0.1 No" in lines, out
            assert "198.18.50.22 1.0.2 Yes" in lines, out
            assert "198.18.50.10 1.0.2 Yes" in lines, out

    def _rekey(self, t: Topology, *extra: str) -> tuple[dict[str, Any], dict[str, Any], int]:
        """``crypto gdoi ks rekey [replace-now]``; the GMs' state before and after it."""
        gms = tuple(MIXED_GMS)
        t.wait_members("ks", set(MIXED_GMS.values()), MIXED_DAEMONS)
        before = {gm: t.gm(gm) for gm in gms}
        recv0 = t.counts(gms, "GM_RECV_REKEY")
        sent0 = len(t.events("ks", "KS_SEND_UNICAST_REKEY"))
        out = t.exec("ks", "gdoictl", "crypto", "gdoi", "ks", "rekey", *extra).stdout
        seq = max(g["seq"] for g in before.values()) + 1
        line = (
            "%GDOI-5-KS_SEND_UNICAST_REKEY: Sending Unicast Rekey with policy-replace for group "
            f"GET from address {MIXED_KS} with seq # {seq}"
        )
        assert out.strip() == line, out
        assert [text for _, text in t.events("ks", "KS_SEND_UNICAST_REKEY")[sent0:]] == [
            line.split(": ", 1)[1]
        ]
        got = t.wait_events(gms, "GM_RECV_REKEY", recv0, MIXED_DAEMONS, 15)
        for gm, addr in MIXED_GMS.items():
            want = f"Received Rekey for group GET from {MIXED_KS} to {addr} with seq # {seq}"
            assert [text for _, text in got[gm]] == [want], got[gm]
        after = t.wait_for(
            f"both GMs at seq {seq}",
            lambda: (lambda s: (all(g.get("seq") == seq for g in s.values()), s))(
                {gm: t.gm(gm) for gm in gms}
            ),
            MIXED_DAEMONS,
            10,
        )
        return before, after, seq

    def test_policy_replace_rekey(self, mixed: Topology) -> None:
        """1.0.2 installs the new SA and shortens the old one to TEK_SLT; 1.0.1 gets the
        rekey without the policy-replace instruction and keeps the old lifetime."""
        before, after, _ = self._rekey(mixed)
        slt = _tek_slt(self.lifetime, self.lifetime)
        assert slt < self.lifetime - 120, "TEK lifetime too short to tell a shortened TEK apart"
        for gm in MIXED_GMS:
            old, now = _teks(before[gm]), _teks(after[gm])
            new = set(now) - set(old)
            assert len(new) == 1 and set(old) <= set(now), f"{gm}: {old} -> {now}"
            assert now[new.pop()] >= self.lifetime - 10, f"{gm}: new TEK lifetime {now}"
            for spi in old:
                if gm == "gm2":  # 1.0.2: shortened
                    assert now[spi] <= _tek_slt(old[spi], self.lifetime) + 1, (gm, old, now)
                else:  # 1.0.1: untouched
                    assert now[spi] >= old[spi] - 15 and now[spi] > slt, (gm, old, now)

    def test_policy_replace_now(self, mixed: Topology) -> None:
        """``replace-now``: 1.0.2 deletes the old SAs at once; 1.0.1 keeps them."""
        before, after, _ = self._rekey(mixed, "replace-now")
        for gm in MIXED_GMS:
            old, now = _teks(before[gm]), _teks(after[gm])
            new = set(now) - set(old)
            assert len(new) == 1, f"{gm}: {old} -> {now}"
            if gm == "gm2":
                assert set(now) == new, f"1.0.2 GM kept old TEKs after replace-now: {old} -> {now}"
            else:
                assert set(old) <= set(now), f"1.0.1 GM dropped old TEKs: {old} -> {now}"

    def test_capture_decrypted(self, mixed: Topology) -> None:
        summary = mixed.check_capture(esp=False)
        assert mixed.tshark("isakmp.exchangetype == 33"), "no GROUPKEY-PUSH in the capture"
        print(f"mixed-versions: capture {summary}")


# --- the image: HEALTHCHECK, reproducible build ---------------------------------------

GDOID_IMAGE = os.environ.get("GDOID_IMAGE", "gdoid:latest")


def _docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _inspect(obj: str, fmt: str = "{{json .}}") -> Any:
    return json.loads(_docker("inspect", "-f", fmt, obj).stdout)


def _health(container: str) -> dict[str, Any]:
    return _inspect(container, "{{json .State.Health}}") or {}


def _wait_health(container: str, want: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = _health(container)
        if health.get("Status") == want:
            return health
        running = _inspect(container, "{{json .State.Running}}")
        if not running or time.monotonic() > deadline:
            logs = _docker("logs", "--tail", "30", container, check=False)
            pytest.fail(
                f"{container}: not {want} within {timeout:g} s (running {running}): {health}\n"
                f"{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
            )
        time.sleep(0.5)


class TestImage:
    def test_healthcheck_says_registered(self, images: None, tmp_path: Path) -> None:
        """The image's HEALTHCHECK runs ``gdoictl health``: a GM that cannot reach its KS
        turns unhealthy (``gm registering``), and healthy once a KS appears and it registers.

        The containers run the image's own check command; only its timing is shortened
        (``--health-interval``), the start period is tested as configured in the image."""
        check = _inspect(GDOID_IMAGE, "{{json .Config.Healthcheck}}")
        assert check["Test"][0] == "CMD" and check["Test"][1] == "gdoictl", check
        assert check["Test"][-1] == "health", check
        start_period = check["StartPeriod"] / 1e9
        assert 30 <= start_period <= 120, (
            f"start period {start_period} s: registration needs ~30-60 s"
        )

        # A lab configuration (KS 127.0.0.1, GM 127.0.0.2, fresh keys), sockets where the
        # check looks for them, owned by the image's user.
        before = hoststate.snapshot()
        lab = tmp_path / "lab"
        lab.mkdir()
        _docker(
            "run",
            "--rm",
            "--user",
            "0",
            "--network",
            "none",
            "-v",
            f"{lab}:/lab",
            "--entrypoint",
            "sh",
            GDOID_IMAGE,
            "-c",
            "gdoid lab --export /lab >/dev/null"
            " && sed -i 's#^control_socket = .*#control_socket = \"/run/gdoid/gm.sock\"#' /lab/gm1.toml"
            " && sed -i 's#^control_socket = .*#control_socket = \"/run/gdoid/ks.sock\"#' /lab/ks.toml"
            " && chown -R 848:848 /lab",
        )
        gm, ks = "gdoid-test-health-gm", "gdoid-test-health-ks"
        fast = ("--health-interval", "1s", "--health-retries", "2", "--health-timeout", "5s")
        try:
            _docker(
                "run",
                "-d",
                "--name",
                gm,
                "--network",
                "none",
                "--cap-drop",
                "ALL",
                "--sysctl",
                "net.ipv4.ip_unprivileged_port_start=848",
                *fast,
                "--health-start-period",
                "1s",
                "-v",
                f"{lab}:/lab",
                GDOID_IMAGE,
                "gm",
                "--config",
                "/lab/gm1.toml",
            )
            assert _inspect(gm, "{{json .Config.Healthcheck.Test}}") == check["Test"]
            unhealthy = _wait_health(gm, "unhealthy", 30)
            last = unhealthy["Log"][-1]
            assert last["ExitCode"] == 1 and last["Output"].startswith("gm registering"), last

            # The KS in the GM's network namespace (127.0.0.1): the GM registers on its
            # next attempt and the same check reports it healthy.
            t0 = time.monotonic()
            _docker(
                "run",
                "-d",
                "--name",
                ks,
                "--network",
                f"container:{gm}",
                "--cap-drop",
                "ALL",
                "-v",
                f"{lab}:/lab",
                GDOID_IMAGE,
                "ks",
                "--config",
                "/lab/ks.toml",
            )
            healthy = _wait_health(gm, "healthy", 90)
            last = healthy["Log"][-1]
            assert last["ExitCode"] == 0 and last["Output"].startswith("gm registered"), last
            ks_health = _wait_health(ks, "healthy", 90)  # the image's own 10 s interval
            assert ks_health["Log"][-1]["Output"].startswith("ks listening"), ks_health
            print(
                f"image healthcheck: GM healthy {time.monotonic() - t0:.1f} s after the KS started"
            )
        finally:
            _docker("rm", "-f", "-v", ks, gm, check=False)
        assert not hoststate.leftovers(before, hoststate.snapshot())

    def test_build_base_is_reproducible(self, images: None) -> None:
        """``compose/build-base.sh`` again on the same source: the wheels come out the
        same, Docker's layer cache gives the same image ID, and no untagged image is left."""

        def run() -> float:
            t0 = time.monotonic()
            proc = subprocess.run(
                [str(COMPOSE_DIR / "build-base.sh")],
                capture_output=True,
                text=True,
                timeout=900,
                env={**os.environ, "PYTHON": sys.executable},
            )
            assert proc.returncode == 0, f"build-base.sh failed:\n{proc.stderr[-4000:]}"
            return time.monotonic() - t0

        def ids() -> dict[str, str]:
            return {
                ref: _docker("image", "inspect", "-f", "{{.Id}}", ref).stdout.strip()
                for ref in (GDOID_IMAGE, f"{GDOID_IMAGE}-builder")
            }

        def dangling() -> set[str]:
            out = _docker("images", "--no-trunc", "-q", "-f", "dangling=true").stdout
            return set(out.split())

        if os.environ.get("GDOID_SKIP_BUILD") == "1":
            run()  # the images may predate this source: build once first
        first, dangling0 = ids(), dangling()
        took = run()
        assert ids() == first, f"same source, new image: {first} -> {ids()}"
        assert dangling() <= dangling0, (
            f"build-base.sh left untagged images: {dangling() - dangling0}"
        )
        ours = _docker("images", "-q", "-f", "dangling=true", "-f", "label=org.gdoid.image").stdout
        assert not ours.split(), f"untagged gdoid images remain: {ours.split()}"
        print(f"build-base.sh again: {took:.1f} s, image {first[GDOID_IMAGE][:19]} unchanged")
