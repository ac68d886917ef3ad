"""Layering of the configuration (issue 10 §4): pure code never loads the config loader.

The engines and ``gdoid/protocol`` may use the configuration model
(``gdoid.config.model``: frozen dataclasses) and ``ConfigError``; reading files,
TOML and the validator (``gdoid.config.loader``, ``table``, ``schema_*``) belong to
the daemons.  Each import is checked in a fresh interpreter, since this test
process has long imported everything.  Also here: no two modules of gdoid/ define a
public class of the same name, and the configuration model reads no files.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GDOID = ROOT / "gdoid"

# What pure code may load of gdoid.config.
ALLOWED_CONFIG_MODULES = {"gdoid.config", "gdoid.config.model", "gdoid.config.errors"}

PROTOCOL_MODULES = sorted(
    f"gdoid.protocol.{p.stem}" for p in (GDOID / "protocol").glob("*.py") if p.stem != "__init__"
)
ENGINE_MODULES = [
    "gdoid.keyserver.engine",
    "gdoid.keyserver.coop",
    "gdoid.keyserver.group",
    "gdoid.groupmember.engine",
]


def _modules_after_import(modules: list[str]) -> set[str]:
    """The names in sys.modules of a new interpreter after importing ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


@pytest.mark.parametrize(
    "modules",
    [PROTOCOL_MODULES, *([m] for m in ENGINE_MODULES)],
    ids=["gdoid.protocol", *ENGINE_MODULES],
)
def test_pure_modules_do_not_load_the_config_loader(modules: list[str]) -> None:
    loaded = _modules_after_import(modules)
    config = {m for m in loaded if m == "gdoid.config" or m.startswith("gdoid.config.")}
    assert config <= ALLOWED_CONFIG_MODULES, (
        f"{modules} load {sorted(config - ALLOWED_CONFIG_MODULES)}"
    )
    assert "tomllib" not in loaded, f"{modules} load the TOML reader"
    if modules != PROTOCOL_MODULES:
        # The engines do read configuration: from the model.
        assert "gdoid.config.model" in loaded


def test_daemon_entry_point_loads_the_loader() -> None:
    """The check above can see the loader when it is there."""
    loaded = _modules_after_import(["gdoid.keyserver.daemon"])
    assert {"gdoid.config.loader", "gdoid.config.table", "tomllib"} <= loaded


def _public_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [n.name for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")]


def test_public_class_names_are_unique_across_gdoid() -> None:
    """A name means one thing: config's traffic selector is not the SAT's, etc."""
    where: dict[str, list[str]] = {}
    for path in sorted(GDOID.rglob("*.py")):
        for name in _public_classes(path):
            where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    clashes = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not clashes


# Calls that touch the file system (pathlib and builtins).
_FS_CALLS = {
    "open",
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "stat",
    "lstat",
    "exists",
    "is_file",
    "is_dir",
    "iterdir",
    "glob",
    "resolve",
    "chmod",
    "mkdir",
}
_FS_MODULES = {"os", "stat", "grp", "pwd", "shutil", "tomllib", "io", "tempfile"}


def test_config_model_reads_no_files() -> None:
    path = GDOID / "config" / "model.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            f = node.func
            calls.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    assert not imported & _FS_MODULES
    assert not calls & _FS_CALLS
