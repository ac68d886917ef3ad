"""GDOI payloads of RFC 6407 §5: SA (DOI 2), SAK, SAT, KD, SEQ, GAP; and COOP's private ANN.

Layouts follow wire.md §4 (which matches Wireshark's dissector): the SA
payload of DOI 2 carries its SAK/SAT/GAP chain inside its own length.  A SAT's
Protocol-ID selects the layout of the rest of it (RFC 6407 §5.4): ESP and AH
use the ID-based layout of §5.4.1 (:class:`SatPayload`); any other protocol
(RFC 8052's, private use) is kept as opaque octets (:class:`OpaqueSatPayload`).
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from gdoid.protocol.attributes import Attribute, decode_attributes, encode_attributes
from gdoid.protocol.constants import Doi, GdoiProtocol, IdType, KeyPacketType, PayloadType
from gdoid.protocol.errors import DecodeError
from gdoid.protocol.payloads import Payload, generic_header, split_generic
from gdoid.protocol.reader import Reader
from gdoid.protocol.version import SoftwareVersion

# Fixed identification-data sizes we can check (RFC 2407 §4.6.2).
_ID_DATA_LEN: dict[int, int] = {
    IdType.ID_IPV4_ADDR: 4,
    IdType.ID_IPV4_ADDR_SUBNET: 8,
    IdType.ID_IPV4_ADDR_RANGE: 8,
    IdType.ID_IPV6_ADDR: 16,
    IdType.ID_IPV6_ADDR_SUBNET: 32,  # address | mask
    IdType.ID_IPV6_ADDR_RANGE: 32,  # start | end
}
# Per identity type: the address family's octet count and whether data is one address.
_ID_SHAPE: dict[int, tuple[int, str]] = {
    IdType.ID_IPV4_ADDR: (4, "addr"),
    IdType.ID_IPV4_ADDR_SUBNET: (4, "subnet"),
    IdType.ID_IPV4_ADDR_RANGE: (4, "range"),
    IdType.ID_IPV6_ADDR: (16, "addr"),
    IdType.ID_IPV6_ADDR_SUBNET: (16, "subnet"),
    IdType.ID_IPV6_ADDR_RANGE: (16, "range"),
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(octets: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if len(octets) == 4:
        return ipaddress.IPv4Address(octets)
    return ipaddress.IPv6Address(octets)


@dataclass(frozen=True)
class TrafficId:
    """Source or destination identification inside a SAK or SAT."""

    id_type: int
    port: int
    data: bytes

    @classmethod
    def from_network(cls, net: Network, port: int = 0) -> TrafficId:
        """A host is ID_IPV4_ADDR / ID_IPV6_ADDR, a prefix ID_IPV4/IPV6_ADDR_SUBNET."""
        host = net.prefixlen == net.max_prefixlen
        if net.version == 4:
            id_type = IdType.ID_IPV4_ADDR if host else IdType.ID_IPV4_ADDR_SUBNET
        else:
            id_type = IdType.ID_IPV6_ADDR if host else IdType.ID_IPV6_ADDR_SUBNET
        data = net.network_address.packed + (b"" if host else net.netmask.packed)
        return cls(id_type, port, data)

    def to_network(self) -> Network:
        """The prefix this identity names; a range must be exactly one prefix."""
        shape = _ID_SHAPE.get(self.id_type)
        if shape is None:
            raise DecodeError(
                "TrafficId", "id_type", f"type {self.id_type} is not an IP address/subnet/range"
            )
        size, kind = shape
        want = _ID_DATA_LEN[self.id_type]
        if len(self.data) != want:
            raise DecodeError("TrafficId", "id_data", f"{len(self.data)} octets, type needs {want}")
        first = _address(self.data[:size])
        if kind == "addr":
            return ipaddress.ip_network(first)
        second = _address(self.data[size:])
        if kind == "subnet":
            bits, mask = size * 8, int(second)
            host_bits = ((1 << bits) - 1 ^ mask).bit_length()
            if mask != (1 << bits) - (1 << host_bits):
                raise DecodeError("TrafficId", "id_data", f"mask {second} is not a prefix")
            return ipaddress.ip_network((first, bits - host_bits), strict=False)
        if int(second) < int(first):
            raise DecodeError(
                "TrafficId", "id_data", f"range {first}-{second} ends before it starts"
            )
        count = int(second) - int(first) + 1  # a prefix: a power of two, aligned on it
        if count & (count - 1) or int(first) % count:
            raise DecodeError(
                "TrafficId", "id_data", f"range {first}-{second} is not a single prefix"
            )
        return ipaddress.ip_network((first, size * 8 - (count.bit_length() - 1)))

    def check(self, payload: str, side: str) -> None:
        want = _ID_DATA_LEN.get(self.id_type)
        if want is not None and len(self.data) != want:
            raise DecodeError(
                payload, f"{side}_id_data", f"{len(self.data)} octets, type needs {want}"
            )


def _decode_traffic_id(r: Reader, side: str, wide_length: bool) -> TrafficId:
    id_type = r.u8(f"{side}_id_type")
    port = r.u16(f"{side}_id_port")
    length = r.u16(f"{side}_id_length") if wide_length else r.u8(f"{side}_id_length")
    tid = TrafficId(id_type, port, r.take(length, f"{side}_id_data"))
    tid.check(r.payload, side)
    return tid


def _encode_traffic_id(tid: TrafficId, wide_length: bool) -> bytes:
    size = struct.pack("!H", len(tid.data)) if wide_length else bytes([len(tid.data)])
    return struct.pack("!BH", tid.id_type, tid.port) + size + tid.data


@dataclass(frozen=True)
class SakPayload(Payload):
    """SA KEK (RFC 6407 §5.3): the rekey SA.  SPI = the cookie pair of pushes."""

    payload_type: ClassVar[int] = PayloadType.SAK
    protocol: int
    src: TrafficId
    dst: TrafficId
    spi: bytes
    attributes: tuple[Attribute, ...]

    def __post_init__(self) -> None:
        if len(self.spi) != 16:
            raise ValueError("a KEK SPI is 16 octets (CKY-I | CKY-R)")

    def encode_body(self) -> bytes:
        return (
            bytes([self.protocol])
            + _encode_traffic_id(self.src, False)
            + _encode_traffic_id(self.dst, False)
            + self.spi
            + bytes(4)
            + encode_attributes(self.attributes)
        )

    @classmethod
    def decode_body(cls, data: bytes) -> SakPayload:
        r = Reader(data, "SAK")
        proto = r.u8("protocol")
        src = _decode_traffic_id(r, "src", False)
        dst = _decode_traffic_id(r, "dst", False)
        spi = r.take(16, "spi")
        r.zero(4, "reserved2")
        return cls(proto, src, dst, spi, decode_attributes(r.rest(), "SAK"))


# RFC 6407 §5.4.1: the Protocol-IDs whose SAT has the ID-based (ESP/AH) layout.
ID_LAYOUT_PROTOCOLS = frozenset(
    (GdoiProtocol.GDOI_PROTO_IPSEC_ESP, GdoiProtocol.GDOI_PROTO_IPSEC_AH)
)


@dataclass(frozen=True)
class SatPayload(Payload):
    """SA TEK (RFC 6407 §5.4) with the ESP/AH protocol-specific layout (§5.4.1)."""

    payload_type: ClassVar[int] = PayloadType.SAT
    protocol_id: int
    ip_protocol: int
    src: TrafficId
    dst: TrafficId
    transform_id: int
    spi: int
    attributes: tuple[Attribute, ...]

    def __post_init__(self) -> None:
        if self.protocol_id not in ID_LAYOUT_PROTOCOLS:
            raise ValueError(
                f"SAT protocol {self.protocol_id} has no ESP/AH layout: OpaqueSatPayload"
            )

    def encode_body(self) -> bytes:
        return (
            bytes([self.protocol_id, self.ip_protocol])
            + _encode_traffic_id(self.src, True)
            + _encode_traffic_id(self.dst, True)
            + struct.pack("!BI", self.transform_id, self.spi)
            + encode_attributes(self.attributes)
        )

    @classmethod
    def decode_body(cls, data: bytes) -> SatPayload:
        r = Reader(data, "SAT")
        proto_id = r.u8("protocol_id")
        if proto_id not in ID_LAYOUT_PROTOCOLS:
            raise DecodeError("SAT", "protocol_id", f"{proto_id} has no ESP/AH layout")
        ip_proto = r.u8("ip_protocol")
        src = _decode_traffic_id(r, "src", True)
        dst = _decode_traffic_id(r, "dst", True)
        transform = r.u8("transform_id")
        spi = r.u32("spi")
        return cls(proto_id, ip_proto, src, dst, transform, spi, decode_attributes(r.rest(), "SAT"))


@dataclass(frozen=True)
class OpaqueSatPayload(Payload):
    """SA TEK of a Protocol-ID without the ESP/AH layout: its TEK protocol-specific
    payload kept as octets (RFC 6407 §5.4.2 leaves other protocols to their own RFCs)."""

    payload_type: ClassVar[int] = PayloadType.SAT
    protocol_id: int
    data: bytes

    def __post_init__(self) -> None:
        if self.protocol_id in ID_LAYOUT_PROTOCOLS or not 0 <= self.protocol_id <= 255:
            raise ValueError(f"SAT protocol {self.protocol_id}: use SatPayload")

    def encode_body(self) -> bytes:
        return bytes([self.protocol_id]) + self.data

    @classmethod
    def decode_body(cls, data: bytes) -> OpaqueSatPayload:
        r = Reader(data, "SAT")
        proto_id = r.u8("protocol_id")
        if proto_id in ID_LAYOUT_PROTOCOLS:
            raise DecodeError("SAT", "protocol_id", f"{proto_id} has the ESP/AH layout")
        return cls(proto_id, r.rest())


AnySat = SatPayload | OpaqueSatPayload


def decode_sat(data: bytes) -> AnySat:
    """A SAT body, decoded by its Protocol-ID (RFC 6407 §5.4)."""
    if data[:1] and data[0] not in ID_LAYOUT_PROTOCOLS:
        return OpaqueSatPayload.decode_body(data)
    return SatPayload.decode_body(data)


@dataclass(frozen=True)
class GapPayload(Payload):
    """Group Associated Policy (RFC 6407 §5.6)."""

    payload_type: ClassVar[int] = PayloadType.GAP
    attributes: tuple[Attribute, ...]

    def encode_body(self) -> bytes:
        return encode_attributes(self.attributes)

    @classmethod
    def decode_body(cls, data: bytes) -> GapPayload:
        return cls(decode_attributes(data, "GAP"))


# Type in the chain -> (name for errors, body decoder).
_SA_ATTRIBUTE_PAYLOADS: dict[int, tuple[str, Callable[[bytes], Payload]]] = {
    PayloadType.SAK: ("SakPayload", SakPayload.decode_body),
    PayloadType.SAT: ("SatPayload", decode_sat),
    PayloadType.GAP: ("GapPayload", GapPayload.decode_body),
}


@dataclass(frozen=True)
class GdoiSaPayload(Payload):
    """SA payload of DOI 2: situation, then the SAK/SAT/GAP chain inside it."""

    payload_type: ClassVar[int] = PayloadType.SA
    attributes: tuple[Payload, ...]  # SakPayload | SatPayload | OpaqueSatPayload | GapPayload
    situation: int = 0

    def encode_body(self) -> bytes:
        if not self.attributes:
            raise ValueError("a GDOI SA carries at least one SAK or SAT")
        first = self.attributes[0].payload_type
        # wire.md §4: "00 <type> 00 00"; the type in the first octet breaks Wireshark.
        out = [struct.pack("!IIBBH", Doi.GDOI, self.situation, 0, first, 0)]
        for i, p in enumerate(self.attributes):
            body = p.encode_body()
            nxt = self.attributes[i + 1].payload_type if i + 1 < len(self.attributes) else 0
            out.append(generic_header(nxt, len(body), type(p).__name__) + body)
        return b"".join(out)

    @classmethod
    def decode_body(cls, data: bytes) -> GdoiSaPayload:
        r = Reader(data, "SA(GDOI)")
        doi = r.u32("doi")
        if doi != Doi.GDOI:
            raise DecodeError("SA(GDOI)", "doi", f"{doi}, expected 2")
        situation = r.u32("situation")
        r.zero(1, "reserved")
        np = r.u8("sa_attribute_next_payload")
        r.zero(2, "reserved2")
        attrs: list[Payload] = []
        while np != PayloadType.NONE:
            entry = _SA_ATTRIBUTE_PAYLOADS.get(np)
            if entry is None:
                raise DecodeError("SA(GDOI)", "sa_attribute_next_payload", f"type {np} not allowed")
            name, decode = entry
            np_next, body = split_generic(r, name)
            attrs.append(decode(body))
            np = np_next
        r.end("sa_attributes")
        if not attrs:
            raise DecodeError("SA(GDOI)", "sa_attribute_next_payload", "no SAK or SAT")
        return cls(tuple(attrs), situation)

    @property
    def sak(self) -> SakPayload | None:
        return next((p for p in self.attributes if isinstance(p, SakPayload)), None)

    @property
    def sats(self) -> tuple[SatPayload, ...]:
        """The SATs with the ESP/AH layout."""
        return tuple(p for p in self.attributes if isinstance(p, SatPayload))

    @property
    def all_sats(self) -> tuple[AnySat, ...]:
        """Every SAT in order, whatever its Protocol-ID."""
        return tuple(p for p in self.attributes if isinstance(p, SatPayload | OpaqueSatPayload))

    @property
    def gap(self) -> GapPayload | None:
        return next((p for p in self.attributes if isinstance(p, GapPayload)), None)


@dataclass(frozen=True)
class KeyPacket:
    """One key packet of a KD payload: TEK, KEK, LKH or SID."""

    kd_type: int
    spi: bytes
    attributes: tuple[Attribute, ...]

    def encode(self) -> bytes:
        body = bytes([len(self.spi)]) + self.spi + encode_attributes(self.attributes)
        length = 4 + len(body)
        if length > 0xFFFF:
            raise ValueError("key packet too long")
        return struct.pack("!BBH", self.kd_type, 0, length) + body


@dataclass(frozen=True)
class KdPayload(Payload):
    """Key Download (RFC 6407 §5.5)."""

    payload_type: ClassVar[int] = PayloadType.KD
    packets: tuple[KeyPacket, ...]

    def encode_body(self) -> bytes:
        return struct.pack("!HH", len(self.packets), 0) + b"".join(p.encode() for p in self.packets)

    @classmethod
    def decode_body(cls, data: bytes) -> KdPayload:
        r = Reader(data, "KD")
        count = r.u16("number_of_key_packets")
        r.zero(2, "reserved2")
        packets = []
        for i in range(count):
            kd_type = r.u8(f"key_packet[{i}].type")
            if kd_type not in KeyPacketType.__members__.values():
                raise DecodeError("KD", f"key_packet[{i}].type", f"unknown type {kd_type}")
            r.zero(1, f"key_packet[{i}].reserved")
            length = r.u16(f"key_packet[{i}].length")
            if length < 5:
                raise DecodeError("KD", f"key_packet[{i}].length", f"{length} < 5")
            body = Reader(r.take(length - 4, f"key_packet[{i}].body"), "KD")
            spi = body.take(body.u8(f"key_packet[{i}].spi_size"), f"key_packet[{i}].spi")
            packets.append(
                KeyPacket(kd_type, spi, decode_attributes(body.rest(), f"KD key_packet[{i}]"))
            )
        r.end("number_of_key_packets")
        return cls(tuple(packets))

    def of_type(self, kd_type: int) -> list[KeyPacket]:
        return [p for p in self.packets if p.kd_type == kd_type]


@dataclass(frozen=True)
class SeqPayload(Payload):
    """Sequence Number (RFC 6407 §5.7): exactly four octets."""

    payload_type: ClassVar[int] = PayloadType.SEQ
    seq: int

    def encode_body(self) -> bytes:
        return struct.pack("!I", self.seq)

    @classmethod
    def decode_body(cls, data: bytes) -> SeqPayload:
        if len(data) != 4:
            raise DecodeError("SEQ", "sequence_number", f"{len(data)} octets, must be 4")
        return cls(int.from_bytes(data, "big"))


# --- project-private: the COOP announcement (ann.py, wire.md §6.3) --------------

_ANN_FIXED = struct.Struct("!3sBBBHQII")


class Role(IntEnum):
    PRIMARY = 1
    SECONDARY = 2


class AnnFlag(IntEnum):
    REPLY_REQUESTED = 0x01


class BlockType(IntEnum):
    GROUP_KEYS = 1  # KEK, TEKs, SEQ, pseudotime origin, SID slice owner
    MEMBERS_FULL = 2  # a chunk of the full member list: {"chunk": i, "of": n, "members": [...]}
    MEMBERS_DELTA = 3  # members added or changed since the last ANN
    MEMBERS_REMOVED = 4  # addresses removed
    SENDER_IDS = 5  # used-SID records per KS slice (keyserver/sender_ids.py)
    SIGNING_KEY = 6  # {"sha256": hex}: fingerprint of the sender's rekey signing public key (DER)


@dataclass(frozen=True)
class AnnBlock:
    type: int
    data: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except ValueError as exc:
            raise DecodeError("ANN", f"block[{self.type}]", f"not JSON: {exc}") from exc

    @classmethod
    def of(cls, type_: BlockType, value: Any) -> AnnBlock:
        return cls(type_, json.dumps(value, separators=(",", ":")).encode())


@dataclass(frozen=True)
class AnnPayload(Payload):
    payload_type: ClassVar[int] = PayloadType.ANN
    version: SoftwareVersion
    priority: int
    role: int
    flags: int
    sequence: int
    group_number: int
    policy_epoch: int
    blocks: tuple[AnnBlock, ...] = ()

    def encode_body(self) -> bytes:
        out = [
            _ANN_FIXED.pack(
                bytes(self.version),
                self.priority,
                self.role,
                self.flags,
                0,
                self.sequence,
                self.group_number,
                self.policy_epoch,
            )
        ]
        for b in self.blocks:
            if len(b.data) > 0xFFFF:
                raise ValueError("ANN block too large")
            out.append(struct.pack("!HH", b.type, len(b.data)) + b.data)
        return b"".join(out)

    @classmethod
    def decode_body(cls, data: bytes) -> AnnPayload:
        r = Reader(data, "ANN")
        version = SoftwareVersion(*r.take(3, "version"))
        priority = r.u8("priority")
        role = r.u8("role")
        if role not in (Role.PRIMARY, Role.SECONDARY):
            raise DecodeError("ANN", "role", f"{role}")
        flags = r.u8("flags")
        r.zero(2, "reserved")
        seq = r.u64("sequence")
        group = r.u32("group_number")
        epoch = r.u32("policy_epoch")
        blocks: list[AnnBlock] = []
        while r.remaining:
            btype = r.u16(f"block[{len(blocks)}].type")
            blen = r.u16(f"block[{len(blocks)}].length")
            blocks.append(AnnBlock(btype, r.take(blen, f"block[{len(blocks)}].data")))
        return cls(version, priority, role, flags, seq, group, epoch, tuple(blocks))

    def block(self, type_: BlockType) -> AnnBlock | None:
        return next((b for b in self.blocks if b.type == type_), None)
