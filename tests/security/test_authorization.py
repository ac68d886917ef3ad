"""Issue 9 §3: GM authorization per group (IOS ``authorization address ipv4`` / ``identity``).

Attack replayed: a peer that passes phase 1 (it holds the PSK, or any certificate from
the CA) pulls the keys of a group it is not meant to be in.  It must be refused with a
notify, get no keys, and be named in the KS's ``%GDOI-1-UNAUTHORIZED_*`` line.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gdoid import log
from gdoid.config.errors import ConfigError
from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.configgen import gm_config, gm_group, ks_config, ks_group, sa_ipsec
from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.keyserver import show
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.constants import AuthenticationMethod, IdType
from gdoid.protocol.crypto import DhGroup, HashAlgorithm, Phase1Keys
from gdoid.protocol.ike_policy import Phase1Proposal
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.payloads import IdPayload
from gdoid.protocol.pki import load_private_key
from gdoid.protocol.version import CURRENT_VERSION
from tests.pki import generate_test_pki
from tests.procs import (
    Daemon,
    auth_toml,
    gdoictl,
    gdoictl_json,
    gm_toml,
    ks_toml,
    toml_tables,
    write_private,
    write_signing_key,
)

KS = "127.0.0.1"
T0 = float(int(time.time()))  # certificates are checked against it
GROUP = 1234

PSK_AUTH = '[[auth.psk]]\npeer = "127.0.0.0/8"\nkey_file = "psk"\n'


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log.configure_logging("ios", stream=stream, level=logging.DEBUG)
    yield stream
    structlog.reset_defaults()


def ks_text(authorization_toml: str, auth: str = PSK_AUTH) -> str:
    """The KS config; ``authorization_toml``: its ``[group.authorization]`` as TOML text."""
    group = ks_group(
        sas=[sa_ipsec(src="10.1.0.0/16", dst="10.2.0.0/16")],
        **toml_tables(authorization_toml).get("group", {}),
    )
    return ks_config(KS, auth=toml_tables(auth)["auth"], groups=[group])


def make_ks(base: Path, authorization_toml: str, auth: str = PSK_AUTH) -> KeyServerEngine:
    cfg = parse_ks_config(ks_text(authorization_toml, auth), base)
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    groups = {
        g.number: Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, T0)
        for g in cfg.groups
    }
    return KeyServerEngine(p1, groups)


def make_gm(base: Path, address: str, auth: str = PSK_AUTH) -> GroupMemberEngine:
    cfg = parse_gm_config(
        gm_config(address, auth=toml_tables(auth)["auth"], groups=[gm_group([KS])]), base
    )
    return GroupMemberEngine(
        cfg.address, cfg.groups, phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    )


def run(ks: KeyServerEngine, gm: GroupMemberEngine, now: float = T0) -> list[bytes]:
    """Deliver datagrams both ways until quiet; return what the KS sent to the GM."""
    gm_addr = str(gm.address)
    queue = [(d, dst) for d, dst in gm.start(now)]
    from_ks: list[bytes] = []
    while queue:
        data, dst = queue.pop(0)
        if dst[0] == KS:
            out = ks.datagram_received(data, (gm_addr, 848), now)
            from_ks += [d for d, _ in out]
            queue += out
        else:
            queue += gm.datagram_received(data, (KS, 848), now)
    return from_ks


def refused(gm: GroupMemberEngine) -> str:
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.BACKOFF and reg.registrations == 0, reg.state
    assert GROUP not in gm.sadb.groups  # no KEK, no TEK installed
    assert reg.last_failure is not None
    return reg.last_failure


def registered(gm: GroupMemberEngine) -> None:
    assert gm.registrations[GROUP].state == RegState.REGISTERED
    assert GROUP in gm.sadb.groups


# --- in memory: the engines --------------------------------------------------------------


def test_address_outside_the_acl_is_refused_with_a_notify(files: Path, logs: io.StringIO) -> None:
    ks = make_ks(files, '[group.authorization]\naddresses = ["127.0.1.0/24", "127.0.0.9/32"]')
    outsider = make_gm(files, "127.0.0.2")
    run(ks, outsider)
    reason = refused(outsider)
    # The notify reached the GM (phase-1 protected Informational) and is in its failure reason.
    assert "received AUTHENTICATION_FAILED" in reason and "not authorized for group 1234" in reason
    assert IPv4Address("127.0.0.2") not in ks.groups[GROUP].members
    assert ks.counters["unauthorized"] == 1
    text = logs.getvalue()
    assert (
        "%GDOI-1-UNAUTHORIZED_IPADDR: Group GET received registration from unauthorized ip address: 127.0.0.2"
        in text
    )
    assert (
        "%GDOI-4-GM_REG_FAILURE: Registration to KS 127.0.0.1 failed for group GET: KS sent notify "
        "AUTHENTICATION_FAILED: not authorized for group 1234 (received AUTHENTICATION_FAILED)"
        in text
    )

    for addr in ("127.0.1.77", "127.0.0.9"):
        insider = make_gm(files, addr)
        run(ks, insider)
        registered(insider)
    assert set(map(str, ks.groups[GROUP].members)) == {"127.0.1.77", "127.0.0.9"}


def test_certificate_identity_outside_the_list_is_refused(files: Path, logs: io.StringIO) -> None:
    pki = generate_test_pki(files / "pki", ["ks", "gm1", "gm2"])

    def auth(name: str) -> str:
        return f'[auth.pki]\nca_file = "{pki["ca.pem"]}"\ncert_file = "{pki[name + ".pem"]}"\nkey_file = "{pki[name + ".key"]}"\n'

    ks = make_ks(
        files,
        '[group.authorization]\nidentities = ["dn:CN=gm1", "fqdn:gm9.example.com"]',
        auth("ks"),
    )
    gm2 = make_gm(files, "127.0.0.3", auth("gm2"))
    run(ks, gm2)
    reason = refused(gm2)
    assert "received AUTHENTICATION_FAILED" in reason
    assert (
        "%GDOI-1-UNAUTHORIZED_IDENTITY: Group GET received registration from unauthorized identity: CN=gm2"
        in logs.getvalue()
    )
    assert not ks.groups[GROUP].members

    gm1 = make_gm(files, "127.0.0.2", auth("gm1"))
    run(ks, gm1)
    registered(gm1)
    assert [m.identity for m in ks.groups[GROUP].members.values()] == ["CN=gm1"]


def test_address_and_identity_must_both_pass(files: Path, logs: io.StringIO) -> None:
    """Both configured: IOS checks each; the address check comes first."""
    ks = make_ks(
        files, '[group.authorization]\naddresses = ["127.0.0.2/32"]\nidentities = ["key-id:site-7"]'
    )
    gm = make_gm(files, "127.0.0.2")  # right address, but its ID is ID_IPV4_ADDR, not the key-id
    run(ks, gm)
    refused(gm)
    assert "unauthorized identity: 127.0.0.2" in logs.getvalue()
    other = make_gm(files, "127.0.0.5")
    run(ks, other)
    refused(other)
    assert "unauthorized ip address: 127.0.0.5" in logs.getvalue()


def test_refusal_log_lines_are_rate_limited(files: Path, logs: io.StringIO) -> None:
    """An authenticated but unauthorized peer retries at will: the KS logs a burst, then
    one line a second, and says how many it left out; every refusal is counted."""
    ks = make_ks(files, '[group.authorization]\naddresses = ["10.0.0.0/8"]')
    for i in range(25):
        gm = make_gm(files, f"127.0.3.{i + 1}")
        run(ks, gm, T0)
        refused(gm)
    assert ks.counters["unauthorized"] == 25
    assert logs.getvalue().count("UNAUTHORIZED_IPADDR") == 10
    gm = make_gm(files, "127.0.4.1")
    run(ks, gm, T0 + 5)
    assert logs.getvalue().count("UNAUTHORIZED_IPADDR") == 11
    assert re.search(r"unauthorized_log_suppressed count=15", logs.getvalue())


def test_reload_applies_authorization_at_once_without_policy_change(files: Path) -> None:
    ks = make_ks(files, "")
    g = ks.groups[GROUP]
    cfg = parse_ks_config(ks_text('[group.authorization]\naddresses = ["127.0.9.0/24"]'), files)
    assert g.stage_config(cfg.groups[0], None) is False  # nothing a GM must be told
    assert g.config.authorization.addresses and g.pending_config is None
    gm = make_gm(files, "127.0.0.2")
    run(ks, gm)
    refused(gm)


# --- identity matching ---------------------------------------------------------------------


def _sa(peer: str, id_type: IdType, data: bytes, cert: x509.Certificate | None = None) -> IkeSa:
    return IkeSa(
        initiator_cookie=bytes(8),
        responder_cookie=bytes(8),
        is_initiator=False,
        proposal=Phase1Proposal(
            256, HashAlgorithm.SHA2_256, AuthenticationMethod.PRE_SHARED_KEY, DhGroup(19), 86400
        ),
        keys=Phase1Keys(b"", b"", b"", b""),
        cipher_key=b"",
        last_phase1_block=b"",
        peer_address=IPv4Address(peer),
        peer_id=IdPayload(id_type, 0, 0, data),
        peer_version=CURRENT_VERSION,
        established_at=T0,
        expires_at=T0 + 86400,
        peer_certificate=cert,
    )


def _cert(subject: list[tuple[x509.ObjectIdentifier, str]], dns: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, v) for oid, v in subject])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1))
        .not_valid_after(dt.datetime(2040, 1, 1))
    )
    if dns:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return b.sign(key, hashes.SHA256())


def _auth(files: Path, body: str) -> Any:
    text = ks_text("[group.authorization]\n" + body)
    return parse_ks_config(text, files).groups[0].authorization


def test_identity_patterns(files: Path) -> None:
    # New in issue 9: imported here so that on old code each test fails on its own.
    from gdoid.keyserver import authorization

    auth = _auth(
        files,
        'identities = ["dn:CN=gm*, O=Example Corp", "fqdn:*.branch.example.com", "key-id:site-7"]',
    )
    cert_ok = _cert(
        [(NameOID.COMMON_NAME, "GM12"), (NameOID.ORGANIZATION_NAME, "example corp")], []
    )
    cert_wrong_o = _cert([(NameOID.COMMON_NAME, "gm12"), (NameOID.ORGANIZATION_NAME, "Other")], [])
    cert_san = _cert([(NameOID.COMMON_NAME, "router")], ["r1.Branch.example.com"])
    dn_id = IdType.ID_DER_ASN1_DN
    assert authorization.check(auth, "GET", _sa("10.0.0.1", dn_id, b"", cert_ok)) is None
    assert authorization.check(auth, "GET", _sa("10.0.0.1", dn_id, b"", cert_san)) is None
    r = authorization.check(auth, "GET", _sa("10.0.0.1", dn_id, b"", cert_wrong_o))
    assert (
        r is not None and r.kind == "identity" and r.value == "O=Other,CN=gm12"
    )  # RFC 4514 order, as the member list shows it
    # Under a PSK: the ID payload; a certificate peer cannot claim an fqdn / key-id in its ID.
    assert (
        authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_FQDN, b"a.branch.example.com"))
        is None
    )
    assert authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_KEY_ID, b"site-7")) is None
    assert (
        authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_KEY_ID, b"site-77")) is not None
    )
    assert (
        authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_FQDN, b"branch.example.com"))
        is not None
    )
    assert (
        authorization.check(
            auth, "GET", _sa("10.0.0.1", IdType.ID_FQDN, b"x.branch.example.com", cert_wrong_o)
        )
        is not None
    )
    assert (
        authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_KEY_ID, b"site-7", cert_wrong_o))
        is not None
    )


def test_refused_identity_in_the_log_is_bounded_and_printable(files: Path) -> None:
    from gdoid.keyserver import authorization

    auth = _auth(files, 'identities = ["key-id:site-7"]')
    evil = b"\x1b[2J" + b"A" * 60_000 + b"\n%GDOI-5-GM_REGS_COMPL"
    r = authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_FQDN, evil))
    assert r is not None and len(r.value) <= authorization.MAX_LOGGED
    assert r.value.isprintable() and "\x1b" not in r.value


def test_wildcards_cost_linear_time_on_hostile_names(files: Path) -> None:
    """A pattern with many ``*`` against a long peer-chosen name: a backtracking regex
    would take ~len**7 steps here; the matcher must answer at once."""
    from gdoid.keyserver import authorization

    auth = _auth(files, 'identities = ["fqdn:*a*a*a*a*a*a*a*b.example.com"]')
    start = time.perf_counter()
    for n in (900, 1000, 5000):
        assert (
            authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_FQDN, b"a" * n)) is not None
        )
    assert (
        authorization.check(auth, "GET", _sa("10.0.0.1", IdType.ID_FQDN, b"aaaaaaaab.example.com"))
        is None
    )
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        (
            'addresses = ["10.1.0.1/16"]',
            "group[0].authorization.addresses[0]",
            "invalid IPv4 prefix",
        ),
        ("addresses = [10]", "group[0].authorization.addresses[0]", "must be a string"),
        ("addresses = []", "group[0].authorization.addresses", "must not be empty"),
        (
            'identities = ["CN=gm1"]',
            "group[0].authorization.identities[0]",
            "must start with one of",
        ),
        (
            'identities = ["fqdn:gm1", "ip:1.2.3.4"]',
            "group[0].authorization.identities[1]",
            "must start with one of",
        ),
        (
            'identities = ["dn:XX=gm1"]',
            "group[0].authorization.identities[0]",
            "unknown DN attribute",
        ),
        (
            'identities = ["dn:CN"]',
            "group[0].authorization.identities[0]",
            "is not ATTRIBUTE=value",
        ),
        (
            'identities = ["fqdn:gm 1.example.com"]',
            "group[0].authorization.identities[0]",
            "not a host name",
        ),
        ('identities = ["key-id:"]', "group[0].authorization.identities[0]", "non-empty"),
        (
            'identities = ["fqdn:a.b", "fqdn:A.B"]',
            "group[0].authorization.identities[1]",
            "duplicate",
        ),
        ("", "group[0].authorization", "needs addresses or identities"),
        (
            'address = ["10.0.0.0/8"]',
            "group[0].authorization.address",
            "unknown key (did you mean 'addresses'?)",
        ),
    ],
)
def test_config_errors_name_the_key(files: Path, body: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _auth(files, body)
    assert exc.value.key_path == key and message in str(exc.value), str(exc.value)


def test_show_crypto_gdoi_shows_the_authorization(files: Path) -> None:
    ks = make_ks(
        files,
        '[group.authorization]\naddresses = ["10.1.0.0/16", "10.3.0.0/24"]\n'
        'identities = ["dn:CN=gm*,O=Example", "fqdn:gm1.example.com"]',
    )
    text = show.show_gdoi(list(ks.groups.values()), IPv4Address(KS), CURRENT_VERSION, T0)
    assert (
        "    Authorization            : address 10.1.0.0/16, 10.3.0.0/24\n"
        "                               identity dn:CN=gm*,O=Example, fqdn:gm1.example.com\n"
        in text
    )
    data = show.group_data(ks.groups[GROUP], T0)
    assert data["authorization"] == {
        "addresses": ["10.1.0.0/16", "10.3.0.0/24"],
        "identities": ["dn:CN=gm*,O=Example", "fqdn:gm1.example.com"],
    }
    open_ks = make_ks(files, "")
    text = show.show_gdoi(list(open_ks.groups.values()), IPv4Address(KS), CURRENT_VERSION, T0)
    assert "    Authorization            : none (any authenticated peer)\n" in text


# --- real daemons on loopback -------------------------------------------------------------


@pytest.mark.root
def test_daemons_unauthorized_gm_refused_authorized_gm_registers(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "lab-secret-1\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    cfg = ks_toml(tmp_path, auth=auth)
    cfg.write_text(cfg.read_text() + '[group.authorization]\naddresses = ["127.0.0.3/32"]\n')
    with Daemon("ks", cfg) as ks:
        ks.wait_for("ks_started")
        text = gdoictl(tmp_path / "ks.sock", "show", "crypto", "gdoi").stdout
        assert "    Authorization            : address 127.0.0.3/32\n" in text, text
        with Daemon("gm", gm_toml(tmp_path, address="127.0.0.2", name="gm1", auth=auth)) as gm1:
            gm_line = gm1.wait_for(r"%GDOI-4-GM_REG_FAILURE")
            ks_line = ks.wait_for(r"%GDOI-1-UNAUTHORIZED_IPADDR")
            assert ks_line.endswith(
                "%GDOI-1-UNAUTHORIZED_IPADDR: Group GET received registration from unauthorized ip address: 127.0.0.2"
            ), ks_line
            assert gm_line.endswith(
                "%GDOI-4-GM_REG_FAILURE: Registration to KS 127.0.0.1 failed for group GET: KS sent notify "
                "AUTHENTICATION_FAILED: not authorized for group 1234 (received AUTHENTICATION_FAILED)"
            ), gm_line
            status = gdoictl_json(tmp_path / "gm1.sock", "show", "crypto", "gdoi")["groups"][0]
            assert (
                status["registrations"] == 0
                and status["tek_spis"] == []
                and status["kek_spi"] is None
            )
            with Daemon("gm", gm_toml(tmp_path, address="127.0.0.3", name="gm2", auth=auth)) as gm2:
                gm2.wait_for(
                    r"%GDOI-5-GM_REGS_COMPL: Registration to KS 127\.0\.0\.1 complete for group GET"
                )
                members = gdoictl_json(
                    tmp_path / "ks.sock", "show", "crypto", "gdoi", "ks", "members"
                )
                assert [m["address"] for m in members["groups"][0]["members"]] == ["127.0.0.3"]
            assert (
                gdoictl_json(tmp_path / "gm1.sock", "show", "crypto", "gdoi")["groups"][0][
                    "registrations"
                ]
                == 0
            )
    assert "KS_REGS_COMPL" not in "\n".join(line for line in ks.lines if "127.0.0.2" in line)
