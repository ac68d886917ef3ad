"""``[group.authorization]`` of the KS: which GMs may register (addresses, identities)."""

from __future__ import annotations

import re
from ipaddress import IPv4Network
from typing import Any

from gdoid.config.model import IDENTITY_KINDS, AuthorizedIdentity, GroupAuthorization
from gdoid.config.table import Context, Table, fmt_choices

# RFC 4514 attribute names accepted in ``dn:`` patterns (upper-cased); the KS maps
# them to OIDs when it matches (gdoid/keyserver/authorization.py).
DN_ATTRIBUTES = (
    "CN",
    "O",
    "OU",
    "C",
    "L",
    "ST",
    "STREET",
    "DC",
    "UID",
    "SERIALNUMBER",
    "E",
    "EMAILADDRESS",
    "T",
    "TITLE",
    "GN",
    "SN",
)
_DN_PAIR_RE = re.compile(r"\s*([A-Za-z]+)\s*=\s*(\S(?:.*\S)?)\s*")
_FQDN_PATTERN_RE = re.compile(
    r"(?=.{1,253}$)(\*|[A-Za-z0-9*]([A-Za-z0-9*-]{0,61}[A-Za-z0-9*])?)"
    r"(\.[A-Za-z0-9*]([A-Za-z0-9*-]{0,61}[A-Za-z0-9*])?)*\.?"
)
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


def _identity(ctx: Context, path: str, v: Any) -> AuthorizedIdentity:
    if not isinstance(v, str):
        raise ctx.error(
            path, 'must be a string like "dn:CN=gm*,O=Example" or "fqdn:gm1.example.com"'
        )
    kind, sep, value = v.partition(":")
    if not sep or kind not in IDENTITY_KINDS:
        raise ctx.error(
            path, f"{v!r} must start with one of {fmt_choices([k + ':' for k in IDENTITY_KINDS])}"
        )
    if not value or value != value.strip() or any(not c.isprintable() for c in value):
        raise ctx.error(
            path,
            f"{v!r}: the {kind} must be printable, non-empty, without leading or trailing spaces",
        )
    if len(value) > 512:
        raise ctx.error(path, f"{kind} longer than 512 characters")
    if kind == "fqdn":
        if not _FQDN_PATTERN_RE.fullmatch(value):
            raise ctx.error(
                path, f"{value!r} is not a host name (letters, digits, '-', '.', '*' wildcards)"
            )
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
            raise ctx.error(
                path, f"unknown DN attribute {m.group(1)!r} (known: {', '.join(DN_ATTRIBUTES)})"
            )
        pairs.append((attr, m.group(2)))
    return AuthorizedIdentity(kind, value, tuple(pairs))


def parse_authorization(g: Table) -> GroupAuthorization:
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
        raise g.err(
            "authorization", "needs addresses or identities (omit the table to allow any peer)"
        )
    return auth
