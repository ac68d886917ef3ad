"""What every protocol state machine returns from ``start``, ``receive`` and ``on_timeout``.

Main Mode (``main_mode*.py``) and GROUPKEY-PULL (``pull.py``) machines hand the
engine one :class:`Output`: datagrams to send to the peer, events
(:mod:`gdoid.protocol.events`) to act on, and why datagrams were dropped (for
the log).  The event type is the machine's own (``Output[Phase1Event]``,
``Output[PullEvent]``), so an engine's ``isinstance`` dispatch stays typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gdoid.protocol.events import Phase1Event, PullEvent

E = TypeVar("E")


@dataclass
class Output(Generic[E]):
    send: list[bytes] = field(default_factory=list)  # datagrams for the machine's peer
    events: list[E] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)  # why datagrams were ignored, for the log


Phase1Output = Output[Phase1Event]  # Main Mode initiator and responder
PullOutput = Output[PullEvent]  # GROUPKEY-PULL initiator and responder

__all__ = ["Output", "Phase1Output", "PullOutput"]
