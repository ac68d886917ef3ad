"""The group member's sections: ``[gm]``, its ``[[group]]`` (servers, KS pinning)
and ``[dataplane]``."""

from __future__ import annotations

import re
from typing import Any

from gdoid.config.model import (
    GM_CONTROL_SOCKET,
    AuthConfig,
    DataplaneConfig,
    GmConfig,
    GmGroupConfig,
    KsPop,
)
from gdoid.config.schema_shared import identity_pattern, parse_auth, parse_groups, parse_ike
from gdoid.config.table import Context, Table, unicast_address
from gdoid.protocol.constants import GDOI_PORT

_TUN_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # Linux IFNAMSIZ - 1

_GM_KEYS = (
    "address",
    "port",
    "software_version",
    "control_socket",
    "control_group",
    "keylog_dir",
    "fail_close",
    "registration_timeout",
    "rereg_jitter",
    "tun_name",
)


_GM_GROUP_KEYS = (
    "name",
    "number",
    "servers",
    "server_port",
    "ks_identities",
    "ks_pop",
    "rekey_key_sha256",
)


def _fingerprint(g: Table, key: str) -> bytes | None:
    if not g.has(key):
        return None
    text = g.string(key).strip().lower().replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise g.err(key, "must be the SHA-256 of the rekey public key (DER): 64 hex digits")
    return bytes.fromhex(text)


def _parse_gm_group(g: Table) -> GmGroupConfig:
    ctx = g.ctx
    identities = g.array("ks_identities", lambda p, v: identity_pattern(ctx, p, v), ())
    pop = g.enum("ks_pop", KsPop, KsPop.NONE)
    pin = _fingerprint(g, "rekey_key_sha256")
    if pop == KsPop.CERTIFICATE and not identities:
        raise g.err("ks_pop", '"certificate" needs ks_identities: the KS certificates to accept')
    if pop == KsPop.REKEY_KEY and pin is None:
        raise g.err("ks_pop", '"rekey-key" needs rekey_key_sha256: the rekey key to accept')
    return GmGroupConfig(
        name=g.name("name"),
        number=g.integer("number", 1, 2**32 - 1),
        servers=g.array("servers", lambda p, v: unicast_address(ctx, p, v)),
        server_port=g.integer("server_port", 1, 65535, GDOI_PORT),
        ks_identities=identities,
        ks_pop=pop,
        rekey_key_sha256=pin,
    )


def _tun_name(gm: Table) -> str:
    v = gm.string("tun_name", "gdoi0")
    if not _TUN_RE.fullmatch(v):
        raise gm.err("tun_name", "must be 1-15 characters from A-Z a-z 0-9 _ . -")
    return v


def _parse_dataplane(root: Table) -> DataplaneConfig:
    t = root.table(
        "dataplane",
        (
            "enabled",
            "wan_interface",
            "mtu",
            "icmp_source",
            "icmp6_source",
            "mark",
            "table",
            "local_table",
        ),
    )
    if t is None:
        return DataplaneConfig()
    wan = t.string("wan_interface", "") or None
    if wan is not None and not _TUN_RE.fullmatch(wan):
        raise t.err("wan_interface", "must be an interface name (1-15 characters)")
    return DataplaneConfig(
        enabled=t.boolean("enabled", False),
        wan_interface=wan,
        mtu=t.integer("mtu", 676, 9000, 1500),
        icmp_source=t.address("icmp_source") if t.has("icmp_source") else None,
        icmp6_source=t.address6("icmp6_source") if t.has("icmp6_source") else None,
        mark=t.integer("mark", 1, 2**32 - 1, 0x6764),
        table=t.integer("table", 1, 2**31 - 1, 26468),
        local_table=t.integer("local_table", 1, 2**31 - 1, 26469),
    )


def _gm_groups(root: Table, auth: AuthConfig) -> tuple[GmGroupConfig, ...]:
    groups = parse_groups(root, _GM_GROUP_KEYS, _parse_gm_group)
    for i, g in enumerate(groups):
        if g.ks_pop == KsPop.CERTIFICATE and auth.pki is None:
            # The KS certificate in message 4 is checked against [auth.pki] ca_file.
            raise root.ctx.error(
                f"group[{i}].ks_pop", '"certificate" needs [auth.pki] (its ca_file)'
            )
    return tuple(groups)


def build_gm(ctx: Context, data: dict[str, Any]) -> GmConfig:
    """A whole ``gm.toml``, parsed into ``data``."""
    root = Table(ctx, data, "", ("gm", "ike", "auth", "group", "dataplane"))
    gm = root.req_table("gm", _GM_KEYS)
    return GmConfig(
        address=gm.address("address"),
        port=gm.integer("port", 1, 65535, GDOI_PORT),
        software_version=gm.version("software_version"),
        control_socket=gm.req_path("control_socket", GM_CONTROL_SOCKET),
        control_group=gm.host_group("control_group"),
        keylog_dir=gm.path("keylog_dir", None),
        fail_close=gm.boolean("fail_close", False),
        registration_timeout=gm.number("registration_timeout", 0.1, 300, 10.0),
        rereg_jitter=gm.number("rereg_jitter", 0.0, 0.5, 0.1),
        tun_name=_tun_name(gm),
        ike=parse_ike(root),
        auth=(auth := parse_auth(root)),
        groups=_gm_groups(root, auth),
        dataplane=_parse_dataplane(root),
    )
