"""Registration end to end: the real ``gdoid ks`` and ``gdoid gm`` processes on UDP 848."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pki import generate_test_pki
from tests.procs import (
    Capture,
    Daemon,
    auth_toml,
    gdoictl,
    gdoictl_json,
    gm_toml,
    ks_toml,
)

pytestmark = pytest.mark.root

REGISTERED = r"%GDOI-5-GM_REGS_COMPL: Registration to KS 127\.0\.0\.1 complete for group GET"


def _group(data: dict) -> dict:
    assert len(data["groups"]) == 1
    return data["groups"][0]


def test_psk_registration_spis_versions_and_feature_table(lab: Path) -> None:
    auth = auth_toml("psk.secret")
    ks_cfg = ks_toml(lab, auth=auth)
    gm1_cfg = gm_toml(lab, address="127.0.0.2", name="gm1", auth=auth)
    gm2_cfg = gm_toml(lab, address="127.0.0.3", name="gm2", auth=auth, version="1.0.1")
    with Daemon("ks", ks_cfg) as ks:
        ks.wait_for("ks_started")
        with Daemon("gm", gm1_cfg) as gm1, Daemon("gm", gm2_cfg) as gm2:
            gm1.wait_for(REGISTERED + r" using address 127\.0\.0\.2")
            gm2.wait_for(REGISTERED + r" using address 127\.0\.0\.3")
            ks.wait_for(r"%GDOI-5-KS_REGS_COMPL: .* with GM 127\.0\.0\.3")

            ks_group = _group(gdoictl_json(lab / "ks.sock", "show", "crypto", "gdoi"))
            for sock in ("gm1.sock", "gm2.sock"):
                gm_group = _group(gdoictl_json(lab / sock, "show", "crypto", "gdoi"))
                assert gm_group["state"] == "REGISTERED"
                assert gm_group["kek_spi"] == ks_group["kek_spi"]
                assert (
                    gm_group["tek_spis"] == ks_group["tek_spis"] and len(gm_group["tek_spis"]) == 1
                )
                assert len(gm_group["sender_ids"]) == 1  # GCM policy: an RFC 6054 sender ID each

            members = {
                m["address"]: m
                for m in _group(
                    gdoictl_json(lab / "ks.sock", "show", "crypto", "gdoi", "ks", "members")
                )["members"]
            }
            assert members["127.0.0.2"]["version"] == "1.0.2"
            assert members["127.0.0.3"]["version"] == "1.0.1"
            assert members["127.0.0.2"]["tek_spis"] == ks_group["tek_spis"]
            assert members["127.0.0.2"]["sender_ids"] != members["127.0.0.3"]["sender_ids"]

            text = gdoictl(lab / "ks.sock", "show", "crypto", "gdoi", "ks", "members").stdout
            assert re.search(r"Group Member ID\s+: 127\.0\.0\.3\s+GM Version: 1\.0\.1", text)

            table = gdoictl(lab / "ks.sock", "show crypto gdoi feature gm-removal")
            assert table.returncode == 0
            assert table.stdout == (
                "\n Group Name: GET\n"
                " Key Server ID Version Feature Supported\n"
                " 127.0.0.1 1.0.2 Yes\n"
                "\n Group Member ID Version Feature Supported\n"
                " 127.0.0.2 1.0.2 Yes\n"
                " 127.0.0.3 1.0.1 No\n"
            )
            only_no = gdoictl(
                lab / "ks.sock",
                "show",
                "crypto",
                "gdoi",
                "feature",
                "policy-replace",
                "|",
                "include",
                "No",
            )
            assert only_no.stdout == " 127.0.0.3 1.0.1 No\n"

            # The human-readable GM view names the same SPI the KS shows.
            gm_text = gdoictl(lab / "gm1.sock", "show", "crypto", "gdoi").stdout
            assert f"spi: 0x{ks_group['tek_spis'][0].upper()}" in gm_text
            assert "Registration status   : Registered" in gm_text
    # Keys never reach the logs.
    key_hex = ks_group["kek_spi"]
    assert "lab-secret-1" not in ks.text() + gm1.text() + gm2.text()
    assert key_hex  # the SPI is public and fine to show


def test_certificate_registration(lab: Path) -> None:
    pki = generate_test_pki(lab / "pki", ["ks", "gm1"])
    ks_auth = auth_toml(
        pki={
            "ca_file": str(pki["ca.pem"]),
            "cert_file": str(pki["ks.pem"]),
            "key_file": str(pki["ks.key"]),
        }
    )
    gm_auth = auth_toml(
        pki={
            "ca_file": str(pki["ca.pem"]),
            "cert_file": str(pki["gm1.pem"]),
            "key_file": str(pki["gm1.key"]),
        }
    )
    with Daemon("ks", ks_toml(lab, auth=ks_auth)) as ks:
        ks.wait_for("ks_started")
        with Daemon("gm", gm_toml(lab, address="127.0.0.2", name="gm1", auth=gm_auth)) as gm:
            gm.wait_for(REGISTERED)
            line = ks.wait_for("phase1_established")
            assert "rsa_sig" in line
            members = _group(
                gdoictl_json(lab / "ks.sock", "show", "crypto", "gdoi", "ks", "members")
            )["members"]
            assert members[0]["identity"] == "CN=gm1"
            ks_group = _group(gdoictl_json(lab / "ks.sock", "show", "crypto", "gdoi"))
            gm_group = _group(gdoictl_json(lab / "gm1.sock", "show", "crypto", "gdoi"))
            assert gm_group["tek_spis"] == ks_group["tek_spis"]


def test_refusals_are_notified_and_logged_on_both_sides(lab: Path) -> None:
    """Wrong PSK, untrusted certificate, unknown group, unsupported algorithms: each refused
    with the right notify and a log line on both sides, while the KS keeps serving."""
    pki = generate_test_pki(lab / "pki", ["ks"])
    rogue = generate_test_pki(lab / "rogue", ["gm5"])
    ks_auth = auth_toml("psk.secret") + auth_toml(
        pki={
            "ca_file": str(pki["ca.pem"]),
            "cert_file": str(pki["ks.pem"]),
            "key_file": str(pki["ks.key"]),
        }
    )
    good = auth_toml("psk.secret")
    ks_cfg = ks_toml(lab, auth=ks_auth, ike="[ike]\ndh_groups = [19]\n")
    cases = [
        ("gm2", "127.0.0.2", auth_toml("wrong.secret"), 1234, "", "AUTHENTICATION_FAILED"),
        ("gm3", "127.0.0.3", good, 999, "", "INVALID_ID_INFORMATION"),
        ("gm4", "127.0.0.4", good, 1234, "[ike]\ndh_groups = [14]\n", "NO_PROPOSAL_CHOSEN"),
        (
            "gm5",
            "127.0.0.5",
            auth_toml(
                pki={
                    "ca_file": str(pki["ca.pem"]),
                    "cert_file": str(rogue["gm5.pem"]),
                    "key_file": str(rogue["gm5.key"]),
                }
            ),
            1234,
            "",
            "AUTHENTICATION_FAILED",
        ),
    ]
    with Daemon("ks", ks_cfg) as ks:
        ks.wait_for("ks_started")
        for name, addr, auth, group, ike, notify in cases:
            cfg = gm_toml(lab, address=addr, name=name, auth=auth, group_number=group, ike=ike)
            with Daemon("gm", cfg) as gm:
                gm_line = gm.wait_for(
                    rf"%(GDOI-4-GM_REG_FAILURE|IKE-4-PHASE1_FAILED): .*received {notify}"
                )
                ks_line = ks.wait_for(
                    rf"%(GDOI-4-KS_REGS_FAILURE|IKE-4-PHASE1_FAILED): .*{re.escape(addr)}.*sent {notify}"
                )
                assert notify in gm_line and notify in ks_line
                status = _group(gdoictl_json(lab / f"{name}.sock", "show", "crypto", "gdoi"))
                assert status["registrations"] == 0 and status["tek_spis"] == []
        # The KS still serves a correct GM.
        with Daemon("gm", gm_toml(lab, address="127.0.0.6", name="gm6", auth=good)) as gm6:
            gm6.wait_for(REGISTERED)
        assert ks.proc.poll() is None
    # The refusal reasons are specific.
    assert "pre-shared key" in ks.text()
    assert "unknown group number 999" in ks.text()
    assert "certificate refused" in ks.text()


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_tshark_decrypts_registration_with_key_log(lab: Path) -> None:
    pcap = lab / "capture.pcap"
    keylog = lab / "keylog"
    auth = auth_toml("psk.secret")
    with Capture(pcap), Daemon("ks", ks_toml(lab, auth=auth), "--keylog", str(keylog)) as ks:
        ks.wait_for("ks_started")
        with Daemon(
            "gm", gm_toml(lab, address="127.0.0.2", name="gm1", auth=auth), "--keylog", str(keylog)
        ) as gm:
            gm.wait_for(REGISTERED)
            spis = _group(gdoictl_json(lab / "gm1.sock", "show", "crypto", "gdoi"))["tek_spis"]
    env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(keylog)}
    fields = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-d",
            "udp.port==848,isakmp",
            "-Y",
            "udp.port==848",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "isakmp.exchangetype",
            "-e",
            "isakmp.flag_e",
            "-e",
            "isakmp.id.data.key_id",
            "-e",
            "isakmp.sat.spi",
            "-e",
            "isakmp.kd.payload.spi",
            "-e",
            "isakmp.seq.seq",
            "-e",
            "isakmp.id.data.ipv4_addr",
            "-e",
            "isakmp.typepayload",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.splitlines()
    rows = [line.split("|") for line in fields]
    pull = [r for r in rows if r[0] == "32"]
    assert len(pull) == 4  # all four GROUPKEY-PULL messages, decrypted
    assert pull[0][2] == f"{1234:08x}"  # ID_KEY_ID carries the group number
    assert pull[1][3] == spis[0]  # SAT SPI as gdoictl shows it
    assert spis[0] in pull[3][4].split(",")  # the TEK key packet in KD
    assert pull[3][5] == "1"
    # Main Mode 5/6 decrypted: their ID payloads (ID_IPV4_ADDR) are readable.
    mm = [r for r in rows if r[0] == "2"]
    assert len(mm) == 6
    assert {mm[4][6], mm[5][6]} == {"127.0.0.2", "127.0.0.1"}
    # Nothing malformed, no expert errors or warnings anywhere.
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
    assert "ikev1_decryption_table" in os.listdir(keylog)


def test_json_logs_carry_mnemonics_and_no_keys(lab: Path) -> None:
    import json

    auth = auth_toml("psk.secret")
    with Daemon("ks", ks_toml(lab, auth=auth), "--log-format", "json") as ks:
        ks.wait_for("ks_started")
        with Daemon(
            "gm", gm_toml(lab, address="127.0.0.2", name="gm1", auth=auth), "--log-format", "json"
        ) as gm:
            gm.wait_for("GM_REGS_COMPL")
            ks.wait_for("KS_REGS_COMPL")
    records = [json.loads(line) for line in ks.text().splitlines() + gm.text().splitlines()]
    by_mnemonic = {r.get("mnemonic"): r for r in records}
    reg = by_mnemonic["GDOI-5-GM_REGS_COMPL"]
    assert reg["event"] == (
        "%GDOI-5-GM_REGS_COMPL: Registration to KS 127.0.0.1 complete for group GET using address 127.0.0.2"
    )
    assert reg["ks"] == "127.0.0.1" and reg["group"] == "GET"
    assert "GDOI-5-KS_REGS_COMPL" in by_mnemonic
    assert "lab-secret-1" not in ks.text() + gm.text()
