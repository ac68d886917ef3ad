"""Small file helpers for the files the daemons write that hold secrets."""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a single write may be short
    (signals, quotas, pipes), and a short state file loses keys."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # never seen for regular files, but an endless loop is worse
            raise OSError(f"write returned {n}")
        view = view[n:]


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
