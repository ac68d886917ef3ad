"""The GM's SA database: per group, the KEK and the TEKs with their lifetimes.

Pure state: callers pass ``now``.  The data path (a later layer) reads TEKs
from here; rekeys and removals (GET VPN features) act on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gdoid.protocol.policy import GroupKeys, Kek, SenderIds, Tek

TEK_SLT_FLOOR = 90  # seconds
TEK_SLT_CAP = 3600
# Outbound leaves the transitional TEKs this long before they expire, while they still
# receive: GMs' expiries differ by up to a second (lifetimes travel in whole seconds,
# rekeys reach GMs one after the other) and packets are in flight, so a GM switching at
# the very moment its own copy expires drops what a peer still sends on the old SA.
# At most 5 % of the transition: GMs re-register for the new TEKs by 90 % of it.
TRANSITION_SWITCH_LEAD = 2.0


def shortened_lifetime(remaining: float, configured: float) -> float:
    """TEK_SLT = MIN(TEK_RLT, MAX(90s, MIN(5% of TEK_CLT, 3600s))) (getvpn-features §2.2)."""
    return min(remaining, max(TEK_SLT_FLOOR, min(0.05 * configured, TEK_SLT_CAP)))


@dataclass
class GroupSas:
    group_number: int
    kek: Kek | None = None
    teks: dict[int, Tek] = field(default_factory=dict)
    seq: int = 0
    sender_ids: SenderIds | None = None
    pseudotime_ms: int | None = None
    pseudotime_at: float = 0.0  # local time the pseudotime was received
    activation_delay: int = 0  # from the GAP: new TEKs are sent on only after this
    # Until then the shortened (transitional) TEKs carry our outbound traffic: every GM
    # switches to the new TEKs at the same moment, so none loses traffic (spec §2.2, §3.1).
    transition_until: float = 0.0
    deactivation_delay: int = 0  # and replaced TEKs are kept this long after that

    def active_teks(self, now: float) -> list[Tek]:
        return sorted(
            (t for t in self.teks.values() if t.expires_at > now), key=lambda t: t.created_at
        )


class Sadb:
    def __init__(self) -> None:
        self.groups: dict[int, GroupSas] = {}

    def group(self, number: int) -> GroupSas:
        return self.groups.setdefault(number, GroupSas(number))

    def install(self, keys: GroupKeys, sender_ids: SenderIds | None, now: float) -> list[Tek]:
        """Install a registration's (or rekey's) keys; returns the TEKs that are new."""
        g = self.group(keys.group_number)
        if keys.kek is not None:
            g.kek = keys.kek
        new = [t for t in keys.teks if t.spi not in g.teks]
        for t in keys.teks:
            g.teks[t.spi] = t
        g.seq = max(g.seq, keys.seq)
        if sender_ids is not None:
            g.sender_ids = sender_ids
        g.activation_delay = keys.activation_delay
        g.deactivation_delay = keys.deactivation_delay
        if keys.pseudotime_ms is not None:
            g.pseudotime_ms = keys.pseudotime_ms
            g.pseudotime_at = now
        return new

    def retire_teks(self, group_number: int, spis: set[int], now: float) -> None:
        """Old TEKs a rekey replaced: gone activation + deactivation delay from now.

        Only with a DEACTIVATION_TIME_DELAY; without one they live to their own expiry.
        """
        g = self.group(group_number)
        if not g.deactivation_delay:
            return
        until = now + g.activation_delay + g.deactivation_delay
        for spi in spis & set(g.teks):
            t = g.teks[spi]
            g.teks[spi] = replace(t, expires_at=min(t.expires_at, until))

    def shorten_teks(self, group_number: int, now: float) -> None:
        """Cut every TEK of the group to TEK_SLT (GM removal, policy replace)."""
        g = self.group(group_number)
        for spi, t in g.teks.items():
            slt = shortened_lifetime(t.expires_at - now, t.policy.configured_lifetime)
            g.teks[spi] = replace(t, expires_at=now + slt)
        if g.teks:
            end = max(t.expires_at for t in g.teks.values())
            g.transition_until = end - min(TRANSITION_SWITCH_LEAD, 0.05 * (end - now))

    def send_delay(self, group_number: int, now: float) -> float:
        """How long new TEKs wait before we send on them: GAP activation, or the transition."""
        g = self.group(group_number)
        return max(float(g.activation_delay), g.transition_until - now)

    def clear(self, group_number: int) -> None:
        self.groups.pop(group_number, None)

    def expire(self, now: float) -> list[Tek]:
        gone: list[Tek] = []
        for g in self.groups.values():
            for spi in [s for s, t in g.teks.items() if t.expires_at <= now]:
                gone.append(g.teks.pop(spi))
            if g.kek is not None and g.kek.expires_at <= now:
                g.kek = None
        return gone

    def next_expiry(self, group_number: int) -> float | None:
        """When the group runs out of keys: its newest TEK's or its KEK's expiry."""
        g = self.groups.get(group_number)
        if g is None:
            return None
        times = []
        if g.teks:
            times.append(max(t.expires_at for t in g.teks.values()))
        if g.kek is not None:
            times.append(g.kek.expires_at)
        return min(times) if times else None

    def delete_teks(self, group_number: int, spis: set[int]) -> None:
        g = self.group(group_number)
        for spi in spis:
            g.teks.pop(spi, None)
