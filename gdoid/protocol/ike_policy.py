"""Phase-1 policy: the Main Mode transforms we offer or accept, and what a machine needs.

:class:`Phase1Proposal` maps to and from an ISAKMP transform (RFC 2409
appendix A attributes); :class:`Phase1Config` is what the Main Mode machines
(``main_mode*.py``) take from the engine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509

from gdoid.protocol.attributes import Attribute, find
from gdoid.protocol.constants import (
    KEY_IKE,
    AuthenticationMethod,
    EncryptionAlgorithm,
    LifeType,
    Phase1Attribute,
)
from gdoid.protocol.crypto import DhGroup, HashAlgorithm
from gdoid.protocol.payloads import Transform
from gdoid.protocol.pki import CertificateValidator, PrivateKey
from gdoid.protocol.version import SoftwareVersion


@dataclass(frozen=True)
class Phase1Proposal:
    """One phase-1 transform: cipher, hash, authentication, DH group, lifetime."""

    key_bits: int  # AES-CBC 128 or 256
    hash: HashAlgorithm
    auth: AuthenticationMethod
    group: DhGroup
    lifetime: int

    def to_transform(self, number: int) -> Transform:
        return Transform(
            number,
            KEY_IKE,
            (
                Attribute(Phase1Attribute.ENCRYPTION_ALGORITHM, EncryptionAlgorithm.AES_CBC),
                Attribute(Phase1Attribute.KEY_LENGTH, self.key_bits),
                Attribute(Phase1Attribute.HASH_ALGORITHM, self.hash),
                Attribute(Phase1Attribute.AUTHENTICATION_METHOD, self.auth),
                Attribute(Phase1Attribute.GROUP_DESCRIPTION, self.group),
                Attribute(Phase1Attribute.LIFE_TYPE, LifeType.SECONDS),
                Attribute.long(Phase1Attribute.LIFE_DURATION, self.lifetime),
            ),
        )

    @classmethod
    def from_transform(cls, t: Transform) -> Phase1Proposal | None:
        """The proposal a transform describes, or None if we cannot implement it."""
        known = {a.type for a in t.attributes}
        if t.transform_id != KEY_IKE or not known <= {a.value for a in Phase1Attribute}:
            return None
        try:
            enc = find(t.attributes, Phase1Attribute.ENCRYPTION_ALGORITHM)
            keylen = find(t.attributes, Phase1Attribute.KEY_LENGTH)
            hash_ = find(t.attributes, Phase1Attribute.HASH_ALGORITHM)
            auth = find(t.attributes, Phase1Attribute.AUTHENTICATION_METHOD)
            group = find(t.attributes, Phase1Attribute.GROUP_DESCRIPTION)
            if None in (enc, keylen, hash_, auth, group):
                return None
            assert enc and keylen and hash_ and auth and group
            if enc.int_value != EncryptionAlgorithm.AES_CBC or keylen.int_value not in (128, 256):
                return None
            life = find(t.attributes, Phase1Attribute.LIFE_DURATION)
            ltype = find(t.attributes, Phase1Attribute.LIFE_TYPE)
            if ltype is not None and ltype.int_value != LifeType.SECONDS:
                return None
            return cls(
                keylen.int_value,
                HashAlgorithm(hash_.int_value),
                AuthenticationMethod(auth.int_value),
                DhGroup(group.int_value),
                life.int_value if life is not None else 86400,
            )
        except ValueError:
            return None

    def matches(self, other: Phase1Proposal) -> bool:
        """Same algorithms; lifetimes may differ (the shorter one applies)."""
        return (self.key_bits, self.hash, self.auth, self.group) == (
            other.key_bits,
            other.hash,
            other.auth,
            other.group,
        )

    def describe(self) -> str:
        return (
            f"aes-cbc-{self.key_bits} {self.hash.name.lower()} {self.auth.name.lower()} "
            f"group {int(self.group)}"
        )


@dataclass(frozen=True)
class SignatureCredentials:
    """Our certificate and key, and the validator for the peer's certificate."""

    certificate: x509.Certificate
    private_key: PrivateKey
    validator: CertificateValidator


@dataclass(frozen=True)
class Phase1Config:
    local_address: ipaddress.IPv4Address
    proposals: tuple[Phase1Proposal, ...]
    psk_lookup: Callable[[ipaddress.IPv4Address], bytes | None]
    signature: SignatureCredentials | None = None
    software_version: SoftwareVersion | None = None  # None: send no version VID
    # PSK: the phase-1 ID a peer may use besides its source address (an IPv4
    # address or a DNS name, from its [[auth.psk]] entry's ``identity``).
    psk_identity_lookup: Callable[[ipaddress.IPv4Address], str | None] | None = None
    retransmit_interval: float = 2.0
    retransmit_count: int = 4
    half_open_timeout: float = 30.0


def proposals_from_policy(
    key_bits: Sequence[int],
    hashes: Sequence[HashAlgorithm],
    groups: Sequence[DhGroup],
    auths: Sequence[AuthenticationMethod],
    lifetime: int,
) -> tuple[Phase1Proposal, ...]:
    """The cross product of a policy, in preference order (auth, group, cipher, hash)."""
    return tuple(
        Phase1Proposal(k, h, a, g, lifetime)
        for a in auths
        for g in groups
        for k in key_bits
        for h in hashes
    )


__all__ = ["Phase1Config", "Phase1Proposal", "SignatureCredentials", "proposals_from_policy"]
