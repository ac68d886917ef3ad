"""Helpers around :mod:`gdoid.netlab` (the namespace topology lives in the package).

The fixtures ``netns_required`` and ``topology`` are in tests/conftest.py.
"""

from __future__ import annotations

import pytest

from gdoid.netlab import *  # noqa: F403
from gdoid.netlab import netns_unavailable_reason


def require_netns() -> None:
    """``pytest.skip`` unless root with working ``ip netns`` (call from a fixture)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
