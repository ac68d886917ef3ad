"""Rekeys end to end: the real ``gdoid ks`` and ``gdoid gm`` processes on UDP 848.

Scheduled rekeys with KEK rollover, forged/replayed pushes, GM removal
(transitional and immediate), credential revocation, policy replace and
members dropped after missed rekeys (getvpn-features.md §2-§3, wire.md §5-§6).
Everything waits on log lines, or polls gdoictl against a deadline where no
log line exists; lifetimes are short so the file runs in about a minute.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from gdoid.groupmember.sadb import shortened_lifetime
from tests.procs import (
    Capture,
    Daemon,
    auth_toml,
    gdoictl,
    gdoictl_json,
    gm_toml,
    ks_toml,
    write_private,
)

pytestmark = pytest.mark.root

REGISTERED = r"%GDOI-5-GM_REGS_COMPL: Registration to KS 127\.0\.0\.1 complete for group GET"
KS_STARTED = "ks_started"
REJECTED = r"%GDOI-4-GM_REKEY_REJECTED: Rekey for group GET from 127\.0\.0\.1 rejected: "

REMOVAL_PROMPT = (
    "\n% This GM-Removal message will shorten all GMs' key lifetimes and cause them to\n"
    "re-register before keys expiry.\n"
    "Are you sure you want to proceed? ? [yes/no]: "
)
REMOVAL_NOW_PROMPT = (
    "\n% This GM-Removal immediate message will cleanup all GMs downloaded policies\n"
    "% This will cause all GMs to re-register.\n"
    "Are you sure you want to proceed? ? [yes/no]: "
)
WARNING_PROMPT = (
    "WARNING for group GET: some devices cannot support GM-REMOVAL and can cause network\n"
    "disruption. Please check 'show crypto gdoi feature'.\n"
    "Are you sure you want to proceed ? [yes/no]: "
)
SENDING_REMOVAL = "Sending GM-Removal message to group GET...\n"
GM_RECV_DELETE = (
    "%GDOI-4-GM_RECV_DELETE: GM received delete-msg from KS in group GET. "
    "TEKs lifetime are reduced and re-registration will start before SA expiry"
)
POLICY_CHANGE = (
    "%GDOI-5-POLICY_CHANGE: GDOI group GET policy has changed. Use 'crypto gdoi ks rekey' to send a rekey, "
    "or the changes will be send in the next scheduled rekey"
)


def _recv_rekey(gm: str, seq: int) -> str:
    return rf"%GDOI-5-GM_RECV_REKEY: Received Rekey for group GET from 127\.0\.0\.1 to {re.escape(gm)} with seq # {seq}$"


def _send_rekey(seq: int, replace: bool = False) -> str:
    extra = "with policy-replace " if replace else ""
    return f"%GDOI-5-KS_SEND_UNICAST_REKEY: Sending Unicast Rekey {extra}for group GET from address 127.0.0.1 with seq # {seq}"


def _group(data: dict[str, Any]) -> dict[str, Any]:
    assert len(data["groups"]) == 1
    return data["groups"][0]


def show(sock: Path) -> dict[str, Any]:
    return _group(gdoictl_json(sock, "show", "crypto", "gdoi"))


def members(lab: Path) -> dict[str, dict[str, Any]]:
    data = _group(gdoictl_json(lab / "ks.sock", "show", "crypto", "gdoi", "ks", "members"))
    return {m["address"]: m for m in data["members"]}


def keys_of(group: dict[str, Any]) -> tuple[Any, ...]:
    return (group["kek_spi"], tuple(group["tek_spis"]), group["seq"])


def poll(what: str, fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Call ``fn`` (a gdoictl query: each call takes a while) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value {value!r}")


@contextmanager
def running(
    lab: Path, ks_cfg: Path, gms: list[tuple[str, str, str]], gm_auth: dict[str, str] | None = None
) -> Iterator[tuple[Daemon, dict[str, Daemon]]]:
    """A KS and GMs ``(name, address, version)``, all registered (``gm_auth``: per-name auth TOML)."""
    with ExitStack() as stack:
        ks = stack.enter_context(Daemon("ks", ks_cfg))
        ks.wait_for(KS_STARTED)
        daemons: dict[str, Daemon] = {}
        for name, address, version in gms:
            auth = (gm_auth or {}).get(name, auth_toml("psk.secret"))
            cfg = gm_toml(lab, address=address, name=name, auth=auth, version=version)
            daemons[name] = stack.enter_context(Daemon("gm", cfg))
        for name, address, _ in gms:
            daemons[name].wait_for(REGISTERED + rf" using address {re.escape(address)}")
            ks.wait_for(rf"%GDOI-5-KS_REGS_COMPL: .* with GM {re.escape(address)}$")
        yield ks, daemons


# --- 1. scheduled rekeys ------------------------------------------------------------


def test_scheduled_rekey_with_kek_rollover(lab: Path) -> None:
    """TEK 30 s, KEK 35 s, lead 25 s: rekeys at +5 s (new TEK) and +10 s (new TEK and KEK)."""
    cfg = ks_toml(
        lab, auth=auth_toml("psk.secret"), lifetime=30, kek_lifetime=35, rekey={"lead_time": 25}
    )
    with running(lab, cfg, [("gm1", "127.0.0.2", "1.0.2")]) as (ks, gms):
        gm = gms["gm1"]
        first = show(lab / "gm1.sock")
        assert first["seq"] == 1 and first["registrations"] == 1
        original_kek = first["kek_spi"]
        assert original_kek == show(lab / "ks.sock")["kek_spi"]

        gm.wait_for(_recv_rekey("127.0.0.2", 2))
        assert ks.wait_for(re.escape(_send_rekey(2)) + "$")
        after_2 = show(lab / "gm1.sock")
        assert after_2["kek_spi"] == original_kek  # the KEK is not due yet
        assert after_2["seq"] == 2

        gm.wait_for(_recv_rekey("127.0.0.2", 3))
        ks.wait_for(re.escape(_send_rekey(3)) + "$")
        ks_now = show(lab / "ks.sock")
        gm_now = show(lab / "gm1.sock")
        assert ks_now["seq"] == 3 and gm_now["seq"] == 3
        assert gm_now["kek_spi"] == ks_now["kek_spi"] != original_kek  # KEK rolled over by the push
        assert ks_now["tek_spis"][-1] in gm_now["tek_spis"]  # the newest TEK
        assert set(after_2["tek_spis"]) < set(gm_now["tek_spis"])  # old TEKs run out naturally
        assert gm_now["registrations"] == 1  # rekeyed, never re-registered

        # Both pushes were acknowledged (RFC 8263-style acks).
        member = poll(
            "two acks on the KS",
            lambda: (m := members(lab)["127.0.0.2"])["acks_received"] >= 2 and m,
        )
        assert member["missed_rekeys"] == 0 and member["rekeys_sent"] >= 2
    assert "policy-replace" not in ks.text()


# --- 2. forged, replayed and stale pushes ---------------------------------------------


def _pushes_to(pcap: Path, gm: str) -> list[bytes]:
    from scapy.all import IP, UDP, rdpcap  # scapy is slow to import: only here

    found: list[bytes] = []
    for pkt in rdpcap(str(pcap)):
        if IP in pkt and UDP in pkt and pkt[IP].dst == gm and pkt[UDP].dport == 848:
            data = bytes(pkt[UDP].payload)
            if (
                len(data) > 28 and data[18] == 33 and data not in found
            ):  # exchange type 33: GROUPKEY-PUSH
                found.append(data)
    return found


def test_replayed_stale_and_forged_pushes_are_rejected(lab: Path) -> None:
    pcap = lab / "push.pcap"
    cfg = ks_toml(lab, auth=auth_toml("psk.secret"))
    with running(lab, cfg, [("gm1", "127.0.0.2", "1.0.2")]) as (ks, gms):
        gm = gms["gm1"]
        with Capture(pcap):
            for seq in (2, 3):
                assert gdoictl(lab / "ks.sock", "crypto", "gdoi", "ks", "rekey").returncode == 0
                gm.wait_for(_recv_rekey("127.0.0.2", seq))
        older, newer = _pushes_to(pcap, "127.0.0.2")  # seq 2, seq 3 (the KEK did not change)
        assert older[:16] == newer[:16] == bytes.fromhex(show(lab / "gm1.sock")["kek_spi"])
        before = keys_of(show(lab / "gm1.sock"))
        assert before[2] == 3

        flipped = []
        for at in (
            28 + 1,
            len(newer) // 2,
            len(newer) - 1,
        ):  # first, middle and last ciphertext block
            bad = bytearray(newer)
            bad[at] ^= 0x01
            flipped.append(bytes(bad))
        # An exact copy of the last push is what a KS retransmits when our ack was lost:
        # acknowledged again, applied no second time.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            mark = len(gm.lines)
            s.sendto(newer, ("127.0.0.2", 848))
            gm.wait_for(
                r"push_retransmission group=GET seq=3 action=\"?acknowledged again", start=mark
            )
            ack, _ = s.recvfrom(2048)
            assert ack[18] == 35 and ack[:16] == newer[:16]  # GROUPKEY-PUSH ack under the same KEK
            assert keys_of(show(lab / "gm1.sock")) == before
        cases = [
            (older, r"SEQ 2 is not above 3: replayed or stale"),
            *[
                (bad, r"push (does not decrypt under the KEK|signature does not verify)")
                for bad in flipped
            ],
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            for data, reason in cases:
                mark = len(gm.lines)
                s.sendto(data, ("127.0.0.2", 848))
                line = gm.wait_for(REJECTED, start=mark)
                assert re.search(reason, line), line
                assert keys_of(show(lab / "gm1.sock")) == before
        # A flip in the signature itself is caught by the signature check.
        rejected = [line for line in gm.lines if re.search(REJECTED, line)]
        assert len(rejected) == 4
        assert rejected[-1].endswith("push signature does not verify"), rejected[-1]
        assert gm.proc.poll() is None and "Traceback" not in gm.text()
        assert show(lab / "gm1.sock")["registrations"] == 1


# --- 3. GM removal with transitional SAs ------------------------------------------------


def test_transitional_removal_with_old_and_new_gms(lab: Path) -> None:
    cfg = ks_toml(lab, auth=auth_toml("psk.secret"), lifetime=3600)
    gms = [("gm1", "127.0.0.2", "1.0.2"), ("gm2", "127.0.0.3", "1.0.1")]
    with running(lab, cfg, gms) as (ks, daemons):
        ks_before = show(lab / "ks.sock")
        old1 = show(lab / "gm1.sock")
        old2 = show(lab / "gm2.sock")
        command = ("clear", "crypto", "gdoi", "ks", "members")

        # Answering "no" at either prompt sends nothing.
        res = gdoictl(lab / "ks.sock", *command, answers="no\n")
        assert res.returncode == 1 and res.stdout == REMOVAL_PROMPT + "no\n"
        res = gdoictl(lab / "ks.sock", *command, answers="yes\nno\n")
        assert (
            res.returncode == 1 and res.stdout == REMOVAL_PROMPT + "yes\n" + WARNING_PROMPT + "no\n"
        )
        assert show(lab / "ks.sock")["seq"] == 1 and set(members(lab)) == {"127.0.0.2", "127.0.0.3"}
        assert "GM-Removal" not in ks.text()

        res = gdoictl(lab / "ks.sock", *command, yes=True)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout == REMOVAL_PROMPT + "yes\n" + WARNING_PROMPT + "yes\n" + SENDING_REMOVAL
        ks.wait_for(r"%GDOI-5-KS_SEND_GM_REMOVAL: Sending GM-Removal message to group GET\.\.\.")

        # The 1.0.2 GM: KEK deleted, TEKs cut to TEK_SLT = 180 s (5% of 3600).
        daemons["gm1"].wait_for(re.escape(GM_RECV_DELETE) + "$")
        gm1 = show(lab / "gm1.sock")
        assert gm1["kek_spi"] is None and gm1["seq"] == 2
        assert gm1["tek_spis"] == old1["tek_spis"]
        expected = shortened_lifetime(old1["teks"][0]["remaining"], 3600)
        assert expected == 180
        assert abs(gm1["teks"][0]["remaining"] - expected) <= 2
        assert gm1["registrations"] == 1

        # The 1.0.1 GM ignores the instruction: an empty rekey to it; keys and lifetimes kept.
        daemons["gm2"].wait_for(_recv_rekey("127.0.0.3", 2))
        gm2 = show(lab / "gm2.sock")
        assert gm2["kek_spi"] == old2["kek_spi"] == ks_before["kek_spi"]
        assert gm2["tek_spis"] == old2["tek_spis"]
        assert gm2["teks"][0]["remaining"] >= old2["teks"][0]["remaining"] - 2 > 3500
        assert "GM_RECV_DELETE" not in daemons["gm2"].text()

        # Both GMs acknowledge the removal push; the KS (its table already clear) just counts them.
        poll(
            "the removal acks",
            lambda: (
                gdoictl_json(lab / "ks.sock", "show", "gdoid", "counters").get("acks_unmatched")
                == 2
            ),
        )
        assert "MALFORMED_DROP" not in ks.text()

        # The KS switched to keys nobody holds yet and cleared its member table.
        ks_after = show(lab / "ks.sock")
        assert ks_after["kek_spi"] != ks_before["kek_spi"]
        assert not set(ks_after["tek_spis"]) & set(ks_before["tek_spis"])
        assert ks_after["members"] == []


def test_transitional_removal_short_lifetime_reregisters_before_expiry(lab: Path) -> None:
    """TEK 20 s: TEK_SLT is the remaining lifetime; the GM re-registers on its own before it ends."""
    cfg = ks_toml(lab, auth=auth_toml("psk.secret"), lifetime=20, rekey={"lead_time": 1})
    with running(lab, cfg, [("gm1", "127.0.0.2", "1.0.2")]) as (ks, daemons):
        gm = daemons["gm1"]
        old = show(lab / "gm1.sock")
        mark = len(gm.lines)
        res = gdoictl(lab / "ks.sock", "clear", "crypto", "gdoi", "ks", "members", yes=True)
        assert res.returncode == 0
        assert (
            res.stdout == REMOVAL_PROMPT + "yes\n" + SENDING_REMOVAL
        )  # only 1.0.2 devices: one prompt
        ks_new = show(lab / "ks.sock")
        gm.wait_for(re.escape(GM_RECV_DELETE) + "$", start=mark)
        cut = show(lab / "gm1.sock")
        assert cut["kek_spi"] is None
        assert (
            abs(cut["teks"][0]["remaining"] - shortened_lifetime(old["teks"][0]["remaining"], 20))
            <= 2
        )

        gm.wait_for(REGISTERED, timeout=25, start=mark)
        again = show(lab / "gm1.sock")
        assert again["registrations"] == 2
        assert again["kek_spi"] == ks_new["kek_spi"] != old["kek_spi"]
        assert ks_new["tek_spis"][0] in again["tek_spis"]
        assert old["tek_spis"][0] not in ks_new["tek_spis"]
        # Re-registered before the shortened TEK expired.
        assert not any("tek_expired" in line for line in gm.lines[mark:])
        assert set(members(lab)) == {"127.0.0.2"}


# --- 4. credential revoked, then removal ---------------------------------------------------


def test_revoked_psk_fails_reregistration_after_removal(lab: Path) -> None:
    write_private(lab / "ks-gm1.secret", "secret-of-gm1\n")
    write_private(lab / "ks-gm2.secret", "secret-of-gm2\n")
    write_private(lab / "gm1.secret", "secret-of-gm1\n")
    write_private(lab / "gm2.secret", "secret-of-gm2\n")
    ks_auth = auth_toml("ks-gm1.secret", peer="127.0.0.2/32") + auth_toml(
        "ks-gm2.secret", peer="127.0.0.3/32"
    )
    # TEK lifetime 100 s: after REMOVAL-NOW the GMs come back within 2 s.
    cfg = ks_toml(lab, auth=ks_auth, lifetime=100, rekey={"lead_time": 10})
    gm_auth = {
        "gm1": auth_toml("gm1.secret", peer="127.0.0.1/32"),
        "gm2": auth_toml("gm2.secret", peer="127.0.0.1/32"),
    }
    gms = [("gm1", "127.0.0.2", "1.0.2"), ("gm2", "127.0.0.3", "1.0.2")]
    with running(lab, cfg, gms, gm_auth) as (ks, daemons):
        # Revoke 127.0.0.3: its key on the KS changes, then reload.
        write_private(lab / "ks-gm2.secret", "revoked-now\n")
        res = gdoictl(lab / "ks.sock", "reload")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "POLICY_CHANGE" not in res.stdout  # credentials are not group policy
        marks = {name: len(d.lines) for name, d in daemons.items()}
        res = gdoictl(lab / "ks.sock", "clear", "crypto", "gdoi", "ks", "members", "now", yes=True)
        assert res.returncode == 0 and res.stdout == REMOVAL_NOW_PROMPT + "yes\n" + SENDING_REMOVAL
        ks_new = show(lab / "ks.sock")

        daemons["gm1"].wait_for(REGISTERED, start=marks["gm1"])
        gm1 = show(lab / "gm1.sock")
        assert gm1["kek_spi"] == ks_new["kek_spi"] and gm1["tek_spis"] == ks_new["tek_spis"]

        line = daemons["gm2"].wait_for(r"AUTHENTICATION_FAILED", start=marks["gm2"])
        assert "%GDOI-4-GM_REG_FAILURE" in line or "%IKE-4-PHASE1_FAILED" in line
        ks.wait_for(r"127\.0\.0\.3.*sent AUTHENTICATION_FAILED")
        gm2 = show(lab / "gm2.sock")
        assert gm2["registrations"] == 1 and gm2["kek_spi"] is None
        assert not set(gm2["tek_spis"]) & set(ks_new["tek_spis"])
        assert set(members(lab)) == {"127.0.0.2"}
        # It keeps trying, and keeps failing.
        daemons["gm2"].wait_for(
            r"AUTHENTICATION_FAILED", start=len(daemons["gm2"].lines), timeout=10
        )
        gm2 = show(lab / "gm2.sock")
        assert not set(gm2["tek_spis"]) & set(ks_new["tek_spis"]) and gm2["registrations"] == 1
    assert not re.search(REGISTERED, "\n".join(daemons["gm2"].lines[marks["gm2"] :]))


# --- 5. GM removal with immediate SA deletion -----------------------------------------------


def test_immediate_removal(lab: Path) -> None:
    cfg = ks_toml(lab, auth=auth_toml("psk.secret"), lifetime=600)
    with running(lab, cfg, [("gm1", "127.0.0.2", "1.0.2")]) as (_ks, daemons):
        gm = daemons["gm1"]
        old = show(lab / "gm1.sock")
        mark = len(gm.lines)
        res = gdoictl(lab / "ks.sock", "clear", "crypto", "gdoi", "ks", "members", "now", yes=True)
        assert res.returncode == 0 and res.stdout == REMOVAL_NOW_PROMPT + "yes\n" + SENDING_REMOVAL
        ks_new = show(lab / "ks.sock")
        line = gm.wait_for(
            r"%GDOI-4-GM_RECV_DELETE_IMMEDIATE: GM receive REMOVAL-NOW in group GET to cleanup downloaded "
            r"policy now\. Re-registration will start in a randomly chosen period of (\d+) sec$",
            start=mark,
        )
        seen_at = time.monotonic()
        period = int(line.rsplit(" ", 2)[-2])
        assert 0 <= period <= 12  # 2% of the 600 s TEK lifetime
        now = show(lab / "gm1.sock")
        # Old keys gone at once; if the (random) timer already fired, only the new ones are held.
        assert old["kek_spi"] != now["kek_spi"] and not set(old["tek_spis"]) & set(now["tek_spis"])
        if now["registrations"] == 1:
            assert now["kek_spi"] is None and now["tek_spis"] == [] and now["teks"] == []

        gm.wait_for(REGISTERED, timeout=period + 5, start=mark)
        assert (
            time.monotonic() - seen_at <= period + 2
        )  # within the announced period (+ rounding, tick)
        again = show(lab / "gm1.sock")
        assert again["registrations"] == 2
        assert again["kek_spi"] == ks_new["kek_spi"] and again["tek_spis"] == ks_new["tek_spis"]


# --- 6. policy change and triggered (policy-replace) rekey ----------------------------------------


def test_policy_change_and_triggered_rekey(lab: Path) -> None:
    auth = auth_toml("psk.secret")
    cfg = ks_toml(lab, auth=auth, transform="esp-cbc-256-sha256")
    gms = [("gm1", "127.0.0.2", "1.0.2"), ("gm2", "127.0.0.3", "1.0.1")]
    with running(lab, cfg, gms) as (ks, daemons):
        ks0 = show(lab / "ks.sock")
        gm1_0, gm2_0 = show(lab / "gm1.sock"), show(lab / "gm2.sock")
        old_spi = ks0["tek_spis"][0]
        cbc = ks0["teks"][0]["transform"]

        # A policy change is only announced: nothing is sent.
        ks_toml(lab, auth=auth, transform="esp-gcm-256")
        res = gdoictl(lab / "ks.sock", "reload")
        assert res.returncode == 0 and res.stdout == POLICY_CHANGE + "\n"
        ks.wait_for(re.escape(POLICY_CHANGE) + "$")
        assert keys_of(show(lab / "ks.sock")) == keys_of(ks0)
        assert keys_of(show(lab / "gm1.sock")) == keys_of(gm1_0)
        assert keys_of(show(lab / "gm2.sock")) == keys_of(gm2_0)

        # The triggered rekey: policy-replace to 1.0.2, a plain rekey to 1.0.1.
        res = gdoictl(lab / "ks.sock", "crypto", "gdoi", "ks", "rekey")
        assert res.returncode == 0 and res.stdout == _send_rekey(2, replace=True) + "\n"
        ks.wait_for(re.escape(_send_rekey(2, replace=True)) + "$")
        daemons["gm1"].wait_for(_recv_rekey("127.0.0.2", 2))
        daemons["gm2"].wait_for(_recv_rekey("127.0.0.3", 2))
        ks1 = show(lab / "ks.sock")
        assert len(ks1["tek_spis"]) == 1 and old_spi not in ks1["tek_spis"]
        new_spi, gcm = ks1["tek_spis"][0], ks1["teks"][0]["transform"]
        assert gcm != cbc

        teks1 = {t["spi"]: t for t in show(lab / "gm1.sock")["teks"]}
        assert set(teks1) == {old_spi, new_spi}
        assert teks1[new_spi]["transform"] == gcm and teks1[new_spi]["remaining"] > 3500
        assert teks1[old_spi]["transform"] == cbc
        assert (
            abs(teks1[old_spi]["remaining"] - shortened_lifetime(3600, 3600)) <= 2
        )  # TEK_SLT = 180 s
        teks2 = {t["spi"]: t for t in show(lab / "gm2.sock")["teks"]}
        assert set(teks2) == {old_spi, new_spi}
        assert teks2[new_spi]["transform"] == gcm
        assert teks2[old_spi]["remaining"] > 3500  # 1.0.1: the old TEK keeps its natural lifetime

        # A second change, announced through SIGHUP, then replace-now.
        mark = len(ks.lines)
        ks_toml(lab, auth=auth, transform="esp-gcm-128")
        ks.proc.send_signal(signal.SIGHUP)
        ks.wait_for(re.escape(POLICY_CHANGE) + "$", start=mark)
        assert show(lab / "ks.sock")["seq"] == 2
        res = gdoictl(lab / "ks.sock", "crypto", "gdoi", "ks", "rekey", "replace-now")
        assert res.returncode == 0 and res.stdout == _send_rekey(3, replace=True) + "\n"
        daemons["gm1"].wait_for(_recv_rekey("127.0.0.2", 3))
        daemons["gm2"].wait_for(_recv_rekey("127.0.0.3", 3))
        ks2 = show(lab / "ks.sock")
        newest = ks2["tek_spis"]
        assert len(newest) == 1 and newest[0] not in (old_spi, new_spi)
        gm1 = show(lab / "gm1.sock")
        assert gm1["tek_spis"] == newest  # the old TEKs are gone at once
        assert gm1["teks"][0]["transform"] == ks2["teks"][0]["transform"] not in (cbc, gcm)
        assert gm1["kek_spi"] == ks2["kek_spi"]
        teks2 = {t["spi"]: t for t in show(lab / "gm2.sock")["teks"]}
        assert set(teks2) == {old_spi, new_spi, newest[0]}
        assert all(t["remaining"] > 3500 for t in teks2.values())
        for d in daemons.values():
            assert d.text().count("GM_REKEY_REJECTED") == 0
            assert show(d.config.parent / f"{d.config.stem}.sock")["registrations"] == 1


# --- 7. a GM that no longer answers is dropped ---------------------------------------------


def test_killed_gm_dropped_after_three_missed_rekeys(lab: Path) -> None:
    cfg = ks_toml(
        lab, auth=auth_toml("psk.secret"), rekey={"retransmit_interval": 0.2, "retransmit_count": 0}
    )
    gms = [("gm1", "127.0.0.2", "1.0.2"), ("gm2", "127.0.0.3", "1.0.2")]
    with running(lab, cfg, gms) as (ks, daemons):
        daemons["gm2"].proc.send_signal(signal.SIGKILL)
        daemons["gm2"].proc.wait(10)
        dropped = r"%GDOI-4-KS_MEMBER_DROPPED: GM 127\.0\.0\.3 dropped from group GET after 3 missed rekeys"
        for seq in (2, 3, 4):
            assert gdoictl(lab / "ks.sock", "crypto", "gdoi", "ks", "rekey").returncode == 0
            daemons["gm1"].wait_for(_recv_rekey("127.0.0.2", seq))
            if seq < 4:
                # Still a member: missed only seq - 1 so far (the count shows once the retransmit timer ran).
                row = poll(
                    f"{seq - 1} missed",
                    lambda s=seq: (
                        (m := members(lab).get("127.0.0.3")) and m["missed_rekeys"] == s - 1 and m
                    ),
                )
                assert row["address"] == "127.0.0.3"
                assert not re.search(dropped, ks.text())
        ks.wait_for(dropped)
        table = members(lab)
        assert set(table) == {"127.0.0.2"}
        assert table["127.0.0.2"]["missed_rekeys"] == 0
        assert table["127.0.0.2"]["acks_received"] == 3
        text = gdoictl(lab / "ks.sock", "show", "crypto", "gdoi", "ks", "members").stdout
        assert "127.0.0.3" not in text and "127.0.0.2" in text
