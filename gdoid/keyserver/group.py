"""One GDOI group on the key server: policy, current KEK/TEKs, SEQ, member table.

``Group`` is the single owner of a group's state (architecture.md).  It is
pure: callers pass ``now``; nothing here touches sockets or files.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from gdoid.config import KsGroupConfig, SaIpsec
from gdoid.protocol import crypto
from gdoid.protocol.crypto import PrivateKey, SigHash
from gdoid.protocol.policy import (
    GroupKeys,
    Kek,
    SenderIds,
    Tek,
    TekPolicy,
    TekTransform,
    TrafficSelector,
)
from gdoid.protocol.version import SoftwareVersion

_SIG_HASHES = {"sha256": SigHash.SHA256, "sha384": SigHash.SHA384, "sha512": SigHash.SHA512}


def new_tek_spi() -> int:
    # SPIs 1..255 are reserved by IANA (RFC 4303 §2.1).
    return 0x100 + secrets.randbelow(0xFFFFFFFF - 0x100)


def tek_policy(sa: SaIpsec) -> TekPolicy:
    m = sa.match
    return TekPolicy(
        sa_number=sa.number,
        transform=TekTransform.from_name(str(sa.transform)),
        selector=TrafficSelector(m.src, m.dst, m.protocol, m.src_port, m.dst_port),
        configured_lifetime=sa.lifetime,
        tbar_window_ms=sa.tbar_window_ms,
        replay_window=sa.replay_window,
        receive_only=sa.receive_only,
    )


def new_tek(sa: SaIpsec, now: float) -> Tek:
    policy = tek_policy(sa)
    t = policy.transform
    return Tek(
        spi=new_tek_spi(),
        policy=policy,
        cipher_key=secrets.token_bytes(t.cipher_key_len),
        integrity_key=secrets.token_bytes(t.integrity_key_len),
        created_at=now,
        expires_at=now + sa.lifetime,
    )


def key_bits_of(key: PrivateKey) -> int:
    return key.key_size if hasattr(key, "key_size") else key.curve.key_size


def new_kek(config: KsGroupConfig, signing_key: PrivateKey, ks_address: IPv4Address, port: int, now: float) -> Kek:
    bits = 128 if str(config.kek.algorithm).endswith("128") else 256
    return Kek(
        spi=secrets.token_bytes(16),
        key_bits=bits,
        key=secrets.token_bytes(bits // 8),
        iv=secrets.token_bytes(16),
        configured_lifetime=config.kek.lifetime,
        created_at=now,
        expires_at=now + config.kek.lifetime,
        sig_hash=_SIG_HASHES[config.kek.sig_hash],
        sig_algorithm=crypto.sig_algorithm_of(signing_key),
        sig_key_bits=key_bits_of(signing_key),
        public_key_der=crypto.public_key_der(signing_key),
        ks_address=ks_address,
        port=port,
    )


@dataclass
class Member:
    """A row of ``show crypto gdoi ks members``."""

    address: IPv4Address
    identity: str
    version: SoftwareVersion | None
    registered_at: float
    kek_spi: bytes | None
    tek_spis: tuple[int, ...]
    sender_ids: tuple[int, ...] = ()
    registrations: int = 1
    missed_rekeys: int = 0


class SenderIdAllocator:
    """RFC 6054 sender IDs: each GM gets its own so GCM nonces never collide."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._owner: dict[int, str] = {}
        self._by_member: dict[str, tuple[int, ...]] = {}
        self._next = 1  # SID 0 is kept back: a zeroed IV then never looks valid

    def allocate(self, member: str, count: int) -> tuple[int, ...] | None:
        have = self._by_member.get(member)
        if have is not None and len(have) >= count:
            return have[:count]
        self.release(member)
        space = 1 << self.bits
        got: list[int] = []
        for _ in range(space):
            if len(got) == count:
                break
            sid = self._next
            self._next = self._next + 1 if self._next + 1 < space else 1
            if sid not in self._owner:
                got.append(sid)
        if len(got) < count:
            return None
        for sid in got:
            self._owner[sid] = member
        self._by_member[member] = tuple(got)
        return tuple(got)

    def release(self, member: str) -> None:
        for sid in self._by_member.pop(member, ()):
            self._owner.pop(sid, None)

    @property
    def in_use(self) -> int:
        return len(self._owner)


class Group:
    def __init__(
        self,
        config: KsGroupConfig,
        signing_key: PrivateKey,
        ks_address: IPv4Address,
        port: int,
        now: float,
    ) -> None:
        self.config = config
        self.signing_key = signing_key
        self.ks_address = ks_address
        self.port = port
        self.kek = new_kek(config, signing_key, ks_address, port, now)
        self.teks: list[Tek] = [new_tek(sa, now) for sa in config.sa_ipsec]
        self.seq = 1
        self.epoch = now  # pseudotime origin (TBAR)
        self.members: dict[IPv4Address, Member] = {}
        self.sids = SenderIdAllocator(config.sender_id_bits)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def number(self) -> int:
        return self.config.number

    @property
    def tbar(self) -> bool:
        return any(sa.tbar_window_ms is not None for sa in self.config.sa_ipsec)

    def pseudotime_ms(self, now: float) -> int:
        return int((now - self.epoch) * 1000)

    def current_teks(self, now: float) -> list[Tek]:
        return [t for t in self.teks if t.expires_at > now]

    def snapshot(self, now: float) -> GroupKeys:
        return GroupKeys(
            group_number=self.number,
            kek=self.kek,
            teks=tuple(self.current_teks(now)),
            seq=self.seq,
            pseudotime_ms=self.pseudotime_ms(now) if self.tbar else None,
            activation_delay=self.config.activation_delay,
            deactivation_delay=self.config.deactivation_delay,
        )

    def record_member(
        self,
        address: IPv4Address,
        identity: str,
        version: SoftwareVersion | None,
        keys: GroupKeys,
        sender_ids: SenderIds | None,
        now: float,
    ) -> Member:
        old = self.members.get(address)
        member = Member(
            address=address,
            identity=identity,
            version=version,
            registered_at=now,
            kek_spi=keys.kek.spi if keys.kek else None,
            tek_spis=tuple(t.spi for t in keys.teks),
            sender_ids=sender_ids.values if sender_ids else (),
            registrations=(old.registrations + 1) if old else 1,
        )
        self.members[address] = member
        return member

    def remove_member(self, address: IPv4Address) -> Member | None:
        m = self.members.pop(address, None)
        if m is not None:
            self.sids.release(m.identity)
        return m

    def replace_config(self, config: KsGroupConfig) -> None:
        """Adopt a reloaded policy; keys change only with the next rekey."""
        self.config = config

    def replace_tek_lifetimes(self, now: float) -> None:
        self.teks = [replace(t, expires_at=min(t.expires_at, now)) for t in self.teks]


@dataclass
class GroupTable:
    """All groups of a KS, by number; the PULL responder's directory."""

    groups: dict[int, Group] = field(default_factory=dict)

    def by_name(self, name: str) -> Group | None:
        return next((g for g in self.groups.values() if g.name == name), None)
