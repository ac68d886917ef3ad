"""ESP data path: EspSa against scapy, replay/TBAR, and the Dataplane engine."""

from __future__ import annotations

import contextlib
import os
import random
import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR, defragment
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw, raw

from gdoid.dataplane.engine import (
    Dataplane,
    DropReason,
    EspError,
    NullDataplane,
    Result,
    fragment_ipv4,
)
from gdoid.dataplane.esp import EspSa, ipv4_checksum
from gdoid.dataplane.replay import SequenceWindow, TbarClock, tbar_ok
from gdoid.protocol.policy import SenderIds, Tek, TrafficSelector
from tests.espdata import (
    NET,
    T0,
    A,
    B,
    make_tek,
    sids,
    udp,
)

TRANSFORMS = ["esp-gcm-128", "esp-gcm-256", "esp-cbc-128-sha256", "esp-cbc-256-sha256"]


def scapy_sa(tek: Tek, inner: bytes) -> SecurityAssociation:
    p = IP(inner)
    hdr = IP(src=p.src, dst=p.dst)
    if tek.policy.transform.is_gcm:
        return SecurityAssociation(
            ESP,
            spi=tek.spi,
            crypt_algo="AES-GCM",
            crypt_key=tek.cipher_key,
            auth_algo=None,
            tunnel_header=hdr,
        )
    return SecurityAssociation(
        ESP,
        spi=tek.spi,
        crypt_algo="AES-CBC",
        crypt_key=tek.cipher_key,
        auth_algo="SHA2-256-128",
        auth_key=tek.integrity_key,
        tunnel_header=hdr,
    )


def esp_plaintext(tek: Tek, outer: bytes) -> bytes:
    """Decrypt an outer packet independently of EspSa: the padded plaintext."""
    hl = (outer[0] & 15) * 4
    esp = outer[hl:]
    if tek.policy.transform.is_gcm:
        nonce = tek.cipher_key[-4:] + esp[8:16]
        return AESGCM(tek.cipher_key[:-4]).decrypt(nonce, esp[16:], esp[:8])
    iv, ct = esp[8:24], esp[24:-16]
    d = Cipher(algorithms.AES(tek.cipher_key), modes.CBC(iv)).decryptor()
    return d.update(ct) + d.finalize()


def pair(*teks: Tek, sender_a: int = 1, sender_b: int = 2, **kw) -> tuple[Dataplane, Dataplane]:
    a, b = Dataplane(**kw), Dataplane(**kw)
    a.install(7, list(teks), sids(sender_a), 5_000, T0)
    b.install(7, list(teks), sids(sender_b), 5_000, T0)
    return a, b


# --- scapy interop -------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("size", [20, 28, 61, 100, 1400])
def test_ours_to_scapy(name: str, size: int) -> None:
    tek = make_tek(name)
    sa = EspSa(tek, sids(3))
    inner = udp(size=size) if size >= 28 else raw(IP(src=A, dst=B, proto=59))
    for _ in range(3):
        outer = sa.encapsulate(inner)
        dec = scapy_sa(tek, inner).decrypt(IP(outer))
        assert raw(dec) == inner


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("size", [20, 64, 333, 1400])
def test_scapy_to_ours(name: str, size: int) -> None:
    tek = make_tek(name)
    sa = EspSa(tek, sids(3))
    inner = udp(size=size) if size >= 28 else raw(IP(src=A, dst=B, proto=59))
    ssa = scapy_sa(tek, inner)
    ivlen = 8 if tek.policy.transform.is_gcm else 16
    for seq in (1, 2, 0xFFFFFFFF):
        enc = ssa.encrypt(IP(inner), seq_num=seq, iv=os.urandom(ivlen))
        got, pseudotime = sa.decapsulate(raw(enc))
        assert got == inner and pseudotime is None


@pytest.mark.parametrize("name", TRANSFORMS)
def test_outer_header(name: str) -> None:
    sa = EspSa(make_tek(name), sids(3))
    inner = udp(ttl=17, tos=0xB9, df=True)
    o1, o2 = sa.encapsulate(inner), sa.encapsulate(inner)
    p = IP(o1)
    assert (p.src, p.dst, p.ttl, p.tos, p.proto, p.ihl) == (A, B, 17, 0xB9, 50, 5)
    assert p.flags == "DF" and p.frag == 0 and p.len == len(o1)
    assert ipv4_checksum(o1[:20]) == 0
    assert IP(o2).id == (p.id + 1) & 0xFFFF
    assert IP(o2)[ESP].seq == p[ESP].seq + 1 == 2
    assert p[ESP].spi == 0x11223344
    assert not IP(sa.encapsulate(udp(df=False))).flags.DF
    ivlen = 8 if sa.is_gcm else 16
    assert o1[28 : 28 + ivlen] != o2[28 : 28 + ivlen]
    # inner IPv4 options stay inside; the outer header never has any
    with_opts = raw(IP(src=A, dst=B, options=[IPOption_RR()]) / UDP() / Raw(b"o" * 50))
    o3 = sa.encapsulate(with_opts)
    assert o3[0] == 0x45 and EspSa(sa.tek).decapsulate(o3)[0] == with_opts
    for bad, reason in (
        (b"\x50" + bytes(39), DropReason.NOT_IPV4),  # version 5: IPv6 is handled now
        (inner[:-1], DropReason.MALFORMED),
    ):
        with pytest.raises(EspError) as ei:
            sa.encapsulate(bad)
        assert ei.value.reason == reason


def test_tbar_metadata_round_trip() -> None:
    for name in TRANSFORMS:
        tek = make_tek(name)
        sa = EspSa(tek, sids(3))
        inner = udp(size=77)
        outer = sa.encapsulate(inner, pseudotime_ms=0x0102030405060708)
        assert sa.decapsulate(outer) == (inner, 0x0102030405060708)
        pt = esp_plaintext(tek, outer)
        assert pt[-1] == 253
        assert pt[:12] == bytes([4, 12, 0, 0]) + (0x0102030405060708).to_bytes(8, "big")
        assert pt[12 : 12 + len(inner)] == inner
        # scapy sees next header 253 and hands back metadata | inner as raw bytes
        dec = scapy_sa(tek, inner).decrypt(IP(outer))
        assert raw(dec)[:12] == pt[:12] and raw(dec)[12:] == inner


@pytest.mark.parametrize("name", TRANSFORMS)
def test_padding(name: str) -> None:
    tek = make_tek(name)
    sa = EspSa(tek, sids(3))
    align = 4 if tek.policy.transform.is_gcm else 16
    for size in range(20, 80):
        inner = raw(IP(src=A, dst=B, proto=59) / Raw(b"x" * (size - 20)))
        for pseudotime in (None, 1234):
            outer = sa.encapsulate(inner, pseudotime)
            pt = esp_plaintext(tek, outer)
            meta = 0 if pseudotime is None else 12
            assert len(pt) % align == 0
            padlen = pt[-2]
            assert padlen == -(size + meta + 2) % align
            assert pt[len(pt) - 2 - padlen : -2] == bytes(range(1, padlen + 1))
            assert pt[-1] == (4 if pseudotime is None else 253)
            assert len(outer) == sa.outer_len(size, pseudotime is not None)


def test_bad_padding_and_next_header_rejected() -> None:
    tek = make_tek("esp-gcm-128")
    sa = EspSa(tek, sids(3))
    inner = raw(IP(src=A, dst=B, proto=59) / Raw(b"x" * 3))  # 23 octets: pad length 3
    aead = AESGCM(tek.cipher_key[:-4])

    def forge(pt: bytes) -> bytes:
        hdr = struct.pack("!IIQ", tek.spi, 9, 77)
        ct = aead.encrypt(tek.cipher_key[-4:] + hdr[8:], pt, hdr[:8])
        ipb = bytearray(raw(IP(src=A, dst=B, proto=50, len=20 + 16 + len(ct))))
        return bytes(ipb) + hdr + ct

    assert sa.decapsulate(forge(inner + b"\x01\x02\x03\x03\x04"))[0] == inner
    for bad in (
        inner + b"\x01\x02\x04\x03\x04",  # wrong pad byte
        inner + b"\x01\x02\x03\x03\x29",  # next header 41
        inner + b"\x01\x02\x03\x40\x04",  # pad length beyond the payload
        inner[:11] + b"\x01\x02\x03\x03\xfd",  # TBAR with too little metadata
    ):
        with pytest.raises(EspError) as ei:
            sa.decapsulate(forge(bad))
        assert ei.value.reason == DropReason.MALFORMED


# --- drops: corruption, truncation, garbage --------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_corruption_every_octet(name: str) -> None:
    tek = make_tek(name)
    a, b = pair(tek)
    outer = a.outbound(udp(size=90), T0).to_network[0]
    assert b.inbound(outer, T0).to_tun
    reasons = set()
    for i in range(20, len(outer)):
        bad = bytearray(outer)
        bad[i] ^= 0x40
        r = b.inbound(bytes(bad), T0)
        assert r.to_tun == [] and r.to_network == [] and r.drop is not None
        reasons.add(r.drop)
        if i >= 24:  # beyond the SPI: the ICV check catches it
            assert r.drop == DropReason.ICV
    assert reasons == {DropReason.NO_SA, DropReason.ICV}
    st = b.stats(T0)
    assert st["drops"]["icv"] == len(outer) - 24
    assert st["sas"][0]["drops"]["icv"] == len(outer) - 24
    assert st["sas"][0]["pkts_decaps"] == 1


@pytest.mark.parametrize("name", TRANSFORMS)
def test_truncation_every_length(name: str) -> None:
    tek = make_tek(name)
    a, b = pair(tek)
    inner = udp(size=120)
    outer = a.outbound(inner, T0).to_network[0]
    drops = 0
    for cut in range(len(outer)):
        short = outer[:cut]
        r = b.inbound(short, T0)
        assert r.drop is not None and not r.to_tun
        drops += 1
        # also with the IPv4 length fixed up, so it reaches the ESP layer
        if cut >= 20:
            fixed = bytearray(short)
            struct.pack_into("!H", fixed, 2, cut)
            r = b.inbound(bytes(fixed), T0)
            assert r.drop is not None and not r.to_tun
            drops += 1
        with pytest.raises(EspError):
            EspSa(tek).decapsulate(short)
    assert sum(b.stats(T0)["drops"].values()) == drops
    assert b.stats(T0)["internal_errors"] == 0
    assert b.inbound(outer, T0).to_tun == [inner]


def test_unknown_spi_and_expired() -> None:
    tek = make_tek()
    a = Dataplane()
    a.install(7, [tek], sids(1), None, T0)
    b = Dataplane()
    b.install(7, [make_tek(spi=0x99)], sids(2), None, T0)
    outer = a.outbound(udp(), T0).to_network[0]
    assert b.inbound(outer, T0).drop == DropReason.NO_SA
    b.install(7, [tek], None, None, T0)
    assert b.inbound(outer, T0 + 4000).drop == DropReason.EXPIRED
    st = b.stats(T0)["drops"]
    assert st["no-sa"] == 1 and st["expired"] == 1


def test_random_bytes_never_raise() -> None:
    rng = random.Random(1)
    teks = [make_tek(n, spi=i + 1) for i, n in enumerate(TRANSFORMS)]
    dp = Dataplane(fail_close=True)
    dp.install(7, teks, sids(1), 10, T0)
    sas = [EspSa(t, sids(1)) for t in teks]
    for i in range(4000):
        n = rng.choice([0, 1, 19, 20, 21, 40, 60, 200, 1500, 3000])
        data = bytearray(rng.randbytes(n))
        if n >= 24 and i % 2:
            data[0] = 0x45
            data[6:8] = b"\0\0"
            data[9] = 50
            struct.pack_into("!H", data, 2, n)
            struct.pack_into("!I", data, 20, rng.randint(1, 4))
        data = bytes(data)
        for r in (dp.inbound(data, T0), dp.outbound(data, T0)):
            assert isinstance(r, Result)
        for sa in sas:
            with contextlib.suppress(EspError):
                sa.decapsulate(data)
    assert dp.stats(T0)["drops"]["icv"] > 0
    assert dp.stats(T0)["internal_errors"] == 0


def test_random_ipv4_outbound_fragmentation() -> None:
    """Random well-formed-looking IPv4 packets (random options, DF, sizes) through a
    small MTU: every one is either protected (and decrypts back) or dropped."""
    rng = random.Random(2)
    tek = make_tek("esp-cbc-128-sha256", tbar_window_ms=1000)
    a, b = pair(tek, mtu=300)
    for _ in range(1500):
        ihl = rng.randint(5, 15)
        size = rng.randint(ihl * 4, 2000)
        pkt = bytearray(rng.randbytes(size))
        pkt[0] = 0x40 | ihl
        struct.pack_into("!H", pkt, 2, size)
        pkt[6] &= 0x5F  # DF maybe, MF clear
        pkt[12:20] = bytes([10, 1, 0, 1, 10, 2, 0, 1])
        r = a.outbound(bytes(pkt), T0)
        for o in r.to_network:
            assert len(o) <= 300
            got = b.inbound(o, T0)
            assert got.drop is None, got.drop
    for dp in (a, b):
        assert dp.stats(T0)["internal_errors"] == 0


# --- anti-replay ---------------------------------------------------------------


def test_sequence_window() -> None:
    w = SequenceWindow(64)
    assert not w.check_and_update(0)
    assert w.check_and_update(1)
    assert not w.check_and_update(1)
    assert w.check_and_update(100)
    assert w.check_and_update(37)  # 100 - 63: just inside
    assert not w.check_and_update(36)  # too old
    assert not w.check_and_update(37)
    assert w.check_and_update(99)
    assert w.check(98) and not w.check(99)
    assert w.check_and_update(1000)
    assert not w.check_and_update(100)
    assert w.check_and_update(0xFFFFFFFF)
    assert not w.check_and_update(0x100000000)


def test_tbar_clock() -> None:
    c = TbarClock()
    assert c.estimate(T0) is None
    c.update(50_000, T0)
    assert c.estimate(T0 + 1.5) == 51_500
    assert tbar_ok(51_000, 51_500, 500) and not tbar_ok(50_999, 51_500, 500)
    assert not tbar_ok(None, 51_500, 500) and not tbar_ok(51_500, None, 500)


@pytest.mark.parametrize("name", ["esp-gcm-128", "esp-cbc-128-sha256"])
def test_replay_window(name: str) -> None:
    tek = make_tek(name, replay_window=64)
    a, b = pair(tek)
    inner = udp()
    p1 = a.outbound(inner, T0).to_network[0]
    p2 = a.outbound(inner, T0).to_network[0]
    assert b.inbound(p2, T0).to_tun == [inner]
    assert b.inbound(p1, T0).to_tun == [inner]  # out of order but inside the window
    assert b.inbound(p1, T0).drop == DropReason.REPLAY
    assert b.inbound(p2, T0).drop == DropReason.REPLAY
    # another sender with the same sequence numbers has its own window
    c = Dataplane()
    c.install(7, [tek], sids(9), None, T0)
    other = udp(src="10.1.0.2")
    assert b.inbound(c.outbound(other, T0).to_network[0], T0).to_tun == [other]
    rs = b.replay_stats(T0)["groups"][0]
    assert rs["drops"] == {"tbar": 0, "replay": 2} and rs["replay_window"] == 64
    sa = b.stats(T0)["sas"][0]
    assert sa["pkts_decaps"] == 3 and sa["drops"]["replay"] == 2  # replays are not decapsulations


def test_no_replay_window_accepts_duplicates() -> None:
    a, b = pair(make_tek())
    p = a.outbound(udp(), T0).to_network[0]
    assert b.inbound(p, T0).to_tun and b.inbound(p, T0).to_tun


@pytest.mark.parametrize("name", ["esp-gcm-256", "esp-cbc-256-sha256"])
def test_tbar_window(name: str) -> None:
    tek = make_tek(name, tbar_window_ms=1000)
    a, b = Dataplane(), Dataplane()
    a.install(7, [tek], sids(1), 100_000, T0)
    b.install(7, [tek], sids(2), 100_000, T0)
    inner = udp()
    ok = a.outbound(inner, T0 + 10).to_network[0]  # carries pseudotime 110_000
    late = a.outbound(inner, T0 + 10).to_network[0]
    assert b.inbound(ok, T0 + 10.9).to_tun == [inner]
    assert b.inbound(late, T0 + 11.5).drop == DropReason.TBAR
    early = a.outbound(inner, T0 + 20).to_network[0]  # from b's view 1.5 s in the future
    assert b.inbound(early, T0 + 18.5).drop == DropReason.TBAR
    assert b.inbound(early, T0 + 19.5).to_tun == [inner]
    # a packet without TBAR metadata on a TBAR SA
    plain = EspSa(tek, sids(5)).encapsulate(inner)
    assert b.inbound(plain, T0 + 20).drop == DropReason.TBAR
    rs = b.replay_stats(T0 + 20)["groups"][0]
    assert rs["tbar_window_ms"] == 1000 and rs["pseudotime_ms"] == 120_000
    assert rs["drops"]["tbar"] == 3
    assert EspSa(tek).decapsulate(ok)[1] == 110_000


# --- sender IDs and IV counters ------------------------------------------------


def test_sender_ids_give_disjoint_nonces() -> None:
    tek = make_tek("esp-gcm-128")
    inner = raw(IP(src=A, dst=B, proto=59))
    ivs = []
    for sid in (1, 2):
        sa = EspSa(tek, sids(sid, bits=16))
        enc = sa.encapsulate
        seen = {enc(inner)[28:36] for _ in range(200_000)}
        assert len(seen) == 200_000
        assert {iv[:2] for iv in seen} == {sid.to_bytes(2, "big")}
        ivs.append(seen)
    assert not ivs[0] & ivs[1]


def test_counter_exhaustion() -> None:
    tek = make_tek("esp-gcm-128")
    inner = raw(IP(src=A, dst=B, proto=59))
    sa = EspSa(tek, SenderIds(61, (5, 6)))  # 3 counter bits per SID: 8 IVs each
    assert sa.counter_remaining == 16
    ivs = []
    for i in range(16):
        ivs.append(int.from_bytes(sa.encapsulate(inner)[28:36], "big"))
        assert sa.counter_remaining == 15 - i
    assert ivs == [(5 << 3) | c for c in range(8)] + [(6 << 3) | c for c in range(8)]
    with pytest.raises(EspError) as ei:
        sa.encapsulate(inner)
    assert ei.value.reason == DropReason.COUNTER_EXHAUSTED
    # new SIDs (re-registration) continue; a SID already used does not repeat IVs
    sa.set_sender_ids(SenderIds(61, (6, 7)))
    assert sa.counter_remaining == 8
    more = [int.from_bytes(sa.encapsulate(inner)[28:36], "big") for _ in range(8)]
    assert more == [(7 << 3) | c for c in range(8)]
    # a wider SID that covers the used ranges skips past them
    sa.set_sender_ids(SenderIds(60, (2, 3)))  # 2 -> [32, 48) used up to 56: 3 -> [48, 64) partly
    rest = []
    while True:
        try:
            rest.append(int.from_bytes(sa.encapsulate(inner)[28:36], "big"))
        except EspError:
            break
    assert not set(rest) & set(ivs + more) and len(set(rest)) == len(rest)
    # a GCM SA without sender IDs cannot send
    bare = EspSa(tek)
    assert bare.counter_remaining == 0
    with pytest.raises(EspError) as ei:
        bare.encapsulate(inner)
    assert ei.value.reason == DropReason.COUNTER_EXHAUSTED


def test_engine_counter_exhaustion_and_sids_kept_across_rekey() -> None:
    tek = make_tek("esp-gcm-128")
    dp = Dataplane()
    dp.install(7, [tek], SenderIds(62, (1,)), None, T0)
    for _ in range(4):
        assert dp.outbound(udp(), T0).to_network
    assert dp.stats(T0)["sas"][0]["counter_remaining"] == 0
    r = dp.outbound(udp(), T0)
    assert r.drop == DropReason.COUNTER_EXHAUSTED and not r.to_network
    # a rekey without SIDs keeps the group's SIDs; the new TEK starts a fresh counter
    new = make_tek("esp-gcm-128", spi=0x55, created=T0 + 1)
    dp.install(7, [tek, new], None, None, T0 + 1)
    out = dp.outbound(udp(), T0 + 2).to_network[0]
    assert IP(out)[ESP].spi == 0x55
    st = {s["spi"]: s for s in dp.stats(T0 + 2)["sas"]}
    assert st[0x55]["sender_id"] == 1 and st[0x55]["counter_remaining"] == 3
    assert st[tek.spi]["counter_remaining"] == 0


# --- policy: fail-open/close, receive-only, classification ----------------------


@pytest.mark.parametrize("fail_close", [False, True])
def test_fail_open_close_without_tek(fail_close: bool) -> None:
    tek = make_tek()
    dp = Dataplane(fail_close=fail_close)
    inner = udp()
    outside = udp(src="192.168.1.1", dst="192.168.2.2")
    assert dp.outbound(inner, T0).to_network == [inner]  # nothing installed: not ours
    dp.install(7, [tek], sids(1), None, T0)
    assert dp.outbound(outside, T0).to_network == [outside]
    # the TEK expired but is still installed
    r = dp.outbound(inner, T0 + 4000)
    if fail_close:
        assert r.drop == DropReason.FAIL_CLOSE and r.to_network == []
    else:
        assert r.to_network == [inner] and r.drop is None
    # all TEKs removed: the group's selectors still apply
    dp.install(7, [], None, None, T0 + 4000)
    assert dp.protected_prefixes() == [NET]
    r = dp.outbound(inner, T0 + 4000)
    assert (r.drop == DropReason.FAIL_CLOSE) if fail_close else (r.to_network == [inner])
    assert dp.outbound(outside, T0).to_network == [outside]
    dp.remove_group(7)
    assert dp.outbound(inner, T0).to_network == [inner]
    assert dp.protected_prefixes() == []
    st = dp.stats(T0)
    assert st["drops"]["fail-close"] == (2 if fail_close else 0)
    assert st["clear_out"] == (4 if fail_close else 6)


def test_receive_only() -> None:
    ro = make_tek(receive_only=True)
    normal = replace(ro, policy=replace(ro.policy, receive_only=False))
    gm, other = Dataplane(fail_close=True), Dataplane()
    gm.install(7, [ro], sids(1), None, T0)
    other.install(7, [normal], sids(2), None, T0)
    inner = udp()
    assert gm.outbound(inner, T0).to_network == [inner]
    back = udp(src=B, dst=A)
    assert gm.inbound(other.outbound(back, T0).to_network[0], T0).to_tun == [back]


def test_selectors_with_ports_and_protocol() -> None:
    sel = TrafficSelector(IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16"), 17, 0, 2000)
    tek = make_tek(selector=sel)
    a, b = Dataplane(), Dataplane()
    a.install(7, [tek], sids(1), None, T0)
    b.install(7, [tek], sids(2), None, T0)
    hit = udp()
    miss_port = raw(IP(src=A, dst=B) / UDP(sport=1000, dport=2001) / Raw(b"x"))
    miss_proto = raw(IP(src=A, dst=B) / TCP(sport=1000, dport=2000))
    miss_dir = udp(src=B, dst=A)
    assert IP(a.outbound(hit, T0).to_network[0]).proto == 50
    for p in (miss_port, miss_proto, miss_dir):
        assert a.outbound(p, T0).to_network == [p]
    assert a.protected_prefixes() == [IPv4Network("10.2.0.0/16")]
    # inbound accepts the selector in either direction (the reply comes back)
    reply = raw(IP(src=B, dst=A) / UDP(sport=2000, dport=1000) / Raw(b"y"))
    assert b.inbound(EspSa(tek, sids(3)).encapsulate(reply), T0).to_tun == [reply]
    # but not traffic outside it
    wrong = raw(IP(src=B, dst=A) / UDP(sport=2001, dport=1000))
    assert b.inbound(EspSa(tek, sids(3)).encapsulate(wrong), T0).drop == DropReason.MALFORMED


def test_address_preservation_enforced() -> None:
    tek = make_tek()
    a, b = pair(tek)
    outer = bytearray(a.outbound(udp(), T0).to_network[0])
    outer[15] ^= 1  # outer source differs from the inner one
    outer[10:12] = b"\0\0"
    struct.pack_into("!H", outer, 10, ipv4_checksum(outer[:20]))
    assert b.inbound(bytes(outer), T0).drop == DropReason.MALFORMED


def test_not_ipv4_and_malformed_outbound() -> None:
    dp = Dataplane()
    dp.install(7, [make_tek()], sids(1), None, T0)
    v6 = bytes([0x50]) + bytes(39)  # version 5: IPv6 is handled now (test_esp6.py)
    assert dp.outbound(v6, T0).drop == DropReason.NOT_IPV4
    bad_len = bytearray(udp())
    struct.pack_into("!H", bad_len, 2, 1000)
    assert dp.outbound(bytes(bad_len), T0).drop == DropReason.MALFORMED
    assert dp.outbound(b"", T0).drop == DropReason.MALFORMED
    assert dp.inbound(udp(), T0).drop == DropReason.MALFORMED  # not ESP


def test_ecn_decapsulation() -> None:
    tek = make_tek()
    a, b = pair(tek)
    inner = udp(tos=0x02)  # ECT(0)
    outer = bytearray(a.outbound(inner, T0).to_network[0])
    assert outer[1] == 0x02  # copied (RFC 6040 normal mode)
    outer[1] = 0x03  # a router marked CE
    struct.pack_into("!H", outer, 10, 0)
    struct.pack_into("!H", outer, 10, ipv4_checksum(outer[:20]))
    got = b.inbound(bytes(outer), T0).to_tun[0]
    assert got[1] == 0x03 and ipv4_checksum(got[:20]) == 0 and got[12:] == inner[12:]
    # Not-ECT inner with CE outer is dropped
    outer2 = bytearray(a.outbound(udp(tos=0), T0).to_network[0])
    outer2[1] = 0x03
    assert b.inbound(bytes(outer2), T0).drop == DropReason.MALFORMED


def test_ecn_drop_not_counted_as_decapsulated() -> None:
    """A Not-ECT packet dropped for a CE outer mark leaves the decap counters as they were."""
    tek = make_tek()
    a, b = pair(tek)
    inner = udp(tos=0)
    delivered = b.inbound(a.outbound(inner, T0).to_network[0], T0).to_tun
    assert delivered == [inner]
    before = b.stats(T0)["sas"][0]
    outer = bytearray(a.outbound(udp(tos=0), T0).to_network[0])
    outer[1] = 0x03  # CE
    assert b.inbound(bytes(outer), T0).drop == DropReason.MALFORMED
    after = b.stats(T0)["sas"][0]
    assert (after["pkts_decaps"], after["bytes_decaps"]) == (
        before["pkts_decaps"],
        before["bytes_decaps"],
    )
    assert (after["pkts_decaps"], after["bytes_decaps"]) == (1, len(inner))


# --- MTU -----------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_mtu_df_set_sends_icmp(name: str) -> None:
    tek = make_tek(name)
    dp = Dataplane(mtu=1400, icmp_source=IPv4Address("10.2.0.254"))
    dp.install(7, [tek], sids(1), None, T0)
    sa = EspSa(tek)
    room = sa.max_inner(1400)
    assert sa.outer_len(room) <= 1400 < sa.outer_len(room + 1)
    fits = udp(size=room)
    out = dp.outbound(fits, T0).to_network
    assert len(out) == 1 and len(out[0]) <= 1400
    big = udp(size=room + 1)
    r = dp.outbound(big, T0)
    assert r.drop == DropReason.TOO_BIG and r.to_network == []
    (icmp_pkt,) = r.to_tun
    p = IP(icmp_pkt)
    assert p.src == "10.2.0.254" and p.dst == A and p.proto == 1
    assert p[ICMP].type == 3 and p[ICMP].code == 4 and p[ICMP].nexthopmtu == room
    assert raw(p[ICMP].payload)[:28] == big[:28]
    assert ipv4_checksum(icmp_pkt[:20]) == 0 and ipv4_checksum(icmp_pkt[20:]) == 0
    # default ICMP source: the inner destination
    dp2 = Dataplane(mtu=1400)
    dp2.install(7, [tek], sids(1), None, T0)
    assert IP(dp2.outbound(big, T0).to_tun[0]).src == B
    assert dp.stats(T0)["sas"][0]["drops"] == {"too-big": 1}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("tbar", [False, True])
def test_mtu_df_clear_fragments(name: str, tbar: bool) -> None:
    tek = make_tek(name, tbar_window_ms=5000 if tbar else None)
    a, b = pair(tek, mtu=1000)
    inner = udp(size=3001, df=False, id=4242)
    r = a.outbound(inner, T0)
    assert r.drop is None and len(r.to_network) == 4
    assert all(len(o) <= 1000 for o in r.to_network)
    frags = []
    for o in r.to_network:
        got = b.inbound(o, T0)
        assert got.drop is None
        frags += got.to_tun
    whole = defragment([IP(f) for f in frags])
    assert len(whole) == 1 and raw(whole[0]) == inner


def test_fragment_ipv4_of_a_fragment_with_options() -> None:
    opts = bytes([0x83, 7, 4]) + bytes(4) + bytes([0x07, 3, 4, 0])  # LSRR (copied), RR (not)
    pkt = raw(IP(src=A, dst=B, flags="MF", frag=10, options=[]) / Raw(b"z" * 500))
    pkt = bytearray(pkt)
    hdr = bytearray(pkt[:20])
    hdr[0] = 0x48
    struct.pack_into("!H", hdr, 2, 32 + 500)
    struct.pack_into("!H", hdr, 10, 0)
    full = bytes(hdr) + opts + bytes(1) + pkt[20:]
    frags = fragment_ipv4(full, 200)
    assert all(len(f) <= 200 for f in frags)
    assert frags[0][20:32] == opts + bytes(1)
    assert all((f[0] & 15) == 7 and f[20:23] == opts[:3] for f in frags[1:])
    offs = [IP(f).frag for f in frags]
    assert offs[0] == 10 and all(IP(f).flags.MF for f in frags)  # the original had MF
    data = b"".join(f[(f[0] & 15) * 4 :] for f in frags)
    assert data == b"z" * 500
    assert all(ipv4_checksum(f[: (f[0] & 15) * 4]) == 0 for f in frags)


# --- rekey ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["esp-gcm-128", "esp-cbc-128-sha256"])
def test_rekey_old_and_new(name: str) -> None:
    old = make_tek(name, spi=0x1000, created=T0, replay_window=32)
    new = make_tek(name, spi=0x2000, created=T0 + 100, replay_window=32)
    a, b = pair(old)
    inner = udp()
    o1 = a.outbound(inner, T0).to_network[0]
    assert b.inbound(o1, T0).to_tun == [inner]
    sa_before = a._by_spi[0x1000].sa
    for dp in (a, b):
        dp.install(7, [old, new], None, None, T0 + 100, activation_delay=30)
    assert a._by_spi[0x1000].sa is sa_before  # state kept
    assert b.inbound(o1, T0 + 100).drop == DropReason.REPLAY  # window kept
    o2 = a.outbound(inner, T0 + 110).to_network[0]
    assert IP(o2)[ESP].spi == 0x1000 and IP(o2)[ESP].seq == 2
    o3 = a.outbound(inner, T0 + 131).to_network[0]
    assert IP(o3)[ESP].spi == 0x2000
    assert b.inbound(o2, T0 + 131).to_tun == [inner]
    assert b.inbound(o3, T0 + 131).to_tun == [inner]
    # the old TEK removed: its packets are no longer accepted
    b.install(7, [new], None, None, T0 + 200)
    assert b.inbound(a.outbound(inner, T0 + 120).to_network[0], T0 + 200).drop == DropReason.NO_SA
    # an only-pending TEK is still used rather than nothing
    c = Dataplane(fail_close=True)
    c.install(8, [new], sids(4), None, T0 + 100, activation_delay=30)
    assert IP(c.outbound(inner, T0 + 101).to_network[0])[ESP].spi == 0x2000


# --- stats, null dataplane -------------------------------------------------------


def test_stats_shape() -> None:
    tek = make_tek("esp-cbc-128-sha256", tbar_window_ms=500)
    a, b = pair(tek)
    inner = udp(size=200)
    b.inbound(a.outbound(inner, T0).to_network[0], T0)
    st = a.stats(T0 + 10)
    (sa,) = st["sas"]
    assert sa["group"] == 7 and sa["spi"] == tek.spi and sa["transform"] == "esp-cbc-128-sha256"
    assert sa["direction"] == "both" and sa["pkts_encaps"] == 1 and sa["bytes_encaps"] == 200
    assert sa["remaining"] == 3590 and sa["counter_remaining"] is None
    assert set(st["drops"]) == {str(r) for r in DropReason}
    bs = b.stats(T0)["sas"][0]
    assert bs["pkts_decaps"] == 1 and bs["bytes_decaps"] == 200
    rs = a.replay_stats(T0 + 1)
    assert rs == {
        "groups": [
            {
                "group": 7,
                "tbar_window_ms": 500,
                "replay_window": None,
                "pseudotime_ms": 6000,
                "drops": {"tbar": 0, "replay": 0},
            }
        ]
    }


@pytest.mark.parametrize("tbar", [None, 1000])
def test_null_dataplane(tbar: int | None) -> None:
    tek = make_tek(tbar_window_ms=tbar, replay_window=16)
    a, b = NullDataplane(), NullDataplane()
    a.install(7, [tek], sids(1), 0, T0)
    b.install(7, [tek], sids(2), 0, T0)
    inner = udp(size=300)
    (outer,) = a.outbound(inner, T0).to_network
    p = IP(outer)
    assert p.proto == 50 and p.len == 20 + 8 + (12 if tbar else 0) + 300
    assert outer[-300:] == inner
    assert b.inbound(outer, T0).to_tun == [inner]
    assert b.inbound(outer, T0).drop == DropReason.REPLAY
