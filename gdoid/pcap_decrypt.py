"""GROUPKEY-PUSH messages of a capture rewritten into their decrypted form (``gdoid decrypt-pcap``).

Wireshark decrypts Main Mode and GROUPKEY-PULL from ``ikev1_decryption_table``
but not GROUPKEY-PUSH: it derives IKEv1 IVs, while a push is encrypted under the
KEK with the KEK's static IV (docs/wire.md).  This module takes the bytes of a
pcap or pcapng file and the KEKs of the key log (``gdoid_kek_table``), and gives
back the file with every push it has a key for replaced by the same message in
the clear: E flag cleared, padding dropped, ISAKMP, UDP and IPv4 lengths and
checksums fixed.  Every other frame, block and header is copied byte for byte.

Pure: bytes and text in, bytes and a report out; the CLI (``gdoid/cli/decrypt_pcap.py``)
reads and writes the files.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from gdoid.protocol import crypto
from gdoid.protocol.constants import GDOI_PORT, ExchangeType, HeaderFlag
from gdoid.protocol.errors import DecodeError
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.message import decode_payloads

KEK_CIPHER = "AES-CBC"  # the one KEK algorithm gdoid uses (keylog.KEK_CIPHER)
SPI_LEN = 16
IV_LEN = 16
KEY_LENGTHS = (16, 24, 32)
MAX_PADDING = 15  # zero padding up to the AES block

# Link types (tcpdump.org/linktypes.html) whose frames carry IPv4 where we can find it.
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
_VLAN_ETHERTYPES = (0x8100, 0x88A8)
IPPROTO_UDP = 17


class KekTableError(ValueError):
    """A line of a KEK table is not ``SPI,AES-CBC,KEY,IV``; names the source, line and field."""


class CaptureError(ValueError):
    """The capture file is not a pcap/pcapng file we can walk; names the offset and field."""


@dataclass(frozen=True)
class KekKey:
    spi: bytes
    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)


def _hex_field(text: str, name: str, lengths: Sequence[int], where: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise KekTableError(f"{where}: {name} is not hex") from None
    if len(value) not in lengths:
        raise KekTableError(
            f"{where}: {name} has {len(value)} octets, expected {' or '.join(map(str, lengths))}"
        )
    return value


def parse_kek_table(text: str, source: str = "gdoid_kek_table") -> list[KekKey]:
    """Parse ``SPI,AES-CBC,KEY,IV`` lines (hex; ``#`` comments and blank lines skipped)."""
    keys: list[KekKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        fields = line.split(",")
        if len(fields) != 4:
            raise KekTableError(f"{where}: {len(fields)} fields, expected 4 (SPI,cipher,key,IV)")
        spi_hex, cipher, key_hex, iv_hex = (f.strip() for f in fields)
        if cipher != KEK_CIPHER:
            raise KekTableError(f"{where}: cipher {cipher!r} is not {KEK_CIPHER}")
        keys.append(
            KekKey(
                _hex_field(spi_hex, "SPI", (SPI_LEN,), where),
                _hex_field(key_hex, "key", KEY_LENGTHS, where),
                _hex_field(iv_hex, "IV", (IV_LEN,), where),
            )
        )
    return keys


def key_ring(keys: Iterable[KekKey]) -> dict[bytes, list[KekKey]]:
    """SPI -> distinct keys (KS and GM, or COOP KSs, log the same KEK: one copy kept)."""
    ring: dict[bytes, list[KekKey]] = {}
    for k in keys:
        same = ring.setdefault(k.spi, [])
        if k not in same:
            same.append(k)
    return ring


# --- one ISAKMP message ---------------------------------------------------------------------


class NoKey(Exception):
    """A push under a KEK SPI the key log does not have."""


class NotDecrypted(Exception):
    """A push whose body does not decrypt to a payload chain under any key of its SPI."""


def is_encrypted_push(message: bytes) -> IsakmpHeader | None:
    """The header of ``message`` if it is a well-formed, encrypted GROUPKEY-PUSH, else None."""
    try:
        header = IsakmpHeader.decode(message)
    except DecodeError:
        return None
    if header.exchange_type != ExchangeType.GROUPKEY_PUSH or not header.encrypted:
        return None
    return header


def decrypt_push(message: bytes, ring: Mapping[bytes, Sequence[KekKey]]) -> bytes:
    """The plaintext form of an encrypted push: the same header without E and with the
    plaintext length, then the payload chain without its padding.

    Raises NoKey (no key for its SPI) or NotDecrypted (no key gives a valid chain).
    """
    header = is_encrypted_push(message)
    if header is None:
        raise ValueError("not an encrypted GROUPKEY-PUSH")
    candidates = ring.get(header.cookies)
    if not candidates:
        raise NoKey(header.cookies.hex())
    body = message[HEADER_LEN:]
    if not body or len(body) % 16:
        raise NotDecrypted(f"{len(body)} octets of ciphertext, not a multiple of 16")
    reason = ""
    for k in candidates:
        plain = crypto.kek_decrypt(k.key, k.iv, body)
        try:
            chain = decode_payloads(header.next_payload, plain, MAX_PADDING)
        except DecodeError as exc:
            reason = f"does not decrypt to a payload chain ({exc})"
            continue
        length = sum(len(d.raw) for d in chain)
        if any(plain[length:]):
            reason = "padding is not zero"
            continue
        clear = replace(
            header,
            flags=HeaderFlag(header.flags & ~HeaderFlag.ENCRYPTION),
            length=HEADER_LEN + length,
        )
        return clear.encode() + plain[:length]
    raise NotDecrypted(reason)


# --- frames: link layer, IPv4, UDP ------------------------------------------------------------


def _ipv4_offset(linktype: int, frame: bytes) -> int | None:
    """Where the IPv4 header starts in a frame of ``linktype``, or None (not IPv4, unknown)."""
    if linktype == LINKTYPE_ETHERNET:
        offset = 12
        while len(frame) >= offset + 2:
            ethertype = int.from_bytes(frame[offset : offset + 2], "big")
            if ethertype in _VLAN_ETHERTYPES:
                offset += 4
                continue
            return offset + 2 if ethertype == ETHERTYPE_IPV4 else None
        return None
    if linktype == LINKTYPE_LINUX_SLL:
        return 16 if frame[14:16] == ETHERTYPE_IPV4.to_bytes(2, "big") else None
    if linktype == LINKTYPE_LINUX_SLL2:
        return 20 if frame[0:2] == ETHERTYPE_IPV4.to_bytes(2, "big") else None
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4):
        return 0
    if linktype == LINKTYPE_NULL:  # AF_INET (2) in the capturing host's byte order
        return 4 if frame[:4] in (b"\x02\x00\x00\x00", b"\x00\x00\x00\x02") else None
    return None


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class FrameResult:
    """What happened to one frame: ``copied`` (not a push), ``decrypted``, ``no-key``,
    ``failed`` (a push that did not decrypt) or ``fragment`` (an IPv4 fragment of UDP)."""

    outcome: str
    data: bytes
    spi: str = ""
    reason: str = ""


def rewrite_frame(
    linktype: int,
    frame: bytes,
    ring: Mapping[bytes, Sequence[KekKey]],
    ports: Iterable[int] = (GDOI_PORT,),
) -> FrameResult:
    """The frame with its push decrypted, or the same bytes (outcome says why)."""
    copied = FrameResult("copied", frame)
    ip = _ipv4_offset(linktype, frame)
    if ip is None or len(frame) < ip + 20 or frame[ip] >> 4 != 4:
        return copied
    ihl = (frame[ip] & 0x0F) * 4
    total = int.from_bytes(frame[ip + 2 : ip + 4], "big")
    if ihl < 20 or total < ihl + 8 or len(frame) < ip + total or frame[ip + 9] != IPPROTO_UDP:
        return copied  # also a frame cut short by the snap length: nothing to decrypt
    if int.from_bytes(frame[ip + 6 : ip + 8], "big") & 0x3FFF:  # MF or a fragment offset
        return FrameResult("fragment", frame)
    udp = ip + ihl
    sport, dport, udp_len, udp_sum = struct.unpack_from("!HHHH", frame, udp)
    if udp_len < 8 or udp_len > total - ihl:
        return copied
    wanted = set(ports)
    if sport not in wanted and dport not in wanted:
        return copied
    message = frame[udp + 8 : udp + udp_len]
    header = is_encrypted_push(message)
    if header is None:
        return copied
    try:
        clear = decrypt_push(message, ring)
    except NoKey as exc:
        return FrameResult("no-key", frame, spi=str(exc))
    except NotDecrypted as exc:
        return FrameResult("failed", frame, spi=header.cookies.hex(), reason=str(exc))
    new_udp_len = 8 + len(clear)
    ip_header = bytearray(frame[ip : ip + ihl])
    ip_header[2:4] = (ihl + new_udp_len).to_bytes(2, "big")
    ip_header[10:12] = b"\x00\x00"
    ip_header[10:12] = internet_checksum(bytes(ip_header)).to_bytes(2, "big")
    udp_header = bytearray(struct.pack("!HHHH", sport, dport, new_udp_len, 0))
    if udp_sum:  # 0 means "no checksum" in IPv4: keep it that way
        pseudo = bytes(ip_header[12:20]) + struct.pack("!BBH", 0, IPPROTO_UDP, new_udp_len)
        checksum = internet_checksum(pseudo + bytes(udp_header) + clear) or 0xFFFF
        udp_header[6:8] = checksum.to_bytes(2, "big")
    trailer = frame[ip + total :]  # Ethernet padding, if any
    data = frame[:ip] + bytes(ip_header) + bytes(udp_header) + clear + trailer
    return FrameResult("decrypted", data, spi=header.cookies.hex())


# --- capture files ----------------------------------------------------------------------------


@dataclass
class Report:
    """Per-frame outcomes; frame numbers count from 1 as Wireshark shows them."""

    frames: int = 0
    decrypted: list[int] = field(default_factory=list)
    missing: dict[str, list[int]] = field(default_factory=dict)  # KEK SPI (hex) -> frames
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # frame, SPI, reason
    fragments: list[int] = field(default_factory=list)
    cut_at: int | None = None  # offset where a capture still being written ends mid-record

    def add(self, number: int, result: FrameResult) -> None:
        if result.outcome == "decrypted":
            self.decrypted.append(number)
        elif result.outcome == "no-key":
            self.missing.setdefault(result.spi, []).append(number)
        elif result.outcome == "failed":
            self.failed.append((number, result.spi, result.reason))
        elif result.outcome == "fragment":
            self.fragments.append(number)

    def warnings(self) -> list[str]:
        out = [
            f"no key for KEK SPI 0x{spi} in the key log: GROUPKEY-PUSH left encrypted in "
            f"frame{'s' if len(frames) > 1 else ''} {_frame_list(frames)}"
            for spi, frames in self.missing.items()
        ]
        out += [
            f"frame {n}: GROUPKEY-PUSH under KEK SPI 0x{spi} left encrypted: {why}"
            for n, spi, why in self.failed
        ]
        if self.fragments:
            out.append(
                f"IPv4 fragments of UDP left as they are (no reassembly): frames {_frame_list(self.fragments)}"
            )
        if self.cut_at is not None:
            out.append(
                f"the capture ends inside a record at offset {self.cut_at} (still being written?): "
                "its last octets copied as they are"
            )
        return out


def _frame_list(frames: Sequence[int], most: int = 10) -> str:
    shown = ", ".join(map(str, frames[:most]))
    return shown + (f" and {len(frames) - most} more" if len(frames) > most else "")


_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": "<",
    b"\xa1\xb2\xc3\xd4": ">",
    b"\x4d\x3c\xb2\xa1": "<",  # nanosecond timestamps
    b"\xa1\xb2\x3c\x4d": ">",
}
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_IDB = 1
_PCAPNG_EPB = 6
_PCAPNG_BOM = 0x1A2B3C4D


def rewrite_capture(
    data: bytes, ring: Mapping[bytes, Sequence[KekKey]], ports: Iterable[int] = (GDOI_PORT,)
) -> tuple[bytes, Report]:
    """Rewrite a pcap or pcapng file (the format is kept)."""
    ports = tuple(ports)
    if data[:4] in _PCAP_MAGICS:
        return _rewrite_pcap(data, ring, ports)
    if len(data) >= 4 and int.from_bytes(data[:4], "little") == _PCAPNG_SHB:
        return _rewrite_pcapng(data, ring, ports)
    raise CaptureError("not a pcap or pcapng file (unknown magic number)")


def _rewrite_pcap(
    data: bytes, ring: Mapping[bytes, Sequence[KekKey]], ports: tuple[int, ...]
) -> tuple[bytes, Report]:
    order = _PCAP_MAGICS[data[:4]]
    if len(data) < 24:
        raise CaptureError(f"pcap header: {len(data)} octets, expected 24")
    linktype = struct.unpack_from(order + "I", data, 20)[0] & 0x03FFFFFF  # upper bits: FCS info
    record = struct.Struct(order + "IIII")
    out = [data[:24]]
    report = Report()
    pos = 24
    while pos < len(data):
        start = pos + record.size
        if len(data) < start or record.unpack_from(data, pos)[2] > len(data) - start:
            # tshark writes record by record: a capture read while it runs may end mid-record.
            report.cut_at = pos
            out.append(data[pos:])
            break
        ts_sec, ts_frac, caplen, origlen = record.unpack_from(data, pos)
        frame = data[start : start + caplen]
        report.frames += 1
        result = rewrite_frame(linktype, frame, ring, ports)
        report.add(report.frames, result)
        if result.outcome == "decrypted":
            grown = len(result.data) - caplen
            out.append(
                record.pack(ts_sec, ts_frac, len(result.data), max(0, origlen + grown))
                + result.data
            )
        else:
            out.append(data[pos : start + caplen])
        pos = start + caplen
    return b"".join(out), report


def _rewrite_pcapng(
    data: bytes, ring: Mapping[bytes, Sequence[KekKey]], ports: tuple[int, ...]
) -> tuple[bytes, Report]:
    out: list[bytes] = []
    report = Report()
    order = "<"
    linktypes: list[int] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 12:
            report.cut_at = pos
            out.append(data[pos:])
            break
        block_type = struct.unpack_from(order + "I", data, pos)[0]
        if int.from_bytes(data[pos : pos + 4], "little") == _PCAPNG_SHB:
            # A new section: its byte-order magic says how to read everything up to the next one.
            bom = data[pos + 8 : pos + 12]
            if bom == _PCAPNG_BOM.to_bytes(4, "little"):
                order = "<"
            elif bom == _PCAPNG_BOM.to_bytes(4, "big"):
                order = ">"
            else:
                raise CaptureError(
                    f"pcapng section header at offset {pos}: byte-order magic {bom.hex()}"
                )
            block_type = _PCAPNG_SHB
            linktypes = []
        length = struct.unpack_from(order + "I", data, pos + 4)[0]
        if length < 12 or length % 4:
            raise CaptureError(f"pcapng block at offset {pos}: total length {length}")
        if length > len(data) - pos:  # a capture still being written
            report.cut_at = pos
            out.append(data[pos:])
            break
        if struct.unpack_from(order + "I", data, pos + length - 4)[0] != length:
            raise CaptureError(f"pcapng block at offset {pos}: trailing total length differs")
        block = data[pos : pos + length]
        if block_type == _PCAPNG_IDB:
            if length < 20:
                raise CaptureError(f"pcapng interface block at offset {pos}: total length {length}")
            linktypes.append(struct.unpack_from(order + "H", block, 8)[0])
        elif block_type == _PCAPNG_EPB:
            block = _rewrite_epb(block, order, linktypes, pos, ring, ports, report)
        out.append(block)
        pos += length
    return b"".join(out), report


def _rewrite_epb(
    block: bytes,
    order: str,
    linktypes: list[int],
    pos: int,
    ring: Mapping[bytes, Sequence[KekKey]],
    ports: tuple[int, ...],
    report: Report,
) -> bytes:
    if len(block) < 32:
        raise CaptureError(f"pcapng packet block at offset {pos}: total length {len(block)}")
    interface, ts_high, ts_low, caplen, origlen = struct.unpack_from(order + "IIIII", block, 8)
    padded = caplen + (-caplen % 4)
    if 28 + padded + 4 > len(block):
        raise CaptureError(
            f"pcapng packet block at offset {pos}: captured length {caplen} beyond the block"
        )
    if interface >= len(linktypes):
        raise CaptureError(
            f"pcapng packet block at offset {pos}: interface {interface} not described"
        )
    report.frames += 1
    result = rewrite_frame(linktypes[interface], block[28 : 28 + caplen], ring, ports)
    report.add(report.frames, result)
    if result.outcome != "decrypted":
        return block
    options = block[28 + padded : len(block) - 4]
    frame = result.data + b"\x00" * (-len(result.data) % 4)
    total = 28 + len(frame) + len(options) + 4
    grown = len(result.data) - caplen
    head = struct.pack(
        order + "IIIIIII",
        _PCAPNG_EPB,
        total,
        interface,
        ts_high,
        ts_low,
        len(result.data),
        max(0, origlen + grown),
    )
    return head + frame + options + struct.pack(order + "I", total)
