"""Issue 9 §1: with a PSK, the phase-1 identity is the datagram's source address.

A holder of the group-wide PSK must not claim another GM's ID_IPV4_ADDR (and with
it that GM's identity and sender IDs): the KS refuses with INVALID_ID_INFORMATION
(RFC 2408) and logs PHASE1_FAILED with the reason; a GM refuses a KS whose ID is
not the address it talks to. ``identity`` on an [[auth.psk]] entry is the one
configured exception (a peer behind NAT naming its inside address).
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, psk_auth, sa_ipsec
from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.constants import ExchangeType, NotifyType
from gdoid.protocol.events import Phase1Established, Phase1Failed
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.main_mode_responder import MainModeResponder
from gdoid.protocol.message import decode_plain
from gdoid.protocol.payloads import NotifyPayload
from gdoid.protocol.pki import load_private_key
from tests.ikesim import GM_ADDR, KS_ADDR, T0, config
from tests.procs import toml_tables
from tests.recorder import Events

KS = "127.0.0.1"
REAL_SOURCE = "127.0.0.2"  # where the rogue GM's datagrams really come from
CLAIMED = "127.0.0.3"  # the address (another GM's) it claims in its ID payload


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "psk").write_text("group-wide-secret\n")
    os.chmod(tmp_path / "psk", 0o600)
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "rekey.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(tmp_path / "rekey.key", 0o600)
    return tmp_path


def make_ks(base: Path, extra: str = "") -> KeyServerEngine:
    # ``extra``: more [[auth.psk]] entries, as TOML text.
    auth = psk_auth("127.0.0.0/8", "psk")
    auth["psk"] += toml_tables(extra).get("auth", {}).get("psk", [])
    group = ks_group(sas=[sa_ipsec(src="10.1.0.0/16", dst="10.2.0.0/16")])
    cfg = parse_ks_config(ks_config(KS, auth=auth, groups=[group]), base)
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    groups = {
        g.number: Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, 0.0)
        for g in cfg.groups
    }
    return KeyServerEngine(p1, groups, logger=Events())


def make_gm(base: Path, address: str) -> GroupMemberEngine:
    cfg = parse_gm_config(
        gm_config(address, auth=psk_auth("127.0.0.0/8", "psk"), groups=[gm_group([KS])]), base
    )
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    return GroupMemberEngine(cfg.address, cfg.groups, p1, logger=Events())


def run_from(
    gm: GroupMemberEngine, ks: KeyServerEngine, source: str, now: float = 10.0
) -> list[bytes]:
    """The GM's datagrams reach the KS from ``source``, whatever its config claims."""
    to_gm: list[bytes] = []
    queue = [d for d, _ in gm.start(now)]
    while queue:
        replies = [d for d, _ in ks.datagram_received(queue.pop(0), (source, 848), now)]
        to_gm += replies
        for r in replies:
            queue += [d for d, _ in gm.datagram_received(r, (KS, 848), now)]
    return to_gm


def test_gm_claiming_another_gms_address_is_refused_invalid_id_information(files: Path) -> None:
    ks = make_ks(files)
    rogue = make_gm(files, CLAIMED)  # sends ID_IPV4_ADDR 127.0.0.3 ...
    to_gm = run_from(rogue, ks, REAL_SOURCE)  # ... from 127.0.0.2
    # The KS's last word is an unprotected Informational: NOTIFY INVALID_ID_INFORMATION.
    last = to_gm[-1]
    assert IsakmpHeader.decode(last).exchange_type == ExchangeType.INFORMATIONAL
    notify = decode_plain(last).get(NotifyPayload)
    assert notify is not None and notify.notify_type == NotifyType.INVALID_ID_INFORMATION
    # No phase-1 SA, no member, no keys for the impostor.
    assert not ks.sas and not ks.groups[1234].members
    assert ks.counters["phase1_failed"] == 1 and ks.counters["phase1_established"] == 0
    [line] = ks.log.find("PHASE1_FAILED")  # type: ignore[attr-defined]  # the engine was built with the Events recorder
    assert line["peer"] == REAL_SOURCE
    reason = str(line["reason"])
    assert CLAIMED in reason and REAL_SOURCE in reason and "INVALID_ID_INFORMATION" in reason
    reg = rogue.registrations[1234]
    assert reg.state != RegState.REGISTERED and not rogue.sadb.groups
    assert "received INVALID_ID_INFORMATION" in reg.last_failure
    # The same PSK from the address it names still registers.
    honest = make_gm(files, REAL_SOURCE)
    run_from(honest, ks, REAL_SOURCE)
    assert honest.registrations[1234].state == RegState.REGISTERED
    assert ks.groups[1234].members[IPv4Address(REAL_SOURCE)].identity == REAL_SOURCE


def test_identity_configured_on_the_psk_entry_is_accepted(files: Path) -> None:
    """A GM behind NAT: its ID names its inside address, configured for its outside one."""
    extra = f'[[auth.psk]]\npeer = "{REAL_SOURCE}/32"\nkey_file = "psk"\nidentity = "{CLAIMED}"\n'
    ks = make_ks(files, extra)
    gm = make_gm(files, CLAIMED)
    run_from(gm, ks, REAL_SOURCE)
    assert gm.registrations[1234].state == RegState.REGISTERED
    assert ks.groups[1234].members[IPv4Address(REAL_SOURCE)].identity == CLAIMED
    # The exception is for that entry's peers only: from another address the claim is refused.
    other = make_gm(files, CLAIMED)
    run_from(other, ks, "127.0.0.4")
    assert other.registrations[1234].state != RegState.REGISTERED
    assert "INVALID_ID_INFORMATION" in other.registrations[1234].last_failure


def test_gm_refuses_a_ks_whose_id_is_not_the_address_it_talks_to() -> None:
    """The initiator side: MM6 naming another address than the KS's is refused."""
    init = MainModeInitiator(config(GM_ADDR), KS_ADDR, T0)
    resp = MainModeResponder(config(IPv4Address("10.0.0.77")), GM_ADDR, T0)  # says it is 10.0.0.77
    [m1] = init.start(T0).send
    [m2] = resp.receive(m1, T0).send
    [m3] = init.receive(m2, T0).send
    [m4] = resp.receive(m3, T0).send
    [m5] = init.receive(m4, T0).send
    out = resp.receive(m5, T0)
    assert any(isinstance(e, Phase1Established) for e in out.events)  # the GM's ID is its address
    [m6] = out.send
    result = init.receive(m6, T0)
    [failed] = [e for e in result.events if isinstance(e, Phase1Failed)]
    assert failed.notify == NotifyType.INVALID_ID_INFORMATION and "10.0.0.77" in failed.reason
    assert init.sa is None
