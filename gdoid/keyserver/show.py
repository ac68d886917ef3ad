"""Text of the KS's ``show crypto gdoi ...`` commands, IOS-shaped, plus JSON data."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Any

from gdoid.keyserver.authorization import describe as describe_authorization
from gdoid.keyserver.group import TBAR_REKEY_INTERVAL, Group
from gdoid.protocol.version import SoftwareVersion, format_version, supports_removal_and_replace

FEATURES = ("gm-removal", "policy-replace")


def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def kek_spi_text(spi: bytes | None) -> str:
    return "0x" + spi.hex().upper() if spi else "none"


def tek_spi_text(spi: int) -> str:
    return f"0x{spi:08X}"


def group_data(g: Group, now: float) -> dict[str, Any]:
    return {
        "name": g.name,
        "number": g.number,
        "kek_spi": g.kek.spi.hex(),
        "kek_remaining": g.kek.remaining(now),
        "seq": g.seq,
        "tek_spis": [f"{t.spi:08x}" for t in g.current_teks(now)],
        "teks": [
            {
                "spi": f"{t.spi:08x}",
                "sa_ipsec": t.policy.sa_number,
                "transform": t.policy.transform.name,
                "remaining": t.remaining(now),
                "configured_lifetime": t.policy.configured_lifetime,
            }
            for t in g.current_teks(now)
        ],
        "members": [member_data(m) for m in g.members.values()],
        "authorization": {
            "addresses": [str(n) for n in g.config.authorization.addresses],
            "identities": [str(p) for p in g.config.authorization.identities],
        },
    }


def member_data(m: Any) -> dict[str, Any]:
    return {
        "address": str(m.address),
        "identity": m.identity,
        "version": format_version(m.version),
        "registered_at": m.registered_at,
        "kek_spi": m.kek_spi.hex() if m.kek_spi else None,
        "tek_spis": [f"{s:08x}" for s in m.tek_spis],
        "sender_ids": list(m.sender_ids),
        "registrations": m.registrations,
        "rekeys_sent": getattr(m, "rekeys_sent", 0),
        "acks_received": getattr(m, "acks_received", 0),
        "missed_rekeys": getattr(m, "missed_rekeys", 0),
    }


def show_gdoi(
    groups: list[Group], ks_address: IPv4Address, version: SoftwareVersion, now: float, role: str = "Primary"
) -> str:
    lines: list[str] = []
    for g in groups:
        k = g.kek
        lines += [
            "GROUP INFORMATION",
            "",
            f"    Group Name               : {g.name}",
            f"    Group Identity           : {g.number}",
            "    Group Type               : GDOI (ISAKMP)",
            "    Crypto Path              : ipv4",
            "    Key Management Path      : ipv4",
            f"    Group Members            : {len(g.members)}",
            "    IPSec SA Direction       : Both",
            f"    Group Rekey Lifetime     : {k.configured_lifetime} secs",
            f"    Rekey Retransmit Period  : {g.config.rekey.retransmit_interval:g} secs",
            f"    Rekey Retransmit Attempts: {g.config.rekey.retransmit_count}",
            *_authorization_lines(g),
            "",
            f"    Group Server list        : {ks_address} (local, {role}, version {version})",
            "",
            "KEK POLICY:",
            "    Rekey Transport Type     : Unicast",
            f"    Lifetime (secs)          : {k.remaining(now)}",
            "    Encrypt Algorithm        : AES",
            f"    Key Size                 : {k.key_bits}",
            f"    Sig Hash Algorithm       : {k.sig_hash.name}",
            f"    Sig Algorithm            : {k.sig_algorithm.name}",
            f"    Sig Key Length (bits)    : {k.sig_key_bits}",
            f"    KEK SPI                  : {kek_spi_text(k.spi)}",
            f"    Sequence Number          : {g.seq}",
            "",
            "TEK POLICY for the current KS-Policy ACEs:",
        ]
        for t in g.current_teks(now):
            p = t.policy
            lines += [
                f"  sa ipsec {p.sa_number}:",
                f"    Match                    : {p.selector.describe()}",
                "    IPsec SA:",
                f"        spi: {tek_spi_text(t.spi)}({t.spi})",
                f"        transform: {p.transform.name}",
                f"        sa timing:remaining key lifetime (sec): ({t.remaining(now)})",
                f"        configured lifetime (sec): {p.configured_lifetime}",
                "        Anti-Replay(Time Based) : "
                + (f"{p.tbar_window_ms} msec window" if p.tbar_window_ms else "disabled"),
                "        Anti-Replay(Counter Based) : "
                + (f"{p.replay_window}" if p.replay_window else "disabled"),
                f"        receive-only: {'yes' if p.receive_only else 'no'}",
                "        encaps: ENCAPS_TUNNEL, address preservation",
            ]
        lines.append("")
    return "\n".join(lines)


def _authorization_lines(g: Group) -> list[str]:
    first, *rest = describe_authorization(g.config.authorization)
    return [f"    Authorization            : {first}"] + [f"                               {x}" for x in rest]


def replay_data(g: Group, now: float) -> dict[str, Any]:
    """The group's replay settings in force: per-SA windows from its policy, TBAR pseudotime."""
    return {
        "group": g.name,
        "number": g.number,
        "tbar": g.tbar,
        "pseudotime_ms": g.pseudotime_ms(now) if g.tbar else None,
        "tbar_rekey_period": TBAR_REKEY_INTERVAL if g.tbar else None,
        "next_rekey_in": g.next_rekey_at() - now,
        "sa_ipsec": [
            {"number": sa.number, "replay_window": sa.replay_window, "tbar_window_ms": sa.tbar_window_ms}
            for sa in g.config.sa_ipsec
        ],
    }


def show_replay(groups: list[Group], now: float) -> str:
    """``show crypto gdoi ks replay``: what the KS configures, not packet counters
    (a KS has no data path; IOS prints zeros there)."""
    lines: list[str] = []
    for g in groups:
        d = replay_data(g, now)
        lines += [
            f"Anti-replay Information For Group {g.name}:",
            "    Timebased Replay:",
            "      Replay Value       : "
            + (f"{d['pseudotime_ms'] / 1000:.2f} secs" if g.tbar else "disabled"),
            "      TBAR Rekey Period  : "
            + (f"{d['tbar_rekey_period']} secs" if g.tbar else "n/a (no TBAR)"),
        ]
        for sa in d["sa_ipsec"]:
            lines += [
                f"    sa ipsec {sa['number']}:",
                "      Counter-based Replay Window : "
                + (str(sa["replay_window"]) if sa["replay_window"] else "disabled"),
                "      Time-based Replay Window    : "
                + (f"{sa['tbar_window_ms']} msec" if sa["tbar_window_ms"] else "disabled"),
            ]
        lines += [f"    Next Rekey In        : {max(0, int(d['next_rekey_in']))} secs", ""]
    return "\n".join(lines) + "\n"


def show_members(groups: list[Group], ks_address: IPv4Address, now: float) -> str:
    lines = ["", "Group Member Information :", ""]
    for g in groups:
        lines.append(f"Number of rekeys sent for group {g.name} : {g.seq - 1}")
        lines.append("")
        for m in sorted(g.members.values(), key=lambda m: m.address):
            lines += [
                f"Group Member ID    : {m.address}    GM Version: {format_version(m.version)}",
                f" Group ID          : {g.number}",
                f" Group Name        : {g.name}",
                f" Key Server ID     : {ks_address}",
                f" Identity          : {m.identity}",
                f" Registered        : {_ts(m.registered_at)}",
                f" Registrations     : {m.registrations}",
                f" Rekey Acks missed : {m.missed_rekeys}",
                f" KEK SPI           : {kek_spi_text(m.kek_spi)}",
                f" TEK SPIs          : {', '.join(tek_spi_text(s) for s in m.tek_spis)}",
                f" Sender IDs        : {', '.join(str(s) for s in m.sender_ids) or 'none'}",
                "",
            ]
    return "\n".join(lines)


def show_feature(
    groups: list[Group],
    key_servers: list[tuple[IPv4Address, SoftwareVersion | None]],
    now: float,
) -> str:
    """The exact table of getvpn-features §2.4 (same for both features: one version gate)."""
    lines: list[str] = []
    for g in groups:
        lines += ["", f" Group Name: {g.name}", " Key Server ID Version Feature Supported"]
        for addr, version in key_servers:
            lines.append(f" {addr} {format_version(version)} {_yes_no(version)}")
        lines += ["", " Group Member ID Version Feature Supported"]
        for m in sorted(g.members.values(), key=lambda m: m.address):
            lines.append(f" {m.address} {format_version(m.version)} {_yes_no(m.version)}")
    return "\n".join(lines) + "\n"


def _yes_no(version: SoftwareVersion | None) -> str:
    return "Yes" if supports_removal_and_replace(version) else "No"
