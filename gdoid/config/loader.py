"""Reading ``ks.toml`` / ``gm.toml``: the entry points of configuration loading.

``load_ks_config`` / ``load_gm_config`` read a TOML file (stdlib ``tomllib``)
and return the frozen, fully validated dataclasses of :mod:`gdoid.config.model`.
Every problem raises :class:`ConfigError` naming the file and the dotted key path,
e.g. ``ks.toml: group[0].sa_ipsec[1].lifetime: must be an integer between 20 and 86400``.
Relative paths are resolved against the directory of the config file.

The layout and every key are documented in ``docs/config.md``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gdoid.config.errors import ConfigError
from gdoid.config.model import GmConfig, KsConfig
from gdoid.config.schema_gm import build_gm
from gdoid.config.schema_ks import build_ks
from gdoid.config.table import Context

__all__ = ["load_gm_config", "load_ks_config", "parse_gm_config", "parse_ks_config"]


def _parse_toml(ctx: Context, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ctx.error("", f"invalid TOML: {exc}") from None


def parse_ks_config(text: str, base_dir: Path, name: str = "ks.toml") -> KsConfig:
    """Parse KS TOML ``text``; relative paths resolve against ``base_dir``."""
    ctx = Context(name, Path(base_dir).absolute())
    return build_ks(ctx, _parse_toml(ctx, text))


def parse_gm_config(text: str, base_dir: Path, name: str = "gm.toml") -> GmConfig:
    """Parse GM TOML ``text``; relative paths resolve against ``base_dir``."""
    ctx = Context(name, Path(base_dir).absolute())
    return build_gm(ctx, _parse_toml(ctx, text))


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
