"""Tests for gdoid.protocol.pki: loading, chain validation, CRLs, deny list."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gdoid.protocol import pki
from gdoid.protocol.pki import CertificateValidator, PkiError
from tests.pki import generate_test_pki, key_usage

NOW = dt.datetime.now(dt.UTC)
DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_test_pki(tmp_path_factory.mktemp("pki"), ["ks1", "gm1", "gm2"])


@pytest.fixture(scope="module")
def other_lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_test_pki(tmp_path_factory.mktemp("other"), ["gm1"], "ecdsa256")


def cert(paths: dict[str, Path], name: str) -> x509.Certificate:
    return pki.load_certificates(paths[f"{name}.pem"])[0]


def der(paths: dict[str, Path], name: str) -> bytes:
    return cert(paths, name).public_bytes(DER)


def ca_key(paths: dict[str, Path]) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    return pki.load_private_key(paths["ca.key"])


def validator(paths: dict[str, Path], **kwargs: object) -> CertificateValidator:
    return CertificateValidator(pki.load_certificates(paths["ca.pem"]), **kwargs)  # type: ignore[arg-type]  # keyword arguments forwarded to the validator


def build_crl(
    paths: dict[str, Path], revoked: list[x509.Certificate]
) -> x509.CertificateRevocationList:
    ca = cert(paths, "ca")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW - dt.timedelta(hours=1))
        .next_update(NOW + dt.timedelta(days=7))
    )
    for c in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(c.serial_number)
            .revocation_date(NOW - dt.timedelta(minutes=5))
            .build()
        )
    return builder.sign(ca_key(paths), hashes.SHA256())


def issue(
    paths: dict[str, Path],
    cn: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    ca: bool = False,
    issuer: x509.Certificate | None = None,
    issuer_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate signed by the lab CA (or by ``issuer``)."""
    issuer = issuer or cert(paths, "ca")
    issuer_key = issuer_key or ca_key(paths)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            key_usage(sign_certs=True),
            critical=True,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


# --- generate_test_pki and loading -----------------------------------------


def test_generated_files(lab: dict[str, Path]) -> None:
    for name in ("ca", "ks1", "gm1", "gm2"):
        assert lab[f"{name}.pem"].is_file()
        assert os.stat(lab[f"{name}.key"]).st_mode & 0o777 == 0o600
    gm1 = cert(lab, "gm1")
    assert gm1.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gm1"
    assert gm1.issuer == cert(lab, "ca").subject
    gm1.verify_directly_issued_by(cert(lab, "ca"))
    assert gm1.not_valid_before_utc <= NOW - dt.timedelta(hours=23)
    assert gm1.not_valid_after_utc >= NOW + dt.timedelta(days=3649)
    # The key file holds the certificate's private key.
    key = pki.load_private_key(lab["gm1.key"])
    assert key.public_key() == gm1.public_key()


def test_generate_rejects_bad_names(tmp_path: Path) -> None:
    for bad in ("../x", "ca", "", "a/b"):
        with pytest.raises(ValueError):
            generate_test_pki(tmp_path, [bad])


def test_load_certificates_many(lab: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(lab["ca.pem"].read_bytes() + lab["gm1.pem"].read_bytes())
    certs = pki.load_certificates(bundle)
    assert [c.serial_number for c in certs] == [
        cert(lab, "ca").serial_number,
        cert(lab, "gm1").serial_number,
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    with pytest.raises(PkiError, match="garbage.pem"):
        pki.load_certificates(garbage)
    with pytest.raises(PkiError, match="missing.pem"):
        pki.load_certificates(tmp_path / "missing.pem")


def test_private_key_with_loose_mode_refused(lab: dict[str, Path], tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(lab["gm1.key"].read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(PkiError, match=r"loose\.key.*0644"):
        pki.load_private_key(loose)
    os.chmod(loose, 0o640)
    with pytest.raises(PkiError, match="0640"):
        pki.load_private_key(loose)
    os.chmod(loose, 0o600)
    assert isinstance(pki.load_private_key(loose), rsa.RSAPrivateKey)
    os.chmod(loose, 0o400)
    assert isinstance(pki.load_private_key(loose), rsa.RSAPrivateKey)


def test_private_key_garbage_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    os.chmod(bad, 0o600)
    with pytest.raises(PkiError, match="bad.key"):
        pki.load_private_key(bad)


def test_der_subject_name(lab: dict[str, Path]) -> None:
    gm1 = cert(lab, "gm1")
    name_der = pki.der_subject_name(gm1)
    assert name_der[0] == 0x30  # a SEQUENCE (RDNSequence)
    assert b"gm1" in name_der
    assert name_der == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gm1")]).public_bytes()


# --- validation -------------------------------------------------------------


def test_chained_certificate_accepted(lab: dict[str, Path]) -> None:
    v = validator(lab)
    leaf = v.validate(der(lab, "gm1"), NOW)
    assert leaf == cert(lab, "gm1")
    assert v.validate(der(lab, "ks1"), NOW.replace(tzinfo=None)) == cert(lab, "ks1")


def test_ecdsa_lab_accepted(other_lab: dict[str, Path]) -> None:
    assert validator(other_lab).validate(der(other_lab, "gm1"), NOW) == cert(other_lab, "gm1")


def test_certificate_from_other_ca_rejected(
    lab: dict[str, Path], other_lab: dict[str, Path]
) -> None:
    with pytest.raises(PkiError, match="does not chain"):
        validator(lab).validate(der(other_lab, "gm1"), NOW)


def test_forged_issuer_name_rejected(lab: dict[str, Path]) -> None:
    # Same issuer name as the lab CA, signed by an unrelated key.
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    forged, _ = issue(
        lab, "gm1", NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=1), issuer_key=impostor_key
    )
    with pytest.raises(PkiError, match="does not chain"):
        validator(lab).validate(forged.public_bytes(DER), NOW)


def test_expired_and_not_yet_valid_rejected(lab: dict[str, Path]) -> None:
    expired, _ = issue(lab, "old", NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1))
    with pytest.raises(PkiError, match="expired"):
        validator(lab).validate(expired.public_bytes(DER), NOW)
    future, _ = issue(lab, "new", NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=30))
    with pytest.raises(PkiError, match="not yet valid"):
        validator(lab).validate(future.public_bytes(DER), NOW)
    # And the generated certificates are rejected once their 10 years are over.
    with pytest.raises(PkiError, match="expired"):
        validator(lab).validate(der(lab, "gm1"), NOW + dt.timedelta(days=3660))


def test_revoked_certificate_rejected(lab: dict[str, Path]) -> None:
    crl = build_crl(lab, [cert(lab, "gm2")])
    v = validator(lab, crls=[crl])
    with pytest.raises(PkiError, match="CN=gm2.*revoked"):
        v.validate(der(lab, "gm2"), NOW)
    assert v.validate(der(lab, "gm1"), NOW) == cert(lab, "gm1")
    # The CRL also loads from DER or PEM bytes and from a file.
    v_der = validator(lab, crls=[crl.public_bytes(DER)])
    with pytest.raises(PkiError, match="revoked"):
        v_der.validate(der(lab, "gm2"), NOW)


def test_crl_file_loading(lab: dict[str, Path], tmp_path: Path) -> None:
    crl = build_crl(lab, [cert(lab, "gm1")])
    for encoding, fname in ((serialization.Encoding.PEM, "c.pem"), (DER, "c.der")):
        path = tmp_path / fname
        path.write_bytes(crl.public_bytes(encoding))
        v = validator(lab, crls=[pki.load_crl(path)])
        with pytest.raises(PkiError, match="revoked"):
            v.validate(der(lab, "gm1"), NOW)
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"junk")
    with pytest.raises(PkiError, match="junk.crl"):
        pki.load_crl(junk)


def test_crl_from_other_ca_refused(lab: dict[str, Path], other_lab: dict[str, Path]) -> None:
    crl = build_crl(other_lab, [cert(other_lab, "gm1")])
    with pytest.raises(PkiError, match="not signed by any configured CA"):
        validator(lab, crls=[crl])


def test_denied_common_name_rejected(lab: dict[str, Path]) -> None:
    v = validator(lab, deny=["GM2", "  "])
    with pytest.raises(PkiError, match="CN=gm2.*deny list"):
        v.validate(der(lab, "gm2"), NOW)
    assert v.validate(der(lab, "gm1"), NOW) == cert(lab, "gm1")


def test_denied_serial_rejected(lab: dict[str, Path]) -> None:
    serial = cert(lab, "gm1").serial_number
    hex_serial = f"{serial:x}"
    colon = ":".join(f"{serial:040x}"[i : i + 2] for i in range(0, 40, 2))
    for entry in (hex_serial, hex_serial.upper(), "0x" + hex_serial, colon):
        v = validator(lab, deny=[entry])
        with pytest.raises(PkiError, match="deny list"):
            v.validate(der(lab, "gm1"), NOW)
        assert v.validate(der(lab, "ks1"), NOW) == cert(lab, "ks1")


def make_root(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed root CA without a path-length limit."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            key_usage(sign_certs=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return root, key


def test_intermediate_chain(lab: dict[str, Path]) -> None:
    window = (NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30))
    root, root_key = make_root("root CA")
    sub, sub_key = issue(lab, "sub CA", *window, ca=True, issuer=root, issuer_key=root_key)
    leaf, _ = issue(lab, "gm9", *window, issuer=sub, issuer_key=sub_key)
    v = CertificateValidator([root])
    assert v.validate(leaf.public_bytes(DER), NOW, [sub.public_bytes(DER)]) == leaf
    # Without the intermediate the leaf does not chain.
    with pytest.raises(PkiError, match="does not chain"):
        v.validate(leaf.public_bytes(DER), NOW)
    # Revoking the intermediate at the root revokes everything under it.
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.subject)
        .last_update(NOW - dt.timedelta(hours=1))
        .next_update(NOW + dt.timedelta(days=7))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(sub.serial_number)
            .revocation_date(NOW - dt.timedelta(minutes=5))
            .build()
        )
        .sign(root_key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="CN=sub CA.*revoked"):
        CertificateValidator([root], crls=[crl]).validate(
            leaf.public_bytes(DER), NOW, [sub.public_bytes(DER)]
        )


def test_lab_ca_path_length_enforced(lab: dict[str, Path]) -> None:
    # The lab CA has pathLen 0: a sub-CA under it cannot issue usable certificates.
    window = (NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30))
    sub, sub_key = issue(lab, "sub CA", *window, ca=True)
    leaf, _ = issue(lab, "gm9", *window, issuer=sub, issuer_key=sub_key)
    with pytest.raises(PkiError, match="path length"):
        validator(lab).validate(leaf.public_bytes(DER), NOW, [sub.public_bytes(DER)])


def test_garbage_der_rejected(lab: dict[str, Path]) -> None:
    with pytest.raises(PkiError, match="malformed"):
        validator(lab).validate(b"\x30\x03\x02\x01\x00", NOW)


def test_validator_needs_a_ca() -> None:
    with pytest.raises(PkiError):
        CertificateValidator([])
