"""Issue 9 §2 (COOP part): key servers authenticate to each other as key servers.

A COOP peer proves credentials of its own in phase 1: a pre-shared key for that
KS pair (never a GM key: Main Mode picks the key by address, and a COOP peer's
address gets its COOP key), or a certificate whose subject / subjectAltName is
pinned in the KS config.  A rogue holding the GM PSK, or a CA-issued GM
certificate, at a configured peer's address announces "primary, priority 255"
with its own keys: refused, counted by reason, logged once a minute; the real
primary stays primary and no GM installs the rogue's keys.  Every ANN carries
the fingerprint of the sender's rekey signing key: a peer whose key differs is
not synced with.

In-memory engines (the tests/test_coop.py harness) and, at the end, real
daemons on loopback.
"""

from __future__ import annotations

import secrets
import signal
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gdoid import configgen
from gdoid.config.loader import parse_gm_config
from gdoid.groupmember.engine import GroupMemberEngine
from gdoid.keyserver.annblocks import signing_key_block
from gdoid.keyserver.coop import Coop
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.phase1 import phase1_config
from gdoid.protocol import pki
from gdoid.protocol.ann import seal_ann
from gdoid.protocol.events import Phase1Established
from gdoid.protocol.gdoi_payloads import AnnPayload, Role
from gdoid.protocol.identity import IdentityPattern, matching_pattern
from gdoid.protocol.ike_policy import Phase1Config
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.version import SoftwareVersion
from tests.coopsim import (
    GROUP,
    KS1,
    KS2,
    KS3,
    KSS,
    PERIOD,
    PRIORITY,
    Sim,
    gm_keys,
    gm_text,
    ks_text,
)
from tests.pki import generate_test_pki
from tests.procs import Daemon, gdoictl_json, write_private, write_signing_key

ROGUE = KS3  # a configured peer address, held by someone who is not a KS


class FieldEvents:
    """A logger keeping (event, fields) for assertions on what and how often it logs."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def log(self, level: int, event: str, **fields: Any) -> None:
        self.records.append((event, fields))

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.records.append((event, fields))

    def about(self, peer: str) -> list[str]:
        """COOP's lines about ``peer`` (rejections, refused SAs, failed phase 1)."""
        return [
            e
            for e, f in self.records
            if f.get("peer") == peer and (e.startswith("coop_") or e.startswith("COOP_"))
        ]


def build_ks(sim: Sim, address: str, text: str) -> KeyServerEngine:
    """Sim.add_ks for an arbitrary KS config text."""
    return sim.start_ks(address, text, FieldEvents())


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name, text in (
        ("psk", "gm-secret\n"),
        ("coop.psk", "coop-secret\n"),
        ("other.psk", "elsewhere\n"),
    ):
        write_private(tmp_path / name, text)
    for name in ("rekey.key", "other-rekey.key"):
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(
            tmp_path / name,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return tmp_path


def gm_register(sim: Sim, gm_address: str, ks_address: str) -> GroupMemberEngine:
    cfg = parse_gm_config(gm_text(gm_address, (ks_address,)), sim.base)
    gm = GroupMemberEngine(
        cfg.address,
        cfg.groups,
        phase1_config(cfg.ike, cfg.auth, cfg.address, None),
        logger=FieldEvents(),
    )
    sim.nodes[gm_address] = gm
    sim.send(gm_address, gm.start(sim.now, sim.mono))
    return gm


def handshake(sim: Sim, p1: Phase1Config, src: str, ks: str) -> IkeSa | None:
    """Main Mode from ``src`` to the KS engine at ``ks`` with ``p1``'s credentials."""
    mm = MainModeInitiator(p1, IPv4Address(ks), sim.now)
    pending = list(mm.start(sim.now).send)
    while pending:
        replies = sim.ks(ks).datagram_received(pending.pop(0), (src, 848), sim.now)
        for data, _ in replies:
            out = mm.receive(data, sim.now)
            pending += out.send
            for ev in out.events:
                if isinstance(ev, Phase1Established):
                    return ev.sa
    return None


def rogue_ann(sim: Sim, sa: IkeSa, rogue_keys_from: Coop) -> bytes:
    """ "Primary, priority 255", with the rogue's own keys and a matching fingerprint."""
    g = rogue_keys_from.host.groups[GROUP]
    ann = AnnPayload(
        SoftwareVersion(1, 0, 2),
        255,
        Role.PRIMARY,
        0,
        2**62 + secrets.randbits(20),
        GROUP,
        0,
        (rogue_keys_from._keys_block(g), signing_key_block(g)),
    )
    return seal_ann(sa, ann)


def assert_real_primary_kept(sim: Sim, gms: list[GroupMemberEngine], rogue_keys: Any) -> None:
    assert sim.primaries((KS1, KS2)) == [KS1]
    assert sim.roles[KS1] == [Role.PRIMARY]  # never stepped down
    assert sim.coop(KS2).primary == IPv4Address(KS1)
    assert sim.ks_keys(KS1) == sim.ks_keys(KS2) != rogue_keys
    for gm in gms:
        assert gm_keys(gm) == sim.ks_keys(KS1)


# --- a GM PSK holder -------------------------------------------------------------------


def test_gm_psk_holder_at_a_peer_address_never_joins_nor_wins(files: Path) -> None:
    sim = Sim(files)
    build_ks(sim, KS1, ks_text(KS1))
    build_ks(sim, KS2, ks_text(KS2))
    # The rogue takes KS3's address and uses the GMs' PSK as its "COOP key".
    rogue = build_ks(
        sim,
        ROGUE,
        ks_text(ROGUE, priority=255, psk="psk", gm_psk="other.psk", gm_prefix="192.168.0.0/16"),
    )
    sim.run(3 * PERIOD)
    gms = [gm_register(sim, "10.0.0.1", KS1), gm_register(sim, "10.0.0.2", KS2)]
    sim.run(6 * PERIOD)
    rogue_keys = sim.ks_keys(ROGUE)
    assert_real_primary_kept(sim, gms, rogue_keys)
    for a in (KS1, KS2):
        peer = sim.coop(a).peers[IPv4Address(ROGUE)]
        assert peer.ann_received == 0 and peer.priority is None
        assert not any(e.sa.peer_address == IPv4Address(ROGUE) for e in sim.ks(a).sas.values())
        assert sim.ks(a).counters["phase1_failed"] >= 1  # MM5 fails: the KS used its COOP key
    assert rogue.coop is not None and all(p.ann_received == 0 for p in rogue.coop.peers.values())

    # Even a direct try: Main Mode from the peer address with the GM PSK fails.
    gm_p1 = sim.gm("10.0.0.1").phase1
    assert handshake(sim, gm_p1, ROGUE, KS1) is None


def test_an_sa_of_a_gm_never_carries_an_ann(files: Path) -> None:
    sim = Sim(files)
    for a in (KS1, KS2, KS3):
        build_ks(sim, a, ks_text(a))
    sim.run_until(lambda: sim.primaries() == [KS1], 4 * PERIOD)
    gm = gm_register(sim, "10.0.0.9", KS1)
    sim.run(PERIOD)
    # A GM completes phase 1 with its PSK, then announces on that SA: from its own
    # address and with KS2's as the source.
    sa = handshake(sim, gm.phase1, "10.0.0.9", KS1)
    assert sa is not None
    ks1, coop1 = sim.ks(KS1), sim.coop(KS1)
    for src in ("10.0.0.9", KS2):
        ks1.datagram_received(rogue_ann(sim, sa, sim.coop(KS3)), (src, 848), sim.now)
    assert ks1.counters["ann_rejected_not_peer"] == 2 and ks1.counters["ann_rejected"] == 2
    assert coop1.is_primary and sim.ks_keys(KS1) == sim.ks_keys(KS2)
    assert coop1.peers[IPv4Address(KS2)].priority == PRIORITY[KS2]


# --- certificates ------------------------------------------------------------------------


@pytest.fixture
def lab(files: Path) -> dict[str, Path]:
    return generate_test_pki(files / "pki", ["ks1", "ks2", "ks3", "gm1"])


def pki_table(lab: dict[str, Path], name: str) -> dict[str, str]:
    return {
        "ca_file": str(lab["ca.pem"]),
        "cert_file": str(lab[f"{name}.pem"]),
        "key_file": str(lab[f"{name}.key"]),
    }


PIN = {KS1: "CN=ks1", KS2: "CN=ks2", KS3: "CN=ks3"}


def cert_ks(
    sim: Sim,
    address: str,
    lab: dict[str, Path],
    cert: str,
    priority: int | None = None,
    pin: str | None = None,
) -> KeyServerEngine:
    peers = [{"address": a, "identity": pin or PIN[a]} for a in KSS if a != address]
    return build_ks(
        sim, address, ks_text(address, priority=priority, peers=peers, pki=pki_table(lab, cert))
    )


def test_ca_issued_gm_certificate_at_a_peer_address_is_refused(
    files: Path, lab: dict[str, Path]
) -> None:
    sim = Sim(files, now=time.time())  # the certificates are valid from yesterday
    cert_ks(sim, KS1, lab, "ks1")
    cert_ks(sim, KS2, lab, "ks2")
    # A GM's certificate from the same CA, at KS3's address, accepting anyone as a peer.
    rogue = cert_ks(sim, ROGUE, lab, "gm1", priority=255, pin="CN=*")
    sim.run(3 * PERIOD)
    gms = [gm_register(sim, "10.0.0.1", KS1), gm_register(sim, "10.0.0.2", KS2)]
    sim.run(4 * PERIOD)
    ks1, coop1 = sim.ks(KS1), sim.coop(KS1)
    # Phase 1 itself succeeds (the certificate is valid), but it proves no KS identity.
    assert any(e.sa.peer_address == IPv4Address(ROGUE) for e in ks1.sas.values())
    assert ks1.counters["coop_sa_not_ks"] >= 1
    assert coop1.peers[IPv4Address(ROGUE)].ike_status == "Failed (not a KS credential)"
    # The rogue's ANNs on that SA are rejected (reason auth); it never hears ours.
    rejected = ks1.counters["ann_rejected_auth"]
    assert rejected >= 1 and coop1.peers[IPv4Address(ROGUE)].rejected["auth"] == rejected
    assert coop1.peers[IPv4Address(ROGUE)].ann_received == 0
    assert rogue.coop is not None and all(p.ann_received == 0 for p in rogue.coop.peers.values())
    assert_real_primary_kept(sim, gms, sim.ks_keys(ROGUE))
    assert coop1.describe(sim.now)["peers"][1]["rejected"]["auth"] == rejected

    # Logged once per peer per minute, however often it tries.
    log: FieldEvents = ks1.log  # type: ignore[assignment]  # the engine was built with this recorder
    sent = rogue.coop.peers[IPv4Address(KS1)].ann_sent
    sim.run(130.0)
    assert rogue.coop.peers[IPv4Address(KS1)].ann_sent - sent > 100  # it keeps trying
    lines = log.about(ROGUE)
    assert ks1.counters["ann_rejected_auth"] + ks1.counters["coop_sa_not_ks"] > rejected
    assert 2 <= len(lines) <= 3 * 2, lines  # t=0, 60, 120 s: per reason (auth, phase-1 failure)


def test_pinned_ks_certificates_form_the_group(files: Path, lab: dict[str, Path]) -> None:
    sim = Sim(files, now=time.time())
    for a, cert in ((KS1, "ks1"), (KS2, "ks2"), (KS3, "ks3")):
        cert_ks(sim, a, lab, cert)
    sim.run_until(
        lambda: sim.primaries() == [KS1] and all(sim.coop(a).serving for a in (KS1, KS2, KS3)),
        4 * PERIOD,
    )
    gm = gm_register(sim, "10.0.0.3", KS3)
    sim.run(PERIOD)
    assert gm_keys(gm) == sim.ks_keys(KS1) == sim.ks_keys(KS3)
    assert sim.ks(KS1).counters["ann_rejected"] == 0
    assert sim.coop(KS1).describe(sim.now)["peers"][0]["auth"] == "certificate"


def test_identity_patterns_match_subject_and_subject_alt_names(lab: dict[str, Path]) -> None:
    cert = pki.load_certificates(lab["ks2.pem"])[0]

    def pats(*texts: str) -> tuple[IdentityPattern, ...]:
        return tuple(IdentityPattern.parse(t) for t in texts)

    assert matching_pattern(pats("CN=ks2"), cert) == IdentityPattern.parse("CN=ks2")
    assert matching_pattern(pats("CN=ks1", "CN=ks*"), cert) == IdentityPattern.parse("CN=ks*")
    assert matching_pattern(pats("CN=ks1", "DNS:ks2"), cert) is None


# --- the push-signing key fingerprint ------------------------------------------------------


def test_peer_with_another_signing_key_is_not_synced(files: Path) -> None:
    sim = Sim(files)
    build_ks(sim, KS1, ks_text(KS1))
    odd = build_ks(sim, KS2, ks_text(KS2, signing_key="other-rekey.key"))
    sim.run(3 * PERIOD)
    gm = gm_register(sim, "10.0.0.1", KS1)
    sim.run(70.0)
    coop1, coop2 = sim.coop(KS1), sim.coop(KS2)
    p2, p1 = coop1.peers[IPv4Address(KS2)], coop2.peers[IPv4Address(KS1)]
    # Neither adopts the other's keys or members, nor bases an election on it.
    assert p2.ann_received == 0 and p1.ann_received == 0
    assert p2.priority is None and p1.priority is None
    assert sim.ks_keys(KS1) != sim.ks_keys(KS2)
    assert IPv4Address("10.0.0.1") not in sim.group(KS2).members
    assert gm_keys(gm) == sim.ks_keys(KS1)
    assert coop1.is_primary and sim.roles[KS1] == [Role.PRIMARY]
    for ks, peer in ((sim.ks(KS1), p2), (odd, p1)):
        assert ks.counters["ann_rejected_fingerprint"] >= 60
        assert peer.sync_refused and "rekey signing key differs" in next(
            iter(peer.sync_refused.values())
        )
        described = next(
            p for p in ks.coop.describe(sim.now)["peers"] if p["address"] == str(peer.address)
        )  # type: ignore[union-attr]  # this KS is configured with COOP
        assert (
            described["status"] == "Sync refused"
            and "rekey signing key differs" in described["sync"]
        )
        log: FieldEvents = ks.log  # type: ignore[assignment]  # the engine was built with this recorder
        refused = [f for e, f in log.records if e == "coop_sync_refused"]
        assert 1 <= len(refused) <= 2  # t=0 and t=60 s
        assert "sha256:" in refused[0]["reason"]


# --- real daemons on loopback ---------------------------------------------------------------

LO_KS, LO_ROGUE, LO_GM = "127.0.2.1", "127.0.2.3", "127.0.2.10"


def lo_ks_text(
    directory: Path,
    address: str,
    name: str,
    *,
    gm_prefix: str,
    gm_psk: str,
    signing_key: str,
    priority: int,
    peer: str,
    coop_psk: str,
) -> str:
    return configgen.ks_config(
        address,
        control_socket=f"{directory}/{name}.sock",
        state_dir=f"{directory}/{name}-state",
        auth=configgen.psk_auth(gm_prefix, gm_psk),
        groups=[configgen.ks_group(signing_key=signing_key)],
        coop={
            "priority": priority,
            "announce_interval": 0.5,
            "peer": [{"address": peer, "psk_file": coop_psk}],
        },
    )


@pytest.mark.root
def test_daemons_rogue_with_the_gm_psk_at_the_peer_address(tmp_path: Path) -> None:
    write_private(tmp_path / "gm.psk", "loopback-gm-secret\n")
    write_private(tmp_path / "coop.psk", "loopback-ks-pair-secret\n")
    write_private(tmp_path / "unused.psk", "unused\n")
    write_signing_key(tmp_path / "rekey.key")
    write_signing_key(tmp_path / "rogue-rekey.key")
    ks_cfg = tmp_path / "ks.toml"
    ks_cfg.write_text(
        lo_ks_text(
            tmp_path,
            LO_KS,
            "ks",
            gm_prefix="127.0.0.0/8",
            gm_psk="gm.psk",
            signing_key="rekey.key",
            priority=100,
            peer=LO_ROGUE,
            coop_psk="coop.psk",
        )
    )
    # The rogue: KS software at the configured peer's address, priority 255, the GM PSK as its "COOP key".
    rogue_cfg = tmp_path / "rogue.toml"
    rogue_cfg.write_text(
        lo_ks_text(
            tmp_path,
            LO_ROGUE,
            "rogue",
            gm_prefix="10.9.0.0/16",
            gm_psk="unused.psk",
            signing_key="rogue-rekey.key",
            priority=255,
            peer=LO_KS,
            coop_psk="gm.psk",
        )
    )
    gm_cfg = tmp_path / "gm.toml"
    gm_cfg.write_text(
        configgen.gm_config(
            LO_GM,
            control_socket=f"{tmp_path}/gm.sock",
            registration_timeout=5.0,
            auth=configgen.psk_auth("127.0.0.0/8", "gm.psk"),
            groups=[configgen.gm_group([LO_KS])],
        )
    )
    with Daemon("ks", ks_cfg) as ks, Daemon("ks", rogue_cfg) as rogue:
        ks.wait_for(r"COOP_KS_TRANS_TO_PRI: KS 127\.0\.2\.1")
        # Both directions fail at message 5: each side's key for the other's address differs.
        rogue.wait_for(r"PHASE1_FAILED: IKE phase 1 with 127\.0\.2\.1 failed")
        ks.wait_for(r"PHASE1_FAILED: IKE phase 1 with 127\.0\.2\.3 failed")
        with Daemon("gm", gm_cfg) as gm:
            gm.wait_for("GM_REGS_COMPL")
            coop = gdoictl_json(tmp_path / "ks.sock", "show", "crypto", "gdoi", "ks", "coop")
            assert coop["role"] == "Primary"
            peer = coop["peers"][0]
            assert (
                peer["address"] == LO_ROGUE
                and peer["ann_received"] == 0
                and peer["priority"] is None
            )
            ks_group = gdoictl_json(tmp_path / "ks.sock", "show", "crypto", "gdoi")["groups"][0]
            rogue_group = gdoictl_json(tmp_path / "rogue.sock", "show", "crypto", "gdoi")["groups"][
                0
            ]
            gm_group = gdoictl_json(tmp_path / "gm.sock", "show", "crypto", "gdoi")["groups"][0]
            assert gm_group["kek_spi"] == ks_group["kek_spi"] != rogue_group["kek_spi"]
            assert gm_group["tek_spis"] == ks_group["tek_spis"]
            assert not set(gm_group["tek_spis"]) & set(rogue_group["tek_spis"])
        assert "COOP_KS_TRANS_TO_SEC" not in ks.text()
        rogue.proc.send_signal(signal.SIGKILL)
