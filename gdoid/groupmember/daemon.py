"""``gdoid gm``: the group-member daemon (asyncio shell around GroupMemberEngine)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gdoid import commands, log
from gdoid.config.errors import ConfigError
from gdoid.config.loader import load_gm_config
from gdoid.config.model import GmConfig
from gdoid.control import ControlRequest, ControlResponse
from gdoid.dataplane.engine import Dataplane
from gdoid.dataplane.forwarder import Forwarder
from gdoid.groupmember import show
from gdoid.groupmember.engine import GroupMemberEngine, Registration, RegState
from gdoid.keylog import KeyLog
from gdoid.phase1 import phase1_config
from gdoid.protocol.pki import PkiError
from gdoid.protocol.policy import SenderIds, Tek
from gdoid.shell import UdpShell, monotonic_clock, wall_clock
from gdoid.showtext import FEATURES, feature_by_name

SID_COUNTER_LOW_WATER = 1 << 20  # IVs left on a sender ID before we ask for new ones


class _DataplaneSync:
    """Feeds SADB changes to the data path and refreshes the TUN routes after."""

    def __init__(self, daemon: GroupMemberDaemon) -> None:
        self.daemon = daemon

    def install(
        self,
        group: int,
        teks: Sequence[Tek],
        sender_ids: SenderIds | None,
        pseudotime_ms: int | None,
        now: float,
        activation_delay: float = 0,
    ) -> None:
        assert self.daemon.dataplane is not None
        self.daemon.dataplane.install(group, teks, sender_ids, pseudotime_ms, now, activation_delay)
        self.daemon.routes_changed()

    def remove_group(self, group: int) -> None:
        assert self.daemon.dataplane is not None
        self.daemon.dataplane.remove_group(group)
        self.daemon.routes_changed()


class GroupMemberDaemon:
    def __init__(
        self,
        config: GmConfig,
        keylog_dir: Path | None = None,
        tick: float = 0.25,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # Called with a one-line state after every registration attempt (sd_notify STATUS=).
        self.on_status: Callable[[str], object] | None = None
        # The latest TUN route update: READY and health wait for it (no clear-text window).
        self._routes_task: asyncio.Task[bool] | None = None
        self._watch: asyncio.Task[None] | None = None  # sender-ID counter watch, from start()
        self.log = log.get_logger("gdoid.gm")
        keylog_dir = keylog_dir or config.keylog_dir
        self.keylog = KeyLog(keylog_dir) if keylog_dir is not None else None
        self.registered = asyncio.Event()  # set once every group registered
        self.dataplane: Dataplane | None = None
        self.forwarder: Forwarder | None = None
        dp = config.dataplane
        if dp.enabled:
            self.dataplane = Dataplane(
                fail_close=config.fail_close,
                mtu=dp.mtu,
                icmp_source=dp.icmp_source,
                icmp6_source=dp.icmp6_source,
            )
            self.forwarder = Forwarder(
                self.dataplane,
                tun_name=config.tun_name,
                mtu=dp.mtu - 100,
                wan_interface=dp.wan_interface,
                mark=dp.mark,
                table=dp.table,
                local_table=dp.local_table,
                clock=wall_clock,
            )
        self.engine = GroupMemberEngine(
            config.address,
            config.groups,
            phase1_config(config.ike, config.auth, config.address, config.software_version),
            registration_timeout=config.registration_timeout,
            rereg_jitter=config.rereg_jitter,
            keylog=self.keylog,
            logger=self.log,
            on_event=self._on_event,
            software_version=config.software_version,
            dataplane=_DataplaneSync(self) if self.dataplane is not None else None,
        )
        self.shell = UdpShell(
            "gm",
            (str(config.address), config.port),
            config.control_socket,
            tick,
            self.log,
            control_group=config.control_group,
        )

    def _on_event(self, what: str, reg: Registration) -> None:
        if what in ("registered", "failed") and self.on_status is not None:
            self.on_status(self.health()["line"])
        if self.registered.is_set() or not all(
            r.registered_at is not None for r in self.engine.registrations.values()
        ):
            return
        task = self._routes_task
        if task is None or task.done():
            self.registered.set()
        else:  # READY=1 only once the routes for the new TEKs are in place
            task.add_done_callback(lambda _t: self.registered.set())

    def health(self) -> dict[str, Any]:
        """Registered to a KS for every group, and the data-path routes in place."""
        now = wall_clock()
        waiting = []
        for r in self.engine.registrations.values():
            g = self.engine.sadb.groups.get(r.group.number)
            # Re-registering with valid keys still does the job.
            if r.state == RegState.REGISTERED or (g is not None and g.active_teks(now)):
                continue
            text = f"group {r.group.name}: {r.state.name.lower()} with KS {r.ks}"
            if r.failures:
                text += f", {r.failures} failed attempt(s), last: {r.last_failure}"
            waiting.append(text)
        registered = not waiting
        task = self._routes_task
        routes = task is None or (task.done() and not task.cancelled() and task.result())
        if not registered:
            state, detail = "registering", "; ".join(waiting)
        elif not routes:
            state = "installing-routes" if task is not None and not task.done() else "routes-failed"
            detail = (
                "registered; data-path routes not in place yet"
                if state == "installing-routes"
                else "registered; the data-path route update failed (see the log)"
            )
        else:
            state = "registered"
            detail = ", ".join(
                f"group {r.group.name} with KS {r.registered_ks}"
                for r in self.engine.registrations.values()
            )
        return {
            "role": "gm",
            "state": state,
            "healthy": registered and bool(routes),
            "registered": registered,
            "detail": detail,
            "line": f"gm {state}: {detail}",
        }

    def reload(self) -> ControlResponse:
        """SIGHUP / ``reload``: check the config file; a GM applies changes on restart only.

        Re-registering every group on a reload would open a window without keys, so a
        reload validates the file and says what would change; the running GM goes on.
        """
        if self.config_path is None:
            return ControlResponse.failure("% no configuration file to reload")
        try:
            new = load_gm_config(self.config_path)
        except (ConfigError, PkiError, OSError) as exc:
            self.log.error("reload_failed", error=str(exc))
            return ControlResponse.failure(
                f"% reload failed, running configuration unchanged: {exc}"
            )
        if new == self.config:
            self.log.info("reload_config_unchanged", path=str(self.config_path))
            return ControlResponse(
                ok=True, output="% configuration unchanged\n", data={"changed": False}
            )
        self.log.warning("reload_config_changed_restart_needed", path=str(self.config_path))
        return ControlResponse(
            ok=True,
            output="% configuration changed; a group member applies it on restart "
            "(systemctl restart gdoid-gm)\n",
            data={"changed": True},
        )

    async def start(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.start()
        await self.shell.open(self.engine, self.handle)
        self._watch = (
            asyncio.create_task(self._watch_sender_ids()) if self.dataplane is not None else None
        )
        self.log.info(
            "gm_started",
            address=str(self.config.address),
            port=self.config.port,
            version=str(self.config.software_version),
        )
        await self.shell.send_all(self.engine.start(wall_clock(), monotonic_clock()))

    async def _watch_sender_ids(self) -> None:
        """Re-register for fresh sender IDs before a GCM IV counter runs out (RFC 6054)."""
        assert self.dataplane is not None
        while True:
            await asyncio.sleep(1.0)
            now = wall_clock()
            # Pending SAs too (not active yet, not expired): a GCM TEK a policy replace
            # brought to a GM registered under CBC waits for the transition to end, and
            # must hold sender IDs by then.
            low = {
                sa["group"]
                for sa in self.dataplane.stats(now)["sas"]
                if sa["remaining"] > 0
                and sa.get("counter_remaining") is not None
                and sa["counter_remaining"] < SID_COUNTER_LOW_WATER
            }
            for number in low:
                reg = self.engine.registrations.get(number)
                if reg is not None and reg.state == RegState.REGISTERED:
                    self.log.warning("sender_id_counter_low", group=reg.group.name)
                    await self.shell.send_all(self.engine.reregister(number, now))

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.shell.close()
        if self.forwarder is not None:
            await self.forwarder.close()

    def routes_changed(self) -> None:
        if self.forwarder is not None and self.forwarder.running:
            self._routes_task = self.forwarder.update_routes()

    # --- control socket -------------------------------------------------------

    @property
    def local(self) -> show.LocalMember:
        c = self.config
        return show.LocalMember(c.address, c.port, c.software_version, c.fail_close, c.tun_name)

    async def handle(self, req: ControlRequest) -> ControlResponse:
        now = wall_clock()
        m = commands.for_role(req.command, "gm")
        if isinstance(m, commands.ParseError):
            return ControlResponse.failure(m.message)
        cmd, group = m.command, m.params.get("group")
        if cmd == commands.SHOW_IPSEC_SA:
            return self._show_ipsec_sa(now)
        if cmd == commands.SHOW_HEALTH:
            h = self.health()
            return ControlResponse(ok=True, output=h["line"] + "\n", data=h)
        if cmd == commands.RELOAD:
            return self.reload()
        regs = self._select(group)
        if isinstance(regs, ControlResponse):
            return regs  # "% Group X not found", as IOS
        if cmd == commands.SHOW_GM_REPLAY:
            return self._show_gm_replay(regs, now)
        if cmd in (commands.SHOW_GM, commands.SHOW_GDOI):
            me = self.local
            return ControlResponse(
                ok=True,
                output=show.show_gdoi(regs, self.engine.sadb, me, now),
                data=show.gdoi_data(regs, self.engine.sadb, me, now),
            )
        if cmd in (commands.SHOW_FEATURE, commands.SHOW_FEATURE_GROUP_AFTER):
            features = (
                [feature_by_name(m.params["feature"])] if "feature" in m.params else list(FEATURES)
            )
            return ControlResponse(
                ok=True,
                output=show.show_feature(regs, self.local, features),
                data=show.feature_json(regs, self.local, features),
            )
        if cmd == commands.CLEAR_GM:
            out = []
            for r in regs:
                self.engine.clear_keys(r.group.number, now)
                out += self.engine.reregister(r.group.number, now)
            await self.shell.send_all(out)
            return ControlResponse(ok=True, output="% re-registering\n")
        return ControlResponse.failure(f"% Invalid input: {' '.join(req.command)}")

    def _show_ipsec_sa(self, now: float) -> ControlResponse:
        if self.dataplane is None:
            sas = show.control_plane_sas(self.engine.sadb, now)
            return ControlResponse(
                ok=True,
                output=show.show_control_plane_sas(self.local, sas),
                data={"sas": sas, "enabled": False},
            )
        stats = self.dataplane.stats(now)
        fwd = self.forwarder.stats.as_dict() if self.forwarder is not None else {}
        return ControlResponse(
            ok=True,
            output=show.show_ipsec_sa(self.local, stats, fwd),
            data={**stats, "forwarder": fwd, "enabled": True},
        )

    def _show_gm_replay(self, regs: list[Registration], now: float) -> ControlResponse:
        if self.dataplane is None:
            groups = show.control_plane_replay(regs, self.engine.sadb, now)
        else:
            numbers = {r.group.number for r in regs}
            groups = [
                g for g in self.dataplane.replay_stats(now)["groups"] if g["group"] in numbers
            ]
        return ControlResponse(
            ok=True,
            output=show.show_replay(regs, groups),
            data={"groups": groups, "dataplane": self.dataplane is not None},
        )

    def _select(self, name: str | None) -> list[Registration] | ControlResponse:
        regs = list(self.engine.registrations.values())
        if name is None:
            return regs
        sel = [r for r in regs if r.group.name == name]
        return sel or ControlResponse.failure(f"% Group {name} not found")
