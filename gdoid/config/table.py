"""The validator of one TOML table, shared by every schema module.

:class:`Table` reads typed, range-checked values out of a parsed TOML table and
raises :class:`ConfigError` naming the file and the dotted key path.  Unknown keys
are errors so that a typo never silently falls back to a default; relative paths
resolve against the directory of the config file.  Everything that looks at the
host is here too: files that must exist, secret files (refused when group or world
can read them, like ssh does) and group names.
"""

from __future__ import annotations

import difflib
import grp
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar

from gdoid.config.errors import ConfigError
from gdoid.config.model import DEFAULT_SOFTWARE_VERSION
from gdoid.protocol.version import SoftwareVersion

_E = TypeVar("_E", bound=StrEnum)
_T = TypeVar("_T")


class Missing:
    """Sentinel type: a key with no default is required."""


REQUIRED = Missing()
_NAME_RE = re.compile(r"[!-~]{1,64}")  # printable ASCII, no spaces: used in CLI words


@dataclass(frozen=True)
class Context:
    """Where values come from: the file (for messages) and the base of relative paths."""

    file: str
    base_dir: Path

    def error(self, key_path: str, message: str) -> ConfigError:
        return ConfigError(key_path, message, file=self.file)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # TOML true is not 1


class Table:
    """One TOML table being read; rejects unknown keys up front."""

    def __init__(self, ctx: Context, data: Any, path: str, allowed: tuple[str, ...]) -> None:
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

    def get(self, key: str, default: Any) -> Any:
        """The raw value of ``key`` (``default`` when absent; REQUIRED: an error)."""
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            raise self.err(key, "missing required key")
        return default

    def integer(self, key: str, lo: int, hi: int, default: int | Missing = REQUIRED) -> int:
        v = self.get(key, default)
        if not is_int(v) or not lo <= v <= hi:
            raise self.err(key, f"must be an integer between {lo} and {hi}")
        return int(v)

    def opt_integer(self, key: str, lo: int, hi: int) -> int | None:
        return self.integer(key, lo, hi) if key in self.data else None

    def number(self, key: str, lo: float, hi: float, default: float) -> float:
        v = self.get(key, default)
        ok = (is_int(v) or isinstance(v, float)) and lo <= v <= hi
        if not ok:
            raise self.err(key, f"must be a number between {lo:g} and {hi:g}")
        return float(v)

    def boolean(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.err(key, "must be true or false")
        return v

    def string(self, key: str, default: str | Missing = REQUIRED) -> str:
        v = self.get(key, default)
        if not isinstance(v, str):
            raise self.err(key, "must be a string")
        return v

    def name(self, key: str) -> str:
        v = self.string(key)
        if not _NAME_RE.fullmatch(v):
            raise self.err(key, "must be 1-64 printable ASCII characters without spaces")
        return v

    def lookup(self, key: str, choices: Mapping[str, _T], default: str | Missing = REQUIRED) -> _T:
        """What ``choices`` maps the string at ``key`` to (a table of names)."""
        v = self.get(key, default)
        if not isinstance(v, str) or v not in choices:
            raise self.err(key, f"must be one of {fmt_choices(list(choices))}")
        return choices[v]

    def enum(self, key: str, cls: type[_E], default: _E | Missing = REQUIRED) -> _E:
        return enum_value(self.ctx, self.sub(key), self.get(key, default), cls)

    def version(self, key: str) -> SoftwareVersion:
        v = self.get(key, DEFAULT_SOFTWARE_VERSION)
        if isinstance(v, SoftwareVersion):
            return v
        if not isinstance(v, str):
            raise self.err(key, 'must be a string like "1.0.2"')
        try:
            return SoftwareVersion.parse(v)
        except ValueError as exc:
            raise self.err(key, str(exc)) from None

    def address(self, key: str) -> IPv4Address:
        return unicast_address(self.ctx, self.sub(key), self.get(key, REQUIRED))

    def network(self, key: str) -> IPv4Network:
        v = self.get(key, REQUIRED)
        if not isinstance(v, str):
            raise self.err(key, 'must be a string like "10.1.0.0/16"')
        try:
            return IPv4Network(v)  # strict: host bits set is an error, not silently masked
        except ValueError as exc:
            raise self.err(key, f"invalid IPv4 prefix {v!r}: {exc}") from None

    def any_network(self, key: str) -> IPv4Network | IPv6Network:
        """An IPv4 or IPv6 prefix (traffic selectors)."""
        v = self.get(key, REQUIRED)
        if not isinstance(v, str):
            raise self.err(key, 'must be a string like "10.1.0.0/16" or "fd00:1::/48"')
        try:
            return ip_network(v)  # strict: host bits set is an error, not silently masked
        except ValueError as exc:
            raise self.err(key, f"invalid IPv4 or IPv6 prefix {v!r}: {exc}") from None

    def address6(self, key: str) -> IPv6Address:
        """A unicast IPv6 address."""
        v = self.get(key, REQUIRED)
        if not isinstance(v, str):
            raise self.err(key, 'must be a string like "fd00::1"')
        try:
            addr = IPv6Address(v)
        except ValueError as exc:
            raise self.err(key, f"invalid IPv6 address {v!r}: {exc}") from None
        if addr.is_unspecified or addr.is_multicast:
            raise self.err(key, f"{v} is not a unicast address")
        return addr

    def path(self, key: str, default: Path | None | Missing = REQUIRED) -> Path | None:
        v = self.get(key, default)
        if v is None or isinstance(v, Path):
            return v
        if not isinstance(v, str) or not v:
            raise self.err(key, "must be a non-empty path string")
        # Absolute paths pass through unchanged (Path join semantics).
        return self.ctx.base_dir / v

    def req_path(self, key: str, default: Path | Missing = REQUIRED) -> Path:
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

    def secret(self, key: str) -> bytes:
        """The contents of a private key file (a PSK), without one trailing newline."""
        p = self.existing_file(key, private=True)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise self.err(key, f"cannot read {p}: {exc.strerror}") from None
        # Editors add one trailing newline; anything else is part of the key.
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        if not data:
            raise self.err(key, f"{p} is empty")
        return data

    def host_group(self, key: str) -> str | None:
        """A group name (or numeric gid) that exists on this host; None when empty or absent."""
        v = self.string(key, "")
        if not v:
            return None
        try:
            if v.isdigit():
                grp.getgrgid(int(v))
            else:
                grp.getgrnam(v)
        except (KeyError, OverflowError):
            raise self.err(key, f"no such group: {v!r}") from None
        return v

    def table(self, key: str, allowed: tuple[str, ...]) -> Table | None:
        if key not in self.data:
            return None
        return Table(self.ctx, self.data[key], self.sub(key), allowed)

    def req_table(self, key: str, allowed: tuple[str, ...]) -> Table:
        t = self.table(key, allowed)
        if t is None:
            raise self.err(key, f"missing required table [{self.sub(key)}]")
        return t

    def tables(self, key: str, allowed: tuple[str, ...]) -> list[Table]:
        """An array of tables (``[[key]]``); empty list when absent."""
        v = self.data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise self.err(key, f"must be an array of tables ([[{self.sub(key)}]])")
        return [Table(self.ctx, x, f"{self.sub(key)}[{i}]", allowed) for i, x in enumerate(v)]

    def array(
        self,
        key: str,
        item: Callable[[str, Any], _T],
        default: tuple[_T, ...] | Missing = REQUIRED,
        *,
        unique: bool = True,
        allow_empty: bool = False,
    ) -> tuple[_T, ...]:
        """A list whose elements are converted by ``item(element_path, value)``."""
        if key not in self.data:
            if isinstance(default, Missing):
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


def fmt_choices(choices: tuple[str, ...] | list[str]) -> str:
    return ", ".join(repr(c) for c in choices)


def enum_value(ctx: Context, path: str, v: Any, cls: type[_E]) -> _E:
    if isinstance(v, cls):
        return v
    try:
        if not isinstance(v, str):
            raise ValueError(v)
        return cls(v)
    except ValueError:
        raise ctx.error(path, f"must be one of {fmt_choices([m.value for m in cls])}") from None


def unicast_address(ctx: Context, path: str, v: Any) -> IPv4Address:
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


def duplicates(items: list[tuple[_T, str]]) -> Iterator[tuple[_T, str, str]]:
    """Yield (value, path, first_path) for every repeat of a value."""
    seen: dict[_T, str] = {}
    for value, path in items:
        if value in seen:
            yield value, path, seen[value]
        else:
            seen[value] = path
