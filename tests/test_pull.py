"""GROUPKEY-PULL (gdoid.protocol.pull) after an in-memory Main Mode.

The test decrypts every message itself, with the phase-1 cipher key, the
phase-2 IV (hash of the last phase-1 CBC block and the M-ID) and the CBC
chain, and recomputes HASH(1)..(4) per wire.md §3 from SKEYID_a.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from gdoid.protocol import crypto
from gdoid.protocol.attributes import find
from gdoid.protocol.constants import (
    EspTransformId,
    ExchangeType,
    GapAttribute,
    HeaderFlag,
    IdType,
    IpsecAttribute,
    KekAttribute,
    KeyPacketType,
    NotifyType,
    PayloadType,
    SidAttribute,
    TekKeyAttribute,
)
from gdoid.protocol.crypto import HashAlgorithm
from gdoid.protocol.events import MemberRegistered, PullFailed, Registered
from gdoid.protocol.gdoi_payloads import GapPayload, GdoiSaPayload, KdPayload, SeqPayload
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.message import build_header, decode_payloads
from gdoid.protocol.payloads import HashPayload, IdPayload, NotifyPayload
from gdoid.protocol.policy import SenderIds
from gdoid.protocol.pull import (
    PullInitiator,
    PullResponder,
)
from gdoid.protocol.transforms import TekTransform
from tests.pullsim import (
    GROUP,
    T0,
    Chain,
    directory,
    make_kek,
    make_tek,
    phase1,
    prf_a,
    run_pull,
    walk_chain,
)

# --- the exchange ------------------------------------------------------------------


def test_pull_hashes_iv_chain_and_payloads() -> None:
    tek = make_tek("esp-gcm-256", T0)
    kek = make_kek(T0)
    r = run_pull(directory(tek, kek=kek, seq=7))
    assert len(r.seen) == 4
    sa = r.p1.gm
    assert sa.keys.skeyid_a == r.p1.ks.keys.skeyid_a
    mid = r.gm.message_id.to_bytes(4, "big")
    m1, m2, m3, m4 = r.seen
    for s in r.seen:
        assert s.header.cookies == sa.cookies

    # (1) HASH(1), Ni, ID
    assert [t for t, _ in m1.payloads] == [PayloadType.HASH, PayloadType.NONCE, PayloadType.ID]
    ni_b = m1.body(PayloadType.NONCE)
    assert m1.body(PayloadType.HASH) == prf_a(
        sa, mid + m1.raw(PayloadType.NONCE) + m1.raw(PayloadType.ID)
    )
    # ID_KEY_ID, 3 zero octets, 4-octet group number
    assert m1.body(PayloadType.ID) == bytes([IdType.ID_KEY_ID, 0, 0, 0]) + GROUP.to_bytes(4, "big")

    # (2) HASH(2), Nr, SA
    assert [t for t, _ in m2.payloads] == [PayloadType.HASH, PayloadType.NONCE, PayloadType.SA]
    nr_b = m2.body(PayloadType.NONCE)
    assert m2.body(PayloadType.HASH) == prf_a(
        sa, mid + ni_b + m2.raw(PayloadType.NONCE) + m2.raw(PayloadType.SA)
    )

    # (3) HASH(3), GAP(SENDER_ID_REQUEST) -- GCM needs sender IDs
    assert [t for t, _ in m3.payloads] == [PayloadType.HASH, PayloadType.GAP]
    gap = GapPayload.decode_body(m3.body(PayloadType.GAP))
    req = find(gap.attributes, GapAttribute.SENDER_ID_REQUEST)
    assert req is not None and req.int_value >= 1
    # no leading zero octet (unlike Quick Mode)
    assert m3.body(PayloadType.HASH) == prf_a(sa, mid + ni_b + nr_b + m3.raw(PayloadType.GAP))
    assert m3.body(PayloadType.HASH) != prf_a(
        sa, b"\x00" + mid + ni_b + nr_b + m3.raw(PayloadType.GAP)
    )

    # (4) HASH(4), SEQ, KD
    assert [t for t, _ in m4.payloads] == [PayloadType.HASH, PayloadType.SEQ, PayloadType.KD]
    assert m4.body(PayloadType.HASH) == prf_a(
        sa, mid + ni_b + nr_b + m4.raw(PayloadType.SEQ) + m4.raw(PayloadType.KD)
    )
    assert m4.body(PayloadType.SEQ) == (7).to_bytes(4, "big")

    # IV chain: message 2 decrypts only with message 1's last ciphertext block as IV,
    # not with a fresh phase2_iv (Chain.open already used the chained one).
    fresh = crypto.phase2_iv(sa.hash, r.p1.last_block, r.gm.message_id)
    assert crypto.aes_cbc_decrypt(sa.cipher_key, fresh, m2.ciphertext)[:4] != m2.payloads[0][1][:4]

    # outcomes
    [reg] = r.gm_events
    assert isinstance(reg, Registered) and reg.group_number == GROUP
    assert reg.sender_ids == SenderIds(8, (1,))
    assert [t.spi for t in reg.keys.teks] == [tek.spi]
    assert reg.keys.teks[0].cipher_key == tek.cipher_key
    assert reg.keys.kek is not None and reg.keys.kek.key == kek.key and reg.keys.kek.iv == kek.iv
    assert reg.keys.seq == 7
    [mr] = r.ks_events
    assert isinstance(mr, MemberRegistered) and mr.sender_ids == SenderIds(8, (1,))
    assert r.gm.finished and r.ks.finished


@pytest.mark.parametrize("hash_", [HashAlgorithm.SHA2_384, HashAlgorithm.SHA])
def test_pull_with_other_phase1_hashes(hash_: HashAlgorithm) -> None:
    r = run_pull(directory(make_tek("esp-cbc-128-sha256", T0)), hash_=hash_)
    m1 = r.seen[0]
    mid = r.gm.message_id.to_bytes(4, "big")
    assert len(m1.body(PayloadType.HASH)) == crypto.digest_size(hash_)
    assert m1.body(PayloadType.HASH) == prf_a(
        r.p1.gm, mid + m1.raw(PayloadType.NONCE) + m1.raw(PayloadType.ID)
    )
    assert isinstance(r.gm_events[0], Registered)


def test_cbc_only_policy_sends_no_gap() -> None:
    r = run_pull(directory(make_tek("esp-cbc-256-sha256", T0), kek=make_kek(T0)))
    m3 = r.seen[2]
    assert [t for t, _ in m3.payloads] == [PayloadType.HASH]
    mid = r.gm.message_id.to_bytes(4, "big")
    ni_b, nr_b = r.seen[0].body(PayloadType.NONCE), r.seen[1].body(PayloadType.NONCE)
    assert m3.body(PayloadType.HASH) == prf_a(r.p1.gm, mid + ni_b + nr_b)
    [reg] = r.gm_events
    assert isinstance(reg, Registered) and reg.sender_ids is None
    kd = KdPayload.decode_body(r.seen[3].body(PayloadType.KD))
    assert not kd.of_type(KeyPacketType.SID)


def test_kd_key_lengths() -> None:
    gcm128 = make_tek("esp-gcm-128", T0, spi=0x101)
    gcm256 = make_tek("esp-gcm-256", T0, spi=0x102)
    cbc128 = make_tek("esp-cbc-128-sha256", T0, spi=0x103)
    cbc256 = make_tek("esp-cbc-256-sha256", T0, spi=0x104)
    r = run_pull(directory(gcm128, gcm256, cbc128, cbc256, kek=make_kek(T0)))
    kd = KdPayload.decode_body(r.seen[3].body(PayloadType.KD))
    by_spi = {int.from_bytes(p.spi, "big"): p for p in kd.of_type(KeyPacketType.TEK)}
    want = {0x101: (16 + 4, None), 0x102: (32 + 4, None), 0x103: (16, 32), 0x104: (32, 32)}
    for spi, (ck_len, ik_len) in want.items():
        attrs = by_spi[spi].attributes
        ck = find(attrs, TekKeyAttribute.TEK_ALGORITHM_KEY)
        ik = find(attrs, TekKeyAttribute.TEK_INTEGRITY_KEY)
        assert ck is not None and len(ck.bytes_value) == ck_len
        if ik_len is None:
            assert ik is None
        else:
            assert ik is not None and len(ik.bytes_value) == ik_len
    [kek_pkt] = kd.of_type(KeyPacketType.KEK)
    assert kek_pkt.spi == bytes(range(16))
    kk = find(kek_pkt.attributes, 1)
    assert kk is not None and kk.bytes_value == b"I" * 16 + b"K" * 32
    [sid] = kd.of_type(KeyPacketType.SID)
    assert sid.spi == b""
    assert find(sid.attributes, SidAttribute.NUMBER_OF_SID_BITS).value == 8  # type: ignore[union-attr]  # the SID packet was just built with the attribute
    sv = find(sid.attributes, SidAttribute.SID_VALUE)
    assert sv is not None and sv.value == (1).to_bytes(4, "big")
    [reg] = r.gm_events
    assert isinstance(reg, Registered)
    assert {t.spi for t in reg.keys.teks} == set(want)


def test_sat_lifetime_is_remaining_at_send_time() -> None:
    tek = make_tek("esp-gcm-256", T0, lifetime=3600)
    kek = make_kek(T0, lifetime=86400)
    now = T0 + 1000.0
    r = run_pull(directory(tek, kek=kek), now=now)
    sa = GdoiSaPayload.decode_body(r.seen[1].body(PayloadType.SA))
    [sat] = sa.sats
    life = find(sat.attributes, IpsecAttribute.SA_LIFE_DURATION)
    assert life is not None and life.int_value == 2600
    assert isinstance(life.value, bytes) and len(life.value) == 4
    assert sa.sak is not None
    klife = find(sa.sak.attributes, KekAttribute.KEK_KEY_LIFETIME)
    assert klife is not None and klife.int_value == 86400 - 1000
    [reg] = r.gm_events
    assert isinstance(reg, Registered)
    assert reg.keys.teks[0].expires_at == now + 2600
    assert reg.keys.kek is not None and reg.keys.kek.expires_at == now + 85400


def test_sa_layout_on_the_wire() -> None:
    r = run_pull(directory(make_tek("esp-gcm-256", T0), kek=make_kek(T0)))
    body = r.seen[1].body(PayloadType.SA)
    # DOI 2, situation 0, then "00 <type> 00 00" with the first SA attribute type (SAK 15)
    assert body[:12] == struct.pack("!II", 2, 0) + bytes([0, PayloadType.SAK, 0, 0])
    sa = GdoiSaPayload.decode_body(body)
    [sat] = sa.sats
    assert sat.transform_id == EspTransformId.ESP_AES_GCM_16


# --- failures -----------------------------------------------------------------------


def test_unknown_group_invalid_id_information() -> None:
    r = run_pull(directory(make_tek("esp-gcm-256", T0)), group=999)
    assert len(r.seen) == 1
    [fail] = r.ks_events
    assert isinstance(fail, PullFailed) and fail.notify == NotifyType.INVALID_ID_INFORMATION
    assert r.ks.finished
    notify = r.wire[-1]
    hdr = IsakmpHeader.decode(notify)
    assert hdr.exchange_type == ExchangeType.INFORMATIONAL
    assert hdr.flags & HeaderFlag.ENCRYPTION and hdr.message_id != 0
    msg = r.p1.gm.open_informational(notify)
    n = msg.get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_ID_INFORMATION
    # Informational HASH(1) = prf(SKEYID_a, M-ID | N), checked independently too
    iv = crypto.phase2_iv(r.p1.gm.hash, r.p1.last_block, hdr.message_id)
    plain = crypto.aes_cbc_decrypt(r.p1.gm.cipher_key, iv, notify[HEADER_LEN:])
    chain = walk_chain(hdr.next_payload, plain)
    assert [t for t, _ in chain] == [PayloadType.HASH, PayloadType.NOTIFY]
    assert chain[0][1][4:] == prf_a(r.p1.gm, hdr.message_id.to_bytes(4, "big") + chain[1][1])
    out = r.gm.notify_received(n.notify_type, n.data)
    [ev] = out.events
    assert isinstance(ev, PullFailed)
    assert ev.received and ev.notify == NotifyType.INVALID_ID_INFORMATION and ev.group_number == 999
    assert out.send == [] and r.gm.finished


def test_malformed_group_id_is_invalid_id_information() -> None:
    p1 = phase1()
    gm = PullInitiator(p1.gm, GROUP)
    # ID_IPV4_ADDR instead of ID_KEY_ID
    bad = p1.gm.seal_hashed(
        ExchangeType.GROUPKEY_PULL,
        gm.message_id,
        [gm_nonce(gm), IdPayload(IdType.ID_IPV4_ADDR, 0, 0, bytes(4))],
    )
    ks = PullResponder(p1.ks, directory(make_tek("esp-gcm-256", T0)), gm.message_id, T0)
    out = ks.receive(bad, T0)
    [ev] = out.events
    assert isinstance(ev, PullFailed) and ev.notify == NotifyType.INVALID_ID_INFORMATION
    n = p1.gm.open_informational(out.send[0]).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_ID_INFORMATION


def gm_nonce(gm: PullInitiator):  # noqa: ANN201
    from gdoid.protocol.payloads import NoncePayload

    return NoncePayload(gm.ni_b)


def test_unauthorized_member_authentication_failed() -> None:
    d = directory(make_tek("esp-gcm-256", T0))
    d.refuse = "not on the list"
    r = run_pull(d)
    [fail] = r.ks_events
    assert isinstance(fail, PullFailed) and fail.notify == NotifyType.AUTHENTICATION_FAILED
    n = r.p1.gm.open_informational(r.wire[-1]).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.AUTHENTICATION_FAILED


def test_unsupported_transform_refused_nothing_installed() -> None:
    tek = make_tek("esp-cbc-256-sha256", T0)
    # ESP_3DES (3): the KS builds it faithfully; the GM cannot implement it.
    odd = dataclasses.replace(
        tek,
        policy=dataclasses.replace(
            tek.policy,
            transform=TekTransform(3, 256, tek.policy.transform.integrity),  # type: ignore[arg-type]  # an unsupported transform on purpose
        ),
    )
    r = run_pull(directory(odd, kek=make_kek(T0)))
    assert len(r.seen) == 2  # (1), (2), then the GM's notify
    sa = GdoiSaPayload.decode_body(r.seen[1].body(PayloadType.SA))
    assert sa.sats[0].transform_id == 3
    [ev] = r.gm_events
    assert isinstance(ev, PullFailed) and not ev.received
    assert ev.notify == NotifyType.INVALID_TRANSFORM_ID
    assert not any(isinstance(e, Registered) for e in r.gm_events)
    assert r.gm.finished
    # The GM told the KS, protected by phase 1.
    n = r.p1.ks.open_informational(r.wire[-1]).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_TRANSFORM_ID
    assert r.ks_events == []  # the KS never got message 3


def test_unsupported_sat_attribute_refused() -> None:
    """Tampering the SAT (re-hashed, so only policy checking can catch it)."""

    def rewrite(m: bytes, chain: Chain) -> bytes:
        return reseal_message_2(
            chain,
            m,
            lambda sa_body: sa_body.replace(
                struct.pack("!HH", 0x8000 | IpsecAttribute.ENCAPSULATION_MODE, 1),
                struct.pack("!HH", 0x8000 | IpsecAttribute.ENCAPSULATION_MODE, 2),
            ),
        )

    r = run_pull(directory(make_tek("esp-gcm-256", T0)), tamper={1: rewrite})
    [ev] = r.gm_events
    assert isinstance(ev, PullFailed)
    assert ev.notify == NotifyType.ATTRIBUTES_NOT_SUPPORTED
    n = r.p1.ks.open_informational(r.wire[-1]).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.ATTRIBUTES_NOT_SUPPORTED


# Tampering helpers: they need the IV the message was encrypted with (the chain's
# current IV, before Chain.open consumes the message).


def _reseal(chain: Chain, m: bytes, payloads: list[tuple[int, bytes]]) -> bytes:
    hdr = IsakmpHeader.decode(m)
    body = b"".join(raw for _, raw in payloads)
    body = crypto.pad_zero(body)
    ct = crypto.aes_cbc_encrypt(chain.key, chain.iv, body)
    new = build_header(
        hdr.initiator_cookie,
        hdr.responder_cookie,
        hdr.next_payload,
        hdr.exchange_type,
        hdr.flags,
        hdr.message_id,
        len(ct),
    )
    return new.encode() + ct


def _plain(chain: Chain, m: bytes) -> list[tuple[int, bytes]]:
    hdr = IsakmpHeader.decode(m)
    return walk_chain(hdr.next_payload, crypto.aes_cbc_decrypt(chain.key, chain.iv, m[HEADER_LEN:]))


def reseal_message_2(chain: Chain, m: bytes, edit) -> bytes:  # noqa: ANN001
    """Edit the SA body of message 2 and recompute a *valid* HASH(2)."""
    payloads = _plain(chain, m)
    (ht, hraw), (nt, nraw), (st, sraw) = payloads
    new_sa = sraw[:4] + edit(sraw[4:])
    assert new_sa != sraw
    new_sa = new_sa[:2] + struct.pack("!H", len(new_sa)) + new_sa[4:]
    h = prf_a(chain.sa, chain.mid.to_bytes(4, "big") + chain.ni_b + nraw + new_sa)
    hraw = hraw[:4] + h
    return _reseal(chain, m, [(ht, hraw), (nt, nraw), (st, new_sa)])


def test_tampered_hash2_invalid_hash_information() -> None:
    def flip(m: bytes, chain: Chain) -> bytes:
        payloads = _plain(chain, m)
        ht, hraw = payloads[0]
        hraw = hraw[:4] + bytes([hraw[4] ^ 0x01]) + hraw[5:]
        return _reseal(chain, m, [(ht, hraw), *payloads[1:]])

    r = run_pull(directory(make_tek("esp-gcm-256", T0)), tamper={1: flip})
    [ev] = r.gm_events
    assert isinstance(ev, PullFailed) and ev.notify == NotifyType.INVALID_HASH_INFORMATION
    assert not ev.received
    n = r.p1.ks.open_informational(r.wire[-1]).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_HASH_INFORMATION
    assert r.gm.finished


def test_tampered_hash1_invalid_hash_information() -> None:
    def flip(m: bytes, chain: Chain) -> bytes:
        payloads = _plain(chain, m)
        ht, hraw = payloads[0]
        return _reseal(chain, m, [(ht, hraw[:-1] + bytes([hraw[-1] ^ 0x80])), *payloads[1:]])

    r = run_pull(directory(make_tek("esp-gcm-256", T0)), tamper={0: flip})
    [ev] = r.ks_events
    assert isinstance(ev, PullFailed) and ev.notify == NotifyType.INVALID_HASH_INFORMATION
    n = r.p1.gm.open_informational(r.wire[-1]).get(NotifyPayload)
    assert n is not None and n.notify_type == NotifyType.INVALID_HASH_INFORMATION


# --- retransmission and robustness ---------------------------------------------


def test_lost_message_2_retransmitted_and_answered_from_cache() -> None:
    p1 = phase1()
    d = directory(make_tek("esp-gcm-256", T0))
    gm = PullInitiator(p1.gm, GROUP, retransmit_interval=2.0)
    [m1] = gm.start(T0).send
    ks = PullResponder(p1.ks, d, gm.message_id, T0)
    [m2] = ks.receive(m1, T0).send  # lost
    out = gm.on_timeout(T0 + 2.0)
    assert out.send == [m1]
    assert ks.receive(m1, T0 + 2.0).send == [m2]  # cached, not re-encrypted
    [m3] = gm.receive(m2, T0 + 2.0).send
    [m4] = ks.receive(m3, T0 + 2.0).send
    out = gm.receive(m4, T0 + 2.0)
    assert isinstance(out.events[0], Registered)
    assert len(d.allocated) == 1  # one allocation despite the retransmission


def test_pull_initiator_gives_up() -> None:
    p1 = phase1()
    gm = PullInitiator(p1.gm, GROUP, retransmit_interval=1.0, retransmit_count=2)
    gm.start(T0)
    sends = 0
    events: list[object] = []
    while not gm.finished:
        assert gm.deadline is not None
        out = gm.on_timeout(gm.deadline)
        sends += len(out.send)
        events += out.events
    assert sends == 2
    [ev] = events
    assert isinstance(ev, PullFailed) and ev.notify is None


def test_garbage_to_pull_machines_is_dropped() -> None:
    import random

    rng = random.Random(3)
    p1 = phase1()
    gm = PullInitiator(p1.gm, GROUP)
    [m1] = gm.start(T0).send
    ks = PullResponder(p1.ks, directory(make_tek("esp-gcm-256", T0)), gm.message_id, T0)
    hdr = IsakmpHeader.decode(m1)
    for n in (0, 5, 16, 32, 33, 64, 200):
        body = rng.randbytes(n)
        h = build_header(
            hdr.initiator_cookie,
            hdr.responder_cookie,
            PayloadType.HASH,
            ExchangeType.GROUPKEY_PULL,
            HeaderFlag.ENCRYPTION,
            gm.message_id,
            len(body),
        )
        data = h.encode() + body
        for machine in (gm, ks):
            out = machine.receive(data, T0)
            assert out.events == [] and out.send == []
            assert out.drops
    # both still work
    [m2] = ks.receive(m1, T0).send
    [m3] = gm.receive(m2, T0).send
    [m4] = ks.receive(m3, T0).send
    assert isinstance(gm.receive(m4, T0).events[0], Registered)


def test_decoded_payload_chain_matches_library() -> None:
    """Sanity: our walker and the library's decoder agree on message (4)."""
    r = run_pull(directory(make_tek("esp-gcm-256", T0), kek=make_kek(T0)))
    m4 = r.seen[3]
    plain = b"".join(raw for _, raw in m4.payloads)
    lib = decode_payloads(m4.header.next_payload, plain)
    assert [d.raw for d in lib] == [raw for _, raw in m4.payloads]
    assert isinstance(lib[0].payload, HashPayload)
    assert isinstance(lib[1].payload, SeqPayload) and lib[1].payload.seq == 7
