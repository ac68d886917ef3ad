"""Text of the GM's show commands, IOS-shaped, plus their ``--json`` data.

Pure functions from the GM engine's state (registrations, SADB) and, when the data
path runs, its statistics, to text; the formatting both roles share is in
:mod:`gdoid.showtext`.  Without the data path the SAs, lifetimes and anti-replay
settings come from the control plane (the SADB); only packet counters need the
data path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from gdoid.groupmember.engine import Registration, RegState
from gdoid.groupmember.sadb import GroupSas, Sadb
from gdoid.protocol.policy import Tek
from gdoid.protocol.version import SoftwareVersion
from gdoid.showtext import (
    Device,
    Feature,
    counts_text,
    feature_data,
    feature_tables,
    kek_policy_lines,
    replay_window_text,
    tbar_window_text,
    tek_replay_lines,
    tek_sa_lines,
    tek_spi_text,
)


@dataclass(frozen=True)
class LocalMember:
    """What the GM shows of itself (from its configuration)."""

    address: IPv4Address
    port: int
    version: SoftwareVersion
    fail_close: bool
    tun_name: str


def _status(r: Registration, g: GroupSas | None) -> str:
    if r.state == RegState.REGISTERED:
        return "Registered"
    return "Re-registering" if r.registered_at and g else r.state.name.title()


def _rereg_text(r: Registration, now: float) -> str:
    # rereg_at is also set while a removal's random re-registration delay runs.
    return f"{max(0, int(r.rereg_at - now))} sec" if r.rereg_at is not None else "n/a"


def show_gdoi(regs: Sequence[Registration], sadb: Sadb, me: LocalMember, now: float) -> str:
    """``show crypto gdoi [gm]`` on a GM: each group's registration, KEK and TEKs."""
    lines: list[str] = []
    for r in regs:
        g = sadb.groups.get(r.group.number)
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
            f"    Group member             : {me.address}",
            f"       Local addr/port       : {me.address}/{me.port}",
            f"       Remote addr/port      : {r.ks}/{r.group.server_port}",
            f"       Version               : {me.version}",
            f"       Registration status   : {_status(r, g)}",
            f"       Registered with       : {r.registered_ks or 'none'}",
            f"       KS version            : {r.ks_version}",
            f"       Re-registers in       : {_rereg_text(r, now)}",
            f"       Succeeded registration: {r.registrations}",
            f"       Failed registration   : {r.failures}",
            f"       Last failure          : {r.last_failure or 'none'}",
            f"       Fail-close            : {'enabled' if me.fail_close else 'disabled'}",
            "",
            "KEK POLICY:",
        ]
        lines += (
            kek_policy_lines(g.kek, now) if g is not None and g.kek is not None else ["    none"]
        )
        lines += ["", "TEK POLICY for the current KS-Policy ACEs:"]
        for t in g.active_teks(now) if g is not None else []:
            lines += [*tek_sa_lines(t, now), *tek_replay_lines(t)]
        lines.append("")
    return "\n".join(lines)


def gdoi_data(
    regs: Sequence[Registration], sadb: Sadb, me: LocalMember, now: float
) -> dict[str, Any]:
    groups = []
    for r in regs:
        g = sadb.groups.get(r.group.number)
        teks = g.active_teks(now) if g is not None else []
        kek = g.kek if g is not None else None
        groups.append({
            "name": r.group.name,
            "number": r.group.number,
            "state": r.state.name,
            "registered_ks": str(r.registered_ks) if r.registered_ks else None,
            "registrations": r.registrations,
            "failures": r.failures,
            "last_failure": r.last_failure,
            "rereg_in": max(0, int(r.rereg_at - now)) if r.rereg_at is not None else None,
            "kek_spi": kek.spi.hex() if kek else None,
            "tek_spis": [f"{t.spi:08x}" for t in teks],
            "teks": [_tek_data(t, now) for t in teks],
            "sender_ids": list(g.sender_ids.values) if g and g.sender_ids else [],
            "seq": g.seq if g else 0,
        })  # fmt: skip
    return {"role": "gm", "address": str(me.address), "version": str(me.version), "groups": groups}


def _tek_data(t: Tek, now: float) -> dict[str, Any]:
    p = t.policy
    return {
        "spi": f"{t.spi:08x}",
        "remaining": t.remaining(now),
        "transform": p.transform.name,
        "replay_window": p.replay_window,
        "tbar_window_ms": p.tbar_window_ms,
        "receive_only": p.receive_only,
    }


# --- show crypto ipsec sa ------------------------------------------------------------------


def _header(me: LocalMember, dataplane: bool) -> list[str]:
    if dataplane:
        return [
            f"interface: {me.tun_name}",
            f"    Crypto map tag: gdoi-{me.tun_name}, local addr {me.address}",
            "",
        ]
    return [
        "interface: none (data path not enabled: SAs from the control plane, no packet counters)",
        f"    Crypto map tag: gdoi, local addr {me.address}",
        "",
    ]


def show_ipsec_sa(me: LocalMember, stats: Mapping[str, Any], forwarder: Mapping[str, Any]) -> str:
    """``show crypto ipsec sa`` with the data path: its SAs and their packet counters."""
    lines = _header(me, True)
    for sa in stats["sas"]:
        spi = sa["spi"]
        lines += [
            f"   group {sa['group']} spi: 0x{spi:08X}({spi})"
            if isinstance(spi, int)
            else f"   group {sa['group']} spi: {spi}",
            f"     transform: {sa['transform']} , in use settings ={{Tunnel, Address preservation}}",
            f"     #pkts encaps: {sa['pkts_encaps']}, #pkts encrypt: {sa['pkts_encaps']}",
            f"     #pkts decaps: {sa['pkts_decaps']}, #pkts decrypt: {sa['pkts_decaps']}, #pkts verify: {sa['pkts_decaps']}",
            f"     #bytes encaps: {sa['bytes_encaps']}, #bytes decaps: {sa['bytes_decaps']}",
            f"     #drops: {counts_text(sa['drops'])}",
            f"     sa timing: remaining key lifetime (sec): ({sa['remaining']})",
            f"     sender ID: {sa.get('sender_id')}, IV counter remaining: {sa.get('counter_remaining')}",
            "",
        ]
    lines.append(f"   clear (unprotected) packets out: {stats.get('clear_out', 0)}")
    lines.append(f"   drops: {counts_text(stats.get('drops', {}))}")
    lines.append(
        f"   forwarder: {', '.join(f'{k} {v}' for k, v in forwarder.items() if not isinstance(v, dict))}"
    )
    return "\n".join(lines) + "\n"


def control_plane_sas(sadb: Sadb, now: float) -> list[dict[str, Any]]:
    """The SADB's TEKs as ``show crypto ipsec sa --json`` rows, without packet counters."""
    rows = []
    for g in sorted(sadb.groups.values(), key=lambda g: g.group_number):
        for t in g.active_teks(now):
            p = t.policy
            rows.append({
                "group": g.group_number, "spi": t.spi, "transform": p.transform.name, "direction": "both",
                "receive_only": p.receive_only, "active": t.created_at <= now < t.expires_at,
                "remaining": t.remaining(now), "configured_lifetime": p.configured_lifetime,
                "replay_window": p.replay_window, "tbar_window_ms": p.tbar_window_ms,
                "sender_ids": list(g.sender_ids.values) if g.sender_ids else [],
            })  # fmt: skip
    return rows


def show_control_plane_sas(me: LocalMember, sas: Sequence[Mapping[str, Any]]) -> str:
    """``show crypto ipsec sa`` without the data path: SAs, lifetimes and anti-replay settings."""
    lines = _header(me, False)
    for sa in sas:
        lines += [
            f"   group {sa['group']} spi: {tek_spi_text(sa['spi'])}({sa['spi']})",
            f"     transform: {sa['transform']} , in use settings ={{Tunnel, Address preservation}}",
            f"     sa timing: remaining key lifetime (sec): ({sa['remaining']})",
            f"     configured lifetime (sec): {sa['configured_lifetime']}",
            f"     replay detection (counter based): {replay_window_text(sa['replay_window'])}",
            f"     replay detection (time based): {tbar_window_text(sa['tbar_window_ms'])}",
            f"     receive-only: {'yes' if sa['receive_only'] else 'no'}",
            f"     sender IDs: {', '.join(str(s) for s in sa['sender_ids']) or 'none'}",
            "",
        ]
    return "\n".join(lines) + "\n"


# --- show crypto gdoi gm replay -------------------------------------------------------------


def control_plane_replay(
    regs: Sequence[Registration], sadb: Sadb, now: float
) -> list[dict[str, Any]]:
    """Each group's anti-replay settings from its TEKs (the largest window of any SA, as
    the data path reports it) and the KS's pseudotime advanced by our clock."""
    out = []
    for r in regs:
        g = sadb.groups.get(r.group.number)
        if g is None or not g.active_teks(now):
            continue
        teks = g.active_teks(now)
        windows = [t.policy.tbar_window_ms for t in teks if t.policy.tbar_window_ms]
        replay = [t.policy.replay_window for t in teks if t.policy.replay_window]
        pseudotime = (
            g.pseudotime_ms + int((now - g.pseudotime_at) * 1000)
            if g.pseudotime_ms is not None
            else None
        )
        out.append({"group": g.group_number, "tbar_window_ms": max(windows) if windows else None,
                    "replay_window": max(replay) if replay else None, "pseudotime_ms": pseudotime,
                    "drops": None})  # fmt: skip
    return out


def show_replay(regs: Sequence[Registration], groups: Sequence[Mapping[str, Any]]) -> str:
    """``show crypto gdoi gm replay``; ``drops`` None: no data path, so no drop counters."""
    names = {r.group.number: r.group.name for r in regs}
    lines: list[str] = []
    for g in groups:
        drops = g.get("drops")
        pseudotime = g.get("pseudotime_ms")

        def dropped(kind: str, drops: Mapping[str, int] | None = drops) -> str:
            return str(drops.get(kind, 0)) if drops is not None else "n/a (no data path)"

        lines += [
            f"Anti-replay Information For Group {names.get(g['group'], str(g['group']))}:",
            "    Timebased Replay:",
            "      Replay Window      : " + tbar_window_text(g.get("tbar_window_ms")),
            "      Local Pseudotime   : "
            + (f"{pseudotime / 1000:.3f} secs" if pseudotime is not None else "not synchronised"),
            f"      Replay Drops       : {dropped('tbar')}",
            "    Counter-based Replay:",
            "      Window Size        : " + replay_window_text(g.get("replay_window")),
            f"      Replay Drops       : {dropped('replay')}",
            "",
        ]
    shown = {g["group"] for g in groups}
    for r in regs:
        if r.group.number not in shown:
            lines += [
                f"Anti-replay Information For Group {r.group.name}:",
                "    no SAs installed",
                "",
            ]
    return "\n".join(lines) + "\n"


# --- show crypto gdoi feature ---------------------------------------------------------------


def _feature_groups(
    regs: Sequence[Registration], me: LocalMember
) -> list[tuple[str, Sequence[Device], Sequence[Device]]]:
    """Per group: the KS we registered with (its version from phase 1), and ourselves."""
    out: list[tuple[str, Sequence[Device], Sequence[Device]]] = []
    for r in regs:
        ks: list[Device] = []
        if r.registered_ks is not None:
            try:
                version: SoftwareVersion | None = SoftwareVersion.parse(r.ks_version)
            except ValueError:
                version = None  # "unknown": the KS sent no version vendor ID
            ks.append((r.registered_ks, version))
        out.append((r.group.name, ks, [(me.address, me.version)]))
    return out


def show_feature(regs: Sequence[Registration], me: LocalMember, features: Sequence[Feature]) -> str:
    return feature_tables(features, _feature_groups(regs, me))


def feature_json(
    regs: Sequence[Registration], me: LocalMember, features: Sequence[Feature]
) -> dict[str, object]:
    return feature_data(features, _feature_groups(regs, me))
