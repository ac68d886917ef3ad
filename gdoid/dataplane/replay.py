"""Anti-replay for group SAs: the RFC 4303 sequence window and TBAR pseudotime.

A group SA has many senders, each with its own ESP sequence numbers, so a
:class:`SequenceWindow` is kept per (SA, outer source address).  Time-based
anti-replay (wire.md §6.4) compares the pseudotime a packet carries with the
receiver's estimate of the KS's group pseudotime.  Sans-I/O: callers pass ``now``.
"""

from __future__ import annotations

__all__ = ["SequenceWindow", "TbarClock", "tbar_ok"]

_SEQ_MAX = 0xFFFFFFFF


class SequenceWindow:
    """RFC 4303 §3.4.3 sliding window over 32-bit sequence numbers (no ESN).

    ``check_and_update`` must only be called for packets whose ICV verified.
    """

    __slots__ = ("size", "top", "bitmap", "_mask")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("window size must be positive")
        self.size = size
        self.top = 0  # highest sequence number accepted so far
        self.bitmap = 0  # bit i set: top - i was received
        self._mask = (1 << size) - 1

    def check(self, seq: int) -> bool:
        """Would ``seq`` be accepted? (no state change)."""
        if seq <= 0 or seq > _SEQ_MAX:
            return False
        if seq > self.top:
            return True
        diff = self.top - seq
        return diff < self.size and not (self.bitmap >> diff) & 1

    def check_and_update(self, seq: int) -> bool:
        """Accept ``seq`` (and remember it) or refuse it as a replay / too old."""
        if seq <= 0 or seq > _SEQ_MAX:
            return False
        top = self.top
        if seq > top:
            shift = seq - top
            self.bitmap = ((self.bitmap << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
            return True
        diff = top - seq
        if diff >= self.size:
            return False
        bit = 1 << diff
        if self.bitmap & bit:
            return False
        self.bitmap |= bit
        return True


class TbarClock:
    """A GM's estimate of the group pseudotime: the last value the KS sent plus
    the local time elapsed since it arrived, in milliseconds."""

    __slots__ = ("pseudotime_ms", "received_at")

    def __init__(self, pseudotime_ms: int | None = None, received_at: float = 0.0) -> None:
        self.pseudotime_ms = pseudotime_ms
        self.received_at = received_at

    def update(self, pseudotime_ms: int, now: float) -> None:
        self.pseudotime_ms = pseudotime_ms
        self.received_at = now

    @property
    def known(self) -> bool:
        return self.pseudotime_ms is not None

    def estimate(self, now: float) -> int | None:
        if self.pseudotime_ms is None:
            return None
        return self.pseudotime_ms + int((now - self.received_at) * 1000)


def tbar_ok(packet_pseudotime: int | None, local_estimate: int | None, window_ms: int) -> bool:
    """True when the packet's pseudotime is within ``window_ms`` of our estimate.

    A packet without pseudotime, or a receiver without an estimate, fails.
    """
    if packet_pseudotime is None or local_estimate is None:
        return False
    return abs(packet_pseudotime - local_estimate) <= window_ms
