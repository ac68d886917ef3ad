"""A throw-away CA and end-entity certificates for tests (and benchmarks).

Moved out of :mod:`gdoid.protocol.pki`: the daemons never generate keys or
certificates, only the tests do (``gdoid lab`` uses pre-shared keys).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gdoid.protocol.pki import PrivateKey


def key_usage(*, sign_data: bool = False, sign_certs: bool = False) -> x509.KeyUsage:
    """A KeyUsage extension: digitalSignature and/or keyCertSign + cRLSign, nothing else."""
    return x509.KeyUsage(
        digital_signature=sign_data,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


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
            key_usage(sign_data=True, sign_certs=True),
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
                key_usage(sign_data=True),
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
