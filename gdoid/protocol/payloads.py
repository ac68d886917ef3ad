"""ISAKMP payloads of RFC 2408/2409 as frozen dataclasses.

Each class encodes and decodes its *body*; the generic payload header
(next payload, reserved, length) is handled by :mod:`gdoid.protocol.message`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from gdoid.protocol.attributes import Attribute, decode_attributes, encode_attributes
from gdoid.protocol.constants import PayloadType
from gdoid.protocol.errors import DecodeError
from gdoid.protocol.reader import Reader

GENERIC_HEADER_LEN = 4


class Payload:
    """Base of every payload: subclasses set ``payload_type`` and the codec."""

    payload_type: ClassVar[int]
    __slots__ = ()

    def encode_body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_body(cls, data: bytes) -> Self:
        raise NotImplementedError


def generic_header(next_payload: int, body_len: int, payload: str) -> bytes:
    total = body_len + GENERIC_HEADER_LEN
    if total > 0xFFFF:
        raise ValueError(f"{payload} payload of {total} octets does not fit")
    return struct.pack("!BBH", next_payload, 0, total)


def split_generic(r: Reader, what: str) -> tuple[int, bytes]:
    """Read one generic header and its body from ``r``: (next payload, body)."""
    np = r.u8(f"{what}.next_payload")
    if r.u8(f"{what}.reserved"):
        raise DecodeError(what, "reserved", "must be zero")
    length = r.u16(f"{what}.length")
    if length < GENERIC_HEADER_LEN:
        raise DecodeError(what, "length", f"{length} is shorter than the generic header")
    if length - GENERIC_HEADER_LEN > r.remaining:
        raise DecodeError(what, "length", f"{length} exceeds the {r.remaining + 4} octets left")
    return np, r.take(length - GENERIC_HEADER_LEN, f"{what}.body")


def _nonempty(data: bytes, payload: str, field: str = "data") -> bytes:
    if not data:
        raise DecodeError(payload, field, "must not be empty")
    return data


# --- phase-1 SA: proposals and transforms --------------------------------


@dataclass(frozen=True)
class Transform:
    number: int
    transform_id: int
    attributes: tuple[Attribute, ...]

    def encode_body(self) -> bytes:
        return struct.pack("!BBH", self.number, self.transform_id, 0) + encode_attributes(
            self.attributes
        )

    @classmethod
    def decode_body(cls, data: bytes) -> Transform:
        r = Reader(data, "Transform")
        number = r.u8("number")
        tid = r.u8("transform_id")
        r.zero(2, "reserved")
        return cls(number, tid, decode_attributes(r.rest(), "Transform"))


@dataclass(frozen=True)
class Proposal:
    number: int
    protocol_id: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def encode_body(self) -> bytes:
        out = [
            struct.pack("!BBBB", self.number, self.protocol_id, len(self.spi), len(self.transforms))
        ]
        out.append(self.spi)
        for i, t in enumerate(self.transforms):
            body = t.encode_body()
            np = PayloadType.TRANSFORM if i + 1 < len(self.transforms) else PayloadType.NONE
            out.append(generic_header(np, len(body), "Transform") + body)
        return b"".join(out)

    @classmethod
    def decode_body(cls, data: bytes) -> Proposal:
        r = Reader(data, "Proposal")
        number = r.u8("number")
        proto = r.u8("protocol_id")
        spi_size = r.u8("spi_size")
        count = r.u8("number_of_transforms")
        spi = r.take(spi_size, "spi")
        transforms = []
        np: int = PayloadType.TRANSFORM
        while r.remaining:
            if np != PayloadType.TRANSFORM:
                raise DecodeError("Proposal", "transform.next_payload", f"{np} before the end")
            np, body = split_generic(r, "Transform")
            transforms.append(Transform.decode_body(body))
        if np != PayloadType.NONE:
            raise DecodeError(
                "Proposal", "transform.next_payload", "last transform must end the chain"
            )
        if len(transforms) != count or count == 0:
            raise DecodeError(
                "Proposal", "number_of_transforms", f"says {count}, found {len(transforms)}"
            )
        return cls(number, proto, spi, tuple(transforms))


@dataclass(frozen=True)
class SaPayload(Payload):
    """Phase-1 SA payload (DOI 1 on send, as Wireshark needs; DOI 0/1/2 accepted)."""

    payload_type: ClassVar[int] = PayloadType.SA
    doi: int
    situation: int
    proposals: tuple[Proposal, ...]

    def encode_body(self) -> bytes:
        out = [struct.pack("!II", self.doi, self.situation)]
        for i, p in enumerate(self.proposals):
            body = p.encode_body()
            np = PayloadType.PROPOSAL if i + 1 < len(self.proposals) else PayloadType.NONE
            out.append(generic_header(np, len(body), "Proposal") + body)
        return b"".join(out)

    @classmethod
    def decode_body(cls, data: bytes) -> SaPayload:
        r = Reader(data, "SA")
        doi = r.u32("doi")
        situation = r.u32("situation")
        proposals = []
        np: int = PayloadType.PROPOSAL
        while r.remaining:
            if np != PayloadType.PROPOSAL:
                raise DecodeError("SA", "proposal.next_payload", f"{np} before the end")
            np, body = split_generic(r, "Proposal")
            proposals.append(Proposal.decode_body(body))
        if not proposals:
            raise DecodeError("SA", "proposals", "no proposal")
        if np != PayloadType.NONE:
            raise DecodeError("SA", "proposal.next_payload", "last proposal must end the chain")
        return cls(doi, situation, tuple(proposals))


# --- simple payloads ------------------------------------------------------


@dataclass(frozen=True)
class KePayload(Payload):
    payload_type: ClassVar[int] = PayloadType.KE
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, data: bytes) -> KePayload:
        return cls(_nonempty(data, "KE", "key_exchange_data"))


@dataclass(frozen=True)
class IdPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.ID
    id_type: int
    protocol_id: int
    port: int
    data: bytes

    def encode_body(self) -> bytes:
        return struct.pack("!BBH", self.id_type, self.protocol_id, self.port) + self.data

    @classmethod
    def decode_body(cls, data: bytes) -> IdPayload:
        r = Reader(data, "ID")
        id_type = r.u8("id_type")
        proto = r.u8("protocol_id")
        port = r.u16("port")
        body = _nonempty(r.rest(), "ID", "identification_data")
        return cls(id_type, proto, port, body)


@dataclass(frozen=True)
class CertPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.CERT
    encoding: int
    data: bytes

    def encode_body(self) -> bytes:
        return bytes([self.encoding]) + self.data

    @classmethod
    def decode_body(cls, data: bytes) -> CertPayload:
        r = Reader(data, "CERT")
        enc = r.u8("encoding")
        return cls(enc, _nonempty(r.rest(), "CERT", "certificate_data"))


@dataclass(frozen=True)
class CrPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.CR
    cert_type: int
    authority: bytes = b""

    def encode_body(self) -> bytes:
        return bytes([self.cert_type]) + self.authority

    @classmethod
    def decode_body(cls, data: bytes) -> CrPayload:
        r = Reader(data, "CR")
        return cls(r.u8("cert_type"), r.rest())


@dataclass(frozen=True)
class HashPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.HASH
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, data: bytes) -> HashPayload:
        if not 12 <= len(data) <= 64:
            raise DecodeError("HASH", "hash_data", f"{len(data)} octets is no known hash size")
        return cls(data)


@dataclass(frozen=True)
class SigPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.SIG
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, data: bytes) -> SigPayload:
        return cls(_nonempty(data, "SIG", "signature_data"))


@dataclass(frozen=True)
class NoncePayload(Payload):
    payload_type: ClassVar[int] = PayloadType.NONCE
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, data: bytes) -> NoncePayload:
        # RFC 2409 §5: nonces are 8 to 256 octets.
        if not 8 <= len(data) <= 256:
            raise DecodeError("NONCE", "nonce_data", f"{len(data)} octets, must be 8..256")
        return cls(data)


@dataclass(frozen=True)
class NotifyPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.NOTIFY
    doi: int
    protocol_id: int
    notify_type: int
    spi: bytes = b""
    data: bytes = b""

    def encode_body(self) -> bytes:
        return (
            struct.pack("!IBBH", self.doi, self.protocol_id, len(self.spi), self.notify_type)
            + self.spi
            + self.data
        )

    @classmethod
    def decode_body(cls, data: bytes) -> NotifyPayload:
        r = Reader(data, "NOTIFY")
        doi = r.u32("doi")
        proto = r.u8("protocol_id")
        spi_size = r.u8("spi_size")
        ntype = r.u16("notify_message_type")
        spi = r.take(spi_size, "spi")
        return cls(doi, proto, ntype, spi, r.rest())


@dataclass(frozen=True)
class DeletePayload(Payload):
    payload_type: ClassVar[int] = PayloadType.DELETE
    doi: int
    protocol_id: int
    spi_size: int
    spis: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if any(len(s) != self.spi_size for s in self.spis):
            raise ValueError("every SPI in a DELETE has the declared size")

    def encode_body(self) -> bytes:
        return struct.pack(
            "!IBBH", self.doi, self.protocol_id, self.spi_size, len(self.spis)
        ) + b"".join(self.spis)

    @classmethod
    def decode_body(cls, data: bytes) -> DeletePayload:
        r = Reader(data, "DELETE")
        doi = r.u32("doi")
        proto = r.u8("protocol_id")
        spi_size = r.u8("spi_size")
        count = r.u16("number_of_spis")
        if count == 0 or spi_size == 0:
            raise DecodeError("DELETE", "number_of_spis", "a DELETE names at least one SPI")
        spis = tuple(r.take(spi_size, f"spi[{i}]") for i in range(count))
        r.end("number_of_spis")
        return cls(doi, proto, spi_size, spis)


@dataclass(frozen=True)
class VendorIdPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.VID
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, data: bytes) -> VendorIdPayload:
        return cls(_nonempty(data, "VID", "vendor_id"))


@dataclass(frozen=True)
class UnknownPayload(Payload):
    """A payload type we do not implement; kept so hashes over it still work."""

    type: int
    body: bytes

    @property
    def payload_type(self) -> int:  # type: ignore[override]  # the one payload whose type is per instance
        return self.type

    def encode_body(self) -> bytes:
        return self.body
