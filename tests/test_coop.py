"""Cooperative key servers (COOP, wire.md §6.3) in an in-memory network.

Three KS engines (10.0.8.1 / 10.0.9.1 / 10.0.10.1, priorities 100 / 75 / 50)
and GM engines on 10.0.0.x exchange datagrams through :class:`Sim`: a queue
with a simulated clock, and a ``blocked`` set of address pairs for
partitions and dead nodes.  No sockets.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from gdoid.groupmember.engine import GroupMemberEngine, RegState
from gdoid.keyserver.group import Group, Member
from gdoid.protocol.ann import MAX_ANN_DATAGRAM, seal_ann
from gdoid.protocol.constants import ExchangeType
from gdoid.protocol.gdoi_payloads import AnnPayload, Role
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.version import SoftwareVersion
from tests.coopsim import (
    ELECTED_WITHIN,
    FAILOVER_WITHIN,
    GROUP,
    KS1,
    KS2,
    KS3,
    KSS,
    M0,
    PERIOD,
    PRIORITY,
    STEP,
    Sim,
    assert_converged,
    elected,
    events,
    gm_keys,
    member_table,
    restart,
)

# A starting KS listens two periods, then elects; allow for ANN round trips.
# Secondaries elect after three silent periods (plus a tick of slack).


# --- election -------------------------------------------------------------------------


def test_listen_then_highest_priority_wins(files: Path) -> None:
    sim = Sim(files)
    for a in KSS:
        sim.add_ks(a)
    # Listening: nobody claims primary, and GMs are not served yet.
    sim.run(PERIOD)
    assert all(sim.coop(a).role is None for a in KSS)
    gm = sim.add_gm("10.0.0.1", (KS1,))
    sim.send("10.0.0.1", gm.start(sim.now, sim.mono))
    assert gm.registrations[GROUP].state != RegState.REGISTERED
    assert sim.ks(KS1).counters["not_serving"] >= 1
    took = sim.run_until(lambda: bool(sim.primaries()), ELECTED_WITHIN)
    assert took >= PERIOD  # (we already spent one period listening)
    sim.run(PERIOD)
    assert sim.primaries() == [KS1]
    assert sim.coop(KS2).role == Role.SECONDARY and sim.coop(KS3).role == Role.SECONDARY
    assert sim.coop(KS2).primary == IPv4Address(KS1) and sim.coop(KS3).primary == IPv4Address(KS1)
    assert sim.roles[KS2] == [Role.SECONDARY] and sim.roles[KS3] == [Role.SECONDARY]
    assert sim.roles[KS1] == [Role.PRIMARY]
    # The refused GM retries and is served; its row reaches the other KSs.
    sim.run_until(lambda: gm.registrations[GROUP].state == RegState.REGISTERED, 10.0)
    sim.run(STEP)
    assert_converged(sim)
    assert len(sim.group(KS3).members) == 1
    # The primary keeps announcing every period.
    before = len(sim.anns(src=KS1, dst=KS2))
    sim.run(5 * PERIOD)
    assert 5 <= len(sim.anns(src=KS1, dst=KS2)) - before <= 6
    assert sim.coop(KS2).peers[IPv4Address(KS1)].role == Role.PRIMARY


def test_equal_priority_goes_to_the_higher_address(files: Path) -> None:
    sim = Sim(files)
    for a in KSS:
        sim.add_ks(a, priority=60)
    sim.run_until(lambda: bool(sim.primaries()), ELECTED_WITHIN)
    sim.run(PERIOD)
    assert sim.primaries() == [KS3]  # 10.0.10.1 > 10.0.9.1 > 10.0.8.1
    assert all(sim.coop(a).primary == IPv4Address(KS3) for a in KSS)
    assert_converged(sim)


def test_late_starter_joins_as_secondary(files: Path) -> None:
    sim = Sim(files)
    sim.add_ks(KS2)
    sim.add_ks(KS3)
    sim.run_until(
        lambda: sim.primaries() == [KS2] and sim.coop(KS3).serving, ELECTED_WITHIN + PERIOD
    )
    before = sim.ks_keys(KS2)
    sim.add_ks(KS1, priority=40)  # lower priority than the running primary
    sim.run(4 * PERIOD)
    assert sim.primaries() == [KS2]
    assert sim.roles[KS1] == [Role.SECONDARY]  # never claimed primary
    assert sim.ks_keys(KS1) == before
    assert_converged(sim)


# --- key and member sync --------------------------------------------------------------


def test_gms_at_every_ks_get_the_same_keys_and_distinct_sids(files: Path) -> None:
    sim = elected(files)
    assert_converged(sim)
    primary = sim.group(KS1)
    for a in (KS2, KS3):  # the full key state, not just the SPIs
        g = sim.group(a)
        assert g.kek.key == primary.kek.key and g.kek.iv == primary.kek.iv
        assert g.kek.expires_at == primary.kek.expires_at
        assert [(t.spi, t.cipher_key, t.integrity_key, t.expires_at) for t in g.teks] == [
            (t.spi, t.cipher_key, t.integrity_key, t.expires_at) for t in primary.teks
        ]
        assert g.seq == primary.seq and g.epoch == primary.epoch
    gms = {}
    for i, ks in enumerate((KS1, KS2, KS3, KS1, KS2, KS3), 1):
        gms[f"10.0.0.{i}"] = sim.register(f"10.0.0.{i}", ks)
    sim.run(PERIOD)
    held = {gm_keys(gm) for gm in gms.values()}
    assert held == {(primary.kek.spi, frozenset(t.spi for t in primary.teks))}
    for gm in gms.values():  # same key material too, whichever KS served it
        for t in primary.teks:
            assert gm.sadb.groups[GROUP].teks[t.spi].cipher_key == t.cipher_key
    # SIDs from the three KSs never collide.
    sids = [s for gm in gms.values() for s in gm.sadb.groups[GROUP].sender_ids.values]  # type: ignore[union-attr]  # registered GMs have sender IDs
    assert len(sids) == len(set(sids)) == 6
    # Member lists (with versions and SIDs) are the same everywhere.
    assert_converged(sim)
    table = member_table(primary)
    assert set(table) == {IPv4Address(a) for a in gms}
    assert all(v[1] == SoftwareVersion(1, 0, 2) for v in table.values())


def test_sid_slices_are_disjoint(files: Path) -> None:
    sim = Sim(files)
    for a in KSS:
        sim.add_ks(a)
    given: dict[str, set[int]] = {}
    for a in KSS:
        alloc = sim.group(a).sids
        got = set()
        for i in range(20):
            values = sim.ks(a).allocate_sender_ids(GROUP, 3, f"gm-{a}-{i}")
            assert values is not None
            got |= set(values.values)
        given[a] = got
        assert all(alloc.first <= s <= alloc.last for s in got)
    assert (
        not given[KS1] & given[KS2] and not given[KS1] & given[KS3] and not given[KS2] & given[KS3]
    )


def test_member_registered_at_a_secondary_is_rekeyed_by_the_primary(files: Path) -> None:
    sim = elected(files)
    gm1 = sim.register("10.0.0.1", KS1)
    gm2 = sim.register("10.0.0.2", KS2)
    gm3 = sim.register("10.0.0.3", KS3)
    sim.run(STEP)  # the secondaries tell the primary at once
    primary = sim.group(KS1)
    assert set(primary.members) == {IPv4Address(a) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3")}
    sim.send(KS1, sim.ks(KS1).rekey(primary, sim.now))
    want = (primary.kek.spi, frozenset(t.spi for t in primary.teks))
    for gm in (gm1, gm2, gm3):
        reg = gm.registrations[GROUP]
        assert reg.rekeys == 1 and reg.last_rekey_from == KS1 and reg.last_rekey_seq == primary.seq
        assert gm_keys(gm)[1] >= want[1]  # new TEKs installed (old ones kept until they expire)
        assert gm.counters["rekeys_rejected"] == 0
    # The acks reach the primary for GMs it never registered itself.
    assert all(m.pending is None and m.acks_received == 1 for m in primary.members.values())
    sim.run(PERIOD)
    assert_converged(sim)  # the secondaries follow the primary's new keys and SEQ


def test_gm_removal_on_the_primary_clears_every_ks_member_table(files: Path) -> None:
    sim = elected(files)
    three_gms(sim)
    assert all(len(sim.group(a).members) == 3 for a in KSS)
    sim.send(KS1, sim.ks(KS1).remove_members(sim.group(KS1), sim.now, 1))
    sim.run(STEP)
    assert {a: len(sim.group(a).members) for a in KSS} == dict.fromkeys(KSS, 0)
    # A full member list from a KS that missed the removal does not bring them back.
    for a in (KS2, KS3):
        for peer in sim.coop(a).peers.values():
            peer.full_sent = False
    sim.run(PERIOD)
    assert all(sim.group(a).members == {} for a in KSS)


# --- failover -------------------------------------------------------------------------


def three_gms(sim: Sim) -> dict[str, GroupMemberEngine]:
    gms = {f"10.0.0.{i}": sim.register(f"10.0.0.{i}", ks) for i, ks in enumerate(KSS, 1)}
    sim.run(STEP)
    return gms


def test_primary_dies_a_secondary_takes_over_with_the_same_kek(files: Path) -> None:
    sim = elected(files)
    gms = three_gms(sim)
    # One rekey from the first primary, so SEQ is past the registration value.
    sim.send(KS1, sim.ks(KS1).rekey(sim.group(KS1), sim.now))
    sim.run(PERIOD)
    kek = sim.group(KS1).kek
    seq = sim.group(KS1).seq
    assert sim.group(KS2).seq == seq and sim.group(KS2).kek.spi == kek.spi
    sim.isolate(KS1)
    took = sim.run_until(lambda: sim.primaries((KS2, KS3)) == [KS2], FAILOVER_WITHIN)
    assert took > 2 * PERIOD  # not before three periods of silence
    sim.run(PERIOD)
    assert sim.primaries((KS2, KS3)) == [KS2]
    assert sim.coop(KS3).primary == IPv4Address(KS2) and sim.coop(KS3).role == Role.SECONDARY
    assert sim.ks(KS2).scheduled_rekeys and not sim.ks(KS3).scheduled_rekeys
    new = sim.group(KS2)
    sim.send(KS2, sim.ks(KS2).rekey(new, sim.now))
    assert new.seq > seq
    for gm in gms.values():
        reg = gm.registrations[GROUP]
        assert reg.registrations == 1  # no re-registration needed
        assert reg.last_rekey_from == KS2 and reg.last_rekey_seq == new.seq
        assert gm.sadb.groups[GROUP].kek is not None and gm.sadb.groups[GROUP].kek.spi == kek.spi
        assert gm.counters["rekeys_rejected"] == 0 and reg.rekeys_rejected == 0
        assert "GM_REKEY_REJECTED" not in events(gm)
        assert gm_keys(gm)[1] >= frozenset(t.spi for t in new.teks)
    sim.run(PERIOD)
    assert_converged(sim, (KS2, KS3))


# --- partition ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outage", [6.0, 150.0]
)  # the longer one outlives idle phase-1 SA lingering
def test_partition_heals_to_one_primary_and_the_winners_keys(files: Path, outage: float) -> None:
    sim = elected(files)
    gms = three_gms(sim)  # 10.0.0.1 at KS1, .2 at KS2, .3 at KS3
    side_a = (KS1, "10.0.0.1")
    side_b = (KS2, KS3, "10.0.0.2", "10.0.0.3")
    sim.cut(side_a, side_b)
    sim.run_until(lambda: sim.primaries() == [KS1, KS2], FAILOVER_WITHIN)
    # Both sides rekey on their own: the keys diverge.
    sim.send(KS1, sim.ks(KS1).rekey(sim.group(KS1), sim.now))
    sim.send(KS2, sim.ks(KS2).rekey(sim.group(KS2), sim.now))
    sim.run(outage)
    assert sim.ks_keys(KS1) != sim.ks_keys(KS2)
    assert sim.primaries() == [KS1, KS2]
    # The loser's side registers a new member while apart.
    gms["10.0.0.4"] = sim.register("10.0.0.4", KS3)
    sim.cut(side_a, ("10.0.0.4",))
    sim.run(PERIOD)
    winner_keys = sim.ks_keys(KS1)
    sim.heal()
    took = sim.run_until(lambda: sim.primaries() == [KS1], PERIOD + STEP)
    assert took <= PERIOD + STEP
    sim.run(PERIOD)
    assert sim.primaries() == [KS1]
    assert all(sim.coop(a).primary == IPv4Address(KS1) for a in KSS)
    assert sim.ks_keys(KS1) == winner_keys  # the winner's keys stand
    assert_converged(sim)
    assert set(sim.group(KS1).members) == {IPv4Address(a) for a in gms}
    # Every GM holds the winner's KEK and TEKs (the loser's GMs by its handover rekey).
    for address, gm in gms.items():
        assert gm_keys(gm)[0] == winner_keys[0]
        assert gm_keys(gm)[1] >= winner_keys[1], address
    for address in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        reg = gms[address].registrations[GROUP]
        assert reg.last_rekey_from == KS2 and reg.registrations == 1
    # And the winner's next rekey is accepted by everyone.
    sim.send(KS1, sim.ks(KS1).rekey(sim.group(KS1), sim.now))
    for address, gm in gms.items():
        reg = gm.registrations[GROUP]
        assert reg.last_rekey_from == KS1 and reg.last_rekey_seq == sim.group(KS1).seq, address
        assert reg.registrations == 1
        assert gm_keys(gm)[1] >= sim.ks_keys(KS1)[1]
    sim.run(PERIOD)
    assert_converged(sim)


# --- forged, replayed and unauthenticated announcements -------------------------------


def test_forged_and_replayed_anns_are_dropped_and_counted(files: Path) -> None:
    sim = elected(files)
    ks1, coop1 = sim.ks(KS1), sim.coop(KS1)
    peer2 = coop1.peers[IPv4Address(KS2)]
    sim.run(PERIOD)
    genuine = sim.anns(src=KS2, dst=KS1)[-1]
    received = peer2.ann_received
    assert ks1.counters["ann_rejected"] == 0

    # Replay: a genuine ANN delivered again carries an old sequence number.
    sim.send(KS2, [(genuine, (KS1, 848))])
    assert ks1.counters["ann_rejected"] == 1 and peer2.ann_rejected == 1
    assert peer2.ann_received == received
    assert "COOP_ANN_REJECTED" in events(ks1)

    # Tampered: flip a ciphertext byte.
    tampered = bytearray(sim.anns(src=KS2, dst=KS1)[-1])
    tampered[-20] ^= 0x40
    sim.send(KS2, [(bytes(tampered), (KS1, 848))])
    assert ks1.counters["ann_rejected"] == 2 and peer2.ann_rejected == 2

    # Forged: a "primary, priority 255" ANN on the right cookies but the wrong keys.
    sa = sim.coop(KS2)._usable_sa(sim.coop(KS2).peers[IPv4Address(KS1)], sim.now)
    assert sa is not None
    wrong = replace(sa, keys=replace(sa.keys, skeyid_a=secrets.token_bytes(32)), _ivs={})
    wrong_cipher = replace(sa, cipher_key=secrets.token_bytes(len(sa.cipher_key)), _ivs={})
    g = sim.group(KS2)
    for i, forger in enumerate((wrong, wrong_cipher), 1):
        ann = AnnPayload(
            SoftwareVersion(1, 0, 2),
            255,
            Role.PRIMARY,
            0,
            2**63 + i,
            GROUP,
            0,
            (sim.coop(KS2)._keys_block(g),),
        )
        sim.send(KS2, [(seal_ann(forger, ann), (KS1, 848))])
    assert ks1.counters["ann_rejected"] == 4 and peer2.ann_rejected == 4
    assert peer2.ann_received == received and peer2.priority == PRIORITY[KS2]
    assert coop1.is_primary
    # Not even a forged ANN's sequence number sticks: the next genuine ANN is accepted.
    sim.run(PERIOD)
    assert peer2.ann_received > received and peer2.ann_rejected == 4
    assert sim.primaries() == [KS1]
    assert_converged(sim)


def test_peer_with_the_wrong_psk_never_joins(files: Path) -> None:
    sim = Sim(files)
    sim.add_ks(KS1)
    sim.add_ks(KS2)
    rogue = sim.add_ks(KS3, priority=255, psk="wrong.psk")
    sim.run(6 * PERIOD)
    for a in (KS1, KS2):
        peer = sim.coop(a).peers[IPv4Address(KS3)]
        assert peer.ann_received == 0 and peer.priority is None and not peer.reachable
        assert peer.sa is None and peer.ike_status.startswith(("Failed", "Negotiating"))
        assert not any(e.sa.peer_address == IPv4Address(KS3) for e in sim.ks(a).sas.values())
        assert sim.ks(a).counters["phase1_failed"] >= 1
    assert all(p.ann_received == 0 for p in rogue.coop.peers.values())  # type: ignore[union-attr]  # this KS is configured with COOP
    # KS1 and KS2 elect between themselves, unswayed by the "priority 255" rogue.
    assert sim.primaries((KS1, KS2)) == [KS1]
    assert sim.coop(KS2).primary == IPv4Address(KS1)
    assert_converged(sim, (KS1, KS2))
    assert sim.ks_keys(KS3) != sim.ks_keys(KS1)


# --- restarts -------------------------------------------------------------------------


def test_restarted_secondary_rejoins_and_syncs(files: Path) -> None:
    sim = elected(files)
    gms = three_gms(sim)
    sim.send(KS1, sim.ks(KS1).rekey(sim.group(KS1), sim.now))
    sim.isolate(KS3)
    sim.run(5 * PERIOD)
    fresh = restart(sim, KS3)
    assert sim.ks_keys(KS3) != sim.ks_keys(KS1)
    sim.run_until(lambda: fresh.coop is not None and fresh.coop.serving, ELECTED_WITHIN)
    sim.run(PERIOD)
    assert sim.roles[KS3] == [Role.SECONDARY]  # never primary
    assert sim.primaries() == [KS1]
    assert_converged(sim)
    assert set(sim.group(KS3).members) == {IPv4Address(a) for a in gms}
    # A GM registering to the restarted KS gets the group's keys.
    gm = sim.register("10.0.0.9", KS3)
    assert gm_keys(gm) == sim.ks_keys(KS1)


def test_restarted_higher_priority_ks_takes_over_only_after_sync(files: Path) -> None:
    sim = elected(files)
    gms = three_gms(sim)
    sim.isolate(KS1)
    sim.run_until(lambda: sim.primaries((KS2, KS3)) == [KS2], FAILOVER_WITHIN)
    sim.send(KS2, sim.ks(KS2).rekey(sim.group(KS2), sim.now))  # new TEKs while KS1 is down
    sim.run(PERIOD)
    keys, seq = sim.ks_keys(KS2), sim.group(KS2).seq
    rekeys = {a: gm.registrations[GROUP].rekeys for a, gm in gms.items()}
    fresh = restart(sim, KS1)
    sim.run_until(lambda: sim.primaries() == [KS1], ELECTED_WITHIN + PERIOD)
    # It took over holding the keys it synced: nobody was rekeyed onto fresh keys.
    assert sim.roles[KS1] == [Role.PRIMARY]
    assert sim.ks_keys(KS1) == keys and fresh.groups[GROUP].seq >= seq
    sim.run(2 * PERIOD)
    assert sim.primaries() == [KS1]
    assert all(sim.coop(a).primary == IPv4Address(KS1) for a in KSS)
    assert sim.ks(KS1).scheduled_rekeys and not sim.ks(KS2).scheduled_rekeys
    assert_converged(sim)
    assert {a: gm.registrations[GROUP].rekeys for a, gm in gms.items()} == rekeys
    assert all(gm_keys(gm)[0] == keys[0] for gm in gms.values())
    assert set(sim.group(KS1).members) == {IPv4Address(a) for a in gms}
    # And its rekeys reach every GM (members it learnt from the others), accepted.
    sim.send(KS1, sim.ks(KS1).rekey(sim.group(KS1), sim.now))
    for gm in gms.values():
        reg = gm.registrations[GROUP]
        assert reg.last_rekey_from == KS1 and reg.last_rekey_seq == sim.group(KS1).seq
        assert reg.registrations == 1 and "GM_REKEY_REJECTED" not in events(gm)


def test_primary_restarted_before_anyone_noticed_keeps_the_group_keys(files: Path) -> None:
    sim = elected(files)
    gms = three_gms(sim)
    keys = sim.ks_keys(KS1)
    sim.isolate(KS1)
    sim.run(PERIOD)  # back before the secondaries miss three periods: no failover
    assert sim.primaries((KS2, KS3)) == []
    restart(sim, KS1)
    sim.run_until(lambda: sim.primaries() == [KS1], ELECTED_WITHIN + PERIOD)
    sim.run(PERIOD)
    # The secondaries' copies of the group keys synced it before it claimed primary.
    assert sim.primaries() == [KS1] and sim.ks_keys(KS1) == keys
    assert_converged(sim)
    sim.send(KS1, sim.ks(KS1).rekey(sim.group(KS1), sim.now))
    for gm in gms.values():
        reg = gm.registrations[GROUP]
        assert reg.last_rekey_from == KS1 and reg.last_rekey_seq == sim.group(KS1).seq
        assert "GM_REKEY_REJECTED" not in events(gm)


# --- large member lists ---------------------------------------------------------------


def test_large_member_list_is_split_below_32_kib(files: Path) -> None:
    sim = elected(files)
    ks2 = sim.ks(KS2)
    g2 = sim.group(KS2)
    count = 400
    for i in range(count):
        address = IPv4Address("10.0.100.0") + i
        sids = ks2.allocate_sender_ids(GROUP, 2, str(address))
        assert sids is not None
        m = Member(
            address,
            str(address),
            SoftwareVersion(1, 0, 2),
            sim.now - i,
            g2.kek.spi,
            tuple(t.spi for t in g2.teks),
            sids.values,
            ack_key=secrets.token_bytes(32),
        )
        g2.members[address] = m
        ks2.coop.member_changed(g2, m)  # type: ignore[union-attr]  # this KS is configured with COOP
    start = len(sim.tap)
    sim.tick()  # the secondary announces the new members at once (deltas)
    sim.run(PERIOD)
    sent = [
        d
        for d, s, _ in sim.tap[start:]
        if s == KS2 and IsakmpHeader.decode(d).exchange_type == ExchangeType.COOP_ANN
    ]
    assert max(len(d) for d in sent) < MAX_ANN_DATAGRAM
    chunks = len([d for d in sent if len(d) > 8 * 1024]) // 2  # per peer
    assert chunks >= 3  # split: several big ANNs
    for a in (KS1, KS3):
        assert len(sim.group(a).members) == count
    assert member_table(sim.group(KS1)) == member_table(g2)
    # A restarted KS gets the whole list as a full snapshot, split the same way.
    start = len(sim.tap)
    fresh = restart(sim, KS3)
    sim.run_until(lambda: fresh.coop is not None and fresh.coop.serving, ELECTED_WITHIN)
    sim.run(PERIOD)
    to_new = [
        d
        for d, _, t in sim.tap[start:]
        if t == KS3 and IsakmpHeader.decode(d).exchange_type == ExchangeType.COOP_ANN
    ]
    assert max(len(d) for d in to_new) < MAX_ANN_DATAGRAM
    # A few full copies from each peer, not one per chunk received.
    assert len([d for d in to_new if len(d) > 8 * 1024]) <= 2 * 2 * chunks
    assert len(fresh.groups[GROUP].members) == count
    assert member_table(fresh.groups[GROUP]) == member_table(g2)
    assert fresh.counters["ann_rejected"] == 0 and fresh.counters["dropped"] == 0
    # Their SIDs are known to the new KS's allocator: it never hands them out again.
    taken = {s for m in g2.members.values() for s in m.sender_ids}
    for i in range(20):
        values = fresh.allocate_sender_ids(GROUP, 1, f"new-{i}")
        assert values is not None and not set(values.values) & taken


def test_a_1_0_1_key_server_shows_as_no_in_the_feature_tables(files: Path) -> None:
    """Every KS knows each peer's version from its ANNs; the primary's tables list them."""
    from gdoid.keyserver.show import show_feature

    sim = Sim(files)
    sim.add_ks(KS1)
    sim.add_ks(KS2)
    sim.add_ks(KS3, version="1.0.1")
    sim.run_until(
        lambda: sim.primaries() == [KS1] and all(sim.coop(a).serving for a in KSS),
        ELECTED_WITHIN + PERIOD,
    )
    table = show_feature([sim.group(KS1)], sim.coop(KS1).key_servers(), sim.now)
    assert " 10.0.8.1 1.0.2 Yes\n" in table
    assert " 10.0.9.1 1.0.2 Yes\n" in table
    assert " 10.0.10.1 1.0.1 No\n" in table


# --- clocks and deadlines (issue 10 §1) ---------------------------------------------------


@pytest.mark.parametrize("jump", [300.0, -300.0])
def test_a_wall_clock_jump_neither_fires_nor_stalls_coop_timers(files: Path, jump: float) -> None:
    """Announcements, elections and peer timeouts follow the monotonic clock."""
    sim = elected(files)
    seen = {a: len(events(sim.ks(a))) for a in KSS}
    start = len(sim.tap)
    sim.now += jump  # the wall clock jumps; the monotonic clock does not
    sim.run(3 * PERIOD)
    # Forward: nobody is declared gone, no election.  Backward: the primary keeps announcing.
    for a in KSS:
        later = events(sim.ks(a))[seen[a] :]
        assert not {"COOP_KS_ELECTION", "COOP_KS_UNREACH", "COOP_KS_TRANS_TO_PRI"} & set(later), (
            a,
            later,
        )
    assert sim.primaries() == [KS1]
    assert sim.roles[KS2] == [Role.SECONDARY] and sim.roles[KS3] == [Role.SECONDARY]
    periodic = [
        d
        for d, s, t in sim.tap[start:]
        if s == KS1 and t == KS2 and IsakmpHeader.decode(d).exchange_type == ExchangeType.COOP_ANN
    ]
    assert len(periodic) == 3  # one per period
    assert all(sim.coop(KS2).peers[IPv4Address(a)].alive(sim.mono, PERIOD) for a in (KS1, KS3))


def test_coop_timers_are_the_engine_deadlines(files: Path) -> None:
    """Woken only at ``next_deadline``, the KSs elect and then sleep until the next announcement."""
    sim = Sim(files)
    for a in KSS:
        sim.add_ks(a)

    def wake() -> None:
        deadline = min(
            d for a in KSS if (d := sim.ks(a).next_deadline(sim.now, sim.mono)) is not None
        )
        step = max(0.0, deadline - sim.mono)
        sim.now += step
        sim.mono += step
        for address in KSS:
            ks = sim.ks(address)
            due = ks.next_deadline(sim.now, sim.mono)
            if due is not None and due <= sim.mono:
                sim.queue.extend((d, address, to[0]) for d, to in ks.on_timer(sim.now, sim.mono))
        sim.deliver()

    wakeups = 0
    while not (sim.primaries() == [KS1] and all(sim.coop(a).serving for a in KSS)):
        wake()
        wakeups += 1
        assert sim.mono - M0 < ELECTED_WITHIN + PERIOD and wakeups < 100
    for _ in range(10):
        wake()
    assert sim.primaries() == [KS1] and sim.mono - M0 > 3 * PERIOD
    for a in KSS:  # idle: nothing due before the next announcement
        assert sim.ks(a).next_deadline(sim.now, sim.mono) == pytest.approx(
            sim.coop(a).next_announce
        )


def test_a_group_added_by_reload_is_announced_and_synced(files: Path) -> None:
    """A reload adds a group to the KS's table: COOP makes its state on first use."""
    sim = elected(files)
    added = 4321
    for a in KSS:
        ks = sim.ks(a)
        old = ks.groups[GROUP]
        config = replace(old.config, name="GET2", number=added)
        ks.groups[added] = Group(
            config, old.signing_key, IPv4Address(a), 848, sim.now
        )  # as the daemon's reload
    assert sim.ks_keys(KS2) == sim.ks_keys(KS1)
    sim.run(2 * PERIOD)

    def keys(address: str) -> tuple[bytes, frozenset[int]]:
        g = sim.ks(address).groups[added]
        return g.kek.spi, frozenset(t.spi for t in g.teks)

    assert keys(KS2) == keys(KS1) == keys(KS3)
    assert all(sim.ks(a).counters["ann_rejected"] == 0 for a in KSS)
    # Each KS hands out SIDs of the new group from its own slice.
    values = [sim.ks(a).allocate_sender_ids(added, 1, f"gm-{a}") for a in KSS]
    assert all(v is not None for v in values)
    assert len({v.values for v in values if v is not None}) == 3


def test_members_show_the_key_server_they_registered_with(files: Path) -> None:
    """``Key Server ID`` in ``show crypto gdoi ks members`` is each GM's own KS, also for
    members a KS learned from a peer's ANN (issue 12 §1), and it survives the state file."""
    import re

    from gdoid.keyserver import state
    from gdoid.keyserver.show import show_members

    sim = elected(files)
    sim.register("10.0.0.1", KS1)
    sim.register("10.0.0.2", KS2)
    sim.run(STEP)
    for ks in (KS1, KS2, KS3):
        g = sim.group(ks)
        text = show_members([g], IPv4Address(ks), sim.now)
        rows = dict(
            re.findall(
                r"Group Member ID    : (\S+) .*\n(?:.*\n){2} Key Server ID     : (\S+)\n", text
            )
        )
        assert rows == {"10.0.0.1": KS1, "10.0.0.2": KS2}, (ks, text)
        m = g.members[IPv4Address("10.0.0.2")]
        assert state.member_from_json(state.member_to_json(m)).ks_address == IPv4Address(KS2)
