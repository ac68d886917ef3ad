"""Typed errors raised by the sans-I/O protocol layer.

Every parser raises :class:`DecodeError` naming the payload and the field that
was wrong, so a daemon can log a precise drop reason and never a traceback.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of everything gdoid.protocol raises on bad input."""


class DecodeError(ProtocolError):
    """Malformed bytes: names the structure (payload) and the field."""

    def __init__(self, payload: str, field: str, reason: str) -> None:
        self.payload = payload
        self.field = field
        self.reason = reason
        super().__init__(f"{payload}.{field}: {reason}")


class CryptoError(ProtocolError):
    """A cryptographic check failed (bad key share, bad signature, bad padding)."""


class NotifyError(ProtocolError):
    """A peer must be told about a failure with an ISAKMP notify.

    ``notify`` is a :class:`gdoid.protocol.constants.NotifyType`; ``reason`` is
    the human text both sides log.
    """

    def __init__(self, notify: int, reason: str) -> None:
        self.notify = notify
        self.reason = reason
        super().__init__(reason)
