"""Fixtures shared by the test modules, and the ``root`` marker.

Helpers that tests call (not fixtures) live in plain modules next to this one
(``procs``, ``dpnet``, ``coopsim``, ``enginenet``, ``pullsim`` ...); no module
imports a ``test_*`` module (tests/test_test_layout.py checks it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gdoid.netlab import Topology
from tests.netns import require_netns
from tests.pki import generate_test_pki
from tests.procs import write_private, write_signing_key


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``root`` (UDP 848, namespaces, nftables, chown) are skipped unless root."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (marked root)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


# --- key files --------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Key files of the in-memory engine tests: ``psk`` (GMs), ``coop.psk`` (KS pairs),
    ``wrong.psk`` (a peer that does not know the secret) and the ``rekey.key`` signing key."""
    for name, text in (
        ("psk", "secret\n"),
        ("coop.psk", "coop-secret\n"),
        ("wrong.psk", "not-the-secret\n"),
    ):
        write_private(tmp_path / name, text)
    write_signing_key(tmp_path / "rekey.key")
    return tmp_path


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """Key files of the daemon (process) tests: ``psk.secret``, ``wrong.secret``, ``rekey.key``."""
    write_private(tmp_path / "psk.secret", "lab-secret-1\n")
    write_private(tmp_path / "wrong.secret", "not-the-secret\n")
    write_signing_key(tmp_path / "rekey.key")
    return tmp_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA with certificates for ``ks``, ``gm1`` and ``gm9`` (one per module)."""
    return generate_test_pki(tmp_path_factory.mktemp("pki"), ["ks", "gm1", "gm9"])


# --- network namespaces -----------------------------------------------------------------


@pytest.fixture(scope="module")
def netns_required() -> None:
    """Skip the test (module) unless root with working ``ip netns``."""
    require_netns()


@pytest.fixture
def topology(netns_required: None) -> Iterator[Topology]:
    """A fresh :class:`~gdoid.netlab.Topology` per test, removed afterwards."""
    with Topology() as topo:
        yield topo
