"""Issue 9 §1/§6 (review of the GCM IV construction): a GM never reuses an IV under a key
when its data path drops an SA and gets the same TEK back.

``clear crypto gdoi`` (or any install of an empty TEK set) dropped the GCM EspSa and its
IV counters; the re-registration brings the KS's current TEK back, and a KS that hands
the GM its old sender ID again (today's main does) made the new EspSa start at counter
0: the same (key, IV) twice, which breaks AES-GCM (RFC 4106 §3, RFC 6054).  The data
path now remembers the IV ranges of a removed GCM SA until its TEK expires and skips
them when that TEK returns, whatever sender ID comes with it.
"""

from __future__ import annotations

import struct
from pathlib import Path

from gdoid.dataplane.engine import Dataplane
from tests.enginenet import GM, GROUP, Net, make_gm, make_ks
from tests.enginenet import T0 as ENGINE_T0
from tests.espdata import T0, make_tek, sids, udp


def ivs(packets: list[bytes]) -> list[int]:
    """The 8-octet explicit IVs (outer IPv4 20 + SPI 4 + seq 4)."""
    return [struct.unpack_from("!Q", p, 28)[0] for p in packets]


def send(
    dp: Dataplane, n: int, now: float, src: str = "10.1.0.1", dst: str = "10.2.0.1"
) -> list[bytes]:
    out = []
    for _ in range(n):
        r = dp.outbound(udp(src, dst), now)
        assert r.drop is None, r.drop
        out += r.to_network
    return out


def test_cleared_sa_does_not_restart_its_iv_counter() -> None:
    tek = make_tek("esp-gcm-256", lifetime=600)
    dp, peer = Dataplane(), Dataplane()
    peer.install(7, [tek], sids(9), None, T0)
    dp.install(7, [tek], sids(1), None, T0)
    first = send(dp, 5, T0)
    dp.install(7, [], None, None, T0 + 1)  # clear crypto gdoi
    dp.install(7, [tek], sids(1), None, T0 + 2)  # the same TEK and the same SID again
    again = send(dp, 5, T0 + 2)
    assert len(set(ivs(first + again))) == 10
    assert all(peer.inbound(p, T0 + 2).to_tun for p in again)  # still a working SA
    # remove_group (the group left the config) is the same story.
    dp.remove_group(7)
    dp.install(7, [tek], sids(1), None, T0 + 3)
    third = send(dp, 5, T0 + 3)
    assert len(set(ivs(first + again + third))) == 15


def test_memory_ends_with_the_tek() -> None:
    tek = make_tek("esp-gcm-128", lifetime=60)
    dp = Dataplane()
    dp.install(7, [tek], sids(1), None, T0)
    send(dp, 2, T0)
    dp.install(7, [], None, None, T0 + 1)
    assert list(dp._spent_ivs) == [tek.spi]
    dp.install(7, [], None, None, T0 + 61)  # the TEK expired: nothing left to protect
    assert dp._spent_ivs == {}


def test_clear_crypto_gdoi_and_reregister_never_repeats_an_iv(files: Path) -> None:  # noqa: F811
    """The whole GM path: engine clear_keys + reregister against the KS engine."""
    dp = Dataplane()
    ks, gm = make_ks(files), make_gm(files, dataplane=dp)
    net = Net(ks, {GM: gm})
    net.run(gm.start(ENGINE_T0), GM, ENGINE_T0)
    first = send(dp, 5, ENGINE_T0)
    now = ENGINE_T0 + 10
    gm.clear_keys(GROUP, now)
    net.run(gm.reregister(GROUP, now), GM, now)
    assert gm.registrations[GROUP].registrations == 2
    again = send(dp, 5, now)
    assert {p[20:24] for p in first} == {p[20:24] for p in again}  # the same TEK (SPI)
    assert len(set(ivs(first + again))) == 10
