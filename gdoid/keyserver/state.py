"""The KS's group state on disk, so a restarted KS resumes where it stopped.

One JSON document per KS (``state_dir/state.json``): per group its key state
(a :class:`~gdoid.keyserver.group_keys.GroupKeyState`: KEK and TEKs with their
keys and lifetimes, the push SEQ, the pseudotime origin) and the member table.  Written atomically (write, fsync, rename, fsync the
directory) with mode 0600 since it holds keys.  A file that does not parse
or validate is never half-loaded: it is moved aside and reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from gdoid.fsutil import fsync_dir, write_all
from gdoid.keyserver import sender_ids
from gdoid.keyserver.fields import FieldInvalid
from gdoid.keyserver.group import Group, Member
from gdoid.keyserver.group_keys import GroupKeyState
from gdoid.protocol.crypto import HashAlgorithm
from gdoid.protocol.errors import ProtocolError
from gdoid.protocol.version import SoftwareVersion

# 2: a group's keys are one GroupKeyState object under "keys"; 1: the same fields inline.
FORMAT = 2
READABLE_FORMATS = (1, 2)
_KEY_FIELDS = ("seq", "epoch", "last_rekey_at", "rekeys_sent", "kek", "teks")


class StateError(Exception):
    """The state file is unusable; the message says why."""


def member_to_json(m: Member) -> dict[str, Any]:
    return {
        "address": str(m.address),
        "identity": m.identity,
        "version": str(m.version) if m.version else None,
        "registered_at": m.registered_at,
        "kek_spi": m.kek_spi.hex() if m.kek_spi else None,
        "tek_spis": list(m.tek_spis),
        "sender_ids": list(m.sender_ids),
        "registrations": m.registrations,
        "missed_rekeys": m.missed_rekeys,
        "port": m.port,
        "ack_key": m.ack_key.hex(),
        "ack_hash": int(m.ack_hash),
        "ks_address": str(m.ks_address) if m.ks_address is not None else None,
    }


def member_from_json(d: dict[str, Any]) -> Member:
    return Member(
        address=IPv4Address(d["address"]),
        identity=str(d["identity"]),
        version=SoftwareVersion.parse(d["version"]) if d["version"] else None,
        registered_at=float(d["registered_at"]),
        kek_spi=bytes.fromhex(d["kek_spi"]) if d["kek_spi"] else None,
        tek_spis=tuple(int(x) for x in d["tek_spis"]),
        sender_ids=tuple(int(x) for x in d["sender_ids"]),
        registrations=int(d["registrations"]),
        missed_rekeys=int(d["missed_rekeys"]),
        port=int(d["port"]),
        ack_key=bytes.fromhex(d["ack_key"]),
        ack_hash=HashAlgorithm(d["ack_hash"]),
        ks_address=IPv4Address(d["ks_address"]) if d.get("ks_address") else None,
    )


def snapshot(groups: dict[int, Group]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "saved_at": time.time(),
        "groups": [
            {
                "number": g.number,
                "name": g.name,
                "keys": GroupKeyState.of(g).to_json(),
                "members": [member_to_json(m) for m in g.members.values()],
                "sender_ids": {
                    "bits": g.sids.bits,
                    "record": sender_ids.state_json(
                        g.sids, max((m.registered_at for m in g.members.values()), default=0.0)
                    ),
                },
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
    """Parse and validate the whole file first; return per-group restored objects.

    Each group's ``keys`` is a :class:`GroupKeyState`; ``seq``, ``kek`` and ``teks``
    are its fields, for readers that want only those.  Format 1 files (the key
    fields inline in each group) are read as well.
    """
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot parse: {exc}") from exc
    try:
        if doc.get("format") not in READABLE_FORMATS:
            raise StateError(f"unknown format {doc.get('format')!r}")
        out: dict[int, dict[str, Any]] = {}
        for g in doc["groups"]:
            number = int(g["number"])
            raw = {k: g[k] for k in _KEY_FIELDS} if doc["format"] == 1 else g["keys"]
            keys = GroupKeyState.from_json(raw, f"group {number}.keys")
            out[number] = {
                "keys": keys,
                "seq": keys.seq,
                "kek": keys.kek,
                "teks": list(keys.teks),
                "members": [member_from_json(m) for m in g["members"]],
                "sender_ids": _sids_from_json(g.get("sender_ids")),
            }
        return out
    except StateError:
        raise
    except FieldInvalid as exc:
        raise StateError(f"invalid content: {exc}") from exc
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
    keys: GroupKeyState = restored["keys"]
    keys.install(group)
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
