"""Where the protocol machines get their randomness: injectable, ``secrets`` by default.

Cookies, nonces, message IDs and the responder-cookie secret come from a
:class:`RandomSource`.  Production code never passes one (the ``secrets``
module is the default, and satisfies the protocol as a module); tests that
need the same bytes on every run pass a deterministic source instead of
patching ``secrets``.
"""

from __future__ import annotations

import secrets
from typing import Protocol


class RandomSource(Protocol):
    def token_bytes(self, nbytes: int | None = None) -> bytes: ...

    def randbits(self, k: int) -> int: ...


SYSTEM_RANDOM: RandomSource = secrets


def message_id(rng: RandomSource) -> int:
    """A random non-zero ISAKMP Message ID (zero means phase 1)."""
    return rng.randbits(32) or 1
