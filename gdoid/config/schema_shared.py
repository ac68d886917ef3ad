"""Sections both roles have: ``[ike]``, ``[auth]`` (``[[auth.psk]]``, ``[auth.pki]``),
the rules of the ``[[group]]`` array, and certificate identity patterns."""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any, TypeVar

from gdoid.config.model import (
    AuthConfig,
    GmGroupConfig,
    IkeCipher,
    IkeHash,
    IkePolicy,
    KsGroupConfig,
    PkiConfig,
    PskEntry,
)
from gdoid.config.table import Context, Table, duplicates, enum_value, is_int
from gdoid.protocol.identity import IdentityPattern

_G = TypeVar("_G", KsGroupConfig, GmGroupConfig)

DH_GROUPS: tuple[int, ...] = (14, 19, 20)

_IKE_KEYS = (
    "ciphers",
    "hashes",
    "dh_groups",
    "lifetime",
    "allow_sha1",
    "retransmit_interval",
    "retransmit_count",
)


def parse_ike(root: Table) -> IkePolicy:
    t = root.table("ike", _IKE_KEYS)
    if t is None:
        return IkePolicy()
    d = IkePolicy()
    ctx = t.ctx

    def dh(path: str, v: Any) -> int:
        if not is_int(v) or v not in DH_GROUPS:
            raise ctx.error(path, "must be one of DH groups 14, 19, 20")
        return int(v)

    allow_sha1 = t.boolean("allow_sha1", d.allow_sha1)
    hashes = t.array("hashes", lambda p, v: enum_value(ctx, p, v, IkeHash), d.hashes)
    if IkeHash.SHA1 in hashes and not allow_sha1:
        i = hashes.index(IkeHash.SHA1)
        raise ctx.error(f"{t.sub('hashes')}[{i}]", "sha1 is refused unless allow_sha1 = true")
    return IkePolicy(
        ciphers=t.array("ciphers", lambda p, v: enum_value(ctx, p, v, IkeCipher), d.ciphers),
        hashes=hashes,
        dh_groups=t.array("dh_groups", dh, d.dh_groups),
        lifetime=t.integer("lifetime", 60, 2592000, d.lifetime),
        allow_sha1=allow_sha1,
        retransmit_interval=t.number("retransmit_interval", 0.05, 60, d.retransmit_interval),
        retransmit_count=t.integer("retransmit_count", 0, 10, d.retransmit_count),
    )


# A DNS name for ID_FQDN: compared as it is, so no wildcards (unlike authorization's fqdn:).
_PSK_FQDN_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _psk_identity(t: Table) -> str | None:
    if not t.has("identity"):
        return None
    v = t.string("identity").strip()
    try:
        return str(IPv4Address(v))
    except ValueError:
        pass
    if not _PSK_FQDN_RE.fullmatch(v):
        raise t.err("identity", "must be an IPv4 address (ID_IPV4_ADDR) or a DNS name (ID_FQDN)")
    return v.rstrip(".").lower()


def parse_auth(root: Table) -> AuthConfig:
    auth = root.req_table("auth", ("psk", "pki"))
    psks: list[PskEntry] = []
    for e in auth.tables("psk", ("peer", "key_file", "identity")):
        psks.append(
            PskEntry(peer=e.network("peer"), key=e.secret("key_file"), identity=_psk_identity(e))
        )
    for peer, path, first in duplicates(
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


def parse_groups(
    root: Table, allowed: tuple[str, ...], parse: Callable[[Table], _G]
) -> tuple[_G, ...]:
    """``[[group]]`` entries: at least one, names and numbers unique."""
    tables = root.tables("group", allowed)
    if not tables:
        raise root.err("group", "at least one [[group]] is required")
    groups = [parse(t) for t in tables]
    for attr in ("name", "number"):
        pairs = [(getattr(g, attr), t.sub(attr)) for g, t in zip(groups, tables, strict=True)]
        for value, path, first in duplicates(pairs):
            raise root.ctx.error(path, f"duplicate group {attr} {value!r} (also in {first})")
    return tuple(groups)


def identity_pattern(ctx: Context, path: str, v: Any) -> IdentityPattern:
    """A pinned certificate identity (``CN=ks1.example``, ``dns:ks1.example``, ...)."""
    if not isinstance(v, str):
        raise ctx.error(
            path, 'must be a string such as "CN=ks1.example.com" or "dns:ks1.example.com"'
        )
    try:
        return IdentityPattern.parse(v)
    except ValueError as exc:
        raise ctx.error(path, str(exc)) from None
