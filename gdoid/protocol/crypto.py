"""IKEv1 / GDOI cryptographic primitives (sans-I/O).

Everything here is a pure function of its inputs (plus the OS random source
for key generation and RSA blinding). Only the ``cryptography`` library is used.

Choices worth knowing (see wire.md sections 2 and 5):

- Phase-1 RSA signatures follow RFC 2409 as deployed by strongSwan and Cisco:
  EMSA-PKCS1-v1_5 type-1 padding around the *bare* HASH_I/HASH_R value, with
  no DigestInfo.
- Rekey (GROUPKEY-PUSH) signatures use the standard schemes: RSA PKCS#1 v1.5
  *with* DigestInfo, and DER-encoded ECDSA (r, s).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import warnings
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dh, ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.utils import CryptographyDeprecationWarning

from gdoid.protocol.errors import CryptoError

__all__ = [
    "AES_BLOCK",
    "DhGroup",
    "DhKeyPair",
    "HashAlgorithm",
    "Phase1Keys",
    "PrivateKey",
    "PublicKey",
    "SigAlgorithm",
    "SigHash",
    "aes_cbc_decrypt",
    "aes_cbc_encrypt",
    "constant_time_equal",
    "derive_phase1_keys",
    "digest_size",
    "encryption_key",
    "hash_digest",
    "ike_rsa_sign",
    "ike_rsa_verify",
    "kek_decrypt",
    "kek_encrypt",
    "load_public_key_der",
    "pad_zero",
    "phase1_iv",
    "phase2_iv",
    "prf",
    "public_key_der",
    "rekey_sign",
    "rekey_signature_length",
    "rekey_verify",
    "sig_algorithm_of",
    "skeyid_psk",
    "skeyid_sig",
]

AES_BLOCK = 16

# IKEv1 DH group 14 (MODP-2048) is what GET VPN deployments use; cryptography 50
# deprecates finite-field DH. The warning must not reach a daemon's log stream
# (it would break JSON logs); pyproject pins a cryptography that still has FFDH.
warnings.filterwarnings(
    "ignore", message="Diffie-Hellman over finite fields", category=CryptographyDeprecationWarning
)

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


# --------------------------------------------------------------------------
# Diffie-Hellman
# --------------------------------------------------------------------------


class DhGroup(IntEnum):
    """IKE Diffie-Hellman group numbers (IANA "Group Description")."""

    MODP_2048 = 14
    ECP_256 = 19
    ECP_384 = 20


# RFC 3526 section 3: 2048-bit MODP group, generator 2.
_MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1"
    "29024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245"
    "E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3D"
    "C2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D"
    "670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9"
    "DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
_MODP_2048_LEN = 256
# Fixed, public parameters: built once, never generated.
_MODP_2048_PARAMS = dh.DHParameterNumbers(_MODP_2048_P, 2).parameters()

_EC_CURVES: dict[DhGroup, ec.EllipticCurve] = {
    DhGroup.ECP_256: ec.SECP256R1(),
    DhGroup.ECP_384: ec.SECP384R1(),
}
_EC_COORD_LEN: dict[DhGroup, int] = {DhGroup.ECP_256: 32, DhGroup.ECP_384: 48}


def _legendre(a: int, p: int) -> int:
    """The Legendre symbol (a/p) for an odd prime p, by the binary Jacobi algorithm.

    For the safe prime p = 2q+1 it is 1 exactly when a^q = 1 mod p (Euler's
    criterion), i.e. when a is in the prime-order-q subgroup, but costs
    ~0.3 ms in Python where ``pow(a, q, p)`` costs ~17 ms.
    """
    a %= p
    n = p
    result = 1
    while a:
        zeros = (a & -a).bit_length() - 1
        a >>= zeros
        if zeros & 1 and n & 7 in (3, 5):  # (2/n) = -1 for n = 3, 5 mod 8
            result = -result
        if a & n & 3 == 3:  # quadratic reciprocity
            result = -result
        a, n = n % a, a
    return result if n == 1 else 0


def _ke_length(group: DhGroup) -> int:
    if group is DhGroup.MODP_2048:
        return _MODP_2048_LEN
    return 2 * _EC_COORD_LEN[group]


class DhKeyPair:
    """An ephemeral DH key for one IKE exchange; use :meth:`generate`."""

    def __init__(
        self, group: DhGroup, private_key: dh.DHPrivateKey | ec.EllipticCurvePrivateKey
    ) -> None:
        self.group = group
        self._private = private_key
        self._public = self._encode_public()

    def __repr__(self) -> str:
        return f"DhKeyPair({self.group.name})"  # never the private value

    @classmethod
    def generate(cls, group: DhGroup) -> DhKeyPair:
        group = DhGroup(group)
        if group is DhGroup.MODP_2048:
            return cls(group, _MODP_2048_PARAMS.generate_private_key())
        return cls(group, ec.generate_private_key(_EC_CURVES[group]))

    def _encode_public(self) -> bytes:
        if isinstance(self._private, dh.DHPrivateKey):
            y = self._private.public_key().public_numbers().y
            return y.to_bytes(_MODP_2048_LEN, "big")
        # RFC 5903: x || y without the SEC1 0x04 prefix.
        point = self._private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return point[1:]

    @property
    def public_bytes(self) -> bytes:
        """KE payload data for this key."""
        return self._public

    def shared_secret(self, peer_public: bytes) -> bytes:
        """g^xy as IKEv1 uses it; raises :class:`CryptoError` on a bad peer value."""
        expected = _ke_length(self.group)
        if len(peer_public) != expected:
            raise CryptoError(
                f"DH group {self.group.value}: peer KE data is {len(peer_public)} octets, "
                f"expected {expected}"
            )
        if isinstance(self._private, dh.DHPrivateKey):
            return self._modp_shared(peer_public)
        return self._ecp_shared(peer_public)

    def _modp_shared(self, peer_public: bytes) -> bytes:
        assert isinstance(self._private, dh.DHPrivateKey)
        y = int.from_bytes(peer_public, "big")
        p = _MODP_2048_P
        if y >= p:
            raise CryptoError("DH group 14: peer public value is not below the prime")
        if y in (0, 1, p - 1):
            raise CryptoError(f"DH group 14: degenerate peer public value ({'p-1' if y else y})")
        # Every honest g^x lies in the prime-order-q subgroup (2 is a QR mod p):
        # refuse values that would leak bits of our exponent.
        if _legendre(y, p) != 1:
            raise CryptoError("DH group 14: peer public value is not in the prime-order subgroup")
        try:
            peer = dh.DHPublicNumbers(y, _MODP_2048_PARAMS.parameter_numbers()).public_key()
            secret = self._private.exchange(peer)
        except ValueError as exc:
            raise CryptoError(f"DH group 14: key exchange failed: {exc}") from exc
        # IKE uses g^xy at the full modulus length.
        return secret.rjust(_MODP_2048_LEN, b"\x00")

    def _ecp_shared(self, peer_public: bytes) -> bytes:
        assert isinstance(self._private, ec.EllipticCurvePrivateKey)
        curve = _EC_CURVES[self.group]
        try:
            # from_encoded_point checks the point is on the curve.
            peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + peer_public)
            secret = self._private.exchange(ec.ECDH(), peer)
        except ValueError as exc:
            raise CryptoError(
                f"DH group {self.group.value}: peer KE data is not a point on {curve.name}"
            ) from exc
        # RFC 5903 section 7: the shared secret is the x coordinate only.
        return secret.rjust(_EC_COORD_LEN[self.group], b"\x00")


# --------------------------------------------------------------------------
# Hashes and PRF
# --------------------------------------------------------------------------


class HashAlgorithm(IntEnum):
    """IKE phase-1 "Hash Algorithm" attribute (class 2) values."""

    SHA = 2
    SHA2_256 = 4
    SHA2_384 = 5
    SHA2_512 = 6


_HASHLIB_NAMES: dict[HashAlgorithm, str] = {
    HashAlgorithm.SHA: "sha1",
    HashAlgorithm.SHA2_256: "sha256",
    HashAlgorithm.SHA2_384: "sha384",
    HashAlgorithm.SHA2_512: "sha512",
}


def _hashlib_name(alg: HashAlgorithm) -> str:
    try:
        return _HASHLIB_NAMES[HashAlgorithm(alg)]
    except ValueError as exc:
        raise CryptoError(f"unsupported IKE hash algorithm {alg}") from exc


def hash_digest(alg: HashAlgorithm, data: bytes) -> bytes:
    return hashlib.new(_hashlib_name(alg), data).digest()


def digest_size(alg: HashAlgorithm) -> int:
    return hashlib.new(_hashlib_name(alg)).digest_size


def prf(alg: HashAlgorithm, key: bytes, data: bytes) -> bytes:
    """IKEv1 negotiated PRF: HMAC with the phase-1 hash."""
    return hmac.new(key, data, _hashlib_name(alg)).digest()


# --------------------------------------------------------------------------
# Phase-1 key derivation (RFC 2409 section 5)
# --------------------------------------------------------------------------


def skeyid_psk(alg: HashAlgorithm, psk: bytes, ni_b: bytes, nr_b: bytes) -> bytes:
    """SKEYID = prf(pre-shared-key, Ni_b | Nr_b)."""
    return prf(alg, psk, ni_b + nr_b)


def skeyid_sig(alg: HashAlgorithm, ni_b: bytes, nr_b: bytes, gxy: bytes) -> bytes:
    """SKEYID = prf(Ni_b | Nr_b, g^xy) for signature authentication."""
    return prf(alg, ni_b + nr_b, gxy)


@dataclass(frozen=True)
class Phase1Keys:
    skeyid: bytes
    skeyid_d: bytes
    skeyid_a: bytes
    skeyid_e: bytes

    def __repr__(self) -> str:
        # Keep key material out of logs and tracebacks.
        return "Phase1Keys(<redacted>)"


def derive_phase1_keys(
    alg: HashAlgorithm, skeyid: bytes, gxy: bytes, cky_i: bytes, cky_r: bytes
) -> Phase1Keys:
    if len(cky_i) != 8 or len(cky_r) != 8:
        raise CryptoError("ISAKMP cookies must be 8 octets each")
    tail = gxy + cky_i + cky_r
    skeyid_d = prf(alg, skeyid, tail + b"\x00")
    skeyid_a = prf(alg, skeyid, skeyid_d + tail + b"\x01")
    skeyid_e = prf(alg, skeyid, skeyid_a + tail + b"\x02")
    return Phase1Keys(skeyid=skeyid, skeyid_d=skeyid_d, skeyid_a=skeyid_a, skeyid_e=skeyid_e)


def encryption_key(alg: HashAlgorithm, skeyid_e: bytes, key_len: int) -> bytes:
    """Cipher key from SKEYID_e: truncate, or expand per RFC 2409 appendix B."""
    if key_len <= 0:
        raise ValueError(f"key length must be positive, got {key_len}")
    if len(skeyid_e) >= key_len:
        return skeyid_e[:key_len]
    blocks = [prf(alg, skeyid_e, b"\x00")]
    while sum(map(len, blocks)) < key_len:
        blocks.append(prf(alg, skeyid_e, blocks[-1]))
    return b"".join(blocks)[:key_len]


def phase1_iv(alg: HashAlgorithm, gxi: bytes, gxr: bytes) -> bytes:
    return hash_digest(alg, gxi + gxr)[:AES_BLOCK]


def phase2_iv(alg: HashAlgorithm, last_phase1_block: bytes, message_id: int) -> bytes:
    if not 0 <= message_id <= 0xFFFFFFFF:
        raise ValueError(f"message ID {message_id} does not fit in 4 octets")
    return hash_digest(alg, last_phase1_block + message_id.to_bytes(4, "big"))[:AES_BLOCK]


# --------------------------------------------------------------------------
# AES-CBC
# --------------------------------------------------------------------------


def pad_zero(data: bytes, block: int = AES_BLOCK) -> bytes:
    """ISAKMP pads encrypted bodies with zero octets up to the block size."""
    return data + b"\x00" * (-len(data) % block)


def aes_cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    if len(plaintext) % AES_BLOCK:
        raise ValueError(f"plaintext length {len(plaintext)} is not a multiple of {AES_BLOCK}")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(plaintext) + encryptor.finalize()


def aes_cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    if not ciphertext or len(ciphertext) % AES_BLOCK:
        raise CryptoError(
            f"ciphertext length {len(ciphertext)} is not a positive multiple of {AES_BLOCK}"
        )
    try:
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    except ValueError as exc:  # bad key or IV size
        raise CryptoError(f"AES-CBC: {exc}") from exc
    return decryptor.update(ciphertext) + decryptor.finalize()


def kek_encrypt(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """Encrypt a GROUPKEY-PUSH body under the KEK (zero padding, AES-CBC)."""
    return aes_cbc_encrypt(key, iv, pad_zero(plaintext))


def kek_decrypt(key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    return aes_cbc_decrypt(key, iv, ciphertext)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --------------------------------------------------------------------------
# IKEv1 RSA signatures (no DigestInfo)
# --------------------------------------------------------------------------


def _emsa_pkcs1_type1(hash_value: bytes, k: int) -> bytes:
    """00 01 FF..FF 00 || hash_value, k octets (RFC 8017 9.2 without DigestInfo)."""
    if len(hash_value) > k - 11:
        raise CryptoError(f"hash of {len(hash_value)} octets is too long for a {k}-octet RSA key")
    return b"\x00\x01" + b"\xff" * (k - 3 - len(hash_value)) + b"\x00" + hash_value


def ike_rsa_sign(private_key: rsa.RSAPrivateKey, hash_value: bytes) -> bytes:
    """RFC 2409 RSA signature over a bare HASH_I/HASH_R.

    ``cryptography`` has no public API for PKCS#1 v1.5 without DigestInfo, so
    the private operation is done here: CRT for speed, base blinding so the
    timing of the modexp does not depend on the message.
    """
    priv = private_key.private_numbers()
    pub = priv.public_numbers
    n, e = pub.n, pub.e
    k = (n.bit_length() + 7) // 8
    m = int.from_bytes(_emsa_pkcs1_type1(hash_value, k), "big")

    while True:
        r = secrets.randbelow(n - 2) + 2
        try:
            r_inv = pow(r, -1, n)
        except ValueError:  # gcd(r, n) != 1: astronomically unlikely, draw again
            continue
        break
    blinded = (m * pow(r, e, n)) % n

    # CRT: s = s_q + q * (qinv * (s_p - s_q) mod p), exponents dp/dq.
    s_p = pow(blinded, priv.dmp1, priv.p)
    s_q = pow(blinded, priv.dmq1, priv.q)
    h = (priv.iqmp * (s_p - s_q)) % priv.p
    s = ((s_q + priv.q * h) * r_inv) % n

    # Fault check: a CRT glitch would otherwise leak a factor of n.
    if pow(s, e, n) != m:
        raise CryptoError("RSA signature self-check failed")
    return s.to_bytes(k, "big")


def ike_rsa_verify(public_key: rsa.RSAPublicKey, hash_value: bytes, signature: bytes) -> bool:
    """Check an RFC 2409 RSA signature; False on any failure, never raises."""
    try:
        recovered = public_key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return constant_time_equal(recovered, hash_value)


# --------------------------------------------------------------------------
# Rekey (GROUPKEY-PUSH) signatures
# --------------------------------------------------------------------------


class SigHash(IntEnum):
    """RFC 6407 SIG_HASH_ALGORITHM values."""

    SHA256 = 3
    SHA384 = 4
    SHA512 = 5


class SigAlgorithm(IntEnum):
    """RFC 6407 SIG_ALGORITHM values (wire.md section 4)."""

    RSA = 1
    ECDSA_256 = 4
    ECDSA_384 = 5


_SIG_HASHES: dict[SigHash, type[hashes.HashAlgorithm]] = {
    SigHash.SHA256: hashes.SHA256,
    SigHash.SHA384: hashes.SHA384,
    SigHash.SHA512: hashes.SHA512,
}


def _sig_hash(sig_hash: SigHash) -> hashes.HashAlgorithm:
    try:
        return _SIG_HASHES[SigHash(sig_hash)]()
    except ValueError as exc:
        raise CryptoError(f"unsupported SIG_HASH_ALGORITHM {sig_hash}") from exc


def sig_algorithm_of(key: PrivateKey | PublicKey) -> SigAlgorithm:
    """SIG_ALGORITHM value for a (private or public) signing key."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return SigAlgorithm.RSA
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return SigAlgorithm.ECDSA_256
        if isinstance(key.curve, ec.SECP384R1):
            return SigAlgorithm.ECDSA_384
        raise CryptoError(f"unsupported ECDSA curve {key.curve.name} for rekey signatures")
    raise CryptoError(f"unsupported rekey signing key type {type(key).__name__}")


def rekey_sign(private_key: PrivateKey, sig_hash: SigHash, data: bytes) -> bytes:
    """Sign a push: RSA PKCS#1 v1.5 with DigestInfo, or ECDSA as fixed-size r‖s.

    ECDSA uses the fixed-size (IEEE P1363) form, not DER, so the SIG payload's
    length is known before signing: the signed header already carries the
    message length including SIG (wire.md §5).
    """
    hash_alg = _sig_hash(sig_hash)
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(data, padding.PKCS1v15(), hash_alg)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        sig_algorithm_of(private_key)  # refuse curves a GM cannot advertise
        r, s = decode_dss_signature(private_key.sign(data, ec.ECDSA(hash_alg)))
        size = (private_key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise CryptoError(f"unsupported rekey signing key type {type(private_key).__name__}")


def rekey_signature_length(key: PrivateKey | PublicKey) -> int:
    """Octets of a push signature made with ``key``."""
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return (key.key_size + 7) // 8
    return 2 * ((key.curve.key_size + 7) // 8)


def rekey_verify(public_key: PublicKey, sig_hash: SigHash, data: bytes, signature: bytes) -> bool:
    """Verify a push signature; False on any failure, never raises."""
    try:
        hash_alg = _sig_hash(sig_hash)
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hash_alg)
            return True
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            size = (public_key.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public_key.verify(der, data, ec.ECDSA(hash_alg))
            return True
    except (InvalidSignature, CryptoError, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return False


def public_key_der(key: PrivateKey | PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo, as carried in the KD's SIG_ALGORITHM_KEY."""
    public = (
        key.public_key() if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) else key
    )
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key_der(der: bytes) -> PublicKey:
    """Parse a DER SubjectPublicKeyInfo holding an RSA or EC key."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cannot parse DER public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise CryptoError(f"unsupported public key type {type(key).__name__}")
    return key
