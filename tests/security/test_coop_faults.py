"""Issue 9 §6, COOP faults: reload with COOP, ANN block validation, state that was never saved.

- ``reload`` adding a group while COOP runs raised KeyError in every announce and
  stopped the KS timers (rekeys, half-open and SA expiry); it also left COOP's
  phase-1 credentials stale.
- ANN blocks were trusted after decryption: ``MEMBERS_FULL`` of ``[]`` / ``{}``
  raised (after ``last_seq`` advanced).  Now every field of every block is
  validated before any state changes (fuzzed with hypothesis).
- Members dropped for missed rekeys, members merged from COOP peers and keys
  adopted by a secondary were never saved: SIGKILL right after each, restart,
  and the state is there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import signal
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gdoid.config.loader import load_ks_config
from gdoid.configgen import ks_config, ks_group, psk_auth
from gdoid.keyserver import state
from gdoid.keyserver.annblocks import signing_key_block
from gdoid.keyserver.coop import Coop
from gdoid.keyserver.daemon import KeyServerDaemon
from gdoid.protocol.ann import seal_ann
from gdoid.protocol.gdoi_payloads import AnnBlock, AnnPayload, BlockType, Role
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.version import SoftwareVersion
from tests.coopsim import GROUP, KS1, KS2, Sim
from tests.procs import (
    Daemon,
    auth_toml,
    gdoictl,
    gdoictl_json,
    gm_toml,
    ks_toml,
    write_private,
    write_signing_key,
)

# --- reload while COOP runs (KeyServerDaemon objects, datagrams passed in memory) -------------


class Pair:
    """Two KS daemons (not started: no sockets) whose engines exchange datagrams in memory."""

    def __init__(self, tmp: Path, ks2_signing_key: str = "rekey.key") -> None:
        self.dir = tmp
        self.ks2_signing_key = ks2_signing_key
        write_private(tmp / "gm.psk", "gm-secret\n")
        write_private(tmp / "coop.psk", "ks-pair-secret\n")
        write_private(tmp / "coop2.psk", "ks-pair-secret-2\n")
        write_signing_key(tmp / "rekey.key")
        write_signing_key(tmp / "other-rekey.key")
        self.now = time.time()
        self.daemons = {a: self._daemon(a, priority) for a, priority in ((KS1, 100), (KS2, 50))}

    def config(
        self,
        address: str,
        groups: tuple[tuple[str, int], ...] = (("GET", 1234),),
        coop_psk: str = "coop.psk",
    ) -> Path:
        name = "ks1" if address == KS1 else "ks2"
        path = self.dir / f"{name}.toml"
        signing_key = self.ks2_signing_key if address == KS2 else "rekey.key"
        path.write_text(
            ks_config(
                address,
                control_socket=f"{self.dir}/{name}.sock",
                state_dir=f"{self.dir}/{name}-state",
                auth=psk_auth("10.0.0.0/8", "gm.psk"),
                groups=[ks_group(name=n, number=num, signing_key=signing_key) for n, num in groups],
                coop={
                    "priority": 100 if address == KS1 else 50,
                    "announce_interval": 0.5,
                    "peer": [{"address": KS2 if address == KS1 else KS1, "psk_file": coop_psk}],
                },
            )
        )
        return path

    def _daemon(self, address: str, priority: int) -> KeyServerDaemon:
        path = self.config(address)
        return KeyServerDaemon(load_ks_config(path), config_path=path)

    def coop(self, address: str) -> Coop:
        c = self.daemons[address].coop
        assert c is not None
        return c

    def deliver(self, src: str, out: list[tuple[bytes, tuple[str, int]]]) -> None:
        queue = [(d, src, to[0]) for d, to in out]
        while queue:
            data, s, dst = queue.pop(0)
            if dst in self.daemons:
                replies = self.daemons[dst].engine.datagram_received(data, (s, 848), self.now)
                queue += [(d, dst, to[0]) for d, to in replies]

    def tick(self, step: float = 0.1) -> None:
        self.now += step
        for address, d in self.daemons.items():
            self.deliver(address, d.engine.on_timer(self.now))

    def run_until(self, done: Callable[[], bool], limit: float) -> None:
        end = self.now + limit
        while not done():
            assert self.now < end, "not within the limit"
            self.tick()


def test_reload_adding_a_group_keeps_coop_and_timers_running(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    ks1 = pair.daemons[KS1]
    pair.run_until(lambda: pair.coop(KS1).is_primary and pair.coop(KS2).synced, 5.0)
    pair.config(KS1, groups=(("GET", 1234), ("NEW", 77)))
    pair.config(KS2, groups=(("GET", 1234), ("NEW", 77)))
    for d in pair.daemons.values():
        assert d.reload().ok
    # A half-open phase 1 from a GM, to see it expire on time.
    gm_mm = MainModeInitiator(ks1.engine.phase1, IPv4Address(KS1), pair.now)
    ks1.engine.datagram_received(gm_mm.start(pair.now).send[0], ("10.0.0.5", 848), pair.now)
    assert ks1.engine.half_open == 1
    received = pair.coop(KS2).peers[IPv4Address(KS1)].ann_received
    pair.tick(1.0)  # an announce of every group, the new one included
    new1, new2 = ks1.groups[77], pair.daemons[KS2].groups[77]
    pair.tick(1.0)
    assert pair.coop(KS2).peers[IPv4Address(KS1)].ann_received > received
    assert new2.kek.spi == new1.kek.spi  # the secondary took the new group's keys
    assert new1.sids.first != new2.sids.first  # and the new group has its SID slice
    # Timers keep running: half-open expiry, then the scheduled rekey of both groups.
    pair.now += 31.0
    pair.tick()
    assert ks1.engine.half_open == 0 and ks1.engine.counters["half_open_expired"] == 1
    seqs = {n: g.seq for n, g in ks1.groups.items()}
    pair.now = max(g.next_rekey_at() for g in ks1.groups.values()) + 0.5
    pair.tick()
    assert all(g.seq > seqs[n] for n, g in ks1.groups.items())
    assert ks1.engine.counters["coop_internal_error"] == 0


def test_reload_refreshes_coop_credentials(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    pair.run_until(lambda: pair.coop(KS1).is_primary and pair.coop(KS2).synced, 5.0)
    for a in (KS1, KS2):
        pair.config(a, coop_psk="coop2.psk")
        assert pair.daemons[a].reload().ok
        assert pair.coop(a).phase1 is pair.daemons[a].engine.phase1
    new_digest = hashlib.sha256(b"ks-pair-secret-2").digest()
    # The SAs proved with the old key are gone; phase 1 is redone with the new one.
    assert not any(
        e.sa.peer_address == IPv4Address(KS2) for e in pair.daemons[KS1].engine.sas.values()
    )
    received = pair.coop(KS1).peers[IPv4Address(KS2)].ann_received

    def fresh() -> bool:
        sa = pair.coop(KS1)._usable_sa(pair.coop(KS1).peers[IPv4Address(KS2)], pair.now)
        return sa is not None and sa.psk_digest == new_digest

    pair.run_until(fresh, 10.0)
    pair.tick(1.0)
    assert pair.coop(KS1).peers[IPv4Address(KS2)].ann_received > received
    assert pair.coop(KS1).is_primary and pair.coop(KS2).primary == IPv4Address(KS1)


def test_show_coop_says_why_sync_is_refused(tmp_path: Path) -> None:
    pair = Pair(tmp_path, ks2_signing_key="other-rekey.key")
    pair.run_until(
        lambda: pair.coop(KS1).is_primary and pair.coop(KS2).is_primary, 5.0
    )  # no sync: two
    for a, peer in ((KS1, KS2), (KS2, KS1)):
        res = pair.daemons[a]._show_coop(list(pair.daemons[a].groups.values()), {}, pair.now)
        assert res.ok
        assert (
            f"Peer Address: {peer}" in res.output and "Peer KS Status: Sync refused" in res.output
        )
        assert "Sync refused: rekey signing key differs in group GET: peer sha256:" in res.output
        assert "fingerprint: " in res.output  # the per-reason rejection counter
        assert "Authentication: psk" in res.output
    assert pair.daemons[KS1].groups[1234].kek.spi != pair.daemons[KS2].groups[1234].kek.spi


# --- ANN blocks are validated before anything changes -------------------------------------


class AnnTarget:
    """KS1 and KS2 in the Sim, elected; send KS1 hand-made ANNs on KS2's SA."""

    def __init__(self, files_dir: Path) -> None:
        self.sim = Sim(files_dir)
        self.sim.add_ks(KS1)
        self.sim.add_ks(KS2)
        self.sim.run_until(
            lambda: self.sim.primaries((KS1, KS2)) == [KS1] and self.sim.coop(KS2).synced, 5.0
        )
        self.coop1, self.coop2 = self.sim.coop(KS1), self.sim.coop(KS2)
        self.peer = self.coop1.peers[IPv4Address(KS2)]
        sa2 = self.coop2._usable_sa(self.coop2.peers[IPv4Address(KS1)], self.sim.now)
        assert sa2 is not None
        # KS1's end of the same SA (either side may have initiated it).
        ends = [self.peer.sa, *(e.sa for e in self.sim.ks(KS1).sas.values())]
        sa1 = next(sa for sa in ends if sa is not None and sa.cookies == sa2.cookies)
        self.sa1, self.sa2 = sa1, sa2
        self.group = self.sim.group(KS2)
        self.seq = self.peer.last_seq

    def valid_blocks(self) -> dict[int, Any]:
        g = self.group
        members = [state.member_to_json(m) for m in g.members.values()] or [
            {
                "address": "10.0.0.77",
                "identity": "10.0.0.77",
                "version": "1.0.2",
                "registered_at": self.sim.now,
                "kek_spi": g.kek.spi.hex(),
                "tek_spis": [t.spi for t in g.teks],
                "sender_ids": [5],
                "registrations": 1,
                "missed_rekeys": 0,
                "port": 848,
                "ack_key": "00" * 32,
                "ack_hash": 4,
            }
        ]
        return {
            BlockType.GROUP_KEYS: json.loads(self.coop2._keys_block(g).data),
            BlockType.MEMBERS_FULL: {"chunk": 0, "of": 1, "members": members},
            BlockType.MEMBERS_REMOVED: {"10.0.0.99": self.sim.now - 5},
        }

    def send(self, blocks: list[tuple[int, bytes]], role: Role = Role.SECONDARY) -> bool:
        """Seal and hand to KS1's receive path; True if it was accepted."""
        self.seq += 1
        ann = AnnPayload(
            SoftwareVersion(1, 0, 2),
            75,
            role,
            0,
            self.seq,
            GROUP,
            0,
            tuple(AnnBlock(t, d) for t, d in blocks),
        )
        before = self.peer.ann_received
        self.coop1._receive_ann(self.sa1, seal_ann(self.sa2, ann), (KS2, 848), self.sim.now)
        return self.peer.ann_received > before

    def fingerprint(self) -> tuple[int, bytes]:
        b = signing_key_block(self.group)
        return (b.type, b.data)

    def snapshot(self) -> tuple[Any, ...]:
        g = self.sim.group(KS1)
        return (
            self.peer.last_seq,
            g.kek,
            tuple(g.teks),
            g.seq,
            {a: state.member_to_json(m) for a, m in g.members.items()},
            self.coop1.role,
            self.peer.priority,
            self.peer.role,
        )


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    "members_full",
    [
        [],
        {},
        {"chunk": 0, "of": 1, "members": [{}]},
        {"chunk": 0, "of": 1, "members": [[]]},
        "x",
        None,
    ],
)
def test_malformed_members_full_is_rejected_before_any_change(
    files: Path, members_full: Any
) -> None:  # noqa: F811
    t = AnnTarget(files)
    before = t.snapshot()
    assert not t.send([(BlockType.MEMBERS_FULL, raw(members_full)), t.fingerprint()])
    assert t.snapshot() == before  # last_seq included
    assert t.sim.ks(KS1).counters["ann_rejected_invalid"] == 1
    assert t.peer.rejected == {"invalid": 1}
    # And the next valid ANN is taken.
    assert t.send([t.fingerprint()])


def test_an_ann_without_the_signing_key_fingerprint_is_rejected(files: Path) -> None:  # noqa: F811
    t = AnnTarget(files)
    before = t.snapshot()
    assert not t.send([])
    assert t.snapshot() == before


def test_json_nested_past_the_stack_is_rejected(files: Path) -> None:  # noqa: F811
    t = AnnTarget(files)
    before = t.snapshot()
    assert not t.send([(BlockType.MEMBERS_DELTA, b"[" * 30000), t.fingerprint()])
    assert not t.send([(BlockType.MEMBERS_REMOVED, b'{"a": NaN}'), t.fingerprint()])
    assert t.snapshot() == before


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=24)
    | st.sampled_from(["10.0.0.1", "0.0.0.0", "ff" * 16, "esp-gcm-256", "10.0.0.0/8"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=24,
)
block_types = st.sampled_from([*BlockType, 0, 99, 0xFFFF])


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    value = copy.deepcopy(value)
    node = value
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return value


@st.composite
def mutated_anns(draw: st.DrawFn, target: AnnTarget) -> list[tuple[int, bytes]]:
    """Valid blocks with one field replaced by arbitrary JSON, or blocks of arbitrary JSON."""
    valid = target.valid_blocks()
    blocks: list[tuple[int, bytes]] = []
    if draw(st.booleans()):
        btype = draw(st.sampled_from(sorted(valid)))
        path = draw(st.sampled_from(_paths(valid[btype])))
        blocks.append((btype, raw(_replace(valid[btype], path, draw(json_values)))))
    else:
        for _ in range(draw(st.integers(0, 3))):
            data = draw(st.one_of(json_values.map(raw), st.binary(max_size=40)))
            blocks.append((draw(block_types), data))
    if draw(st.booleans()):
        blocks.append(target.fingerprint())
    return blocks


def test_fuzzed_ann_blocks_never_raise_and_move_last_seq_only_when_valid(files: Path) -> None:  # noqa: F811
    target = AnnTarget(files)
    base = target.snapshot()

    @settings(
        max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        blocks = data.draw(mutated_anns(target))
        role = data.draw(st.sampled_from([Role.SECONDARY, Role.PRIMARY]))
        before = target.snapshot()
        accepted = target.send(blocks, role)  # _receive_ann: an exception would fail the test
        if accepted:
            assert target.peer.last_seq == target.seq
        else:
            assert target.snapshot() == before
        assert target.sim.ks(KS1).counters["ann_rejected_internal"] == 0

    run()
    counters = target.sim.ks(KS1).counters
    assert counters["ann_rejected_invalid"] > 100  # the fuzzer reached the validation
    assert base[0] < target.peer.last_seq  # and some ANNs were valid


# --- state that was never saved: SIGKILL right after each kind of change ------------------


def _state(path: Path) -> dict[int, dict[str, Any]]:
    try:
        return state.load(path)
    except state.StateError:
        return {}


def wait_state(
    path: Path, check: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    """Poll the state file (a KS saves within 0.2 s) until ``check`` holds for group 1234."""
    deadline = time.monotonic() + timeout
    while True:
        g = _state(path).get(1234)
        if g is not None and check(g):
            return g
        assert time.monotonic() < deadline, (
            f"state file never showed the change: {g and len(g['members'])} members"
        )
        time.sleep(0.02)


@pytest.mark.root
def test_member_dropped_for_missed_rekeys_is_saved(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "s3cret\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    ks_cfg = ks_toml(
        tmp_path,
        address="127.0.3.1",
        auth=auth,
        rekey={"retransmit_interval": 0.2, "retransmit_count": 0, "max_missed": 1},
    )
    state_file = tmp_path / "ks-state" / "state.json"
    gm_cfg = gm_toml(tmp_path, address="127.0.3.2", name="gm1", auth=auth, servers=("127.0.3.1",))
    ks = Daemon("ks", ks_cfg)
    try:
        with Daemon("gm", gm_cfg) as gm:
            gm.wait_for("GM_REGS_COMPL")
            gm.proc.send_signal(signal.SIGKILL)  # it will never acknowledge
        wait_state(state_file, lambda g: len(g["members"]) == 1)
        assert gdoictl(tmp_path / "ks.sock", "crypto", "gdoi", "ks", "rekey").returncode == 0
        ks.wait_for("KS_MEMBER_DROPPED")
        wait_state(state_file, lambda g: not g["members"])
    finally:
        ks.proc.send_signal(signal.SIGKILL)
        ks.stop()
    with Daemon("ks", ks_cfg) as again:
        again.wait_for("state_restored group=GET seq=2 members=0")
        assert (
            gdoictl_json(tmp_path / "ks.sock", "show", "crypto", "gdoi", "ks", "members")["groups"][
                0
            ]["members"]
            == []
        )


@pytest.mark.root
def test_members_merged_and_keys_adopted_from_coop_are_saved(tmp_path: Path) -> None:
    write_private(tmp_path / "psk.secret", "s3cret\n")
    write_private(tmp_path / "coop.psk", "ks-pair-secret\n")
    write_signing_key(tmp_path / "rekey.key")
    auth = auth_toml("psk.secret")
    kss = {"ks1": ("127.0.3.11", 200, "127.0.3.12"), "ks2": ("127.0.3.12", 100, "127.0.3.11")}
    cfgs = {}
    for name, (address, priority, peer) in kss.items():
        path = ks_toml(tmp_path, address=address, auth=auth, name=name)
        path.write_text(
            path.read_text() + f"\n[coop]\npriority = {priority}\nannounce_interval = 0.5\n"
            f'[[coop.peer]]\naddress = "{peer}"\npsk_file = "coop.psk"\n'
        )
        cfgs[name] = path
    gm_cfg = gm_toml(tmp_path, address="127.0.3.20", name="gm1", auth=auth, servers=("127.0.3.11",))
    state2 = tmp_path / "ks2-state" / "state.json"
    ks1 = Daemon("ks", cfgs["ks1"])
    ks2 = Daemon("ks", cfgs["ks2"])
    try:
        ks2.wait_for(r"COOP_KS_TRANS_TO_SEC: KS 127\.0\.3\.12")
        primary = gdoictl_json(tmp_path / "ks1.sock", "show", "crypto", "gdoi")["groups"][0]
        # Keys adopted by the secondary: saved (SIGKILL comes right after the file shows them).
        wait_state(state2, lambda g: g["kek"].spi.hex() == primary["kek_spi"])
        with Daemon("gm", gm_cfg) as gm:
            gm.wait_for("GM_REGS_COMPL")
            # A member registered at KS1, merged into KS2 from an ANN: saved.
            wait_state(state2, lambda g: [str(m.address) for m in g["members"]] == ["127.0.3.20"])
        ks2.proc.send_signal(signal.SIGKILL)
        ks1.proc.send_signal(signal.SIGKILL)
    finally:
        ks1.stop()
        ks2.stop()
    with Daemon("ks", cfgs["ks2"]) as again:  # alone: everything it shows came from its file
        again.wait_for(r"state_restored group=GET seq=\d+ members=1")
        restored = gdoictl_json(tmp_path / "ks2.sock", "show", "crypto", "gdoi")["groups"][0]
        assert (
            restored["kek_spi"] == primary["kek_spi"]
            and restored["tek_spis"] == primary["tek_spis"]
        )
        assert [m["address"] for m in restored["members"]] == ["127.0.3.20"]
