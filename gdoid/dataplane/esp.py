"""ESP (RFC 4303) for GDOI group SAs, GET VPN style (wire.md §7).

Tunnel mode with address preservation: the outer IPv4 header copies the inner
source/destination, TTL, DSCP and ECN (RFC 6040 normal mode) and DF.  Two
transforms: AES-GCM with a 16-octet ICV (RFC 4106) whose 8-octet explicit IV is
``sender ID | counter`` (RFC 6054), and AES-CBC with HMAC-SHA-256-128
(RFC 3602, RFC 4868) with a random IV.  With time-based anti-replay the
plaintext starts with the 12-octet TBAR metadata and ESP next header is 253
(wire.md §6.4).

Sans-I/O and single-threaded: an :class:`EspSa` keeps the per-SA sender state
(sequence number, IV counter, IP ID) and long-lived cipher contexts.

Hot-path notes.  The per-packet work is a handful of C calls: one
``struct.unpack_from`` of the inner header, one concatenation for the trailer,
one ``struct.pack`` of outer IPv4 header + ESP header (+ IV), the AEAD call
and one concatenation.  The IPv4 header checksum is computed arithmetically
from the integer fields.  AES-CBC uses one long-lived encryptor and decryptor
per SA instead of a cipher object per packet: the sender feeds a fresh random
block R in front of the plaintext, so the first output block
``E(C_prev xor R)`` (uniformly random, as R is) is the packet's IV and the rest
is the CBC encryption under that IV; the receiver feeds ``IV | ciphertext`` and
discards the first output block.

Over 600 lines because the two transforms' encapsulate/decapsulate paths are
written out per transform (no per-packet dispatch or shared helpers on the hot
path: see benchmarks/esp.py); splitting them would separate each from the
header handling it must mirror.
"""

from __future__ import annotations

import os
import struct
from enum import StrEnum
from hmac import compare_digest

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _chmac
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gdoid.protocol.policy import SenderIds, Tek

__all__ = [
    "DropReason",
    "EspError",
    "EspSa",
    "GcmEspSa",
    "CbcEspSa",
    "NullEspSa",
    "IPPROTO_ESP",
    "NH_IPV4",
    "NH_IPV6",
    "IPV6_EXT_HEADERS",
    "parse_outer6",
    "parse_inner6",
    "NH_TBAR",
    "TBAR_LEN",
    "ICV_LEN",
    "ipv4_checksum",
]


class DropReason(StrEnum):
    NO_SA = "no-sa"
    ICV = "icv"
    REPLAY = "replay"
    TBAR = "tbar"
    MALFORMED = "malformed"
    FAIL_CLOSE = "fail-close"
    TOO_BIG = "too-big"
    COUNTER_EXHAUSTED = "counter-exhausted"
    NOT_IPV4 = "not-ipv4"  # neither IPv4 nor IPv6 (the name predates IPv6 support)
    IPV6_EXT_HEADER = "ipv6-ext-header"  # an IPv6 extension header before ESP
    EXPIRED = "expired"
    INTERNAL_ERROR = "internal-error"  # a bug in the data path, not a bad packet


class EspError(Exception):
    """A packet could not be protected or unprotected; ``reason`` says why."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason


IPPROTO_ESP = 50
NH_IPV4 = 4
NH_IPV6 = 41
# Next-header values that are IPv6 extension headers (RFC 8200 §4, RFC 7045): hop-by-hop,
# routing, fragment, AH, destination options, mobility, HIP, shim6, experimental.
IPV6_EXT_HEADERS = frozenset((0, 43, 44, 51, 60, 135, 139, 140, 253, 254))
NH_TBAR = 253
TBAR_LEN = 12
ICV_LEN = 16
_SEQ_MAX = 0xFFFFFFFF

_IPH = struct.Struct("!BBHHHBBHII")  # IPv4 header without options, 20 octets
_OUT_GCM = struct.Struct("!BBHHHBBHIIIIQ")  # IPv4 header | SPI | seq | explicit IV: 36
_OUT_HDR = struct.Struct("!BBHHHBBHIIII")  # IPv4 header | SPI | seq: 28
_SPISEQ = struct.Struct("!II")
_ESP_HDR = struct.Struct("!IIQ")  # SPI | seq | GCM explicit IV
_NONCE = struct.Struct("!4sQ")  # salt | explicit IV
_TBAR = struct.Struct("!BBHQ")
_urandom = os.urandom

# RFC 4303 §2.4 padding: 1, 2, 3, ...; then pad length and next header.
_PADS = [bytes(range(1, n + 1)) for n in range(256)]
_TRAILER_IPV4 = [_PADS[n] + bytes((n, NH_IPV4)) for n in range(16)]
_TRAILER_TBAR = [_PADS[n] + bytes((n, NH_TBAR)) for n in range(16)]
_TRAILER_IPV6 = [_PADS[n] + bytes((n, NH_IPV6)) for n in range(16)]
_IP6H = struct.Struct(
    "!4sHBB16s16s"
)  # vtcfl | payload length | next header | hop limit | src | dst
_IP6_OUT = struct.Struct("!4sHBB")  # outer IPv6 header up to the addresses

# Outer overhead beyond the (padded) plaintext: IPv4 20 + ESP 8 + IV + ICV 16.
_GCM_FIXED = 20 + 8 + 8 + ICV_LEN
_CBC_FIXED = 20 + 8 + 16 + ICV_LEN
_NULL_FIXED = 20 + 8


def ipv4_checksum(header: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum of ``header`` (checksum field included as is)."""
    b = bytes(header)
    if len(b) & 1:
        b += b"\x00"
    s: int = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s ^ 0xFFFF


def _outer_header_sum(
    tos: int, total: int, ipid: int, df: int, ttl: int, src: int, dst: int
) -> int:
    s = 0x4500 + tos + total + ipid + df + (ttl << 8) + IPPROTO_ESP
    s += (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return s ^ 0xFFFF


def parse_outer(packet: bytes) -> tuple[int, int, int, int, int]:
    """Check an outer IPv4/ESP packet; returns (header length, total length, tos, src, dst)."""
    n = len(packet)
    if n < 20:
        raise EspError(DropReason.MALFORMED, "short IPv4 header")
    vihl, tos, total, _id, frag, _ttl, proto, _c, src, dst = _IPH.unpack_from(packet)
    if vihl >> 4 != 4:
        raise EspError(DropReason.NOT_IPV4)
    hl = (vihl & 15) << 2
    if hl < 20 or total > n or total < hl + 8:
        raise EspError(DropReason.MALFORMED, "IPv4 lengths")
    if proto != IPPROTO_ESP:
        raise EspError(DropReason.MALFORMED, "not ESP")
    if frag & 0x3FFF:
        raise EspError(DropReason.MALFORMED, "outer fragment")
    return hl, total, tos, src, dst


def parse_inner(inner: bytes) -> tuple[int, int, int, int, int, int]:
    """Check a plaintext IPv4 packet; returns (length, tos, frag field, ttl, src, dst)."""
    n = len(inner)
    if n < 20:
        raise EspError(DropReason.NOT_IPV4 if n and inner[0] >> 4 != 4 else DropReason.MALFORMED)
    vihl, tos, total, _id, frag, ttl, _p, _c, src, dst = _IPH.unpack_from(inner)
    if vihl >> 4 != 4:
        raise EspError(DropReason.NOT_IPV4)
    if (vihl & 15) < 5 or total != n:
        raise EspError(DropReason.MALFORMED, "IPv4 lengths")
    return n, tos, frag, ttl, src, dst


def parse_outer6(packet: bytes) -> int:
    """Check an outer IPv6/ESP packet (40-octet header, then ESP); returns its end."""
    n = len(packet)
    if n < 40:
        raise EspError(DropReason.MALFORMED, "short IPv6 header")
    if packet[0] >> 4 != 6:
        raise EspError(DropReason.NOT_IPV4)
    plen = (packet[4] << 8) | packet[5]
    nh = packet[6]
    if nh != IPPROTO_ESP:
        if nh in IPV6_EXT_HEADERS:
            raise EspError(DropReason.IPV6_EXT_HEADER, f"next header {nh}")
        raise EspError(DropReason.MALFORMED, "not ESP")
    if 40 + plen > n or plen < 8:
        raise EspError(DropReason.MALFORMED, "IPv6 payload length")
    return 40 + plen


def parse_inner6(inner: bytes) -> int:
    """Check a plaintext IPv6 packet; returns its length (no jumbograms)."""
    n = len(inner)
    if n < 40:
        raise EspError(DropReason.MALFORMED, "short IPv6 header")
    if inner[0] >> 4 != 6:
        raise EspError(DropReason.NOT_IPV4)
    if 40 + ((inner[4] << 8) | inner[5]) != n:
        raise EspError(DropReason.MALFORMED, "IPv6 payload length")
    return n


def outer6_header(inner: bytes, esp_len: int) -> bytes:
    """The outer IPv6 header for ``inner`` (wire.md, ESP over IPv6): version, traffic
    class (DSCP and ECN, RFC 6040 normal mode), flow label, hop limit and both
    addresses copied from the inner header; next header ESP."""
    if esp_len > 0xFFFF:
        raise EspError(DropReason.TOO_BIG)
    return _IP6_OUT.pack(inner[:4], esp_len, IPPROTO_ESP, inner[7]) + inner[8:40]


class EspSa:
    """One TEK, both directions.

    ``EspSa(tek, sender_ids)`` returns the transform's subclass
    (:class:`GcmEspSa` or :class:`CbcEspSa`).

    ``sender_ids`` (RFC 6054) are needed to send with AES-GCM: the explicit IV
    is the sender ID in the top ``bits`` bits and a counter below.  The SIDs
    are used one after the other; when all are used up (or none were given)
    :meth:`encapsulate` raises ``EspError(COUNTER_EXHAUSTED)``.  Watch
    :attr:`counter_remaining` to re-register before that happens.

    ``seal`` / ``open`` are the engine's entry points (the caller has parsed
    the IPv4 header already); ``encapsulate`` / ``decapsulate`` parse it
    themselves.  Both update the packet/byte counters.
    """

    __slots__ = (
        "tek", "spi", "is_gcm", "tbar", "replay_protected", "transform_name",
        "_seq", "_ipid",
        "sender_ids", "sender_id", "_sid_queue", "_sid_shift", "_iv_base", "_ctr", "_ctr_end", "_used",
        "pkts_encaps", "pkts_decaps", "bytes_encaps", "bytes_decaps", "drops",
    )  # fmt: skip

    def __new__(cls, tek: Tek, sender_ids: SenderIds | None = None) -> EspSa:
        if cls is EspSa:
            cls = GcmEspSa if tek.policy.transform.is_gcm else CbcEspSa
        return object.__new__(cls)

    def __init__(self, tek: Tek, sender_ids: SenderIds | None = None) -> None:
        self.spi = tek.spi
        self.tek = tek
        t = tek.policy.transform
        self.is_gcm = t.is_gcm
        self.transform_name = t.name
        self._seq = 0
        self._ipid = int.from_bytes(os.urandom(2), "big")
        self.pkts_encaps = self.pkts_decaps = self.bytes_encaps = self.bytes_decaps = 0
        self.drops: dict[str, int] = {}
        self.sender_ids: SenderIds | None = None
        self.sender_id: int | None = None
        self._sid_queue: list[int] = []
        self._sid_shift = 0
        self._iv_base = self._ctr = self._ctr_end = 0
        self._used: list[tuple[int, int]] = []  # IV ranges [lo, hi) used before the current one
        self.set_tek(tek)
        if len(tek.cipher_key) != t.cipher_key_len or len(tek.integrity_key) != t.integrity_key_len:
            raise ValueError(f"TEK 0x{tek.spi:08x}: key lengths do not fit {t.name}")
        self._init_crypto(tek)
        if sender_ids is not None:
            self.set_sender_ids(sender_ids)

    def _init_crypto(self, tek: Tek) -> None:
        raise NotImplementedError

    def set_tek(self, tek: Tek) -> None:
        """Take a new version of the same TEK (same SPI and keys): expiry or policy flags."""
        self.tek = tek
        self.tbar = tek.policy.tbar_window_ms is not None
        self.replay_protected = bool(tek.policy.replay_window)

    def same_keys(self, tek: Tek) -> bool:
        old = self.tek
        return (
            tek.spi == old.spi
            and tek.policy.transform == old.policy.transform
            and tek.cipher_key == old.cipher_key
            and tek.integrity_key == old.integrity_key
        )

    # --- sender IDs and IV space --------------------------------------------

    def set_sender_ids(self, sender_ids: SenderIds | None) -> None:
        """Use these SIDs from now on (e.g. after a re-registration).

        IVs already used under this key are remembered, so a SID seen before
        (or an overlapping one of another width) never repeats an IV.
        Meaningful for AES-GCM only; harmless otherwise.
        """
        if sender_ids == self.sender_ids:
            return
        if sender_ids is not None and not 0 <= sender_ids.bits <= 63:
            raise ValueError("sender ID bits must be 0..63")
        if self.sender_id is not None and self._ctr:
            self._used.append((self._iv_base, self._iv_base + self._ctr))
        self.sender_ids = sender_ids
        self.sender_id = None
        self._sid_queue = list(sender_ids.values) if sender_ids is not None else []
        self._sid_shift = 64 - sender_ids.bits if sender_ids is not None else 0
        self._iv_base = self._ctr = self._ctr_end = 0

    @staticmethod
    def _first_free(base: int, space: int, used: list[tuple[int, int]]) -> int:
        """First counter value in [base, base+space) above every used range touching it."""
        start = 0
        for lo, hi in used:
            if lo < base + space and hi > base:
                start = max(start, min(hi, base + space) - base)
        return start

    def _current_used(self) -> list[tuple[int, int]]:
        if self.sender_id is not None and self._ctr:
            return [*self._used, (self._iv_base, self._iv_base + self._ctr)]
        return self._used

    def _next_range(self) -> int:
        """Move to the next SID with free IVs; returns the counter to use."""
        used = self._current_used()
        space = 1 << self._sid_shift
        while self._sid_queue:
            sid = self._sid_queue.pop(0)
            base = sid << self._sid_shift
            start = self._first_free(base, space, used)
            if start < space:
                if self.sender_id is not None and self._ctr:
                    self._used.append((self._iv_base, self._iv_base + self._ctr))
                self.sender_id = sid
                self._iv_base = base
                self._ctr_end = space
                self._ctr = start
                return start
        raise EspError(
            DropReason.COUNTER_EXHAUSTED,
            "no sender ID with free IVs" if self.sender_ids else "no sender ID",
        )

    def used_ivs(self) -> list[tuple[int, int]]:
        """The explicit-IV ranges [lo, hi) used under this key so far."""
        return list(self._current_used())

    def mark_ivs_used(self, ranges: list[tuple[int, int]]) -> None:
        """Never use these IVs (an earlier EspSa used them under this key); before any seal."""
        self._used.extend(ranges)

    @property
    def iv_remaining(self) -> int | None:
        """GCM: explicit IVs left across the current and queued SIDs (None for CBC)."""
        if not self.is_gcm:
            return None
        left = self._ctr_end - self._ctr
        used = self._current_used()
        space = 1 << self._sid_shift
        for sid in self._sid_queue:
            left += space - self._first_free(sid << self._sid_shift, space, used)
        return left

    @property
    def counter_remaining(self) -> int | None:
        """Packets this SA can still send before a counter would wrap, or None if unbounded.

        GCM: the sender-ID IV counter.  With a replay window in the policy, the
        ESP sequence number too (it must not cycle, RFC 4303 §3.3.3).
        """
        left = self.iv_remaining
        if self.replay_protected:
            seq_left = _SEQ_MAX - self._seq
            left = seq_left if left is None else min(left, seq_left)
        return left

    def _next_seq(self) -> int:
        """Slow path of the sequence number: at the 32-bit limit."""
        seq = self._seq + 1
        if seq > _SEQ_MAX:
            if self.replay_protected:
                raise EspError(DropReason.COUNTER_EXHAUSTED, "ESP sequence number would cycle")
            seq = 1
        self._seq = seq
        return seq

    # --- public API ---------------------------------------------------------

    def outer_len(self, inner_len: int, tbar: bool = False) -> int:
        """Size of the outer packet for an inner packet of ``inner_len`` octets."""
        raise NotImplementedError

    def max_inner(self, mtu: int, tbar: bool = False) -> int:
        """Largest inner packet whose outer packet fits in ``mtu``."""
        raise NotImplementedError

    def encapsulate(self, inner: bytes, pseudotime_ms: int | None = None) -> bytes:
        """Protect one plaintext IPv4 packet; returns the outer IPv4 packet.

        ``pseudotime_ms`` not None adds the TBAR metadata (next header 253).
        """
        n = len(inner)
        if n and inner[0] >> 4 == 6:
            parse_inner6(inner)
            return self.seal6(inner, n, pseudotime_ms)
        if n < 20:
            parse_inner(inner)  # raises with the right reason
        vihl, tos, total, _i, frag, ttl, _p, _c, src, dst = _IPH.unpack_from(inner)
        if total != n or not 0x45 <= vihl <= 0x4F:
            parse_inner(inner)
            raise EspError(DropReason.MALFORMED)
        return self.seal(inner, n, tos, frag & 0x4000, ttl, src, dst, pseudotime_ms)

    def decapsulate(self, outer: bytes) -> tuple[bytes, int | None]:
        """Unprotect one outer IPv4 or IPv6 packet; returns (inner packet, pseudotime or None)."""
        n = len(outer)
        if n and outer[0] >> 4 == 6:
            return self.open(outer, 40, parse_outer6(outer))[:2]
        if n >= 20:
            vihl, _tos, total, _i, frag, _ttl, proto, _c, _s, _d = _IPH.unpack_from(outer)
            if vihl == 0x45 and 28 <= total <= n and proto == IPPROTO_ESP and not frag & 0x3FFF:
                return self.open(outer, 20, total)[:2]
        hl, total, _tos, _src, _dst = parse_outer(outer)
        return self.open(outer, hl, total)[:2]

    def seal(
        self,
        inner: bytes,
        n: int,
        tos: int,
        df: int,
        ttl: int,
        src: int,
        dst: int,
        pseudotime_ms: int | None,
    ) -> bytes:
        """Encapsulate an already parsed inner packet (``df`` = 0x4000 or 0)."""
        raise NotImplementedError

    def seal6(self, inner: bytes, n: int, pseudotime_ms: int | None) -> bytes:
        """Encapsulate an already checked inner IPv6 packet of ``n`` octets in outer IPv6."""
        esp = self.esp6(inner, n, pseudotime_ms)
        self.pkts_encaps += 1
        self.bytes_encaps += n
        return outer6_header(inner, len(esp)) + esp

    def esp6(self, inner: bytes, n: int, pseudotime_ms: int | None) -> bytes:
        """SPI | seq | [IV] | ciphertext | ICV for an inner IPv6 packet (next header 41)."""
        raise NotImplementedError

    def open(self, pkt: bytes, off: int, end: int) -> tuple[bytes, int | None, int]:
        """Verify and decrypt the ESP packet at pkt[off:end]; returns (inner, pseudotime, seq).

        The inner packet's family is the ESP next header's (4 or 41): callers check
        the inner version nibble against the outer family."""
        raise NotImplementedError

    def _unpad(self, pt: bytes, seq: int) -> tuple[bytes, int | None, int]:
        m = len(pt)
        if m < 2:
            raise EspError(DropReason.MALFORMED, "no ESP trailer")
        padlen = pt[-2]
        nh = pt[-1]
        stop = m - 2 - padlen
        if stop < 0:
            raise EspError(DropReason.MALFORMED, "pad length")
        if padlen and pt[stop : m - 2] != _PADS[padlen]:
            raise EspError(DropReason.MALFORMED, "padding bytes")
        if nh in (NH_IPV4, NH_IPV6):
            if nh == NH_IPV6 and (stop < 40 or pt[0] >> 4 != 6):
                raise EspError(DropReason.MALFORMED, "next header 41 on a non-IPv6 packet")
            self.pkts_decaps += 1
            self.bytes_decaps += stop
            return pt[:stop], None, seq
        if nh == NH_TBAR:
            if stop < TBAR_LEN:
                raise EspError(DropReason.MALFORMED, "short TBAR metadata")
            orig_nh, length, _res, pseudotime = _TBAR.unpack_from(pt)
            if orig_nh not in (NH_IPV4, NH_IPV6) or length != TBAR_LEN:
                raise EspError(DropReason.MALFORMED, "TBAR metadata")
            if orig_nh == NH_IPV6 and (stop < TBAR_LEN + 40 or pt[TBAR_LEN] >> 4 != 6):
                raise EspError(DropReason.MALFORMED, "next header 41 on a non-IPv6 packet")
            self.pkts_decaps += 1
            self.bytes_decaps += stop - TBAR_LEN
            return pt[TBAR_LEN:stop], pseudotime, seq
        raise EspError(DropReason.MALFORMED, f"next header {nh}")


class GcmEspSa(EspSa):
    """AES-GCM-16 (RFC 4106): nonce = salt | explicit IV, AAD = SPI | seq."""

    __slots__ = ("_aead", "_salt")
    _aead: AESGCM
    _salt: bytes

    def _init_crypto(self, tek: Tek) -> None:
        self._aead = AESGCM(tek.cipher_key[:-4])
        self._salt = tek.cipher_key[-4:]

    def outer_len(self, inner_len: int, tbar: bool = False) -> int:
        return _GCM_FIXED + ((inner_len + 2 + (TBAR_LEN if tbar else 0) + 3) & ~3)

    def max_inner(self, mtu: int, tbar: bool = False) -> int:
        return ((mtu - _GCM_FIXED) & ~3) - 2 - (TBAR_LEN if tbar else 0)

    def seal(
        self,
        inner: bytes,
        n: int,
        tos: int,
        df: int,
        ttl: int,
        src: int,
        dst: int,
        pseudotime_ms: int | None,
    ) -> bytes:
        if pseudotime_ms is None:
            pt = inner + _TRAILER_IPV4[-(n + 2) & 3]
        else:
            pt = (
                _TBAR.pack(NH_IPV4, TBAR_LEN, 0, pseudotime_ms)
                + inner
                + _TRAILER_TBAR[-(n + 14) & 3]
            )
        total = _GCM_FIXED + len(pt)
        if total > 0xFFFF:
            raise EspError(DropReason.TOO_BIG)
        c = self._ctr
        if c >= self._ctr_end:
            c = self._next_range()
        seq = self._seq + 1
        if seq > _SEQ_MAX:
            seq = self._next_seq()
        self._ctr = c + 1
        self._seq = seq
        iv = self._iv_base | c
        ipid = self._ipid = (self._ipid + 1) & 0xFFFF
        s = 0x4500 + tos + total + ipid + df + (ttl << 8) + IPPROTO_ESP
        s += (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        hdr = _OUT_GCM.pack(
            0x45, tos, total, ipid, df, ttl, IPPROTO_ESP, s ^ 0xFFFF, src, dst, self.spi, seq, iv
        )
        self.pkts_encaps += 1
        self.bytes_encaps += n
        return hdr + self._aead.encrypt(_NONCE.pack(self._salt, iv), pt, hdr[20:28])

    def esp6(self, inner: bytes, n: int, pseudotime_ms: int | None) -> bytes:
        if pseudotime_ms is None:
            pt = inner + _TRAILER_IPV6[-(n + 2) & 3]
        else:
            pt = (
                _TBAR.pack(NH_IPV6, TBAR_LEN, 0, pseudotime_ms)
                + inner
                + _TRAILER_TBAR[-(n + 14) & 3]
            )
        if 16 + len(pt) + ICV_LEN > 0xFFFF:
            raise EspError(DropReason.TOO_BIG)
        c = self._ctr
        if c >= self._ctr_end:
            c = self._next_range()
        seq = self._seq + 1
        if seq > _SEQ_MAX:
            seq = self._next_seq()
        self._ctr = c + 1
        self._seq = seq
        iv = self._iv_base | c
        hdr = _ESP_HDR.pack(self.spi, seq, iv)
        return hdr + self._aead.encrypt(_NONCE.pack(self._salt, iv), pt, hdr[:8])

    def decapsulate(self, outer: bytes) -> tuple[bytes, int | None]:
        # parse_outer + open, inlined: this is the hot path
        n = len(outer)
        if n < 20:
            parse_outer(outer)
        vihl, _tos, total, _i, frag, _ttl, proto, _c, _s, _d = _IPH.unpack_from(outer)
        if vihl != 0x45 or total > n or proto != IPPROTO_ESP or frag & 0x3FFF:
            return EspSa.decapsulate(self, outer)
        if total < 20 + 8 + 8 + 2 + ICV_LEN:
            raise EspError(DropReason.MALFORMED, "short ESP packet")
        spi, seq, iv = _ESP_HDR.unpack_from(outer, 20)
        if spi != self.spi:
            raise EspError(DropReason.NO_SA)
        try:
            pt = self._aead.decrypt(_NONCE.pack(self._salt, iv), outer[36:total], outer[20:28])
        except InvalidTag:
            raise EspError(DropReason.ICV) from None
        padlen = pt[-2]
        m = len(pt)
        stop = m - 2 - padlen
        if pt[-1] == NH_IPV4 and stop >= 0 and pt[stop : m - 2] == _PADS[padlen]:
            self.pkts_decaps += 1
            self.bytes_decaps += stop
            return pt[:stop], None
        return self._unpad(pt, seq)[:2]

    def open(self, pkt: bytes, off: int, end: int) -> tuple[bytes, int | None, int]:
        if end - off < 8 + 8 + 2 + ICV_LEN:
            raise EspError(DropReason.MALFORMED, "short ESP packet")
        spi, seq, iv = _ESP_HDR.unpack_from(pkt, off)
        if spi != self.spi:
            raise EspError(DropReason.NO_SA)
        try:
            pt = self._aead.decrypt(
                _NONCE.pack(self._salt, iv), pkt[off + 16 : end], pkt[off : off + 8]
            )
        except InvalidTag:
            raise EspError(DropReason.ICV) from None
        padlen = pt[-2]
        m = len(pt)
        stop = m - 2 - padlen
        if pt[-1] == NH_IPV4 and stop >= 0 and pt[stop : m - 2] == _PADS[padlen]:
            self.pkts_decaps += 1
            self.bytes_decaps += stop
            return pt[:stop], None, seq
        return self._unpad(pt, seq)


class CbcEspSa(EspSa):
    """AES-CBC (RFC 3602) with HMAC-SHA-256-128 (RFC 4868), random IV per packet."""

    __slots__ = ("_enc", "_dec", "_mac")
    _enc: CipherContext
    _dec: CipherContext
    _mac: _chmac.HMAC

    def _init_crypto(self, tek: Tek) -> None:
        zero = bytes(16)
        self._enc = Cipher(algorithms.AES(tek.cipher_key), modes.CBC(zero)).encryptor()
        self._dec = Cipher(algorithms.AES(tek.cipher_key), modes.CBC(zero)).decryptor()
        self._mac = _chmac.HMAC(tek.integrity_key, hashes.SHA256())

    def outer_len(self, inner_len: int, tbar: bool = False) -> int:
        return _CBC_FIXED + ((inner_len + 2 + (TBAR_LEN if tbar else 0) + 15) & ~15)

    def max_inner(self, mtu: int, tbar: bool = False) -> int:
        return ((mtu - _CBC_FIXED) & ~15) - 2 - (TBAR_LEN if tbar else 0)

    def seal(
        self,
        inner: bytes,
        n: int,
        tos: int,
        df: int,
        ttl: int,
        src: int,
        dst: int,
        pseudotime_ms: int | None,
    ) -> bytes:
        # A fresh random block in front: its encryption becomes the IV (module docstring).
        if pseudotime_ms is None:
            pt = b"".join((_urandom(16), inner, _TRAILER_IPV4[-(n + 2) & 15]))
        else:
            meta = _TBAR.pack(NH_IPV4, TBAR_LEN, 0, pseudotime_ms)
            pt = b"".join((_urandom(16), meta, inner, _TRAILER_TBAR[-(n + 14) & 15]))
        total = _CBC_FIXED - 16 + len(pt)
        if total > 0xFFFF:
            raise EspError(DropReason.TOO_BIG)
        seq = self._seq + 1
        if seq > _SEQ_MAX:
            seq = self._next_seq()
        self._seq = seq
        ipid = self._ipid = (self._ipid + 1) & 0xFFFF
        s = 0x4500 + tos + total + ipid + df + (ttl << 8) + IPPROTO_ESP
        s += (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF)
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        hdr = _OUT_HDR.pack(
            0x45, tos, total, ipid, df, ttl, IPPROTO_ESP, s ^ 0xFFFF, src, dst, self.spi, seq
        )
        ct = self._enc.update(pt)  # IV | ciphertext
        mac = self._mac.copy()
        mac.update(hdr[20:])
        mac.update(ct)
        self.pkts_encaps += 1
        self.bytes_encaps += n
        return b"".join((hdr, ct, mac.finalize()[:16]))

    def esp6(self, inner: bytes, n: int, pseudotime_ms: int | None) -> bytes:
        if pseudotime_ms is None:
            pt = b"".join((_urandom(16), inner, _TRAILER_IPV6[-(n + 2) & 15]))
        else:
            meta = _TBAR.pack(NH_IPV6, TBAR_LEN, 0, pseudotime_ms)
            pt = b"".join((_urandom(16), meta, inner, _TRAILER_TBAR[-(n + 14) & 15]))
        if 8 + len(pt) + ICV_LEN > 0xFFFF:
            raise EspError(DropReason.TOO_BIG)
        seq = self._seq + 1
        if seq > _SEQ_MAX:
            seq = self._next_seq()
        self._seq = seq
        hdr = _SPISEQ.pack(self.spi, seq)
        ct = self._enc.update(pt)  # IV | ciphertext
        mac = self._mac.copy()
        mac.update(hdr)
        mac.update(ct)
        return b"".join((hdr, ct, mac.finalize()[:16]))

    def open(self, pkt: bytes, off: int, end: int) -> tuple[bytes, int | None, int]:
        n = end - off
        if n < 8 + 16 + 16 + ICV_LEN or (n - 8 - ICV_LEN) & 15:
            raise EspError(DropReason.MALFORMED, "ESP length")
        spi, seq = _SPISEQ.unpack_from(pkt, off)
        if spi != self.spi:
            raise EspError(DropReason.NO_SA)
        mv = memoryview(pkt)
        mac = self._mac.copy()
        mac.update(mv[off : end - 16])
        if not compare_digest(mac.finalize()[:16], mv[end - 16 : end]):
            raise EspError(DropReason.ICV)
        pt = self._dec.update(mv[off + 8 : end - 16])
        padlen = pt[-2]
        m = len(pt)
        stop = m - 2 - padlen
        if pt[-1] == NH_IPV4 and stop >= 16 and pt[stop : m - 2] == _PADS[padlen]:
            self.pkts_decaps += 1
            self.bytes_decaps += stop - 16
            return pt[16:stop], None, seq
        return self._unpad(pt[16:], seq)


class NullEspSa(EspSa):
    """ESP-NULL-like pass-through for a no-crypto baseline: outer IPv4 (protocol
    50) | SPI | seq | [TBAR metadata when the policy has TBAR] | inner.
    No trailer, no ICV, no confidentiality."""

    __slots__ = ()

    def _init_crypto(self, tek: Tek) -> None:
        pass

    def set_sender_ids(self, sender_ids: SenderIds | None) -> None:
        self.sender_ids = sender_ids

    @property
    def iv_remaining(self) -> int | None:
        return None

    def outer_len(self, inner_len: int, tbar: bool = False) -> int:
        return _NULL_FIXED + inner_len + (TBAR_LEN if tbar else 0)

    def max_inner(self, mtu: int, tbar: bool = False) -> int:
        return mtu - _NULL_FIXED - (TBAR_LEN if tbar else 0)

    def seal(
        self,
        inner: bytes,
        n: int,
        tos: int,
        df: int,
        ttl: int,
        src: int,
        dst: int,
        pseudotime_ms: int | None,
    ) -> bytes:
        meta = b"" if pseudotime_ms is None else _TBAR.pack(NH_IPV4, TBAR_LEN, 0, pseudotime_ms)
        total = _NULL_FIXED + n + len(meta)
        if total > 0xFFFF:
            raise EspError(DropReason.TOO_BIG)
        seq = self._next_seq()
        ipid = self._ipid = (self._ipid + 1) & 0xFFFF
        csum = _outer_header_sum(tos, total, ipid, df, ttl, src, dst)
        hdr = _OUT_HDR.pack(
            0x45, tos, total, ipid, df, ttl, IPPROTO_ESP, csum, src, dst, self.spi, seq
        )
        self.pkts_encaps += 1
        self.bytes_encaps += n
        return hdr + meta + inner

    def esp6(self, inner: bytes, n: int, pseudotime_ms: int | None) -> bytes:
        meta = b"" if pseudotime_ms is None else _TBAR.pack(NH_IPV6, TBAR_LEN, 0, pseudotime_ms)
        return _SPISEQ.pack(self.spi, self._next_seq()) + meta + inner

    def open(self, pkt: bytes, off: int, end: int) -> tuple[bytes, int | None, int]:
        if end - off < 8:
            raise EspError(DropReason.MALFORMED, "short ESP packet")
        spi, seq = _SPISEQ.unpack_from(pkt, off)
        if spi != self.spi:
            raise EspError(DropReason.NO_SA)
        start = off + 8
        pseudotime = None
        if self.tbar:
            if end - start < TBAR_LEN:
                raise EspError(DropReason.MALFORMED, "short TBAR metadata")
            orig_nh, length, _res, pseudotime = _TBAR.unpack_from(pkt, start)
            if orig_nh not in (NH_IPV4, NH_IPV6) or length != TBAR_LEN:
                raise EspError(DropReason.MALFORMED, "TBAR metadata")
            start += TBAR_LEN
        self.pkts_decaps += 1
        self.bytes_decaps += end - start
        return pkt[start:end], pseudotime, seq
