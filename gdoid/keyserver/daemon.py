"""``gdoid ks``: the key-server daemon (asyncio shell around KeyServerEngine)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from gdoid import commands, log
from gdoid.config.errors import ConfigError
from gdoid.config.loader import load_ks_config
from gdoid.config.model import KsConfig
from gdoid.control import ControlRequest, ControlResponse
from gdoid.keylog import KeyLog
from gdoid.keyserver import show, state
from gdoid.keyserver.coop import Coop
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol import crypto
from gdoid.protocol.pki import PkiError, load_private_key
from gdoid.protocol.push import RemovalMode
from gdoid.protocol.version import supports_removal_and_replace
from gdoid.shell import UdpShell, wall_clock
from gdoid.showtext import FEATURES, feature_by_name

REMOVAL_PROMPT = (
    "\n% This GM-Removal message will shorten all GMs' key lifetimes and cause them to\n"
    "re-register before keys expiry.\n"
    "Are you sure you want to proceed? ? [yes/no]: "
)
REMOVAL_NOW_PROMPT = (
    "\n% This GM-Removal immediate message will cleanup all GMs downloaded policies\n"
    "% This will cause all GMs to re-register.\n"
    "Are you sure you want to proceed? ? [yes/no]: "
)
REMOVAL_WARNING_PROMPT = (
    "WARNING for group {group}: some devices cannot support GM-REMOVAL and can cause network\n"
    "disruption. Please check 'show crypto gdoi feature'.\n"
    "Are you sure you want to proceed ? [yes/no]: "
)
NOT_PRIMARY_REMOVAL = "ERROR for group {group}: can only execute this command on Primary KS"
NOT_PRIMARY_REKEY = "ERROR for group {group}: This command must be executed on Pri-KS"
SAVE_INTERVAL = 0.2  # seconds: member-table and COOP changes are saved, coalesced, this often


class KeyServerDaemon:
    def __init__(
        self,
        config: KsConfig,
        keylog_dir: Path | None = None,
        tick: float = 1.0,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.log = log.get_logger("gdoid.ks")
        keylog_dir = keylog_dir or config.keylog_dir
        self.keylog = KeyLog(keylog_dir, config.port) if keylog_dir is not None else None
        now = wall_clock()
        self.groups: dict[int, Group] = {}
        for g in config.groups:
            key = load_private_key(g.kek.signing_key)
            self.groups[g.number] = Group(g, key, config.address, config.port, now)
        self.engine = KeyServerEngine(
            phase1_config(
                config.ike, config.auth, config.address, config.software_version, coop=config.coop
            ),
            self.groups,
            max_half_open=config.max_half_open,
            keylog=self.keylog,
            logger=self.log,
        )
        self.coop: Coop | None = None
        if config.coop is not None:
            self.coop = Coop(
                config.coop,
                config.address,
                config.software_version,
                self.engine.phase1,
                self.engine,
                now,
            )
            self.engine.coop = self.coop
            self.coop.on_dirty = self.mark_dirty
            self.engine.scheduled_rekeys = False  # until elected primary
        self.shell = UdpShell(
            "ks",
            (str(config.address), config.port),
            config.control_socket,
            tick,
            self.log,
            control_group=config.control_group,
        )
        self.state_path = config.state_dir / "state.json"
        self._restore_state()
        self.engine.on_state_change = self.save_state
        self._dirty = False
        self._saved_counters = self._state_counters()

    def _state_counters(self) -> tuple[int, int]:
        # The engine counts the member-table changes it makes itself (registrations,
        # GMs dropped for missed rekeys); COOP calls mark_dirty for the rest.
        return (self.engine.counters["registrations"], self.engine.counters["members_dropped"])

    def _restore_state(self) -> None:
        if not self.state_path.exists():
            return
        try:
            restored = state.load(self.state_path)
        except state.StateError as exc:
            aside = state.move_aside(self.state_path)
            self.log.error(
                "state_file_corrupt", path=str(self.state_path), error=str(exc), moved_to=str(aside)
            )
            print(
                f"gdoid ks: state file {self.state_path} is corrupt ({exc}); moved to {aside}, starting with fresh keys",
                file=sys.stderr,
            )
            return
        for number, data in restored.items():
            g = self.groups.get(number)
            if g is None:
                continue
            if data["kek"].public_key_der != crypto.public_key_der(g.signing_key):
                self.log.warning(
                    "signing_key_changed",
                    group=g.name,
                    detail="the rekey signing key changed while the KS was down: GMs reject pushes until they re-register",
                )
            state.apply(g, data)
            if self.keylog is not None:  # the restored keys encrypt the next pushes
                self.keylog.group_keys(g.kek, g.teks)
            self.log.info(
                "state_restored", group=g.name, seq=g.seq, members=len(g.members), teks=len(g.teks)
            )

    def save_state(self) -> None:
        """Persist now (called before any rekey is sent: SEQ never goes backwards)."""
        state.save(self.state_path, self.groups)
        self._dirty = False

    def mark_dirty(self) -> None:
        self._dirty = True

    async def start(self) -> None:
        self.save_state()
        await self.shell.open(self.engine, self.handle)
        self._saver = asyncio.create_task(self._save_loop())
        self.log.info(
            "ks_started",
            address=str(self.config.address),
            port=self.config.port,
            groups=",".join(g.name for g in self.groups.values()),
            version=str(self.config.software_version),
        )

    async def _save_loop(self) -> None:
        # Member-table and COOP changes are saved, coalesced, within SAVE_INTERVAL;
        # rekeys (and COOP handovers) save at once, before anything is sent.
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            counters = self._state_counters()
            if self._dirty or counters != self._saved_counters:
                self._saved_counters = counters
                try:
                    self.save_state()
                except OSError as exc:
                    self.log.error("state_save_failed", error=str(exc))

    async def close(self) -> None:
        self._saver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._saver
        await self.shell.close()
        for g in self.groups.values():
            g.sids.unreserve()  # nothing more is sent: the reserved SIDs are free again
        try:
            self.save_state()
        except OSError as exc:
            self.log.error("state_save_failed", error=str(exc))

    # --- control socket -------------------------------------------------------

    def _groups(self, name: str | None) -> list[Group] | ControlResponse:
        if name is None:
            return list(self.groups.values())
        g = next((g for g in self.groups.values() if g.name == name), None)
        if g is None:
            return ControlResponse.failure(f"% Group {name} not found")
        return [g]

    async def handle(self, req: ControlRequest) -> ControlResponse:
        now = wall_clock()
        m = commands.for_role(req.command, "ks")
        if isinstance(m, commands.ParseError):
            return ControlResponse.failure(m.message)
        cmd, params = m.command, m.params
        if cmd == commands.CLEAR_KS_MEMBERS:
            return await self._clear_members(params, "now" in m.keywords, req.confirm, now)
        if cmd == commands.KS_REKEY:
            return await self._rekey(params, "replace-now" in m.keywords, now)
        if cmd == commands.RELOAD:
            return self.reload()
        if cmd == commands.SHOW_HEALTH:
            h = self.health()
            return ControlResponse(ok=True, output=h["line"] + "\n", data=h)
        if cmd == commands.SHOW_COUNTERS:
            return self._show_counters()
        handlers = {
            commands.SHOW_KS_MEMBERS: self._show_members,
            commands.SHOW_FEATURE: self._show_feature,
            commands.SHOW_FEATURE_GROUP_AFTER: self._show_feature,
            commands.SHOW_KS: self._show_gdoi,
            commands.SHOW_GDOI: self._show_gdoi,
            commands.SHOW_KS_REPLAY: self._show_replay,
            commands.SHOW_KS_COOP: self._show_coop,
        }
        handler = handlers.get(cmd)
        if handler is None:
            return ControlResponse.failure(f"% Invalid input: {' '.join(req.command)}")
        groups = self._groups(params.get("group"))
        if isinstance(groups, ControlResponse):
            return groups  # "% Group X not found", as IOS
        return handler(groups, params, now)

    def health(self) -> dict[str, Any]:
        """Listening and, in COOP, holding a role; ``registered``: a member in every group."""
        role = self.role_name
        healthy = role in ("Primary", "Secondary")
        state = "listening" if self.coop is None else role.lower()
        if not healthy:
            state = "electing"
        members = {g.name: len(g.members) for g in self.groups.values()}
        detail = ", ".join(f"group {n}: {c} member(s)" for n, c in members.items())
        if self.coop is not None:
            detail = f"COOP {role.lower() if healthy else 'election pending'}; " + detail
        return {
            "role": "ks",
            "state": state,
            "healthy": healthy,
            "registered": all(members.values()),
            "detail": detail,
            "line": f"ks {state}: {detail}",
        }

    def _show_gdoi(
        self, groups: list[Group], params: dict[str, str], now: float
    ) -> ControlResponse:
        text = show.show_gdoi(
            groups, self.config.address, self.config.software_version, now, self.role_name
        )
        data = {
            "role": "ks",
            "ks_role": self.role_name,
            "address": str(self.config.address),
            "groups": [show.group_data(g, now) for g in groups],
        }
        return ControlResponse(ok=True, output=text, data=data)

    def _show_members(
        self, groups: list[Group], params: dict[str, str], now: float
    ) -> ControlResponse:
        data = {"groups": [show.group_data(g, now) for g in groups]}
        return ControlResponse(
            ok=True, output=show.show_members(groups, self.config.address, now), data=data
        )

    def key_servers(self) -> list[tuple[Any, Any]]:
        """Every KS of the group with its version (from COOP announcements)."""
        if self.coop is not None:
            return list(self.coop.key_servers())
        return [(self.config.address, self.config.software_version)]

    def _show_feature(
        self, groups: list[Group], params: dict[str, str], now: float
    ) -> ControlResponse:
        features = [feature_by_name(params["feature"])] if "feature" in params else list(FEATURES)
        key_servers = self.key_servers()
        text = show.show_feature(groups, key_servers, now, features)
        return ControlResponse(
            ok=True, output=text, data=show.feature_json(groups, key_servers, features)
        )

    @property
    def role_name(self) -> str:
        if self.coop is None:
            return "Primary"
        return str(self.coop.describe(wall_clock())["role"])

    @property
    def is_primary(self) -> bool:
        return self.coop is None or self.coop.is_primary  # a standalone KS is primary

    async def _clear_members(
        self, params: dict[str, str], now_mode: bool, confirm: int, now: float
    ) -> ControlResponse:
        groups = self._groups(params.get("group"))
        if isinstance(groups, ControlResponse):
            return groups
        if not self.is_primary:
            return ControlResponse.failure(
                "\n".join(NOT_PRIMARY_REMOVAL.format(group=g.name) for g in groups)
            )
        prompts = [REMOVAL_NOW_PROMPT if now_mode else REMOVAL_PROMPT]
        for g in groups:
            if self.unsupported_devices(g):
                prompts.append(REMOVAL_WARNING_PROMPT.format(group=g.name))
        if confirm < len(prompts):
            return ControlResponse.confirm_needed(*prompts)
        mode = RemovalMode.NOW if now_mode else RemovalMode.TRANSITIONAL
        lines = []
        out = []
        for g in groups:
            text = log.KS_SEND_GM_REMOVAL.text(group=g.name)
            lines.append(text.split(": ", 1)[1])
            log.emit(self.log, log.KS_SEND_GM_REMOVAL, group=g.name)
            out += self.engine.remove_members(g, now, mode)
        await self.shell.send_all(out)
        return ControlResponse(ok=True, output="\n".join(lines) + "\n", data={"sent": len(out)})

    def unsupported_devices(self, group: Group) -> list[str]:
        bad = [str(m.address) for m in group.unsupported_members()]
        bad += [str(addr) for addr, v in self.key_servers() if not supports_removal_and_replace(v)]
        return bad

    async def _rekey(
        self, params: dict[str, str], replace_now: bool, now: float
    ) -> ControlResponse:
        groups = self._groups(params.get("group"))
        if isinstance(groups, ControlResponse):
            return groups
        if not self.is_primary:
            return ControlResponse.failure(
                "\n".join(NOT_PRIMARY_REKEY.format(group=g.name) for g in groups)
            )
        lines, out = [], []
        for g in groups:
            out += self.engine.rekey(g, now, replace=True, replace_now=replace_now)
            lines.append(
                log.KS_SEND_UNICAST_REKEY.text(
                    extra="with policy-replace ",
                    group=g.name,
                    address=str(self.config.address),
                    seq=g.seq,
                )
            )
        await self.shell.send_all(out)
        return ControlResponse(
            ok=True,
            output="\n".join(lines) + "\n",
            data={"sent": len(out), "seq": [g.seq for g in groups]},
        )

    def reload(self) -> ControlResponse:
        """Re-read the config: auth and IKE apply now; group policy waits for a rekey."""
        if self.config_path is None:
            return ControlResponse.failure("% no configuration file to reload")
        try:
            new = load_ks_config(self.config_path)
            if (new.coop is None) != (self.coop is None):
                raise ConfigError("coop", "adding or removing [coop] needs a restart")
            phase1 = phase1_config(
                new.ike, new.auth, new.address, new.software_version, coop=new.coop
            )
            keys = {g.number: load_private_key(g.kek.signing_key) for g in new.groups}
        except (ConfigError, PkiError, OSError) as exc:
            self.log.error("reload_failed", error=str(exc))
            return ControlResponse.failure(
                f"% reload failed, running configuration unchanged: {exc}"
            )
        self.engine.phase1 = phase1
        now = wall_clock()
        changed = []
        for gconf in new.groups:
            g = self.groups.get(gconf.number)
            if g is None:
                self.groups[gconf.number] = Group(
                    gconf, keys[gconf.number], new.address, new.port, now
                )
                if self.keylog is not None:
                    self.keylog.group_keys(
                        self.groups[gconf.number].kek, self.groups[gconf.number].teks
                    )
                changed.append(gconf.name)
                continue
            staged = _staged(g)
            # Announced once per edit: a reload that finds the same change staged is quiet.
            if g.stage_config(gconf, keys[gconf.number]) and _staged(g) != staged:
                changed.append(g.name)
                log.emit(self.log, log.POLICY_CHANGE, group=g.name)
        for number in [n for n in self.groups if new.group_by_number(n) is None]:
            del self.groups[number]
        if self.coop is not None and new.coop is not None:
            self.coop.reload(new.coop, phase1, now)  # fresh credentials, peers and groups
        unchanged = new == self.config
        self.config = new
        if unchanged and not changed:
            self.log.info("reload_config_unchanged", path=str(self.config_path))
            return ControlResponse(
                ok=True, output="% configuration unchanged\n", data={"changed": []}
            )
        return ControlResponse(
            ok=True,
            output="".join(log.POLICY_CHANGE.text(group=name) + "\n" for name in changed),
            data={"changed": changed},
        )

    def _show_coop(
        self, groups: list[Group], params: dict[str, str], now: float
    ) -> ControlResponse:
        if self.coop is None:
            role = show.standalone_role(self.config.address, self.config.software_version)
        else:
            role = self.coop.describe(now)
        return ControlResponse(ok=True, output=show.show_coop(groups, role), data=role)

    def _show_replay(
        self, groups: list[Group], params: dict[str, str], now: float
    ) -> ControlResponse:
        data = [show.replay_data(g, now) for g in groups]
        return ControlResponse(ok=True, output=show.show_replay(groups, now), data=data)

    def _show_counters(self) -> ControlResponse:
        counters = dict(self.engine.counters)
        counters["half_open"] = self.engine.half_open
        counters["phase1_sas"] = len(self.engine.sas)
        return ControlResponse(ok=True, output=show.show_counters(counters), data=counters)


def _staged(g: Group) -> tuple[object, bytes | None]:
    """The change a group holds for its next rekey: policy and new signing key."""
    key = g.pending_signing_key
    return g.pending_config, crypto.public_key_der(key) if key is not None else None
