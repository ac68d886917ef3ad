"""ESP over IPv6 (issue 11 §3): EspSa against scapy, the outer header, and the engine
with IPv6 selectors, ICMPv6 Packet Too Big, ECN, extension headers and bad input."""

from __future__ import annotations

import os
import random
import socket
import struct
from ipaddress import IPv6Address, IPv6Network

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.layers.ipsec import ESP
from scapy.packet import Raw, raw

from gdoid.dataplane.engine import Dataplane, DropReason, EspError
from gdoid.dataplane.esp import EspSa
from gdoid.dataplane.forwarder import ipv6_header
from gdoid.protocol.policy import TrafficSelector
from tests.esp6data import (
    NET4,
    NET6,
    T0,
    TRANSFORMS,
    A,
    B,
    make_tek,
    pair,
    scapy_sa,
    sids,
    udp6,
)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("size", [40, 48, 77, 1400])
def test_ours_to_scapy(name: str, size: int) -> None:
    tek = make_tek(name)
    sa = EspSa(tek, sids(3))
    inner = udp6(size=size) if size >= 48 else raw(IPv6(src=A, dst=B, nh=59))
    for _ in range(3):
        outer = sa.encapsulate(inner)
        assert IPv6(outer).nh == 50
        dec = scapy_sa(tek, inner).decrypt(IPv6(outer))
        assert raw(dec) == inner


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("size", [40, 64, 333, 1400])
def test_scapy_to_ours(name: str, size: int) -> None:
    tek = make_tek(name)
    sa = EspSa(tek, sids(3))
    inner = udp6(size=size) if size >= 48 else raw(IPv6(src=A, dst=B, nh=59))
    ssa = scapy_sa(tek, inner)
    ivlen = 8 if tek.policy.transform.is_gcm else 16
    for seq in (1, 2, 0xFFFFFFFF):
        enc = ssa.encrypt(IPv6(inner), seq_num=seq, iv=os.urandom(ivlen))
        assert sa.decapsulate(raw(enc)) == (inner, None)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_outer_header_copies_inner_fields(name: str) -> None:
    sa = EspSa(make_tek(name), sids(3))
    inner = udp6(hlim=17, tc=0xB9, fl=0xABCDE)
    o1, o2 = sa.encapsulate(inner), sa.encapsulate(inner)
    p = IPv6(o1)
    assert (p.src, p.dst, p.hlim, p.tc, p.fl, p.nh) == (A, B, 17, 0xB9, 0xABCDE, 50)
    assert p.plen == len(o1) - 40 and len(o1) == sa.outer_len(len(inner)) + 20
    assert p[ESP].spi == 0x66000001 and IPv6(o2)[ESP].seq == p[ESP].seq + 1 == 2
    for bad, reason in (
        (b"\x50" + bytes(39), DropReason.NOT_IPV4),
        (inner[:-1], DropReason.MALFORMED),  # payload length disagrees
        (inner[:39], DropReason.MALFORMED),
    ):
        with pytest.raises(EspError) as ei:
            sa.encapsulate(bad)
        assert ei.value.reason == reason


def test_tbar_metadata_over_ipv6() -> None:
    tek = make_tek("esp-gcm-256", tbar_window_ms=5000)
    sa = EspSa(tek, sids(3))
    inner = udp6()
    outer = sa.encapsulate(inner, pseudotime_ms=123456)
    assert EspSa(tek).decapsulate(outer) == (inner, 123456)
    dec = raw(scapy_sa(tek, inner).decrypt(IPv6(outer)))  # next header 253: raw bytes back
    assert dec[:12] == struct.pack("!BBHQ", 41, 12, 0, 123456) and dec[12:] == inner


# --- the engine --------------------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_engine_round_trip_and_address_preservation(name: str) -> None:
    a, b = pair(make_tek(name))
    inner = udp6()
    r = a.outbound(inner, T0)
    assert r.drop is None and len(r.to_network) == 1
    outer = r.to_network[0]
    assert outer[8:40] == inner[8:40] and outer[6] == 50
    assert b.inbound(outer, T0).to_tun == [inner]
    assert b.inbound(outer, T0).drop is None  # no replay window in this policy
    # an outer address that differs from the inner one is refused after decryption
    moved = bytearray(outer)
    moved[39] ^= 1
    assert b.inbound(bytes(moved), T0).drop == DropReason.MALFORMED
    assert b.stats(T0)["sas"][0]["pkts_decaps"] == 2


def test_replay_window_keyed_by_ipv6_source() -> None:
    a, b = pair(make_tek(replay_window=64))
    outer = a.outbound(udp6(), T0).to_network[0]
    assert b.inbound(outer, T0).drop is None
    assert b.inbound(outer, T0).drop == DropReason.REPLAY


def test_families_do_not_mix() -> None:
    """An IPv4 TEK never protects IPv6 and an IPv6 TEK (even ::/0) never IPv4; a dual-stack
    group (one TEK per family) protects both and routes both prefixes."""
    any6 = TrafficSelector(IPv6Network("::/0"), IPv6Network("::/0"))
    tek4 = make_tek(spi=0x44, selector=TrafficSelector(NET4, NET4))
    tek6 = make_tek(spi=0x66, selector=any6)
    only4, _ = pair(tek4, fail_close=True)
    udp6_pkt = udp6()
    r = only4.outbound(udp6_pkt, T0)
    assert r.to_network == [udp6_pkt] and r.drop is None  # in the clear: not ours
    only6, peer6 = pair(tek6, fail_close=True)
    v4 = raw(IP(src="10.1.0.1", dst="10.2.0.1") / UDP() / Raw(b"x" * 20))
    assert only6.outbound(v4, T0).to_network == [v4]
    # an IPv4 ESP packet under the IPv6 TEK's SPI: decrypts, but the family is wrong
    sa = EspSa(tek6, sids(9))
    assert peer6.inbound(sa.encapsulate(v4), T0).drop == DropReason.MALFORMED
    dual, dual_peer = pair(tek4, tek6)
    assert dual.protected_prefixes() == [NET4, IPv6Network("::/0")]
    o4 = dual.outbound(v4, T0).to_network[0]
    o6 = dual.outbound(udp6_pkt, T0).to_network[0]
    assert o4[0] == 0x45 and o4[9] == 50 and o6[0] >> 4 == 6 and o6[6] == 50
    assert dual_peer.inbound(o4, T0).to_tun == [v4]
    assert dual_peer.inbound(o6, T0).to_tun == [udp6_pkt]
    spis = {s["spi"]: s["pkts_encaps"] for s in dual.stats(T0)["sas"]}
    assert spis == {0x44: 1, 0x66: 1}


def test_ipv6_selector_with_ports_and_fragments() -> None:
    sel = TrafficSelector(NET6, NET6, ip_protocol=17, dst_port=2000)
    a, b = pair(make_tek(selector=sel), fail_close=True)
    assert a.outbound(udp6(), T0).to_network[0][6] == 50  # dport 2000: protected
    other = raw(IPv6(src=A, dst=B) / UDP(sport=1000, dport=2001) / Raw(b"x" * 20))
    assert a.outbound(other, T0).to_network == [other]  # not the selector's port: clear
    # the ports behind a destination-options header still count
    opts = raw(IPv6(src=A, dst=B) / IPv6ExtHdrDestOpt() / UDP(sport=1000, dport=2000) / Raw(b"y"))
    assert a.outbound(opts, T0).to_network[0][6] == 50
    # a non-first fragment carries no ports: protected rather than leaked (RFC 4301 §7)
    frag = raw(IPv6(src=A, dst=B) / IPv6ExtHdrFragment(nh=17, offset=100, m=0) / Raw(b"z" * 64))
    out = a.outbound(frag, T0).to_network
    assert out[0][6] == 50 and b.inbound(out[0], T0).to_tun == [frag]


def test_fail_close_without_tek_ipv6() -> None:
    dp = Dataplane(fail_close=True)
    dp.install(7, [make_tek()], sids(1), None, T0)
    dp.install(7, [], None, None, T0)
    assert dp.protected_prefixes() == [NET6]
    assert dp.outbound(udp6(), T0).drop == DropReason.FAIL_CLOSE


def test_ecn_decapsulation_ipv6() -> None:
    a, b = pair(make_tek())
    inner = udp6(tc=0x02)  # ECT(0)
    outer = bytearray(a.outbound(inner, T0).to_network[0])
    assert IPv6(bytes(outer)).tc == 0x02  # copied (RFC 6040 normal mode)
    outer[1] |= 0x30  # a router marked CE
    got = b.inbound(bytes(outer), T0).to_tun[0]
    assert IPv6(got).tc == 0x03 and got[2:] == inner[2:]
    plain = bytearray(a.outbound(udp6(tc=0), T0).to_network[0])
    plain[1] |= 0x30  # CE over Not-ECT: drop
    assert b.inbound(bytes(plain), T0).drop == DropReason.MALFORMED


@pytest.mark.parametrize("name", TRANSFORMS)
def test_packet_too_big(name: str) -> None:
    tek = make_tek(name)
    dp = Dataplane(mtu=1400)
    dp.install(7, [tek], sids(1), None, T0)
    room = EspSa(tek).max_inner(1380)
    fits = udp6(size=room)
    (out,) = dp.outbound(fits, T0).to_network
    assert len(out) <= 1400
    big = udp6(size=room + 1)
    r = dp.outbound(big, T0)
    assert r.drop == DropReason.TOO_BIG and r.to_network == []
    (icmp,) = r.to_tun
    assert len(icmp) == 1280  # as much of the packet as fits in the minimum MTU
    p = IPv6(icmp)
    assert (p.src, p.dst, p.nh) == (B, A, 58)  # default source: the inner destination
    ptb = p[ICMPv6PacketTooBig]
    assert ptb.mtu == room and raw(ptb.payload) == big[: 1280 - 48]
    chk = ptb.cksum
    ptb.cksum = None
    assert IPv6(raw(p))[ICMPv6PacketTooBig].cksum == chk  # scapy recomputes the same
    dp2 = Dataplane(mtu=1400, icmp6_source=IPv6Address("fd00:2::fe"))
    dp2.install(7, [tek], sids(1), None, T0)
    assert IPv6(dp2.outbound(big, T0).to_tun[0]).src == "fd00:2::fe"
    # never about an ICMPv6 error, nor from a multicast destination
    err = raw(IPv6(src=A, dst=B) / ICMPv6PacketTooBig() / Raw(b"q" * (room + 10)))
    assert dp2.outbound(err, T0).to_tun == []
    mc = udp6(dst="ff05::1", size=room + 1)
    dp3 = Dataplane(mtu=1400)
    dp3.install(7, [make_tek(name, selector=TrafficSelector(NET6, IPv6Network("ff00::/8")))],
                sids(1), None, T0)  # fmt: skip
    assert dp3.outbound(mc, T0).to_tun == [] and dp3.outbound(mc, T0).drop == DropReason.TOO_BIG


def test_extension_header_before_esp_is_a_counted_drop() -> None:
    a, b = pair(make_tek())
    outer = a.outbound(udp6(), T0).to_network[0]
    p = IPv6(outer)
    esp = raw(p.payload)
    with_opts = raw(IPv6(src=p.src, dst=p.dst) / IPv6ExtHdrDestOpt(nh=50) / Raw(esp))
    r = b.inbound(with_opts, T0)
    assert r.drop == DropReason.IPV6_EXT_HEADER and r.to_tun == []
    assert b.stats(T0)["drops"]["ipv6-ext-header"] == 1
    assert b.inbound(outer, T0).to_tun  # the same ESP without it is fine


def test_random_ipv6_input_never_raises() -> None:
    rnd = random.Random(6)
    a, b = pair(make_tek(), make_tek("esp-cbc-256-sha256", spi=0x66000002))
    good = a.outbound(udp6(), T0).to_network[0]
    for i in range(3000):
        n = rnd.randrange(0, 200)
        pkt = bytearray(rnd.randbytes(n))
        if n:
            pkt[0] = 0x60 | (pkt[0] & 15)
        if i % 3 == 0 and n > 48:
            pkt[:44] = good[:44]  # a known SPI: reaches the crypto
            pkt[4:6] = struct.pack("!H", n - 40)
        b.inbound(bytes(pkt), T0)
        a.outbound(bytes(pkt), T0)
    assert a.internal_errors == b.internal_errors == 0


def test_forwarder_rebuilds_the_ipv6_header() -> None:
    """An AF_INET6 raw socket strips the header; recvmsg's ancillary data brings it back."""
    esp = os.urandom(60)
    dst = socket.inet_pton(socket.AF_INET6, B)
    anc = [
        (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, dst + struct.pack("=I", 3)),
        (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, struct.pack("=i", 0xB9)),
        (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("=i", 61)),
    ]
    p = IPv6(ipv6_header(esp, anc, A) + esp)
    assert (p.src, p.dst, p.tc, p.hlim, p.nh, p.plen) == (A, B, 0xB9, 61, 50, 60)
    # the kernel reports a destination-options header it processed before ESP
    anc.append((socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes((50, 0, 1, 4, 0, 0, 0, 0))))
    dp = Dataplane()
    dp.install(7, [make_tek()], sids(1), None, T0)
    assert dp.inbound(ipv6_header(esp, anc, A) + esp, T0).drop == DropReason.IPV6_EXT_HEADER
