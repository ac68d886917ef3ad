"""``python -m gdoid.dataplane``: run a :class:`Forwarder` on its own (tests, benchmarks).

The dataplane comes from ``--dataplane``: ``gcm`` (alias ``engine``: the real
engine with one TEK made up from ``--option key=HEX``, ``spi=``, ``sid=``,
``transform=`` (default esp-gcm-256), ``src=``/``dst=``; no key server, see
:func:`engine_dataplane`), ``null`` (the engine's NullDataplane, same options),
or ``MODULE:CALLABLE`` called as ``CALLABLE(prefixes, options)`` with the
``--prefix`` values (repeatable) and the ``--option KEY=VALUE`` dict.

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
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from gdoid import log
from gdoid.dataplane.forwarder import Forwarder
from gdoid.dataplane.routing import DEFAULT_LOCAL_TABLE, DEFAULT_MARK, DEFAULT_TABLE

Factory = Callable[[list[IPv4Network | IPv6Network], dict[str, str]], Any]


def engine_dataplane(
    null: bool, prefixes: list[IPv4Network | IPv6Network], options: dict[str, str]
) -> Any:
    """The real engine (or its NullDataplane) with one TEK made up from ``options``.

    Options: ``key`` (hex, at least the transform's cipher+integrity key length;
    required for gcm/cbc, zeros for null), ``spi`` (default 0x10000001),
    ``transform`` (default esp-gcm-256), ``src``/``dst`` (the TEK's selector,
    default 10.0.0.0/8 both ways, as a GET VPN ACL), ``sid`` (this GM's RFC 6054
    sender ID, 8 bits: give each GM its own), ``wan_mtu`` (largest outer packet,
    default 1500), ``fail_close`` (1/0).  ``src``/``dst`` may be IPv6 prefixes; ``src6``,
    ``dst6``, ``key6`` (required with them: a second TEK must not share the first's key
    and sender ID) and ``spi6`` (default spi + 1) add a second TEK for a dual-stack group.  The protected prefixes come from the
    selector, not from ``--prefix``.
    """
    import time

    from gdoid.dataplane.engine import Dataplane, NullDataplane
    from gdoid.protocol.policy import SenderIds, Tek, TekPolicy, TrafficSelector
    from gdoid.protocol.transforms import TekTransform

    if prefixes:
        raise ValueError("with the engine the protected prefixes come from --option src=/dst=")
    transform = TekTransform.from_name(options.get("transform", "esp-gcm-256"))
    need = transform.cipher_key_len + transform.integrity_key_len
    if "key" in options:
        key = bytes.fromhex(options["key"])
    elif null:
        key = bytes(need)
    else:
        raise ValueError("--option key=HEX is required (the same in every GM)")
    if len(key) < need:
        raise ValueError(f"{transform.name} needs a {need}-octet key")
    now = time.time()

    def make(spi: int, src: str, dst: str, key: bytes) -> Tek:
        selector = TrafficSelector(ip_network(src), ip_network(dst))
        return Tek(
            spi=spi,
            policy=TekPolicy(1, transform, selector, configured_lifetime=86400),
            cipher_key=key[: transform.cipher_key_len],
            integrity_key=key[transform.cipher_key_len : need],
            created_at=now,
            expires_at=now + 86400,
        )

    spi = int(options.get("spi", "0x10000001"), 0)
    teks = [make(spi, options.get("src", "10.0.0.0/8"), options.get("dst", "10.0.0.0/8"), key)]
    if "src6" in options or "dst6" in options:
        if "key6" in options:
            key6 = bytes.fromhex(options["key6"])
        elif null:
            key6 = bytes(need)
        else:
            raise ValueError("--option key6=HEX is required with src6/dst6")
        if len(key6) < need:
            raise ValueError(f"{transform.name} needs a {need}-octet key6")
        src6 = options.get("src6", options.get("dst6", ""))
        dst6 = options.get("dst6", src6)
        teks.append(make(int(options.get("spi6", hex(spi + 1)), 0), src6, dst6, key6))
    cls = NullDataplane if null else Dataplane
    dp = cls(fail_close=options.get("fail_close") == "1", mtu=int(options.get("wan_mtu", "1500")))
    dp.install(1, teks, SenderIds(8, (int(options.get("sid", "1")),)), None, now)
    return dp


def _null(prefixes: list[IPv4Network | IPv6Network], options: dict[str, str]) -> Any:
    return engine_dataplane(True, prefixes, options)


def _engine(prefixes: list[IPv4Network | IPv6Network], options: dict[str, str]) -> Any:
    return engine_dataplane(False, prefixes, options)


BUILTIN: dict[str, Factory] = {"null": _null, "gcm": _engine, "engine": _engine}


def load_factory(spec: str) -> Factory:
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--dataplane wants null, gcm or MODULE:CALLABLE, not {spec!r}")
    factory: Factory = getattr(importlib.import_module(module), name)
    return factory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gdoid.dataplane", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--dataplane", default="null", help="null, gcm or MODULE:CALLABLE")
    p.add_argument(
        "--prefix", action="append", default=[], type=ip_network, help="protected prefix"
    )
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
