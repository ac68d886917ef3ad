"""The wire codec is exact and strict (wire.md §1, §4).

* round trips: ``decode(encode(x)) == x`` for every payload class and for whole
  messages, and ``encode(decode(b)) == b`` for every byte string the decoder
  accepts;
* exact bytes against hand-written hex;
* strictness: truncations, extensions, random bytes and single-octet mutations
  either decode or raise :class:`DecodeError` naming a payload and a field,
  never any other exception.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdoid.protocol import message as message_mod
from gdoid.protocol.attributes import Attribute, decode_attributes, encode_attributes
from gdoid.protocol.constants import (
    Doi,
    ExchangeType,
    GapAttribute,
    HeaderFlag,
    IdType,
    KekKeyAttribute,
    KeyPacketType,
    NotifyType,
    PayloadType,
    SidAttribute,
    TekKeyAttribute,
)
from gdoid.protocol.errors import DecodeError
from gdoid.protocol.gdoi_payloads import (
    GapPayload,
    GdoiSaPayload,
    KdPayload,
    KeyPacket,
    OpaqueSatPayload,
    SakPayload,
    SatPayload,
    SeqPayload,
    TrafficId,
)
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.message import (
    decode_payloads,
    decode_plain,
    encode_payload,
    encode_payloads,
    encode_plain,
)
from gdoid.protocol.payloads import (
    CertPayload,
    CrPayload,
    DeletePayload,
    HashPayload,
    IdPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    SigPayload,
    Transform,
    UnknownPayload,
    VendorIdPayload,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def h(text: str) -> bytes:
    """Hex with spaces, ``|`` separators and ``#`` comments allowed."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return bytes.fromhex("".join(lines).replace("|", "").replace(" ", ""))


@contextmanager
def decode_error(payload: str | None = None, field: str | None = None) -> Iterator[DecodeError]:
    """Expect a :class:`DecodeError` naming a payload and a field (optionally given ones)."""
    with pytest.raises(DecodeError) as info:
        yield info  # type: ignore[misc]  # yields pytest's ExceptionInfo for the DecodeError
    err = info.value
    assert err.payload and err.field and err.reason, err
    if payload is not None:
        assert err.payload == payload, err
    if field is not None:
        assert err.field == field, err


def decodes_or_decode_error(fn: Callable[[], object]) -> object | None:
    """Run ``fn``: any exception other than a well-formed DecodeError fails the test."""
    try:
        return fn()
    except DecodeError as err:
        assert err.payload and err.field, err
        return None


# --- strategies -------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
cookies = st.binary(min_size=8, max_size=8).filter(any)

tv_attributes = st.builds(Attribute, st.integers(0, 0x7FFF), u16)
tlv_attributes = st.builds(Attribute, st.integers(0, 0x7FFF), st.binary(max_size=24))
attributes = st.one_of(tv_attributes, tlv_attributes)
attribute_lists = st.lists(attributes, max_size=4).map(tuple)

transforms = st.builds(Transform, u8, u8, attribute_lists)
proposals = st.builds(
    Proposal,
    u8,
    u8,
    st.binary(max_size=16),
    st.lists(transforms, min_size=1, max_size=3).map(tuple),
)


def sa_payloads(doi: st.SearchStrategy[int] = u32) -> st.SearchStrategy[SaPayload]:
    return st.builds(SaPayload, doi, u32, st.lists(proposals, min_size=1, max_size=3).map(tuple))


# wire.md §2: phase-1 SAs are sent with DOI 1, DOI 2 is accepted on receive.
phase1_sa_payloads = sa_payloads(st.one_of(st.sampled_from(list(Doi)), u32))

ke_payloads = st.builds(KePayload, st.binary(min_size=1, max_size=64))
id_payloads = st.builds(IdPayload, u8, u8, u16, st.binary(min_size=1, max_size=32))
cert_payloads = st.builds(CertPayload, u8, st.binary(min_size=1, max_size=48))
cr_payloads = st.builds(CrPayload, u8, st.binary(max_size=32))
hash_payloads = st.builds(HashPayload, st.binary(min_size=12, max_size=64))
sig_payloads = st.builds(SigPayload, st.binary(min_size=1, max_size=64))
nonce_payloads = st.builds(NoncePayload, st.binary(min_size=8, max_size=256))
notify_payloads = st.builds(
    NotifyPayload, u32, u8, u16, st.binary(max_size=16), st.binary(max_size=32)
)


@st.composite
def delete_payloads(draw: st.DrawFn) -> DeletePayload:
    size = draw(st.integers(1, 16))
    spis = draw(st.lists(st.binary(min_size=size, max_size=size), min_size=1, max_size=4))
    return DeletePayload(draw(u32), draw(u8), size, tuple(spis))


vid_payloads = st.builds(VendorIdPayload, st.binary(min_size=1, max_size=32))

_FIXED_ID_LEN = {
    IdType.ID_IPV4_ADDR: 4,
    IdType.ID_IPV4_ADDR_SUBNET: 8,
    IdType.ID_IPV4_ADDR_RANGE: 8,
    IdType.ID_IPV6_ADDR: 16,
    IdType.ID_IPV6_ADDR_SUBNET: 32,
    IdType.ID_IPV6_ADDR_RANGE: 32,
}
traffic_ids = st.one_of(
    st.sampled_from(sorted(_FIXED_ID_LEN)).flatmap(
        lambda t: st.builds(
            TrafficId,
            st.just(t),
            u16,
            st.binary(min_size=_FIXED_ID_LEN[t], max_size=_FIXED_ID_LEN[t]),
        )
    ),
    st.builds(TrafficId, u8.filter(lambda t: t not in _FIXED_ID_LEN), u16, st.binary(max_size=40)),
)
sak_payloads = st.builds(
    SakPayload, u8, traffic_ids, traffic_ids, st.binary(min_size=16, max_size=16), attribute_lists
)
# RFC 6407 §5.4: the Protocol-ID selects the layout; ESP (1) and AH (2) have the ID layout.
sat_payloads = st.builds(
    SatPayload, st.sampled_from([1, 2]), u8, traffic_ids, traffic_ids, u8, u32, attribute_lists
)
opaque_sat_payloads = st.builds(
    OpaqueSatPayload, u8.filter(lambda p: p not in (1, 2)), st.binary(max_size=40)
)
gap_payloads = st.builds(GapPayload, attribute_lists)
gdoi_sa_payloads = st.builds(
    GdoiSaPayload,
    st.lists(
        st.one_of(sak_payloads, sat_payloads, opaque_sat_payloads, gap_payloads),
        min_size=1,
        max_size=4,
    ).map(tuple),
    u32,
)


@st.composite
def full_gdoi_sas(draw: st.DrawFn) -> GdoiSaPayload:
    """A registration SA: one SAK, several SATs and a GAP."""
    sats = draw(st.lists(sat_payloads, min_size=2, max_size=4))
    return GdoiSaPayload((draw(sak_payloads), *sats, draw(gap_payloads)), draw(u32))


key_packets = st.builds(
    KeyPacket, st.sampled_from(list(KeyPacketType)), st.binary(max_size=16), attribute_lists
)
kd_payloads = st.builds(KdPayload, st.lists(key_packets, max_size=4).map(tuple))


@st.composite
def full_kds(draw: st.DrawFn) -> KdPayload:
    """A KD with a TEK, a KEK and a SID key packet shaped as wire.md §4 describes."""
    tek = KeyPacket(
        KeyPacketType.TEK,
        draw(st.binary(min_size=4, max_size=4)),
        (
            Attribute(TekKeyAttribute.TEK_ALGORITHM_KEY, draw(st.binary(min_size=20, max_size=36))),
            Attribute(TekKeyAttribute.TEK_INTEGRITY_KEY, draw(st.binary(min_size=32, max_size=32))),
        ),
    )
    kek = KeyPacket(
        KeyPacketType.KEK,
        draw(st.binary(min_size=16, max_size=16)),
        (
            Attribute(KekKeyAttribute.KEK_ALGORITHM_KEY, draw(st.binary(min_size=48, max_size=48))),
            Attribute(KekKeyAttribute.SIG_ALGORITHM_KEY, draw(st.binary(min_size=1, max_size=120))),
        ),
    )
    sids = draw(st.lists(st.binary(min_size=4, max_size=4), min_size=1, max_size=3))
    sid_attrs: list[Attribute] = []
    for sid in sids:
        sid_attrs += [
            Attribute(SidAttribute.NUMBER_OF_SID_BITS, draw(st.integers(1, 32))),
            Attribute(SidAttribute.SID_VALUE, sid),
        ]
    sid = KeyPacket(KeyPacketType.SID, b"", tuple(sid_attrs))
    packets = draw(st.permutations([tek, kek, sid]))
    return KdPayload(tuple(packets))


seq_payloads = st.builds(SeqPayload, u32)

_CHAIN_ONLY = {
    PayloadType.NONE,
    PayloadType.SA,
    PayloadType.PROPOSAL,
    PayloadType.TRANSFORM,
    PayloadType.SAK,
    PayloadType.SAT,
    PayloadType.GAP,
}


def _is_unknown(t: int) -> bool:
    known = set(message_mod._TOP_LEVEL) | _CHAIN_ONLY
    return t not in known


unknown_payloads = st.builds(
    UnknownPayload, st.integers(1, 255).filter(_is_unknown), st.binary(max_size=32)
)

# (class, strategy) for every class with a decode_body.
BODY_CASES: list[tuple[type, st.SearchStrategy]] = [
    (Transform, transforms),
    (Proposal, proposals),
    (SaPayload, sa_payloads()),
    (KePayload, ke_payloads),
    (IdPayload, id_payloads),
    (CertPayload, cert_payloads),
    (CrPayload, cr_payloads),
    (HashPayload, hash_payloads),
    (SigPayload, sig_payloads),
    (NoncePayload, nonce_payloads),
    (NotifyPayload, notify_payloads),
    (DeletePayload, delete_payloads()),
    (VendorIdPayload, vid_payloads),
    (SakPayload, sak_payloads),
    (SatPayload, sat_payloads),
    (OpaqueSatPayload, opaque_sat_payloads),
    (GapPayload, gap_payloads),
    (GdoiSaPayload, gdoi_sa_payloads),
    (GdoiSaPayload, full_gdoi_sas()),
    (KdPayload, kd_payloads),
    (KdPayload, full_kds()),
    (SeqPayload, seq_payloads),
]
BODY_IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(BODY_CASES)]
DECODERS: list[type] = list(dict.fromkeys(c for c, _ in BODY_CASES))

# Bodies delimited by their own contents: no prefix or extension is a valid body.
SELF_DELIMITED = {Proposal, SaPayload, GdoiSaPayload, KdPayload, SeqPayload, DeletePayload}

# Payloads that may stand in a message's top-level chain.
TOP_LEVEL_CASES: list[st.SearchStrategy[Payload]] = [
    phase1_sa_payloads,
    gdoi_sa_payloads,
    full_gdoi_sas(),
    ke_payloads,
    id_payloads,
    cert_payloads,
    cr_payloads,
    hash_payloads,
    sig_payloads,
    nonce_payloads,
    notify_payloads,
    delete_payloads(),
    vid_payloads,
    kd_payloads,
    full_kds(),
    seq_payloads,
    gap_payloads,
    unknown_payloads,
]
top_level_payloads = st.one_of(*TOP_LEVEL_CASES)
payload_chains = st.lists(top_level_payloads, min_size=1, max_size=5)

exchanges = st.sampled_from([int(x) for x in ExchangeType] + [0, 200, 255])
plain_flags = st.sampled_from(
    [
        HeaderFlag.NONE,
        HeaderFlag.COMMIT,
        HeaderFlag.AUTHENTICATION_ONLY,
        HeaderFlag.COMMIT | HeaderFlag.AUTHENTICATION_ONLY,
    ]
)


@st.composite
def messages(draw: st.DrawFn, chain: st.SearchStrategy[list[Payload]] = payload_chains) -> bytes:
    return encode_plain(
        draw(cookies),
        draw(st.binary(min_size=8, max_size=8)),
        draw(exchanges),
        draw(u32),
        draw(chain),
        draw(plain_flags),
    )


@st.composite
def push_like_messages(draw: st.DrawFn) -> bytes:
    """GDOI SA (SAK + SATs + GAP), KD (TEK, KEK, SID), SEQ, with a HASH and NONCE around."""
    chain = [
        draw(hash_payloads),
        draw(seq_payloads),
        draw(full_gdoi_sas()),
        draw(full_kds()),
        draw(nonce_payloads),
    ]
    return draw(messages(st.just(chain)))


def reencode(data: bytes) -> bytes:
    """Decode a plaintext message and encode it back from its parts."""
    msg = decode_plain(data)
    return msg.header.encode() + encode_payloads([d.payload for d in msg.payloads])


def with_length(data: bytes) -> bytes:
    """``data`` with the header length field rewritten to match."""
    return data[:24] + struct.pack("!I", len(data)) + data[HEADER_LEN:]


# --- 1. round trips -----------------------------------------------------------


@pytest.mark.parametrize(("klass", "strategy"), BODY_CASES, ids=BODY_IDS)
@FAST
@given(data=st.data())
def test_body_round_trip(klass: type, strategy: st.SearchStrategy, data: st.DataObject) -> None:
    x = data.draw(strategy)
    body = x.encode_body()
    y = klass.decode_body(body)
    assert y == x
    assert y.encode_body() == body


@FAST
@given(attrs=attribute_lists)
def test_attribute_round_trip(attrs: tuple[Attribute, ...]) -> None:
    raw = encode_attributes(attrs)
    decoded = decode_attributes(raw, "test")
    assert decoded == attrs
    # TV stays TV, TLV stays TLV, even when a TLV value would fit in two octets.
    assert [type(a.value) for a in decoded] == [type(a.value) for a in attrs]
    assert encode_attributes(decoded) == raw


@FAST
@given(
    icky=cookies,
    rcky=st.binary(min_size=8, max_size=8),
    np=u8,
    xchg=u8,
    flags=st.integers(0, 7),
    mid=u32,
    version=st.integers(0x10, 0x1F),
    extra=st.binary(max_size=8),
)
def test_header_round_trip(
    icky: bytes, rcky: bytes, np: int, xchg: int, flags: int, mid: int, version: int, extra: bytes
) -> None:
    hdr = IsakmpHeader(
        icky, rcky, np, xchg, HeaderFlag(flags), mid, HEADER_LEN + len(extra), version
    )
    raw = hdr.encode()
    assert len(raw) == HEADER_LEN
    got = IsakmpHeader.decode(raw + extra)
    assert got == hdr
    assert got.encode() == raw


@FAST
@given(p=top_level_payloads)
def test_single_payload_chain_round_trip(p: Payload) -> None:
    raw = encode_payload(p)
    (d,) = decode_payloads(p.payload_type, raw)
    assert d.payload == p
    assert d.raw == raw
    assert d.body == p.encode_body()


@FAST
@given(chain=payload_chains)
def test_payload_chain_round_trip(chain: list[Payload]) -> None:
    raw = encode_payloads(chain)
    decoded = decode_payloads(chain[0].payload_type, raw)
    assert [d.payload for d in decoded] == chain
    assert b"".join(d.raw for d in decoded) == raw
    assert encode_payloads([d.payload for d in decoded]) == raw


@FAST
@given(data=st.one_of(messages(), push_like_messages()))
def test_message_round_trip(data: bytes) -> None:
    msg = decode_plain(data)
    assert msg.header.length == len(data)
    assert reencode(data) == data
    icky, rcky = msg.header.initiator_cookie, msg.header.responder_cookie
    payloads = [d.payload for d in msg.payloads]
    again = encode_plain(
        icky, rcky, msg.header.exchange_type, msg.header.message_id, payloads, msg.header.flags
    )
    assert again == data


@QUICK
@given(data=push_like_messages())
def test_push_message_contents(data: bytes) -> None:
    msg = decode_plain(data)
    assert msg.types == (
        PayloadType.HASH,
        PayloadType.SEQ,
        PayloadType.SA,
        PayloadType.KD,
        PayloadType.NONCE,
    )
    sa = msg.require(GdoiSaPayload, "test")
    assert sa.sak is not None and sa.gap is not None and len(sa.sats) >= 2
    kd = msg.require(KdPayload, "test")
    assert {p.kd_type for p in kd.packets} == {
        KeyPacketType.TEK,
        KeyPacketType.KEK,
        KeyPacketType.SID,
    }
    assert msg.raw(SeqPayload) == encode_payload(msg.require(SeqPayload, "test"), PayloadType.SA)


def test_empty_message_round_trip() -> None:
    data = encode_plain(b"\x01" * 8, bytes(8), ExchangeType.INFORMATIONAL, 7, [])
    assert data == h("0101010101010101 0000000000000000 00 10 05 00 00000007 0000001c")
    assert decode_plain(data).payloads == ()


@FAST
@given(chain=payload_chains, pad=st.integers(0, 16), fill=u8)
def test_padding_allowed_up_to_max(chain: list[Payload], pad: int, fill: int) -> None:
    raw = encode_payloads(chain)
    decoded = decode_payloads(chain[0].payload_type, raw + bytes([fill]) * pad, max_padding=pad)
    assert [d.payload for d in decoded] == chain
    if pad:
        with decode_error("payload chain", "length"):
            decode_payloads(chain[0].payload_type, raw + bytes([fill]) * pad, max_padding=pad - 1)


# --- 2. exact bytes -------------------------------------------------------------


def test_header_bytes() -> None:
    hdr = IsakmpHeader(
        bytes.fromhex("0102030405060708"),
        bytes.fromhex("1112131415161718"),
        PayloadType.HASH,
        ExchangeType.GROUPKEY_PULL,
        HeaderFlag.ENCRYPTION,
        0xA1B2C3D4,
        0x4C,
    )
    raw = h("""
        0102030405060708  # CKY-I
        1112131415161718  # CKY-R
        08 10 20 01       # next payload HASH, version 1.0, exchange 32, flags E
        a1b2c3d4          # message ID
        0000004c          # length
    """)
    assert hdr.encode() == raw
    assert IsakmpHeader.decode(raw + bytes(0x4C - 28)) == hdr


def test_attribute_bytes() -> None:
    assert Attribute(2, 3).encode() == h("8002 0003")
    assert Attribute.long(4, 86400).encode() == h("0004 0004 00015180")
    assert Attribute(5, b"").encode() == h("0005 0000")
    assert decode_attributes(h("8002 0003 0004 0004 00015180"), "t") == (
        Attribute(2, 3),
        Attribute(4, h("00015180")),
    )


def test_seq_bytes() -> None:
    p = SeqPayload(0x01020304)
    assert p.encode_body() == h("01020304")
    assert encode_payload(p) == h("00 00 0008 | 01020304")
    assert encode_payload(SeqPayload(0xFFFFFFFF)) == h("00 00 0008 ffffffff")


SAT_BODY = h("""
    01 00                            # protocol ESP, IP protocol any
    04 0000 0008 c0a80100 ffffff00   # src: IPV4_ADDR_SUBNET, port, 2-octet length 8
    04 0000 0008 c0a80200 ffffff00   # dst likewise
    14 deadbeef                      # transform ESP_AES-GCM-16 (20), SPI
    8001 0001                        # life type seconds
    0002 0004 00000e10               # life duration 3600 (TLV)
    8004 0001                        # tunnel
    800e 0004                        # address preservation src+dst
    800f 0003                        # SA direction symmetric
""")
SAT = SatPayload(
    1,
    0,
    TrafficId.from_network(ipaddress.IPv4Network("192.168.1.0/24")),
    TrafficId.from_network(ipaddress.IPv4Network("192.168.2.0/24")),
    20,
    0xDEADBEEF,
    (Attribute(1, 1), Attribute.long(2, 3600), Attribute(4, 1), Attribute(14, 4), Attribute(15, 3)),
)

SAK_BODY = h("""
    11                               # protocol UDP
    04 0350 08 0a000000 ffffff00     # src: IPV4_ADDR_SUBNET, port 848, 1-octet length 8
    01 0350 04 ef000001              # dst: IPV4_ADDR, port 848, length 4
    000102030405060708090a0b0c0d0e0f # SPI = CKY-I | CKY-R
    00000000                         # 4 reserved octets
    8002 0003                        # KEK_ALGORITHM AES
    8003 0100                        # KEK_KEY_LENGTH 256
    0004 0004 00015180               # KEK_KEY_LIFETIME 86400 (TLV)
""")
SAK = SakPayload(
    17,
    TrafficId(IdType.ID_IPV4_ADDR_SUBNET, 848, h("0a000000 ffffff00")),
    TrafficId(IdType.ID_IPV4_ADDR, 848, h("ef000001")),
    bytes(range(16)),
    (Attribute(2, 3), Attribute(3, 256), Attribute.long(4, 86400)),
)


def test_sat_bytes() -> None:
    assert SAT.encode_body() == SAT_BODY
    assert SatPayload.decode_body(SAT_BODY) == SAT
    assert SAT.src.to_network() == ipaddress.IPv4Network("192.168.1.0/24")


def test_sak_bytes() -> None:
    assert SAK.encode_body() == SAK_BODY
    assert SakPayload.decode_body(SAK_BODY) == SAK


def test_gdoi_sa_header_bytes() -> None:
    sa = GdoiSaPayload((SAT,))
    body = sa.encode_body()
    sat_len = 4 + len(SAT_BODY)
    assert body[:12] == h("00000002 | 00000000 | 00 10 00 00")
    assert body == h("00000002 00000000 00100000") + h(f"00 00 {sat_len:04x}") + SAT_BODY
    assert GdoiSaPayload.decode_body(body) == sa
    # A GDOI SA starting with a SAK, then a SAT, then a GAP.
    gap = GapPayload((Attribute(GapAttribute.ACTIVATION_TIME_DELAY, 5),))
    sa = GdoiSaPayload((SAK, SAT, gap), situation=0)
    body = sa.encode_body()
    expected = (
        h("00000002 00000000 000f0000")
        + h(f"10 00 {4 + len(SAK_BODY):04x}")
        + SAK_BODY  # next: SAT
        + h(f"16 00 {sat_len:04x}")
        + SAT_BODY  # next: GAP (22)
        + h("00 00 0008 8001 0005")  # GAP, end of chain
    )
    assert body == expected
    assert GdoiSaPayload.decode_body(body) == sa
    # In a message the SA's generic header wraps the whole chain.
    raw = encode_payload(sa)
    assert raw[:4] == h(f"00 00 {4 + len(expected):04x}")
    (d,) = decode_payloads(PayloadType.SA, raw)
    assert d.payload == sa


def test_kd_bytes() -> None:
    key = bytes(range(20))  # AES-128 key || 4-octet salt
    kd = KdPayload(
        (
            KeyPacket(
                KeyPacketType.TEK,
                h("deadbeef"),
                (Attribute(TekKeyAttribute.TEK_ALGORITHM_KEY, key),),
            ),
        )
    )
    body = kd.encode_body()
    assert body == h("""
        0001 0000                     # one key packet, reserved
        01 00 0021                    # TEK, reserved, length 33 = 4 header + 29
        04 deadbeef                   # SPI size, SPI
        0001 0014                     # TEK_ALGORITHM_KEY, 20 octets
        000102030405060708090a0b0c0d0e0f10111213
    """)
    packet = body[4:]
    assert int.from_bytes(packet[2:4], "big") == len(packet)
    assert KdPayload.decode_body(body) == kd
    assert KdPayload(()).encode_body() == h("0000 0000")


def test_sid_key_packet_bytes() -> None:
    kp = KeyPacket(
        KeyPacketType.SID,
        b"",
        (
            Attribute(SidAttribute.NUMBER_OF_SID_BITS, 8),
            Attribute(SidAttribute.SID_VALUE, h("00000005")),
        ),
    )
    assert kp.encode() == h("04 00 0011 00 | 8001 0008 | 0002 0004 00000005")


def test_notify_bytes() -> None:
    n = NotifyPayload(Doi.IPSEC, 1, NotifyType.INVALID_SPI, h("deadbeef"), h("0102"))
    assert encode_payload(n) == h("""
        00 00 0012        # generic header: 18 octets
        00000001          # DOI
        01 04 000b        # protocol, SPI size, INVALID_SPI
        deadbeef 0102     # SPI, data
    """)
    assert NotifyPayload.decode_body(encode_payload(n)[4:]) == n
    gm_removal = NotifyPayload(Doi.GDOI, 0, NotifyType.GM_REMOVAL)
    assert gm_removal.encode_body() == h("00000002 00 00 9000")


def test_delete_bytes() -> None:
    d = DeletePayload(Doi.GDOI, 1, 4, (h("01020304"), h("0a0b0c0d")))
    assert d.encode_body() == h("00000002 01 04 0002 01020304 0a0b0c0d")
    assert DeletePayload.decode_body(d.encode_body()) == d


def test_phase1_sa_bytes() -> None:
    sa = SaPayload(Doi.IPSEC, 1, (Proposal(1, 1, b"", (Transform(1, 1, (Attribute(1, 7),)),)),))
    assert sa.encode_body() == h("""
        00000001 00000001                  # DOI IPsec, SIT_IDENTITY_ONLY
        00 00 0014 01 01 00 01             # proposal: last, 20 octets, #1 ISAKMP, no SPI, 1 transform
        00 00 000c 01 01 0000 8001 0007    # transform: last, 12 octets, #1 KEY_IKE, AES-CBC
    """)


def test_ann_payload_decodes_without_importing_ann_py() -> None:
    # The codec knows ANN statically: a process that never imports ann.py (a tool,
    # a fuzzer) still decodes COOP announcements instead of keeping opaque bytes.
    code = (
        "import sys\n"
        "from gdoid.protocol.constants import PayloadType\n"
        "from gdoid.protocol.message import decode_payloads\n"
        "body = bytes([1, 0, 1, 200, 1, 0, 0, 0]) + (5).to_bytes(8, 'big') + (1234).to_bytes(4, 'big')"
        " + (0).to_bytes(4, 'big') + b'\\x00\\x01\\x00\\x02{}'\n"
        "[d] = decode_payloads(PayloadType.ANN, bytes(2) + (4 + len(body)).to_bytes(2, 'big') + body)\n"
        "assert 'gdoid.protocol.ann' not in sys.modules\n"
        "print(type(d.payload).__name__, d.payload.sequence, d.payload.group_number, d.payload.blocks[0].data)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["AnnPayload", "5", "1234", "b'{}'"]


def test_top_level_gap() -> None:
    """wire.md §3 message 3: HDR*, HASH(3) [, GAP] -- a GAP outside the SA decodes as a GAP."""
    gap = GapPayload((Attribute(GapAttribute.SENDER_ID_REQUEST, 4),))
    raw = encode_payloads([HashPayload(bytes(32)), gap])
    assert raw[36:] == h("00 00 0008 8003 0004")
    decoded = decode_payloads(PayloadType.HASH, raw)
    assert decoded[1].payload == gap


@pytest.mark.parametrize("doi", [Doi.ISAKMP, Doi.IPSEC, Doi.GDOI])
def test_phase1_sa_any_doi_in_a_message(doi: int) -> None:
    """wire.md §2: send DOI 1, accept DOI 2 (a phase-1 SA, not a GDOI SA) on receive."""
    sa = SaPayload(doi, 1, (Proposal(1, 1, b"", (Transform(1, 1, (Attribute(1, 7),)),)),))
    data = encode_plain(b"\x01" * 8, bytes(8), ExchangeType.IDENTITY_PROTECTION, 0, [sa])
    assert decode_plain(data).require(SaPayload, "test") == sa
    assert reencode(data) == data


def test_message_bytes() -> None:
    data = encode_plain(
        b"\x01" * 8,
        b"\x02" * 8,
        ExchangeType.GROUPKEY_PUSH,
        0,
        [SeqPayload(1), NoncePayload(b"\xaa" * 8)],
    )
    assert data == h("""
        0101010101010101 0202020202020202 12 10 21 00 00000000 00000030
        0a 00 0008 00000001               # SEQ, next NONCE
        00 00 000c aaaaaaaaaaaaaaaa       # NONCE, end
    """)
    msg = decode_plain(data)
    assert msg.types == (PayloadType.SEQ, PayloadType.NONCE)


# --- 3. strictness ----------------------------------------------------------------


def prefixes(raw: bytes) -> Iterator[bytes]:
    return (raw[:i] for i in range(len(raw)))


def extensions(raw: bytes, fills: tuple[int, ...] = (0x00, 0x01, 0x80, 0xFF)) -> Iterator[bytes]:
    return (raw + bytes([b]) for b in fills)


@pytest.mark.parametrize(("klass", "strategy"), BODY_CASES, ids=BODY_IDS)
@QUICK
@given(data=st.data())
def test_body_truncation_and_extension(
    klass: type, strategy: st.SearchStrategy, data: st.DataObject
) -> None:
    x = data.draw(strategy)
    raw = x.encode_body()
    for cut in [*prefixes(raw), *extensions(raw)]:
        if klass in SELF_DELIMITED:
            with decode_error():
                klass.decode_body(cut)
        else:
            # Open-ended trailing field (attributes, data): never a crash, never the same value.
            y = decodes_or_decode_error(lambda cut=cut: klass.decode_body(cut))
            assert y != x
            if y is not None:
                assert y.encode_body() == cut


@FAST
@given(p=top_level_payloads)
def test_payload_truncation_and_extension(p: Payload) -> None:
    """With the generic header, every payload is delimited: no prefix or extension decodes."""
    raw = encode_payload(p)
    for cut in [*prefixes(raw), *extensions(raw)]:
        with decode_error():
            decode_payloads(p.payload_type, cut)


@QUICK
@given(data=st.one_of(messages(), push_like_messages()))
def test_message_truncation_and_extension(data: bytes) -> None:
    for cut in [*prefixes(data), *extensions(data)]:
        with decode_error():
            decode_plain(cut)
    # Even with the header length rewritten to match, the payload chain gives it away.
    for cut in [*(data[:i] for i in range(HEADER_LEN, len(data))), *extensions(data)]:
        with decode_error():
            decode_plain(with_length(cut))


@pytest.mark.parametrize("klass", DECODERS, ids=[c.__name__ for c in DECODERS])
@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes_to_decode_body(klass: type, raw: bytes) -> None:
    y = decodes_or_decode_error(lambda: klass.decode_body(raw))
    if y is not None:
        assert y.encode_body() == raw  # whatever is accepted is re-encoded exactly


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes_to_decode_attributes(raw: bytes) -> None:
    y = decodes_or_decode_error(lambda: decode_attributes(raw, "fuzz"))
    if y is not None:
        assert encode_attributes(y) == raw


@st.composite
def chain_like_bytes(draw: st.DrawFn) -> bytes:
    """Random generic headers with plausible lengths and random or valid bodies."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        body = draw(
            st.one_of(st.binary(max_size=40), top_level_payloads.map(lambda p: p.encode_body()))
        )
        length = draw(st.one_of(st.just(len(body) + 4), u16))
        out += (
            struct.pack(
                "!BBH",
                draw(st.one_of(u8, st.sampled_from(list(PayloadType)))),
                draw(st.sampled_from([0, 0, 0, 1])),
                length,
            )
            + body
        )
    return out + draw(st.binary(max_size=4))


@FUZZ
@given(
    first=st.one_of(u8, st.sampled_from(list(PayloadType))),
    raw=st.one_of(st.binary(max_size=200), chain_like_bytes()),
    pad=st.integers(0, 16),
)
def test_random_bytes_to_decode_payloads(first: int, raw: bytes, pad: int) -> None:
    y = decodes_or_decode_error(lambda: decode_payloads(first, raw, max_padding=pad))
    if y is not None:
        used = b"".join(d.raw for d in y)
        assert raw.startswith(used) and len(raw) - len(used) <= pad
        assert encode_payloads([d.payload for d in y]) == used


@st.composite
def header_plus_random(draw: st.DrawFn) -> bytes:
    body = draw(st.one_of(st.binary(max_size=120), chain_like_bytes()))
    hdr = struct.pack(
        "!8s8sBBBBI",
        draw(cookies),
        draw(st.binary(min_size=8, max_size=8)),
        draw(st.one_of(u8, st.sampled_from(list(PayloadType)))),
        draw(st.sampled_from([0x10, 0x10, 0x11, 0x20, 0x00])),
        draw(u8),
        draw(st.sampled_from([0, 0, 1, 2, 4, 8, 0x80])),
        draw(u32),
    )
    return hdr + struct.pack("!I", HEADER_LEN + len(body)) + body


@FUZZ
@given(raw=st.one_of(st.binary(max_size=120), header_plus_random()))
def test_random_bytes_to_decode_plain(raw: bytes) -> None:
    y = decodes_or_decode_error(lambda: decode_plain(raw))
    if y is not None:
        assert reencode(raw) == raw


@FUZZ
@given(data=st.data(), msg=st.one_of(messages(), push_like_messages()))
def test_random_single_octet_mutation(data: st.DataObject, msg: bytes) -> None:
    pos = data.draw(st.integers(0, len(msg) - 1))
    val = data.draw(u8.filter(lambda v: v != msg[pos]))
    mutated = msg[:pos] + bytes([val]) + msg[pos + 1 :]
    if decodes_or_decode_error(lambda: decode_plain(mutated)) is not None:
        assert reencode(mutated) == mutated


PUSH = encode_plain(
    b"\x01" * 8,
    b"\x02" * 8,
    ExchangeType.GROUPKEY_PUSH,
    0,
    [
        HashPayload(b"\x33" * 32),
        SeqPayload(9),
        GdoiSaPayload((SAK, SAT, SAT, GapPayload((Attribute(1, 5), Attribute(3, 1))))),
        KdPayload(
            (
                KeyPacket(
                    KeyPacketType.TEK,
                    h("deadbeef"),
                    (Attribute(1, bytes(20)), Attribute(2, bytes(32))),
                ),
                KeyPacket(
                    KeyPacketType.KEK,
                    bytes(range(16)),
                    (Attribute(1, bytes(48)), Attribute(2, b"\x30" * 40)),
                ),
                KeyPacket(KeyPacketType.SID, b"", (Attribute(1, 8), Attribute(2, h("00000001")))),
            )
        ),
        DeletePayload(Doi.GDOI, 1, 4, (h("01020304"),)),
    ],
)
PHASE1 = encode_plain(
    b"\x01" * 8,
    bytes(8),
    ExchangeType.IDENTITY_PROTECTION,
    0,
    [
        SaPayload(
            Doi.IPSEC,
            1,
            (
                Proposal(
                    1,
                    1,
                    b"",
                    (
                        Transform(1, 1, (Attribute(1, 7), Attribute.long(12, 86400))),
                        Transform(2, 1, ()),
                    ),
                ),
            ),
        ),
        VendorIdPayload(b"gdoid"),
        KePayload(bytes(64)),
        NoncePayload(bytes(16)),
        IdPayload(1, 17, 500, bytes(4)),
        CertPayload(4, b"cert"),
        CrPayload(4),
        SigPayload(b"sig"),
        NotifyPayload(1, 1, 24),
        UnknownPayload(200, b"private"),
    ],
)


@pytest.mark.parametrize("msg", [PUSH, PHASE1], ids=["push", "phase1"])
def test_every_single_octet_mutation(msg: bytes) -> None:
    """Exhaustive: every position, several values; header length kept or fixed up."""
    assert reencode(msg) == msg
    for pos in range(len(msg)):
        for val in {0x00, 0x01, 0x7F, 0x80, 0xFF, msg[pos] ^ 0x01, msg[pos] ^ 0x10} - {msg[pos]}:
            mutated = msg[:pos] + bytes([val]) + msg[pos + 1 :]
            if decodes_or_decode_error(lambda m=mutated: decode_plain(m)) is not None:
                assert reencode(mutated) == mutated


@pytest.mark.parametrize("msg", [PUSH, PHASE1], ids=["push", "phase1"])
def test_every_truncation_and_extension_of_fixed_messages(msg: bytes) -> None:
    for i in range(len(msg)):
        with decode_error():
            decode_plain(msg[:i])
        if i >= HEADER_LEN:
            with decode_error():
                decode_plain(with_length(msg[:i]))
    for ext in extensions(msg):
        with decode_error("ISAKMP header", "length"):
            decode_plain(ext)
        with decode_error("payload chain", "length"):
            decode_plain(with_length(ext))


# --- 4. specific typed errors ------------------------------------------------------


def test_header_length_mismatch() -> None:
    data = encode_plain(b"\x01" * 8, bytes(8), 5, 0, [SeqPayload(1)])
    for bad in (
        data[:-1],
        data + b"\x00",
        with_length(data)[:24] + struct.pack("!I", 0) + data[28:],
    ):
        with decode_error("ISAKMP header", "length"):
            decode_plain(bad)
    with decode_error("ISAKMP header", "length"):
        IsakmpHeader.decode(data[:27])


def test_header_other_fields() -> None:
    data = bytearray(encode_plain(b"\x01" * 8, bytes(8), 5, 0, []))
    with decode_error("ISAKMP header", "initiator_cookie"):
        decode_plain(bytes(8) + data[8:])
    data[17] = 0x20
    with decode_error("ISAKMP header", "version"):
        decode_plain(bytes(data))
    data[17] = 0x10
    data[19] = 0x08
    with decode_error("ISAKMP header", "flags"):
        decode_plain(bytes(data))
    data[19] = 0x01
    with decode_error("ISAKMP header", "flags"):
        decode_plain(bytes(data))  # encrypted where plaintext was expected


def test_generic_header_reserved_nonzero() -> None:
    data = bytearray(encode_plain(b"\x01" * 8, bytes(8), 5, 0, [SeqPayload(1)]))
    data[HEADER_LEN + 1] = 0x01
    with decode_error("payload[0]", "reserved"):
        decode_plain(bytes(data))
    # Inside a GDOI SA: the SAT's generic header.
    body = bytearray(GdoiSaPayload((SAT,)).encode_body())
    body[12 + 1] = 0x80
    with decode_error("SatPayload", "reserved"):
        GdoiSaPayload.decode_body(bytes(body))
    # Inside a phase-1 SA: the proposal's and the transform's generic headers.
    sa = SaPayload(1, 1, (Proposal(1, 1, b"", (Transform(1, 1, ()),)),))
    body = bytearray(sa.encode_body())
    body[8 + 1] = 1
    with decode_error("Proposal", "reserved"):
        SaPayload.decode_body(bytes(body))
    body = bytearray(sa.encode_body())
    body[16 + 1] = 1
    with decode_error("Transform", "reserved"):
        SaPayload.decode_body(bytes(body))


def test_generic_header_length_too_short() -> None:
    with decode_error("payload[0]", "length"):
        decode_payloads(PayloadType.SEQ, h("00 00 0003 00000001"))


def test_kd_more_packets_announced_than_present() -> None:
    kd = KdPayload((KeyPacket(KeyPacketType.TEK, h("deadbeef"), (Attribute(1, bytes(16)),)),))
    body = bytearray(kd.encode_body())
    body[0:2] = (2).to_bytes(2, "big")
    with decode_error("KD", "key_packet[1].type"):
        KdPayload.decode_body(bytes(body))
    body[0:2] = (0).to_bytes(2, "big")
    with decode_error("KD", "number_of_key_packets"):
        KdPayload.decode_body(bytes(body))


def test_kd_key_packet_fields() -> None:
    body = h("0001 0000 | 01 00 0009 04 deadbeef")
    assert KdPayload.decode_body(body).packets[0].spi == h("deadbeef")
    with decode_error("KD", "key_packet[0].type"):
        KdPayload.decode_body(h("0001 0000 | 09 00 0005 00"))
    with decode_error("KD", "key_packet[0].reserved"):
        KdPayload.decode_body(h("0001 0000 | 01 01 0005 00"))
    with decode_error("KD", "key_packet[0].length"):
        KdPayload.decode_body(h("0001 0000 | 01 00 0004"))
    with decode_error("KD", "key_packet[0].body"):
        KdPayload.decode_body(h("0001 0000 | 01 00 000a 04 deadbeef"))
    with decode_error("KD", "key_packet[0].spi"):
        KdPayload.decode_body(h("0001 0000 | 01 00 0008 04 deadbe"))
    with decode_error("KD", "reserved2"):
        KdPayload.decode_body(h("0000 0001"))


@pytest.mark.parametrize("size", [0, 3, 5, 8])
def test_seq_wrong_size(size: int) -> None:
    with decode_error("SEQ", "sequence_number"):
        SeqPayload.decode_body(bytes(size))
    with decode_error("SEQ", "sequence_number"):
        decode_payloads(PayloadType.SEQ, encode_payload(UnknownPayload(18, bytes(size))))


@pytest.mark.parametrize("size", [0, 7, 257, 300])
def test_nonce_wrong_size(size: int) -> None:
    with decode_error("NONCE", "nonce_data"):
        NoncePayload.decode_body(bytes(size))
    with decode_error("NONCE", "nonce_data"):
        decode_payloads(PayloadType.NONCE, encode_payload(UnknownPayload(10, bytes(size))))


@pytest.mark.parametrize("size", [8, 256])
def test_nonce_size_limits_accepted(size: int) -> None:
    assert NoncePayload.decode_body(bytes(size)) == NoncePayload(bytes(size))


@pytest.mark.parametrize("size", [11, 65])
def test_hash_wrong_size(size: int) -> None:
    with decode_error("HASH", "hash_data"):
        HashPayload.decode_body(bytes(size))


def test_sat_ipv4_subnet_of_seven_octets() -> None:
    short = SatPayload(1, 0, TrafficId(IdType.ID_IPV4_ADDR_SUBNET, 0, bytes(7)), SAT.dst, 12, 1, ())
    with decode_error("SAT", "src_id_data"):
        SatPayload.decode_body(short.encode_body())
    short = SatPayload(1, 0, SAT.src, TrafficId(IdType.ID_IPV4_ADDR_SUBNET, 0, bytes(7)), 12, 1, ())
    with decode_error("SAT", "dst_id_data"):
        SatPayload.decode_body(short.encode_body())
    # Through the SA and the message, the same typed error surfaces.
    sa = GdoiSaPayload((short,))
    with decode_error("SAT", "dst_id_data"):
        decode_plain(encode_plain(b"\x01" * 8, bytes(8), 32, 1, [sa]))


def test_sak_ipv4_addr_of_five_octets() -> None:
    bad = SakPayload(17, TrafficId(IdType.ID_IPV4_ADDR, 0, bytes(5)), SAK.dst, bytes(16), ())
    with decode_error("SAK", "src_id_data"):
        SakPayload.decode_body(bad.encode_body())
    body = bytearray(SAK_BODY)
    body[-17] = 1  # last reserved octet before the 16 octets of attributes
    with decode_error("SAK", "reserved2"):
        SakPayload.decode_body(bytes(body))


def test_gdoi_sa_chain_naming_ke() -> None:
    body = bytearray(GdoiSaPayload((SAT,)).encode_body())
    body[9] = PayloadType.KE
    with decode_error("SA(GDOI)", "sa_attribute_next_payload"):
        GdoiSaPayload.decode_body(bytes(body))
    # A later link of the chain naming KE.
    body = bytearray(GdoiSaPayload((SAK, SAT)).encode_body())
    body[12] = PayloadType.KE
    with decode_error("SA(GDOI)", "sa_attribute_next_payload"):
        GdoiSaPayload.decode_body(bytes(body))
    with decode_error("SA(GDOI)", "sa_attribute_next_payload"):
        decode_payloads(PayloadType.SA, encode_payload(UnknownPayload(1, bytes(body))))


def test_gdoi_sa_other_errors() -> None:
    with decode_error("SA(GDOI)", "sa_attribute_next_payload"):
        GdoiSaPayload.decode_body(h("00000002 00000000 00000000"))
    with decode_error("SA(GDOI)", "doi"):
        GdoiSaPayload.decode_body(h("00000001 00000000 00100000"))
    with decode_error("SA(GDOI)", "reserved"):
        GdoiSaPayload.decode_body(h("00000002 00000000 10000000"))
    with decode_error("SA(GDOI)", "reserved2"):
        GdoiSaPayload.decode_body(h("00000002 00000000 00100001"))
    with decode_error("SA(GDOI)", "sa_attributes"):
        GdoiSaPayload.decode_body(GdoiSaPayload((SAT,)).encode_body() + b"\x00")


@pytest.mark.parametrize(
    "payload_type", [PayloadType.SAK, PayloadType.SAT, PayloadType.PROPOSAL, PayloadType.TRANSFORM]
)
def test_sa_attribute_payloads_outside_an_sa(payload_type: int) -> None:
    with decode_error("payload chain", "next_payload"):
        decode_payloads(payload_type, encode_payload(SAT))


def test_delete_errors() -> None:
    with decode_error("DELETE", "number_of_spis"):
        DeletePayload.decode_body(h("00000002 01 04 0000"))
    with decode_error("DELETE", "number_of_spis"):
        DeletePayload.decode_body(h("00000002 01 00 0001"))
    with decode_error("DELETE", "spi[1]"):
        DeletePayload.decode_body(h("00000002 01 04 0002 01020304 0102"))
    with decode_error("DELETE", "number_of_spis"):
        DeletePayload.decode_body(h("00000002 01 04 0001 01020304 05"))


def test_proposal_transform_count_mismatch() -> None:
    p = Proposal(1, 1, b"", (Transform(1, 1, ()), Transform(2, 1, ())))
    body = bytearray(p.encode_body())
    body[3] = 3
    with decode_error("Proposal", "number_of_transforms"):
        Proposal.decode_body(bytes(body))


def test_attribute_tlv_overrun() -> None:
    with decode_error("X", "attribute[1].length"):
        decode_attributes(h("0001 0005 0102"), "X")
    with decode_error("X", "attributes"):
        decode_attributes(h("8001 0001 00"), "X")


def test_empty_bodies_rejected() -> None:
    for klass in (KePayload, IdPayload, CertPayload, SigPayload, VendorIdPayload, SaPayload):
        with decode_error():
            klass.decode_body(b"")


def test_too_many_payloads() -> None:
    chain = [UnknownPayload(200, b"")] * 65
    with decode_error("payload chain", "next_payload"):
        decode_payloads(200, encode_payloads(chain))
    assert len(decode_payloads(200, encode_payloads(chain[:64]))) == 64
