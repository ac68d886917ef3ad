"""The GM data path, sans-I/O: classify, protect and unprotect IPv4 and IPv6 packets.

The I/O side reads plaintext IPv4 packets from a TUN device and hands them to
:meth:`Dataplane.outbound`; it reads IPv4/ESP packets (header included, as a
Linux raw socket delivers them) and hands them to :meth:`Dataplane.inbound`.
IPv6 works the same way (wire.md, ESP over IPv6): plaintext IPv6 packets from the
TUN, outer IPv6/ESP packets with a plain 40-octet header (the I/O side rebuilds it
from what an AF_INET6 raw socket reports), TEKs whose selectors are IPv6 prefixes.
Each call returns a :class:`Result`: packets to send on the WAN (complete IPv4
packets for an ``IP_HDRINCL`` raw socket, protected or in the clear) and
packets to write to the TUN.  Nothing here raises out of ``outbound`` /
``inbound``; every drop is counted by reason (and per SA where one is known).
Callers pass ``now`` (seconds, the same clock as the TEKs' ``created_at`` /
``expires_at``).  An unexpected exception (a bug, not a bad packet) is dropped as
``internal-error``, apart from ``malformed``, and its traceback is logged at most
once per :data:`INTERNAL_ERROR_LOG_INTERVAL` seconds with the count suppressed since.

Over 600 lines because classification, the per-group SA set with its
transition rules (activation delay, old-TEK lingering) and the drop accounting
form one state machine per packet; ESP itself is in esp.py, anti-replay in
replay.py and the I/O in forwarder.py.
"""

from __future__ import annotations

import ipaddress
import struct
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from gdoid.dataplane.esp import (
    DropReason,
    EspError,
    EspSa,
    NullEspSa,
    ipv4_checksum,
    parse_outer6,
)
from gdoid.dataplane.replay import SequenceWindow, TbarClock
from gdoid.log import get_logger
from gdoid.protocol.policy import SenderIds, Tek, TrafficSelector

__all__ = [
    "DropReason",
    "EspError",
    "Result",
    "Dataplane",
    "NullDataplane",
    "fragment_ipv4",
    "icmp_frag_needed",
    "icmp6_packet_too_big",
]

_IPH = struct.Struct("!BBHHHBBHII")
_PORTS = struct.Struct("!HH")
_SPI = struct.Struct("!I")
_ICMP_HDR = struct.Struct("!BBHHH")
_TCP_UDP = (6, 17)
_ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))
_IP6H = struct.Struct("!IHBB16s16s")
# Extension headers an inner IPv6 packet may carry before TCP/UDP (RFC 8200 §4):
# hop-by-hop, routing, destination options (length in 8-octet units), fragment, AH.
_EXT_8 = frozenset((0, 43, 60))
_EXT_ALL = frozenset((0, 43, 44, 51, 60))
_IPV6_MIN_MTU = 1280

INTERNAL_ERROR_LOG_INTERVAL = 10.0  # seconds between two logged tracebacks
_TRACEBACK_MAX = 4000  # octets of traceback per log line (the tail: where it was raised)

log = get_logger("gdoid.dataplane")


class IntervalLogLimiter:
    """At most one event per ``interval`` seconds of the caller's clock; counts the rest.

    :meth:`allow` returns None to suppress, else how many were suppressed since the
    last allowed one.  A clock that jumps back re-opens the gate.
    """

    __slots__ = ("interval", "last", "suppressed")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last: float | None = None
        self.suppressed = 0

    def allow(self, now: float) -> int | None:
        last = self.last
        if last is not None and last <= now < last + self.interval:
            self.suppressed += 1
            return None
        n, self.suppressed, self.last = self.suppressed, 0, now
        return n


def log_internal_error(
    limiter: IntervalLogLimiter, now: float, event: str, **fields: object
) -> None:
    """Log the exception being handled, with its (bounded) traceback, if ``limiter`` allows."""
    suppressed = limiter.allow(now)
    if suppressed is None:
        return
    tb = traceback.format_exc().rstrip()[-_TRACEBACK_MAX:]
    log.error(event, **fields, suppressed=suppressed, exception=tb)


@dataclass(slots=True)
class Result:
    to_network: list[bytes]
    to_tun: list[bytes]
    drop: DropReason | None = None


# A compiled selector: src net, src mask, dst net, dst mask, protocol, src port, dst port.
_Sel = tuple[int, int, int, int, int, int, int]


def _family(sel: TrafficSelector) -> int:
    """4 or 6.  ``TrafficSelector`` is typed IPv4 by the control plane; the dataplane
    accepts IPv6 prefixes in it as well (both ends of one selector in one family)."""
    src: IPv4Network | IPv6Network = sel.src
    dst: IPv4Network | IPv6Network = sel.dst
    if src.version != dst.version:
        raise ValueError(f"selector {sel.describe()} mixes address families")
    return src.version


def _compile(sel: TrafficSelector) -> _Sel:
    return (
        int(sel.src.network_address),
        int(sel.src.netmask),
        int(sel.dst.network_address),
        int(sel.dst.netmask),
        sel.ip_protocol,
        sel.src_port,
        sel.dst_port,
    )


def _sel_match(
    sel: _Sel, src: int, dst: int, proto: int, ports: tuple[int, int] | None, nonfirst: bool
) -> bool:
    snet, smask, dnet, dmask, sproto, sp, dp = sel
    if (src & smask) != snet or (dst & dmask) != dnet:
        return False
    if sproto and sproto != proto:
        return False
    if sp or dp:
        if ports is None:
            # RFC 4301 §7: a non-initial TCP/UDP fragment carries no ports; protect it
            # rather than leak it in the clear.  Other protocols have no ports.
            return nonfirst and proto in _TCP_UDP
        if (sp and sp != ports[0]) or (dp and dp != ports[1]):
            return False
    return True


def _ports6(packet: bytes, nh: int) -> tuple[int, tuple[int, int] | None, bool]:
    """Walk an inner IPv6 packet's extension headers: (upper protocol, ports or None,
    non-first fragment).  A truncated chain gives protocol 255 and no ports."""
    off = 40
    n = len(packet)
    nonfirst = False
    for _ in range(8):
        if nh in _EXT_8:
            if off + 8 > n:
                return 255, None, nonfirst
            nh, off = packet[off], off + ((packet[off + 1] + 1) << 3)
        elif nh == 44:  # fragment header
            if off + 8 > n:
                return 255, None, nonfirst
            nonfirst = bool(((packet[off + 2] << 8) | packet[off + 3]) & 0xFFF8)
            nh, off = packet[off], off + 8
        elif nh == 51:  # AH
            if off + 8 > n:
                return 255, None, nonfirst
            nh, off = packet[off], off + ((packet[off + 1] + 2) << 2)
        else:
            break
    if nh in _TCP_UDP and not nonfirst and off + 4 <= n:
        return nh, _PORTS.unpack_from(packet, off), False
    return nh, None, nonfirst


def _packet_ports(
    packet: bytes, ihl: int, proto: int, frag: int
) -> tuple[tuple[int, int] | None, bool]:
    nonfirst = bool(frag & 0x1FFF)
    if proto in _TCP_UDP and not nonfirst and len(packet) >= ihl + 4:
        return _PORTS.unpack_from(packet, ihl), False
    return None, nonfirst


class _Entry:
    """One installed TEK: its EspSa and what the engine needs per packet."""

    __slots__ = ("group", "tek", "sa", "sel", "activate_at", "expires_at", "created_at", "receive_only",
                 "tbar_window", "replay_size", "windows", "clock", "grp", "room", "room6", "ready",
                 "family")  # fmt: skip

    def __init__(self, grp: _Group, tek: Tek, sa: EspSa, activate_at: float) -> None:
        self.group = grp.number
        self.grp = grp
        self.sa = sa
        self.clock = grp.clock
        self.activate_at = activate_at
        self.windows: dict[int, SequenceWindow] = {}
        self.replay_size = 0
        self.room = 0  # largest inner packet that fits the MTU (set by the Dataplane)
        self.room6 = 0  # the same for an inner IPv6 packet in outer IPv6 (20 octets more header)
        self.ready = True  # can send: False for AES-GCM without sender IDs (set by the Dataplane)
        self.update(tek)

    def update(self, tek: Tek) -> None:
        p = tek.policy
        self.tek = tek
        self.sa.set_tek(tek)
        self.sel = _compile(p.selector)
        self.family = _family(p.selector)
        self.expires_at = tek.expires_at
        self.created_at = tek.created_at
        self.receive_only = p.receive_only
        self.tbar_window = p.tbar_window_ms
        size = p.replay_window or 0
        if size != self.replay_size:
            self.windows = {}
        self.replay_size = size


class _Group:
    __slots__ = (
        "number",
        "entries",
        "sender_ids",
        "clock",
        "last_selectors",
        "tbar_drops",
        "replay_drops",
    )

    def __init__(self, number: int) -> None:
        self.number = number
        self.entries: dict[int, _Entry] = {}
        self.sender_ids: SenderIds | None = None
        self.clock = TbarClock()
        # (family, selector) of the last non-empty TEK set, for fail-close
        self.last_selectors: list[tuple[int, _Sel]] = []
        self.tbar_drops = 0
        self.replay_drops = 0


def icmp_frag_needed(inner: bytes, mtu: int, source: int) -> bytes:
    """An IPv4 ICMP "fragmentation needed and DF set" (type 3 code 4, RFC 1191)
    about ``inner``, from ``source`` to the inner source."""
    ihl = (inner[0] & 15) << 2
    quote = inner[: ihl + 8]
    body = bytearray(_ICMP_HDR.pack(3, 4, 0, 0, mtu) + quote)
    struct.pack_into("!H", body, 2, ipv4_checksum(body))
    dst = _IPH.unpack_from(inner)[8]
    total = 20 + len(body)
    hdr = bytearray(_IPH.pack(0x45, 0xC0, total, 0, 0, 64, 1, 0, source, dst))
    struct.pack_into("!H", hdr, 10, ipv4_checksum(hdr))
    return bytes(hdr + body)


def icmp6_packet_too_big(inner: bytes, mtu: int, source: bytes) -> bytes:
    """An ICMPv6 Packet Too Big (type 2, RFC 4443 §3.2) about ``inner`` from ``source``
    (16 octets) to the inner source: as much of ``inner`` as fits in 1280 octets."""
    dst = inner[8:24]  # the inner source
    quote = inner[: _IPV6_MIN_MTU - 48]
    length = 8 + len(quote)
    body = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu) + quote)
    pseudo = source + dst + struct.pack("!IxxxB", length, 58)
    struct.pack_into("!H", body, 2, ipv4_checksum(pseudo + body))
    return _IP6H.pack(0x60000000, length, 58, 255, source, dst) + bytes(body)


def _copied_options(options: bytes) -> bytes:
    """The options RFC 791 copies into every fragment (copy flag set), padded to 4."""
    out = bytearray()
    i = 0
    while i < len(options):
        t = options[i]
        if t == 0:
            break
        if t == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            raise EspError(DropReason.MALFORMED, "IPv4 options")
        ln = options[i + 1]
        if t & 0x80:
            out += options[i : i + ln]
        i += ln
    out += bytes(-len(out) & 3)
    return bytes(out)


def fragment_ipv4(packet: bytes, max_len: int) -> list[bytes]:
    """Split an IPv4 packet into fragments of at most ``max_len`` octets (RFC 791).

    Works on packets that are fragments already.  Raises EspError(TOO_BIG) if
    ``max_len`` leaves no room for 8 octets of data.
    """
    vihl, tos, total, ident, frag, ttl, proto, _c, src, dst = _IPH.unpack_from(packet)
    ihl = (vihl & 15) << 2
    if len(packet) <= max_len:
        return [packet]
    if frag & 0x4000:
        raise EspError(DropReason.TOO_BIG)
    first_opts = packet[20:ihl]
    later_opts = _copied_options(first_opts) if first_opts else b""
    data = packet[ihl:total]
    base_off = (frag & 0x1FFF) * 8
    last_mf = frag & 0x2000
    if base_off + len(data) > 0xFFFF:
        raise EspError(DropReason.MALFORMED, "fragment beyond 64 KiB")
    frags: list[bytes] = []
    pos = 0
    opts = first_opts
    while pos < len(data):
        hl = 20 + len(opts)
        room = (max_len - hl) & ~7
        if room < 8:
            raise EspError(DropReason.TOO_BIG, "MTU too small to fragment")
        chunk = data[pos : pos + room]
        more = pos + len(chunk) < len(data)
        flags = (0x2000 if more else last_mf) | ((base_off + pos) >> 3)
        hdr = bytearray(
            _IPH.pack(0x40 | (hl >> 2), tos, hl + len(chunk), ident, flags, ttl, proto, 0, src, dst)
            + opts
        )
        struct.pack_into("!H", hdr, 10, ipv4_checksum(hdr))
        frags.append(bytes(hdr) + chunk)
        pos += len(chunk)
        opts = later_opts
    return frags


class Dataplane:
    """GM ESP data path for all groups the GM is a member of."""

    _sa_class: type[EspSa] = EspSa

    def __init__(
        self,
        *,
        fail_close: bool = False,
        mtu: int = 1400,
        icmp_source: IPv4Address | None = None,
        icmp6_source: IPv6Address | None = None,
    ) -> None:
        self.fail_close = fail_close
        self._mtu = mtu
        self._need_ports = False
        self.icmp_source = int(icmp_source) if icmp_source is not None else None
        self.icmp6_source = icmp6_source.packed if icmp6_source is not None else None
        self._groups: dict[int, _Group] = {}
        self._by_spi: dict[int, _Entry] = {}
        self._out: list[_Entry] = []  # IPv4 selectors, newest first
        self._out6: list[_Entry] = []  # IPv6 selectors, newest first
        self._ghosts: list[_Sel] = []  # IPv4 selectors of groups that currently have no TEK
        self._ghosts6: list[_Sel] = []
        self._drops: dict[DropReason, int] = {r: 0 for r in DropReason}
        # SPI -> (TEK expiry, IV ranges used) of GCM SAs removed before their TEK expired:
        # if the TEK comes back (clear crypto gdoi, re-registration) its new EspSa skips them,
        # even if the KS hands out the same sender ID again (RFC 4106 §3: never reuse an IV).
        self._spent_ivs: dict[int, tuple[float, list[tuple[int, int]]]] = {}
        self.clear_out = 0
        self.internal_errors = 0  # unexpected exceptions: drops[INTERNAL_ERROR], logged
        self._error_log = IntervalLogLimiter(INTERNAL_ERROR_LOG_INTERVAL)

    @property
    def mtu(self) -> int:
        """Largest outer packet on the WAN."""
        return self._mtu

    @mtu.setter
    def mtu(self, value: int) -> None:
        self._mtu = value
        self._rebuild()

    # --- SA management ------------------------------------------------------

    def install(
        self,
        group: int,
        teks: Sequence[Tek],
        sender_ids: SenderIds | None,
        pseudotime_ms: int | None,
        now: float,
        activation_delay: float = 0,
    ) -> None:
        """Replace the group's TEK set.

        SPIs still present keep their EspSa (sequence numbers, IV counters,
        replay windows) and their activation time; new SPIs get a new EspSa,
        active from ``created_at + activation_delay``; SPIs not in ``teks``
        are removed.  Outbound uses the newest matching TEK that is active,
        not expired and, for AES-GCM, holds sender IDs (else the oldest
        pending one); inbound accepts every
        installed SPI until it expires.

        ``sender_ids`` None keeps the group's previous SIDs (rekeys carry
        none; RFC 6054 SIDs apply to every TEK of the group).  New SIDs
        (re-registration) also go to the kept GCM SAs.  ``pseudotime_ms``
        (received at ``now``) resets the group's TBAR clock.

        Installing an empty set keeps the group's last selectors: matching
        traffic is then dropped (fail-close) or sent in the clear (fail-open).
        :meth:`remove_group` forgets them.
        """
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(group)
        self._spend(g.entries.values(), {t.spi for t in teks}, now)
        if sender_ids is not None:
            g.sender_ids = sender_ids
        if pseudotime_ms is not None:
            g.clock.update(pseudotime_ms, now)
        entries: dict[int, _Entry] = {}
        for tek in teks:
            old = g.entries.get(tek.spi)
            if old is not None and old.sa.same_keys(tek):
                old.update(tek)
                if old.sa.is_gcm:
                    old.sa.set_sender_ids(g.sender_ids)
                entries[tek.spi] = old
            else:
                sa = self._sa_class(tek, g.sender_ids if tek.policy.transform.is_gcm else None)
                spent = self._spent_ivs.pop(tek.spi, None)
                if spent is not None:
                    sa.mark_ivs_used(spent[1])
                entries[tek.spi] = _Entry(g, tek, sa, tek.created_at + activation_delay)
        g.entries = entries
        if entries:
            g.last_selectors = list(dict.fromkeys((e.family, e.sel) for e in entries.values()))
        self._rebuild()

    def remove_group(self, group: int) -> None:
        """Forget the group entirely: its traffic is no longer ours (passes in the clear)."""
        g = self._groups.pop(group, None)
        if g is not None:
            self._spend(g.entries.values(), set(), None)
            self._rebuild()

    def _spend(self, entries: Iterable[_Entry], keep: set[int], now: float | None) -> None:
        """Remember the IVs of the GCM SAs about to go (not in ``keep``) until their TEK expires."""
        if now is not None:
            self._spent_ivs = {s: v for s, v in self._spent_ivs.items() if v[0] > now}
        for e in entries:
            if e.sa.spi not in keep and e.sa.is_gcm and (now is None or e.expires_at > now):
                used = e.sa.used_ivs()
                if used:
                    self._spent_ivs[e.sa.spi] = (e.expires_at, used)

    def _rebuild(self) -> None:
        entries = [e for g in self._groups.values() for e in g.entries.values()]
        newest = sorted(entries, key=lambda e: e.created_at, reverse=True)
        self._out = [e for e in newest if e.family == 4]
        self._out6 = [e for e in newest if e.family == 6]
        self._by_spi = {e.sa.spi: e for e in sorted(entries, key=lambda e: e.created_at)}
        ghosts = [fs for g in self._groups.values() if not g.entries for fs in g.last_selectors]
        self._ghosts = [s for f, s in ghosts if f == 4]
        self._ghosts6 = [s for f, s in ghosts if f == 6]
        for e in entries:
            e.room = e.sa.max_inner(self._mtu, e.sa.tbar)
            e.room6 = e.sa.max_inner(self._mtu - 20, e.sa.tbar)
            e.ready = not e.sa.is_gcm or e.sa.sender_ids is not None
        self._need_ports = any(
            s[5] or s[6] for s in [e.sel for e in entries] + self._ghosts + self._ghosts6
        )

    def protected_prefixes(self) -> list[IPv4Network | IPv6Network]:
        """Destination prefixes to route into the TUN (including groups that lost
        their TEKs, so that fail-close can drop their traffic), IPv4 first."""
        sels = [e.sel for e in self._out] + self._ghosts
        sels6 = [e.sel for e in self._out6] + self._ghosts6
        nets: set[IPv4Network | IPv6Network] = {
            ipaddress.IPv4Network((dnet, bin(dmask).count("1"))) for _, _, dnet, dmask, *_ in sels
        }
        nets |= {
            ipaddress.IPv6Network((dnet, bin(dmask).count("1"))) for _, _, dnet, dmask, *_ in sels6
        }
        return sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen))

    # --- counting ------------------------------------------------------------

    def _drop(
        self, reason: DropReason, entry: _Entry | None = None, to_tun: list[bytes] | None = None
    ) -> Result:
        self._drops[reason] += 1
        if entry is not None:
            d = entry.sa.drops
            d[reason] = d.get(reason, 0) + 1
            if reason is DropReason.TBAR:
                entry.grp.tbar_drops += 1
            elif reason is DropReason.REPLAY:
                entry.grp.replay_drops += 1
        return Result([], to_tun if to_tun is not None else [], reason)

    def _drop_decrypted(self, reason: DropReason, entry: _Entry, inner: bytes) -> Result:
        """A packet that decrypted but is refused after: it must not count as decapsulated."""
        entry.sa.pkts_decaps -= 1
        entry.sa.bytes_decaps -= len(inner)
        return self._drop(reason, entry)

    def _internal_error(self, direction: str, now: float, entry: _Entry | None) -> Result:
        """An exception that is not a verdict on the packet: a bug.  Count it apart from
        malformed input, keep the traceback visible (rate-limited), go on."""
        self.internal_errors += 1
        log_internal_error(
            self._error_log, now, "dataplane_internal_error", direction=direction,
            spi=f"0x{entry.sa.spi:08x}" if entry is not None else None, count=self.internal_errors,
        )  # fmt: skip
        return self._drop(DropReason.INTERNAL_ERROR, entry)

    def _clear(self, packet: bytes) -> Result:
        self.clear_out += 1
        return Result([packet], [])

    # --- outbound ------------------------------------------------------------

    def outbound(self, packet: bytes, now: float) -> Result:
        """A plaintext IPv4 packet read from the TUN."""
        use: _Entry | None = None
        try:
            n = len(packet)
            if n == 0:
                return self._drop(DropReason.MALFORMED)
            if packet[0] >> 4 != 4:
                if packet[0] >> 4 == 6:
                    return self._outbound6(packet, n, now)
                return self._drop(DropReason.NOT_IPV4)
            if n < 20:
                return self._drop(DropReason.MALFORMED)
            vihl, tos, total, _id, frag, ttl, proto, _c, src, dst = _IPH.unpack_from(packet)
            ihl = (vihl & 15) << 2
            if ihl < 20 or total != n or n < ihl:
                return self._drop(DropReason.MALFORMED)
            ports: tuple[int, int] | None = None
            nonfirst = bool(frag & 0x1FFF)
            if self._need_ports and proto in _TCP_UDP and not nonfirst and n >= ihl + 4:
                ports = _PORTS.unpack_from(packet, ihl)

            use = None
            pending: _Entry | None = None
            matched = False
            for e in self._out:
                snet, smask, dnet, dmask, sproto, sp, dp = e.sel
                if (src & smask) != snet or (dst & dmask) != dnet or (sproto and sproto != proto):
                    continue
                if (sp or dp) and not _sel_match(e.sel, src, dst, proto, ports, nonfirst):
                    continue
                matched = True
                if e.expires_at <= now:
                    continue
                if e.activate_at > now or not e.ready:
                    # Not usable yet (a GCM TEK from a rekey before we hold sender IDs: the
                    # GM re-registers for them); an older active TEK carries the traffic.
                    pending = e  # the list is newest first: ends at the oldest pending TEK
                    continue
                use = e
                break
            if use is None:
                use = pending
            if use is None:
                if not matched:
                    matched = any(
                        _sel_match(s, src, dst, proto, ports, nonfirst) for s in self._ghosts
                    )
                if matched and self.fail_close:
                    return self._drop(DropReason.FAIL_CLOSE)
                return self._clear(packet)
            if use.receive_only:
                return self._clear(packet)

            sa = use.sa
            pseudotime = None
            if sa.tbar:
                pseudotime = use.clock.estimate(now)
                if pseudotime is None:
                    return self._drop(DropReason.TBAR, use)
            df = frag & 0x4000
            if n > use.room:
                return self._too_big(use, packet, ihl, df, pseudotime)
            try:
                out = sa.seal(packet, n, tos, df, ttl, src, dst, pseudotime)
            except EspError as exc:
                return self._drop(exc.reason, use)
            return Result([out], [])
        except EspError as exc:
            return self._drop(exc.reason)
        except Exception:  # a bug: never let it out; counted and logged, not "malformed"
            return self._internal_error("outbound", now, use)

    def _select(
        self,
        entries: list[_Entry],
        ghosts: list[_Sel],
        src: int,
        dst: int,
        proto: int,
        ports: tuple[int, int] | None,
        nonfirst: bool,
        now: float,
    ) -> _Entry | DropReason | None:
        """The entry to protect with (newest usable first, else the oldest pending one),
        FAIL_CLOSE, or None to send in the clear (the IPv4 path inlines this)."""
        pending: _Entry | None = None
        matched = False
        for e in entries:
            snet, smask, dnet, dmask, sproto, sp, dp = e.sel
            if (src & smask) != snet or (dst & dmask) != dnet or (sproto and sproto != proto):
                continue
            if (sp or dp) and not _sel_match(e.sel, src, dst, proto, ports, nonfirst):
                continue
            matched = True
            if e.expires_at <= now:
                continue
            if e.activate_at > now or not e.ready:
                pending = e
                continue
            return e
        if pending is not None:
            return pending
        if not matched:
            matched = any(_sel_match(s, src, dst, proto, ports, nonfirst) for s in ghosts)
        if matched and self.fail_close:
            return DropReason.FAIL_CLOSE
        return None

    def _outbound6(self, packet: bytes, n: int, now: float) -> Result:
        """A plaintext IPv6 packet read from the TUN (called from :meth:`outbound`)."""
        if n < 40 or 40 + ((packet[4] << 8) | packet[5]) != n:
            return self._drop(DropReason.MALFORMED)
        src = int.from_bytes(packet[8:24], "big")
        dst = int.from_bytes(packet[24:40], "big")
        proto = packet[6]
        ports: tuple[int, int] | None = None
        nonfirst = False
        if self._need_ports or proto in _EXT_ALL:
            proto, ports, nonfirst = _ports6(packet, proto)
        use = self._select(self._out6, self._ghosts6, src, dst, proto, ports, nonfirst, now)
        if use is None:
            return self._clear(packet)
        if isinstance(use, DropReason):
            return self._drop(use)
        if use.receive_only:
            return self._clear(packet)
        sa = use.sa
        pseudotime = None
        if sa.tbar:
            pseudotime = use.clock.estimate(now)
            if pseudotime is None:
                return self._drop(DropReason.TBAR, use)
        if n > use.room6:
            # IPv6 routers never fragment (RFC 8200 §5): tell the sender the room we have.
            return self._drop(DropReason.TOO_BIG, use, self._icmp6_for(packet, use.room6))
        try:
            out = sa.seal6(packet, n, pseudotime)
        except EspError as exc:
            return self._drop(exc.reason, use)
        return Result([out], [])

    def _icmp6_for(self, packet: bytes, room: int) -> list[bytes]:
        proto, _ports, nonfirst = _ports6(packet, packet[6])
        if nonfirst:
            return []
        if proto == 58 and len(packet) > 40 and packet[6] == 58 and packet[40] < 128:
            return []  # never an ICMPv6 error about an ICMPv6 error (RFC 4443 §2.4 e.1)
        src, dst = packet[8:24], packet[24:40]
        source = self.icmp6_source
        if source is None:
            if dst[0] == 0xFF:
                return []  # multicast destination: no usable source
            source = dst
        if src == bytes(16) or src[0] == 0xFF:
            return []
        # The room for the inner packet, even below IPv6's 1280 minimum (a WAN MTU too
        # small for IPv6: wire.md says so; hosts will not go below 1280).
        return [icmp6_packet_too_big(packet, max(room, 0), source)]

    def _too_big(
        self, entry: _Entry, packet: bytes, ihl: int, df: int, pseudotime: int | None
    ) -> Result:
        sa = entry.sa
        room = entry.room
        if df:
            return self._drop(DropReason.TOO_BIG, entry, self._icmp_for(packet, ihl, room))
        try:
            frags = fragment_ipv4(packet, room)
            out = []
            for f in frags:
                _v, tos, _t, _i, _f, ttl, _p, _c, src, dst = _IPH.unpack_from(f)
                out.append(sa.seal(f, len(f), tos, 0, ttl, src, dst, pseudotime))
        except EspError as exc:
            return self._drop(exc.reason, entry)
        return Result(out, [])

    def _icmp_for(self, packet: bytes, ihl: int, room: int) -> list[bytes]:
        frag = _IPH.unpack_from(packet)[4]
        proto = packet[9]
        if frag & 0x1FFF:
            return []  # only about the first fragment
        if proto == 1 and len(packet) > ihl and packet[ihl] in _ICMP_ERRORS:
            return []  # never an ICMP error about an ICMP error (RFC 1122)
        src, dst = _IPH.unpack_from(packet)[8:10]
        source = self.icmp_source
        if source is None:
            if dst >> 28 == 14 or dst == 0xFFFFFFFF:
                return []  # multicast/broadcast destination: no usable source
            source = dst
        if src == 0 or src >> 28 >= 14:
            return []
        return [icmp_frag_needed(packet, room, source)]

    # --- inbound --------------------------------------------------------------

    def inbound(self, packet: bytes, now: float) -> Result:
        """An IPv4 packet from the raw ESP socket (IPv4 header included)."""
        e: _Entry | None = None
        try:
            n = len(packet)
            if n and packet[0] >> 4 == 6:
                e = None
                return self._inbound6(packet, now)
            if n < 20:
                return self._drop(
                    DropReason.NOT_IPV4 if n and packet[0] >> 4 != 4 else DropReason.MALFORMED
                )
            vihl, tos, total, _id, frag, _ttl, proto, _c, src, dst = _IPH.unpack_from(packet)
            if vihl >> 4 != 4:
                return self._drop(DropReason.NOT_IPV4)
            hl = (vihl & 15) << 2
            if proto != 50 or hl < 20 or total > n or total < hl + 8 or frag & 0x3FFF:
                return self._drop(DropReason.MALFORMED)
            e = self._by_spi.get(_SPI.unpack_from(packet, hl)[0])
            if e is None:
                return self._drop(DropReason.NO_SA)
            if e.expires_at <= now:
                return self._drop(DropReason.EXPIRED, e)
            try:
                inner, pseudotime, seq = e.sa.open(packet, hl, total)
            except EspError as exc:
                return self._drop(exc.reason, e)
            if e.tbar_window is not None:
                est = e.clock.estimate(now)
                if pseudotime is None or est is None or abs(pseudotime - est) > e.tbar_window:
                    return self._drop_decrypted(DropReason.TBAR, e, inner)
            if e.replay_size:
                w = e.windows.get(src)
                if w is None:
                    w = e.windows[src] = SequenceWindow(e.replay_size)
                if not w.check_and_update(seq):
                    return self._drop_decrypted(DropReason.REPLAY, e, inner)
            m = len(inner)
            if m < 20:
                return self._drop_decrypted(DropReason.MALFORMED, e, inner)
            ivihl, itos, itotal, _iid, ifrag, _ittl, iproto, _ic, isrc, idst = _IPH.unpack_from(
                inner
            )
            ihl = (ivihl & 15) << 2
            if (
                ivihl >> 4 != 4
                or ihl < 20
                or itotal != m
                or isrc != src
                or idst != dst
                or e.family != 4
            ):
                return self._drop_decrypted(DropReason.MALFORMED, e, inner)
            snet, smask, dnet, dmask, sproto, sp, dp = sel = e.sel
            if sp or dp:
                ports, nonfirst = _packet_ports(inner, ihl, iproto, ifrag)
                rports = (ports[1], ports[0]) if ports is not None else None
                ok = _sel_match(sel, isrc, idst, iproto, ports, nonfirst) or _sel_match(
                    sel, idst, isrc, iproto, rports, nonfirst
                )
            else:
                ok = (not sproto or sproto == iproto) and (
                    ((isrc & smask) == snet and (idst & dmask) == dnet)
                    or ((idst & smask) == snet and (isrc & dmask) == dnet)
                )
            if not ok:
                return self._drop_decrypted(DropReason.MALFORMED, e, inner)
            oecn = tos & 3
            if oecn and oecn != itos & 3:
                marked = self._ecn_decap(inner, ihl, itos, oecn)
                if marked is None:
                    return self._drop_decrypted(DropReason.MALFORMED, e, inner)
                inner = marked
            return Result([], [inner])
        except EspError as exc:
            return self._drop(exc.reason)
        except Exception:  # a bug: never let it out; counted and logged, not "malformed"
            return self._internal_error("inbound", now, e)

    def _inbound6(self, packet: bytes, now: float) -> Result:
        """An outer IPv6/ESP packet (called from :meth:`inbound`, which catches)."""
        e: _Entry | None = None
        end = parse_outer6(packet)  # EspError: counted by the caller
        e = self._by_spi.get(_SPI.unpack_from(packet, 40)[0])
        if e is None:
            return self._drop(DropReason.NO_SA)
        if e.expires_at <= now:
            return self._drop(DropReason.EXPIRED, e)
        try:
            inner, pseudotime, seq = e.sa.open(packet, 40, end)
        except EspError as exc:
            return self._drop(exc.reason, e)
        if e.tbar_window is not None:
            est = e.clock.estimate(now)
            if pseudotime is None or est is None or abs(pseudotime - est) > e.tbar_window:
                return self._drop_decrypted(DropReason.TBAR, e, inner)
        if e.replay_size:
            key = int.from_bytes(packet[8:24], "big")
            w = e.windows.get(key)
            if w is None:
                w = e.windows[key] = SequenceWindow(e.replay_size)
            if not w.check_and_update(seq):
                return self._drop_decrypted(DropReason.REPLAY, e, inner)
        m = len(inner)
        if (
            m < 40
            or inner[0] >> 4 != 6
            or e.family != 6
            or 40 + ((inner[4] << 8) | inner[5]) != m
            or inner[8:40] != packet[8:40]  # address preservation: both addresses
        ):
            return self._drop_decrypted(DropReason.MALFORMED, e, inner)
        isrc = int.from_bytes(inner[8:24], "big")
        idst = int.from_bytes(inner[24:40], "big")
        snet, smask, dnet, dmask, sproto, sp, dp = sel = e.sel
        if sp or dp or (sproto and inner[6] in _EXT_ALL):
            proto, ports, nonfirst = _ports6(inner, inner[6])
            rports = (ports[1], ports[0]) if ports is not None else None
            ok = _sel_match(sel, isrc, idst, proto, ports, nonfirst) or _sel_match(
                sel, idst, isrc, proto, rports, nonfirst
            )
        else:
            ok = (not sproto or sproto == inner[6]) and (
                ((isrc & smask) == snet and (idst & dmask) == dnet)
                or ((idst & smask) == snet and (isrc & dmask) == dnet)
            )
        if not ok:
            return self._drop_decrypted(DropReason.MALFORMED, e, inner)
        oecn = (packet[1] >> 4) & 3
        iecn = (inner[1] >> 4) & 3
        if oecn and oecn != iecn:
            # RFC 6040 §4.2, as for IPv4; the ECN field is bits 4-5 of octet 1.
            if oecn == 3:
                if iecn == 0:
                    return self._drop_decrypted(DropReason.MALFORMED, e, inner)
                new = 3
            elif oecn == 1 and iecn == 2:
                new = 1
            else:
                new = iecn
            if new != iecn:
                inner = inner[:1] + bytes(((inner[1] & 0xCF) | (new << 4),)) + inner[2:]
        return Result([], [inner])

    @staticmethod
    def _ecn_decap(inner: bytes, ihl: int, itos: int, oecn: int) -> bytes | None:
        """RFC 6040 §4.2 decapsulation when outer and inner ECN differ."""
        iecn = itos & 3
        if oecn == 3:  # CE
            if iecn == 0:
                return None  # Not-ECT inner, CE outer: drop
            new = 3
        elif oecn == 1 and iecn == 2:  # ECT(1) outer over ECT(0) inner
            new = 1
        else:
            return inner
        hdr = bytearray(inner[:ihl])
        hdr[1] = (itos & 0xFC) | new
        hdr[10] = hdr[11] = 0
        struct.pack_into("!H", hdr, 10, ipv4_checksum(hdr))
        return bytes(hdr) + inner[ihl:]

    # --- show ------------------------------------------------------------------

    def stats(self, now: float) -> dict[str, Any]:
        sas = []
        for g in sorted(self._groups.values(), key=lambda g: g.number):
            for e in sorted(g.entries.values(), key=lambda e: e.created_at):
                sa = e.sa
                sas.append({
                    "group": g.number,
                    "spi": sa.spi,
                    "transform": sa.transform_name,
                    "direction": "both",
                    "receive_only": e.receive_only,
                    "active": e.activate_at <= now < e.expires_at,
                    "pkts_encaps": sa.pkts_encaps,
                    "pkts_decaps": sa.pkts_decaps,
                    "bytes_encaps": sa.bytes_encaps,
                    "bytes_decaps": sa.bytes_decaps,
                    "drops": {str(r): c for r, c in sa.drops.items()},
                    "remaining": e.tek.remaining(now),
                    "sender_id": sa.sender_id,
                    "counter_remaining": sa.counter_remaining,
                })  # fmt: skip
        return {
            "sas": sas,
            "drops": {str(r): c for r, c in self._drops.items()},
            "clear_out": self.clear_out,
            "internal_errors": self.internal_errors,
        }

    def replay_stats(self, now: float) -> dict[str, Any]:
        groups = []
        for g in sorted(self._groups.values(), key=lambda g: g.number):
            windows = {e.tbar_window for e in g.entries.values() if e.tbar_window is not None}
            replay = {e.replay_size for e in g.entries.values() if e.replay_size}
            groups.append({
                "group": g.number,
                "tbar_window_ms": max(windows) if windows else None,
                "replay_window": max(replay) if replay else None,
                "pseudotime_ms": g.clock.estimate(now),
                "drops": {"tbar": g.tbar_drops, "replay": g.replay_drops},
            })  # fmt: skip
        return {"groups": groups}


class NullDataplane(Dataplane):
    """The same engine with :class:`NullEspSa`: ESP framing, no crypto.  A
    baseline for benchmarking the I/O path; both ends must use it."""

    _sa_class = NullEspSa
