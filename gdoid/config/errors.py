"""The one error of configuration loading (also raised for an unsafe ``--keylog`` directory)."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, located by file and dotted key path."""

    def __init__(self, key_path: str, message: str, file: str = "") -> None:
        self.key_path = key_path
        self.message = message
        self.file = file
        super().__init__(key_path, message, file)

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key_path) if p]
        return ": ".join([*parts, self.message])
