"""RFC 6054 sender IDs that are never handed out twice under one live TEK.

AES-GCM's explicit IV is ``sender ID | counter`` (RFC 4106 §3, RFC 6054): two
senders with the same SID under the same key reuse keystream.  A GM that
restarts starts its counter at 0 again, so the KS must never give a SID out
twice while any TEK it was used with is live.  Pushes carry no SIDs: a GM
keeps its SIDs under every TEK a later rekey gives it, so a SID counts as used
under every TEK that was live while a member held it.

Every SID of this KS's slice is in exactly one pool:

- *fresh*: ``next..last``, never used (a cursor, O(1));
- *reserved*: a block taken ahead of use and persisted before any of it is
  sent (:attr:`SenderIdAllocator.needs_save`), so a crash between message 4
  and the next save never leads to reissue;
- *held*: given to a member that is still in the member table;
- *cooling*: released (member re-registered, removed, dropped), still tainted
  by the TEKs that were live at release: free once none of those TEKs is
  handed out any more (replaced by a rekey, or past its expiry);
- *orphans*: reserved or held according to a record we merged (state file
  after a crash, or a peer's copy) but held by no member we know: possibly
  in use by a GM whose newest registration we lost, which keeps getting
  pushes for the member row we still have.  Free (via cooling) once every
  member registered before the record was written has re-registered or left;
- *free*: recycled, safe to hand out (a queue).

Over 600 lines because the six pools, their transitions and the record that
persists them are one invariant (a SID in exactly one pool); split, each half
would have to re-check the other's.

The record (``to_json``) is range-encoded and part of the KS state file and of
the COOP ANN block SENDER_IDS (docs/wire.md).  Pure: callers pass ``now``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gdoid.protocol.ann import MAX_ANN_DATAGRAM
from gdoid.protocol.errors import DecodeError
from gdoid.protocol.gdoi_payloads import AnnBlock, BlockType

RESERVE_BLOCK = 64  # SIDs persisted ahead of use: one state save per this many registrations
SID_LOW_WATER = 0.10  # below this fraction of the slice free, a rekey reclaims released SIDs
SID_REKEY_MIN_INTERVAL = 60.0  # at most one SID-exhaustion rekey a minute
MAX_RECORD_RANGES = 600  # per record in an ANN (about 9 KB); more are coarsened (conservative)
MAX_ANN_RECORDS = 8
MAX_COOLING_ENTRIES = 64
MAX_TEKS_PER_ENTRY = 32
VERSION_CAP = 1 << 62
SENDER_IDS_BLOCK_BUDGET = 24_000  # JSON octets of the block
ANN_BLOCKS_ROOM = MAX_ANN_DATAGRAM - 1024  # block octets per ANN (headers, HASH, padding)
RECORD_REFRESH = 30.0  # resend an unchanged record to a peer this often

Ranges = list[tuple[int, int]]
LiveTeks = Callable[[], list[tuple[int, float]]]  # (SPI, expires_at) of the TEKs handed out


def to_ranges(values: Iterable[int]) -> Ranges:
    out: Ranges = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def from_ranges(ranges: Ranges) -> Iterable[int]:
    for a, b in ranges:
        yield from range(a, b + 1)


def coarsen(ranges: Ranges, limit: int) -> Ranges:
    """At most ``limit`` ranges, filling the smallest gaps (marks extra SIDs used: safe)."""
    if len(ranges) <= limit:
        return ranges
    gaps = sorted(range(len(ranges) - 1), key=lambda i: ranges[i + 1][0] - ranges[i][1])
    fill = set(gaps[: len(ranges) - limit])
    out: Ranges = []
    start = ranges[0][0]
    for i, (_, b) in enumerate(ranges):
        if i in fill:
            continue
        out.append((start, b))
        if i + 1 < len(ranges):
            start = ranges[i + 1][0]
    return out


@dataclass(frozen=True)
class CoolingEntry:
    until: float  # the latest expiry of the TEKs below
    teks: tuple[int, ...]  # SPIs handed out when these SIDs were released
    sids: Ranges


@dataclass(frozen=True)
class SidRecord:
    """One KS slice's used-SID record, as stored and as announced."""

    owner: str  # the KS that allocates from this slice ("" in the state file)
    first: int
    last: int
    version: int  # bumped on every change; a peer's copy with a higher one is newer
    next: int
    held: Ranges
    reserved: Ranges
    orphans: Ranges
    orphans_before: float
    cooling: tuple[CoolingEntry, ...]
    free: int  # SIDs the slice can still hand out (for the primary's low-water check)

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "first": self.first,
            "last": self.last,
            "version": self.version,
            "next": self.next,
            "held": [list(r) for r in self.held],
            "reserved": [list(r) for r in self.reserved],
            "orphans": [list(r) for r in self.orphans],
            "orphans_before": self.orphans_before,
            "cooling": [
                {"until": c.until, "teks": list(c.teks), "sids": [list(r) for r in c.sids]}
                for c in self.cooling
            ],
            "free": self.free,
        }

    @property
    def cooling_count(self) -> int:
        return sum(b - a + 1 for c in self.cooling for a, b in c.sids)

    def coarsened(self, limit: int) -> SidRecord:
        """The same record in at most ``limit`` ranges per list (more SIDs marked used)."""
        return SidRecord(
            self.owner,
            self.first,
            self.last,
            self.version,
            self.next,
            coarsen(self.held, limit),
            coarsen(self.reserved, limit),
            coarsen(self.orphans, limit),
            self.orphans_before,
            tuple(CoolingEntry(c.until, c.teks, coarsen(c.sids, limit)) for c in self.cooling),
            self.free,
        )


# --- strict parsing (state file and ANN) ------------------------------------------------

_RECORD_FIELDS = frozenset(
    {
        "owner",
        "first",
        "last",
        "version",
        "next",
        "held",
        "reserved",
        "orphans",
        "orphans_before",
        "cooling",
        "free",
    }
)


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError("SENDER_IDS", field, f"not an integer: {type(value).__name__}")
    if not lo <= value <= hi:
        raise DecodeError("SENDER_IDS", field, f"{value} outside {lo}..{hi}")
    return value


def _float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError("SENDER_IDS", field, f"not a number: {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise DecodeError("SENDER_IDS", field, f"{value} is not a finite time >= 0")
    return float(value)


def _list(value: Any, field: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise DecodeError("SENDER_IDS", field, f"not a list: {type(value).__name__}")
    if len(value) > limit:
        raise DecodeError("SENDER_IDS", field, f"{len(value)} entries, at most {limit}")
    return value


def _ranges(value: Any, field: str, first: int, last: int, limit: int) -> Ranges:
    out: Ranges = []
    for i, r in enumerate(_list(value, field, limit)):
        if not isinstance(r, list) or len(r) != 2:
            raise DecodeError("SENDER_IDS", f"{field}[{i}]", "not a [first, last] pair")
        a = _int(r[0], f"{field}[{i}][0]", first, last)
        b = _int(r[1], f"{field}[{i}][1]", a, last)
        if out and a <= out[-1][1]:
            raise DecodeError("SENDER_IDS", f"{field}[{i}]", "ranges not sorted and disjoint")
        out.append((a, b))
    return out


def parse_record(value: Any, bits: int, field: str = "record", limit: int = 1 << 16) -> SidRecord:
    """Validate one record: every field's type and range; DecodeError names the field."""
    if not isinstance(value, dict):
        raise DecodeError("SENDER_IDS", field, f"not an object: {type(value).__name__}")
    if set(value) != _RECORD_FIELDS:
        missing = sorted(_RECORD_FIELDS - set(value))
        extra = sorted(set(value) - _RECORD_FIELDS)
        raise DecodeError("SENDER_IDS", field, f"fields missing {missing} / unknown {extra}")
    space = (1 << bits) - 1
    owner = value["owner"]
    if not isinstance(owner, str) or len(owner) > 64:
        raise DecodeError("SENDER_IDS", f"{field}.owner", "not a string of at most 64 characters")
    first = _int(value["first"], f"{field}.first", 1, space)
    last = _int(value["last"], f"{field}.last", first, space)
    version = _int(value["version"], f"{field}.version", 0, (1 << 63) - 1)
    nxt = _int(value["next"], f"{field}.next", first, last + 1)
    held = _ranges(value["held"], f"{field}.held", first, last, limit)
    reserved = _ranges(value["reserved"], f"{field}.reserved", first, last, limit)
    orphans = _ranges(value["orphans"], f"{field}.orphans", first, last, limit)
    orphans_before = _float(value["orphans_before"], f"{field}.orphans_before")
    cooling = []
    for i, c in enumerate(_list(value["cooling"], f"{field}.cooling", MAX_COOLING_ENTRIES)):
        f = f"{field}.cooling[{i}]"
        if not isinstance(c, dict) or set(c) != {"until", "teks", "sids"}:
            raise DecodeError("SENDER_IDS", f, "not an object {until, teks, sids}")
        teks = tuple(
            _int(s, f"{f}.teks[{j}]", 0, 0xFFFFFFFF)
            for j, s in enumerate(_list(c["teks"], f"{f}.teks", MAX_TEKS_PER_ENTRY))
        )
        cooling.append(
            CoolingEntry(
                _float(c["until"], f"{f}.until"),
                teks,
                _ranges(c["sids"], f"{f}.sids", first, last, limit),
            )
        )
    free = _int(value["free"], f"{field}.free", 0, last - first + 1)
    return SidRecord(
        owner,
        first,
        last,
        version,
        nxt,
        held,
        reserved,
        orphans,
        orphans_before,
        tuple(cooling),
        free,
    )


def parse_block(value: Any, bits: int) -> list[SidRecord]:
    """The SENDER_IDS ANN block: ``{"bits": n, "records": [record, ...]}``."""
    if not isinstance(value, dict) or set(value) != {"bits", "records"}:
        raise DecodeError("SENDER_IDS", "block", "not an object {bits, records}")
    got = _int(value["bits"], "bits", 1, 32)
    if got != bits:
        raise DecodeError("SENDER_IDS", "bits", f"{got}, this group uses {bits}")
    records = _list(value["records"], "records", MAX_ANN_RECORDS)
    return [
        parse_record(r, bits, f"records[{i}]", MAX_RECORD_RANGES) for i, r in enumerate(records)
    ]


# --- the allocator ------------------------------------------------------------------------


class SenderIdAllocator:
    """RFC 6054 sender IDs from this KS's slice, never twice under one live TEK.

    COOP key servers each allocate from their own slice of the space
    (:meth:`set_slice`), so two KSs never hand out the same SID.
    """

    def __init__(self, bits: int, live_teks: LiveTeks | None = None) -> None:
        self.bits = bits
        self.live_teks: LiveTeks = live_teks or (lambda: [])
        self.first = 1  # SID 0 is kept back: a zeroed IV then never looks valid
        self.last = (1 << bits) - 1
        self.next = self.first
        self.block = max(1, min(RESERVE_BLOCK, (self.last - self.first + 1) // 32))
        self.held: dict[int, str] = {}  # SID -> member (peers' slices too, from COOP members)
        self.reserved: dict[int, None] = {}  # an ordered set
        self._free: deque[int] = deque()
        self._free_set: set[int] = set()
        self.cooling: dict[tuple[float, tuple[int, ...]], set[int]] = {}
        self.orphans: set[int] = set()
        self.orphans_before = 0.0
        self.version = 0
        self.needs_save = False  # a reservation not yet persisted: save before sending
        self.clock = 0.0  # the latest ``now`` seen (for orphans found outside merge)
        self.peer_records: dict[str, SidRecord] = {}  # other KSs' slices, from their ANNs
        self._record_cache: tuple[tuple[int, str], SidRecord] | None = None
        self.sent_to: dict[str, tuple[Any, float]] = {}  # peer -> (what we last sent it, when)

    # --- slice ---------------------------------------------------------------------

    def set_slice(self, index: int, count: int) -> None:
        """Use slice ``index`` of ``count`` equal slices of the SID space."""
        space = (1 << self.bits) - 1
        size = max(1, space // count)
        self.first = 1 + index * size
        self.last = space if index == count - 1 else index * size + size
        self.next = self.first
        self.block = max(1, min(RESERVE_BLOCK, self.size // 32))
        self.reserved.clear()
        self._free.clear()
        self._free_set.clear()
        self.cooling.clear()
        self.orphans.clear()
        self.version += 1

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def _mine(self, sid: int) -> bool:
        return self.first <= sid <= self.last

    @property
    def free_count(self) -> int:
        return (self.last - self.next + 1) + len(self._free_set) + len(self.reserved)

    @property
    def cooling_count(self) -> int:
        return sum(len(s) for s in self.cooling.values())

    # --- allocation ------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Cooling SIDs whose TEKs are all gone (replaced or expired) become free."""
        live = {spi for spi, exp in self.live_teks() if exp > now}
        for key in [k for k in self.cooling if now >= k[0] or not live.intersection(k[1])]:
            for sid in sorted(self.cooling.pop(key)):
                self._add_free(sid)
            self.version += 1

    def _add_free(self, sid: int) -> None:
        if sid not in self._free_set:
            self._free_set.add(sid)
            self._free.append(sid)

    def _take_free(self) -> int | None:
        while self._free:
            sid = self._free.popleft()
            if sid in self._free_set:
                self._free_set.discard(sid)
                return sid
        return None

    def _refill(self, want: int) -> None:
        while len(self.reserved) < want:
            if self.next <= self.last:
                sid = self.next  # fresh SIDs first: the longest time before any reuse
                self.next += 1
            else:
                got = self._take_free()
                if got is None:
                    return
                sid = got
            self.reserved[sid] = None
            self.needs_save = True
            self.version += 1

    def allocate(self, member: str, count: int, now: float = 0.0) -> tuple[int, ...] | None:
        """``count`` SIDs never used under a live TEK; None if the slice has too few.

        Always new ones, also for a member seen before: the caller releases the
        member's previous SIDs (:meth:`release`) when its new row replaces the old.
        """
        self.clock = max(self.clock, now)
        self.expire(now)
        if len(self.reserved) < count:
            self._refill(max(count, self.block))
        if len(self.reserved) < count:
            return None
        got = []
        for _ in range(count):
            sid = next(iter(self.reserved))
            del self.reserved[sid]
            self.held[sid] = member
            got.append(sid)
        self.version += 1
        return tuple(got)

    def release(self, sids: Iterable[int], now: float = 0.0) -> None:
        """A member no longer holds these: tainted by every TEK handed out now."""
        live = [(spi, exp) for spi, exp in self.live_teks() if exp > now]
        key = (max((exp for _, exp in live), default=0.0), tuple(sorted({spi for spi, _ in live})))
        for sid in sids:
            if self.held.pop(sid, None) is None or not self._mine(sid):
                continue
            if live:
                self.cooling.setdefault(key, set()).add(sid)
            else:
                self._add_free(sid)
            self.version += 1

    def claim(self, member: str, sids: Iterable[int]) -> None:
        """Restore an allocation (from the state file or a COOP peer's member row)."""
        for sid in sids:
            self._remove_from_pools(sid)
            self.held[sid] = member
        self.version += 1

    def _remove_from_pools(self, sid: int) -> None:
        self.reserved.pop(sid, None)
        self._free_set.discard(sid)
        self.orphans.discard(sid)
        for key, sids in list(self.cooling.items()):
            sids.discard(sid)
            if not sids:
                del self.cooling[key]
        if self._mine(sid) and sid >= self.next:
            # A "fresh" SID somebody holds: our record is behind (state lost).  The
            # ones skipped may have been used too: orphans, not free.
            self.orphans.update(range(self.next, sid))
            if sid > self.next:
                self.orphans_before = max(self.orphans_before, self.clock)
            self.next = sid + 1

    def unreserve(self) -> None:
        """Clean shutdown: nothing more is sent, so the reserved block is free again."""
        for sid in list(self.reserved):
            self._add_free(sid)
        self.reserved.clear()
        self.version += 1

    def reconcile(self, member_sids: Iterable[tuple[float, Iterable[int]]], now: float) -> None:
        """Release what no member holds any more; free orphans once their blockers left.

        ``member_sids``: (registration time, SIDs) of every row of the member table.
        COOP merges replace rows without releasing the old row's SIDs, hence this sweep.
        """
        referenced: set[int] = set()
        oldest = math.inf
        for registered_at, sids in member_sids:
            referenced.update(sids)
            oldest = min(oldest, registered_at)
        self.release([s for s in self.held if s not in referenced], now)
        if self.orphans and oldest > self.orphans_before:
            for sid in self.orphans:
                self.held[sid] = ""
            released, self.orphans = self.orphans, set()
            self.release(released, now)

    # --- the record ------------------------------------------------------------------

    def record(self, owner: str = "") -> SidRecord:
        """The record (cached per version: announcing it costs no sort of the held SIDs)."""
        if self._record_cache is not None and self._record_cache[0] == (self.version, owner):
            return self._record_cache[1]
        held = to_ranges(s for s in self.held if self._mine(s))
        rec = SidRecord(
            owner,
            self.first,
            self.last,
            self.version,
            self.next,
            held,
            to_ranges(self.reserved),
            to_ranges(self.orphans),
            self.orphans_before,
            tuple(CoolingEntry(k[0], k[1], to_ranges(v)) for k, v in sorted(self.cooling.items())),
            self.free_count,
        )
        self._record_cache = ((self.version, owner), rec)
        return rec

    def merge(self, rec: SidRecord, now: float, own: bool = False) -> None:
        """Take in a record of (part of) our slice: what it says is used stays used.

        Held, reserved and orphaned SIDs become orphans unless a member of ours
        holds them (members claim theirs afterwards); cooling stays cooling.
        ``own``: our own record, newer than what we know (we lost our state):
        its cooling SIDs are cooling even if a member row made us skip past
        them, and the block after its cursor may have been reserved (and
        handed out) after it was written, so that is skipped too.
        """
        cursor = min(rec.next, self.last + 1)
        if rec.next > self.next:
            for sid in range(self.next, cursor):
                self._add_free(sid)
            self.next = cursor
        used = [*rec.held, *rec.reserved, *rec.orphans]
        for sid in from_ranges(used):
            if self._mine(sid) and sid not in self.held:
                self._remove_from_pools(sid)
                self.orphans.add(sid)
        rec_orphans = set(from_ranges(used))
        for c in rec.cooling:
            for sid in from_ranges(c.sids):
                if not self._mine(sid) or sid in self.held:
                    continue
                if sid in self.orphans and not (own and sid not in rec_orphans):
                    continue
                self._remove_from_pools(sid)
                self.cooling.setdefault((c.until, c.teks), set()).add(sid)
        if own:
            ahead = min(cursor + self.block, self.last + 1)
            for sid in range(cursor, ahead):
                if sid not in self.held:
                    self._remove_from_pools(sid)
                    self.orphans.add(sid)
            used.append((cursor, ahead - 1))
        if used:
            # Any member registered before the record was written may hold them.
            self.orphans_before = max(self.orphans_before, rec.orphans_before, now)
        self.clock = max(self.clock, now)
        # Capped well below the validator's limit: a peer's huge version cannot make ours invalid.
        self.version = min(max(self.version, rec.version) + 1, VERSION_CAP)
        self.needs_save = True

    # --- exhaustion --------------------------------------------------------------------

    def low(self) -> bool:
        return self.free_count < SID_LOW_WATER * self.size

    def reclaimable(self) -> int:
        """SIDs a rekey (replacing the TEKs now handed out) would free: the cooling ones."""
        return self.cooling_count

    def peers_low(self) -> bool:
        """A peer KS's slice is low on SIDs a rekey would free (only the primary rekeys)."""
        return any(
            r.free < SID_LOW_WATER * (r.last - r.first + 1) and r.cooling_count
            for r in self.peer_records.values()
        )


# --- state file ------------------------------------------------------------------------------


def state_json(alloc: SenderIdAllocator, latest_registration: float) -> dict[str, Any]:
    """The record for the state file.

    Reserved SIDs may be handed out after this save to a GM whose new row is
    then lost: a restart treats them as orphans, blocked while any member
    registered up to now (the latest row saved, the latest allocation) remains.
    """
    rec = alloc.record()
    data = rec.to_json()
    data["orphans_before"] = max(rec.orphans_before, alloc.clock, latest_registration)
    return data


def restore(alloc: SenderIdAllocator, value: Any) -> None:
    rec = parse_record(value, alloc.bits)
    alloc.merge(rec, rec.orphans_before)
    alloc.needs_save = False


# --- COOP ANN block ------------------------------------------------------------------------------


def ann_block(alloc: SenderIdAllocator, me: str, to: str, now: float) -> AnnBlock:
    """Our slice's record, and the destination's own as we last heard it (so that a KS
    whose state was lost recovers its record), then others while the budget lasts."""
    alloc.expire(now)
    records = [alloc.record(me).coarsened(MAX_RECORD_RANGES)]
    others = sorted(alloc.peer_records.values(), key=lambda r: r.owner != to)
    for rec in others[: MAX_ANN_RECORDS - 1]:
        records.append(rec.coarsened(MAX_RECORD_RANGES))
    listed = [r.to_json() for r in records]
    value = {"bits": alloc.bits, "records": listed}
    while (
        len(json.dumps(value, separators=(",", ":"))) > SENDER_IDS_BLOCK_BUDGET and len(listed) > 1
    ):
        listed.pop()
    return AnnBlock.of(BlockType.SENDER_IDS, value)


def add_block(
    anns: list[list[AnnBlock]], alloc: SenderIdAllocator, me: str, to: str, now: float
) -> None:
    """Add the SENDER_IDS block to an announcement batch for ``to``, when it is news.

    Sent when any record changed since the last one sent to that peer, with every
    full member list, and at least every RECORD_REFRESH seconds (ANNs are UDP); the
    rest of the time ANNs stay as small as before.  Into the batch's last ANN if
    the datagram stays below 32 KiB, else an ANN of its own.
    """
    alloc.expire(now)
    signature = (
        alloc.version,
        tuple(sorted((o, r.version) for o, r in alloc.peer_records.items())),
    )
    full = any(b.type == BlockType.MEMBERS_FULL for blocks in anns for b in blocks)
    sent = alloc.sent_to.get(to)
    if not full and sent is not None and sent[0] == signature and now - sent[1] < RECORD_REFRESH:
        return
    alloc.sent_to[to] = (signature, now)
    block = ann_block(alloc, me, to, now)
    last = anns[-1] if anns else None
    if (
        last is not None
        and sum(len(b.data) + 4 for b in last) + len(block.data) + 4 <= ANN_BLOCKS_ROOM
    ):
        last.append(block)
    else:
        anns.append([block])


def apply_records(alloc: SenderIdAllocator, records: list[SidRecord], me: str, now: float) -> None:
    """Merge a peer's validated SENDER_IDS records.

    Our own slice's record coming back from a peer is newer than ours only if
    we lost our state: then we take it in.  Other slices' records are kept
    (newest version per owner) to relay and for the primary's low-water check;
    any of them that overlaps our slice (a KS with another view of the
    slicing) is merged too: we never hand out SIDs a peer recorded as used.
    """
    for rec in records:
        if rec.owner == me:
            if rec.version > alloc.version:
                alloc.merge(rec, now, own=True)
            continue
        known = alloc.peer_records.get(rec.owner)
        if known is not None and known.version >= rec.version:
            continue
        alloc.peer_records[rec.owner] = rec
        if rec.first <= alloc.last and rec.last >= alloc.first:
            alloc.merge(rec, now)
