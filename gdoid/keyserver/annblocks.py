"""Validation of decrypted ANN blocks (wire.md §6.3): parse into typed values before any state changes.

An ANN arrives on an authenticated KS-KS SA, but its blocks are still input:
a bug or a misconfigured peer must not raise inside the KS or half-apply an
announcement.  :func:`parse_ann` checks every field of every block (types,
ranges, address formats, key and SPI lengths, list sizes) and returns a
:class:`ParsedAnn` of typed values, or raises :class:`AnnInvalid` naming the
field.  Each block type is one entry in :data:`BLOCK_PARSERS`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from gdoid.keyserver import sender_ids
from gdoid.keyserver.group import Group, Member
from gdoid.protocol import crypto
from gdoid.protocol.crypto import HashAlgorithm, SigAlgorithm, SigHash
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.gdoi_payloads import AnnBlock, AnnFlag, AnnPayload, BlockType
from gdoid.protocol.policy import Kek, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.transforms import TekTransform
from gdoid.protocol.version import SoftwareVersion

MAX_MEMBERS = 4096  # per block; a block is at most 64 KiB anyway
MAX_CHUNKS = 4096
MAX_TEKS = 16
MAX_TEK_SPIS = 64
MAX_SIDS = 4096
MAX_IDENTITY = 1024
MAX_TIME = 1e11  # seconds since the epoch: year 5138, and no NaN/inf
U32 = 2**32 - 1

_E = TypeVar("_E", bound=IntEnum)


class AnnInvalid(ProtocolError):
    """A decrypted ANN block that does not validate; the message names the field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {reason}"[:300])


@dataclass(frozen=True)
class AnnKeys:
    """GROUP_KEYS: the sender's group key state."""

    seq: int
    epoch: float
    last_rekey_at: float
    rekeys_sent: int
    kek: Kek
    teks: tuple[Tek, ...]


@dataclass(frozen=True)
class MembersFull:
    chunk: int
    of: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class ParsedAnn:
    ann: AnnPayload
    blocks: dict[int, Any]

    @property
    def keys(self) -> AnnKeys | None:
        return self.blocks.get(BlockType.GROUP_KEYS)

    @property
    def fingerprint(self) -> bytes:
        fp: bytes = self.blocks[BlockType.SIGNING_KEY]
        return fp

    def members(self) -> list[Member]:
        """MEMBERS_FULL and MEMBERS_DELTA rows, in block order."""
        out: list[Member] = []
        full = self.blocks.get(BlockType.MEMBERS_FULL)
        if full is not None:
            out += full.members
        out += self.blocks.get(BlockType.MEMBERS_DELTA, ())
        return out

    @property
    def removed(self) -> dict[IPv4Address, float]:
        return self.blocks.get(BlockType.MEMBERS_REMOVED, {})


def signing_key_fingerprint(group: Group) -> bytes:
    """SHA-256 of this KS's rekey signing public key (SubjectPublicKeyInfo DER)."""
    return hashlib.sha256(crypto.public_key_der(group.signing_key)).digest()


# --- field checks ------------------------------------------------------------------------


def _fields(v: Any, name: str, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise AnnInvalid(name, f"must be an object, not {type(v).__name__}")
    if set(v) != keys:
        missing = sorted(keys - set(v))
        extra = sorted(str(k)[:20] for k in set(v) - keys)[:3]
        raise AnnInvalid(name, f"missing {missing}" if missing else f"unknown keys {extra}")
    return v


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if type(v) is not int:  # bool is an int subclass: refused
        raise AnnInvalid(name, f"must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise AnnInvalid(name, f"{v} outside {lo}..{hi}")
    return v


def _time(v: Any, name: str) -> float:
    if type(v) not in (int, float):
        raise AnnInvalid(name, f"must be a number, not {type(v).__name__}")
    if not math.isfinite(v) or not 0 <= v <= MAX_TIME:
        raise AnnInvalid(name, f"{v!r} is not a time")
    return float(v)


def _str(v: Any, name: str, max_len: int) -> str:
    if not isinstance(v, str):
        raise AnnInvalid(name, f"must be a string, not {type(v).__name__}")
    if len(v) > max_len:
        raise AnnInvalid(name, f"longer than {max_len} characters")
    return v


def _hex(v: Any, name: str, lengths: tuple[int, ...]) -> bytes:
    s = _str(v, name, 2 * max(lengths))
    try:
        b = bytes.fromhex(s)
    except ValueError:
        raise AnnInvalid(name, "not hex") from None
    if len(b) not in lengths:
        raise AnnInvalid(name, f"{len(b)} octets, expected {' or '.join(map(str, lengths))}")
    return b


def _list(v: Any, name: str, max_len: int, min_len: int = 0) -> list[Any]:
    if not isinstance(v, list):
        raise AnnInvalid(name, f"must be a list, not {type(v).__name__}")
    if not min_len <= len(v) <= max_len:
        raise AnnInvalid(name, f"{len(v)} entries, allowed {min_len}..{max_len}")
    return v


def _address(v: Any, name: str) -> IPv4Address:
    s = _str(v, name, 15)
    try:
        a = IPv4Address(s)
    except ValueError:
        raise AnnInvalid(name, f"{s!r} is not an IPv4 address") from None
    if a.is_unspecified or a.is_multicast or a == IPv4Address("255.255.255.255"):
        raise AnnInvalid(name, f"{a} is not a unicast address")
    return a


def _network(v: Any, name: str) -> IPv4Network:
    s = _str(v, name, 18)
    try:
        return IPv4Network(s)
    except ValueError:
        raise AnnInvalid(name, f"{s!r} is not an IPv4 prefix") from None


def _enum(v: Any, name: str, cls: type[_E]) -> _E:
    value = _int(v, name, 0, 0xFFFF)
    try:
        return cls(value)
    except ValueError:
        raise AnnInvalid(name, f"{value} is not a {cls.__name__}") from None


def _optional(v: Any, check: Callable[[Any], Any]) -> Any:
    return None if v is None else check(v)


# --- members -------------------------------------------------------------------------------

_MEMBER_KEYS = frozenset({
    "address", "identity", "version", "registered_at", "kek_spi", "tek_spis", "sender_ids",
    "registrations", "missed_rekeys", "port", "ack_key", "ack_hash",
})


def _version(v: Any, name: str) -> SoftwareVersion:
    s = _str(v, name, 11)
    try:
        return SoftwareVersion.parse(s)
    except ValueError:
        raise AnnInvalid(name, f"{s!r} is not a version") from None


def _member(v: Any, name: str, group: Group) -> Member:
    d = _fields(v, name, _MEMBER_KEYS)
    sid_max = (1 << group.sids.bits) - 1
    return Member(
        address=_address(d["address"], f"{name}.address"),
        identity=_str(d["identity"], f"{name}.identity", MAX_IDENTITY),
        version=_optional(d["version"], lambda x: _version(x, f"{name}.version")),
        registered_at=_time(d["registered_at"], f"{name}.registered_at"),
        kek_spi=_optional(d["kek_spi"], lambda x: _hex(x, f"{name}.kek_spi", (16,))),
        tek_spis=tuple(_int(x, f"{name}.tek_spis[{i}]", 0, U32)
                       for i, x in enumerate(_list(d["tek_spis"], f"{name}.tek_spis", MAX_TEK_SPIS))),
        sender_ids=tuple(_int(x, f"{name}.sender_ids[{i}]", 0, sid_max)
                         for i, x in enumerate(_list(d["sender_ids"], f"{name}.sender_ids", MAX_SIDS))),
        registrations=_int(d["registrations"], f"{name}.registrations", 0, U32),
        missed_rekeys=_int(d["missed_rekeys"], f"{name}.missed_rekeys", 0, 0xFFFF),
        port=_int(d["port"], f"{name}.port", 1, 0xFFFF),
        ack_key=_hex(d["ack_key"], f"{name}.ack_key", tuple(range(65))),
        ack_hash=_enum(d["ack_hash"], f"{name}.ack_hash", HashAlgorithm),
    )


def _members(v: Any, name: str, group: Group) -> tuple[Member, ...]:
    rows = _list(v, name, MAX_MEMBERS)
    members = tuple(_member(r, f"{name}[{i}]", group) for i, r in enumerate(rows))
    if len({m.address for m in members}) != len(members):
        raise AnnInvalid(name, "a member address appears twice")
    return members


def parse_members_full(v: Any, group: Group) -> MembersFull:
    d = _fields(v, "MEMBERS_FULL", frozenset({"chunk", "of", "members"}))
    of = _int(d["of"], "MEMBERS_FULL.of", 1, MAX_CHUNKS)
    chunk = _int(d["chunk"], "MEMBERS_FULL.chunk", 0, of - 1)
    return MembersFull(chunk, of, _members(d["members"], "MEMBERS_FULL.members", group))


def parse_members_delta(v: Any, group: Group) -> tuple[Member, ...]:
    return _members(v, "MEMBERS_DELTA", group)


def parse_members_removed(v: Any, group: Group) -> dict[IPv4Address, float]:
    if not isinstance(v, dict):
        raise AnnInvalid("MEMBERS_REMOVED", f"must be an object, not {type(v).__name__}")
    if len(v) > MAX_MEMBERS:
        raise AnnInvalid("MEMBERS_REMOVED", f"{len(v)} entries, allowed {MAX_MEMBERS}")
    return {_address(a, "MEMBERS_REMOVED.address"): _time(t, f"MEMBERS_REMOVED[{str(a)[:15]}]")
            for a, t in v.items()}


# --- keys -------------------------------------------------------------------------------------

_KEK_KEYS = frozenset({
    "spi", "key_bits", "key", "iv", "configured_lifetime", "created_at", "expires_at", "sig_hash",
    "sig_algorithm", "sig_key_bits", "public_key", "ks_address", "port",
})
_TEK_KEYS = frozenset({
    "spi", "sa_number", "transform", "src", "dst", "ip_protocol", "src_port", "dst_port",
    "configured_lifetime", "tbar_window_ms", "replay_window", "receive_only", "cipher_key",
    "integrity_key", "created_at", "expires_at",
})
_KEYS_KEYS = frozenset({"seq", "epoch", "last_rekey_at", "rekeys_sent", "kek", "teks"})


def _kek(v: Any, group: Group) -> Kek:
    d = _fields(v, "GROUP_KEYS.kek", _KEK_KEYS)
    key_bits = _int(d["key_bits"], "GROUP_KEYS.kek.key_bits", 128, 256)
    if key_bits not in (128, 192, 256):
        raise AnnInvalid("GROUP_KEYS.kek.key_bits", f"{key_bits} is not an AES key size")
    public_key = _hex(d["public_key"], "GROUP_KEYS.kek.public_key", tuple(range(1, 2049)))
    # The KEK tells GMs which key signs pushes: it must be the one every KS holds.
    if not hmac.compare_digest(public_key, crypto.public_key_der(group.signing_key)):
        raise AnnInvalid("GROUP_KEYS.kek.public_key", "differs from this KS's rekey signing key")
    return Kek(
        spi=_hex(d["spi"], "GROUP_KEYS.kek.spi", (16,)),
        key_bits=key_bits,
        key=_hex(d["key"], "GROUP_KEYS.kek.key", (key_bits // 8,)),
        iv=_hex(d["iv"], "GROUP_KEYS.kek.iv", (16,)),
        configured_lifetime=_int(d["configured_lifetime"], "GROUP_KEYS.kek.configured_lifetime", 1, U32),
        created_at=_time(d["created_at"], "GROUP_KEYS.kek.created_at"),
        expires_at=_time(d["expires_at"], "GROUP_KEYS.kek.expires_at"),
        sig_hash=_enum(d["sig_hash"], "GROUP_KEYS.kek.sig_hash", SigHash),
        sig_algorithm=_enum(d["sig_algorithm"], "GROUP_KEYS.kek.sig_algorithm", SigAlgorithm),
        sig_key_bits=_int(d["sig_key_bits"], "GROUP_KEYS.kek.sig_key_bits", 1, 16384),
        public_key_der=public_key,
        ks_address=_address(d["ks_address"], "GROUP_KEYS.kek.ks_address"),
        port=_int(d["port"], "GROUP_KEYS.kek.port", 1, 0xFFFF),
    )


def _tek(v: Any, name: str) -> Tek:
    d = _fields(v, name, _TEK_KEYS)
    try:
        transform = TekTransform.from_name(_str(d["transform"], f"{name}.transform", 32))
    except ValueError as exc:
        raise AnnInvalid(f"{name}.transform", str(exc)) from None
    if type(d["receive_only"]) is not bool:
        raise AnnInvalid(f"{name}.receive_only", "must be true or false")
    policy = TekPolicy(
        sa_number=_int(d["sa_number"], f"{name}.sa_number", 1, 0xFFFF),
        transform=transform,
        selector=TrafficSelector(
            _network(d["src"], f"{name}.src"), _network(d["dst"], f"{name}.dst"),
            _int(d["ip_protocol"], f"{name}.ip_protocol", 0, 255),
            _int(d["src_port"], f"{name}.src_port", 0, 0xFFFF),
            _int(d["dst_port"], f"{name}.dst_port", 0, 0xFFFF),
        ),
        configured_lifetime=_int(d["configured_lifetime"], f"{name}.configured_lifetime", 1, U32),
        tbar_window_ms=_optional(d["tbar_window_ms"], lambda x: _int(x, f"{name}.tbar_window_ms", 1, U32)),
        replay_window=_optional(d["replay_window"], lambda x: _int(x, f"{name}.replay_window", 0, U32)),
        receive_only=d["receive_only"],
    )
    return Tek(
        _int(d["spi"], f"{name}.spi", 1, U32),
        policy,
        _hex(d["cipher_key"], f"{name}.cipher_key", (transform.cipher_key_len,)),
        _hex(d["integrity_key"], f"{name}.integrity_key", (transform.integrity_key_len,)),
        _time(d["created_at"], f"{name}.created_at"),
        _time(d["expires_at"], f"{name}.expires_at"),
    )


def parse_group_keys(v: Any, group: Group) -> AnnKeys:
    d = _fields(v, "GROUP_KEYS", _KEYS_KEYS)
    teks = tuple(_tek(t, f"GROUP_KEYS.teks[{i}]")
                 for i, t in enumerate(_list(d["teks"], "GROUP_KEYS.teks", MAX_TEKS, 1)))
    if len({t.spi for t in teks}) != len(teks):
        raise AnnInvalid("GROUP_KEYS.teks", "a TEK SPI appears twice")
    return AnnKeys(
        seq=_int(d["seq"], "GROUP_KEYS.seq", 0, U32),
        epoch=_time(d["epoch"], "GROUP_KEYS.epoch"),
        last_rekey_at=_time(d["last_rekey_at"], "GROUP_KEYS.last_rekey_at"),
        rekeys_sent=_int(d["rekeys_sent"], "GROUP_KEYS.rekeys_sent", 0, 2**63 - 1),
        kek=_kek(d["kek"], group),
        teks=teks,
    )


def parse_signing_key(v: Any, group: Group) -> bytes:
    d = _fields(v, "SIGNING_KEY", frozenset({"sha256"}))
    return _hex(d["sha256"], "SIGNING_KEY.sha256", (32,))


def parse_sender_ids(v: Any, group: Group) -> list[sender_ids.SidRecord]:
    try:
        return sender_ids.parse_block(v, group.sids.bits)
    except ProtocolError as exc:
        raise AnnInvalid("SENDER_IDS", str(exc)) from None


def signing_key_block(group: Group) -> AnnBlock:
    return AnnBlock.of(BlockType.SIGNING_KEY, {"sha256": signing_key_fingerprint(group).hex()})


# One entry per block type: (decoded JSON, the group) -> typed value, or AnnInvalid.
BLOCK_PARSERS: dict[int, Callable[[Any, Group], Any]] = {
    BlockType.GROUP_KEYS: parse_group_keys,
    BlockType.MEMBERS_FULL: parse_members_full,
    BlockType.MEMBERS_DELTA: parse_members_delta,
    BlockType.MEMBERS_REMOVED: parse_members_removed,
    BlockType.SIGNING_KEY: parse_signing_key,
    BlockType.SENDER_IDS: parse_sender_ids,
}
REQUIRED_BLOCKS = (BlockType.SIGNING_KEY,)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(block: AnnBlock, index: int) -> Any:
    try:
        return json.loads(block.data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the stack
        raise AnnInvalid(f"block[{index}]", f"not JSON: {type(exc).__name__}") from None


def parse_ann(ann: AnnPayload, group: Group) -> ParsedAnn:
    """Every block of ``ann`` as a typed value; AnnInvalid (naming the field) if anything is off."""
    if not 1 <= ann.priority <= 255:
        raise AnnInvalid("ANN.priority", f"{ann.priority} outside 1..255")
    if ann.flags & ~AnnFlag.REPLY_REQUESTED:
        raise AnnInvalid("ANN.flags", f"unknown flags 0x{ann.flags:02x}")
    blocks: dict[int, Any] = {}
    for i, block in enumerate(ann.blocks):
        parser = BLOCK_PARSERS.get(block.type)
        if parser is None:
            raise AnnInvalid(f"block[{i}].type", f"unknown block type {block.type}")
        if block.type in blocks:
            raise AnnInvalid(f"block[{i}].type", f"block type {block.type} appears twice")
        blocks[block.type] = parser(_json(block, i), group)
    for required in REQUIRED_BLOCKS:
        if required not in blocks:
            raise AnnInvalid("ANN.blocks", f"no {required.name} block")
    return ParsedAnn(ann, blocks)
