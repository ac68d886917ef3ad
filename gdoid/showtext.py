"""Formatting shared by the KS's and the GM's show commands (``keyserver/show.py``,
``groupmember/show.py``): SPIs, times, policy blocks, anti-replay settings and the
feature tables of getvpn-features §2.4 / §3.3.  Pure functions of values, no state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address

from gdoid.protocol.policy import Kek, Tek
from gdoid.protocol.version import SoftwareVersion, format_version, supports_removal_and_replace


@dataclass(frozen=True)
class Feature:
    """A version-gated GET VPN feature, as ``show crypto gdoi feature NAME`` names it."""

    name: str
    supported: Callable[[SoftwareVersion | None], bool]


# Every feature gdoid knows; ``show crypto gdoi feature`` without a name prints them all.
FEATURES: tuple[Feature, ...] = (
    Feature("gm-removal", supports_removal_and_replace),
    Feature("policy-replace", supports_removal_and_replace),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)

Device = tuple[IPv4Address, SoftwareVersion | None]


def timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def kek_spi_text(spi: bytes | None) -> str:
    return "0x" + spi.hex().upper() if spi else "none"


def tek_spi_text(spi: int) -> str:
    return f"0x{spi:08X}"


def counts_text(counts: Mapping[str, int]) -> str:
    """``name n, name n`` sorted by name, or ``none``."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def tbar_window_text(window_ms: int | None) -> str:
    return f"{window_ms} msec" if window_ms else "disabled"


def tbar_interval_text(window_ms: int | None) -> str:
    """IOS's ``Anti-Replay(Time Based) : 5 sec interval``; msec for a sub-second window."""
    if not window_ms:
        return "disabled"
    if window_ms % 1000 == 0:
        return f"{window_ms // 1000} sec interval"
    return f"{window_ms} msec interval"


def replay_window_text(window: int | None) -> str:
    return str(window) if window else "disabled"


def kek_policy_lines(kek: Kek, now: float) -> list[str]:
    """The ``KEK POLICY:`` block (without its heading), the same on KS and GM."""
    return [
        "    Rekey Transport Type     : Unicast",
        f"    Lifetime (secs)          : {kek.remaining(now)}",
        "    Encrypt Algorithm        : AES",
        f"    Key Size                 : {kek.key_bits}",
        f"    Sig Hash Algorithm       : {kek.sig_hash.name}",
        f"    Sig Algorithm            : {kek.sig_algorithm.name}",
        f"    Sig Key Length (bits)    : {kek.sig_key_bits}",
        f"    KEK SPI                  : {kek_spi_text(kek.spi)}",
    ]


def tek_sa_lines(tek: Tek, now: float) -> list[str]:
    """One TEK of ``TEK POLICY for the current KS-Policy ACEs:``, the same on KS and GM."""
    p = tek.policy
    return [
        f"    Match                    : {p.selector.describe()}",
        "    IPsec SA:",
        f"        spi: {tek_spi_text(tek.spi)}({tek.spi})",
        f"        transform: {p.transform.name}",
        f"        sa timing:remaining key lifetime (sec): ({tek.remaining(now)})",
        f"        configured lifetime (sec): {p.configured_lifetime}",
    ]


def tek_replay_lines(tek: Tek) -> list[str]:
    p = tek.policy
    return [
        "        Anti-Replay(Time Based) : " + tbar_interval_text(p.tbar_window_ms),
        "        Anti-Replay(Counter Based) : " + replay_window_text(p.replay_window),
        f"        receive-only: {'yes' if p.receive_only else 'no'}",
    ]


def feature_by_name(name: str) -> Feature:
    return next(f for f in FEATURES if f.name == name)


def feature_table(
    feature: Feature, group: str, key_servers: Iterable[Device], members: Iterable[Device]
) -> list[str]:
    """The exact table of getvpn-features §2.4 for one group."""
    lines = ["", f" Group Name: {group}", " Key Server ID Version Feature Supported"]
    lines += [f" {a} {format_version(v)} {_yes_no(feature, v)}" for a, v in key_servers]
    lines += ["", " Group Member ID Version Feature Supported"]
    lines += [f" {a} {format_version(v)} {_yes_no(feature, v)}" for a, v in sorted(members)]
    return lines


def feature_tables(
    features: Sequence[Feature], groups: Iterable[tuple[str, Sequence[Device], Sequence[Device]]]
) -> str:
    """``show crypto gdoi feature [NAME]``: one feature's tables as §2.4 prints them; for
    several (no name given), each feature's under a ``Feature:`` heading line."""
    groups = list(groups)
    lines: list[str] = []
    for f in features:
        if len(features) > 1:
            lines += ["", f" Feature: {f.name}"]
        for name, key_servers, members in groups:
            lines += feature_table(f, name, key_servers, members)
    return "\n".join(lines) + "\n"


def feature_data(
    features: Sequence[Feature], groups: Iterable[tuple[str, Sequence[Device], Sequence[Device]]]
) -> dict[str, object]:
    """The same for ``--json``: per feature, per group, each device's version and support."""

    def rows(f: Feature, devices: Sequence[Device]) -> list[dict[str, object]]:
        return [
            {"address": str(a), "version": format_version(v), "supported": f.supported(v)}
            for a, v in devices
        ]

    groups = list(groups)
    return {
        "features": {
            f.name: [
                {"group": n, "key_servers": rows(f, ks), "members": rows(f, sorted(gms))}
                for n, ks, gms in groups
            ]
            for f in features
        }
    }


def _yes_no(feature: Feature, version: SoftwareVersion | None) -> str:
    return "Yes" if feature.supported(version) else "No"
