"""Field-by-field checks of decoded JSON (ANN blocks, the state file): typed values or a typed error.

Each check takes the value and the field's dotted name and returns the value as
its Python type, or raises :class:`FieldInvalid` naming the field.  Shared by
:mod:`gdoid.keyserver.group_keys` and :mod:`gdoid.keyserver.annblocks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network
from typing import Any, TypeVar

from gdoid.protocol.errors import ProtocolError

MAX_TIME = 1e11  # seconds since the epoch: year 5138, and no NaN/inf
U32 = 2**32 - 1

_E = TypeVar("_E", bound=IntEnum)
_T = TypeVar("_T")


class FieldInvalid(ProtocolError):
    """A decoded field that does not validate; ``field`` names it (dotted path)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}"[:300])


def fields(
    v: Any, name: str, keys: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """An object with exactly ``keys``, and any of ``optional``."""
    if not isinstance(v, dict):
        raise FieldInvalid(name, f"must be an object, not {type(v).__name__}")
    if set(v) - optional != keys:
        missing = sorted(keys - set(v))
        extra = sorted(str(k)[:20] for k in set(v) - keys - optional)[:3]
        raise FieldInvalid(name, f"missing {missing}" if missing else f"unknown keys {extra}")
    return v


def integer(v: Any, name: str, lo: int, hi: int) -> int:
    if type(v) is not int:  # bool is an int subclass: refused
        raise FieldInvalid(name, f"must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise FieldInvalid(name, f"{v} outside {lo}..{hi}")
    return v


def time(v: Any, name: str) -> float:
    if type(v) not in (int, float):
        raise FieldInvalid(name, f"must be a number, not {type(v).__name__}")
    if not math.isfinite(v) or not 0 <= v <= MAX_TIME:
        raise FieldInvalid(name, f"{v!r} is not a time")
    return float(v)


def string(v: Any, name: str, max_len: int) -> str:
    if not isinstance(v, str):
        raise FieldInvalid(name, f"must be a string, not {type(v).__name__}")
    if len(v) > max_len:
        raise FieldInvalid(name, f"longer than {max_len} characters")
    return v


def boolean(v: Any, name: str) -> bool:
    if type(v) is not bool:
        raise FieldInvalid(name, "must be true or false")
    return v


def hex_bytes(v: Any, name: str, lengths: tuple[int, ...]) -> bytes:
    s = string(v, name, 2 * max(lengths))
    try:
        b = bytes.fromhex(s)
    except ValueError:
        raise FieldInvalid(name, "not hex") from None
    if len(b) not in lengths:
        raise FieldInvalid(name, f"{len(b)} octets, expected {' or '.join(map(str, lengths))}")
    return b


def array(v: Any, name: str, max_len: int, min_len: int = 0) -> list[Any]:
    if not isinstance(v, list):
        raise FieldInvalid(name, f"must be a list, not {type(v).__name__}")
    if not min_len <= len(v) <= max_len:
        raise FieldInvalid(name, f"{len(v)} entries, allowed {min_len}..{max_len}")
    return v


def address(v: Any, name: str) -> IPv4Address:
    """A unicast IPv4 address."""
    s = string(v, name, 15)
    try:
        a = IPv4Address(s)
    except ValueError:
        raise FieldInvalid(name, f"{s!r} is not an IPv4 address") from None
    if a.is_unspecified or a.is_multicast or a == IPv4Address("255.255.255.255"):
        raise FieldInvalid(name, f"{a} is not a unicast address")
    return a


def network(v: Any, name: str) -> IPv4Network | IPv6Network:
    s = string(v, name, 43)  # the longest IPv6 prefix text
    try:
        return ip_network(s)
    except ValueError:
        raise FieldInvalid(name, f"{s!r} is not an IPv4 or IPv6 prefix") from None


def enum(v: Any, name: str, cls: type[_E]) -> _E:
    value = integer(v, name, 0, 0xFFFF)
    try:
        return cls(value)
    except ValueError:
        raise FieldInvalid(name, f"{value} is not a {cls.__name__}") from None


def optional(v: Any, check: Callable[[Any], _T]) -> _T | None:
    return None if v is None else check(v)
