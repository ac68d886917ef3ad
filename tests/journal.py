"""systemd's native journal protocol, parsed for the tests that play journald."""

from __future__ import annotations


def journal_entry(data: bytes) -> dict[str, str]:
    """Parse systemd's native journal protocol (KEY=value, or KEY\\n<len><data>\\n)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            size = int.from_bytes(data[nl + 1 : nl + 9], "little")
            fields[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields
