"""Config files written by programs: ``gdoid lab`` and the tests.

One renderer (:func:`render_toml`, a nested dict to TOML text) and builders of
the tables every generated config shares (:func:`ks_config`, :func:`gm_config`,
:func:`ks_group`, :func:`gm_group`, :func:`sa_ipsec`, :func:`psk_auth`), so a
config key is spelt in one place. Keys whose value is ``None`` are left out.
docs/config.md describes the keys; :mod:`gdoid.config` reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "gm_config",
    "gm_group",
    "ks_config",
    "ks_group",
    "psk_auth",
    "render_toml",
    "sa_ipsec",
]

Table = dict[str, Any]


def _is_table_array(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value)
    )


def _scalar(value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_scalar(value: object) -> bool:
    return value is not None and not isinstance(value, Mapping) and not _is_table_array(value)


def _table(path: str, table: Mapping[str, Any], header: str, out: list[str]) -> None:
    if header:
        out += ["", header] if out else [header]
    # TOML wants a table's own keys before its sub-tables; these keep their order.
    out.extend(f"{k} = {_scalar(v)}" for k, v in table.items() if _is_scalar(v))
    for key, value in table.items():
        name = f"{path}.{key}" if path else key
        if isinstance(value, Mapping):
            # A table holding only tables needs no header of its own.
            own = not value or any(_is_scalar(v) for v in value.values())
            _table(name, value, f"[{name}]" if own else "", out)
        elif _is_table_array(value):
            for item in value:
                _table(name, item, f"[[{name}]]", out)


def render_toml(doc: Mapping[str, Any], comment: str = "") -> str:
    """``doc`` as TOML text; ``comment`` becomes ``#`` lines at the top."""
    out = [f"# {line}" if line else "#" for line in comment.splitlines()]
    _table("", doc, "", out)
    return "\n".join(out) + "\n"


def psk_auth(peer: str, key_file: str) -> Table:
    """An ``[auth]`` table with one ``[[auth.psk]]`` entry."""
    return {"psk": [{"peer": peer, "key_file": key_file}]}


def sa_ipsec(
    number: int = 1,
    *,
    transform: str = "esp-gcm-256",
    lifetime: int = 3600,
    src: str = "10.0.0.0/8",
    dst: str = "10.0.0.0/8",
    match: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Table:
    """One ``[[group.sa_ipsec]]`` (profile ``gdoi-p``) with its ``match`` selector."""
    return {
        "number": number,
        "profile": "gdoi-p",
        "transform": transform,
        "lifetime": lifetime,
        **extra,
        "match": {"src": src, "dst": dst, **(match or {})},
    }


def ks_group(
    *,
    name: str = "GET",
    number: int = 1234,
    signing_key: str = "rekey.key",
    kek: Mapping[str, Any] | None = None,
    sas: Iterable[Table] = (),
    **extra: Any,
) -> Table:
    """One KS ``[[group]]``: its ``kek`` table (signing key first) and ``sa_ipsec`` entries."""
    return {
        "name": name,
        "number": number,
        **extra,
        "kek": {"signing_key": signing_key, **(kek or {})},
        "sa_ipsec": list(sas) or [sa_ipsec()],
    }


def gm_group(
    servers: Sequence[str], *, name: str = "GET", number: int = 1234, **extra: Any
) -> Table:
    """One GM ``[[group]]``: the KSs it registers with, in order."""
    return {"name": name, "number": number, "servers": list(servers), **extra}


def ks_config(
    address: str,
    *,
    auth: Table,
    groups: Iterable[Table],
    ike: Table | None = None,
    coop: Table | None = None,
    comment: str = "",
    **ks: Any,
) -> str:
    """A KS config file: ``[ks]`` (``address`` and the ``ks`` keys), ``[ike]``, ``[auth]``,
    the groups and ``[coop]``."""
    doc = {
        "ks": {"address": address, **ks},
        "ike": ike,
        "auth": auth,
        "group": list(groups),
        "coop": coop,
    }
    return render_toml({k: v for k, v in doc.items() if v is not None}, comment)


def gm_config(
    address: str,
    *,
    auth: Table,
    groups: Iterable[Table],
    ike: Table | None = None,
    dataplane: Table | None = None,
    comment: str = "",
    **gm: Any,
) -> str:
    """A GM config file: ``[gm]`` (``address`` and the ``gm`` keys), ``[ike]``,
    ``[dataplane]``, ``[auth]`` and the groups."""
    doc = {
        "gm": {"address": address, **gm},
        "ike": ike,
        "dataplane": dataplane,
        "auth": auth,
        "group": list(groups),
    }
    return render_toml({k: v for k, v in doc.items() if v is not None}, comment)
