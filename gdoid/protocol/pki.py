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
from cryptography.hazmat.primitives import serialization
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
