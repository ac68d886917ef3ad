"""Whole ISAKMP messages: header plus the generic payload chain."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from gdoid.protocol.constants import Doi, HeaderFlag, PayloadType
from gdoid.protocol.errors import DecodeError
from gdoid.protocol.gdoi_payloads import (
    AnnPayload,
    GapPayload,
    GdoiSaPayload,
    KdPayload,
    SeqPayload,
)
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.payloads import (
    CertPayload,
    CrPayload,
    DeletePayload,
    HashPayload,
    IdPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    SigPayload,
    UnknownPayload,
    VendorIdPayload,
    generic_header,
    split_generic,
)
from gdoid.protocol.reader import Reader

P = TypeVar("P", bound=Payload)

_TOP_LEVEL: dict[int, type[Payload]] = {
    PayloadType.KE: KePayload,
    PayloadType.ID: IdPayload,
    PayloadType.CERT: CertPayload,
    PayloadType.CR: CrPayload,
    PayloadType.HASH: HashPayload,
    PayloadType.SIG: SigPayload,
    PayloadType.NONCE: NoncePayload,
    PayloadType.NOTIFY: NotifyPayload,
    PayloadType.DELETE: DeletePayload,
    PayloadType.VID: VendorIdPayload,
    PayloadType.KD: KdPayload,
    PayloadType.SEQ: SeqPayload,
    PayloadType.GAP: GapPayload,
    PayloadType.ANN: AnnPayload,  # private: COOP announcements (wire.md §6.3)
}


def _decode_one(payload_type: int, body: bytes) -> Payload:
    if payload_type == PayloadType.SA:
        # DOI 2 is a GDOI SA, or a phase-1 SA (accepted on receive, wire.md §2).  Octet 9
        # is the first SA attribute type of a GDOI SA ("00 <type> 00 00"), but the
        # must-be-zero reserved octet of a phase-1 SA's first proposal header.
        if len(body) >= 10 and int.from_bytes(body[:4], "big") == Doi.GDOI and body[9]:
            return GdoiSaPayload.decode_body(body)
        return SaPayload.decode_body(body)
    klass = _TOP_LEVEL.get(payload_type)
    if klass is None:
        if payload_type in (
            PayloadType.PROPOSAL,
            PayloadType.TRANSFORM,
            PayloadType.SAK,
            PayloadType.SAT,
        ):
            raise DecodeError("payload chain", "next_payload", f"type {payload_type} outside an SA")
        return UnknownPayload(payload_type, body)
    return klass.decode_body(body)


@dataclass(frozen=True)
class DecodedPayload:
    payload: Payload
    raw: bytes  # as received, generic header included (hashes cover these bytes)

    @property
    def body(self) -> bytes:
        return self.raw[4:]


def encode_payloads(payloads: Sequence[Payload]) -> bytes:
    out = []
    for i, p in enumerate(payloads):
        body = p.encode_body()
        nxt = payloads[i + 1].payload_type if i + 1 < len(payloads) else PayloadType.NONE
        out.append(generic_header(nxt, len(body), type(p).__name__) + body)
    return b"".join(out)


def encode_payload(p: Payload, next_payload: int = PayloadType.NONE) -> bytes:
    """One payload with its generic header, as hashes over ``Ni``/``SA`` need it."""
    body = p.encode_body()
    return generic_header(next_payload, len(body), type(p).__name__) + body


def decode_payloads(first: int, data: bytes, max_padding: int = 0) -> tuple[DecodedPayload, ...]:
    """Decode the chain starting with type ``first``.

    ``max_padding`` octets may trail the chain (CBC padding of encrypted bodies).
    """
    r = Reader(data, "payload chain")
    out: list[DecodedPayload] = []
    np = first
    while np != PayloadType.NONE:
        start = r.pos
        nxt, body = split_generic(r, f"payload[{len(out)}]")
        out.append(DecodedPayload(_decode_one(np, body), bytes(data[start : r.pos])))
        np = nxt
        if len(out) > 64:
            raise DecodeError("payload chain", "next_payload", "more than 64 payloads")
    if r.remaining > max_padding:
        raise DecodeError("payload chain", "length", f"{r.remaining} octets after the last payload")
    return tuple(out)


@dataclass(frozen=True)
class Message:
    header: IsakmpHeader
    payloads: tuple[DecodedPayload, ...]

    def get(self, klass: type[P]) -> P | None:
        for d in self.payloads:
            if isinstance(d.payload, klass):
                return d.payload
        return None

    def require(self, klass: type[P], what: str) -> P:
        p = self.get(klass)
        if p is None:
            raise DecodeError(what, klass.__name__, "missing")
        return p

    def all(self, klass: type[P]) -> list[P]:
        return [d.payload for d in self.payloads if isinstance(d.payload, klass)]

    def raw(self, klass: type[Payload]) -> bytes:
        for d in self.payloads:
            if isinstance(d.payload, klass):
                return d.raw
        raise DecodeError("message", klass.__name__, "missing")

    @property
    def types(self) -> tuple[int, ...]:
        return tuple(d.payload.payload_type for d in self.payloads)


def build_header(
    icky: bytes, rcky: bytes, first: int, exchange: int, flags: HeaderFlag, mid: int, body_len: int
) -> IsakmpHeader:
    return IsakmpHeader(icky, rcky, first, exchange, flags, mid, HEADER_LEN + body_len)


def encode_plain(
    icky: bytes,
    rcky: bytes,
    exchange: int,
    mid: int,
    payloads: Sequence[Payload],
    flags: HeaderFlag = HeaderFlag.NONE,
) -> bytes:
    body = encode_payloads(payloads)
    first = payloads[0].payload_type if payloads else PayloadType.NONE
    return build_header(icky, rcky, first, exchange, flags, mid, len(body)).encode() + body


def decode_plain(data: bytes) -> Message:
    header = IsakmpHeader.decode(data)
    if header.encrypted:
        raise DecodeError(
            "ISAKMP header", "flags", "encrypted message where plaintext was expected"
        )
    return Message(header, decode_payloads(header.next_payload, data[HEADER_LEN:]))
