"""A logger for in-memory engine tests: keeps every event with its fields."""

from __future__ import annotations


class Events:
    """A logger that keeps (event, fields) for assertions (mnemonics are events too)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    @property
    def names(self) -> list[str]:
        return [e for e, _ in self.lines]

    def log(self, level: int, event: str, **fields: object) -> None:
        self.lines.append((event, fields))

    def __getattr__(self, level: str) -> object:
        return lambda event, **fields: self.lines.append((event, fields))

    def find(self, event: str) -> list[dict[str, object]]:
        return [f for e, f in self.lines if e == event]
