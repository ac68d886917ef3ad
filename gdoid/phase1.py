"""Turn the ``[ike]`` and ``[auth]`` config into a phase-1 policy (shared by KS and GM)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address

from gdoid.config.model import AuthConfig, CoopConfig, CoopPeer, IkeCipher, IkeHash, IkePolicy
from gdoid.protocol.constants import AuthenticationMethod
from gdoid.protocol.crypto import DhGroup, HashAlgorithm
from gdoid.protocol.ike_policy import Phase1Config, SignatureCredentials, proposals_from_policy
from gdoid.protocol.pki import (
    CertificateValidator,
    PkiError,
    load_certificates,
    load_crl,
    load_private_key,
)
from gdoid.protocol.version import SoftwareVersion

_HASHES = {
    IkeHash.SHA1: HashAlgorithm.SHA,
    IkeHash.SHA256: HashAlgorithm.SHA2_256,
    IkeHash.SHA384: HashAlgorithm.SHA2_384,
}
_KEY_BITS = {IkeCipher.AES_CBC_128: 128, IkeCipher.AES_CBC_256: 256}


def load_signature_credentials(auth: AuthConfig) -> SignatureCredentials | None:
    """Certificate, key and CA validator from ``[auth.pki]``; PkiError names what is wrong."""
    pki = auth.pki
    if pki is None:
        return None
    certs = load_certificates(pki.cert_file)
    if not certs:
        raise PkiError(f"{pki.cert_file}: no certificate")
    crls = [load_crl(pki.crl_file)] if pki.crl_file is not None else []
    validator = CertificateValidator(load_certificates(pki.ca_file), crls, pki.deny)
    return SignatureCredentials(certs[0], load_private_key(pki.key_file), validator)


def psk_lookup(auth: AuthConfig, coop: CoopConfig | None) -> Callable[[IPv4Address], bytes | None]:
    """The PSK for a peer address: a COOP peer's own key, never a GM key, for a COOP address.

    Main Mode picks the key by address before message 5, so a configured COOP
    peer address gets its COOP key or none (a certificate-only peer): a GM
    holding the group's PSK cannot complete phase 1 from a KS's address.
    """
    peers = {p.address: p for p in coop.peers} if coop is not None else {}

    def lookup(addr: IPv4Address) -> bytes | None:
        peer = peers.get(addr)
        return peer.psk if peer is not None else auth.psk_for(addr)

    return lookup


def coop_peer_phase1(base: Phase1Config, peer: CoopPeer) -> Phase1Config:
    """What we offer when we initiate to ``peer``: only the methods its config allows."""
    allowed = set()
    if peer.psk is not None:
        allowed.add(AuthenticationMethod.PRE_SHARED_KEY)
    if peer.identities and base.signature is not None:
        allowed.add(AuthenticationMethod.RSA_SIG)
    return replace(base, proposals=tuple(p for p in base.proposals if p.auth in allowed))


def phase1_config(
    ike: IkePolicy,
    auth: AuthConfig,
    local_address: IPv4Address,
    software_version: SoftwareVersion | None,
    half_open_timeout: float = 30.0,
    coop: CoopConfig | None = None,
) -> Phase1Config:
    auths = []
    signature = load_signature_credentials(auth)
    if signature is not None:
        auths.append(AuthenticationMethod.RSA_SIG)
    if auth.psks or (coop is not None and any(p.psk is not None for p in coop.peers)):
        auths.append(AuthenticationMethod.PRE_SHARED_KEY)
    proposals = proposals_from_policy(
        [_KEY_BITS[c] for c in ike.ciphers],
        [_HASHES[h] for h in ike.hashes],
        [DhGroup(g) for g in ike.dh_groups],
        auths,
        ike.lifetime,
    )
    return Phase1Config(
        local_address=local_address,
        proposals=proposals,
        psk_lookup=psk_lookup(auth, coop),
        signature=signature,
        software_version=software_version,
        psk_identity_lookup=auth.psk_identity_for,
        retransmit_interval=ike.retransmit_interval,
        retransmit_count=ike.retransmit_count,
        half_open_timeout=half_open_timeout,
    )
