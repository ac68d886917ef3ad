"""``python -m gdoid.dataplane``: run a :class:`Forwarder` on its own (tests, benchmarks).

The dataplane comes from ``--dataplane``: ``null`` (the engine's NullDataplane),
``gcm`` (the real engine with one AES-GCM TEK made up from ``--option key=HEX``
and ``--option spi=N``, no key server), or ``MODULE:CALLABLE`` called as
``CALLABLE(prefixes, options)``.  ``--prefix`` (repeatable) are the protected
destination prefixes.

Prints one JSON line ``{"event": "ready", ...}`` on stdout once the TUN,
sockets and routes are in place, a ``{"event": "stats", ...}`` line on SIGUSR1,
and a final ``stats`` line after SIGTERM / SIGINT, when everything is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from gdoid import log
from gdoid.dataplane.forwarder import Forwarder
from gdoid.dataplane.routing import DEFAULT_LOCAL_TABLE, DEFAULT_MARK, DEFAULT_TABLE

Factory = Callable[[list[IPv4Network], dict[str, str]], Any]


def _null(prefixes: list[IPv4Network], options: dict[str, str]) -> Any:
    from gdoid.dataplane import testing

    return testing.null_dataplane(prefixes, options)


def _gcm(prefixes: list[IPv4Network], options: dict[str, str]) -> Any:
    from gdoid.dataplane import testing

    return testing.gcm_dataplane(prefixes, options)


BUILTIN: dict[str, Factory] = {"null": _null, "gcm": _gcm}


def load_factory(spec: str) -> Factory:
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--dataplane wants null, gcm or MODULE:CALLABLE, not {spec!r}")
    factory: Factory = getattr(importlib.import_module(module), name)
    return factory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gdoid.dataplane", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataplane", default="null", help="null, gcm or MODULE:CALLABLE")
    p.add_argument("--prefix", action="append", default=[], type=IPv4Network, help="protected prefix")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tun", default="gdoi0")
    p.add_argument("--mtu", type=int, default=1400)
    p.add_argument("--wan", default=None, help="WAN interface (ESP arrives there)")
    p.add_argument("--mark", type=lambda v: int(v, 0), default=DEFAULT_MARK)
    p.add_argument("--table", type=int, default=DEFAULT_TABLE)
    p.add_argument("--local-table", type=int, default=DEFAULT_LOCAL_TABLE)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    return p


def _line(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> int:
    options = dict(o.partition("=")[::2] for o in args.option)
    dataplane = load_factory(args.dataplane)(list(args.prefix), options)
    fwd = Forwarder(
        dataplane,
        tun_name=args.tun,
        mtu=args.mtu,
        wan_interface=args.wan,
        mark=args.mark,
        table=args.table,
        local_table=args.local_table,
        batch=args.batch,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _line("stats", **fwd.stats.as_dict()))
    await fwd.start()
    try:
        prefixes = [str(p) for p in dataplane.protected_prefixes()]
        _line("ready", tun=fwd.tun.name if fwd.tun else None, prefixes=prefixes)
        await stop.wait()
    finally:
        await fwd.close()
    _line("stats", final=True, **fwd.stats.as_dict())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure_logging("ios", level=getattr(logging, args.log_level.upper()))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
