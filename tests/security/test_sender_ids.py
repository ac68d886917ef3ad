"""Issue 9 §1: the KS never gives out an RFC 6054 sender ID twice under a live TEK.

In-memory engines (KeyServerEngine + GroupMemberEngine with real phase 1 and
GROUPKEY-PULL), a state file on disk for the restart cases.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from gdoid.config.loader import parse_ks_config
from gdoid.config.model import KsConfig
from gdoid.groupmember.engine import RegState
from gdoid.keyserver import sender_ids, state
from gdoid.keyserver.engine import KeyServerEngine
from gdoid.keyserver.group import Group
from gdoid.phase1 import phase1_config
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.pki import load_private_key
from gdoid.protocol.push import RemovalMode
from tests.enginenet import GM, GROUP, T0, ks_text, make_gm, register
from tests.recorder import Events


def make_ks(base: Path, bits: int = 16, now: float = T0) -> KeyServerEngine:
    cfg: KsConfig = parse_ks_config(ks_text(sender_id_bits=bits), base)
    p1 = phase1_config(cfg.ike, cfg.auth, cfg.address, cfg.software_version)
    groups = {
        g.number: Group(g, load_private_key(g.kek.signing_key), cfg.address, cfg.port, now)
        for g in cfg.groups
    }
    return KeyServerEngine(p1, groups, logger=Events())


def registered_sids(ks: KeyServerEngine, address: str = GM, now: float = T0) -> tuple[int, ...]:
    """A GM process (re)started at ``address`` registers; the SIDs it installed."""
    gm = make_gm(ks_base(ks), address=address, logger=Events())
    register(ks, gm, now)
    reg = gm.registrations[GROUP]
    assert reg.state == RegState.REGISTERED, reg.last_failure
    sids = gm.sadb.groups[GROUP].sender_ids
    assert sids is not None and sids.values
    assert ks.groups[GROUP].members[IPv4Address(address)].sender_ids == sids.values
    return sids.values


_BASES: dict[int, Path] = {}


def ks_base(ks: KeyServerEngine) -> Path:
    return _BASES[id(ks)]


def new_ks(base: Path, **kw: object) -> KeyServerEngine:
    ks = make_ks(base, **kw)  # type: ignore[arg-type]  # keyword arguments forwarded to the engine
    _BASES[id(ks)] = base
    return ks


def test_1000_reregistrations_of_one_address_get_disjoint_sids(files: Path) -> None:
    ks = new_ks(files)
    seen: list[tuple[int, ...]] = []
    for i in range(1000):
        seen.append(registered_sids(ks, now=T0 + i * 0.5))  # same TEKs throughout
    every = [s for sids in seen for s in sids]
    assert len(set(every)) == len(every) == 1000
    g = ks.groups[GROUP]
    assert len(g.members) == 1 and len({t.spi for t in g.teks}) == 2
    # The 999 replaced SIDs cool off under the live TEKs; only the last is held.
    assert set(g.sids.held) == set(seen[-1])
    assert g.sids.cooling_count == 999


def test_same_identity_from_other_addresses_and_after_removal(files: Path) -> None:
    ks = new_ks(files)
    g = ks.groups[GROUP]
    given: list[int] = []
    # The same identity asks from ten addresses (a GM moved, or a PSK identity reused).
    for i in range(10):
        got = ks.allocate_sender_ids(GROUP, 2, "gm.example")
        assert got is not None
        given += got.values
        g.record_member(IPv4Address(f"10.9.0.{i + 1}"), "gm.example", None, g.snapshot(T0), got, T0)
    given += registered_sids(ks)
    assert len(set(given)) == len(given)
    # GM removal (transitional): everyone re-registers; nobody gets a SID seen before.
    ks.remove_members(g, T0 + 10, RemovalMode.TRANSITIONAL)
    assert not g.members
    for i in range(20):
        given += registered_sids(ks, address=f"127.0.0.{2 + i % 3}", now=T0 + 20 + i)
    assert len(set(given)) == len(given)


def saving_ks(base: Path, path: Path, bits: int = 16) -> KeyServerEngine:
    ks = new_ks(base, bits=bits)
    ks.on_state_change = lambda: state.save(path, ks.groups)
    return ks


def restarted(base: Path, path: Path, bits: int = 16) -> KeyServerEngine:
    ks = saving_ks(base, path, bits)
    restored = state.load(path)
    for number, data in restored.items():
        state.apply(ks.groups[number], data)
    return ks


def test_ks_restart_from_the_state_file_never_reissues(files: Path, tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    ks = saving_ks(files, path)
    before = [
        s
        for i in range(30)
        for s in registered_sids(ks, address=f"127.0.0.{2 + i % 5}", now=T0 + i)
    ]
    state.save(path, ks.groups)  # a clean save, as the daemon's save loop does
    ks = restarted(files, path)
    after = [
        s
        for i in range(30)
        for s in registered_sids(ks, address=f"127.0.0.{2 + i % 5}", now=T0 + 100 + i)
    ]
    assert not set(before) & set(after)
    assert len(set(after)) == len(after)


def test_crash_between_message_4_and_the_save_never_reissues(files: Path, tmp_path: Path) -> None:
    """SIGKILL right after message 4 left: the next registrations' rows never reached
    the state file, only the reservation saved before the first message 4 did."""
    path = tmp_path / "state" / "state.json"
    ks = saving_ks(files, path)
    saves: list[int] = []
    ks.on_state_change = lambda: (state.save(path, ks.groups), saves.append(1))  # type: ignore[assignment,func-returns-value]  # a tuple-valued lambda as a callback: its value is ignored
    handed_out: list[int] = []
    for i in range(40):  # 40 < RESERVE_BLOCK: one save, before the first message 4
        handed_out += registered_sids(ks, address=f"127.0.0.{2 + i}", now=T0 + i)
    assert len(saves) == 1
    members_on_disk = state.load(path)[GROUP]["members"]
    # The crash: of these 40 registrations only the first row (saved with the reservation) is on disk.
    assert [m.address for m in members_on_disk] == [IPv4Address("127.0.0.2")]
    ks = restarted(files, path)
    again = [
        s
        for i in range(40)
        for s in registered_sids(ks, address=f"127.0.0.{2 + i}", now=T0 + 100 + i)
    ]
    assert not set(handed_out) & set(again)
    # The rows of the 40 GMs came back as registrations after the restart: the orphaned
    # reservation stays blocked only until no member registered before the save remains.
    g = ks.groups[GROUP]
    assert g.sids.orphans
    g.reconcile_sids(T0 + 200)
    assert not g.sids.orphans


def test_reservation_is_on_disk_before_message_4_leaves(files: Path, tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    ks = new_ks(files)
    order: list[str] = []

    def save() -> None:
        state.save(path, ks.groups)
        order.append("save")

    ks.on_state_change = save
    gm = make_gm(files, logger=Events())
    net_out = gm.start(T0)
    # Drive the exchange by hand and note when message 4 (the last KS datagram) appears.
    queue = [(d, GM) for d, _ in net_out]
    while queue:
        data, src = queue.pop(0)
        if src == GM:
            out = ks.datagram_received(data, (GM, 848), T0)
            if out and ks.counters["registrations"]:
                order.append("message 4")
            queue += [(d, "ks") for d, _ in out]
        else:
            queue += [(d, GM) for d, _ in gm.datagram_received(data, ("127.0.0.1", 848), T0)]
    assert order == ["save", "message 4"]
    sid = gm.sadb.groups[GROUP].sender_ids.values[0]  # type: ignore[union-attr]  # registered GMs have sender IDs
    on_disk = state.load(path)[GROUP]
    record = on_disk["sender_ids"]["record"]
    assert on_disk["members"][0].sender_ids == (sid,) and any(
        a <= sid <= b for a, b in record["held"]
    )
    assert record["reserved"]  # the rest of the block, reserved ahead of later registrations


def test_low_sid_space_triggers_a_rekey_and_a_log_line(files: Path) -> None:
    ks = new_ks(files, bits=5)  # 31 SIDs: low below 3.1 free
    g = ks.groups[GROUP]
    old_teks = {t.spi for t in g.teks}
    now = T0
    for i in range(29):
        now = T0 + i
        registered_sids(ks, now=now)  # one GM restarting: 28 SIDs released, cooling
    assert g.sids.low() and g.sids.cooling_count == 28
    out = ks.on_timer(now + 6)
    names = ks.log.names  # type: ignore[attr-defined]  # the engine was built with the Events recorder
    assert "KS_SID_EXHAUSTION_REKEY" in names and "KS_SEND_UNICAST_REKEY" in names
    assert out  # the rekey went to the member
    assert not {t.spi for t in g.teks} & old_teks  # replaced: the old TEKs are no longer handed out
    assert not g.sids.low() and g.sids.cooling_count == 0
    # Space again: the next registrations get SIDs, none used with a TEK still handed out.
    held = set(g.sids.held)
    got = [
        s for i in range(10) for s in registered_sids(ks, address=f"127.0.0.{3 + i}", now=now + 7)
    ]
    assert len(set(got)) == 10 and not set(got) & held
    # No second exhaustion rekey while nothing more can be freed.
    names.clear()
    ks.on_timer(now + 20)
    assert "KS_SID_EXHAUSTION_REKEY" not in names


def test_the_log_line_is_an_ios_mnemonic() -> None:
    from gdoid import log

    text = log.KS_SID_EXHAUSTION_REKEY.text(group="GET", free=3, size=31, released=28)
    assert text.startswith("%GDOI-5-KS_SID_EXHAUSTION_REKEY: ")


# --- the SENDER_IDS record's validator --------------------------------------------------------


def good_record() -> dict[str, object]:
    return {
        "owner": "10.0.8.1",
        "first": 1,
        "last": 1365,
        "version": 7,
        "next": 40,
        "held": [[1, 3], [9, 9]],
        "reserved": [[38, 39]],
        "orphans": [],
        "orphans_before": 5.0,
        "cooling": [{"until": 100.5, "teks": [4096, 70000], "sids": [[4, 8]]}],
        "free": 1330,
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"first": "1"}, "record.first"),
        ({"first": 0}, "record.first"),
        ({"last": 5000}, "record.last"),
        ({"version": -1}, "record.version"),
        ({"version": True}, "record.version"),
        ({"next": 2000}, "record.next"),
        ({"held": [[3, 1]]}, "record.held[0][1]"),
        ({"held": [[1, 3], [2, 4]]}, "record.held[1]"),
        ({"held": [[1]]}, "record.held[0]"),
        ({"held": {"1": 3}}, "record.held"),
        ({"reserved": [[0, 1]]}, "record.reserved[0][0]"),
        ({"orphans": [[1, 1.5]]}, "record.orphans[0][1]"),
        ({"orphans_before": float("nan")}, "record.orphans_before"),
        ({"orphans_before": "x"}, "record.orphans_before"),
        ({"cooling": [{"until": 1.0, "teks": [], "sids": [], "x": 1}]}, "record.cooling[0]"),
        ({"cooling": [{"until": 1.0, "teks": [1 << 32], "sids": []}]}, "record.cooling[0].teks[0]"),
        ({"cooling": [{"until": -1, "teks": [], "sids": []}]}, "record.cooling[0].until"),
        (
            {"cooling": [{"until": 1.0, "teks": [], "sids": [[9999, 9999]]}]},
            "record.cooling[0].sids[0][0]",
        ),
        ({"free": 99999}, "record.free"),
        ({"owner": 5}, "record.owner"),
        ({"extra": 1}, "record"),
    ],
)
def test_malformed_record_is_rejected_naming_the_field(
    change: dict[str, object], field: str
) -> None:
    rec = {**good_record(), **change}
    with pytest.raises(ProtocolError) as exc:
        sender_ids.parse_record(rec, 12)
    assert getattr(exc.value, "field", None) == field, str(exc.value)


def test_malformed_block_is_rejected() -> None:
    ok = {"bits": 12, "records": [good_record()]}
    assert sender_ids.parse_block(ok, 12)[0].version == 7
    for bad, field in (
        ([], "block"),
        ({"bits": 12}, "block"),
        ({"bits": 8, "records": []}, "bits"),
        ({"bits": 12, "records": "x"}, "records"),
        ({"bits": 12, "records": [good_record()] * 9}, "records"),
        ({"bits": 12, "records": [{**good_record(), "held": [[1, 1]] * 700}]}, "records[0].held"),
    ):
        with pytest.raises(ProtocolError) as exc:
            sender_ids.parse_block(bad, 12)
        assert getattr(exc.value, "field", None) == field, str(exc.value)


# --- GM side --------------------------------------------------------------------------------


def test_gm_reregistration_moves_every_installed_gcm_sa_to_the_new_sids(files: Path) -> None:
    """Pushes carry no SIDs: a TEK installed by an earlier rekey keeps sending under the
    registration's SIDs, and a re-registration replaces them on every GCM SA (the data
    path engine's view), never leaving one on the old SIDs."""
    from gdoid.dataplane.engine import Dataplane

    ks = new_ks(files)
    dp = Dataplane()
    gm = make_gm(files, logger=Events(), dataplane=dp)
    net = register(ks, gm)
    first = gm.sadb.groups[GROUP].sender_ids
    assert first is not None
    g = ks.groups[GROUP]
    net.run(ks.rekey(g, T0 + 10), "127.0.0.1", T0 + 10)  # a second GCM TEK arrives by push
    gcm = [sa for sa in dp.stats(T0 + 11)["sas"] if "gcm" in sa["transform"]]
    assert len(gcm) == 2
    assert {dp._groups[GROUP].entries[sa["spi"]].sa.sender_ids for sa in gcm} == {first}
    net.run(gm.reregister(GROUP, T0 + 20), str(gm.address), T0 + 20)
    second = gm.sadb.groups[GROUP].sender_ids
    assert second is not None and not set(second.values) & set(first.values)
    assert {dp._groups[GROUP].entries[sa["spi"]].sa.sender_ids for sa in gcm} == {second}


def test_state_file_with_a_malformed_sid_record_is_refused(files: Path, tmp_path: Path) -> None:
    import json

    path = tmp_path / "state" / "state.json"
    ks = saving_ks(files, path)
    registered_sids(ks)
    state.save(path, ks.groups)
    doc = json.loads(path.read_bytes())
    doc["groups"][0]["sender_ids"]["record"]["reserved"] = [
        [70000, 70001]
    ]  # outside the 16-bit space
    path.write_text(json.dumps(doc))
    with pytest.raises(state.StateError, match="reserved"):
        state.load(path)


def test_a_peer_version_cannot_push_ours_past_the_validator() -> None:
    alloc = sender_ids.SenderIdAllocator(12)
    rec = sender_ids.parse_record({**good_record(), "version": (1 << 63) - 1, "owner": "me"}, 12)
    alloc.merge(rec, 0.0, own=True)
    assert sender_ids.parse_record(alloc.record("me").to_json(), 12).version == alloc.version
