"""Test fixtures around :mod:`gdoid.netlab` (the namespace topology lives in the package)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gdoid.netlab import *  # noqa: F403
from gdoid.netlab import Topology, netns_unavailable_reason


def require_netns() -> None:
    """``pytest.skip`` unless root with working ``ip netns`` (call from a fixture)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def netns_required() -> None:
    """Skip the test (module) unless namespaces work; import it into a test module."""
    require_netns()


@pytest.fixture
def topology(netns_required: None) -> Iterator[Topology]:
    """A fresh :class:`Topology` per test, removed afterwards."""
    with Topology() as topo:
        yield topo
