"""Rekeys, GM removal and policy replace as seen by the ESP data path (issue #4).

Real ``gdoid ks`` / ``gdoid gm`` processes in the namespace topology of
:mod:`gdoid.netlab` (hostA -- gm1 -- core(+ks) -- gm2 -- hostB), with the
GMs' userspace ESP data path on.  A continuous ICMP echo stream runs from
hostA to hostB while the KS rekeys, removes members or replaces policy; the
GMs' ``show crypto ipsec sa`` counters say which SA carried the traffic and
why packets were dropped.

Waits are event-driven: daemon log lines (:meth:`Daemon.wait_for`), echo
replies of the stream (:meth:`PingStream.wait_replies`) and, for an SA
becoming the one a GM sends on, polling ``show crypto ipsec sa`` with a
deadline (:func:`until`); counters are read when those events have happened.

Losses.  After a scheduled rekey a GM switches its outbound traffic to the
new TEK as soon as it installs it, and the KS pushes a rekey to the GMs one
after the other, so an echo sent by the GM that installed first can reach the
other GM a moment before that one installed the new TEK: it is dropped there
as ``no-sa``.  The tests therefore allow a lost echo only where the peer GM
counted exactly that many ``no-sa`` drops, at most a couple per rekey; every
other drop reason (``icv``, ``replay``, ``expired``, ...) must stay at zero.
After a transitional GM removal or a policy replace without ``replace-now``
(spec §2.2, §3.1) the GMs install the new TEKs for receiving at once but keep
sending on the old, shortened ones until TEK_SLT ends (less
:data:`~gdoid.groupmember.sadb.TRANSITION_SWITCH_LEAD`), so every GM switches
at the same moment and no valid GM loses an echo.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gdoid.configgen import gm_config, gm_group, psk_auth
from gdoid.dataplane.engine import Dataplane, DropReason
from gdoid.groupmember.sadb import TRANSITION_SWITCH_LEAD, shortened_lifetime
from gdoid.log import ios_line_time
from gdoid.netlab import GM1_WAN, GM2_WAN, HOST_B, KS, Topology
from tests.dpnet import NsDaemon
from tests.procs import (
    Daemon,
    auth_toml,
    gdoictl,
    gdoictl_json,
    ks_toml,
    write_private,
    write_signing_key,
)

GM_ADDRESS = {"gm1": GM1_WAN, "gm2": GM2_WAN}
KS_RE = re.escape(KS)
POLICY_CHANGE = (
    "%GDOI-5-POLICY_CHANGE: GDOI group GET policy has changed. Use 'crypto gdoi ks rekey' to send a rekey, "
    "or the changes will be send in the next scheduled rekey"
)
GM_RECV_DELETE = "%GDOI-4-GM_RECV_DELETE: GM received delete-msg from KS in group GET."
REMOVAL_NOW = (
    r"%GDOI-4-GM_RECV_DELETE_IMMEDIATE: GM receive REMOVAL-NOW in group GET to cleanup downloaded "
    r"policy now\. Re-registration will start in a randomly chosen period of (\d+) sec$"
)
# Drop reasons a rekey must never cause (no-sa is checked against the lost echoes instead).
BAD_DROPS = (
    "icv",
    "replay",
    "tbar",
    "malformed",
    "expired",
    "too-big",
    "counter-exhausted",
    "fail-close",
    "internal-error",
)


T = TypeVar("T")


def until(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Poll ``check`` (a daemon's state) until it returns something truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def registered(gm: str) -> str:
    return (
        rf"%GDOI-5-GM_REGS_COMPL: Registration to KS {KS_RE} complete for group GET "
        rf"using address {re.escape(GM_ADDRESS[gm])}$"
    )


def recv_rekey(gm: str, seq: int) -> str:
    return (
        rf"%GDOI-5-GM_RECV_REKEY: Received Rekey for group GET from {KS_RE} "
        rf"to {re.escape(GM_ADDRESS[gm])} with seq # {seq}$"
    )


def send_rekey(seq: int, replace: bool = False) -> str:
    extra = "with policy-replace " if replace else ""
    return f"%GDOI-5-KS_SEND_UNICAST_REKEY: Sending Unicast Rekey {extra}for group GET from address {KS} with seq # {seq}"


# --- processes in namespaces ------------------------------------------------------------


# ICMP echo every INTERVAL s until SIGTERM, then wait TIMEOUT s for the last replies.
# One line per event: "S seq" sent, "R seq" answered, "L seq" no answer within TIMEOUT.
STREAM_SCRIPT = r"""
import os, select, signal, socket, struct, sys, time
dst, interval, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def csum(b):
    s = sum(struct.unpack(f"!{len(b)//2}H", b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, seq, pending = os.getpid() & 0xFFFF, 0, {}
next_send = time.monotonic()
print("READY", flush=True)
while not stop or pending:
    now = time.monotonic()
    if not stop and now >= next_send:
        body = struct.pack("!Q", seq) + bytes(48)
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum(hdr + body), ident, seq & 0xFFFF) + body, (dst, 0))
        pending[seq & 0xFFFF] = (seq, now)
        print("S", seq, flush=True)
        seq += 1
        next_send += interval
    for k, (q, t) in list(pending.items()):
        if now - t > timeout:
            del pending[k]
            print("L", q, flush=True)
    wait = max(0.0, next_send - time.monotonic()) if not stop else 0.05
    try:
        ready = select.select([s], [], [], wait)[0]
    except InterruptedError:
        continue
    while ready:
        try:
            pkt = s.recv(65535, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        icmp = pkt[(pkt[0] & 15) * 4:]
        if icmp[0] == 0:
            rid, rseq = struct.unpack("!HH", icmp[4:8])
            if rid == ident and rseq in pending:
                print("R", pending.pop(rseq)[0], flush=True)
print("END", seq, flush=True)
"""


class PingStream:
    """A continuous ICMP echo stream from a namespace, its replies and losses as events."""

    def __init__(
        self, topo: Topology, ns: str, dst: str, interval: float = 0.05, timeout: float = 1.0
    ) -> None:
        self.sent: list[int] = []
        self.replies: list[int] = []
        self.lost: list[int] = []
        self.ended = False
        self._cond = threading.Condition()
        self.proc = topo.popen(
            ns, sys.executable, "-c", STREAM_SCRIPT, dst, str(interval), str(timeout),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, _, arg = line.strip().partition(" ")
            with self._cond:
                if kind == "S":
                    self.sent.append(int(arg))
                elif kind == "R":
                    self.replies.append(int(arg))
                elif kind == "L":
                    self.lost.append(int(arg))
                elif kind == "END":
                    self.ended = True
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait_replies(self, n: int, timeout: float = 15.0) -> int:
        """Wait for ``n`` more echo replies; returns the number of replies so far."""
        with self._cond:
            goal = len(self.replies) + n
            if (
                not self._cond.wait_for(lambda: len(self.replies) >= goal or self.ended, timeout)
                or self.ended
            ):
                raise AssertionError(
                    f"only {len(self.replies)} of {goal} echo replies (sent {len(self.sent)}, lost {self.lost[-10:]})"
                )
            return len(self.replies)

    def wait_sent(self, n: int, timeout: float = 15.0) -> None:
        with self._cond:
            goal = len(self.sent) + n
            assert (
                self._cond.wait_for(lambda: len(self.sent) >= goal or self.ended, timeout)
                and not self.ended
            )

    def stop(self) -> None:
        """Stop sending; returns once every echo is answered or counted lost."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        with self._cond:
            self._cond.wait_for(lambda: self.ended, 20)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        assert self.proc.returncode == 0, self.proc.stderr.read() if self.proc.stderr else ""
        assert len(self.replies) + len(self.lost) == len(self.sent)

    def __enter__(self) -> PingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- the group -----------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, topology: Topology) -> Iterator[tuple[Topology, Path]]:
    write_private(tmp_path / "psk.secret", "dataplane-lab-secret\n")
    write_signing_key(tmp_path / "rekey.key")
    yield topology, tmp_path


def ks_config(d: Path, auth: str | None = None, **kw: Any) -> Path:
    return ks_toml(d, address=KS, auth=auth or auth_toml("psk.secret", peer="192.0.2.0/24"), **kw)


@contextmanager
def running(
    topo: Topology,
    d: Path,
    ks_cfg: Path,
    *,
    psk: dict[str, str] | None = None,
    fail_close: dict[str, bool] | None = None,
) -> Iterator[tuple[Daemon, dict[str, Daemon]]]:
    """KS in ``ks``, gm1 and gm2 in their namespaces, both registered."""
    with ExitStack() as stack:
        ks = stack.enter_context(NsDaemon(topo, "ks", "ks", ks_cfg))
        ks.wait_for("ks_started")
        gms: dict[str, Daemon] = {}
        for name in ("gm1", "gm2"):
            cfg = d / f"{name}.toml"
            cfg.write_text(
                gm_config(
                    GM_ADDRESS[name],
                    control_socket=f"{d}/{name}.sock",
                    tun_name="gdoi0",
                    registration_timeout=3.0,
                    fail_close=(fail_close or {}).get(name, False),
                    dataplane={"enabled": True, "wan_interface": "wan"},
                    auth=psk_auth(f"{KS}/32", (psk or {}).get(name, "psk.secret")),
                    groups=[gm_group([KS])],
                )
            )
            gms[name] = stack.enter_context(NsDaemon(topo, name, "gm", cfg))
        for name, gm in gms.items():
            gm.wait_for(registered(name))
            gm.wait_for("dataplane_forwarder_started")
            ks.wait_for(rf"%GDOI-5-KS_REGS_COMPL: .* with GM {re.escape(GM_ADDRESS[name])}$")
        yield ks, gms


def show(d: Path, name: str) -> dict[str, Any]:
    data = gdoictl_json(d / f"{name}.sock", "show", "crypto", "gdoi")
    assert len(data["groups"]) == 1
    return data["groups"][0]


def ipsec(d: Path, name: str) -> dict[str, Any]:
    """``show crypto ipsec sa`` of a GM, with ``by_spi`` added (SPIs as 8 hex digits)."""
    data = gdoictl_json(d / f"{name}.sock", "show", "crypto", "ipsec", "sa")
    data["by_spi"] = {f"{sa['spi']:08x}": sa for sa in data["sas"]}
    return data


def delta(after: dict[str, Any], before: dict[str, Any], spi: str, field: str) -> int:
    old = before["by_spi"].get(spi)
    return after["by_spi"][spi][field] - (old[field] if old else 0)


def bad_drops(data: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in data["drops"].items() if k in BAD_DROPS and v}


def assert_outbound_on(
    d: Path, stream: PingStream, spi: str, others: list[str], n: int = 10
) -> None:
    """The next ``n`` echoes cross on ``spi`` (gm1 -> gm2, replies gm2 -> gm1), none on ``others``."""
    before = {gm: ipsec(d, gm) for gm in ("gm1", "gm2")}
    stream.wait_replies(n)
    after = {gm: ipsec(d, gm) for gm in ("gm1", "gm2")}
    for gm, field in (
        ("gm1", "pkts_encaps"),
        ("gm2", "pkts_decaps"),
        ("gm2", "pkts_encaps"),
        ("gm1", "pkts_decaps"),
    ):
        assert delta(after[gm], before[gm], spi, field) >= n, (gm, field, spi, after[gm]["by_spi"])
        for other in others:
            if other in after[gm]["by_spi"]:
                assert delta(after[gm], before[gm], other, field) == 0, (
                    gm,
                    field,
                    other,
                    after[gm]["by_spi"],
                )


def assert_losses_explained(stream: PingStream, d: Path, max_no_sa: int) -> int:
    """Every lost echo (request or reply) was one ``no-sa`` drop at a GM; nothing else dropped."""
    counters = {gm: ipsec(d, gm) for gm in ("gm1", "gm2")}
    for gm, data in counters.items():
        assert not bad_drops(data), (gm, data["drops"])
        assert data["clear_out"] == 0, (gm, data["clear_out"])
        assert data["forwarder"]["send_errors"] == 0 and data["forwarder"]["dataplane_errors"] == 0
    no_sa = sum(c["drops"].get("no-sa", 0) for c in counters.values())
    assert len(stream.lost) == no_sa <= max_no_sa, (
        stream.lost,
        {g: c["drops"] for g, c in counters.items()},
    )
    return no_sa


# --- 1. scheduled rekeys and KEK rollover under traffic ---------------------------------------


@pytest.mark.root
def test_scheduled_rekeys_and_kek_rollover_keep_traffic_flowing(lab: tuple[Topology, Path]) -> None:
    """TEK 30 s, KEK 35 s, lead 25 s: rekeys every 5 s, the second one rolls the KEK over."""
    topo, d = lab
    cfg = ks_config(d, lifetime=30, kek_lifetime=35, rekey={"lead_time": 25})
    with running(topo, d, cfg) as (ks, gms), PingStream(topo, "hostA", HOST_B) as stream:
        stream.wait_replies(5)
        first = show(d, "gm1")
        assert first["seq"] == 1 and show(d, "gm2")["tek_spis"] == first["tek_spis"]
        tek1, kek1 = first["tek_spis"][0], first["kek_spi"]
        assert_outbound_on(d, stream, tek1, [])

        # seq 2: a new TEK under the same KEK; outbound moves to it, the old one stays for inbound.
        for name, gm in gms.items():
            gm.wait_for(recv_rekey(name, 2), timeout=20)
        ks.wait_for(re.escape(send_rekey(2)) + "$")
        g1 = show(d, "gm1")
        assert g1["kek_spi"] == kek1 and g1["tek_spis"][0] == tek1 and len(g1["tek_spis"]) == 2
        tek2 = g1["tek_spis"][1]
        assert_outbound_on(d, stream, tek2, [tek1])

        # seq 3: the KEK is due (35 - 25): new KEK and TEK.
        for name, gm in gms.items():
            gm.wait_for(recv_rekey(name, 3), timeout=20)
        ks_now, g1, g2 = show(d, "ks"), show(d, "gm1"), show(d, "gm2")
        assert g1["kek_spi"] == g2["kek_spi"] == ks_now["kek_spi"] != kek1
        tek3 = g1["tek_spis"][-1]
        assert tek3 == ks_now["tek_spis"][-1] and g2["tek_spis"] == g1["tek_spis"] == [
            tek1,
            tek2,
            tek3,
        ]
        assert_outbound_on(d, stream, tek3, [tek1, tek2])

        # seq 4: the first rekey under the rolled-over KEK is accepted.
        for name, gm in gms.items():
            gm.wait_for(recv_rekey(name, 4), timeout=20)
        tek4 = show(d, "gm1")["tek_spis"][-1]
        assert_outbound_on(d, stream, tek4, [tek1, tek2, tek3])

        # The first TEK runs out (30 s after registration): gone from both data paths, no effect on traffic.
        for gm in gms.values():
            gm.wait_for(rf"tek_expired spi=0x{tek1}", timeout=25)
        for name in gms:
            assert tek1 not in ipsec(d, name)["by_spi"]
        replies = stream.wait_replies(10)
        stream.stop()

        for name, gm in gms.items():
            g = show(d, name)
            assert g["registrations"] == 1 and g["seq"] >= 4  # rekeyed only, never re-registered
            assert "GM_REKEY_REJECTED" not in gm.text() and "Traceback" not in gm.text()
        rekeys = show(d, "gm1")["seq"] - 1
        lost = assert_losses_explained(stream, d, max_no_sa=rekeys)
        assert replies >= len(stream.sent) - lost - 1
    print(f"scheduled rekeys: {len(stream.sent)} echoes, {lost} lost at a rekey (no-sa)")


# --- 2. transitional removal after revoking gm2's credential -----------------------------------


@pytest.mark.root
def test_revoked_gm_loses_the_group_while_valid_gm_keeps_forwarding(
    lab: tuple[Topology, Path],
) -> None:
    """Per-GM PSKs; gm2's is revoked on the KS, then ``clear crypto gdoi ks members``.

    TEK 40 s, so TEK_SLT is the remaining lifetime (under 90 s) and both GMs
    re-register at 80-90 % of it.  gm1 gets the new TEK and installs it for
    receiving at once, but both GMs keep sending on the old (transitional) TEK
    until it runs out: nothing is lost.  gm2 is refused (AUTHENTICATION_FAILED)
    and keeps only the old TEK.  When the transitional SA ends (its last
    TRANSITION_SWITCH_LEAD seconds only receive) gm1 moves its outbound traffic
    to the new TEK, and from then on gm2 cannot decrypt hostA's echoes: each one
    is a ``no-sa`` drop there.  The new TEKs get 60 s (a staged lifetime change
    the removal applies), so neither they expire nor the KS rekeys meanwhile.
    """
    topo, d = lab
    for name in ("gm1", "gm2"):
        write_private(d / f"ks-{name}.secret", f"secret-of-{name}\n")
        write_private(d / f"{name}.secret", f"secret-of-{name}\n")
    ks_auth = auth_toml("ks-gm1.secret", peer=f"{GM1_WAN}/32") + auth_toml(
        "ks-gm2.secret", peer=f"{GM2_WAN}/32"
    )
    cfg = ks_config(d, auth=ks_auth, lifetime=40, rekey={"lead_time": 1})
    psk = {"gm1": "gm1.secret", "gm2": "gm2.secret"}
    with running(topo, d, cfg, psk=psk) as (ks, gms), PingStream(topo, "hostA", HOST_B) as stream:
        stream.wait_replies(5)
        old = show(d, "gm1")
        old_tek = old["tek_spis"][0]

        write_private(d / "ks-gm2.secret", "revoked-now\n")
        res = gdoictl(d / "ks.sock", "reload")
        assert res.returncode == 0 and "POLICY_CHANGE" not in res.stdout, res.stdout + res.stderr
        ks_config(d, auth=ks_auth, lifetime=60, rekey={"lead_time": 1})
        assert gdoictl(d / "ks.sock", "reload").stdout == POLICY_CHANGE + "\n"
        marks = {name: len(gm.lines) for name, gm in gms.items()}
        res = gdoictl(d / "ks.sock", "clear", "crypto", "gdoi", "ks", "members", yes=True)
        assert res.returncode == 0, res.stdout + res.stderr
        ks_new = show(d, "ks")
        new_tek = ks_new["tek_spis"][0]
        assert ks_new["teks"][0]["remaining"] > 55
        for name, gm in gms.items():
            gm.wait_for(re.escape(GM_RECV_DELETE), start=marks[name])
            g = show(d, name)
            assert g["kek_spi"] is None and g["tek_spis"] == [old_tek]
            assert (
                abs(g["teks"][0]["remaining"] - shortened_lifetime(old["teks"][0]["remaining"], 40))
                <= 2
            )

        # The transitional SAs carry the traffic: nothing lost, gm2 decrypts everything.
        assert_outbound_on(d, stream, old_tek, [])
        assert stream.lost == [] and ipsec(d, "gm2")["drops"]["no-sa"] == 0

        # gm1 re-registers: the new TEK is installed at once, for receiving only ...
        gms["gm1"].wait_for(registered("gm1"), start=marks["gm1"], timeout=40)
        g1 = show(d, "gm1")
        assert (
            g1["registrations"] == 2
            and g1["tek_spis"] == [old_tek, new_tek]
            and g1["kek_spi"] is not None
        )
        sas = ipsec(d, "gm1")["by_spi"]
        assert not sas[new_tek]["active"] and sas[old_tek]["active"], sas
        assert sas[old_tek]["remaining"] > TRANSITION_SWITCH_LEAD, sas
        # ... both GMs keep sending on the transitional SA: still nothing lost.
        assert_outbound_on(d, stream, old_tek, [new_tek])
        assert stream.lost == []

        # gm2, refused, gets no new TEK and no KEK.
        line = gms["gm2"].wait_for("AUTHENTICATION_FAILED", start=marks["gm2"], timeout=40)
        assert "%GDOI-4-GM_REG_FAILURE" in line or "%IKE-4-PHASE1_FAILED" in line
        g2 = show(d, "gm2")
        assert g2["registrations"] == 1 and g2["kek_spi"] is None and new_tek not in g2["tek_spis"]
        assert new_tek not in ipsec(d, "gm2")["by_spi"]

        # The transitional SA ends: gm1 switches to the new TEK (the old one, about to
        # expire, only receives), and gm2 drops every echo as no-sa from then on.
        switch = until(
            "gm1 sends on the new TEK",
            lambda: (lambda s: s if s[new_tek]["active"] else None)(ipsec(d, "gm1")["by_spi"]),
            timeout=sas[old_tek]["remaining"] + 5,
        )
        assert old_tek in switch and switch[old_tek]["remaining"] <= TRANSITION_SWITCH_LEAD, switch
        before = ipsec(d, "gm1")
        stream.wait_sent(20)
        after = ipsec(d, "gm1")
        assert delta(after, before, new_tek, "pkts_encaps") >= 19
        assert delta(after, before, old_tek, "pkts_encaps") == 0
        for name, gm in gms.items():
            gm.wait_for(rf"tek_expired spi=0x{old_tek}", start=marks[name], timeout=10)
        assert list(ipsec(d, "gm1")["by_spi"]) == [new_tek] and ipsec(d, "gm2")["sas"] == []
        stream.stop()

        members = gdoictl_json(d / "ks.sock", "show", "crypto", "gdoi", "ks", "members")["groups"][
            0
        ]["members"]
        assert [m["address"] for m in members] == [GM1_WAN]
        c1, c2 = ipsec(d, "gm1"), ipsec(d, "gm2")
        # Every echo before the switch was answered, every one after it lost: each one
        # gm1 sent on the new SA and gm2 dropped as no-sa; nothing else was lost.
        on_new = c1["by_spi"][new_tek]["pkts_encaps"]
        assert on_new >= 19 and len(stream.lost) == c2["drops"]["no-sa"] == on_new, (
            stream.lost,
            c2["drops"],
        )
        first_lost = min(stream.lost)
        assert set(stream.replies) == set(range(first_lost)), (
            first_lost,
            sorted(stream.replies)[-5:],
        )
        assert stream.lost == list(range(first_lost, len(stream.sent)))
        assert c1["drops"]["no-sa"] == 0 and not bad_drops(c1) and not bad_drops(c2)
        assert not re.search(registered("gm2"), "\n".join(gms["gm2"].lines[marks["gm2"] :]))
    print(
        f"revocation: {len(stream.replies)} echoes answered, then {len(stream.lost)} lost at gm2 (no-sa)"
    )


# --- 3. immediate removal: fail-open / fail-close, then re-registration ----------------------------


def stamp(line: str) -> float:
    """The time of an ``ios`` format log line (``*May  1 12:00:00.123: ...``), in seconds."""
    return ios_line_time(line)


def in_echos(topo: Topology, ns: str) -> int:
    """ICMP echo requests the namespace's kernel received (``Icmp: InEchos``)."""
    head, values = [line.split() for line in topo.run(ns, "cat", "/proc/net/snmp").stdout.splitlines()
                    if line.startswith("Icmp:")][:2]  # fmt: skip
    return int(values[head.index("InEchos")])


@pytest.mark.root
def test_immediate_removal_fail_open_and_fail_close(lab: tuple[Topology, Path]) -> None:
    """gm1 fail-open, gm2 fail-close; TEK 600 s, so both re-register within 12 s.

    The KS is stopped (SIGSTOP) from just after it sent REMOVAL-NOW until the
    window without SAs has been watched, so that window exists even when a
    GM's random period is 0 s: gm1 sends hostA's echoes in the clear (hostB
    gets them), gm2 drops hostB's answers (fail-close).  Resumed, the KS
    registers both again and ESP resumes on the new TEK.
    """
    topo, d = lab
    cfg = ks_config(d, lifetime=600)
    with (
        running(topo, d, cfg, fail_close={"gm1": False, "gm2": True}) as (ks, gms),
        PingStream(topo, "hostA", HOST_B) as stream,
    ):
        stream.wait_replies(5)
        old_tek = show(d, "gm1")["tek_spis"][0]
        assert_outbound_on(d, stream, old_tek, [])
        before = {name: ipsec(d, name) for name in gms}
        marks = {name: len(gm.lines) for name, gm in gms.items()}

        res = gdoictl(d / "ks.sock", "clear", "crypto", "gdoi", "ks", "members", "now", yes=True)
        assert res.returncode == 0, res.stdout + res.stderr
        ks.proc.send_signal(signal.SIGSTOP)
        try:
            periods, seen_at = {}, {}
            for name, gm in gms.items():
                line = gm.wait_for(REMOVAL_NOW, start=marks[name])
                seen_at[name] = stamp(line)
                periods[name] = int(re.search(REMOVAL_NOW, line).group(1))  # type: ignore[union-attr]  # wait_for returned a line matching REMOVAL_NOW
                assert 0 <= periods[name] <= 12  # 2 % of 600 s
            for name in gms:
                assert ipsec(d, name)["sas"] == []  # gone at once
            sent = len(stream.sent)
            echos = in_echos(topo, "hostB")
            stream.wait_sent(10)
            c1, c2 = ipsec(d, "gm1"), ipsec(d, "gm2")
            # gm1 (fail-open) sends hostA's echoes in the clear, and hostB gets them ...
            assert c1["clear_out"] - before["gm1"]["clear_out"] >= 9
            assert in_echos(topo, "hostB") - echos >= 9
            assert c1["drops"]["fail-close"] == 0
            # ... gm2 (fail-close) drops hostB's answers.
            assert c2["drops"]["fail-close"] >= 9 and c2["clear_out"] == 0
        finally:
            ks.proc.send_signal(signal.SIGCONT)
        # Each GM re-registers once its period is over (+ the KS stop, + registration time).
        for name, gm in gms.items():
            line = gm.wait_for(registered(name), start=marks[name], timeout=periods[name] + 10)
            assert stamp(line) - seen_at[name] <= periods[name] + 3, (name, periods, line)
        new_tek = show(d, "ks")["tek_spis"][0]
        assert new_tek != old_tek
        assert show(d, "gm1")["tek_spis"] == show(d, "gm2")["tek_spis"] == [new_tek]
        stream.wait_replies(1, timeout=10)
        assert_outbound_on(d, stream, new_tek, [])
        stream.stop()

        # Lost: only echoes sent after the removal, each one accounted for by a drop: gm2's
        # fail-close, or no-sa at the GM that re-registered second (the other used the new SA).
        c1, c2 = ipsec(d, "gm1"), ipsec(d, "gm2")
        assert stream.lost and min(stream.lost) >= sent - 25
        accounted = c2["drops"]["fail-close"] + c1["drops"]["no-sa"] + c2["drops"]["no-sa"]
        assert len(stream.lost) == accounted, (stream.lost, c1["drops"], c2["drops"])
        for name, c in (("gm1", c1), ("gm2", c2)):
            assert not {k: v for k, v in bad_drops(c).items() if k != "fail-close"}, (
                name,
                c["drops"],
            )
            assert show(d, name)["registrations"] == 2
    print(
        f"removal now: {len(stream.lost)} echoes lost while the SAs were gone (periods {periods})"
    )


# --- 4. policy change CBC -> GCM, triggered rekey, replace-now ------------------------------------


@pytest.mark.root
def test_policy_replace_cbc_to_gcm_under_traffic(lab: tuple[Topology, Path]) -> None:
    """CBC TEK of 30 s (so TEK_SLT is its remaining lifetime), then a GCM policy of 120 s.

    The triggered rekey installs the GCM SA on both GMs at once (receiving), but
    the traffic stays on the CBC SA until TEK_SLT ends; then both GMs switch to
    GCM together and not one echo is lost.  ``replace-now`` switches at once.
    """
    topo, d = lab
    cfg = ks_config(d, transform="esp-cbc-256-sha256", lifetime=30, rekey={"lead_time": 1})
    with running(topo, d, cfg) as (ks, gms), PingStream(topo, "hostA", HOST_B) as stream:
        stream.wait_replies(5)
        g0 = show(d, "gm1")
        cbc = g0["tek_spis"][0]
        cbc_name = g0["teks"][0]["transform"]
        assert "cbc" in cbc_name.lower()
        assert_outbound_on(d, stream, cbc, [])

        # The policy changes: announced, nothing sent, traffic stays on the CBC SA.
        ks_config(d, transform="esp-gcm-256", lifetime=120, rekey={"lead_time": 1})
        res = gdoictl(d / "ks.sock", "reload")
        assert res.returncode == 0 and res.stdout == POLICY_CHANGE + "\n", res.stdout + res.stderr
        assert_outbound_on(d, stream, cbc, [])
        before = {}
        taken = {}  # when each snapshot was taken: remaining lifetimes shrink meanwhile
        for name in gms:
            taken[name] = time.monotonic()
            before[name] = g = show(d, name)
            assert g["seq"] == 1 and g["tek_spis"] == [cbc]
            assert list(ipsec(d, name)["by_spi"]) == [cbc]

        # The triggered rekey: a GCM SA on both GMs at once, for receiving; the CBC SA is
        # cut to TEK_SLT (here its remaining lifetime) and keeps carrying the traffic.
        marks = {name: len(gm.lines) for name, gm in gms.items()}
        res = gdoictl(d / "ks.sock", "crypto", "gdoi", "ks", "rekey")
        assert res.returncode == 0 and res.stdout == send_rekey(2, replace=True) + "\n", res.stdout
        for name, gm in gms.items():
            gm.wait_for(recv_rekey(name, 2), start=marks[name])
        gcm = show(d, "ks")["tek_spis"][0]
        for name in gms:
            teks = {t["spi"]: t for t in show(d, name)["teks"]}
            assert set(teks) == {cbc, gcm}
            assert "gcm" in teks[gcm]["transform"].lower() and teks[gcm]["remaining"] > 115
            slt = shortened_lifetime(before[name]["teks"][0]["remaining"], 30)
            elapsed = time.monotonic() - taken[name]
            assert -2 <= slt - teks[cbc]["remaining"] <= 2 + elapsed, (teks, slt, elapsed)
            sas = ipsec(d, name)["by_spi"]
            assert set(sas) == {cbc, gcm} and "gcm" in sas[gcm]["transform"].lower()
            assert sas[cbc]["active"] and not sas[gcm]["active"], sas
        assert_outbound_on(d, stream, cbc, [gcm])
        # Registered under CBC, the GMs hold no GCM sender IDs (RFC 6054): each re-registers
        # for them before the GCM SA is due, the CBC SA carrying the traffic meanwhile.
        for name, gm in gms.items():
            gm.wait_for("sender_id_counter_low", start=marks[name], timeout=5)
            gm.wait_for(registered(name), start=marks[name])
            g = show(d, name)
            assert g["registrations"] == 2 and g["sender_ids"] and set(g["tek_spis"]) == {cbc, gcm}
            assert not ipsec(d, name)["by_spi"][gcm]["active"]
        assert_outbound_on(d, stream, cbc, [gcm])

        # TEK_SLT ends: both GMs switch to GCM together (the CBC SA, about to expire,
        # only receives), and then the CBC SA goes.
        def switched() -> dict[str, dict[str, Any]] | None:
            sas = {name: ipsec(d, name)["by_spi"] for name in gms}
            for name, s in sas.items():
                if s[gcm]["active"] and name not in at_switch:
                    at_switch[name] = s
            return at_switch if len(at_switch) == len(gms) else None

        at_switch: dict[str, dict[str, Any]] = {}
        until("both GMs send on the GCM SA", switched, timeout=35)
        for name, s in at_switch.items():
            assert cbc in s and s[cbc]["remaining"] <= TRANSITION_SWITCH_LEAD, (name, s)
        assert_outbound_on(d, stream, gcm, [cbc])
        for name, gm in gms.items():
            gm.wait_for(rf"tek_expired spi=0x{cbc}", start=marks[name], timeout=10)
            assert list(ipsec(d, name)["by_spi"]) == [gcm]
        assert_outbound_on(d, stream, gcm, [])
        # Not one echo lost, nothing dropped, at either switch.
        assert stream.lost == []
        for name in gms:
            c = ipsec(d, name)
            assert c["drops"]["no-sa"] == 0 and not bad_drops(c), (name, c["drops"])

        # Another change, then replace-now: the old SAs leave both data paths at once.
        ks_config(d, transform="esp-gcm-128", lifetime=120, rekey={"lead_time": 1})
        assert gdoictl(d / "ks.sock", "reload").stdout == POLICY_CHANGE + "\n"
        res = gdoictl(d / "ks.sock", "crypto", "gdoi", "ks", "rekey", "replace-now")
        assert res.returncode == 0 and res.stdout == send_rekey(3, replace=True) + "\n", res.stdout
        for name, gm in gms.items():
            gm.wait_for(recv_rekey(name, 3), start=marks[name])
        newest = show(d, "ks")["tek_spis"][0]
        for name in gms:
            assert show(d, name)["tek_spis"] == [newest]
            sas = ipsec(d, name)["by_spi"]
            assert list(sas) == [newest] and sas[newest]["active"]
        assert_outbound_on(d, stream, newest, [])
        stream.stop()

        for name, gm in gms.items():
            assert show(d, name)["registrations"] == 2  # only the one for sender IDs
            assert "GM_REKEY_REJECTED" not in gm.text() and "Traceback" not in gm.text()
        # replace-now: the GM that installs first may send on the new SA a moment before
        # the other one holds it (spec §3.2: a brief disruption can happen).
        lost = assert_losses_explained(stream, d, max_no_sa=2)
    print(f"policy replace: {len(stream.sent)} echoes, {lost} lost (no-sa at replace-now)")


def test_gcm_tek_without_sender_ids_leaves_outbound_on_the_older_tek() -> None:
    """Sans-I/O: the fix test 4 needs.  A rekey brings a GCM TEK to a GM registered under
    CBC, so it holds no sender IDs yet: outbound stays on the CBC TEK (instead of dropping
    as counter-exhausted) until a re-registration brings them, then moves to GCM."""
    from tests.espdata import T0, make_tek, sids, udp

    cbc = make_tek("esp-cbc-256-sha256", spi=0x1000, created=T0)
    gcm = make_tek("esp-gcm-256", spi=0x2000, created=T0 + 10)
    dp = Dataplane()
    dp.install(1, [cbc, gcm], None, None, T0 + 10)
    out = dp.outbound(udp(), T0 + 11)
    assert out.drop is None and int.from_bytes(out.to_network[0][20:24], "big") == cbc.spi
    dp.install(1, [cbc, gcm], sids(7), None, T0 + 12)  # the re-registration
    out = dp.outbound(udp(), T0 + 13)
    assert out.drop is None and int.from_bytes(out.to_network[0][20:24], "big") == gcm.spi
    # Only the GCM TEK and no sender IDs: nothing else to use, dropped as before.
    dp = Dataplane()
    dp.install(1, [gcm], None, None, T0 + 10)
    assert dp.outbound(udp(), T0 + 11).drop is DropReason.COUNTER_EXHAUSTED


def test_transition_switches_outbound_just_before_the_shortened_teks_expire() -> None:
    """Sans-I/O: the moment tests 2 and 4 wait for.  After ``shorten_teks`` a new TEK is
    sent on TRANSITION_SWITCH_LEAD (at most 5 % of the transition) before the old TEKs
    expire, and the old TEK still receives until then, from a peer whose copy expires
    a little later (lifetimes travel in whole seconds)."""
    from gdoid.groupmember.sadb import Sadb
    from gdoid.protocol.policy import GroupKeys
    from tests.espdata import T0, make_tek, udp

    old = make_tek("esp-cbc-256-sha256", spi=0x1000, created=T0, lifetime=60)
    sadb = Sadb()
    sadb.install(GroupKeys(1, None, (old,), 1), None, T0)
    sadb.shorten_teks(1, T0 + 2)  # 58 s left, under 90 s: TEK_SLT is what is left
    end = T0 + 60
    assert sadb.group(1).teks[old.spi].expires_at == end
    assert sadb.send_delay(1, T0 + 2) == pytest.approx(58 - TRANSITION_SWITCH_LEAD)
    new = make_tek("esp-cbc-256-sha256", spi=0x2000, created=T0 + 50, lifetime=60)
    sadb.install(GroupKeys(1, None, (new,), 2), None, T0 + 50)  # the re-registration
    dp = Dataplane()
    dp.install(
        1, list(sadb.group(1).teks.values()), None, None, T0 + 50, sadb.send_delay(1, T0 + 50)
    )

    def spi_out(now: float) -> int:
        out = dp.outbound(udp(), now)
        assert out.drop is None
        return int.from_bytes(out.to_network[0][20:24], "big")

    switch = end - TRANSITION_SWITCH_LEAD
    assert spi_out(switch - 0.01) == old.spi and spi_out(switch + 0.01) == new.spi
    # A peer whose copy of the old TEK expires 0.8 s later still sends on it after our
    # switch: we receive it until our copy expires.
    peer = Dataplane()
    peer.install(
        1, [replace(sadb.group(1).teks[old.spi], expires_at=end + 0.8)], None, None, T0 + 2
    )
    packet = peer.outbound(udp(), end - 0.5).to_network[0]
    assert int.from_bytes(packet[20:24], "big") == old.spi
    got = dp.inbound(packet, end - 0.5)
    assert got.drop is None and got.to_tun
    assert dp.inbound(packet, end + 0.1).drop is DropReason.EXPIRED
    # A short transition: the lead is 5 % of it.
    sadb = Sadb()
    sadb.install(GroupKeys(1, None, (old,), 1), None, T0)
    sadb.shorten_teks(1, end - 10)
    assert sadb.send_delay(1, end - 10) == pytest.approx(10 - 0.5)
