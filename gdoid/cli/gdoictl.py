"""gdoictl: the IOS-like console of the gdoid daemons.

    gdoictl [--socket PATH] [--json] [--yes] WORD...
    gdoictl [--socket PATH] health
    gdoictl [--socket PATH] wait registered|ready [--timeout S]

The words form one IOS command line, optionally followed by output filters
(``| include REGEX``, ``| exclude REGEX``, ``| begin REGEX``) applied here
to the daemon's output text. ``|`` may be a separate word or inside a quoted
argument: both ``gdoictl show crypto gdoi feature gm-removal '|' include No``
and ``gdoictl "show crypto gdoi feature gm-removal | include No"`` work.

Exit codes: 0 success, 1 refused / aborted / error, 2 daemon unreachable.

``health`` prints one line, ``<role> <state>: <detail>``, and exits 0 when the
daemon does its job (KS: listening, and in COOP primary or secondary; GM: every
group registered and the data-path routes in place), 1 when it does not yet, 2
when it cannot be reached.  ``wait`` asks the same question every
:data:`WAIT_INTERVAL` seconds until the answer is yes (exit 0) or the timeout
passes (exit 1, with the last state as the reason); ``registered`` means a GM
registered in every group, or a KS with a member in every group.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

from gdoid.control import ControlRequest, ControlResponse, request_sync

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2

SOCKET_ENV = "GDOID_SOCKET"
DEFAULT_SOCKETS: tuple[Path, ...] = (Path("/run/gdoid/ks.sock"), Path("/run/gdoid/gm.sock"))
FILTER_KINDS = ("include", "exclude", "begin")
# A daemon keeps asking only while it has new prompts; bound it against a buggy one.
_MAX_CONFIRM_ROUNDS = 4
HEALTH_COMMAND = ("show", "gdoid", "health")
WAIT_STATES = ("registered", "ready")
# The control protocol is request/response, so waiting on another process polls it;
# a health answer costs the daemon a few microseconds.
WAIT_INTERVAL = 0.1


class UsageError(Exception):
    """Bad command line; reported on stderr with exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class OutputFilter:
    """One ``| include/exclude/begin REGEX`` stage, IOS semantics (case-sensitive search)."""

    kind: str
    pattern: re.Pattern[str]

    def apply(self, lines: list[str]) -> list[str]:
        if self.kind == "include":
            return [line for line in lines if self.pattern.search(line)]
        if self.kind == "exclude":
            return [line for line in lines if not self.pattern.search(line)]
        for i, line in enumerate(lines):  # begin: from the first matching line on
            if self.pattern.search(line):
                return lines[i:]
        return []


def parse_command_line(words: Sequence[str]) -> tuple[tuple[str, ...], tuple[OutputFilter, ...]]:
    """Split IOS words into the command words and the output filters."""
    command_text, *filter_texts = " ".join(words).split("|")
    command = tuple(command_text.split())
    if not command:
        raise UsageError("no command given")
    filters = []
    for text in filter_texts:
        keyword, _, regex = text.strip().partition(" ")
        # IOS accepts unambiguous abbreviations ("inc", "ex", "b").
        kinds = [k for k in FILTER_KINDS if keyword and k.startswith(keyword.lower())]
        if len(kinds) != 1:
            raise UsageError(
                f"unknown output filter {keyword!r} (expected {', '.join(FILTER_KINDS)})"
            )
        regex = regex.strip()
        if not regex:
            raise UsageError(f"'| {kinds[0]}' needs a regular expression")
        try:
            filters.append(OutputFilter(kinds[0], re.compile(regex)))
        except re.error as exc:
            raise UsageError(f"bad regular expression {regex!r}: {exc}") from None
    return command, tuple(filters)


def apply_filters(output: str, filters: Sequence[OutputFilter]) -> str:
    if not filters:
        return output
    lines = output.splitlines()
    for f in filters:
        lines = f.apply(lines)
    return "".join(f"{line}\n" for line in lines)


def default_socket(env: Mapping[str, str] | None = None) -> Path:
    """$GDOID_SOCKET, else the only one of the KS/GM sockets present."""
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return Path(env[SOCKET_ENV])
    present = [p for p in DEFAULT_SOCKETS if p.exists()]
    if len(present) == 1:
        return present[0]
    tried = ", ".join(str(p) for p in DEFAULT_SOCKETS)
    if present:
        raise ConnectionError(f"several control sockets found ({tried}); choose one with --socket")
    raise ConnectionError(f"no control socket found (tried ${SOCKET_ENV}, {tried}); use --socket")


def _ask(prompt: str, stdin: TextIO, stdout: TextIO, assume_yes: bool) -> bool:
    stdout.write(prompt)
    if assume_yes:
        stdout.write("yes\n")  # so the transcript reads like the IOS console
        stdout.flush()
        return True
    stdout.flush()
    answer = stdin.readline()
    if not stdin.isatty():
        stdout.write(answer if answer.endswith("\n") else answer + "\n")  # echo piped answers
        if not answer:
            # A script without --yes: IOS's silent abort would look like success.
            stdout.flush()
            print(
                "gdoictl: aborted: this command asks for confirmation and stdin is not a "
                "terminal (no answer read); nothing was done. Add --yes to confirm.",
                file=sys.stderr,
            )
    return answer.strip() == "yes"


def health(send: Callable[[ControlRequest], ControlResponse], stdout: TextIO) -> int:
    """One line of state; exit 0 when the daemon does its job, else 1."""
    resp = send(ControlRequest(HEALTH_COMMAND))
    if not resp.ok or not isinstance(resp.data, dict):
        _write_text(stdout, resp.error or "bad health answer")
        return EXIT_ERROR
    _write_text(stdout, str(resp.data.get("line", "")))
    return EXIT_OK if resp.data.get("healthy") else EXIT_ERROR


def wait(
    state: str,
    timeout: float,
    send: Callable[[ControlRequest], ControlResponse],
    path: Path | None,
    stdout: TextIO,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Ask the daemon until it reaches ``state``; a socket not there yet is waited for too."""
    deadline = clock() + timeout
    key = "registered" if state == "registered" else "healthy"
    while True:
        try:
            resp = send(ControlRequest(HEALTH_COMMAND))
            if resp.ok and isinstance(resp.data, dict):
                last = str(resp.data.get("line", ""))
                if resp.data.get(key):
                    _write_text(stdout, last)
                    return EXIT_OK
            else:
                last = resp.error or "bad health answer"
        except (OSError, TimeoutError) as exc:  # not started yet, or restarting
            where = f" at {path}" if path is not None else ""
            last = f"daemon not reachable{where}: {exc.strerror or exc or 'no answer'}"
        if clock() >= deadline:
            print(f"gdoictl: wait {state}: timed out after {timeout:g} s; {last}", file=sys.stderr)
            return EXIT_ERROR
        time.sleep(WAIT_INTERVAL)


def _write_text(stdout: TextIO, text: str) -> None:
    if text:
        stdout.write(text if text.endswith("\n") else text + "\n")


def run(
    command: tuple[str, ...],
    filters: Sequence[OutputFilter],
    send: Callable[[ControlRequest], ControlResponse],
    *,
    as_json: bool = False,
    assume_yes: bool = False,
    stdin: TextIO,
    stdout: TextIO,
) -> int:
    """Drive one command through the confirmation flow and print the result."""
    confirmed = 0
    resp = send(ControlRequest(command, confirmed))
    for _ in range(_MAX_CONFIRM_ROUNDS):
        if resp.ok or len(resp.prompts) <= confirmed:
            break
        for prompt in resp.prompts[confirmed:]:
            if not _ask(prompt, stdin, stdout, assume_yes):
                stdout.flush()
                return EXIT_ERROR  # IOS aborts silently
        confirmed = len(resp.prompts)
        resp = send(ControlRequest(command, confirmed))
    if as_json:
        if resp.ok:
            stdout.write(json.dumps(resp.data, indent=2, sort_keys=True) + "\n")
    else:
        _write_text(stdout, apply_filters(resp.output, filters))
    if not resp.ok:
        # The daemon's text as-is, on stdout: IOS prints refusals on the console.
        _write_text(stdout, resp.error or "command failed")
    stdout.flush()
    return EXIT_OK if resp.ok else EXIT_ERROR


def _parse_wait(words: Sequence[str]) -> tuple[str, float]:
    """``registered|ready [--timeout S]`` (default 60 s)."""
    p = _Parser(prog="gdoictl wait", add_help=False)
    p.add_argument("state", choices=WAIT_STATES)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(list(words))
    if args.timeout < 0:
        raise UsageError("--timeout must not be negative")
    return args.state, args.timeout


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="gdoictl", description="Send an IOS-style command to a running gdoid daemon."
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help=f"control socket (default ${SOCKET_ENV} or /run/gdoid/{{ks,gm}}.sock)",
    )
    parser.add_argument("--json", action="store_true", help="print the structured data as JSON")
    parser.add_argument("--yes", action="store_true", help="answer yes to every [yes/no] prompt")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the daemon"
    )
    parser.add_argument(
        "words", nargs=argparse.REMAINDER, help="command words, e.g. show crypto gdoi"
    )
    try:
        args = parser.parse_args(argv)
        command, filters = parse_command_line(args.words)
        if args.json and filters:
            raise UsageError("output filters apply to text output, not --json")
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"gdoictl: {exc}", file=sys.stderr)
        return EXIT_ERROR

    waiting: tuple[str, float] | None = None
    if command[0] == "wait":
        try:
            waiting = _parse_wait(command[1:])
        except UsageError as exc:
            print(f"gdoictl: {exc}", file=sys.stderr)
            return EXIT_ERROR
    try:
        path = args.socket or default_socket()
    except ConnectionError as exc:
        if waiting is None:
            print(f"gdoictl: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        path = None  # the daemon may not have created its socket yet

    def send(req: ControlRequest) -> ControlResponse:
        nonlocal path
        if path is None:
            path = default_socket()
        return request_sync(path, req, timeout=args.timeout)

    try:
        if waiting is not None:
            return wait(waiting[0], waiting[1], send, path, sys.stdout)
        if command == ("health",):
            return health(send, sys.stdout)
        return run(
            command,
            filters,
            send,
            as_json=args.json,
            assume_yes=args.yes,
            stdin=sys.stdin,
            stdout=sys.stdout,
        )
    except (OSError, TimeoutError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        print(f"gdoictl: cannot reach daemon at {path}: {reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ValueError as exc:
        print(f"gdoictl: bad answer from daemon at {path}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
