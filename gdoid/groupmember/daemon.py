"""``gdoid gm``: the group-member daemon (asyncio shell around GroupMemberEngine)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gdoid import log
from gdoid.commands import match
from gdoid.config import GmConfig
from gdoid.control import ControlRequest, ControlResponse
from gdoid.groupmember.engine import GroupMemberEngine, Registration, RegState
from gdoid.keylog import KeyLog
from gdoid.keyserver.show import kek_spi_text, tek_spi_text
from gdoid.phase1 import phase1_config
from gdoid.shell import UdpShell, wall_clock


class GroupMemberDaemon:
    def __init__(self, config: GmConfig, keylog_dir: Path | None = None, tick: float = 0.25) -> None:
        self.config = config
        self.log = log.get_logger("gdoid.gm")
        keylog_dir = keylog_dir or config.keylog_dir
        self.keylog = KeyLog(keylog_dir) if keylog_dir is not None else None
        self.registered = asyncio.Event()  # set once every group registered
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
        )
        self.shell = UdpShell("gm", (str(config.address), config.port), config.control_socket, tick, self.log)

    def _on_event(self, what: str, reg: Registration) -> None:
        if all(r.registered_at is not None for r in self.engine.registrations.values()):
            self.registered.set()

    async def start(self) -> None:
        await self.shell.open(self.engine, self.handle)
        self.log.info(
            "gm_started",
            address=str(self.config.address),
            port=self.config.port,
            version=str(self.config.software_version),
        )
        await self.shell.send_all(self.engine.start(wall_clock()))

    async def close(self) -> None:
        await self.shell.close()

    # --- control socket -------------------------------------------------------

    async def handle(self, req: ControlRequest) -> ControlResponse:
        now = wall_clock()
        for pattern in ("show crypto gdoi [group <group>] gm", "show crypto gdoi [group <group>]"):
            params = match(req.command, pattern)
            if params is not None:
                return self._show(params.get("group"), now)
        params = match(req.command, "clear crypto gdoi [group <group>]")
        if params is not None:
            regs = self._select(params.get("group"))
            if isinstance(regs, ControlResponse):
                return regs
            out = []
            for r in regs:
                self.engine.sadb.clear(r.group.number)
                out += self.engine.reregister(r.group.number, now)
            await self.shell.send_all(out)
            return ControlResponse(ok=True, output="% re-registering\n")
        return ControlResponse.failure(f"% Invalid input: {' '.join(req.command)}")

    def _select(self, name: str | None) -> list[Registration] | ControlResponse:
        regs = list(self.engine.registrations.values())
        if name is None:
            return regs
        sel = [r for r in regs if r.group.name == name]
        return sel or ControlResponse.failure(f"% Group {name} not found")

    def _show(self, name: str | None, now: float) -> ControlResponse:
        regs = self._select(name)
        if isinstance(regs, ControlResponse):
            return regs
        lines: list[str] = []
        data: list[dict[str, Any]] = []
        for r in regs:
            g = self.engine.sadb.groups.get(r.group.number)
            kek = g.kek if g else None
            teks = g.active_teks(now) if g else []
            status = "Registered" if r.state == RegState.REGISTERED else (
                "Re-registering" if r.registered_at and g else r.state.name.title()
            )
            lines += [
                "GROUP INFORMATION",
                "",
                f"    Group Name               : {r.group.name}",
                f"    Group Identity           : {r.group.number}",
                "    Group Type               : GDOI (ISAKMP)",
                "    IPSec SA Direction       : Both",
                "",
                f"     Group Server list       : {', '.join(str(s) for s in r.group.servers)}",
                "",
                f"    Group Member Information For Group {r.group.name}:",
                f"    Group member             : {self.config.address}",
                f"       Local addr/port       : {self.config.address}/{self.config.port}",
                f"       Remote addr/port      : {r.ks}/{r.group.server_port}",
                f"       Version               : {self.config.software_version}",
                f"       Registration status   : {status}",
                f"       Registered with       : {r.registered_ks or 'none'}",
                f"       KS version            : {r.ks_version}",
                "       Re-registers in       : "
                + (f"{max(0, int(r.rereg_at - now))} sec" if r.rereg_at else "n/a"),
                f"       Succeeded registration: {r.registrations}",
                f"       Failed registration   : {r.failures}",
                f"       Last failure          : {r.last_failure or 'none'}",
                f"       Fail-close            : {'enabled' if self.config.fail_close else 'disabled'}",
                "",
                "KEK POLICY:",
            ]
            if kek is not None:
                lines += [
                    "    Rekey Transport Type     : Unicast",
                    f"    Lifetime (secs)          : {kek.remaining(now)}",
                    "    Encrypt Algorithm        : AES",
                    f"    Key Size                 : {kek.key_bits}",
                    f"    Sig Hash Algorithm       : {kek.sig_hash.name}",
                    f"    Sig Algorithm            : {kek.sig_algorithm.name}",
                    f"    Sig Key Length (bits)    : {kek.sig_key_bits}",
                    f"    KEK SPI                  : {kek_spi_text(kek.spi)}",
                ]
            else:
                lines.append("    none")
            lines += ["", "TEK POLICY for the current KS-Policy ACEs:"]
            for t in teks:
                p = t.policy
                lines += [
                    f"    Match                    : {p.selector.describe()}",
                    "    IPsec SA:",
                    f"        spi: {tek_spi_text(t.spi)}({t.spi})",
                    f"        transform: {p.transform.name}",
                    f"        sa timing:remaining key lifetime (sec): ({t.remaining(now)})",
                    f"        configured lifetime (sec): {p.configured_lifetime}",
                ]
            lines.append("")
            data.append(
                {
                    "name": r.group.name,
                    "number": r.group.number,
                    "state": r.state.name,
                    "registered_ks": str(r.registered_ks) if r.registered_ks else None,
                    "registrations": r.registrations,
                    "failures": r.failures,
                    "last_failure": r.last_failure,
                    "kek_spi": kek.spi.hex() if kek else None,
                    "tek_spis": [f"{t.spi:08x}" for t in teks],
                    "teks": [
                        {"spi": f"{t.spi:08x}", "remaining": t.remaining(now), "transform": t.policy.transform.name}
                        for t in teks
                    ],
                    "sender_ids": list(g.sender_ids.values) if g and g.sender_ids else [],
                    "seq": g.seq if g else 0,
                }
            )
        result = {"role": "gm", "address": str(self.config.address), "version": str(self.config.software_version), "groups": data}
        return ControlResponse(ok=True, output="\n".join(lines), data=result)
