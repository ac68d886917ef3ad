"""Tests for gdoid.protocol.crypto: DH, key derivation, CBC and signatures."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gdoid.protocol import crypto
from gdoid.protocol.crypto import DhGroup, DhKeyPair, HashAlgorithm, SigHash
from gdoid.protocol.errors import CryptoError

KE_LEN = {DhGroup.MODP_2048: 256, DhGroup.ECP_256: 64, DhGroup.ECP_384: 96}
SECRET_LEN = {DhGroup.MODP_2048: 256, DhGroup.ECP_256: 32, DhGroup.ECP_384: 48}
MODP_P = crypto._MODP_2048_P


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- Diffie-Hellman ---------------------------------------------------------


@pytest.mark.parametrize("group", list(DhGroup))
def test_dh_shared_secret_agrees(group: DhGroup) -> None:
    a, b = DhKeyPair.generate(group), DhKeyPair.generate(group)
    assert len(a.public_bytes) == KE_LEN[group]
    assert a.public_bytes != b.public_bytes
    s_ab = a.shared_secret(b.public_bytes)
    assert s_ab == b.shared_secret(a.public_bytes)
    assert len(s_ab) == SECRET_LEN[group]


def test_modp_public_value_is_g_pow_x() -> None:
    kp = DhKeyPair.generate(DhGroup.MODP_2048)
    x = kp._private.private_numbers().x  # type: ignore[union-attr]  # a MODP group: a finite-field DH key
    assert kp.public_bytes == pow(2, x, MODP_P).to_bytes(256, "big")


@pytest.mark.parametrize("group", [DhGroup.ECP_256, DhGroup.ECP_384])
def test_ecp_shared_secret_is_x_coordinate(group: DhGroup) -> None:
    a, b = DhKeyPair.generate(group), DhKeyPair.generate(group)
    secret = a.shared_secret(b.public_bytes)
    # Independent computation: peer point times our scalar, take x.
    curve = crypto._EC_CURVES[group]
    peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + b.public_bytes)
    assert secret == a._private.exchange(ec.ECDH(), peer)  # type: ignore[call-arg,arg-type]  # an EC group: an ECDH key
    n = SECRET_LEN[group]
    b_point = b._private.public_key().public_numbers()
    assert b.public_bytes == b_point.x.to_bytes(n, "big") + b_point.y.to_bytes(n, "big")


@pytest.mark.parametrize("group", list(DhGroup))
def test_dh_rejects_wrong_length(group: DhGroup) -> None:
    kp = DhKeyPair.generate(group)
    peer = DhKeyPair.generate(group).public_bytes
    for bad in (peer[:-1], peer + b"\x00", b""):
        with pytest.raises(CryptoError, match="octets"):
            kp.shared_secret(bad)


@pytest.mark.parametrize(
    "value",
    [0, 1, MODP_P - 1, MODP_P, MODP_P + 1, 2**2048 - 1],
    ids=["0", "1", "p-1", "p", "p+1", "all-ones"],
)
def test_modp_rejects_degenerate_values(value: int) -> None:
    kp = DhKeyPair.generate(DhGroup.MODP_2048)
    with pytest.raises(CryptoError, match="group 14"):
        kp.shared_secret(value.to_bytes(256, "big"))


def test_modp_rejects_value_outside_subgroup() -> None:
    kp = DhKeyPair.generate(DhGroup.MODP_2048)
    # p ≡ 7 (mod 8) makes -1 a non-residue, so p-2 = -2 is a non-residue too.
    with pytest.raises(CryptoError, match="subgroup"):
        kp.shared_secret((MODP_P - 2).to_bytes(256, "big"))


@pytest.mark.parametrize("group", [DhGroup.ECP_256, DhGroup.ECP_384])
def test_ecp_rejects_off_curve_and_zero(group: DhGroup) -> None:
    kp = DhKeyPair.generate(group)
    peer = bytearray(DhKeyPair.generate(group).public_bytes)
    peer[-1] ^= 1  # y + 1 or y - 1: not on the curve
    with pytest.raises(CryptoError, match="not a point"):
        kp.shared_secret(bytes(peer))
    with pytest.raises(CryptoError, match="not a point"):
        kp.shared_secret(bytes(KE_LEN[group]))


# --- hashes and key derivation ----------------------------------------------

HASHES = {
    HashAlgorithm.SHA: "sha1",
    HashAlgorithm.SHA2_256: "sha256",
    HashAlgorithm.SHA2_384: "sha384",
    HashAlgorithm.SHA2_512: "sha512",
}


@pytest.mark.parametrize("alg", list(HashAlgorithm))
def test_hash_and_prf(alg: HashAlgorithm) -> None:
    name = HASHES[alg]
    assert crypto.hash_digest(alg, b"abc") == hashlib.new(name, b"abc").digest()
    assert crypto.digest_size(alg) == hashlib.new(name).digest_size
    assert crypto.prf(alg, b"k", b"d") == hmac.new(b"k", b"d", name).digest()


def test_unknown_hash_is_crypto_error() -> None:
    with pytest.raises(CryptoError):
        crypto.hash_digest(3, b"")  # type: ignore[arg-type]  # an invalid hash on purpose


def test_skeyid_and_phase1_keys() -> None:
    alg = HashAlgorithm.SHA2_256
    ni, nr, gxy = b"N" * 16, b"R" * 20, b"\x07" * 256
    cky_i, cky_r = bytes(range(8)), bytes(range(8, 16))

    def h(k: bytes, d: bytes) -> bytes:
        return hmac.new(k, d, "sha256").digest()

    assert crypto.skeyid_psk(alg, b"secret", ni, nr) == h(b"secret", ni + nr)
    skeyid = crypto.skeyid_sig(alg, ni, nr, gxy)
    assert skeyid == h(ni + nr, gxy)

    keys = crypto.derive_phase1_keys(alg, skeyid, gxy, cky_i, cky_r)
    d = h(skeyid, gxy + cky_i + cky_r + b"\x00")
    a = h(skeyid, d + gxy + cky_i + cky_r + b"\x01")
    e = h(skeyid, a + gxy + cky_i + cky_r + b"\x02")
    assert keys == crypto.Phase1Keys(skeyid=skeyid, skeyid_d=d, skeyid_a=a, skeyid_e=e)
    assert "redacted" in repr(keys)
    with pytest.raises(CryptoError):
        crypto.derive_phase1_keys(alg, skeyid, gxy, cky_i[:7], cky_r)


def test_encryption_key_truncates_and_expands() -> None:
    skeyid_e = bytes(range(20))  # a SHA-1 sized SKEYID_e
    alg = HashAlgorithm.SHA
    assert crypto.encryption_key(alg, skeyid_e, 16) == skeyid_e[:16]
    assert crypto.encryption_key(alg, skeyid_e, 20) == skeyid_e

    # RFC 2409 appendix B by hand: K1 = prf(SKEYID_e, 0), K2 = prf(SKEYID_e, K1).
    k1 = hmac.new(skeyid_e, b"\x00", "sha1").digest()
    k2 = hmac.new(skeyid_e, k1, "sha1").digest()
    k3 = hmac.new(skeyid_e, k2, "sha1").digest()
    assert crypto.encryption_key(alg, skeyid_e, 32) == (k1 + k2)[:32]
    assert crypto.encryption_key(alg, skeyid_e, 48) == (k1 + k2 + k3)[:48]
    # The expansion must not start from SKEYID_e itself.
    assert crypto.encryption_key(alg, skeyid_e, 32)[:20] != skeyid_e


def test_phase1_and_phase2_iv() -> None:
    gxi, gxr = b"\x01" * 64, b"\x02" * 64
    for alg, name in HASHES.items():
        assert crypto.phase1_iv(alg, gxi, gxr) == hashlib.new(name, gxi + gxr).digest()[:16]
    last = bytes(range(16))
    assert (
        crypto.phase2_iv(HashAlgorithm.SHA2_256, last, 0x01020304)
        == hashlib.sha256(last + b"\x01\x02\x03\x04").digest()[:16]
    )
    assert (
        crypto.phase2_iv(HashAlgorithm.SHA2_384, last, 7)
        == hashlib.sha384(last + b"\x00\x00\x00\x07").digest()[:16]
    )
    with pytest.raises(ValueError):
        crypto.phase2_iv(HashAlgorithm.SHA2_256, last, 2**32)


# --- AES-CBC ----------------------------------------------------------------


def test_pad_zero() -> None:
    assert crypto.pad_zero(b"") == b""
    assert crypto.pad_zero(b"a") == b"a" + bytes(15)
    assert crypto.pad_zero(bytes(16)) == bytes(16)
    assert len(crypto.pad_zero(bytes(17))) == 32
    assert crypto.pad_zero(b"abc", 8) == b"abc" + bytes(5)


@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_cbc_round_trip(key_len: int) -> None:
    key, iv = bytes(range(key_len)), b"\xaa" * 16
    plain = crypto.pad_zero(b"ISAKMP body of some length")
    ct = crypto.aes_cbc_encrypt(key, iv, plain)
    assert len(ct) == len(plain) and ct != plain
    assert crypto.aes_cbc_decrypt(key, iv, ct) == plain
    # CBC: changing the IV changes only the first decrypted block.
    other = crypto.aes_cbc_decrypt(key, b"\xab" * 16, ct)
    assert other[:16] != plain[:16] and other[16:] == plain[16:]


def test_cbc_length_checks() -> None:
    key, iv = bytes(16), bytes(16)
    with pytest.raises(ValueError):
        crypto.aes_cbc_encrypt(key, iv, b"x" * 15)
    for bad in (b"", b"x" * 15, b"x" * 17):
        with pytest.raises(CryptoError):
            crypto.aes_cbc_decrypt(key, iv, bad)


def test_kek_cipher() -> None:
    key, iv = b"k" * 32, b"i" * 16
    ct = crypto.kek_encrypt(key, iv, b"push")
    assert len(ct) == 16
    assert crypto.kek_decrypt(key, iv, ct) == b"push" + bytes(12)
    assert ct == crypto.aes_cbc_encrypt(key, iv, crypto.pad_zero(b"push"))


def test_constant_time_equal() -> None:
    assert crypto.constant_time_equal(b"abc", b"abc")
    assert not crypto.constant_time_equal(b"abc", b"abd")
    assert not crypto.constant_time_equal(b"abc", b"ab")


# --- IKEv1 RSA signatures ---------------------------------------------------


def test_ike_rsa_sign_matches_textbook_rsa(rsa_key: rsa.RSAPrivateKey) -> None:
    hash_value = hashlib.sha256(b"HASH_I input").digest()
    sig = crypto.ike_rsa_sign(rsa_key, hash_value)
    numbers = rsa_key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    k = (n.bit_length() + 7) // 8
    block = b"\x00\x01" + b"\xff" * (k - 3 - len(hash_value)) + b"\x00" + hash_value
    assert len(sig) == k
    assert sig == pow(int.from_bytes(block, "big"), d, n).to_bytes(k, "big")


@pytest.mark.parametrize("hash_len", [20, 32, 48, 64])
def test_ike_rsa_round_trip(rsa_key: rsa.RSAPrivateKey, hash_len: int) -> None:
    hash_value = hashlib.sha512(b"x").digest()[:hash_len]
    sig = crypto.ike_rsa_sign(rsa_key, hash_value)
    pub = rsa_key.public_key()
    assert crypto.ike_rsa_verify(pub, hash_value, sig)

    flipped = bytearray(sig)
    flipped[len(sig) // 2] ^= 0x01
    assert not crypto.ike_rsa_verify(pub, hash_value, bytes(flipped))
    wrong_hash = bytes([hash_value[0] ^ 0x80]) + hash_value[1:]
    assert not crypto.ike_rsa_verify(pub, wrong_hash, sig)
    assert not crypto.ike_rsa_verify(pub, hash_value, sig[:-1])
    assert not crypto.ike_rsa_verify(pub, hash_value, b"")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert not crypto.ike_rsa_verify(other, hash_value, sig)


def test_ike_rsa_verify_rejects_digestinfo_signature(rsa_key: rsa.RSAPrivateKey) -> None:
    # A standard (DigestInfo) signature over the same hash is not the IKEv1 form.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    hash_value = hashlib.sha256(b"m").digest()
    std = rsa_key.sign(hash_value, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    assert not crypto.ike_rsa_verify(rsa_key.public_key(), hash_value, std)


def test_ike_rsa_sign_rejects_oversized_hash() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CryptoError):
        crypto.ike_rsa_sign(small, bytes(128 - 10))


# --- rekey signatures -------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=["rsa", "p256", "p384"],
)
def signing_key(request: pytest.FixtureRequest, rsa_key: rsa.RSAPrivateKey) -> crypto.PrivateKey:
    if request.param == "rsa":
        return rsa_key
    curve = ec.SECP256R1() if request.param == "p256" else ec.SECP384R1()
    return ec.generate_private_key(curve)


@pytest.mark.parametrize("sig_hash", list(SigHash))
def test_rekey_sign_verify(signing_key: crypto.PrivateKey, sig_hash: SigHash) -> None:
    data = b"rekey" + b"header and payloads" * 10
    sig = crypto.rekey_sign(signing_key, sig_hash, data)
    pub = signing_key.public_key()
    assert crypto.rekey_verify(pub, sig_hash, data, sig)
    assert not crypto.rekey_verify(pub, sig_hash, data[:-1] + b"X", sig)
    assert not crypto.rekey_verify(pub, sig_hash, data, sig[:-1])
    assert not crypto.rekey_verify(pub, sig_hash, data, b"garbage")
    other_hash = SigHash.SHA512 if sig_hash != SigHash.SHA512 else SigHash.SHA256
    assert not crypto.rekey_verify(pub, other_hash, data, sig)
    assert not crypto.rekey_verify(pub, 99, data, sig)  # type: ignore[arg-type]  # an invalid hash on purpose


def test_rekey_sign_unknown_hash(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(CryptoError, match="SIG_HASH"):
        crypto.rekey_sign(rsa_key, 2, b"data")  # type: ignore[arg-type]  # an invalid hash on purpose


def test_rekey_rsa_is_standard_pkcs1(rsa_key: rsa.RSAPrivateKey) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    sig = crypto.rekey_sign(rsa_key, SigHash.SHA256, b"data")
    # Deterministic scheme: equals the library's PKCS#1 v1.5 (DigestInfo) signature.
    assert sig == rsa_key.sign(b"data", padding.PKCS1v15(), hashes.SHA256())


def test_sig_algorithm_of(rsa_key: rsa.RSAPrivateKey) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert crypto.sig_algorithm_of(rsa_key) is crypto.SigAlgorithm.RSA
    assert crypto.sig_algorithm_of(rsa_key.public_key()) is crypto.SigAlgorithm.RSA
    assert crypto.sig_algorithm_of(p256) is crypto.SigAlgorithm.ECDSA_256
    assert crypto.sig_algorithm_of(p384.public_key()) is crypto.SigAlgorithm.ECDSA_384
    with pytest.raises(CryptoError):
        crypto.sig_algorithm_of(ec.generate_private_key(ec.SECP521R1()))


def test_public_key_der_round_trip(signing_key: crypto.PrivateKey) -> None:
    der = crypto.public_key_der(signing_key)
    assert der == crypto.public_key_der(signing_key.public_key())
    loaded = crypto.load_public_key_der(der)
    assert (
        loaded.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == der
    )
    sig = crypto.rekey_sign(signing_key, SigHash.SHA384, b"m")
    assert crypto.rekey_verify(loaded, SigHash.SHA384, b"m", sig)


def test_load_public_key_der_rejects_garbage() -> None:
    with pytest.raises(CryptoError):
        crypto.load_public_key_der(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CryptoError):
        crypto.load_public_key_der(b"")
