"""What engines and their shells pass each other: a peer's UDP address and datagrams to send."""

from __future__ import annotations

Address = tuple[str, int]  # (IPv4 address, UDP port)
Outgoing = list[tuple[bytes, Address]]  # datagrams and where each goes

__all__ = ["Address", "Outgoing"]
