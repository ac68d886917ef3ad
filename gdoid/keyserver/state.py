"""The KS's group state on disk, so a restarted KS resumes where it stopped.

One JSON document per KS (``state_dir/state.json``): per group the KEK and
TEKs with their keys and lifetimes, the push SEQ, the pseudotime origin and
the member table.  Written atomically (write, fsync, rename, fsync the
directory) with mode 0600 since it holds keys.  A file that does not parse
or validate is never half-loaded: it is moved aside and reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from gdoid.fsutil import fsync_dir, write_all
from gdoid.keyserver import sender_ids
from gdoid.keyserver.group import Group, Member
from gdoid.protocol.crypto import HashAlgorithm, SigAlgorithm, SigHash
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.policy import Kek, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.transforms import TekTransform
from gdoid.protocol.version import SoftwareVersion

FORMAT = 1


class StateError(Exception):
    """The state file is unusable; the message says why."""


def kek_to_json(k: Kek) -> dict[str, Any]:
    return {
        "spi": k.spi.hex(), "key_bits": k.key_bits, "key": k.key.hex(), "iv": k.iv.hex(),
        "configured_lifetime": k.configured_lifetime, "created_at": k.created_at, "expires_at": k.expires_at,
        "sig_hash": int(k.sig_hash), "sig_algorithm": int(k.sig_algorithm), "sig_key_bits": k.sig_key_bits,
        "public_key": k.public_key_der.hex(), "ks_address": str(k.ks_address), "port": k.port,
    }


def kek_from_json(d: dict[str, Any]) -> Kek:
    return Kek(
        spi=bytes.fromhex(d["spi"]), key_bits=int(d["key_bits"]), key=bytes.fromhex(d["key"]),
        iv=bytes.fromhex(d["iv"]), configured_lifetime=int(d["configured_lifetime"]),
        created_at=float(d["created_at"]), expires_at=float(d["expires_at"]), sig_hash=SigHash(d["sig_hash"]),
        sig_algorithm=SigAlgorithm(d["sig_algorithm"]), sig_key_bits=int(d["sig_key_bits"]),
        public_key_der=bytes.fromhex(d["public_key"]), ks_address=IPv4Address(d["ks_address"]), port=int(d["port"]),
    )


def tek_to_json(t: Tek) -> dict[str, Any]:
    p = t.policy
    s = p.selector
    return {
        "spi": t.spi, "sa_number": p.sa_number, "transform": p.transform.name,
        "src": str(s.src), "dst": str(s.dst), "ip_protocol": s.ip_protocol,
        "src_port": s.src_port, "dst_port": s.dst_port, "configured_lifetime": p.configured_lifetime,
        "tbar_window_ms": p.tbar_window_ms, "replay_window": p.replay_window, "receive_only": p.receive_only,
        "cipher_key": t.cipher_key.hex(), "integrity_key": t.integrity_key.hex(),
        "created_at": t.created_at, "expires_at": t.expires_at,
    }


def tek_from_json(d: dict[str, Any]) -> Tek:
    policy = TekPolicy(
        sa_number=int(d["sa_number"]), transform=TekTransform.from_name(d["transform"]),
        selector=TrafficSelector(IPv4Network(d["src"]), IPv4Network(d["dst"]), int(d["ip_protocol"]),
                                 int(d["src_port"]), int(d["dst_port"])),
        configured_lifetime=int(d["configured_lifetime"]), tbar_window_ms=d["tbar_window_ms"],
        replay_window=d["replay_window"], receive_only=bool(d["receive_only"]),
    )
    tek = Tek(int(d["spi"]), policy, bytes.fromhex(d["cipher_key"]), bytes.fromhex(d["integrity_key"]),
              float(d["created_at"]), float(d["expires_at"]))
    if len(tek.cipher_key) != policy.transform.cipher_key_len or len(tek.integrity_key) != policy.transform.integrity_key_len:
        raise StateError(f"TEK 0x{tek.spi:08x}: key lengths do not match {policy.transform.name}")
    return tek


def member_to_json(m: Member) -> dict[str, Any]:
    return {
        "address": str(m.address), "identity": m.identity, "version": str(m.version) if m.version else None,
        "registered_at": m.registered_at, "kek_spi": m.kek_spi.hex() if m.kek_spi else None,
        "tek_spis": list(m.tek_spis), "sender_ids": list(m.sender_ids), "registrations": m.registrations,
        "missed_rekeys": m.missed_rekeys, "port": m.port, "ack_key": m.ack_key.hex(), "ack_hash": int(m.ack_hash),
    }


def member_from_json(d: dict[str, Any]) -> Member:
    return Member(
        address=IPv4Address(d["address"]), identity=str(d["identity"]),
        version=SoftwareVersion.parse(d["version"]) if d["version"] else None,
        registered_at=float(d["registered_at"]), kek_spi=bytes.fromhex(d["kek_spi"]) if d["kek_spi"] else None,
        tek_spis=tuple(int(x) for x in d["tek_spis"]), sender_ids=tuple(int(x) for x in d["sender_ids"]),
        registrations=int(d["registrations"]), missed_rekeys=int(d["missed_rekeys"]), port=int(d["port"]),
        ack_key=bytes.fromhex(d["ack_key"]), ack_hash=HashAlgorithm(d["ack_hash"]),
    )


def snapshot(groups: dict[int, Group]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "saved_at": time.time(),
        "groups": [
            {
                "number": g.number, "name": g.name, "seq": g.seq, "epoch": g.epoch,
                "last_rekey_at": g.last_rekey_at, "rekeys_sent": g.rekeys_sent,
                "kek": kek_to_json(g.kek), "teks": [tek_to_json(t) for t in g.teks],
                "members": [member_to_json(m) for m in g.members.values()],
                "sender_ids": {"bits": g.sids.bits, "record": sender_ids.state_json(
                    g.sids, max((m.registered_at for m in g.members.values()), default=0.0))},
            }
            for g in groups.values()
        ],
    }


def save(path: Path, groups: dict[int, Group]) -> None:
    data = json.dumps(snapshot(groups), separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = _create_private(tmp)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _create_private(tmp: Path) -> int:
    """A new, empty 0600 file at ``tmp``: never an existing file, never via a symlink.

    A temporary left by a crash (or anything planted in its place) is unlinked
    first; unlink removes a symlink itself, not its target.  O_EXCL|O_NOFOLLOW
    then guarantees that what we write to is the inode we just created.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            return os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue  # re-created between unlink and open: someone races us; retry
    raise FileExistsError(f"{tmp} keeps reappearing: not writing the state through it")


def load(path: Path) -> dict[int, dict[str, Any]]:
    """Parse and validate the whole file first; return per-group restored objects."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot parse: {exc}") from exc
    try:
        if doc.get("format") != FORMAT:
            raise StateError(f"unknown format {doc.get('format')!r}")
        out: dict[int, dict[str, Any]] = {}
        for g in doc["groups"]:
            out[int(g["number"])] = {
                "seq": int(g["seq"]), "epoch": float(g["epoch"]), "last_rekey_at": float(g["last_rekey_at"]),
                "rekeys_sent": int(g["rekeys_sent"]), "kek": kek_from_json(g["kek"]),
                "teks": [tek_from_json(t) for t in g["teks"]],
                "members": [member_from_json(m) for m in g["members"]],
                "sender_ids": _sids_from_json(g.get("sender_ids")),
            }
        return out
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"invalid content: {type(exc).__name__}: {exc}") from exc


def _sids_from_json(value: Any) -> dict[str, Any] | None:
    """The used-SID record, validated (None in files written before it existed)."""
    if value is None:
        return None
    try:
        bits = int(value["bits"])
        sender_ids.parse_record(value["record"], bits)
    except ProtocolError as exc:
        raise StateError(f"sender IDs: {exc}") from exc
    return {"bits": bits, "record": value["record"]}


def apply(group: Group, restored: dict[str, Any]) -> None:
    """Adopt restored keys and members. The signing key comes from the config."""
    group.kek = replace(restored["kek"])
    group.teks = list(restored["teks"])
    group.seq = restored["seq"]
    group.epoch = restored["epoch"]
    group.last_rekey_at = restored["last_rekey_at"]
    group.rekeys_sent = restored["rekeys_sent"]
    group.members = {m.address: m for m in restored["members"]}
    sids = restored.get("sender_ids")
    if sids is not None and sids["bits"] == group.sids.bits:
        # Reserved SIDs come back as orphans: message 4 may have carried them after the save.
        sender_ids.restore(group.sids, sids["record"])
    for m in group.members.values():
        if m.sender_ids:
            group.sids.claim(m.identity, m.sender_ids)


def move_aside(path: Path) -> Path:
    target = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    os.replace(path, target)
    return target
