"""Issue 9 §2 with real daemons on loopback: a rogue "KS" answers a GM first.

The GM lists the rogue (127.0.0.9) before the real KS (127.0.0.1). The rogue is a
real ``gdoid ks`` started with a GM's certificate from the group's CA, or with the
group-wide PSK and a rekey key of its own. The pinned GM refuses it before
installing anything, logs why, and registers with the real KS; Wireshark decodes
message 4 with its POP_R. Binds UDP 848 on several loopback addresses: run under
the shared test lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gdoid.protocol import crypto
from gdoid.protocol.pki import load_private_key
from tests.pki import generate_test_pki
from tests.procs import (
    Capture,
    Daemon,
    auth_toml,
    gdoictl_json,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)

pytestmark = pytest.mark.root

ROGUE = "127.0.0.9"
REGISTERED_REAL = r"%GDOI-5-GM_REGS_COMPL: Registration to KS 127\.0\.0\.1 complete for group GET"


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    write_private(tmp_path / "psk.secret", "group-wide-secret\n")
    write_signing_key(tmp_path / "rekey.key")
    (tmp_path / "rogue").mkdir()
    write_signing_key(tmp_path / "rogue" / "rekey.key")  # the rogue's own rekey key
    return tmp_path


def pki_auth(pki: dict[str, Path], name: str) -> str:
    return auth_toml(
        pki={
            "ca_file": str(pki["ca.pem"]),
            "cert_file": str(pki[f"{name}.pem"]),
            "key_file": str(pki[f"{name}.key"]),
        }
    )


def pinned_gm(lab: Path, auth: str, pins: str) -> Path:
    cfg = gm_toml(lab, address="127.0.0.2", name="gm1", auth=auth, servers=(ROGUE, "127.0.0.1"))
    cfg.write_text(cfg.read_text() + pins + "\n")  # [[group]] is the last table
    return cfg


def tek_spis(sock: Path) -> list[str]:
    [group] = gdoictl_json(sock, "show", "crypto", "gdoi")["groups"]
    return group["tek_spis"]


def test_rogue_ks_daemon_with_a_gm_certificate_is_refused_by_identity_pinning(lab: Path) -> None:
    pki = generate_test_pki(lab / "pki", ["ks", "gm1", "gm9"])
    real_cfg = ks_toml(lab, auth=pki_auth(pki, "ks"))
    rogue_cfg = ks_toml(lab / "rogue", address=ROGUE, name="rogue", auth=pki_auth(pki, "gm9"))
    gm_cfg = pinned_gm(lab, pki_auth(pki, "gm1"), 'ks_identities = ["CN=ks", "dns:ks.example.com"]')
    with Daemon("ks", real_cfg) as ks, Daemon("ks", rogue_cfg) as rogue:
        ks.wait_for("ks_started")
        rogue.wait_for("ks_started")
        with Daemon("gm", gm_cfg) as gm:
            refusal = gm.wait_for(r"%GDOI-4-GM_REG_FAILURE: Registration to KS 127\.0\.0\.9 failed")
            gm.wait_for(REGISTERED_REAL)
            assert "CN=gm9" in refusal and "matches none of ks_identities" in refusal
            assert rogue.wait_for("phase1_established")  # the rogue did complete phase 1 ...
            [rogue_group] = gdoictl_json(
                lab / "rogue" / "rogue.sock", "show", "crypto", "gdoi", "ks", "members"
            )["groups"]
            assert rogue_group["members"] == []  # ... and never got to hand out keys
            installed = tek_spis(lab / "gm1.sock")
            assert installed == tek_spis(lab / "ks.sock")
            assert not set(installed) & set(tek_spis(lab / "rogue" / "rogue.sock"))


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_psk_holder_posing_as_ks_fails_rekey_key_pop_and_wireshark_decodes_message_4(
    lab: Path,
) -> None:
    auth = auth_toml("psk.secret")
    pin = hashlib.sha256(crypto.public_key_der(load_private_key(lab / "rekey.key"))).hexdigest()
    real_cfg = ks_toml(lab, auth=auth)
    rogue_auth = auth.replace('key_file = "psk.secret"', f'key_file = "{lab / "psk.secret"}"')
    rogue_cfg = ks_toml(lab / "rogue", address=ROGUE, name="rogue", auth=rogue_auth)
    gm_cfg = pinned_gm(lab, auth, f'ks_pop = "rekey-key"\nrekey_key_sha256 = "{pin}"')
    pcap, keylog = lab / "capture.pcap", lab / "keylog"
    with Capture(pcap), Daemon("ks", real_cfg) as ks, Daemon("ks", rogue_cfg) as rogue:
        ks.wait_for("ks_started")
        rogue.wait_for("ks_started")
        with Daemon("gm", gm_cfg, "--keylog", str(keylog)) as gm:
            refusal = gm.wait_for(r"%GDOI-4-GM_REG_FAILURE: Registration to KS 127\.0\.0\.9 failed")
            gm.wait_for(REGISTERED_REAL)
            assert "rekey_key_sha256" in refusal and "INVALID_KEY_INFORMATION" in refusal
            assert "rekey key" in gm.wait_for("ks_role_verified")
            assert tek_spis(lab / "gm1.sock") == tek_spis(lab / "ks.sock")
    env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(keylog)}
    rows = [
        line.split("|")
        for line in subprocess.run(
            [
                "tshark",
                "-r",
                str(pcap),
                "-d",
                "udp.port==848,isakmp",
                "-Y",
                "isakmp.exchangetype == 32",
                "-T",
                "fields",
                "-E",
                "separator=|",
                "-e",
                "ip.src",
                "-e",
                "isakmp.typepayload",
                "-e",
                "isakmp.kd.payload.spi",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout.splitlines()
    ]
    # Message 4 from each KS, decrypted: HASH(8), SEQ(18), KD(17), POP_R as SIG(9).
    m4 = [r for r in rows if r[2]]
    assert {r[0] for r in m4} == {"127.0.0.1", ROGUE}
    for src, types, _ in m4:
        assert types.split(",")[:4] == ["8", "18", "17", "9"], (src, types)
    expert = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-d",
            "udp.port==848,isakmp",
            "-Y",
            "udp.port==848 && (_ws.malformed || _ws.expert.severity >= 6291456)",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert expert.stdout.strip() == ""
