"""X.509 handling for IKE signature authentication (no network access).

Chain building uses ``cryptography.x509.verification`` with the web-PKI rules
for CA certificates but no extension requirements on the end-entity: IKE
certificates often carry no SAN and an IPsec (or no) EKU, which the TLS-shaped
default client/server policies would refuse. Revocation is by locally loaded
CRLs only, plus an operator deny list.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

__all__ = [
    "CertificateValidator",
    "PkiError",
    "PrivateKey",
    "der_subject_name",
    "generate_test_pki",
    "load_certificates",
    "load_crl",
    "load_private_key",
]

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class PkiError(Exception):
    """A certificate, CRL or key could not be loaded or did not validate."""


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """All certificates of a PEM file (one or many)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read certificates: {exc.strerror}") from exc
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"{path}: no valid PEM certificate: {exc}") from exc


def load_private_key(path: str | os.PathLike[str], password: bytes | None = None) -> PrivateKey:
    """Load an RSA or EC private key (PEM or DER) kept with owner-only permissions."""
    p = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(p).st_mode)
    except OSError as exc:
        raise PkiError(f"{p}: cannot stat private key: {exc.strerror}") from exc
    # Secrets must not be readable by anyone but the owner (like ssh does).
    if mode & 0o077:
        raise PkiError(
            f"{p}: private key file mode is {mode:04o}; it must not be accessible "
            f"by group or others (chmod 600 {p})"
        )
    data = p.read_bytes()
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password)
        else:
            key = serialization.load_der_private_key(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{p}: cannot load private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PkiError(f"{p}: unsupported private key type {type(key).__name__}")
    return key


def load_crl(path: str | os.PathLike[str]) -> x509.CertificateRevocationList:
    """A CRL file, PEM or DER."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read CRL: {exc.strerror}") from exc
    try:
        return _parse_crl(data)
    except PkiError as exc:
        raise PkiError(f"{path}: {exc}") from exc


def _parse_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise PkiError(f"cannot parse CRL: {exc}") from exc


def der_subject_name(cert: x509.Certificate) -> bytes:
    """DER of the subject Name: the ID_DER_ASN1_DN identification data."""
    return cert.subject.public_bytes()


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _describe(cert: x509.Certificate) -> str:
    cn = _common_name(cert)
    label = f"CN={cn}" if cn is not None else cert.subject.rfc4514_string()
    return f"{label} (serial {cert.serial_number:x})"


_HEX_RE = re.compile(r"[0-9a-f]+")
# CA key types a CRL signature can be checked with (what is_signature_valid takes in
# every cryptography release we support).
_CRL_SIGNER_KEYS = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
    dsa.DSAPublicKey,
)


def _serial_of_entry(entry: str) -> int | None:
    """A deny entry read as a hex serial ("0x1f", "01:ab:..", "1fab"), if it is one."""
    text = entry.lower().removeprefix("0x").replace(":", "")
    return int(text, 16) if _HEX_RE.fullmatch(text) else None


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


class CertificateValidator:
    """Validate peer certificates against fixed CAs, CRLs and a deny list.

    Immutable after construction: to apply a new CRL or deny list, build a new
    validator and swap it in.

    ``deny`` entries match a certificate whose subject CN equals the entry
    (case-insensitively) or whose serial number equals the entry read as hex
    (colons and a ``0x`` prefix allowed).
    """

    def __init__(
        self,
        cas: Sequence[x509.Certificate],
        crls: Sequence[x509.CertificateRevocationList | bytes] = (),
        deny: Iterable[str] = (),
    ) -> None:
        if not cas:
            raise PkiError("no CA certificate configured")
        self._cas = tuple(cas)
        self._store = Store(list(self._cas))
        self._crls = tuple(self._authenticate_crl(c) for c in crls)
        entries = [e.strip() for e in deny if e.strip()]
        self._deny_cns = frozenset(e.casefold() for e in entries)
        self._deny_serials = frozenset(
            s for s in (_serial_of_entry(e) for e in entries) if s is not None
        )

    def _authenticate_crl(
        self, crl: x509.CertificateRevocationList | bytes
    ) -> x509.CertificateRevocationList:
        if isinstance(crl, bytes):
            crl = _parse_crl(crl)
        # An unauthenticated CRL is a configuration error, not something to skip.
        for ca in self._cas:
            key = ca.public_key()
            if not isinstance(key, _CRL_SIGNER_KEYS):
                continue  # a key-agreement (or post-quantum) CA key signs no CRL we accept
            if ca.subject == crl.issuer and crl.is_signature_valid(key):
                return crl
        raise PkiError(
            f"CRL issued by {crl.issuer.rfc4514_string()} is not signed by any configured CA"
        )

    def validate(
        self,
        leaf_der: bytes,
        now: dt.datetime,
        intermediates: Sequence[bytes] = (),
    ) -> x509.Certificate:
        """Return the parsed leaf if it chains to a CA and is neither revoked nor denied."""
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
            untrusted = [x509.load_der_x509_certificate(d) for d in intermediates]
        except ValueError as exc:
            raise PkiError(f"malformed certificate: {exc}") from exc

        if now.tzinfo is not None:
            now = now.astimezone(dt.UTC).replace(tzinfo=None)
        # Check validity first: the verifier's own message for it is vaguer.
        if not leaf.not_valid_before_utc.replace(tzinfo=None) <= now:
            raise PkiError(f"certificate {_describe(leaf)} is not yet valid")
        if not now <= leaf.not_valid_after_utc.replace(tzinfo=None):
            raise PkiError(f"certificate {_describe(leaf)} has expired")

        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        try:
            chain = verifier.verify(leaf, untrusted).chain
        except VerificationError as exc:
            raise PkiError(
                f"certificate {_describe(leaf)} does not chain to a trusted CA: {exc}"
            ) from exc

        self._check_denied(leaf)
        # Every certificate below the trust anchor must be unrevoked.
        for cert in chain[:-1]:
            self._check_revoked(cert)
        return leaf

    def _check_denied(self, cert: x509.Certificate) -> None:
        cn = _common_name(cert)
        if cn is not None and cn.casefold() in self._deny_cns:
            raise PkiError(f"certificate {_describe(cert)} is on the deny list (CN)")
        if cert.serial_number in self._deny_serials:
            raise PkiError(f"certificate {_describe(cert)} is on the deny list (serial)")

    def _check_revoked(self, cert: x509.Certificate) -> None:
        for crl in self._crls:
            if crl.issuer != cert.issuer:
                continue
            revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if revoked is not None:
                raise PkiError(
                    f"certificate {_describe(cert)} is revoked "
                    f"(since {revoked.revocation_date_utc.isoformat()})"
                )


# --------------------------------------------------------------------------
# Lab / test PKI
# --------------------------------------------------------------------------

_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _new_key(key_type: str) -> PrivateKey:
    match key_type:
        case "rsa2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "rsa3072":
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)
        case "ecdsa256" | "p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "ecdsa384" | "p384":
            return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown key type {key_type!r} (rsa2048, rsa3072, ecdsa256, ecdsa384)")


def _write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: no window where the key is world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def generate_test_pki(
    directory: Path, names: list[str], key_type: str = "rsa2048"
) -> dict[str, Path]:
    """Write a lab CA and one end-entity certificate per name.

    Files: ``ca.pem``, ``ca.key`` (so tests can sign CRLs), ``NAME.pem`` and
    ``NAME.key`` (mode 0600). Returns ``{file name: path}`` for all of them,
    e.g. ``result["gm1.pem"]``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not _SAFE_NAME_RE.fullmatch(name) or name == "ca":
            raise ValueError(f"unusable certificate name {name!r}")

    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(days=1)
    not_after = now + dt.timedelta(days=3650)

    ca_key = _new_key(key_type)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gdoid test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths: dict[str, Path] = {"ca.pem": directory / "ca.pem", "ca.key": directory / "ca.key"}
    paths["ca.pem"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca.key"], ca_key)

    for name in names:
        key = _new_key(key_type)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        paths[f"{name}.pem"] = cert_path
        paths[f"{name}.key"] = key_path
    return paths
