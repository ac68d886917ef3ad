"""Golden bytes of every message protected by a phase-2 HASH.

Informational (HASH(1)), the four GROUPKEY-PULL messages (HASH(1)..(4)), a COOP
ANN (HASH(1)) and a GROUPKEY-PUSH acknowledgement (HASH under K_ack) are built
from fixed keys, nonces and message IDs; their exact bytes were recorded before
these builders were folded into one primitive (``IkeSa.seal_hashed`` /
``open_hashed``), so any change on the wire fails here.  The receiving side is
driven too: each message opens, and one flipped HASH octet is refused.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.protocol import crypto
from gdoid.protocol.ann import open_ann, seal_ann
from gdoid.protocol.constants import (
    AuthenticationMethod,
    Doi,
    IdType,
    NotifyType,
)
from gdoid.protocol.crypto import DhGroup, HashAlgorithm, Phase1Keys, SigAlgorithm, SigHash
from gdoid.protocol.errors import NotifyError
from gdoid.protocol.events import MemberRegistered, PullFailed, Registered
from gdoid.protocol.gdoi_payloads import AnnBlock, AnnPayload, Role
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Proposal
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.payloads import IdPayload, NotifyPayload
from gdoid.protocol.policy import GroupKeys, Kek, SenderIds, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.pull import PullInitiator, PullResponder, error_notify
from gdoid.protocol.push import build_ack, parse_ack, verify_ack
from gdoid.protocol.transforms import TekTransform
from gdoid.protocol.version import SoftwareVersion

T0 = 2_000_000.0
GROUP = 1234
GM_ADDR = IPv4Address("10.0.0.2")
KS_ADDR = IPv4Address("10.0.0.1")


# --- fixed inputs ------------------------------------------------------------------


class CountingRandom:
    """Message IDs and nonces from a counter: the same bytes on every run."""

    def __init__(self) -> None:
        self.counter: Iterator[int] = itertools.count(1)

    def token_bytes(self, nbytes: int | None = None) -> bytes:
        seed = hashlib.sha256(b"golden %d" % next(self.counter)).digest()
        return (seed * (1 + (nbytes or 32) // 32))[: nbytes or 32]

    def randbits(self, k: int) -> int:
        return int.from_bytes(self.token_bytes(8), "big") & ((1 << k) - 1)


@pytest.fixture
def rng() -> CountingRandom:
    """Injected into the SAs and build_ack: nothing patches ``secrets``."""
    return CountingRandom()


def sa_pair(rng: CountingRandom) -> tuple[IkeSa, IkeSa]:
    """A GM's and a KS's view of one phase-1 SA, from fixed keys (no Main Mode run)."""
    proposal = Phase1Proposal(
        256, HashAlgorithm.SHA2_256, AuthenticationMethod.PRE_SHARED_KEY, DhGroup.ECP_256, 86400
    )
    gm = IkeSa(
        initiator_cookie=bytes.fromhex("0102030405060708"),
        responder_cookie=bytes.fromhex("1112131415161718"),
        is_initiator=True,
        proposal=proposal,
        keys=Phase1Keys(b"s" * 32, b"d" * 32, b"a" * 32, b"e" * 32),
        cipher_key=b"c" * 32,
        last_phase1_block=b"b" * 16,
        peer_address=KS_ADDR,
        peer_id=IdPayload(IdType.ID_IPV4_ADDR, 0, 0, KS_ADDR.packed),
        peer_version=SoftwareVersion(1, 0, 2),
        established_at=T0,
        expires_at=T0 + 86400,
        rng=rng,
    )
    ks = replace(
        gm,
        is_initiator=False,
        peer_address=GM_ADDR,
        peer_id=IdPayload(IdType.ID_IPV4_ADDR, 0, 0, GM_ADDR.packed),
        _ivs={},
    )
    return gm, ks


def group_keys() -> GroupKeys:
    signing_key = ec.derive_private_key(0x60D01D, ec.SECP256R1())
    t = TekTransform.from_name("esp-gcm-256")
    policy = TekPolicy(
        1, t, TrafficSelector(IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16")), 3600
    )
    tek = Tek(
        spi=0x1000_0001,
        policy=policy,
        cipher_key=bytes(range(t.cipher_key_len)),
        integrity_key=bytes(range(100, 100 + t.integrity_key_len)),
        created_at=T0,
        expires_at=T0 + 3600,
    )
    kek = Kek(
        spi=bytes(range(16)),
        key_bits=256,
        key=b"K" * 32,
        iv=b"I" * 16,
        configured_lifetime=86400,
        created_at=T0,
        expires_at=T0 + 86400,
        sig_hash=SigHash.SHA256,
        sig_algorithm=SigAlgorithm.ECDSA_256,
        sig_key_bits=256,
        public_key_der=crypto.public_key_der(signing_key),
        ks_address=KS_ADDR,
    )
    return GroupKeys(GROUP, kek, (tek,), 7)


class Directory:
    def __init__(self) -> None:
        self.keys = group_keys()

    def pop_signer(self, group_number: int) -> object:
        raise AssertionError("no POP requested here")

    def snapshot(self, group_number: int, now: float) -> GroupKeys | None:
        return self.keys if group_number == GROUP else None

    def allocate_sender_ids(self, group_number: int, count: int, member: str) -> SenderIds | None:
        return SenderIds(8, tuple(range(1, 1 + count)))

    def authorize(self, group_number: int, sa: IkeSa) -> str | None:
        return None


def flip_last(data: bytes) -> bytes:
    """Flip one octet of the last ciphertext block (the end of the payload chain)."""
    return data[:-1] + bytes([data[-1] ^ 1])


def flip_hash_octet(sa: IkeSa, data: bytes) -> bytes:
    """Re-encrypt ``data`` with one octet of its HASH payload changed.

    Decrypting and re-encrypting under the same IV changes only that octet of the
    plaintext, whatever IV the receiver's chain holds.
    """
    mid = IsakmpHeader.decode(data).message_id
    iv = crypto.phase2_iv(sa.hash, sa.last_phase1_block, mid)
    pt = crypto.aes_cbc_decrypt(sa.cipher_key, iv, data[HEADER_LEN:])
    pt = pt[:4] + bytes([pt[4] ^ 0x80]) + pt[5:]  # first octet of the HASH data
    return data[:HEADER_LEN] + crypto.aes_cbc_encrypt(sa.cipher_key, iv, pt)


# --- the recorded bytes ---------------------------------------------------------------

GOLDEN: dict[str, str] = {
    "informational": (
        "0102030405060708111213141516171808100501f319065a0000005cbab79fe843523f315dba478802d51639"
        "2e253debea3aa3078123eb2ff4c05da70554560224bab24c5533524b36aae19370ebfb8abaaf07d533e2c0ef"
        "193d2860"
    ),
    "error_notify": (
        "0102030405060708111213141516171808100501192dd6d30000005c8c2b5eb6d994c7a6644d5a96e2db86e7"
        "d7df917cf61b34f8089477efc7d46e8a90db7ef6ce1dd32b95afadc01e321d3497695e3816e4a593e321164f"
        "5ed20b6f"
    ),
    "pull1": (
        "0102030405060708111213141516171808102001f319065a0000007c2cf6be72e06137a4dab3e514facb7a9e"
        "0facf10e5f41708b6da89f0a06b0f8e1ec2e6e6340c3d82c181d42b8a886a322932f61a9860e883522b9fd9a"
        "5364e86baa99542718ed2a7748478a0a5f0acd074efd7fbae112c064f2f5f37810321254"
    ),
    "pull2": (
        "0102030405060708111213141516171808102001f319065a0000010ceafa352b63001fc30bfb4d3e9baf454d"
        "f10035f33433c3f90d99539df8b57f354eba6b142a9c1030a1a9721ae50934cb6a49077f6142d699dd736556"
        "e3b7427d043f663e4c01db12c1845cda332d6c1c18ce81ddd1bf13f53cb58ec982f26a35f6ca2723b8108f39"
        "d746189e8486c163f858e191f02752874653c4e477a0fc3ff1bf4ca9ab0f2b63477bf5c4c767cf314456c56c"
        "64046ac62c064a560379015c29a2fa50962f44b5029d6b8b2a63ad7a2b9601c26d6aa96205d11cac17674a00"
        "8455408f44e7e49ce181d619fefcbb9576eaa5b33a3c3665ce3ca8749272a75f5814673301de1a8c7bb46323"
        "1e24299c"
    ),
    "pull3": (
        "0102030405060708111213141516171808102001f319065a0000004ccd47f1ad556d7bb062351e8466ac28df"
        "2c5f19c2ddaa4f929a2cb90fada7d7376b421ecdfb9ced90bfaaeeaf07735884"
    ),
    "pull4": (
        "0102030405060708111213141516171808102001f319065a0000013cd147faddf6029fa274027a7f81bc4730"
        "6a3e57d16a3c13e184c471e1c70df8337c3212e1e5e694d2c72fc55106af950f10282b38d2b4b932ea93909e"
        "28489695cedb80ff63a61aef9f2d9e688536385404e26601d8eb69a7dd06df41bca803f1d3494e478ae0ba4a"
        "7bbb77a0d1a4d7be023ed690624cd30ce82037d9c66e65f013002ca74ec27553ca9fb62689a1cdf4a28d8095"
        "aae50fc7edbf83bdb8205103be66c3e855dfd56bdeb88731585c25b2dbc3e74c28d704df06282d72abb9c181"
        "5a26e65c30ba393b9b0ea7e1fa005693c363006277a0d1949d27119768ac173c86795fd0799ae840c0a62e83"
        "4254778f49657d0778c18e87d97eedd06bd6f9444c4597df3257b9a55621dfc3d283b842ef06400656c77364"
        "257f75fd0bc72008"
    ),
    "ann": (
        "010203040506070811121314151617180810f001f319065a0000006cb4dc48d02e5d5bb136d532622bcfb223"
        "ff426b5552af6a392924b8eb30f56295880c21d467c3654d449c73f502977c27e7de57794ac6aa40cd82e7eb"
        "b4313ce1ad40dcad7d116549cd4e3da2d9b673fb"
    ),
    "push_ack": (
        "000102030405060708090a0b0c0d0e0f08102300f319065a0000005412000024a895a83fb201e42ad7e6e722"
        "2fb947144bfd0e995667712bbb104ee95b4c68ab05000008000000090000000c010000000a000002"
    ),
}


def check(name: str, data: bytes) -> None:
    assert data.hex() == GOLDEN[name], f"{name} changed on the wire"


# --- Informational ------------------------------------------------------------------


def test_informational_bytes_and_check(rng: CountingRandom) -> None:
    gm, ks = sa_pair(rng)
    data = gm.informational(
        NotifyPayload(Doi.GDOI, 0, NotifyType.INVALID_ID_INFORMATION, b"", b"why")
    )
    check("informational", data)
    check("error_notify", error_notify(ks, NotifyType.AUTHENTICATION_FAILED, b"not authorized"))
    n = ks.open_informational(data).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_ID_INFORMATION and n.data == b"why"
    with pytest.raises(NotifyError) as exc:
        ks.open_informational(flip_hash_octet(ks, data))
    assert exc.value.notify == NotifyType.INVALID_HASH_INFORMATION


# --- GROUPKEY-PULL --------------------------------------------------------------------


def test_pull_bytes_and_checks(rng: CountingRandom) -> None:
    gm_sa, ks_sa = sa_pair(rng)
    gm = PullInitiator(gm_sa, GROUP)
    [m1] = gm.start(T0).send
    ks = PullResponder(ks_sa, Directory(), IsakmpHeader.decode(m1).message_id, T0)  # type: ignore[arg-type]
    [m2] = ks.receive(m1, T0).send
    [m3] = gm.receive(m2, T0).send
    out = ks.receive(m3, T0)
    [m4] = out.send
    assert [type(e) for e in out.events] == [MemberRegistered]
    gm_out = gm.receive(m4, T0)
    assert gm_out.send == [] and [type(e) for e in gm_out.events] == [Registered]
    for i, m in enumerate((m1, m2, m3, m4), 1):
        check(f"pull{i}", m)


@pytest.mark.parametrize("which", [1, 2])
def test_pull_tampered_hash_refused(which: int, rng: CountingRandom) -> None:
    gm_sa, ks_sa = sa_pair(rng)
    gm = PullInitiator(gm_sa, GROUP)
    [m1] = gm.start(T0).send
    ks = PullResponder(ks_sa, Directory(), IsakmpHeader.decode(m1).message_id, T0)  # type: ignore[arg-type]
    if which == 1:
        out = ks.receive(flip_hash_octet(ks_sa, m1), T0)
    else:
        [m2] = ks.receive(m1, T0).send
        out = gm.receive(flip_hash_octet(gm_sa, m2), T0)
    [failed] = out.events
    assert isinstance(failed, PullFailed) and failed.notify == NotifyType.INVALID_HASH_INFORMATION


# --- COOP ANN ---------------------------------------------------------------------------


def ann() -> AnnPayload:
    return AnnPayload(
        SoftwareVersion(1, 0, 2), 100, Role.PRIMARY, 0, 42, GROUP, 3, (AnnBlock(1, b'{"a": 1}'),)
    )


def test_ann_bytes_and_check(rng: CountingRandom) -> None:
    ks1, ks2 = sa_pair(rng)
    data = seal_ann(ks1, ann())
    check("ann", data)
    assert open_ann(ks2, data) == ann()
    with pytest.raises(NotifyError) as exc:
        open_ann(ks2, flip_hash_octet(ks2, data))
    assert exc.value.notify == NotifyType.INVALID_HASH_INFORMATION


# --- GROUPKEY-PUSH acknowledgement -----------------------------------------------------


def test_push_ack_bytes_and_check(rng: CountingRandom) -> None:
    key = b"k" * 32
    data = build_ack(HashAlgorithm.SHA2_256, key, bytes(range(16)), 9, GM_ADDR.packed, rng)
    check("push_ack", data)
    ack = parse_ack(data)
    assert (ack.seq, ack.gm_address) == (9, GM_ADDR.packed)
    assert verify_ack(ack, HashAlgorithm.SHA2_256, key)
    assert not verify_ack(ack, HashAlgorithm.SHA2_256, b"K" * 32)
    assert not verify_ack(parse_ack(flip_last(data)), HashAlgorithm.SHA2_256, key)
