"""Every event the protocol machines of ``gdoid/protocol`` report (as aioquic's ``events.py``).

A machine's output carries these next to the datagrams to send; the engines
act on them (install keys, log, retry the next KS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from gdoid.protocol.constants import NotifyType
from gdoid.protocol.policy import GroupKeys, SenderIds

# The phase-1 SA an event carries (ike.IkeSa): a type parameter, since ike.py
# imports this module to emit the events (this one must not import ike.py).
Sa = TypeVar("Sa")


# --- phase 1: Main Mode (ike.py) --------------------------------------------


@dataclass(frozen=True)
class Phase1Established(Generic[Sa]):
    sa: Sa


@dataclass(frozen=True)
class Phase1Failed:
    reason: str
    notify: NotifyType | None = None  # the notify sent or received, if any
    received: bool = False  # True when the peer told us (notify received)


Phase1Event = Phase1Established[Sa] | Phase1Failed


# --- GROUPKEY-PULL (pull.py) ------------------------------------------------


@dataclass(frozen=True)
class Registered:
    """GM side: the group's policy and keys arrived and validated."""

    group_number: int
    keys: GroupKeys
    sender_ids: SenderIds | None
    ks_proof: str = ""  # what the KS proved in message 4, for the log ("" = nothing asked)


@dataclass(frozen=True)
class MemberRegistered(Generic[Sa]):
    """KS side: a GM completed registration."""

    group_number: int
    sa: Sa
    keys: GroupKeys
    sender_ids: SenderIds | None


@dataclass(frozen=True)
class PullFailed:
    group_number: int | None
    reason: str
    notify: NotifyType | None
    received: bool = False  # the peer told us


PullEvent = Registered | MemberRegistered[Sa] | PullFailed

__all__ = [
    "MemberRegistered",
    "Phase1Established",
    "Phase1Event",
    "Phase1Failed",
    "PullEvent",
    "PullFailed",
    "Registered",
]
