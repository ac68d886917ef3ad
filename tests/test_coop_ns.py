"""Cooperative key servers as real daemons in network namespaces (issue #5).

:class:`gdoid.netlab.CoopTopology` puts every KS and GM in its own namespace on
one core bridge: KS1-3 on 192.0.2.11-13 (priorities 100 / 75 / 50, ANN every
0.5 s), a rogue ks4 on 192.0.2.14 with the GMs' PSK, not the KSs' COOP PSK (configured as a peer
everywhere, started only by the ANN test), GM1-4 on 192.0.2.21-24 with a host
behind each (host<i> = 10.<i>.0.2).  GM i asks KS ((i-1) % 3) + 1 first: GM1
and GM4 register at KS1, GM2 at KS2, GM3 at KS3.  All KSs share the rekey
signing key and the PSK for 192.0.2.0/24.

The tests share one running group (a module fixture) and run in file order;
each starts from (and waits for) the converged group.  The group has
``activation_delay = 1`` (GAP ATD): a GM keeps sending on the old TEK for one
second after a rekey, so every GM holds the new TEK before anyone sends on it
and a rekey loses no packet.  A policy replace (``crypto gdoi ks rekey``)
goes further (spec §3.1): the GMs install the new TEKs for receiving at once
but keep sending on the old ones, shortened to TEK_SLT (180 s here), until
those run out, longer than the tests watch.  The failover test kills KS1, so
it comes last.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth, sa_ipsec
from gdoid.control import ControlRequest, request_sync
from gdoid.groupmember.sadb import shortened_lifetime
from gdoid.netlab import CoopTopology
from tests.dpnet import NsDaemon
from tests.procs import gdoictl, gdoictl_json, write_private, write_signing_key

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("netns_required")]

PERIOD = 0.5
FAILOVER_WITHIN = 3 * PERIOD + 1.0  # three silent periods, a KS tick and process scheduling
PRIORITY = {1: 100, 2: 75, 3: 50, 4: 255}
KSS = (1, 2, 3)
ROGUE = 4
GMS = (1, 2, 3, 4)
ACTIVATION_DELAY = 1
TEK_LIFETIME = 3600
TEK_SLT = shortened_lifetime(TEK_LIFETIME, TEK_LIFETIME)  # what GM removal / policy replace leave
GROUP = "GET"
NOT_PRIMARY_REMOVAL = "ERROR for group GET: can only execute this command on Primary KS"
NOT_PRIMARY_REKEY = "ERROR for group GET: This command must be executed on Pri-KS"

ks_addr = CoopTopology.ks_address
gm_addr = CoopTopology.gm_address
host_addr = CoopTopology.host_address


def first_ks(i: int) -> int:
    return (i - 1) % len(KSS) + 1


# Capture on a core bridge port: print the UDP payload of the next ISAKMP
# datagram from SRC with exchange type EXCH (hex), then exit.
CAPTURE_SCRIPT = r"""
import socket, sys
port, src, exch, timeout = sys.argv[1], socket.inet_aton(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((port, 0))
s.settimeout(timeout)
while True:
    frame = s.recv(65535)
    if frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 17 or ip[12:16] != src or int.from_bytes(ip[6:8], "big") & 0x3FFF:
        continue
    udp = ip[ihl:]
    payload = udp[8:int.from_bytes(udp[4:6], "big")]
    if int.from_bytes(udp[2:4], "big") == 848 and len(payload) >= 28 and payload[18] == exch:
        print(payload.hex())
        break
"""

SEND_SCRIPT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 848))
"""

# An ICMP echo stream: one request every INTERVAL s; prints "ok SEQ" per reply and
# "lost SEQ" when a reply is more than a second late; stops sending at EOF on
# stdin, waits for the stragglers and prints "done sent=N lost=M".
PING_STREAM = r"""
import os, select, socket, struct, sys, time
dst, interval, late = sys.argv[1], float(sys.argv[2]), 1.0
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
seq, lost, pending, stopping = 0, 0, {}, None
next_send = time.monotonic()
while True:
    now = time.monotonic()
    if stopping is None and now >= next_send:
        body = bytes(56)
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + body), ident, seq & 0xFFFF) + body, (dst, 0))
        pending[seq & 0xFFFF] = (seq, now)
        seq += 1
        next_send += interval
    for key, (q, sent_at) in list(pending.items()):
        if now - sent_at > late:
            del pending[key]
            lost += 1
            print(f"lost {q}", flush=True)
    if stopping is not None and (not pending or now > stopping):
        break
    wait = 0.05 if stopping is not None else max(0.0, min(0.05, next_send - now))
    ready = select.select([s] if stopping is not None else [s, 0], [], [], wait)[0]
    if s in ready:
        pkt = s.recv(65535)
        icmp = pkt[(pkt[0] & 15) * 4:]
        if len(icmp) >= 8 and icmp[0] == 0:
            rid, rseq = struct.unpack("!HH", icmp[4:8])
            if rid == ident and rseq in pending:
                print(f"ok {pending.pop(rseq)[0]}", flush=True)
    if 0 in ready and not os.read(0, 4096):
        stopping = time.monotonic() + late
print(f"done sent={seq} lost={lost}", flush=True)
"""

T = TypeVar("T")


def until(what: str, check: Callable[[], T], timeout: float = 15.0, interval: float = 0.1) -> T:
    """Poll ``check`` (gdoictl state) until it returns something truthy without failing an assert."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
        except (AssertionError, OSError, TimeoutError, KeyError, StopIteration) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s; last: {last!r}")
        time.sleep(interval)


class PingStream:
    """:data:`PING_STREAM` from one namespace, its output collected as it comes."""

    def __init__(self, topo: CoopTopology, ns: str, dst: str, interval: float = 0.02) -> None:
        self.ok = 0
        self.lost: list[int] = []
        self.summary = ""
        self._cond = threading.Condition()
        self.proc = topo.popen(
            ns,
            sys.executable,
            "-c",
            PING_STREAM,
            dst,
            str(interval),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                word, _, value = line.partition(" ")
                if word == "ok":
                    self.ok += 1
                elif word == "lost":
                    self.lost.append(int(value))
                elif word == "done":
                    self.summary = line.strip()
                self._cond.notify_all()

    def wait_replies(self, n: int, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.ok >= n, timeout):
                raise AssertionError(f"only {self.ok} of {n} echo replies (lost {self.lost})")

    def stop(self) -> tuple[int, list[int]]:
        """Stop sending, wait for the last replies: (requests sent, lost sequence numbers)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        m = re.fullmatch(r"done sent=(\d+) lost=\d+", self.summary)
        assert m is not None, f"ping stream ended without a summary (exit {self.proc.returncode})"
        return int(m.group(1)), self.lost


class CoopLab:
    """The running group: daemons by number, control-socket queries, config files."""

    def __init__(self, topo: CoopTopology, directory: Path) -> None:
        self.topo = topo
        self.dir = directory
        self.kss: dict[int, NsDaemon] = {}
        self.gms: dict[int, NsDaemon] = {}

    def write_configs(self) -> None:
        write_private(self.dir / "psk.secret", "coop-namespace-secret\n")
        write_private(self.dir / "wrong.psk", "not-the-group-secret\n")
        write_private(self.dir / "coop.psk", "coop-namespace-ks-pair-secret\n")
        write_signing_key(self.dir / "rekey.key")  # one rekey signing key for every KS
        every = (*KSS, ROGUE)
        for k in every:
            # KS pairs share a COOP key of their own; the rogue holds only the GMs' PSK.
            coop_psk = "psk.secret" if k == ROGUE else "coop.psk"
            peers = [{"address": ks_addr(p), "psk_file": coop_psk} for p in every if p != k]
            group = ks_group(
                activation_delay=ACTIVATION_DELAY, sas=[sa_ipsec(lifetime=TEK_LIFETIME)]
            )
            (self.dir / f"ks{k}.toml").write_text(
                ks_config(
                    ks_addr(k),
                    control_socket=f"{self.dir}/ks{k}.sock",
                    state_dir=f"{self.dir}/ks{k}-state",
                    auth=psk_auth("192.0.2.0/24", "wrong.psk" if k == ROGUE else "psk.secret"),
                    groups=[group],
                    coop={"priority": PRIORITY[k], "announce_interval": PERIOD, "peer": peers},
                )
            )
        for i in GMS:
            first = first_ks(i) - 1
            order = [*KSS[first:], *KSS[:first]]
            (self.dir / f"gm{i}.toml").write_text(
                gm_config(
                    gm_addr(i),
                    control_socket=f"{self.dir}/gm{i}.sock",
                    tun_name="gdoi0",
                    registration_timeout=5.0,
                    dataplane={"enabled": True, "wan_interface": "wan"},
                    auth=psk_auth("192.0.2.0/24", "psk.secret"),
                    groups=[gm_group([ks_addr(k) for k in order])],
                )
            )

    def start_ks(self, k: int) -> NsDaemon:
        self.kss[k] = NsDaemon(self.topo, f"ks{k}", "ks", self.dir / f"ks{k}.toml")
        return self.kss[k]

    def start_gm(self, i: int) -> NsDaemon:
        self.gms[i] = NsDaemon(self.topo, f"gm{i}", "gm", self.dir / f"gm{i}.toml")
        return self.gms[i]

    def stop_all(self) -> None:
        for d in [*self.gms.values(), *self.kss.values()]:
            d.stop()

    # --- control sockets (the protocol gdoictl speaks) -------------------------------

    def ks_sock(self, k: int) -> Path:
        return self.dir / f"ks{k}.sock"

    def gm_sock(self, i: int) -> Path:
        return self.dir / f"gm{i}.sock"

    @staticmethod
    def query(sock: Path, *words: str, confirm: int = 0) -> Any:
        resp = request_sync(sock, ControlRequest(words, confirm), timeout=5)
        assert resp.ok, f"{' '.join(words)}: {resp.error}"
        return resp.data

    def coop(self, k: int) -> dict[str, Any]:
        return self.query(self.ks_sock(k), "show", "crypto", "gdoi", "ks", "coop")

    def peer(self, k: int, of: int) -> dict[str, Any]:
        return next(p for p in self.coop(k)["peers"] if p["address"] == ks_addr(of))

    def ks_group(self, k: int) -> dict[str, Any]:
        return self.query(self.ks_sock(k), "show", "crypto", "gdoi")["groups"][0]

    def counters(self, k: int) -> dict[str, int]:
        return self.query(self.ks_sock(k), "show", "gdoid", "counters")

    def gm(self, i: int) -> dict[str, Any]:
        return self.query(self.gm_sock(i), "show", "crypto", "gdoi")["groups"][0]

    def sas(self, i: int) -> dict[int, dict[str, Any]]:
        return {
            sa["spi"]: sa
            for sa in self.query(self.gm_sock(i), "show", "crypto", "ipsec", "sa")["sas"]
        }

    def esp_totals(self, i: int) -> tuple[int, int]:
        sas = self.sas(i).values()
        return sum(sa["pkts_encaps"] for sa in sas), sum(sa["pkts_decaps"] for sa in sas)


def member_table(group: dict[str, Any]) -> set[tuple[Any, ...]]:
    return {
        (m["address"], m["version"], m["registered_at"], tuple(m["sender_ids"]))
        for m in group["members"]
    }


def keys_of(group: dict[str, Any]) -> tuple[str, frozenset[str]]:
    return group["kek_spi"], frozenset(group["tek_spis"])


def kss_converged(
    lab: CoopLab, kss: tuple[int, ...] = KSS, primary: int = 1, timeout: float = 15.0
) -> dict[int, dict[str, Any]]:
    """One primary, the others its secondaries, all with the same keys, SEQ and member table."""

    def check() -> dict[int, dict[str, Any]]:
        for k in kss:
            c = lab.coop(k)
            assert c["role"] == ("Primary" if k == primary else "Secondary"), (k, c["role"])
            assert c["primary"] == ks_addr(primary), (k, c["primary"])
            for p in c["peers"]:
                if int(p["address"].rsplit(".", 1)[1]) - 10 in kss:
                    assert p["status"] == "Alive", (k, p)
        groups = {k: lab.ks_group(k) for k in kss}
        keys = {k: (*keys_of(g), g["seq"]) for k, g in groups.items()}
        assert len(set(keys.values())) == 1, keys
        tables = {k: member_table(g) for k, g in groups.items()}
        assert all(t == tables[primary] for t in tables.values()), tables
        return groups

    return until(f"KSs {kss} converged on primary KS{primary}", check, timeout)


def converged(
    lab: CoopLab, kss: tuple[int, ...] = KSS, primary: int = 1, timeout: float = 20.0
) -> dict[int, dict[str, Any]]:
    """:func:`kss_converged`, every GM known to every KS, registered and holding the keys."""

    def check() -> dict[int, dict[str, Any]]:
        groups = kss_converged(lab, kss, primary, timeout=0)
        g = groups[primary]
        assert {m["address"] for m in g["members"]} == {gm_addr(i) for i in lab.gms}, g["members"]
        kek, teks = keys_of(g)
        for i in lab.gms:
            gm = lab.gm(i)
            assert gm["state"] == "REGISTERED" and gm["kek_spi"] == kek, (i, gm)
            assert teks <= set(gm["tek_spis"]), (i, teks, gm["tek_spis"])
        return groups

    return until(f"group converged on primary KS{primary}", check, timeout)


def teks_active(lab: CoopLab, teks: frozenset[str], timeout: float = 10.0) -> None:
    """Wait until every GM's data path sends on ``teks`` (their activation delay is over)."""
    wanted = {int(t, 16) for t in teks}

    def check() -> bool:
        for i in lab.gms:
            sas = lab.sas(i)
            assert all(spi in sas and sas[spi]["active"] for spi in wanted), (i, sas)
        return True

    until(f"TEKs {sorted(teks)} active on every GM", check, timeout)


def teks_pending(
    lab: CoopLab, teks: frozenset[str], old: frozenset[str] | None = None, timeout: float = 10.0
) -> None:
    """After a policy replace: every GM's data path holds ``teks`` for receiving but
    does not send on them yet; it sends on older TEKs (``old`` if given), shortened to
    TEK_SLT, until those run out."""
    wanted = {int(t, 16) for t in teks}

    def check() -> bool:
        for i in lab.gms:
            sas = lab.sas(i)
            assert all(spi in sas and not sas[spi]["active"] for spi in wanted), (i, sas)
            sending = {spi for spi, sa in sas.items() if sa["active"]}
            assert sending and sending.isdisjoint(wanted), (i, sas)
            assert all(sas[spi]["remaining"] <= TEK_SLT for spi in sending), (i, sas)
            if old is not None:
                assert sending == {int(t, 16) for t in old}, (i, sas)
        return True

    until(f"TEKs {sorted(teks)} installed, not yet sent on, on every GM", check, timeout)


def ping_pairs(lab: CoopLab, count: int = 3) -> None:
    """Every GM's LAN host reaches every other one (an echo crosses both directions)."""
    failures = []
    for i in lab.gms:
        for j in lab.gms:
            if i < j:
                got = lab.topo.ping(
                    f"host{i}", host_addr(j), count=count, timeout=1.0, interval=0.05
                )
                if got != count:
                    failures.append(f"host{i} -> host{j}: {got}/{count}")
    assert not failures, failures


def capture_ann(lab: CoopLab, src: int, dst: int) -> bytes:
    """The next ANN (exchange 240) KS ``src`` sends KS ``dst``, taken off the core bridge."""
    res = lab.topo.run(
        "core", sys.executable, "-c", CAPTURE_SCRIPT, f"ks{dst}", ks_addr(src), "240", "10"
    )
    return bytes.fromhex(res.stdout.strip())


def send_udp(lab: CoopLab, ns: str, data: bytes, dst: str) -> None:
    lab.topo.run(ns, sys.executable, "-c", SEND_SCRIPT, data.hex(), dst)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoopLab]:
    directory = tmp_path_factory.mktemp("coop")
    with CoopTopology(kss=len(KSS) + 1, gms=len(GMS)) as topo, contextlib.ExitStack() as stack:
        lab = CoopLab(topo, directory)
        stack.callback(lab.stop_all)
        lab.write_configs()
        for k in KSS:
            lab.start_ks(k)
        lab.kss[1].wait_for("COOP_KS_TRANS_TO_PRI")
        kss_converged(lab)
        for i in GMS:
            lab.start_gm(i)
        converged(lab)
        yield lab


# --- 1. election and shared state ----------------------------------------------------


def test_highest_priority_is_primary_and_every_ks_shows_the_same_group(lab: CoopLab) -> None:
    groups = converged(lab)
    assert any("COOP_KS_TRANS_TO_PRI" in line for line in lab.kss[1].since(0))
    for k in (2, 3):
        assert any(
            re.search(rf"COOP_KS_TRANS_TO_SEC.*Primary = {ks_addr(1)}", line)
            for line in lab.kss[k].since(0)
        )
        assert not any("COOP_KS_TRANS_TO_PRI" in line for line in lab.kss[k].since(0))
    for k in KSS:
        coop = gdoictl_json(lab.ks_sock(k), "show", "crypto", "gdoi", "ks", "coop")
        assert coop["priority"] == PRIORITY[k]
        assert {p["address"]: p["role"] for p in coop["peers"] if p["status"] == "Alive"} == {
            ks_addr(p): "Primary" if p == 1 else "Secondary" for p in KSS if p != k
        }
    # The same member list, versions included, through gdoictl on every KS.
    tables = []
    for k in KSS:
        data = gdoictl_json(lab.ks_sock(k), "show", "crypto", "gdoi", "ks", "members")
        tables.append(member_table(data["groups"][0]))
        text = gdoictl(lab.ks_sock(k), "show", "crypto", "gdoi", "ks", "members").stdout
        for i in GMS:
            assert gm_addr(i) in text
    assert tables[0] == tables[1] == tables[2]
    assert {(a, v) for a, v, *_ in tables[0]} == {(gm_addr(i), "1.0.2") for i in GMS}
    # The same KEK and TEKs (and SEQ) on every KS, and every GM holds them, registered
    # where it asked first.
    shown = {k: gdoictl_json(lab.ks_sock(k), "show", "crypto", "gdoi")["groups"][0] for k in KSS}
    assert len({(*keys_of(g), g["seq"]) for g in shown.values()}) == 1, shown
    kek, teks = keys_of(groups[1])
    assert keys_of(shown[1]) == (kek, teks)
    for i in GMS:
        gm = gdoictl_json(lab.gm_sock(i), "show", "crypto", "gdoi")["groups"][0]
        assert gm["registered_ks"] == ks_addr(first_ks(i)), (i, gm["registered_ks"])
        assert gm["kek_spi"] == kek and set(gm["tek_spis"]) == teks
    # Sender IDs come from disjoint per-KS slices: no two GMs share one.
    sids = [sid for m in groups[1]["members"] for sid in m["sender_ids"]]
    assert len(sids) == len(set(sids)) >= len(GMS)


# --- 2. ESP between GMs registered at different KSs ----------------------------------


def test_gms_registered_at_different_kss_exchange_esp(lab: CoopLab) -> None:
    converged(lab)
    before = {i: lab.esp_totals(i) for i in GMS}
    ping_pairs(lab)
    for i in GMS:
        enc, dec = lab.esp_totals(i)
        # Three echoes out and three in per peer GM (the others reach it and it them).
        assert enc - before[i][0] >= 3 * (len(GMS) - 1), (i, before[i], enc)
        assert dec - before[i][1] >= 3 * (len(GMS) - 1), (i, before[i], dec)


# --- 5. forged / replayed ANNs, a KS with the wrong PSK --------------------------------


def test_replayed_and_tampered_anns_are_rejected_and_counted(lab: CoopLab) -> None:
    converged(lab)
    received = lab.peer(1, 2)["ann_received"]
    ann = capture_ann(lab, src=2, dst=1)
    assert ann[18] == 240
    # KS1 has taken the genuine one (and the next) before we replay it.
    until("KS1 received the captured ANN", lambda: lab.peer(1, 2)["ann_received"] >= received + 2)
    rejected = lab.peer(1, 2)["ann_rejected"]
    total = lab.counters(1).get("ann_rejected", 0)

    mark = lab.kss[1].mark()
    send_udp(lab, "ks2", ann, ks_addr(1))
    line = lab.kss[1].wait_for(r"COOP_ANN_REJECTED", start=mark)
    assert ks_addr(2) in line and "replayed ANN sequence" in line, line
    assert lab.peer(1, 2)["ann_rejected"] == rejected + 1
    assert lab.counters(1).get("ann_rejected", 0) == total + 1

    tampered = bytearray(ann)
    tampered[-20] ^= 0x40  # a ciphertext byte
    mark = lab.kss[1].mark()
    send_udp(lab, "ks2", bytes(tampered), ks_addr(1))
    line = lab.kss[1].wait_for(r"COOP_ANN_REJECTED", start=mark)
    assert "replayed" not in line, line  # refused by its integrity check, not its sequence number
    assert lab.peer(1, 2)["ann_rejected"] == rejected + 2
    assert lab.counters(1).get("ann_rejected", 0) == total + 2

    # Nothing else changed: KS2 is still heard, and the next genuine ANN is accepted.
    received = lab.peer(1, 2)["ann_received"]
    until("KS1 accepts KS2's next ANN", lambda: lab.peer(1, 2)["ann_received"] > received)
    assert lab.peer(1, 2)["status"] == "Alive" and lab.peer(1, 2)["ann_rejected"] == rejected + 2
    converged(lab)


def test_ks_with_the_wrong_psk_never_joins(lab: CoopLab) -> None:
    converged(lab)
    marks = {k: lab.kss[k].mark() for k in KSS}
    rogue = lab.start_ks(ROGUE)
    try:
        # Alone after listening, it calls itself primary (priority 255 would beat everyone) ...
        rogue.wait_for("COOP_KS_TRANS_TO_PRI")
        # ... while each KS refuses its phase 1: the PSKs differ.
        for k in KSS:
            lab.kss[k].wait_for(rf"PHASE1_FAILED.*{re.escape(ks_addr(ROGUE))}", start=marks[k])
        for p in lab.coop(ROGUE)["peers"]:
            assert p["status"] == "Dead" and p["ann_received"] == 0 and p["priority"] is None, p
        for k in KSS:
            p = lab.peer(k, ROGUE)
            assert p["status"] == "Dead" and p["ann_received"] == 0 and p["priority"] is None, (
                k,
                p,
            )
            assert not any(
                "COOP_KS_REACH" in line and ks_addr(ROGUE) in line
                for line in lab.kss[k].since(marks[k])
            )
        groups = converged(lab)  # KS1 still primary, the group unchanged
        assert keys_of(groups[1]) != keys_of(lab.ks_group(ROGUE))
    finally:
        rogue.stop()
        del lab.kss[ROGUE]


# --- 6. GM removal and policy replace: primary only, reaching every GM ----------------


def test_secondaries_refuse_removal_and_rekey(lab: CoopLab) -> None:
    groups = converged(lab)
    for k in (2, 3):
        for words, error in (
            (("crypto", "gdoi", "ks", "rekey"), NOT_PRIMARY_REKEY),
            (("crypto", "gdoi", "ks", "rekey", "replace-now"), NOT_PRIMARY_REKEY),
            (("clear", "crypto", "gdoi", "ks", "members"), NOT_PRIMARY_REMOVAL),
            (("clear", "crypto", "gdoi", "ks", "members", "now"), NOT_PRIMARY_REMOVAL),
        ):
            res = gdoictl(lab.ks_sock(k), *words, yes=True)
            assert res.returncode != 0, (k, words, res.stdout)
            assert res.stdout.strip() == error, (k, words, res.stdout, res.stderr)
    assert not any("KS_SEND" in line for k in (2, 3) for line in lab.kss[k].since(0))
    after = kss_converged(lab)
    assert keys_of(after[1]) == keys_of(groups[1]) and after[1]["seq"] == groups[1]["seq"]


def test_policy_replace_and_removal_from_the_primary_reach_gms_of_secondaries(lab: CoopLab) -> None:
    groups = converged(lab)
    old_teks = keys_of(groups[1])[1]
    regs = {i: lab.gm(i)["registrations"] for i in GMS}
    marks = {i: lab.gms[i].mark() for i in GMS}

    res = gdoictl(lab.ks_sock(1), "crypto", "gdoi", "ks", "rekey")
    assert res.returncode == 0, res.stdout + res.stderr
    seq = lab.ks_group(1)["seq"]
    assert res.stdout.strip() == (
        f"%GDOI-5-KS_SEND_UNICAST_REKEY: Sending Unicast Rekey with policy-replace for group GET "
        f"from address {ks_addr(1)} with seq # {seq}"
    )
    new_teks = keys_of(lab.ks_group(1))[1]
    assert new_teks and not new_teks & old_teks
    for i in GMS:  # GM2 and GM3 registered through secondaries
        lab.gms[i].wait_for(
            rf"GM_RECV_REKEY.*from {re.escape(ks_addr(1))} .*seq # {seq}\b", start=marks[i]
        )
        lab.gms[i].wait_for(r"rekey_installed.*policy_replace=True", start=marks[i])
        gm = lab.gm(i)
        assert gm["seq"] == seq and gm["registrations"] == regs[i], (i, gm)
        assert new_teks <= set(gm["tek_spis"]), (i, gm["tek_spis"])
        for t in gm["teks"]:
            if t["spi"] in old_teks:
                assert t["remaining"] <= TEK_SLT, (i, t)  # shortened
            else:
                assert t["remaining"] > TEK_SLT, (i, t)
    kss_converged(lab)  # the secondaries took the new TEKs and SEQ from the primary's ANN

    marks = {i: lab.gms[i].mark() for i in GMS}
    res = gdoictl(lab.ks_sock(1), "clear", "crypto", "gdoi", "ks", "members", yes=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Sending GM-Removal message to group GET..." in res.stdout
    for i in GMS:
        lab.gms[i].wait_for("GM_RECV_DELETE", start=marks[i])
        gm = lab.gm(i)
        assert gm["kek_spi"] is None, (i, gm)  # KEK gone at once ...
        assert gm["teks"] and all(t["remaining"] <= TEK_SLT for t in gm["teks"]), (
            i,
            gm["teks"],
        )  # ... TEKs short
    assert not any("GM_REKEY_REJECTED" in line for i in GMS for line in lab.gms[i].since(marks[i]))

    # Back to normal: the KSs agree on the post-removal keys; the GMs register again.
    removal_keys = keys_of(lab.ks_group(1))
    until(
        "secondaries hold the post-removal keys",
        lambda: all(keys_of(lab.ks_group(k)) == removal_keys for k in KSS),
    )
    for i in GMS:
        lab.query(lab.gm_sock(i), "clear", "crypto", "gdoi")
    groups = converged(lab)
    assert keys_of(groups[1]) == removal_keys
    for i in GMS:
        gm = lab.gm(i)
        assert gm["registrations"] == regs[i] + 1 and gm["registered_ks"] == ks_addr(first_ks(i)), (
            i,
            gm,
        )
    teks_active(lab, removal_keys[1])
    ping_pairs(lab, count=2)


# --- 4. partition and heal -----------------------------------------------------------


def test_partition_heals_to_one_primary_and_one_set_of_keys(lab: CoopLab) -> None:
    groups = converged(lab)
    before_teks = keys_of(groups[1])[1]
    regs = {i: lab.gm(i)["registrations"] for i in GMS}
    side_a = ("ks1", "gm1", "gm4")
    side_b = ("ks2", "ks3", "gm2", "gm3")
    mark2 = lab.kss[2].mark()
    gm_marks = {i: lab.gms[i].mark() for i in GMS}
    lab.topo.partition(side_a, side_b)
    try:
        lab.kss[2].wait_for("COOP_KS_TRANS_TO_PRI", start=mark2, timeout=FAILOVER_WITHIN + 5)
        until("KS3 follows KS2", lambda: lab.coop(3)["primary"] == ks_addr(2))
        assert lab.coop(1)["role"] == "Primary"
        # Both halves rekey on their own (policy replace): the keys diverge, while the TEK
        # of before the partition, shortened to TEK_SLT, keeps carrying every GM's traffic.
        for k, gms in ((1, (1, 4)), (2, (2, 3))):
            data = lab.query(lab.ks_sock(k), "crypto", "gdoi", "ks", "rekey")
            for i in gms:
                lab.gms[i].wait_for(
                    rf"GM_RECV_REKEY.*from {re.escape(ks_addr(k))} .*seq # {data['seq'][0]}\b",
                    start=gm_marks[i],
                )
        winner = keys_of(lab.ks_group(1))
        loser = keys_of(lab.ks_group(2))
        assert winner[1] != loser[1] and winner[1] != before_teks
        until("KS3 holds KS2's keys", lambda: keys_of(lab.ks_group(3)) == loser)
        # Each half still works on its own keys.
        assert lab.topo.ping("host1", host_addr(4), count=2, timeout=1.0, interval=0.05) == 2
        assert lab.topo.ping("host2", host_addr(3), count=2, timeout=1.0, interval=0.05) == 2
    finally:
        lab.topo.heal()
    lab.kss[2].wait_for(rf"COOP_KS_TRANS_TO_SEC.*Primary = {re.escape(ks_addr(1))}", start=mark2)
    groups = converged(lab)
    assert keys_of(groups[1]) == winner  # the winner's keys stand
    assert all(lab.coop(k)["primary"] == ks_addr(1) for k in KSS)
    for i in GMS:
        gm = lab.gm(i)
        assert gm["registrations"] == regs[i], (
            i,
            gm,
        )  # the loser's GMs moved by rekey, not re-registration
    # Every GM holds the winner's TEK, to send on once the transitional one runs out.
    teks_pending(lab, winner[1], old=before_teks)
    ping_pairs(lab)


# --- 3. the primary dies --------------------------------------------------------------


def test_primary_killed_secondary_takes_over_rekeys_and_traffic_never_stops(lab: CoopLab) -> None:
    groups = converged(lab)
    kek = keys_of(groups[1])[0]
    before = {i: lab.gm(i) for i in GMS}
    marks = {i: lab.gms[i].mark() for i in GMS}
    mark2, mark3 = lab.kss[2].mark(), lab.kss[3].mark()
    # host1 sits behind GM1, registered at KS1 (the victim); host2 behind GM2 (at KS2).
    stream = PingStream(lab.topo, "host1", host_addr(2))
    try:
        stream.wait_replies(10)
        killed_at = time.monotonic()
        lab.kss[1].proc.kill()
        lab.kss[1].proc.wait(10)
        lab.kss[2].wait_for(
            rf"COOP_KS_TRANS_TO_PRI.*Previous Primary = {re.escape(ks_addr(1))}",
            start=mark2,
            timeout=FAILOVER_WITHIN + 5,
        )
        took = time.monotonic() - killed_at
        assert took <= FAILOVER_WITHIN, f"KS2 took over {took:.2f} s after KS1 died"
        assert not any("COOP_KS_TRANS_TO_PRI" in line for line in lab.kss[3].since(mark3))
        until(
            "KS3 follows KS2",
            lambda: lab.coop(3)["primary"] == ks_addr(2) and lab.coop(3)["role"] == "Secondary",
        )
        assert lab.peer(2, 1)["status"] == "Dead"

        res = gdoictl(lab.ks_sock(2), "crypto", "gdoi", "ks", "rekey")
        assert res.returncode == 0, res.stdout + res.stderr
        new = lab.ks_group(2)
        seq = new["seq"]
        assert (
            seq > groups[1]["seq"] and f"from address {ks_addr(2)} with seq # {seq}" in res.stdout
        )
        new_teks = keys_of(new)[1]
        assert new["kek_spi"] == kek  # the group's KEK carried over: GMs can open the rekey
        for i in GMS:  # GM1 and GM4 registered at the dead KS1 too
            lab.gms[i].wait_for(
                rf"GM_RECV_REKEY.*from {re.escape(ks_addr(2))} .*seq # {seq}\b", start=marks[i]
            )
            gm = lab.gm(i)
            assert gm["registrations"] == before[i]["registrations"], (i, gm)  # no re-registration
            assert gm["seq"] == seq > before[i]["seq"] and gm["kek_spi"] == kek, (i, gm)
            assert new_teks <= set(gm["tek_spis"]), (i, gm)
            assert gm["state"] == "REGISTERED"
            assert not any("GM_REKEY_REJECTED" in line for line in lab.gms[i].since(marks[i]))
        # A policy replace: every GM holds the new TEK for receiving, while the stream
        # keeps flowing on the transitional TEK (shortened to TEK_SLT) until that runs out.
        teks_pending(lab, new_teks)
        spi = int(next(iter(new_teks)), 16)
        totals = {i: lab.esp_totals(i) for i in (1, 2)}
        # Two replies more than counted: an echo in flight at the snapshot was
        # encapsulated before it and may be among the next replies.
        stream.wait_replies(stream.ok + 12)
        for i in (1, 2):
            encaps, decaps = lab.esp_totals(i)
            assert encaps - totals[i][0] >= 10 and decaps - totals[i][1] >= 10, (
                i,
                totals[i],
                lab.sas(i),
            )
            assert lab.sas(i)[spi]["pkts_encaps"] == lab.sas(i)[spi]["pkts_decaps"] == 0, (
                i,
                lab.sas(i),
            )
    finally:
        sent, lost = stream.stop()
    assert sent > 50 and lost == [], f"{len(lost)} of {sent} echoes lost: {lost}"
    kss_converged(lab, kss=(2, 3), primary=2)
