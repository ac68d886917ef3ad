"""One GDOI group on the key server: policy, current KEK/TEKs, SEQ, member table.

``Group`` is the single owner of a group's state (architecture.md).  It is
pure: callers pass ``now``; nothing here touches sockets or files.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.config.model import KsGroupConfig, SaIpsec
from gdoid.keyserver.sender_ids import SID_REKEY_MIN_INTERVAL, SenderIdAllocator
from gdoid.protocol import crypto
from gdoid.protocol.constants import GDOI_PORT
from gdoid.protocol.crypto import HashAlgorithm, PrivateKey
from gdoid.protocol.gdoi_payloads import SeqPayload
from gdoid.protocol.payloads import Payload
from gdoid.protocol.policy import (
    GroupKeys,
    Kek,
    SenderIds,
    Tek,
    TekPolicy,
    TrafficSelector,
    build_kd,
    build_sa,
    gap_payloads,
)
from gdoid.protocol.push import build_push, policy_replace_notify, removal_notify
from gdoid.protocol.version import SoftwareVersion, supports_removal_and_replace


def new_tek_spi() -> int:
    # SPIs 1..255 are reserved by IANA (RFC 4303 §2.1).
    return 0x100 + secrets.randbelow(0xFFFFFFFF - 0x100)


def tek_policy(sa: SaIpsec) -> TekPolicy:
    m = sa.match
    return TekPolicy(
        sa_number=sa.number,
        transform=sa.transform,
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
    return key.curve.key_size if isinstance(key, ec.EllipticCurvePrivateKey) else key.key_size


def new_kek(
    config: KsGroupConfig, signing_key: PrivateKey, ks_address: IPv4Address, port: int, now: float
) -> Kek:
    bits = 128 if str(config.kek.algorithm).endswith("128") else 256
    return Kek(
        spi=secrets.token_bytes(16),
        key_bits=bits,
        key=secrets.token_bytes(bits // 8),
        iv=secrets.token_bytes(16),
        configured_lifetime=config.kek.lifetime,
        created_at=now,
        expires_at=now + config.kek.lifetime,
        sig_hash=config.kek.sig_hash,
        sig_algorithm=crypto.sig_algorithm_of(signing_key),
        sig_key_bits=key_bits_of(signing_key),
        public_key_der=crypto.public_key_der(signing_key),
        ks_address=ks_address,
        port=port,
    )


@dataclass
class PendingPush:
    """A rekey sent to one GM and not yet acknowledged."""

    seq: int
    data: bytes
    retries_left: int
    next_at: float


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
    port: int = GDOI_PORT
    ack_key: bytes = field(default=b"", repr=False)
    ack_hash: HashAlgorithm = HashAlgorithm.SHA2_256
    rekeys_sent: int = 0
    rekey_retries: int = 0
    acks_received: int = 0
    pending: PendingPush | None = None
    # The KS the GM registered with (``Key Server ID``); None in rows from before it was kept.
    ks_address: IPv4Address | None = None


TBAR_REKEY_INTERVAL = 7200  # getvpn-features §4: with TBAR the KS rekeys every 2 hours


@dataclass(frozen=True)
class RekeyMessages:
    """One rekey: the signed, encrypted push per variant (sign once per distinct message)."""

    seq: int
    modern: bytes  # for GMs that support GM removal / policy replace (1.0.2)
    legacy: bytes  # for older or unknown versions: the same rekey without the instruction
    kind: str  # "scheduled", "policy-replace", "gm-removal"
    new_kek: bool


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
        self.last_rekey_at = now
        self.rekeys_sent = 0
        self.members: dict[IPv4Address, Member] = {}
        # The used-SID record: a SID counts as used under every TEK handed out while held.
        self.sids = SenderIdAllocator(
            config.sender_id_bits, lambda: [(t.spi, t.expires_at) for t in self.teks]
        )
        self.last_sid_rekey_at = -SID_REKEY_MIN_INTERVAL
        self._sid_checked_at = -SID_REKEY_MIN_INTERVAL
        # A reloaded policy waits here for the next rekey (getvpn-features §3.2).
        self.pending_config: KsGroupConfig | None = None
        self.pending_signing_key: PrivateKey | None = None

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

    # --- membership --------------------------------------------------------------

    def record_member(
        self,
        address: IPv4Address,
        identity: str,
        version: SoftwareVersion | None,
        keys: GroupKeys,
        sender_ids: SenderIds | None,
        now: float,
        port: int = GDOI_PORT,
        ack_key: bytes = b"",
        ack_hash: HashAlgorithm = HashAlgorithm.SHA2_256,
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
            port=port,
            ack_key=ack_key,
            ack_hash=ack_hash,
            ks_address=self.ks_address,
        )
        self.members[address] = member
        if old is not None:
            # The GM replaced its SIDs on every TEK it holds (it re-registered): the old
            # ones cool off until the TEKs handed out now are gone.
            self.sids.release([s for s in old.sender_ids if s not in member.sender_ids], now)
        return member

    def remove_member(self, address: IPv4Address, now: float = 0.0) -> Member | None:
        m = self.members.pop(address, None)
        if m is not None:
            self.sids.release(m.sender_ids, now)
        return m

    def reconcile_sids(self, now: float) -> None:
        self.sids.reconcile(((m.registered_at, m.sender_ids) for m in self.members.values()), now)

    def sid_rekey_due(self, now: float) -> bool:
        """Whether this KS's (or, on the primary, a peer's) SID slice runs low.

        A rekey frees space: every released SID stays tainted while a TEK that was
        handed out when it was released is still handed out (the departed GM used
        it with those keys).  The SID-exhaustion rekey replaces the TEKs (policy
        replace, see Group.plan_rekey): the KS stops handing out the old ones at
        once, so SIDs of departed GMs are free again for the new TEKs; GMs still
        holding the old TEKs only ever send under them with their own, held SIDs.
        """
        if now - self.last_sid_rekey_at < SID_REKEY_MIN_INTERVAL:
            return False
        self.sids.expire(now)
        if not (self.sids.low() or self.sids.peers_low()):
            return False
        if now - self._sid_checked_at < 5.0:
            return False  # the sweep below is O(members): not every tick
        self._sid_checked_at = now
        self.reconcile_sids(now)
        self.sids.expire(now)
        return (self.sids.low() and self.sids.reclaimable() > 0) or self.sids.peers_low()

    # --- policy --------------------------------------------------------------------

    def stage_config(self, config: KsGroupConfig, signing_key: PrivateKey | None) -> bool:
        """Keep a reloaded policy for the next rekey; True if anything changed."""
        # Authorization is the KS's own check, not policy sent to GMs: it applies at once.
        self.config = dataclasses.replace(self.config, authorization=config.authorization)
        changed_key = signing_key is not None and crypto.public_key_der(
            signing_key
        ) != crypto.public_key_der(self.signing_key)
        if config == self.config and not changed_key:
            self.pending_config = None
            self.pending_signing_key = None
            return False
        self.pending_config = config
        self.pending_signing_key = signing_key if changed_key else None
        return True

    def _kek_policy_changed(self, new: KsGroupConfig) -> bool:
        old = self.config.kek
        return (old.algorithm, old.sig_hash) != (
            new.kek.algorithm,
            new.kek.sig_hash,
        ) or self.pending_signing_key is not None

    def next_rekey_at(self) -> float:
        lead = self.config.rekey.lead_time
        newest: dict[int, Tek] = {}
        for t in self.teks:
            if (
                t.policy.sa_number not in newest
                or t.created_at > newest[t.policy.sa_number].created_at
            ):
                newest[t.policy.sa_number] = t
        times = [t.expires_at - lead for t in newest.values()]
        times.append(self.kek.expires_at - lead)
        if self.tbar:
            times.append(self.last_rekey_at + TBAR_REKEY_INTERVAL)
        return min(times)

    # --- rekeys --------------------------------------------------------------------

    def _sign_and_encrypt(self, payloads: list[Payload]) -> bytes:
        sig_hash = self.kek.sig_hash
        return build_push(self.kek, self.signing_key, sig_hash, payloads)

    def plan_rekey(
        self, now: float, *, replace: bool = False, replace_now: bool = False
    ) -> RekeyMessages:
        """New TEKs (and a new KEK when due or its policy changed), pushed under the current KEK.

        ``replace`` marks a triggered policy-replace rekey: the 1.0.2 variant
        carries POLICY_REPLACE, and the KS stops handing out the old TEKs.
        ``replace_now`` replaces the KEK too (GET VPN: the GMs' old TEK and KEK go at once).
        """
        config = self.pending_config or self.config
        kek_due = (
            replace_now
            or self.kek.expires_at - config.rekey.lead_time <= now
            or (self.pending_config is not None and self._kek_policy_changed(config))
        )
        next_key = self.pending_signing_key or self.signing_key
        new_teks = [new_tek(sa, now) for sa in config.sa_ipsec]
        next_kek = new_kek(config, next_key, self.ks_address, self.port, now) if kek_due else None
        self.seq += 1
        self.last_rekey_at = now
        pseudotime = (
            self.pseudotime_ms(now)
            if any(sa.tbar_window_ms is not None for sa in config.sa_ipsec)
            else None
        )
        keys = GroupKeys(
            self.number,
            next_kek,
            tuple(new_teks),
            self.seq,
            pseudotime,
            config.activation_delay,
            config.deactivation_delay,
        )
        if pseudotime is not None and next_kek is None:
            # TBAR needs the pseudotime in every rekey: it rides in a KEK packet, so resend the KEK.
            keys = GroupKeys(
                self.number,
                self.kek,
                tuple(new_teks),
                self.seq,
                pseudotime,
                config.activation_delay,
                config.deactivation_delay,
            )
        sa = build_sa(keys, now, gap_payloads(keys))
        kd = build_kd(keys)
        legacy = self._sign_and_encrypt([SeqPayload(self.seq), sa, kd])
        modern = (
            self._sign_and_encrypt(
                [SeqPayload(self.seq), policy_replace_notify(replace_now), sa, kd]
            )
            if replace
            else legacy
        )
        # Adopt the new state only after signing/encrypting under the old KEK and key.
        self.config = config
        self.pending_config = None
        if next_kek is not None:
            self.kek = next_kek
            self.signing_key = next_key
        self.pending_signing_key = None
        kept = [] if replace else self.current_teks(now)
        self.teks = kept + new_teks
        self.sids.expire(now)  # SIDs tainted only by TEKs no longer handed out are free
        self.rekeys_sent += 1
        kind = "policy-replace" if replace else "scheduled"
        return RekeyMessages(self.seq, modern, legacy, kind, next_kek is not None)

    def plan_removal(self, now: float, mode: int) -> RekeyMessages:
        """GM removal: tell every GM, then switch to a new KEK and TEKs nobody has yet."""
        self.seq += 1
        data = self._sign_and_encrypt([SeqPayload(self.seq), removal_notify(mode)])
        # Release the SIDs while the old TEKs are the live ones: the removed GMs used
        # them only with those, so they are free for the new TEKs nobody has yet.
        for address in list(self.members):
            self.remove_member(address, now)
        config = self.pending_config or self.config
        self.config = config
        self.pending_config = None
        self.signing_key = self.pending_signing_key or self.signing_key
        self.pending_signing_key = None
        self.kek = new_kek(config, self.signing_key, self.ks_address, self.port, now)
        self.teks = [new_tek(sa, now) for sa in config.sa_ipsec]
        self.last_rekey_at = now
        self.rekeys_sent += 1
        return RekeyMessages(self.seq, data, data, "gm-removal", True)

    def plan_handover(self, now: float, kek: Kek, teks: list[Tek], seq: int) -> RekeyMessages:
        """COOP merge: move our GMs onto another KS's KEK and TEKs with a rekey under our KEK."""
        self.seq = seq
        keys = GroupKeys(
            self.number,
            kek,
            tuple(t for t in teks if t.expires_at > now),
            seq,
            self.pseudotime_ms(now) if self.tbar else None,
            self.config.activation_delay,
            self.config.deactivation_delay,
        )
        data = self._sign_and_encrypt([SeqPayload(seq), build_sa(keys, now), build_kd(keys)])
        self.rekeys_sent += 1
        return RekeyMessages(seq, data, data, "coop-handover", True)

    def unsupported_members(self) -> list[Member]:
        return [m for m in self.members.values() if not supports_removal_and_replace(m.version)]
