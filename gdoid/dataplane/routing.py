"""The policy routing a group member's userspace data path needs.

With address preservation the ESP packets a GM sends carry the *inner*
addresses, so plain routing cannot tell "plaintext to protect" from "ESP to
send".  Three rules and two tables sort it out::

    pref  99  iif <wan> ipproto esp lookup L   # (only with a WAN interface)
    pref 100  fwmark M lookup main             # our raw socket's ESP / clear output
    pref 101  lookup T                         # protected prefixes -> TUN

    table T:  <protected prefix> dev <tun>     # one per policy prefix
              throw <connected prefix>         # the GM's own networks never enter the TUN
    table L:  local 0.0.0.0/0 dev lo           # ESP for hosts behind us is delivered locally

IPv6 prefixes get the same rules and tables in the IPv6 routing (``ip -6 rule``,
``ip -6 route``; table L then holds ``local ::/0 dev lo``); IPv6 forwarding is
switched on only once an IPv6 prefix is protected.

Unmarked traffic (from the LAN, or the GM itself) for a protected prefix goes
into the TUN; the forwarder's raw send socket carries mark M, so what it emits
is routed by the main table (the WAN routes).  ESP that arrives on the WAN for
an address behind the GM is handed to the local raw ESP socket instead of
being forwarded in the clear-text direction.  A ``throw`` (or no match) in T
falls through to the main table.

Everything is done over netlink (pyroute2), never with ``ip`` processes.  The
calls block: from asyncio run them in a worker thread.  :meth:`RouteSetup.remove`
is idempotent and also registered with :mod:`atexit` while applied.
"""

from __future__ import annotations

import atexit
import errno
import socket
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gdoid.log import get_logger

DEFAULT_MARK = 0x6764
DEFAULT_TABLE = 26468
DEFAULT_LOCAL_TABLE = 26469
PRIO_WAN_ESP = 99
PRIO_MARK = 100
PRIO_TUN = 101
MAIN_TABLE = 254
IPPROTO_ESP = 50
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_HOST = 254
RTN_UNICAST = 1
RTN_THROW = 9

_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV)

log = get_logger("gdoid.dataplane")


Network = IPv4Network | IPv6Network
_FAMILIES = ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))


def _networks(prefixes: Iterable[Network | str]) -> set[Network]:
    return {ip_network(p, strict=False) for p in prefixes}


def _order(net: Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen


def _family(net: Network) -> int:
    return socket.AF_INET6 if net.version == 6 else socket.AF_INET


def write_sysctl(parts: Iterable[str], value: str, root: Path = Path("/proc/sys")) -> None:
    """Write e.g. ``("net", "ipv4", "ip_forward")`` (parts, as names may hold dots).

    A value that is already right is not written: containers mount /proc/sys
    read-only and set these at creation time.
    """
    path = root.joinpath(*parts)
    try:
        if path.read_text().strip() == value:
            return
    except OSError:
        pass
    path.write_text(f"{value}\n")


class RouteSetup:
    """Apply / update / remove a GM's rules, tables and sysctls (see the module doc)."""

    def __init__(
        self,
        tun_name: str,
        prefixes: Iterable[Network | str] = (),
        *,
        wan_interface: str | None = None,
        mark: int = DEFAULT_MARK,
        table: int = DEFAULT_TABLE,
        local_table: int = DEFAULT_LOCAL_TABLE,
        sysctl_root: Path = Path("/proc/sys"),
    ) -> None:
        if table == local_table:
            raise ValueError("the TUN table and the local table must differ")
        self.tun_name = tun_name
        self.prefixes = _networks(prefixes)
        self.wan_interface = wan_interface
        self.mark = mark
        self.table = table
        self.local_table = local_table
        self.sysctl_root = sysctl_root
        self.applied = False
        self._v6_applied = False  # IPv6 rules in place (added once an IPv6 prefix shows up)
        self._atexit = False

    # --- public ---------------------------------------------------------

    def apply(self, prefixes: Iterable[Network | str] | None = None) -> None:
        """Install everything, first clearing leftovers of an earlier run (idempotent)."""
        if prefixes is not None:
            self.prefixes = _networks(prefixes)
        with IPRoute() as ipr:
            tun = self._ifindex(ipr, self.tun_name)
            if tun is None:
                raise ValueError(f"TUN interface {self.tun_name!r} does not exist")
            wan = None
            if self.wan_interface is not None:
                wan = self._ifindex(ipr, self.wan_interface)
                if wan is None:
                    raise ValueError(f"WAN interface {self.wan_interface!r} does not exist")
            self._sysctls()
            # Leftovers of a crashed run would duplicate rules: start clean.
            self._remove_rules(ipr)
            self._flush(ipr, self.table)
            self._flush(ipr, self.local_table)
            # Tables first, rules last, so no packet sees a half-filled table T.
            self._sync_tun_table(ipr, tun)
            if wan is not None:
                lo = self._ifindex(ipr, "lo")
                for family, anyaddr in self._families():
                    ipr.route(
                        "replace",
                        family=family,
                        dst=f"{anyaddr}/0",
                        type="local",
                        oif=lo,
                        table=self.local_table,
                        scope=RT_SCOPE_HOST,
                    )
            for family, _any in self._families():
                for spec in self._rule_specs():
                    ipr.rule("add", family=family, **spec)
            self._v6_applied = self._v6
        self.applied = True
        if not self._atexit:
            atexit.register(self.remove)
            self._atexit = True
        log.info(
            "dataplane_routes_applied",
            tun=self.tun_name,
            wan=self.wan_interface,
            prefixes=sorted(str(p) for p in self.prefixes),
        )

    def update(self, prefixes: Iterable[Network | str]) -> None:
        """Replace the TUN routes with ``prefixes`` (and refresh the connected throws)."""
        self.prefixes = _networks(prefixes)
        if not self.applied:
            return
        with IPRoute() as ipr:
            tun = self._ifindex(ipr, self.tun_name)
            if tun is None:
                raise ValueError(f"TUN interface {self.tun_name!r} does not exist")
            if self._v6 and not self._v6_applied:
                self._add_v6(ipr)
            self._sync_tun_table(ipr, tun)
        log.info("dataplane_routes_updated", prefixes=sorted(str(p) for p in self.prefixes))

    def remove(self) -> None:
        """Delete the rules and flush both tables; safe to call any number of times."""
        try:
            with IPRoute() as ipr:
                self._remove_rules(ipr)
                self._flush(ipr, self.table)
                self._flush(ipr, self.local_table)
        finally:
            self.applied = False
            if self._atexit:
                atexit.unregister(self.remove)
                self._atexit = False

    def connected_prefixes(self, ipr: IPRoute | None = None) -> set[Network]:
        """The prefixes of every IPv4 and IPv6 address on this host, except the TUN's."""
        if ipr is None:
            with IPRoute() as own:
                return self.connected_prefixes(own)
        tun = self._ifindex(ipr, self.tun_name)
        out: set[Network] = set()
        for family, _any in _FAMILIES:
            for msg in ipr.get_addr(family=family):
                if msg["index"] == tun:
                    continue
                address = msg.get("address") or msg.get("local")
                if address:
                    out.add(ip_network(f"{address}/{msg['prefixlen']}", strict=False))
        return out

    @property
    def _v6(self) -> bool:
        return any(p.version == 6 for p in self.prefixes)

    def _families(self) -> list[tuple[int, str]]:
        """The families whose rules are installed: IPv4 always, IPv6 with an IPv6 prefix."""
        return list(_FAMILIES) if self._v6 else [_FAMILIES[0]]

    def _add_v6(self, ipr: IPRoute) -> None:
        """The IPv6 half of :meth:`apply`, when the first IPv6 prefix comes with an update."""
        self._sysctls()
        if self.wan_interface is not None:
            ipr.route(
                "replace", family=socket.AF_INET6, dst="::/0", type="local",
                oif=self._ifindex(ipr, "lo"), table=self.local_table, scope=RT_SCOPE_HOST,
            )  # fmt: skip
        for spec in self._rule_specs():
            ipr.rule("add", family=socket.AF_INET6, **spec)
        self._v6_applied = True

    # --- internals ------------------------------------------------------

    def _rule_specs(self) -> list[dict[str, Any]]:
        specs: list[dict[str, Any]] = []
        if self.wan_interface is not None:
            specs.append(
                dict(
                    priority=PRIO_WAN_ESP,
                    iifname=self.wan_interface,
                    ip_proto=IPPROTO_ESP,
                    table=self.local_table,
                )
            )
        specs.append(dict(priority=PRIO_MARK, fwmark=self.mark, table=MAIN_TABLE))
        specs.append(dict(priority=PRIO_TUN, table=self.table))
        return specs

    def _ours(self, rule: Any) -> bool:
        # pyroute2 is untyped: its message attributes are plain values, compared as objects.
        prio: object = rule.get("priority")
        table: object = rule.get("table")
        fwmark: object = rule.get("fwmark")
        if prio == PRIO_MARK:
            return table == MAIN_TABLE and fwmark == self.mark
        if prio == PRIO_TUN:
            return table == self.table
        if prio == PRIO_WAN_ESP:
            return table == self.local_table
        return False

    def _remove_rules(self, ipr: IPRoute) -> None:
        self._v6_applied = False
        for family, _any in _FAMILIES:
            self._remove_family_rules(ipr, family)

    def _remove_family_rules(self, ipr: IPRoute, family: int) -> None:
        for rule in ipr.get_rules(family=family):
            if not self._ours(rule):
                continue
            spec: dict[str, Any] = dict(
                family=family, priority=rule.get("priority"), table=rule.get("table")
            )
            for key in ("fwmark", "iifname", "ip_proto"):
                if rule.get(key) is not None:
                    spec[key] = rule.get(key)
            try:
                ipr.rule("del", **spec)
            except NetlinkError as e:
                if e.code not in _GONE:
                    raise

    def _flush(self, ipr: IPRoute, table: int) -> None:
        for family, _any in _FAMILIES:
            for route in ipr.get_routes(family=family, table=table):
                self._del_route(ipr, route)

    def _del_route(self, ipr: IPRoute, route: Any) -> None:
        family = route["family"]
        anyaddr = "::" if family == socket.AF_INET6 else "0.0.0.0"
        spec: dict[str, Any] = dict(
            family=family,
            dst=f"{route.get('dst') or anyaddr}/{route['dst_len']}",
            table=route.get("table"),
            type=route["type"],
            scope=route["scope"],
        )
        try:
            ipr.route("del", **spec)
        except NetlinkError as e:
            if e.code not in _GONE:
                raise

    def _sync_tun_table(self, ipr: IPRoute, tun: int) -> None:
        throws = self.connected_prefixes(ipr)
        # The GM's own networks win over a policy prefix that equals one of them.
        wanted = {p for p in self.prefixes if p not in throws}
        for p in self.prefixes - wanted:
            log.warning("dataplane_prefix_is_connected", prefix=str(p))
        if not self._v6:
            throws = {t for t in throws if t.version == 4}
        for family, anyaddr in _FAMILIES:
            for route in ipr.get_routes(family=family, table=self.table):
                net = ip_network(f"{route.get('dst') or anyaddr}/{route['dst_len']}")
                keep = (route["type"] == RTN_THROW and net in throws) or (
                    route["type"] == RTN_UNICAST and route.get("oif") == tun and net in wanted
                )
                if not keep:
                    self._del_route(ipr, route)
        for net in sorted(throws, key=_order):
            ipr.route(
                "replace", family=_family(net), dst=str(net), type="throw", table=self.table,
                scope=RT_SCOPE_UNIVERSE,
            )  # fmt: skip
        for net in sorted(wanted, key=_order):
            ipr.route("replace", family=_family(net), dst=str(net), oif=tun, table=self.table)

    def _sysctls(self) -> None:
        write_sysctl(("net", "ipv4", "ip_forward"), "1", self.sysctl_root)
        for dev in ("all", self.tun_name, self.wan_interface):
            if dev is not None:
                write_sysctl(("net", "ipv4", "conf", dev, "rp_filter"), "0", self.sysctl_root)
        if self._v6:
            write_sysctl(("net", "ipv6", "conf", "all", "forwarding"), "1", self.sysctl_root)

    @staticmethod
    def _ifindex(ipr: IPRoute, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return found[0] if found else None
