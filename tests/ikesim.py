"""Phase-1 configurations for in-memory Main Mode tests."""

from __future__ import annotations

from ipaddress import IPv4Address

from gdoid.protocol.constants import (
    AuthenticationMethod,
)
from gdoid.protocol.crypto import DhGroup, HashAlgorithm
from gdoid.protocol.ike_policy import Phase1Config, SignatureCredentials, proposals_from_policy
from gdoid.protocol.version import SoftwareVersion

GM_ADDR = IPv4Address("10.0.0.2")
KS_ADDR = IPv4Address("10.0.0.1")
T0 = 1_000_000.0
PSK = b"correct horse battery staple"
V102 = SoftwareVersion(1, 0, 2)
PSK_AUTH = AuthenticationMethod.PRE_SHARED_KEY
RSA_AUTH = AuthenticationMethod.RSA_SIG


def config(
    local: IPv4Address,
    *,
    key_bits: tuple[int, ...] = (256,),
    hashes: tuple[HashAlgorithm, ...] = (HashAlgorithm.SHA2_256,),
    groups: tuple[DhGroup, ...] = (DhGroup.ECP_256,),
    auths: tuple[AuthenticationMethod, ...] = (PSK_AUTH,),
    psk: bytes | None = PSK,
    signature: SignatureCredentials | None = None,
    version: SoftwareVersion | None = V102,
    lifetime: int = 86400,
    retransmit_interval: float = 2.0,
    retransmit_count: int = 4,
    half_open_timeout: float = 30.0,
) -> Phase1Config:
    return Phase1Config(
        local_address=local,
        proposals=proposals_from_policy(key_bits, hashes, groups, auths, lifetime),
        psk_lookup=lambda _addr: psk,
        signature=signature,
        software_version=version,
        retransmit_interval=retransmit_interval,
        retransmit_count=retransmit_count,
        half_open_timeout=half_open_timeout,
    )
