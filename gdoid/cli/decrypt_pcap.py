"""``gdoid decrypt-pcap IN OUT --keylog DIR``: a capture with its GROUPKEY-PUSH messages decrypted.

The file I/O around ``gdoid/pcap_decrypt.py``: reads the capture and each key-log
directory's ``gdoid_kek_table``, writes OUT (mode 0600: the decrypted pushes
carry TEK keys in their KD payloads), and prints the warnings and a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gdoid.fsutil import write_all
from gdoid.keylog import KEK_TABLE
from gdoid.pcap_decrypt import (
    CaptureError,
    KekKey,
    KekTableError,
    key_ring,
    parse_kek_table,
    rewrite_capture,
)
from gdoid.protocol.constants import GDOI_PORT


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "decrypt-pcap",
        help="rewrite the GROUPKEY-PUSH messages of a capture into their decrypted form",
        description="Copy a pcap/pcapng capture, replacing every GROUPKEY-PUSH whose KEK is in the "
        "key log by the same message decrypted (E flag cleared, lengths and checksums fixed); "
        "every other frame is copied unchanged.  OUT holds keys: it is created mode 0600.",
    )
    p.add_argument("input", type=Path, metavar="IN", help="pcap or pcapng capture")
    p.add_argument("output", type=Path, metavar="OUT", help="rewritten capture (same format as IN)")
    p.add_argument(
        "--keylog",
        type=Path,
        metavar="DIR",
        action="append",
        required=True,
        help=f"key-log directory holding {KEK_TABLE} (repeat for several)",
    )
    p.add_argument(
        "--port",
        type=int,
        action="append",
        metavar="PORT",
        help=f"UDP port of GDOI (default {GDOI_PORT}; repeat for several)",
    )


def _say(text: str) -> None:
    print(f"gdoid decrypt-pcap: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    keys: list[KekKey] = []
    for directory in args.keylog:
        path = directory / KEK_TABLE
        try:
            keys += parse_kek_table(path.read_text(encoding="ascii"), str(path))
        except FileNotFoundError:
            _say(f"warning: no {path} (a key log of gdoid before decrypt-pcap, or no KEK yet)")
        except (KekTableError, UnicodeDecodeError) as exc:
            _say(f"{path}: {exc}")
            return 2
        except OSError as exc:
            _say(f"cannot read {path}: {exc.strerror}")
            return 1
    try:
        data = args.input.read_bytes()
    except OSError as exc:
        _say(f"cannot read {args.input}: {exc.strerror}")
        return 1
    try:
        rewritten, report = rewrite_capture(data, key_ring(keys), args.port or (GDOI_PORT,))
    except CaptureError as exc:
        _say(f"{args.input}: {exc}")
        return 2
    try:
        fd = os.open(
            args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(fd, 0o600)
            write_all(fd, rewritten)
        finally:
            os.close(fd)
    except OSError as exc:
        _say(f"cannot write {args.output}: {exc.strerror}")
        return 1
    for line in report.warnings():
        _say(f"warning: {line}")
    left = sum(len(f) for f in report.missing.values()) + len(report.failed)
    print(
        f"gdoid decrypt-pcap: {report.frames} frames, {len(report.decrypted)} GROUPKEY-PUSH decrypted, "
        f"{left} left encrypted -> {args.output}"
    )
    return 0
