"""``ks_identities`` patterns (gdoid.protocol.identity) and the GM config that uses them.

A pattern too loose would let a GM certificate pass as a KS: each kind is checked
against certificates that must and must not match.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gdoid.config.errors import ConfigError
from gdoid.config.loader import parse_gm_config
from gdoid.config.model import KsPop
from gdoid.protocol.identity import IdentityPattern, describe_certificate, matching_pattern


def cert(
    cn: str, org: str | None = None, sans: list[x509.GeneralName] | None = None
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org is not None:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(attrs)
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256())


KS1 = cert(
    "ks1.example.com",
    "Example",
    [
        x509.DNSName("ks1.example.com"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
        x509.RFC822Name("ks@example.com"),
    ],
)
GM9 = cert("gm9.example.com", "Example", [x509.DNSName("gm9.example.com")])
EVIL = cert("ks1.example.com", "Evil")


@pytest.mark.parametrize(
    ("pattern", "ks1", "gm9", "evil"),
    [
        ("CN=ks1.example.com", True, False, True),
        ("cn=KS*.EXAMPLE.com", True, False, True),
        ("O=Example, CN=ks*", True, False, False),
        ("dn:O=Example,CN=ks?.example.com", True, False, False),
        ("CN=*.example.com", True, True, True),
        ("dns:ks1.example.com", True, False, False),
        ("dns:*.example.com", True, True, False),
        ("ip:192.0.2.1", True, False, False),
        ("email:ks@example.com", True, False, False),
        ("CN=ks1", False, False, False),  # a component must match the whole value
    ],
)
def test_pattern_matches(pattern: str, ks1: bool, gm9: bool, evil: bool) -> None:
    p = IdentityPattern.parse(pattern)
    assert (p.matches(KS1), p.matches(GM9), p.matches(EVIL)) == (ks1, gm9, evil)


def test_first_matching_pattern_and_description() -> None:
    pats = tuple(IdentityPattern.parse(x) for x in ("dns:ks2.example.com", "ip:192.0.2.1"))
    assert matching_pattern(pats, KS1) == pats[1]
    assert matching_pattern(pats, GM9) is None
    text = describe_certificate(KS1)
    assert "CN=ks1.example.com" in text and "dns:ks1.example.com" in text and "ip:192.0.2.1" in text
    assert len(describe_certificate(KS1, limit=40)) == 40


@pytest.mark.parametrize(
    "bad", ["", "ks1.example.com", "XX=1", "CN=", "ip:ks1", "dns:", "CN=a,,O=b"]
)
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        IdentityPattern.parse(bad)


GM = """
[gm]
address = "10.0.0.2"
[[auth.psk]]
peer = "10.0.0.0/8"
key_file = "psk"
{pki}
[[group]]
name = "GET"
number = 1
servers = ["10.0.0.1"]
{pins}
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    for name in ("psk", "k.pem"):
        (tmp_path / name).write_text("x\n")
        os.chmod(tmp_path / name, 0o600)
    return tmp_path


def gm(base: Path, pins: str, pki: str = "") -> object:
    return parse_gm_config(GM.format(pins=pins, pki=pki), base)


PKI = '[auth.pki]\nca_file = "k.pem"\ncert_file = "k.pem"\nkey_file = "k.pem"\n'


def test_gm_config_pinning_keys(base: Path) -> None:
    pin = "ab" * 32
    cfg = gm(
        base,
        f'ks_identities = ["CN=ks*"]\nks_pop = "certificate"\nrekey_key_sha256 = "{pin.upper()}"',
        PKI,
    )
    [g] = cfg.groups  # type: ignore[attr-defined]  # gm() returns the parsed GM config
    assert g.ks_pop == KsPop.CERTIFICATE and g.ks_identities == (IdentityPattern.parse("CN=ks*"),)
    assert g.rekey_key_sha256 == bytes.fromhex(pin)


@pytest.mark.parametrize(
    ("pins", "pki", "message"),
    [
        ('ks_identities = ["bogus"]', "", "group[0].ks_identities[0]: 'bogus' is not ATTR=value"),
        ('ks_pop = "certificate"', PKI, 'group[0].ks_pop: "certificate" needs ks_identities'),
        (
            'ks_identities = ["CN=ks"]\nks_pop = "certificate"',
            "",
            'group[0].ks_pop: "certificate" needs [auth.pki]',
        ),
        ('ks_pop = "rekey-key"', "", 'group[0].ks_pop: "rekey-key" needs rekey_key_sha256'),
        ('rekey_key_sha256 = "abcd"', "", "group[0].rekey_key_sha256: must be the SHA-256"),
        ('ks_pop = "maybe"', "", "group[0].ks_pop"),
    ],
)
def test_gm_config_pinning_errors(base: Path, pins: str, pki: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        gm(base, pins, pki)
    assert message in str(err.value)
    assert "unknown key" not in str(err.value)


def test_psk_identity_config(base: Path) -> None:
    text = GM.format(pins="", pki="").replace(
        'key_file = "psk"\n',
        'key_file = "psk"\n[[auth.psk]]\npeer = "10.9.0.7/32"\nkey_file = "psk"\nidentity = "GM7.Example.com."\n',
        1,
    )
    cfg = parse_gm_config(text, base)
    assert cfg.auth.psk_identity_for(ipaddress.IPv4Address("10.9.0.7")) == "gm7.example.com"
    assert cfg.auth.psk_identity_for(ipaddress.IPv4Address("10.9.0.8")) is None
    with pytest.raises(ConfigError, match=r"auth\.psk\[1\]\.identity: must be an IPv4 address"):
        parse_gm_config(text.replace("GM7.Example.com.", "not a name!"), base)
