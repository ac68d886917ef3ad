"""COOP key-server announcements (ANN), project-private (wire.md §6.3).

    KS -> KS : HDR*, HASH(1), ANN        exchange 240, protected by a KS-KS phase-1 SA
    HASH(1) = prf(SKEYID_a, M-ID | ANN)      (IkeSa.seal_hashed / open_hashed)

ANN payload (private type 128): version (3), priority (1), role (1), flags (1),
reserved (2), sender ANN sequence number (8), group number (4), policy epoch
(4), then blocks of type (2), length (2), data.  Block data is UTF-8 JSON
(documented in docs/wire.md); a datagram stays below 32 KiB, larger member
lists are split across several ANNs.  The payload's codec is
:class:`~gdoid.protocol.gdoi_payloads.AnnPayload`.
"""

from __future__ import annotations

from gdoid.protocol.constants import ExchangeType, NotifyType
from gdoid.protocol.errors import DecodeError, NotifyError
from gdoid.protocol.gdoi_payloads import AnnPayload
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.payloads import HashPayload
from gdoid.protocol.rng import message_id

MAX_ANN_DATAGRAM = 32 * 1024


def seal_ann(sa: IkeSa, ann: AnnPayload) -> bytes:
    mid = message_id(sa.rng)
    data = sa.seal_hashed(ExchangeType.COOP_ANN, mid, [ann])
    sa.forget_exchange(mid)
    if len(data) > MAX_ANN_DATAGRAM:
        raise ValueError(f"ANN of {len(data)} octets exceeds 32 KiB: split it")
    return data


def open_ann(sa: IkeSa, data: bytes) -> AnnPayload:
    opened = sa.open(data)
    msg = opened.message
    if msg.header.exchange_type != ExchangeType.COOP_ANN:
        raise DecodeError("ANN", "exchange_type", str(msg.header.exchange_type))
    if len(msg.payloads) != 2 or not isinstance(msg.payloads[0].payload, HashPayload):
        raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, "ANN must be HASH, ANN")
    ann = msg.payloads[1].payload
    if not isinstance(ann, AnnPayload):
        raise DecodeError("ANN", "payload", "second payload is not ANN")
    sa.open_hashed(msg, name="ANN HASH(1)")
    sa.forget_exchange(msg.header.message_id)
    return ann
