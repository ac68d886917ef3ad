"""The unprotected Informational exchange: a NOTIFY sent before phase-1 keys exist.

    HDR, N          (RFC 2408 §4.8; exchange 5, M-ID 0, not encrypted)

Main Mode answers a refused or broken message with one; the KS engine answers
message 1 of an unknown exchange with INVALID_COOKIE.  Once an SA is
established, Informationals are protected: :meth:`IkeSa.informational
<gdoid.protocol.ike_sa.IkeSa.informational>` (HDR*, HASH(1), N/D).
"""

from __future__ import annotations

from gdoid.protocol.constants import Doi, ExchangeType, NotifyType, ProtocolId
from gdoid.protocol.message import encode_plain
from gdoid.protocol.payloads import NotifyPayload


def plain_notify(icky: bytes, rcky: bytes, notify: NotifyType, data: bytes = b"") -> bytes:
    """An unprotected Informational: used while no phase-1 keys are agreed."""
    return encode_plain(
        icky,
        rcky,
        ExchangeType.INFORMATIONAL,
        0,
        [NotifyPayload(Doi.IPSEC, ProtocolId.PROTO_ISAKMP, notify, icky + rcky, data)],
    )


__all__ = ["plain_notify"]
