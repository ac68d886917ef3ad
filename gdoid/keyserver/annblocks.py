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
import json
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from gdoid.keyserver import fields, sender_ids
from gdoid.keyserver.fields import U32, FieldInvalid
from gdoid.keyserver.group import Group, Member
from gdoid.keyserver.group_keys import GroupKeyState
from gdoid.protocol import crypto
from gdoid.protocol.crypto import HashAlgorithm
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.gdoi_payloads import AnnBlock, AnnFlag, AnnPayload, BlockType
from gdoid.protocol.version import SoftwareVersion

MAX_MEMBERS = 4096  # per block; a block is at most 64 KiB anyway
MAX_CHUNKS = 4096
MAX_TEK_SPIS = 64
MAX_SIDS = 4096
MAX_IDENTITY = 1024


class AnnInvalid(FieldInvalid):
    """A decrypted ANN block that does not validate; the message names the field."""


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
    def keys(self) -> GroupKeyState | None:
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


# --- field checks (gdoid.keyserver.fields), raising AnnInvalid ---------------------------

_fields = fields.fields
_int = fields.integer
_time = fields.time
_str = fields.string
_hex = fields.hex_bytes
_list = fields.array
_address = fields.address
_optional = fields.optional
_enum = fields.enum


# --- members -------------------------------------------------------------------------------

_MEMBER_KEYS = frozenset(
    {
        "address",
        "identity",
        "version",
        "registered_at",
        "kek_spi",
        "tek_spis",
        "sender_ids",
        "registrations",
        "missed_rekeys",
        "port",
        "ack_key",
        "ack_hash",
    }
)
_MEMBER_OPTIONAL = frozenset({"ks_address"})  # absent in ANNs of KSs before it was kept


def _version(v: Any, name: str) -> SoftwareVersion:
    s = _str(v, name, 11)
    try:
        return SoftwareVersion.parse(s)
    except ValueError:
        raise AnnInvalid(name, f"{s!r} is not a version") from None


def _member(v: Any, name: str, group: Group) -> Member:
    d = _fields(v, name, _MEMBER_KEYS, _MEMBER_OPTIONAL)
    sid_max = (1 << group.sids.bits) - 1
    return Member(
        address=_address(d["address"], f"{name}.address"),
        identity=_str(d["identity"], f"{name}.identity", MAX_IDENTITY),
        version=_optional(d["version"], lambda x: _version(x, f"{name}.version")),
        registered_at=_time(d["registered_at"], f"{name}.registered_at"),
        kek_spi=_optional(d["kek_spi"], lambda x: _hex(x, f"{name}.kek_spi", (16,))),
        tek_spis=tuple(
            _int(x, f"{name}.tek_spis[{i}]", 0, U32)
            for i, x in enumerate(_list(d["tek_spis"], f"{name}.tek_spis", MAX_TEK_SPIS))
        ),
        sender_ids=tuple(
            _int(x, f"{name}.sender_ids[{i}]", 0, sid_max)
            for i, x in enumerate(_list(d["sender_ids"], f"{name}.sender_ids", MAX_SIDS))
        ),
        registrations=_int(d["registrations"], f"{name}.registrations", 0, U32),
        missed_rekeys=_int(d["missed_rekeys"], f"{name}.missed_rekeys", 0, 0xFFFF),
        port=_int(d["port"], f"{name}.port", 1, 0xFFFF),
        ack_key=_hex(d["ack_key"], f"{name}.ack_key", tuple(range(65))),
        ack_hash=_enum(d["ack_hash"], f"{name}.ack_hash", HashAlgorithm),
        ks_address=_optional(d.get("ks_address"), lambda x: _address(x, f"{name}.ks_address")),
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
    return {
        _address(a, "MEMBERS_REMOVED.address"): _time(t, f"MEMBERS_REMOVED[{str(a)[:15]}]")
        for a, t in v.items()
    }


# --- keys -------------------------------------------------------------------------------------


def parse_group_keys(v: Any, group: Group) -> GroupKeyState:
    """GROUP_KEYS: the sender's key state, whose KEK must name our rekey signing key."""
    return GroupKeyState.from_json(
        v, "GROUP_KEYS", signing_key_der=crypto.public_key_der(group.signing_key)
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
        try:
            blocks[block.type] = parser(_json(block, i), group)
        except AnnInvalid:
            raise
        except FieldInvalid as exc:
            raise AnnInvalid(exc.field, exc.reason) from None
    for required in REQUIRED_BLOCKS:
        if required not in blocks:
            raise AnnInvalid("ANN.blocks", f"no {required.name} block")
    return ParsedAnn(ann, blocks)
