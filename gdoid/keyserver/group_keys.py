"""A group's key state (KEK, TEKs, push SEQ, pseudotime origin): one typed value, one JSON form.

The same JSON object is the group's keys in the state file and the ANN
``GROUP_KEYS`` block (wire.md §6.3).  :meth:`GroupKeyState.from_json` checks
every field (types, ranges, key and SPI lengths) and raises
:class:`~gdoid.keyserver.fields.FieldInvalid` naming the field.  The object
carries a ``version``; an unknown one is refused, an absent one is version 1
(what KSs and state files wrote before the field existed).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from gdoid.keyserver import fields as f
from gdoid.keyserver.fields import U32, FieldInvalid
from gdoid.keyserver.group import Group
from gdoid.protocol.crypto import SigAlgorithm, SigHash
from gdoid.protocol.policy import Kek, SelectorFamilyError, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.transforms import TekTransform

VERSION = 1
MAX_TEKS = 16

_KEK_KEYS = frozenset(
    {
        "spi",
        "key_bits",
        "key",
        "iv",
        "configured_lifetime",
        "created_at",
        "expires_at",
        "sig_hash",
        "sig_algorithm",
        "sig_key_bits",
        "public_key",
        "ks_address",
        "port",
    }
)
_TEK_KEYS = frozenset(
    {
        "spi",
        "sa_number",
        "transform",
        "src",
        "dst",
        "ip_protocol",
        "src_port",
        "dst_port",
        "configured_lifetime",
        "tbar_window_ms",
        "replay_window",
        "receive_only",
        "cipher_key",
        "integrity_key",
        "created_at",
        "expires_at",
    }
)
_KEYS = frozenset({"version", "seq", "epoch", "last_rekey_at", "rekeys_sent", "kek", "teks"})


@dataclass(frozen=True)
class GroupKeyState:
    """What a KS must agree on with its peers and keep across restarts for one group."""

    seq: int  # the last push SEQ sent
    epoch: float  # pseudotime origin (TBAR), wall clock
    last_rekey_at: float
    rekeys_sent: int
    kek: Kek
    teks: tuple[Tek, ...]

    @classmethod
    def of(cls, group: Group) -> GroupKeyState:
        return cls(
            group.seq,
            group.epoch,
            group.last_rekey_at,
            group.rekeys_sent,
            group.kek,
            tuple(group.teks),
        )

    def install(self, group: Group) -> None:
        """Make these the group's keys (the rekey signing key stays the configured one)."""
        group.kek = self.kek
        group.teks = list(self.teks)
        group.seq = self.seq
        group.epoch = self.epoch
        group.last_rekey_at = self.last_rekey_at
        group.rekeys_sent = self.rekeys_sent

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "seq": self.seq,
            "epoch": self.epoch,
            "last_rekey_at": self.last_rekey_at,
            "rekeys_sent": self.rekeys_sent,
            "kek": _kek_to_json(self.kek),
            "teks": [_tek_to_json(t) for t in self.teks],
        }

    @classmethod
    def from_json(
        cls, v: Any, name: str = "keys", *, signing_key_der: bytes | None = None
    ) -> GroupKeyState:
        """Validate ``v`` field by field; ``signing_key_der``: the KEK must name this public key."""
        if isinstance(v, dict) and "version" not in v:
            v = {**v, "version": 1}  # written before the field existed
        d = f.fields(v, name, _KEYS)
        version = f.integer(d["version"], f"{name}.version", 0, U32)
        if version != VERSION:
            raise FieldInvalid(
                f"{name}.version", f"unknown version {version} (this KS reads {VERSION})"
            )
        teks = tuple(
            _tek_from_json(t, f"{name}.teks[{i}]")
            for i, t in enumerate(f.array(d["teks"], f"{name}.teks", MAX_TEKS, 1))
        )
        if len({t.spi for t in teks}) != len(teks):
            raise FieldInvalid(f"{name}.teks", "a TEK SPI appears twice")
        return cls(
            seq=f.integer(d["seq"], f"{name}.seq", 0, U32),
            epoch=f.time(d["epoch"], f"{name}.epoch"),
            last_rekey_at=f.time(d["last_rekey_at"], f"{name}.last_rekey_at"),
            rekeys_sent=f.integer(d["rekeys_sent"], f"{name}.rekeys_sent", 0, 2**63 - 1),
            kek=_kek_from_json(d["kek"], f"{name}.kek", signing_key_der),
            teks=teks,
        )


def _kek_to_json(k: Kek) -> dict[str, Any]:
    return {
        "spi": k.spi.hex(),
        "key_bits": k.key_bits,
        "key": k.key.hex(),
        "iv": k.iv.hex(),
        "configured_lifetime": k.configured_lifetime,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "sig_hash": int(k.sig_hash),
        "sig_algorithm": int(k.sig_algorithm),
        "sig_key_bits": k.sig_key_bits,
        "public_key": k.public_key_der.hex(),
        "ks_address": str(k.ks_address),
        "port": k.port,
    }


def _kek_from_json(v: Any, name: str, signing_key_der: bytes | None) -> Kek:
    d = f.fields(v, name, _KEK_KEYS)
    key_bits = f.integer(d["key_bits"], f"{name}.key_bits", 128, 256)
    if key_bits not in (128, 192, 256):
        raise FieldInvalid(f"{name}.key_bits", f"{key_bits} is not an AES key size")
    public_key = f.hex_bytes(d["public_key"], f"{name}.public_key", tuple(range(1, 2049)))
    # The KEK tells GMs which key signs pushes: from a peer it must be the one every KS holds.
    if signing_key_der is not None and not hmac.compare_digest(public_key, signing_key_der):
        raise FieldInvalid(f"{name}.public_key", "differs from this KS's rekey signing key")
    return Kek(
        spi=f.hex_bytes(d["spi"], f"{name}.spi", (16,)),
        key_bits=key_bits,
        key=f.hex_bytes(d["key"], f"{name}.key", (key_bits // 8,)),
        iv=f.hex_bytes(d["iv"], f"{name}.iv", (16,)),
        configured_lifetime=f.integer(
            d["configured_lifetime"], f"{name}.configured_lifetime", 1, U32
        ),
        created_at=f.time(d["created_at"], f"{name}.created_at"),
        expires_at=f.time(d["expires_at"], f"{name}.expires_at"),
        sig_hash=f.enum(d["sig_hash"], f"{name}.sig_hash", SigHash),
        sig_algorithm=f.enum(d["sig_algorithm"], f"{name}.sig_algorithm", SigAlgorithm),
        sig_key_bits=f.integer(d["sig_key_bits"], f"{name}.sig_key_bits", 1, 16384),
        public_key_der=public_key,
        ks_address=f.address(d["ks_address"], f"{name}.ks_address"),
        port=f.integer(d["port"], f"{name}.port", 1, 0xFFFF),
    )


def _tek_to_json(t: Tek) -> dict[str, Any]:
    p = t.policy
    s = p.selector
    return {
        "spi": t.spi,
        "sa_number": p.sa_number,
        "transform": p.transform.name,
        "src": str(s.src),
        "dst": str(s.dst),
        "ip_protocol": s.ip_protocol,
        "src_port": s.src_port,
        "dst_port": s.dst_port,
        "configured_lifetime": p.configured_lifetime,
        "tbar_window_ms": p.tbar_window_ms,
        "replay_window": p.replay_window,
        "receive_only": p.receive_only,
        "cipher_key": t.cipher_key.hex(),
        "integrity_key": t.integrity_key.hex(),
        "created_at": t.created_at,
        "expires_at": t.expires_at,
    }


def _tek_from_json(v: Any, name: str) -> Tek:
    d = f.fields(v, name, _TEK_KEYS)
    try:
        transform = TekTransform.from_name(f.string(d["transform"], f"{name}.transform", 32))
    except ValueError as exc:
        raise FieldInvalid(f"{name}.transform", str(exc)) from None
    try:
        selector = TrafficSelector(
            f.network(d["src"], f"{name}.src"),
            f.network(d["dst"], f"{name}.dst"),
            f.integer(d["ip_protocol"], f"{name}.ip_protocol", 0, 255),
            f.integer(d["src_port"], f"{name}.src_port", 0, 0xFFFF),
            f.integer(d["dst_port"], f"{name}.dst_port", 0, 0xFFFF),
        )
    except SelectorFamilyError as exc:  # IPv4 src with IPv6 dst or the reverse
        raise FieldInvalid(f"{name}.dst", str(exc)) from None
    policy = TekPolicy(
        sa_number=f.integer(d["sa_number"], f"{name}.sa_number", 1, 0xFFFF),
        transform=transform,
        selector=selector,
        configured_lifetime=f.integer(
            d["configured_lifetime"], f"{name}.configured_lifetime", 1, U32
        ),
        tbar_window_ms=f.optional(
            d["tbar_window_ms"], lambda x: f.integer(x, f"{name}.tbar_window_ms", 1, U32)
        ),
        replay_window=f.optional(
            d["replay_window"], lambda x: f.integer(x, f"{name}.replay_window", 0, U32)
        ),
        receive_only=f.boolean(d["receive_only"], f"{name}.receive_only"),
    )
    return Tek(
        f.integer(d["spi"], f"{name}.spi", 1, U32),
        policy,
        f.hex_bytes(d["cipher_key"], f"{name}.cipher_key", (transform.cipher_key_len,)),
        f.hex_bytes(d["integrity_key"], f"{name}.integrity_key", (transform.integrity_key_len,)),
        f.time(d["created_at"], f"{name}.created_at"),
        f.time(d["expires_at"], f"{name}.expires_at"),
    )
