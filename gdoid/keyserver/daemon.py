"""``gdoid ks``: the key-server daemon (asyncio shell around KeyServerEngine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gdoid import log
from gdoid.commands import match
from gdoid.config import KsConfig
from gdoid.control import ControlRequest, ControlResponse
from gdoid.keylog import KeyLog
from gdoid.keyserver import show
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.pki import load_private_key
from gdoid.shell import UdpShell, wall_clock


class KeyServerDaemon:
    def __init__(self, config: KsConfig, keylog_dir: Path | None = None, tick: float = 0.25) -> None:
        self.config = config
        self.log = log.get_logger("gdoid.ks")
        keylog_dir = keylog_dir or config.keylog_dir
        self.keylog = KeyLog(keylog_dir) if keylog_dir is not None else None
        now = wall_clock()
        self.groups: dict[int, Group] = {}
        for g in config.groups:
            key = load_private_key(g.kek.signing_key)
            self.groups[g.number] = Group(g, key, config.address, config.port, now)
        self.engine = KeyServerEngine(
            phase1_config(config.ike, config.auth, config.address, config.software_version),
            self.groups,
            max_half_open=config.max_half_open,
            keylog=self.keylog,
            logger=self.log,
        )
        self.shell = UdpShell("ks", (str(config.address), config.port), config.control_socket, tick, self.log)

    async def start(self) -> None:
        await self.shell.open(self.engine, self.handle)
        self.log.info(
            "ks_started",
            address=str(self.config.address),
            port=self.config.port,
            groups=",".join(g.name for g in self.groups.values()),
            version=str(self.config.software_version),
        )

    async def close(self) -> None:
        await self.shell.close()

    # --- control socket -------------------------------------------------------

    def _groups(self, name: str | None) -> list[Group] | ControlResponse:
        if name is None:
            return list(self.groups.values())
        g = next((g for g in self.groups.values() if g.name == name), None)
        if g is None:
            return ControlResponse.failure(f"% Group {name} not found")
        return [g]

    async def handle(self, req: ControlRequest) -> ControlResponse:
        words = req.command
        now = wall_clock()
        handlers: list[tuple[str, Any]] = [
            ("show crypto gdoi [group <group>] ks members", self._show_members),
            ("show crypto gdoi [group <group>] feature <feature>", self._show_feature),
            ("show crypto gdoi feature <feature> [group <group>]", self._show_feature),
            ("show crypto gdoi [group <group>] ks", self._show_gdoi),
            ("show crypto gdoi [group <group>]", self._show_gdoi),
            ("show gdoid counters", self._show_counters),
        ]
        for pattern, fn in handlers:
            params = match(words, pattern)
            if params is not None:
                return fn(params, now)
        return ControlResponse.failure(f"% Invalid input: {' '.join(words)}")

    def _show_gdoi(self, params: dict[str, str], now: float) -> ControlResponse:
        groups = self._groups(params.get("group"))
        if isinstance(groups, ControlResponse):
            return groups
        text = show.show_gdoi(groups, self.config.address, self.config.software_version, now)
        data = {"role": "ks", "address": str(self.config.address), "groups": [show.group_data(g, now) for g in groups]}
        return ControlResponse(ok=True, output=text, data=data)

    def _show_members(self, params: dict[str, str], now: float) -> ControlResponse:
        groups = self._groups(params.get("group"))
        if isinstance(groups, ControlResponse):
            return groups
        data = {"groups": [show.group_data(g, now) for g in groups]}
        return ControlResponse(ok=True, output=show.show_members(groups, self.config.address, now), data=data)

    def key_servers(self) -> list[tuple[Any, Any]]:
        return [(self.config.address, self.config.software_version)]

    def _show_feature(self, params: dict[str, str], now: float) -> ControlResponse:
        if params["feature"] not in show.FEATURES:
            return ControlResponse.failure(f"% Invalid input: feature {params['feature']}")
        groups = self._groups(params.get("group"))
        if isinstance(groups, ControlResponse):
            return groups
        text = show.show_feature(groups, self.key_servers(), now)
        return ControlResponse(ok=True, output=text, data={"text": text})

    def _show_counters(self, params: dict[str, str], now: float) -> ControlResponse:
        counters = dict(self.engine.counters)
        counters["half_open"] = self.engine.half_open
        counters["phase1_sas"] = len(self.engine.sas)
        text = "\n".join(f"{k:24s}: {v}" for k, v in sorted(counters.items())) + "\n"
        return ControlResponse(ok=True, output=text, data=counters)
