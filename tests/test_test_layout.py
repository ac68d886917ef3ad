"""The test tree's shape: helpers live in helper modules, never in ``test_*`` modules.

A test module that imports another one runs (or hides) the other's fixtures and
couples two files that should change alone; shared code goes into a helper
module (``tests/procs.py``, ``tests/coopsim.py`` ...) or ``tests/conftest.py``.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Module names in strings: subprocess scripts and ``--dataplane module:factory``.
_DOTTED_TEST = re.compile(r"\btests(?:\.\w+)*\.test_\w+")


def _is_test_module(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1].startswith("test_")


def imports_of_test_modules(path: Path) -> list[str]:
    """``line: what`` for every import of a ``test_*`` module in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {a.name}" for a in node.names if _is_test_module(a.name)
            ]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_test_module(module):
                found.append(f"{node.lineno}: from {'.' * node.level}{module} import ...")
            # ``from tests import test_x`` / ``from . import test_x``
            found += [
                f"{node.lineno}: from {'.' * node.level}{module} import {a.name}"
                for a in node.names
                if _is_test_module(a.name)
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{node.lineno}: {m!r} in a string" for m in _DOTTED_TEST.findall(node.value)]
    return found


def python_files() -> list[Path]:
    """Every module of the repository but this one (whose strings name test modules)."""
    this = Path(__file__).resolve()
    return sorted(
        p
        for d in ("tests", "benchmarks", "gdoid")
        for p in (ROOT / d).rglob("*.py")
        if p.resolve() != this
    )


def test_no_module_imports_a_test_module() -> None:
    offenders = {
        str(p.relative_to(ROOT)): hits
        for p in python_files()
        if (hits := imports_of_test_modules(p))
    }
    assert offenders == {}


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import tests.test_a\n"
        "from tests.test_b import x\n"
        "from tests import test_c\n"
        "from .test_d import y\n"
        "def f():\n"
        "    from tests.security.test_e import z\n"
        "SCRIPT = 'from tests.test_f import w'\n"
        "import tests.procs\n"
        "from tests.coopsim import Sim\n"
    )
    hits = imports_of_test_modules(bad)
    assert [h.split(":")[0] for h in hits] == ["1", "2", "3", "4", "6", "7"]


def test_every_helper_module_imports() -> None:
    """Helpers some tests load only in a subprocess (``--dataplane tests.stubdataplane:...``)."""
    helpers = [p for p in (ROOT / "tests").rglob("*.py") if not p.name.startswith("test_")]
    for path in helpers:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        importlib.import_module(module.removesuffix(".__init__"))
