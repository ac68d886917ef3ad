"""Text of the KS's ``show crypto gdoi ...`` commands, IOS-shaped, plus their ``--json`` data.

Pure functions from the KS's state (groups, COOP's description, counters) to text; the
formatting both roles share is in :mod:`gdoid.showtext`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address
from typing import Any

from gdoid.keyserver.authorization import describe as describe_authorization
from gdoid.keyserver.group import TBAR_REKEY_INTERVAL, Group, Member
from gdoid.protocol.version import SoftwareVersion, format_version
from gdoid.showtext import (
    FEATURES,
    Device,
    Feature,
    feature_data,
    feature_tables,
    kek_policy_lines,
    kek_spi_text,
    replay_window_text,
    tbar_window_text,
    tek_replay_lines,
    tek_sa_lines,
    tek_spi_text,
    timestamp,
)


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


def member_data(m: Member) -> dict[str, Any]:
    return {
        "address": str(m.address),
        "key_server": str(m.ks_address) if m.ks_address is not None else None,
        "identity": m.identity,
        "version": format_version(m.version),
        "registered_at": m.registered_at,
        "kek_spi": m.kek_spi.hex() if m.kek_spi else None,
        "tek_spis": [f"{s:08x}" for s in m.tek_spis],
        "sender_ids": list(m.sender_ids),
        "registrations": m.registrations,
        "rekeys_sent": m.rekeys_sent,
        "acks_received": m.acks_received,
        "missed_rekeys": m.missed_rekeys,
    }


def show_gdoi(
    groups: list[Group],
    ks_address: IPv4Address,
    version: SoftwareVersion,
    now: float,
    role: str = "Primary",
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
            *kek_policy_lines(k, now),
            f"    Sequence Number          : {g.seq}",
            "",
            "TEK POLICY for the current KS-Policy ACEs:",
        ]
        for t in g.current_teks(now):
            lines += [
                f"  sa ipsec {t.policy.sa_number}:",
                *tek_sa_lines(t, now),
                *tek_replay_lines(t),
                "        encaps: ENCAPS_TUNNEL, address preservation",
            ]
        lines.append("")
    return "\n".join(lines)


def _authorization_lines(g: Group) -> list[str]:
    first, *rest = describe_authorization(g.config.authorization)
    return [f"    Authorization            : {first}"] + [
        f"                               {x}" for x in rest
    ]


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
            {
                "number": sa.number,
                "replay_window": sa.replay_window,
                "tbar_window_ms": sa.tbar_window_ms,
            }
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
                "      Counter-based Replay Window : " + replay_window_text(sa["replay_window"]),
                "      Time-based Replay Window    : " + tbar_window_text(sa["tbar_window_ms"]),
            ]
        lines += [f"    Next Rekey In        : {max(0, int(d['next_rekey_in']))} secs", ""]
    return "\n".join(lines) + "\n"


def show_members(groups: list[Group], ks_address: IPv4Address, now: float) -> str:
    """``show crypto gdoi ks members``: ``Key Server ID`` is the KS each GM registered with
    (in COOP, members learned from a peer's ANN show that peer; rows from before the KS
    recorded it show this KS)."""
    lines = ["", "Group Member Information :", ""]
    for g in groups:
        lines.append(f"Number of rekeys sent for group {g.name} : {g.seq - 1}")
        lines.append("")
        for m in sorted(g.members.values(), key=lambda m: m.address):
            lines += [
                f"Group Member ID    : {m.address}    GM Version: {format_version(m.version)}",
                f" Group ID          : {g.number}",
                f" Group Name        : {g.name}",
                f" Key Server ID     : {m.ks_address or ks_address}",
                f" Identity          : {m.identity}",
                f" Registered        : {timestamp(m.registered_at)}",
                f" Registrations     : {m.registrations}",
                f" Rekey Acks missed : {m.missed_rekeys}",
                f" KEK SPI           : {kek_spi_text(m.kek_spi)}",
                f" TEK SPIs          : {', '.join(tek_spi_text(s) for s in m.tek_spis)}",
                f" Sender IDs        : {', '.join(str(s) for s in m.sender_ids) or 'none'}",
                "",
            ]
    return "\n".join(lines)


def _feature_groups(
    groups: list[Group], key_servers: Sequence[Device]
) -> list[tuple[str, Sequence[Device], Sequence[Device]]]:
    return [
        (g.name, key_servers, [(m.address, m.version) for m in g.members.values()]) for g in groups
    ]


def show_feature(
    groups: list[Group],
    key_servers: Sequence[tuple[IPv4Address, SoftwareVersion | None]],
    now: float,
    features: Sequence[Feature] = FEATURES[:1],
) -> str:
    """The exact table of getvpn-features §2.4 per feature (``features``: all of them for
    ``show crypto gdoi feature`` without a name)."""
    return feature_tables(features, _feature_groups(groups, key_servers))


def feature_json(
    groups: list[Group], key_servers: Sequence[Device], features: Sequence[Feature]
) -> dict[str, object]:
    return feature_data(features, _feature_groups(groups, key_servers))


def show_coop(groups: list[Group], role: Mapping[str, Any]) -> str:
    """``show crypto gdoi ks coop`` from COOP's description of this KS and its peers."""
    lines = []
    for g in groups:
        lines += [
            f"Crypto Gdoi Group Name :{g.name}",
            f"        Local Address: {role['address']}",
            f"        Local Priority: {role['priority']}",
            f"        Local KS Role: {role['role']} , Local KS Status: Alive",
            f"        Local KS version: {role['version']}",
            f"        Primary KS: {role['primary'] or 'none elected'}",
            f"        Antireplay Sequence Number: {g.seq}",
            "",
            "        Peer Sessions:",
        ]
        for i, p in enumerate(role["peers"], 1):
            heard = f"{p['last_heard']} secs ago" if p["last_heard"] is not None else "never"
            lines += [
                f"        Session {i}:",
                f"                Peer Address: {p['address']}",
                f"                Peer Version: {p['version']}",
                f"                Peer Priority: {p['priority']}",
                f"                Peer KS Role: {p['role']} , Peer KS Status: {p['status']}",
                f"                Last heard: {heard}",
                f"                IKE status: {p['ike_status']}",
                f"                Authentication: {p.get('auth') or 'none'}",
                "                Counters:",
                f"                    Ann msgs sent: {p['ann_sent']}",
                f"                    Ann msgs recv: {p['ann_received']}",
                f"                    Ann msgs rejected: {p['ann_rejected']}",
                *(
                    f"                      {reason}: {n}"
                    for reason, n in sorted(p.get("rejected", {}).items())
                ),
            ]
            if p.get("sync"):
                lines.append(f"                Sync refused: {p['sync']}")
        lines.append("")
    return "\n".join(lines)


def standalone_role(address: IPv4Address, version: SoftwareVersion) -> dict[str, Any]:
    """What ``show crypto gdoi ks coop`` says of a KS without COOP."""
    return {
        "address": str(address),
        "priority": None,
        "role": "Primary (standalone)",
        "version": str(version),
        "primary": str(address),
        "peers": [],
    }


def show_counters(counters: Mapping[str, int]) -> str:
    """``show gdoid counters``: one ``name : value`` line per counter, by name."""
    return "\n".join(f"{k:24s}: {v}" for k, v in sorted(counters.items())) + "\n"
