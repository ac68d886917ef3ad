"""The configuration as the rest of gdoid reads it: frozen, validated dataclasses.

Built by :mod:`gdoid.config.loader` from ``ks.toml`` / ``gm.toml`` (docs/config.md);
engines, daemons and ``phase1.py`` import only this module.  Plain data: no file
access here (paths are checked and secrets read by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from gdoid.protocol.constants import GDOI_PORT
from gdoid.protocol.crypto import SigHash
from gdoid.protocol.identity import IdentityPattern
from gdoid.protocol.transforms import TekTransform
from gdoid.protocol.version import CURRENT_VERSION, SoftwareVersion

__all__ = [
    "DEFAULT_SOFTWARE_VERSION",
    "GM_CONTROL_SOCKET",
    "IDENTITY_KINDS",
    "KS_CONTROL_SOCKET",
    "KS_STATE_DIR",
    "AuthConfig",
    "AuthorizedIdentity",
    "CoopConfig",
    "CoopPeer",
    "DataplaneConfig",
    "GmConfig",
    "GmGroupConfig",
    "GroupAuthorization",
    "IkeCipher",
    "IkeHash",
    "IkePolicy",
    "KekConfig",
    "KsConfig",
    "KsGroupConfig",
    "KsPop",
    "PkiConfig",
    "PskEntry",
    "RekeyPolicy",
    "SaIpsec",
    "TrafficSelectorConfig",
]


DEFAULT_SOFTWARE_VERSION = CURRENT_VERSION
KS_CONTROL_SOCKET = Path("/run/gdoid/ks.sock")
KS_STATE_DIR = Path("/var/lib/gdoid/ks")
GM_CONTROL_SOCKET = Path("/run/gdoid/gm.sock")


class IkeCipher(StrEnum):
    AES_CBC_128 = "aes-cbc-128"
    AES_CBC_256 = "aes-cbc-256"


class IkeHash(StrEnum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"


# --------------------------------------------------------------------------
# Shared: [ike], [auth]
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class IkePolicy:
    """Phase 1 policy (IOS ``crypto isakmp policy``); lists are in preference order."""

    ciphers: tuple[IkeCipher, ...] = (IkeCipher.AES_CBC_256, IkeCipher.AES_CBC_128)
    hashes: tuple[IkeHash, ...] = (IkeHash.SHA256, IkeHash.SHA384)
    dh_groups: tuple[int, ...] = (19, 14, 20)
    lifetime: int = 86400
    allow_sha1: bool = False
    retransmit_interval: float = 2.0
    retransmit_count: int = 4


@dataclass(frozen=True)
class PskEntry:
    """``crypto isakmp key ... address ...``: a pre-shared key for a peer prefix."""

    peer: IPv4Network
    key: bytes = field(repr=False)  # never in logs or tracebacks
    # The phase-1 ID these peers may use instead of their source address (NAT):
    # an IPv4 address (ID_IPV4_ADDR) or a DNS name (ID_FQDN).
    identity: str | None = None


@dataclass(frozen=True)
class PkiConfig:
    """Trustpoint: CA, own certificate and key, optional CRL and deny list."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None = None
    deny: tuple[str, ...] = ()  # subject CNs or hex serials


@dataclass(frozen=True)
class AuthConfig:
    psks: tuple[PskEntry, ...] = ()
    pki: PkiConfig | None = None

    def _psk_entry(self, addr: IPv4Address) -> PskEntry | None:
        best: PskEntry | None = None
        for entry in self.psks:
            if addr in entry.peer and (best is None or entry.peer.prefixlen > best.peer.prefixlen):
                best = entry
        return best

    def psk_for(self, addr: IPv4Address) -> bytes | None:
        """The key of the longest prefix containing ``addr``, or None."""
        best = self._psk_entry(addr)
        return None if best is None else best.key

    def psk_identity_for(self, addr: IPv4Address) -> str | None:
        """The extra phase-1 identity allowed for ``addr``'s PSK entry, or None."""
        best = self._psk_entry(addr)
        return None if best is None else best.identity


# --------------------------------------------------------------------------
# Key server
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficSelectorConfig:
    """``match address ipv4 ACL`` reduced to one permit line (``[group.sa_ipsec.match]``)."""

    src: IPv4Network | IPv6Network  # one family on both (checked by the schema)
    dst: IPv4Network | IPv6Network
    protocol: int = 0  # 0 = any
    src_port: int = 0  # 0 = any
    dst_port: int = 0


@dataclass(frozen=True)
class SaIpsec:
    """``sa ipsec N`` under ``server local``: one TEK policy."""

    number: int
    profile: str
    transform: TekTransform  # one of gdoid.protocol.transforms.TEK_TRANSFORMS
    lifetime: int  # TEK configured lifetime (TEK_CLT), seconds
    match: TrafficSelectorConfig
    replay_window: int | None = None  # counter-based replay window, packets
    tbar_window_ms: int | None = None  # time-based anti-replay window, ms
    receive_only: bool = False


@dataclass(frozen=True, kw_only=True)
class KekConfig:
    """``rekey algorithm / rekey lifetime / rekey authentication`` (``[group.kek]``)."""

    algorithm: IkeCipher = IkeCipher.AES_CBC_256
    lifetime: int = 86400
    signing_key: Path  # checked to exist and be private; loaded by the KS later
    sig_hash: SigHash = SigHash.SHA256  # one of gdoid.protocol.transforms.SIG_HASHES


@dataclass(frozen=True)
class RekeyPolicy:
    lead_time: int = 90
    retransmit_interval: float = 10.0
    retransmit_count: int = 2
    max_missed: int = 3


IDENTITY_KINDS = ("dn", "fqdn", "key-id")


@dataclass(frozen=True)
class AuthorizedIdentity:
    """One allowed GM identity (IOS ``crypto identity``: ``dn`` / ``fqdn``; and ``key-id``).

    ``dn`` is ``((attribute, value pattern), ...)`` with upper-case attribute
    names; every pair must be in the peer certificate's subject.  ``*`` in a
    value (or in an fqdn) matches any run of characters.
    """

    kind: str  # one of IDENTITY_KINDS
    value: str  # as configured, after "kind:"
    dn: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class GroupAuthorization:
    """``authorization address ipv4 ACL`` / ``authorization identity NAME`` of one group.

    Empty tuples mean "not configured"; when both are configured a GM must pass both.
    """

    addresses: tuple[IPv4Network, ...] = ()
    identities: tuple[AuthorizedIdentity, ...] = ()

    @property
    def restricted(self) -> bool:
        return bool(self.addresses or self.identities)


@dataclass(frozen=True)
class KsGroupConfig:
    name: str
    number: int
    kek: KekConfig
    sa_ipsec: tuple[SaIpsec, ...]
    rekey: RekeyPolicy = RekeyPolicy()
    sender_id_bits: int = 8
    activation_delay: int = 0
    deactivation_delay: int = 0
    authorization: GroupAuthorization = GroupAuthorization()


@dataclass(frozen=True)
class CoopPeer:
    """A cooperative KS and the credentials it must prove in phase 1 (not a GM's)."""

    address: IPv4Address
    port: int = GDOI_PORT
    psk: bytes | None = field(default=None, repr=False)  # this KS pair's own key, never a GM key
    identities: tuple[IdentityPattern, ...] = ()  # certificate subject DN / subjectAltName patterns


@dataclass(frozen=True)
class CoopConfig:
    priority: int = 100
    peers: tuple[CoopPeer, ...] = ()
    announce_interval: float = 30.0

    def peer(self, addr: IPv4Address) -> CoopPeer | None:
        return next((p for p in self.peers if p.address == addr), None)


@dataclass(frozen=True, kw_only=True)
class KsConfig:
    address: IPv4Address
    port: int = GDOI_PORT
    software_version: SoftwareVersion = DEFAULT_SOFTWARE_VERSION
    control_socket: Path = KS_CONTROL_SOCKET
    control_group: str | None = None  # may use the control socket besides root and our user
    state_dir: Path = KS_STATE_DIR
    keylog_dir: Path | None = None
    max_half_open: int = 16384
    ike: IkePolicy = IkePolicy()
    auth: AuthConfig
    groups: tuple[KsGroupConfig, ...]
    coop: CoopConfig | None = None

    def group_by_number(self, number: int) -> KsGroupConfig | None:
        return next((g for g in self.groups if g.number == number), None)

    def group_by_name(self, name: str) -> KsGroupConfig | None:
        return next((g for g in self.groups if g.name == name), None)


# --------------------------------------------------------------------------
# Group member
# --------------------------------------------------------------------------


class KsPop(StrEnum):
    """``ks_pop``: what a GM demands in GROUPKEY-PULL message 4 (docs/config.md)."""

    NONE = "none"
    CERTIFICATE = "certificate"  # RFC 6407 CERT + POP_R by a pinned KS certificate
    REKEY_KEY = "rekey-key"  # POP_R by the rekey signing key pinned by rekey_key_sha256


@dataclass(frozen=True)
class GmGroupConfig:
    name: str
    number: int
    servers: tuple[IPv4Address, ...]  # tried in order (IOS ``server address ipv4``)
    server_port: int = GDOI_PORT
    # KS pinning (issue 9 §2): certificate patterns, proof of the KS role, rekey key pin.
    ks_identities: tuple[IdentityPattern, ...] = ()
    ks_pop: KsPop = KsPop.NONE
    rekey_key_sha256: bytes | None = None


@dataclass(frozen=True)
class DataplaneConfig:
    """``[dataplane]``: the userspace ESP data path (needs root / CAP_NET_ADMIN+NET_RAW)."""

    enabled: bool = False
    wan_interface: str | None = None  # ESP arriving here for addresses behind us is taken in
    mtu: int = 1500  # the WAN MTU: largest outer (ESP) packet; the TUN gets mtu - 100
    icmp_source: IPv4Address | None = None  # source of ICMP "fragmentation needed" we send
    icmp6_source: IPv6Address | None = None  # source of ICMPv6 "Packet Too Big" we send
    mark: int = 0x6764
    table: int = 26468
    local_table: int = 26469


@dataclass(frozen=True, kw_only=True)
class GmConfig:
    address: IPv4Address
    port: int = GDOI_PORT
    software_version: SoftwareVersion = DEFAULT_SOFTWARE_VERSION
    control_socket: Path = GM_CONTROL_SOCKET
    control_group: str | None = None  # may use the control socket besides root and our user
    keylog_dir: Path | None = None
    fail_close: bool = False
    registration_timeout: float = 10.0
    rereg_jitter: float = 0.1
    tun_name: str = "gdoi0"
    ike: IkePolicy = IkePolicy()
    auth: AuthConfig
    groups: tuple[GmGroupConfig, ...]
    dataplane: DataplaneConfig = DataplaneConfig()

    def group_by_number(self, number: int) -> GmGroupConfig | None:
        return next((g for g in self.groups if g.number == number), None)

    def group_by_name(self, name: str) -> GmGroupConfig | None:
        return next((g for g in self.groups if g.name == name), None)
