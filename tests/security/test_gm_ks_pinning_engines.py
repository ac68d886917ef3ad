"""Issue 9 §2, GM side, with the KS and GM engines: a rogue KS answers first.

A GM lists a rogue KS (a GM-certificate holder from the same CA, or a holder of the
group-wide PSK) before the real one. Unpinned, the GM installs the rogue's keys (the
attack); pinned by ``ks_identities`` or ``ks_pop``, it refuses the rogue before
installing anything, logs why, and registers with the real KS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, sa_ipsec
from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol import crypto
from gdoid.protocol.pki import load_private_key
from tests.procs import toml_tables
from tests.recorder import Events


def new_rekey_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


REAL_KS, ROGUE_KS, GM_ADDR = "127.0.0.1", "127.0.0.9", "127.0.0.2"


def psk_auth() -> str:
    return '[[auth.psk]]\npeer = "127.0.0.0/8"\nkey_file = "psk"\n'


def pki_auth(pki: dict[str, Path], name: str) -> str:
    return f'[auth.pki]\nca_file = "{pki["ca.pem"]}"\ncert_file = "{pki[name + ".pem"]}"\nkey_file = "{pki[name + ".key"]}"\n'


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "psk").write_text("group-wide-secret\n")
    os.chmod(tmp_path / "psk", 0o600)
    for name in ("real.key", "rogue.key"):
        key = new_rekey_key()
        (tmp_path / name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(tmp_path / name, 0o600)
    return tmp_path


def make_ks(base: Path, address: str, auth: str, rekey: str, now: float) -> KeyServerEngine:
    group = ks_group(signing_key=rekey, sas=[sa_ipsec(src="10.1.0.0/16", dst="10.2.0.0/16")])
    cfg = parse_ks_config(ks_config(address, auth=toml_tables(auth)["auth"], groups=[group]), base)
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    groups = {
        g.number: Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, now)
        for g in cfg.groups
    }
    return KeyServerEngine(p1, groups, logger=Events())


def make_gm(base: Path, auth: str, pins: str) -> GroupMemberEngine:
    # ``pins``: keys of the group (ks_identities, ks_pop, rekey_key_sha256) as TOML text.
    group = gm_group(["127.0.0.9", "127.0.0.1"], **toml_tables(pins))
    cfg = parse_gm_config(
        gm_config("127.0.0.2", auth=toml_tables(auth)["auth"], groups=[group]), base
    )
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    return GroupMemberEngine(cfg.address, cfg.groups, p1, logger=Events())


def run(gm: GroupMemberEngine, kss: dict[str, KeyServerEngine], now: float) -> None:
    queue = [(d, GM_ADDR, dst) for d, dst in gm.start(now)]
    while queue:
        data, src, dst = queue.pop(0)
        if dst[0] == GM_ADDR:
            queue += [(d, GM_ADDR, to) for d, to in gm.datagram_received(data, (src, 848), now)]
        elif dst[0] in kss:
            queue += [
                (d, dst[0], to) for d, to in kss[dst[0]].datagram_received(data, (src, 848), now)
            ]


def installed_from(gm: GroupMemberEngine, ks: KeyServerEngine) -> bool:
    sas = gm.sadb.groups.get(1234)
    return (
        sas is not None
        and bool(sas.teks)
        and set(sas.teks) <= {t.spi for t in ks.groups[1234].teks}
    )


def test_engine_gm_refuses_gm_certificate_as_ks_and_registers_with_the_real_ks(
    files: Path, pki: dict[str, Path]
) -> None:
    now = float(int(time.time()))
    real = make_ks(files, REAL_KS, pki_auth(pki, "ks"), "real.key", now)
    rogue = make_ks(
        files, ROGUE_KS, pki_auth(pki, "gm9"), "rogue.key", now
    )  # a GM's certificate, same CA

    # Without pinning the rogue's keys are installed: this is the attack.
    naive = make_gm(files, pki_auth(pki, "gm1"), "")
    run(naive, {REAL_KS: real, ROGUE_KS: rogue}, now)
    assert naive.registrations[1234].registered_ks == IPv4Address(ROGUE_KS)
    assert installed_from(naive, rogue)

    rogue = make_ks(files, ROGUE_KS, pki_auth(pki, "gm9"), "rogue.key", now)  # a fresh one
    gm = make_gm(files, pki_auth(pki, "gm1"), 'ks_identities = ["CN=ks", "CN=ks2"]')
    run(gm, {REAL_KS: real, ROGUE_KS: rogue}, now)
    reg = gm.registrations[1234]
    assert reg.state == RegState.REGISTERED and reg.registered_ks == IPv4Address(REAL_KS)
    assert installed_from(gm, real) and not installed_from(gm, rogue)
    assert reg.failures == 1
    [failure, *_] = gm.log.find("GM_REG_FAILURE")  # type: ignore[attr-defined]  # the engine was built with the Events recorder
    assert (
        failure["ks"] == ROGUE_KS
        and "CN=gm9" in str(failure["reason"])
        and "ks_identities" in str(failure["reason"])
    )
    assert not rogue.groups[1234].members  # refused right after phase 1: no pull


def test_engine_pop_rekey_key_refuses_psk_holder_as_ks(files: Path) -> None:
    now = float(int(time.time()))
    real = make_ks(files, REAL_KS, psk_auth(), "real.key", now)
    rogue = make_ks(files, ROGUE_KS, psk_auth(), "rogue.key", now)  # holds the group-wide PSK
    naive = make_gm(files, psk_auth(), "")
    run(naive, {REAL_KS: real, ROGUE_KS: rogue}, now)
    assert installed_from(naive, rogue)  # the attack, unpinned

    pin = hashlib.sha256(crypto.public_key_der(real.groups[1234].signing_key)).hexdigest()
    gm = make_gm(files, psk_auth(), f'ks_pop = "rekey-key"\nrekey_key_sha256 = "{pin}"')
    run(gm, {REAL_KS: real, ROGUE_KS: rogue}, now)
    reg = gm.registrations[1234]
    assert reg.registered_ks == IPv4Address(REAL_KS) and installed_from(gm, real)
    assert not installed_from(gm, rogue) and reg.failures == 1
    assert "rekey_key_sha256" in reg.last_failure or "rekey_key_sha256" in str(
        gm.log.find("GM_REG_FAILURE")[0]["reason"]
    )  # type: ignore[attr-defined]  # the engine was built with the Events recorder
    assert gm.log.find("ks_role_verified")  # type: ignore[attr-defined]  # the engine was built with the Events recorder


def test_engine_psk_phase1_with_ks_identities_needs_certificate_pop(
    files: Path, pki: dict[str, Path]
) -> None:
    """ks_identities with a PSK phase 1: the KS must show a pinned certificate in message 4."""
    now = float(int(time.time()))
    real = make_ks(files, REAL_KS, psk_auth() + pki_auth(pki, "ks"), "real.key", now)
    rogue = make_ks(files, ROGUE_KS, psk_auth(), "rogue.key", now)  # PSK only, no KS certificate
    # The GM authenticates phase 1 by PSK only (no certificate of its own) but checks the KS's
    # certificate against the CA: [auth.pki] here is the KS's CA and a GM certificate.
    gm = make_gm(
        files,
        psk_auth() + pki_auth(pki, "gm1"),
        'ks_identities = ["CN=ks"]\nks_pop = "certificate"',
    )
    run(gm, {REAL_KS: real, ROGUE_KS: rogue}, now)
    reg = gm.registrations[1234]
    assert reg.registered_ks == IPv4Address(REAL_KS) and installed_from(gm, real)
    assert not installed_from(gm, rogue)
    [proof] = gm.log.find("ks_role_verified")  # type: ignore[attr-defined]  # the engine was built with the Events recorder
    assert "CN=ks" in str(proof["proof"])


def test_pinned_rekey_key_refuses_a_push_that_changes_it(files: Path) -> None:
    now = float(int(time.time()))
    real = make_ks(files, REAL_KS, psk_auth(), "real.key", now)
    pin = hashlib.sha256(crypto.public_key_der(real.groups[1234].signing_key)).hexdigest()
    gm = make_gm(files, psk_auth(), f'rekey_key_sha256 = "{pin}"')
    gm.registrations[1234].group = dataclasses.replace(
        gm.registrations[1234].group, servers=(IPv4Address(REAL_KS),)
    )
    run(gm, {REAL_KS: real}, now)
    assert installed_from(gm, real)
    old_teks = set(gm.sadb.groups[1234].teks)
    group = real.groups[1234]
    assert group.stage_config(
        group.config, load_private_key(files / "rogue.key")
    )  # a new rekey key
    queue = real.rekey(group, now + 1)
    for data, _ in queue:
        gm.datagram_received(data, (REAL_KS, 848), now + 1)
    assert set(gm.sadb.groups[1234].teks) == old_teks  # the new keys were not installed
    assert gm.log.find("GM_REKEY_REJECTED")  # type: ignore[attr-defined]  # the engine was built with the Events recorder
