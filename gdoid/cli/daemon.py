"""``gdoid``: run a key server, a group member, or the built-in lab."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gdoid import log
from gdoid.cli import decrypt_pcap
from gdoid.config.errors import ConfigError
from gdoid.config.loader import load_gm_config, load_ks_config
from gdoid.protocol.constants import GDOI_PORT
from gdoid.protocol.pki import PkiError
from gdoid.systemd import Notifier


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keylog", type=Path, metavar="DIR", help="append Wireshark key-log lines to DIR"
    )
    p.add_argument(
        "--log-format",
        choices=("ios", "json", "journal"),
        default="ios",
        help="ios lines or JSON lines on stderr, or native journald entries with structured fields",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gdoid", description="GDOI (RFC 6407) key server and group member"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ks = sub.add_parser("ks", help="run a key server")
    ks.add_argument("--config", type=Path, required=True)
    _common(ks)
    gm = sub.add_parser("gm", help="run a group member")
    gm.add_argument("--config", type=Path, required=True)
    _common(gm)
    lab = sub.add_parser("lab", help="one KS and N GMs on loopback in one process")
    lab.add_argument("--gms", type=int, default=2, help="number of group members (default 2)")
    lab.add_argument(
        "--kss", type=int, default=1, help="number of cooperative key servers (default 1)"
    )
    lab.add_argument(
        "--duration", type=float, default=0.0, help="keep running SECONDS after registration"
    )
    lab.add_argument(
        "--base-port",
        type=int,
        default=GDOI_PORT,
        help=f"UDP port for every daemon (default {GDOI_PORT})",
    )
    lab.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for registrations"
    )
    lab.add_argument(
        "--export", type=Path, metavar="DIR", help="write configs and keys to DIR and exit"
    )
    lab.add_argument(
        "--dataplane",
        action="store_true",
        help="(root) hostA-GM1-core-GM2-hostB in network namespaces: ping through real ESP",
    )
    _common(lab)
    decrypt_pcap.add_parser(sub)
    return parser


async def _run_daemon(daemon: Any, reload: Callable[[], Any] | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopped_by: list[str] = []
    notifier = Notifier()

    def on_stop(sig: signal.Signals) -> None:
        stopped_by.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_stop, sig)
    if reload is not None:

        def notified_reload() -> Any:
            # SIGHUP and the control socket's "reload" (ExecReload=gdoictl ... reload)
            # both report to systemd: a failed reload is a failure, not "reloaded".
            notifier.reloading()
            resp = reload()
            # STATUS= without the console's "% " prefix.
            if resp.ok:
                text = resp.output.strip().removeprefix("% ") or "configuration applied"
                notifier.ready(f"reloaded: {text}")
            else:
                notifier.notify(
                    "READY=1", f"STATUS={(resp.error or 'reload failed').removeprefix('% ')}"
                )
            return resp

        daemon.reload = notified_reload  # the control handler calls self.reload()
        loop.add_signal_handler(signal.SIGHUP, notified_reload)
    if hasattr(daemon, "on_status"):
        daemon.on_status = lambda line: notifier.notify(f"STATUS={line}")
    await daemon.start()
    if hasattr(daemon, "health"):
        notifier.notify(f"STATUS={daemon.health()['line']}")
    watchdog = asyncio.create_task(notifier.watchdog_loop())
    ready = asyncio.create_task(_notify_ready(daemon, notifier))
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        # A shutdown is never silent: say why (a signal) before the sockets close.
        daemon.log.info("shutdown", signal=stopped_by[0] if stopped_by else "none")
        for t in (watchdog, ready):
            t.cancel()
        await daemon.close()
    return 0


async def _notify_ready(daemon: Any, notifier: Notifier) -> None:
    """READY=1: a KS once it listens, a GM once every group is registered and routed."""
    registered = getattr(daemon, "registered", None)
    if registered is not None:
        await registered.wait()
        notifier.ready("registered: " + daemon.health()["detail"])
    else:
        notifier.ready("listening")


def _fatal(fmt: str, text: str) -> None:
    """A startup error: on stderr, and in the journal at error priority (not info)."""
    if fmt == "journal":
        log.get_logger("gdoid").error("startup_failed", error=text)
    print(f"gdoid: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "decrypt-pcap":
        return decrypt_pcap.run(args)
    log.configure_logging(
        args.log_format,
        level=getattr(logging, args.log_level.upper()),
        journal_socket=os.environ.get("GDOID_JOURNAL_SOCKET", log.JOURNAL_SOCKET),
    )
    try:
        if args.command == "ks":
            from gdoid.keyserver.daemon import KeyServerDaemon

            ks = KeyServerDaemon(load_ks_config(args.config), args.keylog, config_path=args.config)
            return asyncio.run(_run_daemon(ks, reload=ks.reload))
        if args.command == "gm":
            from gdoid.groupmember.daemon import GroupMemberDaemon

            gm = GroupMemberDaemon(
                load_gm_config(args.config), args.keylog, config_path=args.config
            )
            return asyncio.run(_run_daemon(gm, reload=gm.reload))
        from gdoid import lab

        if not 1 <= args.gms <= 250 or not 1 <= args.kss <= 250:
            print("gdoid lab: --gms and --kss must be 1..250", file=sys.stderr)
            return 2
        if args.dataplane:
            return lab.run_dataplane_lab(keylog=args.keylog, timeout=args.timeout)
        if args.export is not None:
            files = lab.export(args.export, args.gms, args.base_port, args.kss)
            print(
                f"gdoid lab: wrote {', '.join(str(p) for p in files.kss)}"
                + "".join(f", {p.name}" for p in files.gms)
            )
            return 0
        return asyncio.run(
            lab.run_lab(
                args.gms, args.base_port, args.keylog, args.duration, args.timeout, kss=args.kss
            )
        )
    # Exit 2: a configuration error that a restart cannot fix (the units'
    # RestartPreventExitStatus=2); exit 1: maybe transient (an address not up yet).
    except (ConfigError, PkiError) as exc:
        _fatal(args.log_format, str(exc))
        return 2
    except PermissionError as exc:
        # A file (a key, /dev/net/tun) names itself; a bind does not.
        hint = (
            ""
            if exc.filename
            else f" (binding port {GDOI_PORT} needs root or CAP_NET_BIND_SERVICE; try --base-port)"
        )
        _fatal(args.log_format, f"{exc}{hint}")
        return 2
    except OSError as exc:
        _fatal(args.log_format, str(exc))
        return 1
    except RuntimeError as exc:  # e.g. the control socket is in use by a running daemon
        _fatal(args.log_format, str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
