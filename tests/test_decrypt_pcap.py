"""``gdoid decrypt-pcap`` and the key log's KEK table and ``decode_as_entries`` (issue 12 §5, issue 14 §5).

Wireshark cannot decrypt GROUPKEY-PUSH; decrypt-pcap rewrites every push it has
a KEK for into its decrypted form and copies everything else byte for byte.
The end-to-end test captures real daemons on loopback doing a registration,
scheduled rekeys (one rolls the KEK over), a removal and a replace-now, then
reads the rewritten capture with tshark given nothing but a key-log directory.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.keylog import DECODE_AS, KEK_TABLE, KeyLog
from gdoid.pcap_decrypt import KekKey, KekTableError, key_ring, parse_kek_table, rewrite_capture
from gdoid.protocol.crypto import SigHash
from gdoid.protocol.gdoi_payloads import SeqPayload
from gdoid.protocol.push import build_push, removal_notify
from tests.procs import (
    Capture,
    Daemon,
    auth_toml,
    gdoictl,
    gdoid_cmd,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)
from tests.pullsim import make_kek, make_tek

REPO = Path(__file__).resolve().parent.parent
needs_tshark = pytest.mark.skipif(
    shutil.which("tshark") is None or shutil.which("editcap") is None,
    reason="needs tshark and editcap",
)

GM_REMOVAL = "36864"
POLICY_REPLACE = "36865"
# Payload types as Wireshark shows them in isakmp.typepayload.
SA, SIG, NOTIFY, KD, SEQ = "1", "9", "11", "17", "18"


def _decrypt_pcap(src: Path, dst: Path, *keylogs: Path) -> subprocess.CompletedProcess[str]:
    args = [a for d in keylogs for a in ("--keylog", str(d))]
    return subprocess.run(
        [*gdoid_cmd(), "decrypt-pcap", str(src), str(dst), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _frames(pcap: Path) -> list[bytes]:
    from scapy.utils import RawPcapReader  # pcap and pcapng; scapy is slow to import

    with RawPcapReader(str(pcap)) as reader:
        return [data for data, _meta in reader]


def _tshark(pcap: Path, config: Path, *args: str) -> list[list[str]]:
    """tshark with ``config`` as its whole configuration (no ``-d``): one row per frame."""
    res = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(pcap),
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-E",
            "aggregator=,",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "WIRESHARK_CONFIG_DIR": str(config)},
    )
    return [line.split("|") for line in res.stdout.splitlines()]


def _problems(pcap: Path, config: Path) -> str:
    """Malformed frames and expert warnings/errors, as tshark lists them."""
    return subprocess.run(
        ["tshark", "-n", "-r", str(pcap), "-Y", "_ws.malformed || _ws.expert.severity >= 6291456"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "WIRESHARK_CONFIG_DIR": str(config)},
    ).stdout.strip()


def _capture_summary(topology: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "compose" / "capture-summary.sh"), str(topology)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CAPTURE_SUMMARY_TOOLS": "host"},
    )


# --- the key log ----------------------------------------------------------------------------


def test_key_log_writes_each_kek_once_and_decode_as(tmp_path: Path) -> None:
    kl = KeyLog(tmp_path / "keys")
    kek = make_kek(time.time())
    kl.kek(kek)
    kl.kek(kek)  # the GM installs the same KEK again at every rekey that carries it
    kl.kek(None)
    kl.close()
    keys = parse_kek_table((tmp_path / "keys" / KEK_TABLE).read_text())
    assert keys == [KekKey(kek.spi, kek.key, kek.iv)]
    for name in (KEK_TABLE, DECODE_AS):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    assert (
        "decode_as_entry: udp.port,848,(none),ISAKMP\n"
        in (tmp_path / "keys" / DECODE_AS).read_text()
    )
    # A second daemon on the same directory keeps the files as they are.
    KeyLog(tmp_path / "keys").close()
    assert parse_kek_table((tmp_path / "keys" / KEK_TABLE).read_text()) == keys


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("00" * 16 + ",AES-CBC," + "11" * 32, "line 2: 3 fields"),
        ("00" * 16 + ",3DES," + "11" * 32 + "," + "22" * 16, "line 2: cipher '3DES'"),
        ("00" * 15 + ",AES-CBC," + "11" * 32 + "," + "22" * 16, "line 2: SPI has 15 octets"),
        ("00" * 16 + ",AES-CBC," + "11" * 20 + "," + "22" * 16, "line 2: key has 20 octets"),
        ("00" * 16 + ",AES-CBC," + "11" * 32 + ",zz", "line 2: IV is not hex"),
    ],
)
def test_kek_table_refuses_bad_lines(line: str, error: str) -> None:
    with pytest.raises(KekTableError, match=re.escape(error)):
        parse_kek_table("# comment\n" + line + "\n", "t")


# --- decrypt-pcap on a capture made here --------------------------------------------------


def _lab_capture(path: Path, push: bytes) -> list[bytes]:
    """A push from the KS, an unrelated datagram and an IPv4 fragment, as a pcap file."""
    from scapy.all import IP, UDP, Ether, Raw, wrpcap

    packets = [
        Ether() / IP(src="127.0.0.1", dst="127.0.0.2") / UDP(sport=848, dport=848) / Raw(push),
        Ether() / IP(src="127.0.0.2", dst="127.0.0.1") / UDP(sport=848, dport=9) / Raw(b"probe"),
        Ether()
        / IP(src="127.0.0.1", dst="127.0.0.3", flags="MF")
        / UDP(sport=848, dport=848)
        / Raw(push[:64]),
    ]
    wrpcap(str(path), packets)
    return [bytes(p) for p in packets]


@needs_tshark
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_decrypt_pcap_rewrites_the_push_and_nothing_else(tmp_path: Path, fmt: str) -> None:
    from scapy.all import IP, UDP

    kek = make_kek(time.time())
    push = build_push(
        kek,
        ec.generate_private_key(ec.SECP256R1()),
        SigHash.SHA256,
        [SeqPayload(7), removal_notify(2)],
    )
    raw = tmp_path / "raw.pcap"
    _lab_capture(raw, push)
    if fmt == "pcapng":
        subprocess.run(
            ["editcap", "-F", "pcapng", str(tmp_path / "raw.pcap"), str(tmp_path / "raw.pcapng")],
            check=True,
        )
        raw = tmp_path / "raw.pcapng"
    keys = tmp_path / "keys"
    KeyLog(keys).kek(kek)
    out = tmp_path / f"out.{fmt}"
    res = _decrypt_pcap(raw, out, keys)
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout
        == f"gdoid decrypt-pcap: 3 frames, 1 GROUPKEY-PUSH decrypted, 0 left encrypted -> {out}\n"
    )
    assert "IPv4 fragments of UDP left as they are (no reassembly): frames 3" in res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # the decrypted pushes carry keys
    assert out.read_bytes()[:4] == raw.read_bytes()[:4]  # the format is kept
    before, after = _frames(raw), _frames(out)
    assert after[1:] == before[1:]
    # The push, in the clear: the IP and UDP checksums are right (scapy recomputes them).
    ip = IP(after[0][14:])
    fresh = ip.copy()
    del fresh.chksum, fresh[UDP].chksum, fresh.len, fresh[UDP].len
    assert bytes(IP(bytes(fresh))) == bytes(ip)
    rows = _tshark(
        out,
        keys,
        "-e",
        "isakmp.exchangetype",
        "-e",
        "isakmp.flag_e",
        "-e",
        "isakmp.seq.seq",
        "-e",
        "isakmp.notify.msgtype",
        "-e",
        "isakmp.typepayload",
    )
    assert rows[0] == ["33", "0", "7", GM_REMOVAL, ",".join((SEQ, NOTIFY, SIG))]
    assert _problems(out, keys) == ""
    # The raw capture shows nothing of it.
    assert _tshark(raw, keys, "-e", "isakmp.flag_e", "-e", "isakmp.seq.seq")[0] == ["1", ""]


def test_decrypt_pcap_without_the_kek_leaves_the_push_and_names_the_spi(tmp_path: Path) -> None:
    kek = make_kek(time.time())
    push = build_push(kek, ec.generate_private_key(ec.SECP256R1()), SigHash.SHA256, [SeqPayload(7)])
    raw = tmp_path / "raw.pcap"
    _lab_capture(raw, push)
    keys = tmp_path / "keys"
    KeyLog(keys).close()  # a key log without this KEK
    out = tmp_path / "out.pcap"
    res = _decrypt_pcap(raw, out, keys)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == raw.read_bytes()
    assert (
        f"gdoid decrypt-pcap: warning: no key for KEK SPI 0x{kek.spi.hex()} in the key log: "
        "GROUPKEY-PUSH left encrypted in frame 1\n"
    ) in res.stderr
    assert "1 left encrypted" in res.stdout
    # A wrong key for the right SPI is caught, not written out as garbage.
    wrong = KekKey(kek.spi, bytes(32), kek.iv)
    data, report = rewrite_capture(raw.read_bytes(), key_ring([wrong]))
    assert data == raw.read_bytes() and report.failed and report.failed[0][:2] == (1, kek.spi.hex())


def test_decrypt_pcap_copies_the_cut_short_end_of_a_capture_being_written(tmp_path: Path) -> None:
    kek = make_kek(time.time())
    push = build_push(kek, ec.generate_private_key(ec.SECP256R1()), SigHash.SHA256, [SeqPayload(7)])
    raw = tmp_path / "raw.pcap"
    _lab_capture(raw, push)
    data = raw.read_bytes()[:-7]  # the last record, half written
    out, report = rewrite_capture(data, key_ring([KekKey(kek.spi, kek.key, kek.iv)]))
    assert report.decrypted == [1] and report.frames == 2
    assert out.endswith(data[report.cut_at :]) and report.cut_at is not None
    assert any("ends inside a record" in w for w in report.warnings())


def test_decrypt_pcap_refuses_what_is_not_a_capture(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "not.pcap").write_bytes(b"hello, world" * 4)
    res = _decrypt_pcap(tmp_path / "not.pcap", tmp_path / "out", tmp_path / "keys")
    assert res.returncode == 2 and "not a pcap or pcapng file" in res.stderr
    assert not (tmp_path / "out").exists()


@needs_tshark
def test_decode_as_entries_makes_udp_848_isakmp_without_d(tmp_path: Path) -> None:
    raw = tmp_path / "raw.pcap"
    _lab_capture(
        raw,
        build_push(
            make_kek(time.time()),
            ec.generate_private_key(ec.SECP256R1()),
            SigHash.SHA256,
            [SeqPayload(7)],
        ),
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _tshark(raw, empty, "-e", "frame.protocols")[0][0] == "eth:ethertype:ip:udp:data"
    keys = tmp_path / "keys"
    KeyLog(keys).close()
    assert _tshark(raw, keys, "-e", "frame.protocols")[0][0] == "eth:ethertype:ip:udp:isakmp"


@needs_tshark
def test_capture_summary_counts_esp_with_a_good_icv(tmp_path: Path) -> None:
    """compose/capture-summary.sh on a topology layout: ESP of a logged TEK (inner ICMP) counts."""
    from scapy.all import ICMP, IP, Ether, wrpcap
    from scapy.layers.ipsec import ESP, SecurityAssociation

    tek = make_tek("esp-gcm-256", time.time(), spi=0x6B1E42C0)
    capture = tmp_path / "capture"
    capture.mkdir()
    KeyLog(capture / "keys").esp(tek)
    sa = SecurityAssociation(
        ESP, spi=tek.spi, crypt_algo="AES-GCM", crypt_key=tek.cipher_key, auth_algo="NULL"
    )
    wrpcap(
        str(capture / "capture.pcap"),
        [
            Ether() / sa.encrypt(IP(src="10.48.1.10", dst="10.48.2.10") / ICMP(seq=n))
            for n in range(3)
        ],
    )
    res = _capture_summary(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "    0x6b1e42c0: 3 packets, 3 good ICV, 0 bad ICV, 0 not checked\n" in res.stdout
    assert res.stdout.splitlines()[-1].endswith("ESP 3 packets, 3 good ICV, 0 bad ICV")
    (capture / "keys" / "esp_sa").unlink()  # no key: nothing decrypted
    res = _capture_summary(tmp_path)
    assert res.returncode == 1 and "3 packets, 0 good ICV, 0 bad ICV, 3 not checked" in res.stdout


# --- real daemons -------------------------------------------------------------------------

REGISTERED = (
    r"%GDOI-5-GM_REGS_COMPL: Registration to KS 127\.0\.0\.1 complete for group GET using address "
)


def _recv_rekey(gm: str, seq: int) -> str:
    return rf"%GDOI-5-GM_RECV_REKEY: Received Rekey for group GET from 127\.0\.0\.1 to {re.escape(gm)} with seq # {seq}$"


@needs_tshark
@pytest.mark.skipif(os.geteuid() != 0, reason="binds UDP 848: needs root")
def test_rekeys_removal_and_replace_now_decrypted(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "lab-secret-1\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    pcap = tmp_path / "capture.pcapng"
    ks_keys, gm_keys = tmp_path / "ks-keys", tmp_path / "gm-keys"
    # TEK 30 s, KEK 35 s, lead 25 s: scheduled rekeys every 5 s, the second one with a new KEK.
    ks_cfg = ks_toml(tmp_path, auth=auth, lifetime=30, kek_lifetime=35, rekey={"lead_time": 25})
    gms = {"gm1": "127.0.0.2", "gm2": "127.0.0.3"}
    with Capture(pcap), Daemon("ks", ks_cfg, "--keylog", str(ks_keys)) as ks:
        ks.wait_for("ks_started")
        daemons = {
            name: Daemon(
                "gm",
                gm_toml(tmp_path, address=addr, name=name, auth=auth),
                "--keylog",
                str(gm_keys),
            )
            for name, addr in gms.items()
        }
        try:
            for name, addr in gms.items():
                daemons[name].wait_for(REGISTERED + re.escape(addr))
            for name, addr in gms.items():
                daemons[name].wait_for(_recv_rekey(addr, 3), timeout=20)
            marks = {name: len(d.lines) for name, d in daemons.items()}
            removal = gdoictl(
                tmp_path / "ks.sock", "clear", "crypto", "gdoi", "ks", "members", "now", yes=True
            )
            assert removal.returncode == 0, removal.stdout
            for name, addr in gms.items():
                daemons[name].wait_for(REGISTERED + re.escape(addr), start=marks[name])
                ks.wait_for(rf"%GDOI-5-KS_REGS_COMPL: .* with GM {re.escape(addr)}$", start=0)
            replace_now = gdoictl(
                tmp_path / "ks.sock", "crypto", "gdoi", "ks", "rekey", "replace-now"
            )
            sent = re.search(
                r"with policy-replace for group GET .* with seq # (\d+)$",
                replace_now.stdout.strip(),
            )
            assert sent, replace_now.stdout
            for name, addr in gms.items():
                daemons[name].wait_for(_recv_rekey(addr, int(sent[1])))
        finally:
            for d in daemons.values():
                d.stop()
    _check_decrypted(tmp_path, pcap, ks_keys, gm_keys, int(sent[1]))


def _check_decrypted(
    tmp_path: Path, pcap: Path, ks_keys: Path, gm_keys: Path, replace_seq: int
) -> None:
    fields = (
        "-e",
        "frame.number",
        "-e",
        "isakmp.ispi",
        "-e",
        "isakmp.rspi",
        "-e",
        "isakmp.flag_e",
        "-e",
        "isakmp.seq.seq",
        "-e",
        "isakmp.notify.msgtype",
        "-e",
        "isakmp.typepayload",
        "-e",
        "isakmp.sak.spi",
        "-e",
        "isakmp.sat.spi",
        "-e",
        "ip.src",
        "-Y",
        "isakmp.exchangetype == 33",
    )
    # Wireshark alone (key log as its configuration, no -d) sees the pushes, encrypted.
    raw_pushes = _tshark(pcap, ks_keys, *fields)
    assert len(raw_pushes) >= 4 * 2  # 2 scheduled, the removal, the replace-now; to 2 GMs
    assert {r[3] for r in raw_pushes} == {"1"} and {r[4] for r in raw_pushes} == {""}
    push_frames = {int(r[0]) for r in raw_pushes}

    # The KS's key log alone and the GMs' key log alone each have every KEK a push used.
    for keys in (ks_keys, gm_keys):
        out = tmp_path / f"decrypted-{keys.name}.pcapng"
        res = _decrypt_pcap(pcap, out, keys)
        assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
        assert f"{len(push_frames)} GROUPKEY-PUSH decrypted, 0 left encrypted" in res.stdout
        before, after = _frames(pcap), _frames(out)
        assert len(after) == len(before)
        changed = {n for n, (a, b) in enumerate(zip(before, after, strict=True), 1) if a != b}
        assert changed == push_frames  # every other frame byte for byte
        assert _problems(out, keys) == ""

    pushes = _tshark(out, ks_keys, *fields)
    assert {r[3] for r in pushes} == {"0"} and {r[9] for r in pushes} == {"127.0.0.1"}
    by_seq: dict[int, list[list[str]]] = {}
    for r in pushes:
        by_seq.setdefault(int(r[4]), []).append(r)
    types = {seq: {r[6] for r in rows} for seq, rows in by_seq.items()}
    notifies = {seq: {r[5] for r in rows} for seq, rows in by_seq.items()}
    # Scheduled rekeys: SEQ, SA (SAT; with seq 3 also the SAK of the KEK rollover), KD, SIG.
    sat = "16"
    assert types[2] == types[3] == {",".join((SEQ, SA, sat, KD, SIG))}  # the SAK sits inside SA
    assert all(r[8] for r in by_seq[2]) and not any(r[7] for r in by_seq[2])
    rollover = {r[7] for r in by_seq[3]}
    assert len(rollover) == 1 and rollover.pop() not in {r[1] + r[2] for r in by_seq[3]}
    assert {r[1] + r[2] for r in by_seq[3]} == {r[1] + r[2] for r in by_seq[2]}  # under the old KEK
    # The removal: SEQ, N(GM_REMOVAL), SIG.
    removal_seq = [seq for seq, n in notifies.items() if n == {GM_REMOVAL}]
    assert len(removal_seq) == 1 and types[removal_seq[0]] == {",".join((SEQ, NOTIFY, SIG))}
    # The replace-now: SEQ, N(POLICY_REPLACE), SA (its SAT, a SAK if the KEK is replaced too), KD, SIG.
    seq = replace_seq
    assert notifies[seq] == {POLICY_REPLACE} and len(types[seq]) == 1
    replace_types = types[seq].pop().split(",")
    assert (
        replace_types[:3] == [SEQ, NOTIFY, SA]
        and replace_types[-2:] == [KD, SIG]
        and sat in replace_types
    )
    assert {r[1] + r[2] for r in by_seq[seq]} != {r[1] + r[2] for r in by_seq[2]}  # a later KEK

    # compose/capture-summary.sh on the same capture (host tools), laid out as a topology.
    topology = tmp_path / "topology"
    (topology / "capture").mkdir(parents=True)
    shutil.copy(pcap, topology / "capture" / "capture.pcap")
    shutil.copytree(ks_keys, topology / "capture" / "keys")
    summary = _capture_summary(topology)
    print(summary.stdout)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert sum(" GROUPKEY-PUSH  decrypt-pcap SEQ(" in line for line in lines) == len(push_frames)
    assert (
        sum(" GROUPKEY-PULL  decrypted " in line for line in lines) >= 4 * 4
    )  # 2 GMs, 2 registrations each
    assert any(
        " GROUPKEY-PUSH  decrypt-pcap " in line and "N(GM_REMOVAL)" in line for line in lines
    )
    assert lines[-1].startswith("capture-summary: ISAKMP ") and "0 still encrypted" in lines[-1]
    assert (topology / "capture" / "capture-decrypted.pcap").exists()
    shutil.rmtree(topology / "capture" / "keys")
    (topology / "capture" / "keys").mkdir(mode=0o700)  # a key log with nothing in it
    assert _capture_summary(topology).returncode == 1

    # Without the first KEK's line, its pushes stay as they were and the warning names it.
    first_kek = by_seq[2][0][1] + by_seq[2][0][2]
    partial = tmp_path / "partial"
    partial.mkdir(mode=0o700)
    (partial / KEK_TABLE).write_text(
        "".join(
            line + "\n"
            for line in (ks_keys / KEK_TABLE).read_text().splitlines()
            if not line.startswith(first_kek)
        )
    )
    res = _decrypt_pcap(pcap, tmp_path / "partial.pcapng", partial)
    assert res.returncode == 0
    assert f"warning: no key for KEK SPI 0x{first_kek} in the key log" in res.stderr
    kept = {int(r[0]) for r in raw_pushes if r[1] + r[2] == first_kek}
    before, after = _frames(pcap), _frames(tmp_path / "partial.pcapng")
    assert {
        n for n, (a, b) in enumerate(zip(before, after, strict=True), 1) if a != b
    } == push_frames - kept
