"""TEKs and inner IPv4 packets for the data-path tests."""

from __future__ import annotations

import os
from ipaddress import IPv4Network

from scapy.layers.inet import IP, UDP
from scapy.packet import Raw, raw

from gdoid.protocol.policy import SenderIds, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.transforms import TekTransform

NET = IPv4Network("10.0.0.0/8")
A, B = "10.1.0.1", "10.2.0.1"
T0 = 1_000_000.0


def make_tek(
    transform: str = "esp-gcm-128",
    spi: int = 0x11223344,
    created: float = T0,
    lifetime: float = 3600,
    selector: TrafficSelector | None = None,
    **policy,
) -> Tek:
    t = TekTransform.from_name(transform)
    sel = selector or TrafficSelector(NET, NET)
    pol = TekPolicy(1, t, sel, int(lifetime), **policy)
    return Tek(
        spi,
        pol,
        os.urandom(t.cipher_key_len),
        os.urandom(t.integrity_key_len),
        created,
        created + lifetime,
    )


def udp(src: str = A, dst: str = B, size: int = 100, df: bool = True, **ip) -> bytes:
    payload = os.urandom(max(0, size - 28))
    return raw(
        IP(src=src, dst=dst, flags="DF" if df else 0, **ip)
        / UDP(sport=1000, dport=2000)
        / Raw(payload)
    )


def sids(*values: int, bits: int = 8) -> SenderIds:
    return SenderIds(bits, values)
