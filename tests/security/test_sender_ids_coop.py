"""Issue 9 §1 with cooperative key servers: the used-SID record is synced (ANN SENDER_IDS).

Reuses the in-memory COOP simulation of tests/test_coop.py (three KS engines,
GM engines, simulated time, real phase 1 and ANN crypto).
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from gdoid.keyserver.annblocks import signing_key_block
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.protocol.ann import seal_ann
from gdoid.protocol.gdoi_payloads import AnnBlock, AnnPayload, BlockType, Role
from tests.coopsim import (
    ELECTED_WITHIN,
    GROUP,
    KS1,
    KS2,
    KS3,
    PERIOD,
    Sim,
    elected,
    events,
    restart,
)


def sids_of(sim: Sim, gm_address: str) -> tuple[int, ...]:
    values = sim.gm(gm_address).sadb.groups[GROUP].sender_ids
    assert values is not None and values.values
    return values.values


def test_coop_kss_never_hand_out_the_same_sid(files: Path) -> None:
    sim = elected(files)
    given: list[int] = []
    for i in range(60):
        # Two GMs restarting over and over, each time at another KS of the group.
        gm = f"10.0.0.{1 + i % 2}"
        sim.register(gm, (KS1, KS2, KS3)[i % 3])
        given += sids_of(sim, gm)
        if i % 10 == 9:
            sim.run(PERIOD)  # announcements in between
    assert len(set(given)) == len(given)


def test_ks_with_lost_state_recovers_its_record_from_a_peer(files: Path) -> None:
    sim = elected(files)
    used_at_ks2: list[int] = []
    for _ in range(12):  # one GM restarting: 11 released SIDs cool off at KS2
        sim.register("10.0.0.1", KS2)
        used_at_ks2 += sids_of(sim, "10.0.0.1")
    sim.run(2 * PERIOD)  # KS2 announces its record; the others keep a copy
    record = sim.group(KS1).sids.peer_records[KS2]
    assert record.cooling_count == 11
    fresh: KeyServerEngine = restart(sim, KS2)  # the state file is gone
    assert (
        fresh.groups[GROUP].sids.version < record.version and not fresh.groups[GROUP].sids.cooling
    )
    sim.run_until(lambda: fresh.coop is not None and fresh.coop.serving, ELECTED_WITHIN)
    sim.run(PERIOD)
    alloc = fresh.groups[GROUP].sids
    assert alloc.cooling_count == 11 and alloc.next > max(used_at_ks2)
    # It never hands out a SID its earlier life used with the live TEKs.
    again: list[int] = []
    for i in range(30):
        got = fresh.allocate_sender_ids(GROUP, 1, f"new-{i}")
        assert got is not None
        again += got.values
    assert not set(again) & set(used_at_ks2)
    # Only the peers' ANNs on SAs the restarted KS no longer has may be refused; no block was.
    assert fresh.counters["ann_rejected"] == fresh.counters["ann_rejected_no_sa"], dict(
        fresh.counters
    )


def test_malformed_sender_ids_block_is_rejected(files: Path) -> None:
    sim = elected(files)
    sim.register("10.0.0.1", KS1)
    sim.run(PERIOD)
    ks1 = sim.ks(KS1)
    before = ks1.groups[GROUP].sids.record(KS1)
    coop2 = sim.coop(KS2)
    sa = coop2._usable_sa(coop2.peers[IPv4Address(KS1)], sim.now)
    assert sa is not None
    bad_blocks = [
        b"not json",
        b'{"bits": 12}',
        b'{"bits": 12, "records": [{"first": 0}]}',
        b'{"bits": 12, "records": [{"owner": "10.0.9.1", "first": 1366, "last": 2730, "version": 1, '
        b'"next": 1400, "held": [[1500, 1400]], "reserved": [], "orphans": [], "orphans_before": 0, '
        b'"cooling": [], "free": 10}]}',
    ]
    for i, data in enumerate(bad_blocks):
        rejected = ks1.counters["ann_rejected"]
        ann = AnnPayload(
            coop2.version,
            coop2.priority,
            Role.SECONDARY,
            0,
            coop2.ann_seq + 1000 + i,
            GROUP,
            0,
            (signing_key_block(sim.group(KS2)), AnnBlock(BlockType.SENDER_IDS, data)),
        )
        sim.send(KS2, [(seal_ann(sa, ann), (KS1, 848))])
        assert ks1.counters["ann_rejected"] == rejected + 1, data
    # Logged once: ANN rejections are rate-limited per peer and reason.
    assert events(ks1).count("COOP_ANN_REJECTED") == 1
    assert ks1.counters["ann_rejected_invalid"] == len(bad_blocks), dict(ks1.counters)
    assert ks1.groups[GROUP].sids.record(KS1) == before
    assert (
        KS2 not in ks1.groups[GROUP].sids.peer_records
        or ks1.groups[GROUP].sids.peer_records[KS2].held == sim.group(KS2).sids.record(KS2).held
    )


def test_primary_rekeys_when_a_secondary_runs_low(files: Path) -> None:
    """Only the primary rekeys: it sees a secondary's slice run low in that KS's record."""
    sim = elected(files)
    ks2, g2 = sim.ks(KS2), sim.group(KS2)
    old_teks = {t.spi for t in g2.teks}
    for i in range(1300):  # GMs registering at KS2 and leaving again, under the same TEKs
        got = ks2.allocate_sender_ids(GROUP, 1, f"gm-{i}")
        assert got is not None
        g2.sids.release(got.values, sim.now)
    assert g2.sids.low() and g2.sids.cooling_count == 1300
    assert "KS_SID_EXHAUSTION_REKEY" not in events(ks2)
    sim.run(3 * PERIOD)
    assert events(sim.ks(KS1)).count("KS_SID_EXHAUSTION_REKEY") == 1
    assert not {t.spi for t in g2.teks} & old_teks  # KS2 took the primary's new TEKs
    assert not g2.sids.low() and g2.sids.cooling_count == 0
