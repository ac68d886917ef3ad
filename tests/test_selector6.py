"""Issue 11 §3: IPv6 traffic selectors in the control plane.

A TEK's selector may be IPv4 or IPv6, one family on both sides (a mixed one is a
typed error).  The SAT carries IPv6 identities as ID_IPV6_ADDR_SUBNET (RFC 2407
§4.6.2: 16-octet address then 16-octet mask) or ID_IPV6_ADDR for a host, and a
GM also accepts ID_IPV6_ADDR_RANGE when the range is one prefix.  A GM refuses a
TEK whose source and destination families differ with INVALID_ID_INFORMATION.
"""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from gdoid.groupmember.engine import RegState
from gdoid.keyserver.fields import FieldInvalid
from gdoid.keyserver.group_keys import GroupKeyState
from gdoid.protocol.constants import IdType, NotifyType
from gdoid.protocol.errors import NotifyError
from gdoid.protocol.gdoi_payloads import SatPayload, TrafficId
from gdoid.protocol.policy import (
    SelectorFamilyError,
    Tek,
    TrafficSelector,
    build_sat,
    parse_sat,
)
from tests import enginenet
from tests.pullsim import make_kek, make_tek

NOW = 1_000_000.0
LAN6 = IPv6Network("fd00:1::/48")
LAN6B = IPv6Network("fd00:2::/48")


def tek6(src: IPv6Network = LAN6, dst: IPv6Network = LAN6B, **sel: int) -> Tek:
    tek = make_tek("esp-gcm-256", NOW)
    policy = dataclasses.replace(tek.policy, selector=TrafficSelector(src, dst, **sel))
    return dataclasses.replace(tek, policy=policy)


def test_selector_takes_ipv6_and_refuses_mixed_families() -> None:
    sel = TrafficSelector(LAN6, LAN6B)
    assert sel.src.version == sel.dst.version == 6
    with pytest.raises(SelectorFamilyError, match="IPv4.*IPv6"):
        TrafficSelector(IPv4Network("10.0.0.0/8"), LAN6)
    with pytest.raises(ValueError):  # SelectorFamilyError is also a ValueError
        TrafficSelector(LAN6, IPv4Network("10.0.0.0/8"))


def test_sat_with_ipv6_selector_bytes_and_round_trip() -> None:
    sat = build_sat(tek6(ip_protocol=17, dst_port=2000), NOW)
    assert sat.src == TrafficId(
        IdType.ID_IPV6_ADDR_SUBNET,
        0,
        bytes.fromhex("fd000001" + "00" * 12 + "ff" * 6 + "00" * 10),
    )
    assert sat.dst.id_type == IdType.ID_IPV6_ADDR_SUBNET and sat.dst.port == 2000
    body = sat.encode_body()
    # Protocol-ID, IP protocol, then src: type 6, port 0, 2-octet length 32, 32 octets.
    assert body[2:7] == bytes.fromhex("06 0000 0020")
    assert body[7:39] == sat.src.data
    decoded = SatPayload.decode_body(body)
    assert decoded == sat
    spi, policy, _ = parse_sat(decoded, NOW)
    assert policy.selector == TrafficSelector(LAN6, LAN6B, 17, 0, 2000)


def test_ipv6_host_is_id_ipv6_addr() -> None:
    host = IPv6Network("fd00::7/128")
    tid = TrafficId.from_network(host, 848)
    assert (tid.id_type, tid.port, tid.data) == (
        IdType.ID_IPV6_ADDR,
        848,
        bytes.fromhex("fd00" + "00" * 13 + "07"),
    )
    assert tid.to_network() == host


def test_ipv6_range_decodes_when_it_is_one_prefix() -> None:
    start = bytes.fromhex("fd000001" + "00" * 12)
    end = bytes.fromhex("fd000001" + "0000" + "ff" * 10)
    assert TrafficId(IdType.ID_IPV6_ADDR_RANGE, 0, start + end).to_network() == LAN6
    v4 = TrafficId(IdType.ID_IPV4_ADDR_RANGE, 0, bytes([10, 1, 0, 0, 10, 1, 255, 255]))
    assert v4.to_network() == IPv4Network("10.1.0.0/16")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (bytes.fromhex("fd000001" + "00" * 12 + "fd000001" + "00" * 11 + "02"), "single prefix"),
        (bytes.fromhex("fd000002" + "00" * 12 + "fd000001" + "00" * 12), "ends before"),
    ],
)
def test_ipv6_range_that_is_not_one_prefix_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(Exception, match=why) as exc:
        TrafficId(IdType.ID_IPV6_ADDR_RANGE, 0, data).to_network()
    assert getattr(exc.value, "field", None) == "id_data"


def test_ipv6_subnet_with_a_non_prefix_mask_is_refused() -> None:
    data = bytes.fromhex("fd00" + "00" * 14 + "ffff00ff" + "00" * 12)
    with pytest.raises(Exception, match="not a prefix") as exc:
        TrafficId(IdType.ID_IPV6_ADDR_SUBNET, 0, data).to_network()
    assert getattr(exc.value, "field", None) == "id_data"


@pytest.mark.parametrize(
    ("id_type", "size"),
    [
        (IdType.ID_IPV6_ADDR, 16),
        (IdType.ID_IPV6_ADDR_SUBNET, 32),
        (IdType.ID_IPV6_ADDR_RANGE, 32),
    ],
)
@pytest.mark.parametrize("delta", [-1, 1])
def test_ipv6_identity_lengths_are_checked_on_decode(id_type: int, size: int, delta: int) -> None:
    sat = build_sat(tek6(), NOW)
    bad = dataclasses.replace(sat, src=TrafficId(id_type, 0, bytes(size + delta)))
    with pytest.raises(Exception, match=f"type needs {size}") as exc:
        SatPayload.decode_body(bad.encode_body())
    assert getattr(exc.value, "field", None) == "src_id_data"
    # and to_network alone names the field too
    with pytest.raises(Exception, match=f"type needs {size}"):
        TrafficId(id_type, 0, bytes(size + delta)).to_network()


def test_gm_refuses_a_tek_with_mixed_families() -> None:
    sat = build_sat(tek6(), NOW)
    mixed = dataclasses.replace(sat, dst=TrafficId.from_network(IPv4Network("10.2.0.0/16")))
    decoded = SatPayload.decode_body(mixed.encode_body())  # well-formed on the wire
    with pytest.raises(NotifyError) as exc:
        parse_sat(decoded, NOW)
    assert exc.value.notify == NotifyType.INVALID_ID_INFORMATION
    assert "IPv6" in exc.value.reason and "IPv4" in exc.value.reason


def test_ks_key_state_keeps_ipv6_selectors() -> None:
    """The KS's state file and COOP replication carry TEKs as JSON: IPv6 prefixes survive."""
    keys = GroupKeyState(1, NOW, NOW, 0, make_kek(NOW), (tek6(ip_protocol=6, src_port=80),))
    doc = json.loads(json.dumps(keys.to_json()))
    assert doc["teks"][0]["src"] == "fd00:1::/48"
    assert GroupKeyState.from_json(doc) == keys
    doc["teks"][0]["dst"] = "10.2.0.0/16"
    with pytest.raises(FieldInvalid) as exc:
        GroupKeyState.from_json(doc)
    assert exc.value.field == "keys.teks[0].dst"


def test_registration_hands_an_ipv6_and_an_ipv4_tek_to_the_gm(
    files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KS config with one SA per family -> GROUPKEY-PULL -> the GM holds both selectors."""
    monkeypatch.setattr(
        enginenet,
        "SAS",
        (
            ("esp-gcm-256", "fd00:1::/48", "fd00:2::/48"),
            ("esp-gcm-128", "10.1.0.0/16", "10.2.0.0/16"),
        ),
    )
    ks, gm = enginenet.make_ks(files), enginenet.make_gm(files)
    enginenet.register(ks, gm)
    assert gm.registrations[enginenet.GROUP].state == RegState.REGISTERED
    teks = gm.sadb.groups[enginenet.GROUP].teks.values()
    assert {t.policy.selector for t in teks} == {
        TrafficSelector(LAN6, LAN6B),
        TrafficSelector(IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16")),
    }
    assert {t.spi: t.cipher_key for t in teks} == {
        t.spi: t.cipher_key for t in ks.groups[enginenet.GROUP].teks
    }
