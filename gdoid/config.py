"""TOML configuration for the key server and the group member.

``load_ks_config`` / ``load_gm_config`` read a TOML file (stdlib ``tomllib``)
and return frozen, fully validated dataclasses. Every problem raises
:class:`ConfigError` naming the file and the dotted key path, e.g.
``ks.toml: group[0].sa_ipsec[1].lifetime: must be an integer between 60 and 86400``.
Unknown keys are errors so that a typo never silently falls back to a default.
Relative paths are resolved against the directory of the config file.

The layout and every key are documented in ``docs/config.md``.
"""

from __future__ import annotations

import difflib
import grp
import hmac
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

from gdoid.protocol.constants import GDOI_PORT
from gdoid.protocol.identity import IdentityPattern
from gdoid.protocol.version import CURRENT_VERSION, SoftwareVersion

__all__ = [
    "DEFAULT_SOFTWARE_VERSION",
    "AuthConfig",
    "ConfigError",
    "CoopConfig",
    "CoopPeer",
    "GmConfig",
    "GmGroupConfig",
    "GroupAuthorization",
    "AuthorizedIdentity",
    "IkeCipher",
    "IkeHash",
    "IkePolicy",
    "KekPolicy",
    "KsConfig",
    "KsGroupConfig",
    "KsPop",
    "PkiConfig",
    "PskEntry",
    "RekeyPolicy",
    "SaIpsec",
    "SoftwareVersion",
    "TrafficSelector",
    "Transform",
    "load_gm_config",
    "load_ks_config",
    "parse_gm_config",
    "parse_ks_config",
]


class ConfigError(Exception):
    """A configuration problem, located by file and dotted key path."""

    def __init__(self, key_path: str, message: str, file: str = "") -> None:
        self.key_path = key_path
        self.message = message
        self.file = file
        super().__init__(key_path, message, file)

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key_path) if p]
        return ": ".join([*parts, self.message])


# --------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------



DEFAULT_SOFTWARE_VERSION = CURRENT_VERSION


class Transform(StrEnum):
    """TEK transform (IOS ``crypto ipsec transform-set``)."""

    ESP_GCM_128 = "esp-gcm-128"
    ESP_GCM_256 = "esp-gcm-256"
    ESP_CBC_128_SHA256 = "esp-cbc-128-sha256"
    ESP_CBC_256_SHA256 = "esp-cbc-256-sha256"


class IkeCipher(StrEnum):
    AES_CBC_128 = "aes-cbc-128"
    AES_CBC_256 = "aes-cbc-256"


class IkeHash(StrEnum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"


SIG_HASHES: tuple[str, ...] = ("sha256", "sha384", "sha512")
DH_GROUPS: tuple[int, ...] = (14, 19, 20)
PROTOCOL_NAMES: Mapping[str, int] = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17}
KS_CONTROL_SOCKET = Path("/run/gdoid/ks.sock")
KS_STATE_DIR = Path("/var/lib/gdoid/ks")
GM_CONTROL_SOCKET = Path("/run/gdoid/gm.sock")


# --------------------------------------------------------------------------
# Dataclasses (shared)
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
class TrafficSelector:
    """``match address ipv4 ACL`` reduced to one permit line."""

    src: IPv4Network
    dst: IPv4Network
    protocol: int = 0  # 0 = any
    src_port: int = 0  # 0 = any
    dst_port: int = 0


@dataclass(frozen=True)
class SaIpsec:
    """``sa ipsec N`` under ``server local``: one TEK policy."""

    number: int
    profile: str
    transform: Transform
    lifetime: int  # TEK configured lifetime (TEK_CLT), seconds
    match: TrafficSelector
    replay_window: int | None = None  # counter-based replay window, packets
    tbar_window_ms: int | None = None  # time-based anti-replay window, ms
    receive_only: bool = False


@dataclass(frozen=True, kw_only=True)
class KekPolicy:
    """``rekey algorithm / rekey lifetime / rekey authentication``."""

    algorithm: IkeCipher = IkeCipher.AES_CBC_256
    lifetime: int = 86400
    signing_key: Path  # checked to exist and be private; loaded by the KS later
    sig_hash: str = "sha256"


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
    kek: KekPolicy
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


# --------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------

_E = TypeVar("_E", bound=StrEnum)
_T = TypeVar("_T")
_G = TypeVar("_G", KsGroupConfig, GmGroupConfig)


class _Missing:
    """Sentinel type: a key with no default is required."""


_REQUIRED = _Missing()
_NAME_RE = re.compile(r"[!-~]{1,64}")  # printable ASCII, no spaces: used in CLI words
_TUN_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # Linux IFNAMSIZ - 1


@dataclass(frozen=True)
class _Ctx:
    file: str
    base_dir: Path

    def error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(key_path, message, file=self.file)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # TOML true is not 1


class _Table:
    """One TOML table being read; rejects unknown keys up front."""

    def __init__(self, ctx: _Ctx, data: Any, path: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise ctx.error(path, "must be a table")
        self.ctx = ctx
        self.data: dict[str, Any] = data
        self.loc = path
        # Unknown keys first: a typo otherwise surfaces as a confusing "missing key".
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ctx.error(_join(path, key), f"unknown key{extra}")

    def sub(self, key: str) -> str:
        return _join(self.loc, key)

    def err(self, key: str, message: str) -> ConfigError:
        return self.ctx.error(self.sub(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise self.err(key, "missing required key")
        return default

    def integer(self, key: str, lo: int, hi: int, default: int | _Missing = _REQUIRED) -> int:
        v = self._get(key, default)
        if not _is_int(v) or not lo <= v <= hi:
            raise self.err(key, f"must be an integer between {lo} and {hi}")
        return int(v)

    def opt_integer(self, key: str, lo: int, hi: int) -> int | None:
        return self.integer(key, lo, hi) if key in self.data else None

    def number(self, key: str, lo: float, hi: float, default: float) -> float:
        v = self._get(key, default)
        ok = (_is_int(v) or isinstance(v, float)) and lo <= v <= hi
        if not ok:
            raise self.err(key, f"must be a number between {lo:g} and {hi:g}")
        return float(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self.err(key, "must be true or false")
        return v

    def string(self, key: str, default: str | _Missing = _REQUIRED) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self.err(key, "must be a string")
        return v

    def name(self, key: str) -> str:
        v = self.string(key)
        if not _NAME_RE.fullmatch(v):
            raise self.err(key, "must be 1-64 printable ASCII characters without spaces")
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self._get(key, default)
        if v not in choices or not isinstance(v, str):
            raise self.err(key, f"must be one of {_fmt_choices(choices)}")
        return v

    def enum(self, key: str, cls: type[_E], default: _E | _Missing = _REQUIRED) -> _E:
        return _enum_value(self.ctx, self.sub(key), self._get(key, default), cls)

    def version(self, key: str) -> SoftwareVersion:
        v = self._get(key, DEFAULT_SOFTWARE_VERSION)
        if isinstance(v, SoftwareVersion):
            return v
        if not isinstance(v, str):
            raise self.err(key, 'must be a string like "1.0.2"')
        try:
            return SoftwareVersion.parse(v)
        except ValueError as exc:
            raise self.err(key, str(exc)) from None

    def address(self, key: str) -> IPv4Address:
        return _address(self.ctx, self.sub(key), self._get(key, _REQUIRED))

    def network(self, key: str) -> IPv4Network:
        v = self._get(key, _REQUIRED)
        if not isinstance(v, str):
            raise self.err(key, 'must be a string like "10.1.0.0/16"')
        try:
            return IPv4Network(v)  # strict: host bits set is an error, not silently masked
        except ValueError as exc:
            raise self.err(key, f"invalid IPv4 prefix {v!r}: {exc}") from None

    def path(self, key: str, default: Path | None | _Missing = _REQUIRED) -> Path | None:
        v = self._get(key, default)
        if v is None or isinstance(v, Path):
            return v
        if not isinstance(v, str) or not v:
            raise self.err(key, "must be a non-empty path string")
        # Absolute paths pass through unchanged (Path join semantics).
        return self.ctx.base_dir / v

    def req_path(self, key: str, default: Path | _Missing = _REQUIRED) -> Path:
        p = self.path(key, default)
        if p is None:  # unreachable: TOML has no null; keeps the type narrow
            raise self.err(key, "must be a path")
        return p

    def existing_file(self, key: str, *, private: bool = False) -> Path:
        p = self.req_path(key)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise self.err(key, f"file not found: {p}") from None
        except OSError as exc:
            raise self.err(key, f"cannot access {p}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise self.err(key, f"not a regular file: {p}")
        mode = stat.S_IMODE(st.st_mode)
        if private and mode & 0o077:
            # Secrets readable by others are as good as leaked; refuse like ssh does.
            raise self.err(
                key, f"{p} has mode {mode:04o}: must not be group/world accessible (chmod 600)"
            )
        return p

    def table(self, key: str, allowed: tuple[str, ...]) -> _Table | None:
        if key not in self.data:
            return None
        return _Table(self.ctx, self.data[key], self.sub(key), allowed)

    def req_table(self, key: str, allowed: tuple[str, ...]) -> _Table:
        t = self.table(key, allowed)
        if t is None:
            raise self.err(key, f"missing required table [{self.sub(key)}]")
        return t

    def tables(self, key: str, allowed: tuple[str, ...]) -> list[_Table]:
        """An array of tables (``[[key]]``); empty list when absent."""
        v = self.data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise self.err(key, f"must be an array of tables ([[{self.sub(key)}]])")
        return [_Table(self.ctx, x, f"{self.sub(key)}[{i}]", allowed) for i, x in enumerate(v)]

    def array(
        self,
        key: str,
        item: Callable[[str, Any], _T],
        default: tuple[_T, ...] | _Missing = _REQUIRED,
        *,
        unique: bool = True,
        allow_empty: bool = False,
    ) -> tuple[_T, ...]:
        """A list whose elements are converted by ``item(element_path, value)``."""
        if key not in self.data:
            if isinstance(default, _Missing):
                raise self.err(key, "missing required key")
            return default
        v = self.data[key]
        if not isinstance(v, list):
            raise self.err(key, "must be an array")
        if not v and not allow_empty:
            raise self.err(key, "must not be empty")
        out: list[_T] = []
        for i, x in enumerate(v):
            conv = item(f"{self.sub(key)}[{i}]", x)
            if unique and conv in out:
                raise self.ctx.error(f"{self.sub(key)}[{i}]", f"duplicate value {x!r}")
            out.append(conv)
        return tuple(out)


def _fmt_choices(choices: tuple[str, ...] | list[str]) -> str:
    return ", ".join(repr(c) for c in choices)


def _enum_value(ctx: _Ctx, path: str, v: Any, cls: type[_E]) -> _E:
    if isinstance(v, cls):
        return v
    try:
        if not isinstance(v, str):
            raise ValueError(v)
        return cls(v)
    except ValueError:
        raise ctx.error(path, f"must be one of {_fmt_choices([m.value for m in cls])}") from None


def _address(ctx: _Ctx, path: str, v: Any) -> IPv4Address:
    if not isinstance(v, str):
        raise ctx.error(path, 'must be a string like "10.0.8.1"')
    try:
        addr = IPv4Address(v)
    except ValueError as exc:
        raise ctx.error(path, f"invalid IPv4 address {v!r}: {exc}") from None
    # Addresses here are peer identities (ID payloads, COOP tie-break): unicast only.
    if addr.is_unspecified or addr.is_multicast or addr == IPv4Address("255.255.255.255"):
        raise ctx.error(path, f"{v} is not a unicast address")
    return addr


def _parse_toml(ctx: _Ctx, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ctx.error("", f"invalid TOML: {exc}") from None


def _enumerate_dupes(items: list[tuple[_T, str]]) -> Iterator[tuple[_T, str, str]]:
    """Yield (value, path, first_path) for every repeat of a value."""
    seen: dict[_T, str] = {}
    for value, path in items:
        if value in seen:
            yield value, path, seen[value]
        else:
            seen[value] = path


# --------------------------------------------------------------------------
# Section parsers
# --------------------------------------------------------------------------

_IKE_KEYS = (
    "ciphers",
    "hashes",
    "dh_groups",
    "lifetime",
    "allow_sha1",
    "retransmit_interval",
    "retransmit_count",
)


def _parse_ike(root: _Table) -> IkePolicy:
    t = root.table("ike", _IKE_KEYS)
    if t is None:
        return IkePolicy()
    d = IkePolicy()
    ctx = t.ctx

    def dh(path: str, v: Any) -> int:
        if not _is_int(v) or v not in DH_GROUPS:
            raise ctx.error(path, "must be one of DH groups 14, 19, 20")
        return int(v)

    allow_sha1 = t.boolean("allow_sha1", d.allow_sha1)
    hashes = t.array("hashes", lambda p, v: _enum_value(ctx, p, v, IkeHash), d.hashes)
    if IkeHash.SHA1 in hashes and not allow_sha1:
        i = hashes.index(IkeHash.SHA1)
        raise ctx.error(f"{t.sub('hashes')}[{i}]", "sha1 is refused unless allow_sha1 = true")
    return IkePolicy(
        ciphers=t.array("ciphers", lambda p, v: _enum_value(ctx, p, v, IkeCipher), d.ciphers),
        hashes=hashes,
        dh_groups=t.array("dh_groups", dh, d.dh_groups),
        lifetime=t.integer("lifetime", 60, 2592000, d.lifetime),
        allow_sha1=allow_sha1,
        retransmit_interval=t.number("retransmit_interval", 0.05, 60, d.retransmit_interval),
        retransmit_count=t.integer("retransmit_count", 0, 10, d.retransmit_count),
    )


def _read_psk(t: _Table, key: str = "key_file") -> bytes:
    p = t.existing_file(key, private=True)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise t.err(key, f"cannot read {p}: {exc.strerror}") from None
    # Editors add one trailing newline; anything else is part of the key.
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise t.err(key, f"{p} is empty")
    return data


_FQDN_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _psk_identity(t: _Table) -> str | None:
    if not t.has("identity"):
        return None
    v = t.string("identity").strip()
    try:
        return str(IPv4Address(v))
    except ValueError:
        pass
    if not _FQDN_RE.fullmatch(v):
        raise t.err("identity", "must be an IPv4 address (ID_IPV4_ADDR) or a DNS name (ID_FQDN)")
    return v.rstrip(".").lower()


def _parse_auth(root: _Table) -> AuthConfig:
    auth = root.req_table("auth", ("psk", "pki"))
    psks: list[PskEntry] = []
    for t in auth.tables("psk", ("peer", "key_file", "identity")):
        psks.append(PskEntry(peer=t.network("peer"), key=_read_psk(t), identity=_psk_identity(t)))
    for peer, path, first in _enumerate_dupes(
        [(e.peer, f"{auth.sub('psk')}[{i}].peer") for i, e in enumerate(psks)]
    ):
        raise root.ctx.error(path, f"duplicate peer {peer} (also in {first})")

    pki: PkiConfig | None = None
    t = auth.table("pki", ("ca_file", "cert_file", "key_file", "crl_file", "deny"))
    if t is not None:
        ctx = t.ctx

        def deny_item(path: str, v: Any) -> str:
            if not isinstance(v, str) or not v.strip():
                raise ctx.error(path, "must be a non-empty string (subject CN or hex serial)")
            return v.strip()

        pki = PkiConfig(
            ca_file=t.existing_file("ca_file"),
            cert_file=t.existing_file("cert_file"),
            key_file=t.existing_file("key_file", private=True),
            crl_file=t.existing_file("crl_file") if t.has("crl_file") else None,
            deny=t.array("deny", deny_item, (), allow_empty=True),
        )
    if not psks and pki is None:
        raise auth.ctx.error(auth.loc, "needs at least one [[auth.psk]] entry or [auth.pki]")
    return AuthConfig(psks=tuple(psks), pki=pki)


def _parse_selector(t: _Table) -> TrafficSelector:
    proto_raw = t._get("protocol", "any")
    if isinstance(proto_raw, str) and proto_raw in PROTOCOL_NAMES:
        protocol = PROTOCOL_NAMES[proto_raw]
    elif _is_int(proto_raw) and 0 <= proto_raw <= 255:
        protocol = int(proto_raw)
    else:
        raise t.err(
            "protocol", f"must be one of {_fmt_choices(list(PROTOCOL_NAMES))} or an integer 0..255"
        )
    src_port = t.integer("src_port", 0, 65535, 0)
    dst_port = t.integer("dst_port", 0, 65535, 0)
    if (src_port or dst_port) and protocol not in (6, 17):
        key = "src_port" if src_port else "dst_port"
        raise t.err(key, "ports can only be matched with protocol tcp or udp")
    return TrafficSelector(
        src=t.network("src"),
        dst=t.network("dst"),
        protocol=protocol,
        src_port=src_port,
        dst_port=dst_port,
    )


_SA_KEYS = (
    "number",
    "profile",
    "transform",
    "lifetime",
    "replay_window",
    "tbar_window_ms",
    "receive_only",
    "match",
)
_MATCH_KEYS = ("src", "dst", "protocol", "src_port", "dst_port")


def _parse_sa(t: _Table) -> SaIpsec:
    return SaIpsec(
        number=t.integer("number", 1, 65535),
        profile=t.name("profile"),
        transform=t.enum("transform", Transform),
        lifetime=t.integer("lifetime", 20, 86400),
        match=_parse_selector(t.req_table("match", _MATCH_KEYS)),
        replay_window=t.opt_integer("replay_window", 64, 1024),
        tbar_window_ms=t.opt_integer("tbar_window_ms", 100, 3600000),
        receive_only=t.boolean("receive_only", False),
    )


def _parse_kek(g: _Table) -> KekPolicy:
    t = g.req_table("kek", ("algorithm", "lifetime", "signing_key", "sig_hash"))
    d_alg, d_life, d_hash = IkeCipher.AES_CBC_256, 86400, "sha256"
    return KekPolicy(
        algorithm=t.enum("algorithm", IkeCipher, d_alg),
        lifetime=t.integer("lifetime", 30, 2592000, d_life),
        signing_key=t.existing_file("signing_key", private=True),
        sig_hash=t.choice("sig_hash", SIG_HASHES, d_hash),
    )


def _parse_rekey(g: _Table) -> RekeyPolicy:
    d = RekeyPolicy()
    t = g.table("rekey", ("lead_time", "retransmit_interval", "retransmit_count", "max_missed"))
    if t is None:
        return d
    return RekeyPolicy(
        lead_time=t.integer("lead_time", 1, 3600, d.lead_time),
        retransmit_interval=t.number("retransmit_interval", 0.05, 300, d.retransmit_interval),
        retransmit_count=t.integer("retransmit_count", 0, 10, d.retransmit_count),
        max_missed=t.integer("max_missed", 1, 100, d.max_missed),
    )


_KS_GROUP_KEYS = (
    "name",
    "number",
    "sender_id_bits",
    "activation_delay",
    "deactivation_delay",
    "kek",
    "rekey",
    "sa_ipsec",
    "authorization",
)


def _parse_ks_group(g: _Table) -> KsGroupConfig:
    name = g.name("name")
    number = g.integer("number", 1, 2**32 - 1)
    kek = _parse_kek(g)
    rekey = _parse_rekey(g)
    sa_tables = g.tables("sa_ipsec", _SA_KEYS)
    if not sa_tables:
        raise g.err("sa_ipsec", "at least one [[group.sa_ipsec]] is required")
    sas = tuple(_parse_sa(t) for t in sa_tables)
    for n, path, first in _enumerate_dupes(
        [(sa.number, t.sub("number")) for sa, t in zip(sas, sa_tables, strict=True)]
    ):
        raise g.ctx.error(path, f"duplicate sa ipsec number {n} (also in {first})")

    # Cross-field checks: a lead time at or past the lifetime would rekey in a loop.
    lifetimes = [(sa.lifetime, t.sub("lifetime")) for sa, t in zip(sas, sa_tables, strict=True)]
    lifetimes.append((kek.lifetime, f"{g.sub('kek')}.lifetime"))
    for life, where in lifetimes:
        if rekey.lead_time >= life:
            raise g.ctx.error(
                f"{g.sub('rekey')}.lead_time",
                f"{rekey.lead_time} must be less than the lifetime {life} at {where}",
            )
    shortest = min(sa.lifetime for sa in sas)
    delays = {}
    for key in ("activation_delay", "deactivation_delay"):
        delays[key] = g.integer(key, 0, 3600, 0)
        if delays[key] >= shortest:
            raise g.err(key, f"must be less than the shortest sa_ipsec lifetime ({shortest})")
    return KsGroupConfig(
        name=name,
        number=number,
        kek=kek,
        sa_ipsec=sas,
        rekey=rekey,
        sender_id_bits=g.integer("sender_id_bits", 1, 16, 8),
        activation_delay=delays["activation_delay"],
        deactivation_delay=delays["deactivation_delay"],
        authorization=_parse_authorization(g),
    )


# RFC 4514 attribute names accepted in ``dn:`` patterns (upper-cased); the KS maps
# them to OIDs when it matches (gdoid/keyserver/authorization.py).
DN_ATTRIBUTES = ("CN", "O", "OU", "C", "L", "ST", "STREET", "DC", "UID", "SERIALNUMBER",
                 "E", "EMAILADDRESS", "T", "TITLE", "GN", "SN")
_DN_PAIR_RE = re.compile(r"\s*([A-Za-z]+)\s*=\s*(\S(?:.*\S)?)\s*")
_FQDN_RE = re.compile(r"(?=.{1,253}$)(\*|[A-Za-z0-9*]([A-Za-z0-9*-]{0,61}[A-Za-z0-9*])?)"
                      r"(\.[A-Za-z0-9*]([A-Za-z0-9*-]{0,61}[A-Za-z0-9*])?)*\.?")
_KEY_ID_RE = re.compile(r"[!-~]{1,128}")


def _split_dn(text: str) -> list[str]:
    """Split on commas not escaped with a backslash (RFC 4514 style ``\\,``)."""
    parts, cur, esc = [], "", False
    for ch in text:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if esc:
        cur += "\\"
    parts.append(cur)
    return parts


def _identity(ctx: _Ctx, path: str, v: Any) -> AuthorizedIdentity:
    if not isinstance(v, str):
        raise ctx.error(path, 'must be a string like "dn:CN=gm*,O=Example" or "fqdn:gm1.example.com"')
    kind, sep, value = v.partition(":")
    if not sep or kind not in IDENTITY_KINDS:
        raise ctx.error(path, f"{v!r} must start with one of {_fmt_choices([k + ':' for k in IDENTITY_KINDS])}")
    if not value or value != value.strip() or any(not c.isprintable() for c in value):
        raise ctx.error(path, f"{v!r}: the {kind} must be printable, non-empty, without leading or trailing spaces")
    if len(value) > 512:
        raise ctx.error(path, f"{kind} longer than 512 characters")
    if kind == "fqdn":
        if not _FQDN_RE.fullmatch(value):
            raise ctx.error(path, f"{value!r} is not a host name (letters, digits, '-', '.', '*' wildcards)")
        return AuthorizedIdentity(kind, value.rstrip(".").lower())
    if kind == "key-id":
        if not _KEY_ID_RE.fullmatch(value):
            raise ctx.error(path, "key-id must be 1-128 printable ASCII characters without spaces")
        return AuthorizedIdentity(kind, value)
    pairs: list[tuple[str, str]] = []
    for part in _split_dn(value):
        m = _DN_PAIR_RE.fullmatch(part)
        if m is None:
            raise ctx.error(path, f"{part!r} in {value!r} is not ATTRIBUTE=value")
        attr = m.group(1).upper()
        if attr not in DN_ATTRIBUTES:
            raise ctx.error(path, f"unknown DN attribute {m.group(1)!r} (known: {', '.join(DN_ATTRIBUTES)})")
        pairs.append((attr, m.group(2)))
    return AuthorizedIdentity(kind, value, tuple(pairs))


def _parse_authorization(g: _Table) -> GroupAuthorization:
    t = g.table("authorization", ("addresses", "identities"))
    if t is None:
        return GroupAuthorization()

    def prefix(path: str, v: Any) -> IPv4Network:
        if not isinstance(v, str):
            raise t.ctx.error(path, 'must be a string like "10.1.0.0/16"')
        try:
            return IPv4Network(v)  # strict, as everywhere: host bits set is an error
        except ValueError as exc:
            raise t.ctx.error(path, f"invalid IPv4 prefix {v!r}: {exc}") from None

    def ident(path: str, v: Any) -> AuthorizedIdentity:
        return _identity(t.ctx, path, v)

    auth = GroupAuthorization(
        addresses=t.array("addresses", prefix, ()),
        identities=t.array("identities", ident, ()),
    )
    if not auth.restricted:
        raise g.err("authorization", "needs addresses or identities (omit the table to allow any peer)")
    return auth


def _parse_groups(
    root: _Table, allowed: tuple[str, ...], parse: Callable[[_Table], _G]
) -> tuple[_G, ...]:
    """``[[group]]`` entries: at least one, names and numbers unique."""
    tables = root.tables("group", allowed)
    if not tables:
        raise root.err("group", "at least one [[group]] is required")
    groups = [parse(t) for t in tables]
    for attr in ("name", "number"):
        pairs = [(getattr(g, attr), t.sub(attr)) for g, t in zip(groups, tables, strict=True)]
        for value, path, first in _enumerate_dupes(pairs):
            raise root.ctx.error(path, f"duplicate group {attr} {value!r} (also in {first})")
    return tuple(groups)


def _parse_coop(root: _Table, own: IPv4Address, auth: AuthConfig) -> CoopConfig | None:
    t = root.table("coop", ("priority", "announce_interval", "peer"))
    if t is None:
        return None
    peers: list[CoopPeer] = []
    for p in t.tables("peer", ("address", "port", "psk_file", "identity")):
        address = p.address("address")
        port = p.integer("port", 1, 65535, GDOI_PORT)
        if address == own:
            raise p.err("address", f"{own} is this key server's own address")
        if any(q.address == address and q.port == port for q in peers):
            raise p.err("address", f"duplicate peer {address}:{port}")
        psk = _read_psk(p, "psk_file") if p.has("psk_file") else None
        # A GM key here would let every GM pose as this KS (issue 9 §2).
        if psk is not None and any(hmac.compare_digest(psk, e.key) for e in auth.psks):
            raise p.err("psk_file", "is also an [[auth.psk]] (GM) key: a COOP peer needs a key of its own")
        raw = p._get("identity", [])
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise p.err("identity", "must be a string or an array of strings")
        identities = tuple(_identity_pattern(p.ctx, f"{p.sub('identity')}[{i}]", v) for i, v in enumerate(items))
        if identities and auth.pki is None:
            raise p.err("identity", "a pinned certificate identity needs [auth.pki]")
        if psk is None and not identities:
            raise p.err("address", "needs psk_file or identity: a COOP peer authenticates as a KS, not as a GM")
        peers.append(CoopPeer(address=address, port=port, psk=psk, identities=identities))
    return CoopConfig(
        priority=t.integer("priority", 1, 255, 100),
        peers=tuple(peers),
        announce_interval=t.number("announce_interval", 0.1, 3600, 30.0),
    )


_KS_KEYS = (
    "address",
    "port",
    "software_version",
    "control_socket",
    "control_group",
    "state_dir",
    "keylog_dir",
    "max_half_open",
)


def _build_ks(ctx: _Ctx, data: dict[str, Any]) -> KsConfig:
    root = _Table(ctx, data, "", ("ks", "ike", "auth", "group", "coop"))
    ks = root.req_table("ks", _KS_KEYS)
    address = ks.address("address")
    # Keyword arguments evaluate in order, so errors come in file-section order.
    return KsConfig(
        address=address,
        port=ks.integer("port", 1, 65535, GDOI_PORT),
        software_version=ks.version("software_version"),
        control_socket=ks.req_path("control_socket", KS_CONTROL_SOCKET),
        control_group=_control_group(ks),
        state_dir=ks.req_path("state_dir", KS_STATE_DIR),
        keylog_dir=ks.path("keylog_dir", None),
        max_half_open=ks.integer("max_half_open", 1, 1_000_000, 16384),
        ike=_parse_ike(root),
        auth=(auth := _parse_auth(root)),
        groups=_parse_groups(root, _KS_GROUP_KEYS, _parse_ks_group),
        coop=_parse_coop(root, address, auth),
    )


def _control_group(t: _Table) -> str | None:
    """``control_group``: a group name (or numeric gid) that exists on this host."""
    v = t.string("control_group", "")
    if not v:
        return None
    try:
        if v.isdigit():
            grp.getgrgid(int(v))
        else:
            grp.getgrnam(v)
    except (KeyError, OverflowError):
        raise t.err("control_group", f"no such group: {v!r}") from None
    return v


_GM_KEYS = (
    "address",
    "port",
    "software_version",
    "control_socket",
    "control_group",
    "keylog_dir",
    "fail_close",
    "registration_timeout",
    "rereg_jitter",
    "tun_name",
)


_GM_GROUP_KEYS = ("name", "number", "servers", "server_port", "ks_identities", "ks_pop", "rekey_key_sha256")


def _identity_pattern(ctx: _Ctx, path: str, v: Any) -> IdentityPattern:
    if not isinstance(v, str):
        raise ctx.error(path, "must be a string such as \"CN=ks1.example.com\" or \"dns:ks1.example.com\"")
    try:
        return IdentityPattern.parse(v)
    except ValueError as exc:
        raise ctx.error(path, str(exc)) from None


def _fingerprint(g: _Table, key: str) -> bytes | None:
    if not g.has(key):
        return None
    text = g.string(key).strip().lower().replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise g.err(key, "must be the SHA-256 of the rekey public key (DER): 64 hex digits")
    return bytes.fromhex(text)


def _parse_gm_group(g: _Table) -> GmGroupConfig:
    ctx = g.ctx
    identities = g.array("ks_identities", lambda p, v: _identity_pattern(ctx, p, v), ())
    pop = g.enum("ks_pop", KsPop, KsPop.NONE)
    pin = _fingerprint(g, "rekey_key_sha256")
    if pop == KsPop.CERTIFICATE and not identities:
        raise g.err("ks_pop", '"certificate" needs ks_identities: the KS certificates to accept')
    if pop == KsPop.REKEY_KEY and pin is None:
        raise g.err("ks_pop", '"rekey-key" needs rekey_key_sha256: the rekey key to accept')
    return GmGroupConfig(
        name=g.name("name"),
        number=g.integer("number", 1, 2**32 - 1),
        servers=g.array("servers", lambda p, v: _address(ctx, p, v)),
        server_port=g.integer("server_port", 1, 65535, GDOI_PORT),
        ks_identities=identities,
        ks_pop=pop,
        rekey_key_sha256=pin,
    )


def _tun_name(gm: _Table) -> str:
    v = gm.string("tun_name", "gdoi0")
    if not _TUN_RE.fullmatch(v):
        raise gm.err("tun_name", "must be 1-15 characters from A-Z a-z 0-9 _ . -")
    return v


def _parse_dataplane(root: _Table) -> DataplaneConfig:
    t = root.table("dataplane", ("enabled", "wan_interface", "mtu", "icmp_source", "mark", "table", "local_table"))
    if t is None:
        return DataplaneConfig()
    wan = t.string("wan_interface", "") or None
    if wan is not None and not _TUN_RE.fullmatch(wan):
        raise t.err("wan_interface", "must be an interface name (1-15 characters)")
    return DataplaneConfig(
        enabled=t.boolean("enabled", False),
        wan_interface=wan,
        mtu=t.integer("mtu", 676, 9000, 1500),
        icmp_source=t.address("icmp_source") if t.has("icmp_source") else None,
        mark=t.integer("mark", 1, 2**32 - 1, 0x6764),
        table=t.integer("table", 1, 2**31 - 1, 26468),
        local_table=t.integer("local_table", 1, 2**31 - 1, 26469),
    )


def _build_gm(ctx: _Ctx, data: dict[str, Any]) -> GmConfig:
    root = _Table(ctx, data, "", ("gm", "ike", "auth", "group", "dataplane"))
    gm = root.req_table("gm", _GM_KEYS)
    return GmConfig(
        address=gm.address("address"),
        port=gm.integer("port", 1, 65535, GDOI_PORT),
        software_version=gm.version("software_version"),
        control_socket=gm.req_path("control_socket", GM_CONTROL_SOCKET),
        control_group=_control_group(gm),
        keylog_dir=gm.path("keylog_dir", None),
        fail_close=gm.boolean("fail_close", False),
        registration_timeout=gm.number("registration_timeout", 0.1, 300, 10.0),
        rereg_jitter=gm.number("rereg_jitter", 0.0, 0.5, 0.1),
        tun_name=_tun_name(gm),
        ike=_parse_ike(root),
        auth=(auth := _parse_auth(root)),
        groups=_gm_groups(root, auth),
        dataplane=_parse_dataplane(root),
    )


def _gm_groups(root: _Table, auth: AuthConfig) -> tuple[GmGroupConfig, ...]:
    groups = _parse_groups(root, _GM_GROUP_KEYS, _parse_gm_group)
    for i, g in enumerate(groups):
        if g.ks_pop == KsPop.CERTIFICATE and auth.pki is None:
            # The KS certificate in message 4 is checked against [auth.pki] ca_file.
            raise root.ctx.error(f"group[{i}].ks_pop", '"certificate" needs [auth.pki] (its ca_file)')
    return tuple(groups)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def parse_ks_config(text: str, base_dir: Path, name: str = "ks.toml") -> KsConfig:
    """Parse KS TOML ``text``; relative paths resolve against ``base_dir``."""
    ctx = _Ctx(name, Path(base_dir).absolute())
    return _build_ks(ctx, _parse_toml(ctx, text))


def parse_gm_config(text: str, base_dir: Path, name: str = "gm.toml") -> GmConfig:
    """Parse GM TOML ``text``; relative paths resolve against ``base_dir``."""
    ctx = _Ctx(name, Path(base_dir).absolute())
    return _build_gm(ctx, _parse_toml(ctx, text))


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file: {exc.strerror}", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"not UTF-8: {exc.reason}", file=str(path)) from None


def load_ks_config(path: Path) -> KsConfig:
    path = Path(path)
    return parse_ks_config(_read_text(path), path.absolute().parent, str(path))


def load_gm_config(path: Path) -> GmConfig:
    path = Path(path)
    return parse_gm_config(_read_text(path), path.absolute().parent, str(path))
