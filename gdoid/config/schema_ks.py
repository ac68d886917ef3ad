"""The key server's sections: ``[ks]``, its ``[[group]]`` (``kek``, ``rekey``,
``[[group.sa_ipsec]]`` with ``match``) and ``[coop]``."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any

from gdoid.config.model import (
    KS_CONTROL_SOCKET,
    KS_STATE_DIR,
    AuthConfig,
    CoopConfig,
    CoopPeer,
    IkeCipher,
    KekConfig,
    KsConfig,
    KsGroupConfig,
    RekeyPolicy,
    SaIpsec,
    TrafficSelectorConfig,
)
from gdoid.config.schema_authorization import parse_authorization
from gdoid.config.schema_shared import identity_pattern, parse_auth, parse_groups, parse_ike
from gdoid.config.table import Context, Table, duplicates, fmt_choices, is_int
from gdoid.protocol.constants import GDOI_PORT
from gdoid.protocol.transforms import SIG_HASHES, TEK_TRANSFORMS

PROTOCOL_NAMES: Mapping[str, int] = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17}


def _parse_selector(t: Table) -> TrafficSelectorConfig:
    proto_raw = t.get("protocol", "any")
    if isinstance(proto_raw, str) and proto_raw in PROTOCOL_NAMES:
        protocol = PROTOCOL_NAMES[proto_raw]
    elif is_int(proto_raw) and 0 <= proto_raw <= 255:
        protocol = int(proto_raw)
    else:
        raise t.err(
            "protocol", f"must be one of {fmt_choices(list(PROTOCOL_NAMES))} or an integer 0..255"
        )
    src_port = t.integer("src_port", 0, 65535, 0)
    dst_port = t.integer("dst_port", 0, 65535, 0)
    if (src_port or dst_port) and protocol not in (6, 17):
        key = "src_port" if src_port else "dst_port"
        raise t.err(key, "ports can only be matched with protocol tcp or udp")
    src, dst = t.any_network("src"), t.any_network("dst")
    if src.version != dst.version:
        # One ESP packet has one IP header: a mixed-family match could protect nothing.
        raise t.err("dst", f"is IPv{dst.version} but src is IPv{src.version}: use one family")
    return TrafficSelectorConfig(
        src=src,
        dst=dst,
        protocol=protocol,
        src_port=src_port,
        dst_port=dst_port,
    )


_SA_KEYS = (
    "number",
    "profile",
    "transform",
    "lifetime",
    "replay_window",
    "tbar_window_ms",
    "replay_time_window_size",
    "receive_only",
    "match",
)
_MATCH_KEYS = ("src", "dst", "protocol", "src_port", "dst_port")


def _parse_sa(t: Table) -> SaIpsec:
    return SaIpsec(
        number=t.integer("number", 1, 65535),
        profile=t.name("profile"),
        transform=t.lookup("transform", TEK_TRANSFORMS),
        lifetime=t.integer("lifetime", 20, 86400),
        match=_parse_selector(t.req_table("match", _MATCH_KEYS)),
        replay_window=t.opt_integer("replay_window", 64, 1024),
        tbar_window_ms=_tbar_window_ms(t),
        receive_only=t.boolean("receive_only", False),
    )


def _tbar_window_ms(t: Table) -> int | None:
    """The TBAR window: IOS's ``replay time window-size N`` (seconds) or ``tbar_window_ms``."""
    if t.has("replay_time_window_size"):
        if t.has("tbar_window_ms"):
            raise t.err("replay_time_window_size", "give either this or tbar_window_ms, not both")
        return t.integer("replay_time_window_size", 1, 100) * 1000
    return t.opt_integer("tbar_window_ms", 100, 3600000)


def _parse_kek(g: Table) -> KekConfig:
    t = g.req_table("kek", ("algorithm", "lifetime", "signing_key", "sig_hash"))
    return KekConfig(
        algorithm=t.enum("algorithm", IkeCipher, IkeCipher.AES_CBC_256),
        lifetime=t.integer("lifetime", 30, 2592000, 86400),
        signing_key=t.existing_file("signing_key", private=True),
        sig_hash=t.lookup("sig_hash", SIG_HASHES, "sha256"),
    )


def _parse_rekey(g: Table) -> RekeyPolicy:
    d = RekeyPolicy()
    t = g.table("rekey", ("lead_time", "retransmit_interval", "retransmit_count", "max_missed"))
    if t is None:
        return d
    return RekeyPolicy(
        lead_time=t.integer("lead_time", 1, 3600, d.lead_time),
        retransmit_interval=t.number("retransmit_interval", 0.05, 300, d.retransmit_interval),
        retransmit_count=t.integer("retransmit_count", 0, 10, d.retransmit_count),
        max_missed=t.integer("max_missed", 1, 100, d.max_missed),
    )


_KS_GROUP_KEYS = (
    "name",
    "number",
    "sender_id_bits",
    "activation_delay",
    "deactivation_delay",
    "kek",
    "rekey",
    "sa_ipsec",
    "authorization",
)


def _parse_ks_group(g: Table) -> KsGroupConfig:
    name = g.name("name")
    number = g.integer("number", 1, 2**32 - 1)
    kek = _parse_kek(g)
    rekey = _parse_rekey(g)
    sa_tables = g.tables("sa_ipsec", _SA_KEYS)
    if not sa_tables:
        raise g.err("sa_ipsec", "at least one [[group.sa_ipsec]] is required")
    sas = tuple(_parse_sa(t) for t in sa_tables)
    for n, path, first in duplicates(
        [(sa.number, t.sub("number")) for sa, t in zip(sas, sa_tables, strict=True)]
    ):
        raise g.ctx.error(path, f"duplicate sa ipsec number {n} (also in {first})")

    # Cross-field checks: a lead time at or past the lifetime would rekey in a loop.
    lifetimes = [(sa.lifetime, t.sub("lifetime")) for sa, t in zip(sas, sa_tables, strict=True)]
    lifetimes.append((kek.lifetime, f"{g.sub('kek')}.lifetime"))
    for life, where in lifetimes:
        if rekey.lead_time >= life:
            raise g.ctx.error(
                f"{g.sub('rekey')}.lead_time",
                f"{rekey.lead_time} must be less than the lifetime {life} at {where}",
            )
    shortest = min(sa.lifetime for sa in sas)
    delays = {}
    for key in ("activation_delay", "deactivation_delay"):
        delays[key] = g.integer(key, 0, 3600, 0)
        if delays[key] >= shortest:
            raise g.err(key, f"must be less than the shortest sa_ipsec lifetime ({shortest})")
    return KsGroupConfig(
        name=name,
        number=number,
        kek=kek,
        sa_ipsec=sas,
        rekey=rekey,
        sender_id_bits=g.integer("sender_id_bits", 1, 16, 8),
        activation_delay=delays["activation_delay"],
        deactivation_delay=delays["deactivation_delay"],
        authorization=parse_authorization(g),
    )


def _parse_coop(root: Table, own: IPv4Address, auth: AuthConfig) -> CoopConfig | None:
    t = root.table("coop", ("priority", "announce_interval", "peer"))
    if t is None:
        return None
    peers: list[CoopPeer] = []
    for p in t.tables("peer", ("address", "port", "psk_file", "identity")):
        address = p.address("address")
        port = p.integer("port", 1, 65535, GDOI_PORT)
        if address == own:
            raise p.err("address", f"{own} is this key server's own address")
        if any(q.address == address and q.port == port for q in peers):
            raise p.err("address", f"duplicate peer {address}:{port}")
        psk = p.secret("psk_file") if p.has("psk_file") else None
        # A GM key here would let every GM pose as this KS (issue 9 §2).
        if psk is not None and any(hmac.compare_digest(psk, e.key) for e in auth.psks):
            raise p.err(
                "psk_file", "is also an [[auth.psk]] (GM) key: a COOP peer needs a key of its own"
            )
        raw = p.get("identity", [])
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise p.err("identity", "must be a string or an array of strings")
        identities = tuple(
            identity_pattern(p.ctx, f"{p.sub('identity')}[{i}]", v) for i, v in enumerate(items)
        )
        if identities and auth.pki is None:
            raise p.err("identity", "a pinned certificate identity needs [auth.pki]")
        if psk is None and not identities:
            raise p.err(
                "address",
                "needs psk_file or identity: a COOP peer authenticates as a KS, not as a GM",
            )
        peers.append(CoopPeer(address=address, port=port, psk=psk, identities=identities))
    return CoopConfig(
        priority=t.integer("priority", 1, 255, 100),
        peers=tuple(peers),
        announce_interval=t.number("announce_interval", 0.1, 3600, 30.0),
    )


_KS_KEYS = (
    "address",
    "port",
    "software_version",
    "control_socket",
    "control_group",
    "state_dir",
    "keylog_dir",
    "max_half_open",
)


def build_ks(ctx: Context, data: dict[str, Any]) -> KsConfig:
    """A whole ``ks.toml``, parsed into ``data``."""
    root = Table(ctx, data, "", ("ks", "ike", "auth", "group", "coop"))
    ks = root.req_table("ks", _KS_KEYS)
    address = ks.address("address")
    # Keyword arguments evaluate in order, so errors come in file-section order.
    return KsConfig(
        address=address,
        port=ks.integer("port", 1, 65535, GDOI_PORT),
        software_version=ks.version("software_version"),
        control_socket=ks.req_path("control_socket", KS_CONTROL_SOCKET),
        control_group=ks.host_group("control_group"),
        state_dir=ks.req_path("state_dir", KS_STATE_DIR),
        keylog_dir=ks.path("keylog_dir", None),
        max_half_open=ks.integer("max_half_open", 1, 1_000_000, 16384),
        ike=parse_ike(root),
        auth=(auth := parse_auth(root)),
        groups=parse_groups(root, _KS_GROUP_KEYS, _parse_ks_group),
        coop=_parse_coop(root, address, auth),
    )
