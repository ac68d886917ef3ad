"""ESPv6 test data shared by tests/test_esp6.py and tests/test_keylog6.py: TEKs, packets, scapy SAs."""

from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network

from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw, raw

from gdoid.dataplane.engine import Dataplane
from gdoid.protocol.policy import SenderIds, Tek, TekPolicy, TekTransform, TrafficSelector

TRANSFORMS = ["esp-gcm-128", "esp-gcm-256", "esp-cbc-128-sha256", "esp-cbc-256-sha256"]
NET6 = IPv6Network("fd00::/8")
NET4 = IPv4Network("10.0.0.0/8")
A, B = "fd00:1::1", "fd00:2::1"
T0 = 1_000_000.0


def make_tek(
    transform: str = "esp-gcm-128",
    spi: int = 0x66000001,
    selector: TrafficSelector | None = None,
    **policy,
) -> Tek:
    t = TekTransform.from_name(transform)
    pol = TekPolicy(1, t, selector or TrafficSelector(NET6, NET6), 3600, **policy)
    return Tek(
        spi, pol, os.urandom(t.cipher_key_len), os.urandom(t.integrity_key_len), T0, T0 + 3600
    )


def udp6(src: str = A, dst: str = B, size: int = 100, **ip) -> bytes:
    """An IPv6/UDP packet of ``size`` octets."""
    return raw(
        IPv6(src=src, dst=dst, **ip) / UDP(sport=1000, dport=2000) / Raw(os.urandom(size - 48))
    )


def sids(*values: int) -> SenderIds:
    return SenderIds(8, values)


def scapy_sa(tek: Tek, inner: bytes) -> SecurityAssociation:
    p = IPv6(inner)
    hdr = IPv6(src=p.src, dst=p.dst)
    if tek.policy.transform.is_gcm:
        return SecurityAssociation(
            ESP, spi=tek.spi, crypt_algo="AES-GCM", crypt_key=tek.cipher_key, auth_algo=None,
            tunnel_header=hdr,
        )  # fmt: skip
    return SecurityAssociation(
        ESP, spi=tek.spi, crypt_algo="AES-CBC", crypt_key=tek.cipher_key,
        auth_algo="SHA2-256-128", auth_key=tek.integrity_key, tunnel_header=hdr,
    )  # fmt: skip


def pair(*teks: Tek, **kw) -> tuple[Dataplane, Dataplane]:
    a, b = Dataplane(**kw), Dataplane(**kw)
    a.install(7, list(teks), sids(1), 5_000, T0)
    b.install(7, list(teks), sids(2), 5_000, T0)
    return a, b


# --- scapy interop -----------------------------------------------------------------
