"""GROUPKEY-PULL after an in-memory Main Mode, decrypted independently by the test.

:func:`run_pull` runs messages (1)..(4) between a PullInitiator and a
PullResponder over a toy :class:`Directory`; :class:`Chain` decrypts every
message with the phase-1 cipher key and the phase-2 IV chain, and
:func:`prf_a` recomputes HASH(n) from SKEYID_a (wire.md §3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.protocol import crypto
from gdoid.protocol.constants import (
    AuthenticationMethod,
    ExchangeType,
    HeaderFlag,
    PayloadType,
)
from gdoid.protocol.crypto import DhGroup, HashAlgorithm, SigAlgorithm, SigHash
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Config, proposals_from_policy
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.main_mode_responder import MainModeResponder
from gdoid.protocol.policy import GroupKeys, Kek, SenderIds, Tek, TekPolicy, TrafficSelector
from gdoid.protocol.pull import (
    PullInitiator,
    PullResponder,
)
from gdoid.protocol.transforms import TekTransform
from gdoid.protocol.version import SoftwareVersion

GM_ADDR = IPv4Address("10.0.0.2")
KS_ADDR = IPv4Address("10.0.0.1")
T0 = 2_000_000.0
GROUP = 1234


@dataclass
class Phase1:
    gm: IkeSa
    ks: IkeSa
    last_block: bytes  # last CBC block of MM6, taken from the wire


def phase1(hash_: HashAlgorithm = HashAlgorithm.SHA2_256, key_bits: int = 256) -> Phase1:
    def cfg(addr: IPv4Address) -> Phase1Config:
        return Phase1Config(
            local_address=addr,
            proposals=proposals_from_policy(
                (key_bits,),
                (hash_,),
                (DhGroup.ECP_256,),
                (AuthenticationMethod.PRE_SHARED_KEY,),
                86400,
            ),
            psk_lookup=lambda _a: b"psk",
            software_version=SoftwareVersion(1, 0, 2),
        )

    init = MainModeInitiator(cfg(GM_ADDR), KS_ADDR, T0)
    resp = MainModeResponder(cfg(KS_ADDR), GM_ADDR, T0)
    [m1] = init.start(T0).send
    [m2] = resp.receive(m1, T0).send
    [m3] = init.receive(m2, T0).send
    [m4] = resp.receive(m3, T0).send
    [m5] = init.receive(m4, T0).send
    [m6] = resp.receive(m5, T0).send
    assert init.receive(m6, T0).send == []
    assert init.sa is not None and resp.sa is not None
    return Phase1(init.sa, resp.sa, m6[-16:])


def make_tek(transform: str, now: float, lifetime: int = 3600, spi: int = 0x1000_0001) -> Tek:
    t = TekTransform.from_name(transform)
    return Tek(
        spi=spi,
        policy=TekPolicy(
            1,
            t,
            TrafficSelector(IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16")),
            lifetime,
        ),
        cipher_key=bytes(range(t.cipher_key_len)),
        integrity_key=bytes(range(100, 100 + t.integrity_key_len)),
        created_at=now,
        expires_at=now + lifetime,
    )


_SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())


def make_kek(now: float, lifetime: int = 86400) -> Kek:
    return Kek(
        spi=bytes(range(16)),
        key_bits=256,
        key=b"K" * 32,
        iv=b"I" * 16,
        configured_lifetime=lifetime,
        created_at=now,
        expires_at=now + lifetime,
        sig_hash=SigHash.SHA256,
        sig_algorithm=SigAlgorithm.ECDSA_256,
        sig_key_bits=256,
        public_key_der=crypto.public_key_der(_SIGNING_KEY),
        ks_address=KS_ADDR,
    )


@dataclass
class Directory:
    groups: dict[int, GroupKeys]
    allocated: list[tuple[int, int, str]] = field(default_factory=list)
    next_sid: int = 1
    refuse: str | None = None

    def snapshot(self, group_number: int, now: float) -> GroupKeys | None:
        return self.groups.get(group_number)

    def allocate_sender_ids(self, group_number: int, count: int, member: str) -> SenderIds | None:
        self.allocated.append((group_number, count, member))
        values = tuple(range(self.next_sid, self.next_sid + count))
        self.next_sid += count
        return SenderIds(8, values)

    def authorize(self, group_number: int, sa: IkeSa) -> str | None:
        return self.refuse


def directory(*teks: Tek, kek: Kek | None = None, seq: int = 7) -> Directory:
    return Directory({GROUP: GroupKeys(GROUP, kek, teks, seq)})


@dataclass
class Seen:
    """One decrypted PULL message as the test sees it."""

    header: IsakmpHeader
    payloads: list[tuple[int, bytes]]  # (type, raw bytes incl. generic header)
    ciphertext: bytes

    def raw(self, ptype: int) -> bytes:
        return next(r for t, r in self.payloads if t == ptype)

    def body(self, ptype: int) -> bytes:
        return self.raw(ptype)[4:]


def walk_chain(first: int, plain: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos, np = 0, first
    while np:
        nxt, _res, length = struct.unpack_from("!BBH", plain, pos)
        out.append((np, plain[pos : pos + length]))
        pos += length
        np = nxt
    assert not any(plain[pos:]), "padding must be zero octets"
    assert len(plain) - pos < 16
    return out


class Chain:
    """Decrypts one exchange's messages in order, keeping the IV chain itself."""

    def __init__(self, p1: Phase1, message_id: int) -> None:
        self.sa = p1.gm
        self.key = p1.gm.cipher_key
        self.iv = crypto.phase2_iv(p1.gm.hash, p1.last_block, message_id)
        self.mid = message_id
        self.ni_b = b""

    def open(self, data: bytes) -> Seen:
        hdr = IsakmpHeader.decode(data)
        assert hdr.exchange_type == ExchangeType.GROUPKEY_PULL
        assert hdr.flags & HeaderFlag.ENCRYPTION
        assert hdr.message_id == self.mid
        ct = data[HEADER_LEN:]
        plain = crypto.aes_cbc_decrypt(self.key, self.iv, ct)
        self.iv = ct[-16:]
        seen = Seen(hdr, walk_chain(hdr.next_payload, plain), ct)
        if not self.ni_b:
            self.ni_b = seen.body(PayloadType.NONCE)
        return seen


def prf_a(sa: IkeSa, data: bytes) -> bytes:
    return crypto.prf(sa.hash, sa.keys.skeyid_a, data)


@dataclass
class Pull:
    p1: Phase1
    gm: PullInitiator
    ks: PullResponder
    seen: list[Seen]
    wire: list[bytes]
    gm_events: list[object]
    ks_events: list[object]


def run_pull(
    dirc: Directory,
    *,
    now: float = T0,
    hash_: HashAlgorithm = HashAlgorithm.SHA2_256,
    group: int = GROUP,
    tamper: dict[int, object] | None = None,
) -> Pull:
    """Run (1)..(4); ``tamper[i](data) -> data`` rewrites message i+1 on the wire."""
    p1 = phase1(hash_)
    gm = PullInitiator(p1.gm, group)
    chain = Chain(p1, gm.message_id)
    seen: list[Seen] = []
    wire: list[bytes] = []
    gm_events: list[object] = []
    ks_events: list[object] = []
    tamper = tamper or {}

    [m] = gm.start(now).send
    ks = PullResponder(p1.ks, dirc, IsakmpHeader.decode(m).message_id, now)
    to_ks = True
    while m is not None:
        if len(wire) in tamper:
            m = tamper[len(wire)](m, chain)  # type: ignore[operator]
        wire.append(m)
        seen.append(chain.open(m))
        if to_ks:
            out = ks.receive(m, now)
            ks_events += out.events
        else:
            out = gm.receive(m, now)
            gm_events += out.events
        to_ks = not to_ks
        sends = [
            d
            for d in out.send
            if IsakmpHeader.decode(d).exchange_type == ExchangeType.GROUPKEY_PULL
        ]
        notifies = [d for d in out.send if d not in sends]
        if notifies:
            wire += notifies
            break
        m = sends[0] if sends else None
    return Pull(p1, gm, ks, seen, wire, gm_events, ks_events)
