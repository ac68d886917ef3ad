"""Group policy and keys as they travel in SA (SAK/SAT) and KD payloads.

The KS turns its current :class:`GroupKeys` into payloads with
:func:`build_sa` / :func:`build_kd`; the GM turns received payloads back into
:class:`GroupKeys` with :func:`parse_sa` / :func:`parse_keys`, refusing any ESP
policy it cannot implement (no partial install).  SATs of another data-security
protocol (AH, RFC 8052's, private use) are skipped: they protect traffic this
ESP data path never handles (docs/wire.md, "SATs of other protocols").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from gdoid.protocol import crypto
from gdoid.protocol.attributes import Attribute, find
from gdoid.protocol.constants import (
    GDOI_PORT,
    AddressPreservation,
    AuthenticationAlgorithm,
    EncapsulationMode,
    EspTransformId,
    GdoiProtocol,
    IpsecAttribute,
    KekAlgorithm,
    KekAttribute,
    KekKeyAttribute,
    KeyPacketType,
    LifeType,
    NotifyType,
    SaDirection,
    SidAttribute,
    TekKeyAttribute,
)
from gdoid.protocol.crypto import SigAlgorithm, SigHash
from gdoid.protocol.errors import CryptoError, NotifyError, ProtocolError
from gdoid.protocol.gdoi_payloads import (
    GapPayload,
    GdoiSaPayload,
    KdPayload,
    KeyPacket,
    OpaqueSatPayload,
    SakPayload,
    SatPayload,
    TrafficId,
)
from gdoid.protocol.payloads import Payload
from gdoid.protocol.transforms import TekTransform

IPPROTO_UDP = 17
MAX_REPLAY_WINDOW = 65536  # packets; the KS's config allows 64..1024 (IOS's range)
MAX_PSEUDOTIME_MS = (1 << 63) - 1  # leaves 2**63 ms of room in the 8-octet TBAR field
# IPsec DOI attribute types we do not know but may ignore: the private-use range.
_PRIVATE_ATTRIBUTES = range(32001, 32768)


class SelectorFamilyError(ProtocolError, ValueError):
    """A traffic selector whose source and destination are of different IP families."""


@dataclass(frozen=True)
class TrafficSelector:
    """What a TEK protects: IPv4 or IPv6 prefixes, both of one family (an ESP
    packet has one IP header, so a mixed selector could match nothing)."""

    src: ipaddress.IPv4Network | ipaddress.IPv6Network
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    ip_protocol: int = 0
    src_port: int = 0
    dst_port: int = 0

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise SelectorFamilyError(
                f"traffic selector: src {self.src} is IPv{self.src.version}, "
                f"dst {self.dst} is IPv{self.dst.version}"
            )

    def describe(self) -> str:
        proto = "ip" if self.ip_protocol == 0 else str(self.ip_protocol)
        return f"{proto} {self.src} -> {self.dst}"


@dataclass(frozen=True)
class TekPolicy:
    """Everything about a TEK except its keys: what the SAT says."""

    sa_number: int
    transform: TekTransform
    selector: TrafficSelector
    configured_lifetime: int  # TEK_CLT
    tbar_window_ms: int | None = None
    replay_window: int | None = None
    receive_only: bool = False


@dataclass(frozen=True)
class Tek:
    spi: int
    policy: TekPolicy
    cipher_key: bytes = field(repr=False)
    integrity_key: bytes = field(repr=False)
    created_at: float
    expires_at: float

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires_at - now))


@dataclass(frozen=True)
class Kek:
    spi: bytes  # 16 octets: the CKY-I | CKY-R of pushes under this KEK
    key_bits: int
    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)  # static CBC IV for pushes (wire.md §5)
    configured_lifetime: int
    created_at: float
    expires_at: float
    sig_hash: SigHash
    sig_algorithm: SigAlgorithm
    sig_key_bits: int
    public_key_der: bytes  # KS rekey verification key, SubjectPublicKeyInfo
    ks_address: ipaddress.IPv4Address
    port: int = GDOI_PORT

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires_at - now))


@dataclass(frozen=True)
class GroupKeys:
    """A group's current policy and keys, as the KS hands them out."""

    group_number: int
    kek: Kek | None
    teks: tuple[Tek, ...]
    seq: int
    pseudotime_ms: int | None = None
    activation_delay: int = 0
    deactivation_delay: int = 0


@dataclass(frozen=True)
class SenderIds:
    bits: int
    values: tuple[int, ...]


# --- KS side --------------------------------------------------------------


def build_sak(kek: Kek, now: float) -> SakPayload:
    attrs = (
        Attribute(KekAttribute.KEK_ALGORITHM, KekAlgorithm.KEK_ALG_AES),
        Attribute(KekAttribute.KEK_KEY_LENGTH, kek.key_bits),
        Attribute.long(KekAttribute.KEK_KEY_LIFETIME, kek.remaining(now)),
        Attribute(KekAttribute.SIG_HASH_ALGORITHM, kek.sig_hash),
        Attribute(KekAttribute.SIG_ALGORITHM, kek.sig_algorithm),
        Attribute(KekAttribute.SIG_KEY_LENGTH, kek.sig_key_bits),
    )
    src = TrafficId.from_network(ipaddress.IPv4Network((kek.ks_address, 32)), kek.port)
    dst = TrafficId.from_network(ipaddress.IPv4Network("0.0.0.0/0"), kek.port)
    return SakPayload(IPPROTO_UDP, src, dst, kek.spi, attrs)


def build_sat(tek: Tek, now: float) -> SatPayload:
    p = tek.policy
    t = p.transform
    attrs = [
        Attribute(IpsecAttribute.SA_LIFE_TYPE, LifeType.SECONDS),
        Attribute.long(IpsecAttribute.SA_LIFE_DURATION, tek.remaining(now)),
        Attribute(IpsecAttribute.ENCAPSULATION_MODE, EncapsulationMode.TUNNEL),
    ]
    if t.integrity is not None:
        attrs.append(Attribute(IpsecAttribute.AUTHENTICATION_ALGORITHM, t.integrity))
    attrs += [
        Attribute(IpsecAttribute.KEY_LENGTH, t.key_bits),
        Attribute(IpsecAttribute.ADDRESS_PRESERVATION, AddressPreservation.SOURCE_AND_DESTINATION),
        Attribute(IpsecAttribute.SA_DIRECTION, SaDirection.SYMMETRIC),
        Attribute.long(IpsecAttribute.CONFIGURED_LIFETIME, p.configured_lifetime),
    ]
    if p.tbar_window_ms is not None:
        attrs.append(Attribute.long(IpsecAttribute.TBAR_WINDOW, p.tbar_window_ms))
    if p.replay_window is not None:
        attrs.append(Attribute.long(IpsecAttribute.REPLAY_WINDOW, p.replay_window))
    if p.receive_only:
        attrs.append(Attribute(IpsecAttribute.RECEIVE_ONLY, 1))
    sel = p.selector
    return SatPayload(
        GdoiProtocol.GDOI_PROTO_IPSEC_ESP,
        sel.ip_protocol,
        TrafficId.from_network(sel.src, sel.src_port),
        TrafficId.from_network(sel.dst, sel.dst_port),
        t.transform_id,
        tek.spi,
        tuple(attrs),
    )


def build_sa(keys: GroupKeys, now: float, extra: Sequence[Payload] = ()) -> GdoiSaPayload:
    attrs: list[Payload] = []
    if keys.kek is not None:
        attrs.append(build_sak(keys.kek, now))
    attrs += [build_sat(t, now) for t in keys.teks]
    attrs += list(extra)
    return GdoiSaPayload(tuple(attrs))


def gap_payloads(keys: GroupKeys) -> list[Payload]:
    """The GAP inside the SA when activation/deactivation delays are configured."""
    from gdoid.protocol.constants import GapAttribute

    if not (keys.activation_delay or keys.deactivation_delay):
        return []
    return [
        GapPayload(
            (
                Attribute(GapAttribute.ACTIVATION_TIME_DELAY, keys.activation_delay),
                Attribute(GapAttribute.DEACTIVATION_TIME_DELAY, keys.deactivation_delay),
            )
        )
    ]


def kek_packet(kek: Kek, pseudotime_ms: int | None) -> KeyPacket:
    attrs = [
        Attribute(KekKeyAttribute.KEK_ALGORITHM_KEY, kek.iv + kek.key),
        Attribute(KekKeyAttribute.SIG_ALGORITHM_KEY, kek.public_key_der),
    ]
    if pseudotime_ms is not None:
        attrs.append(Attribute.long(KekKeyAttribute.GROUP_PSEUDOTIME, pseudotime_ms, 8))
    return KeyPacket(KeyPacketType.KEK, kek.spi, tuple(attrs))


def tek_packet(tek: Tek) -> KeyPacket:
    attrs = [Attribute(TekKeyAttribute.TEK_ALGORITHM_KEY, tek.cipher_key)]
    if tek.integrity_key:
        attrs.append(Attribute(TekKeyAttribute.TEK_INTEGRITY_KEY, tek.integrity_key))
    return KeyPacket(KeyPacketType.TEK, tek.spi.to_bytes(4, "big"), tuple(attrs))


def sid_packet(sids: SenderIds) -> KeyPacket:
    attrs = [Attribute(SidAttribute.NUMBER_OF_SID_BITS, sids.bits)]
    attrs += [Attribute.long(SidAttribute.SID_VALUE, v) for v in sids.values]
    return KeyPacket(KeyPacketType.SID, b"", tuple(attrs))


def build_kd(keys: GroupKeys, sids: SenderIds | None = None) -> KdPayload:
    packets = []
    if keys.kek is not None:
        packets.append(kek_packet(keys.kek, keys.pseudotime_ms))
    packets += [tek_packet(t) for t in keys.teks]
    if sids is not None and sids.values:
        packets.append(sid_packet(sids))
    return KdPayload(tuple(packets))


# --- GM side --------------------------------------------------------------


def _refuse(reason: str, notify: NotifyType = NotifyType.ATTRIBUTES_NOT_SUPPORTED) -> NotifyError:
    return NotifyError(notify, reason)


_KNOWN_SAT_ATTRIBUTES = {a.value for a in IpsecAttribute}


def parse_sat(sat: SatPayload, now: float) -> tuple[int, TekPolicy, float]:
    """The (SPI, policy, expiry) a SAT describes, or NotifyError if we cannot implement it."""
    where = f"SAT SPI 0x{sat.spi:08x}"
    if sat.protocol_id != GdoiProtocol.GDOI_PROTO_IPSEC_ESP:
        reason = f"{where}: unsupported SA TEK protocol {sat_protocol_name(sat.protocol_id)}"
        raise _refuse(reason, NotifyType.INVALID_PROTOCOL_ID)
    for a in sat.attributes:
        if a.type not in _KNOWN_SAT_ATTRIBUTES and a.type not in _PRIVATE_ATTRIBUTES:
            raise _refuse(f"{where}: unsupported SA attribute {a.type}")
    attrs = sat.attributes

    def value(t: IpsecAttribute) -> int | None:
        a = find(attrs, t)
        return a.int_value if a is not None else None

    key_bits = value(IpsecAttribute.KEY_LENGTH)
    auth = value(IpsecAttribute.AUTHENTICATION_ALGORITHM)
    if sat.transform_id == EspTransformId.ESP_AES_GCM_16:
        if auth is not None:
            raise _refuse(f"{where}: AES-GCM with an authentication algorithm")
        integrity = None
    elif sat.transform_id == EspTransformId.ESP_AES_CBC:
        if auth != AuthenticationAlgorithm.HMAC_SHA2_256:
            raise _refuse(f"{where}: AES-CBC needs HMAC-SHA-256, got {auth}")
        integrity = AuthenticationAlgorithm.HMAC_SHA2_256
    else:
        raise _refuse(
            f"{where}: unsupported transform {sat.transform_id}", NotifyType.INVALID_TRANSFORM_ID
        )
    if key_bits not in (128, 256):
        raise _refuse(f"{where}: key length {key_bits}")
    mode = value(IpsecAttribute.ENCAPSULATION_MODE)
    if mode not in (None, EncapsulationMode.TUNNEL):
        raise _refuse(f"{where}: encapsulation mode {mode}; only tunnel is implemented")
    pres = value(IpsecAttribute.ADDRESS_PRESERVATION)
    if pres not in (None, AddressPreservation.SOURCE_AND_DESTINATION):
        raise _refuse(f"{where}: address preservation {pres}; only source-and-destination")
    direction = value(IpsecAttribute.SA_DIRECTION)
    if direction not in (None, SaDirection.SYMMETRIC):
        raise _refuse(f"{where}: SA direction {direction}; only symmetric")
    ltype = value(IpsecAttribute.SA_LIFE_TYPE)
    life = value(IpsecAttribute.SA_LIFE_DURATION)
    if ltype not in (None, LifeType.SECONDS) or life is None or life <= 0:
        raise _refuse(f"{where}: needs a lifetime in seconds")
    replay = value(IpsecAttribute.REPLAY_WINDOW)
    if replay is not None and replay > MAX_REPLAY_WINDOW:
        # The data path keeps a bitmap of this many bits per sender: bound what a KS can make it hold.
        raise _refuse(f"{where}: replay window {replay} above {MAX_REPLAY_WINDOW}")
    try:
        # DecodeError from an unknown ID type or a bad mask/range; SelectorFamilyError
        # when src and dst are of different families (no partial install of such a TEK).
        selector = TrafficSelector(
            sat.src.to_network(), sat.dst.to_network(), sat.ip_protocol, sat.src.port, sat.dst.port
        )
    except (ProtocolError, ValueError) as exc:
        raise _refuse(
            f"{where}: traffic selector: {exc}", NotifyType.INVALID_ID_INFORMATION
        ) from exc
    policy = TekPolicy(
        sa_number=0,
        transform=TekTransform(EspTransformId(sat.transform_id), key_bits, integrity),
        selector=selector,
        configured_lifetime=value(IpsecAttribute.CONFIGURED_LIFETIME) or life,
        tbar_window_ms=value(IpsecAttribute.TBAR_WINDOW),
        replay_window=replay,
        receive_only=bool(value(IpsecAttribute.RECEIVE_ONLY)),
    )
    return sat.spi, policy, now + life


@dataclass(frozen=True)
class KekPolicy:
    spi: bytes
    key_bits: int
    lifetime: int
    sig_hash: SigHash
    sig_algorithm: SigAlgorithm
    sig_key_bits: int
    ks_address: ipaddress.IPv4Address
    port: int


def parse_sak(sak: SakPayload) -> KekPolicy:
    def value(t: KekAttribute) -> int | None:
        a = find(sak.attributes, t)
        return a.int_value if a is not None else None

    alg = value(KekAttribute.KEK_ALGORITHM)
    bits = value(KekAttribute.KEK_KEY_LENGTH)
    if alg != KekAlgorithm.KEK_ALG_AES or bits not in (128, 256):
        raise _refuse(f"SAK: KEK algorithm {alg} / {bits} bits not supported")
    life = value(KekAttribute.KEK_KEY_LIFETIME)
    if not life:
        raise _refuse("SAK: no KEK lifetime")
    try:
        sig_hash = SigHash(value(KekAttribute.SIG_HASH_ALGORITHM) or 0)
        sig_alg = SigAlgorithm(value(KekAttribute.SIG_ALGORITHM) or 0)
    except ValueError as exc:
        raise _refuse(f"SAK: signature algorithm not supported ({exc})") from exc
    try:
        ks = sak.src.to_network().network_address
    except Exception as exc:
        raise _refuse(f"SAK: source identity: {exc}", NotifyType.INVALID_ID_INFORMATION) from exc
    if not isinstance(ks, ipaddress.IPv4Address):
        # Rekeys from an IPv6 KS are issue 11 §2 (control plane over IPv6), not done yet.
        raise _refuse(f"SAK: KS address {ks} is not IPv4", NotifyType.INVALID_ID_INFORMATION)
    return KekPolicy(
        sak.spi,
        bits,
        life,
        sig_hash,
        sig_alg,
        value(KekAttribute.SIG_KEY_LENGTH) or 0,
        ks,
        sak.src.port,
    )


def sat_protocol_name(protocol_id: int) -> str:
    """``6``, or ``2 (GDOI_PROTO_IPSEC_AH)`` for the ones RFC 6407 names."""
    try:
        return f"{protocol_id} ({GdoiProtocol(protocol_id).name})" if protocol_id else "0"
    except ValueError:
        return str(protocol_id)


@dataclass(frozen=True)
class ParsedSa:
    """Phase one of GM validation: the SA of PULL message 2 (or a push)."""

    kek: KekPolicy | None
    teks: tuple[tuple[int, TekPolicy, float], ...]
    gap: GapPayload | None
    skipped: tuple[int, ...] = ()  # Protocol-IDs of SATs that are not ESP, in order

    @property
    def needs_sender_ids(self) -> bool:
        return any(p.transform.is_gcm for _, p, _ in self.teks)

    @property
    def skipped_reason(self) -> str | None:
        """``unsupported SA TEK protocol 6`` when SATs were skipped, else None."""
        if not self.skipped:
            return None
        names = ", ".join(sat_protocol_name(p) for p in dict.fromkeys(self.skipped))
        return f"unsupported SA TEK protocol {names}"


def parse_sa(sa: GdoiSaPayload, now: float, require_tek: bool = True) -> ParsedSa:
    """Validate the SA; SATs of other protocols than ESP are skipped (``ParsedSa.skipped``).

    With ``require_tek`` (registration) an SA left without an ESP TEK is refused:
    INVALID_PROTOCOL_ID when it only had SATs of other protocols.
    """
    kek = parse_sak(sa.sak) if sa.sak is not None else None
    teks = []
    skipped = []
    for s in sa.all_sats:
        if isinstance(s, SatPayload) and s.protocol_id == GdoiProtocol.GDOI_PROTO_IPSEC_ESP:
            teks.append(parse_sat(s, now))
        else:
            assert isinstance(s, SatPayload | OpaqueSatPayload)
            skipped.append(s.protocol_id)
    parsed = ParsedSa(kek, tuple(teks), sa.gap, tuple(skipped))
    if require_tek and not teks:
        if parsed.skipped_reason is not None:
            raise _refuse(parsed.skipped_reason, NotifyType.INVALID_PROTOCOL_ID)
        raise _refuse("SA carries no SAT", NotifyType.BAD_PROPOSAL_SYNTAX)
    if len({spi for spi, _, _ in teks}) != len(teks):
        raise _refuse("two SATs with the same SPI", NotifyType.INVALID_SPI)
    return parsed


def parse_keys(
    parsed: ParsedSa, kd: KdPayload, seq: int, group_number: int, now: float, want_sids: bool
) -> tuple[GroupKeys, SenderIds | None]:
    """Match the KD's key packets to the SA; every SA entry needs its keys, nothing extra."""
    kek: Kek | None = None
    pseudotime = None
    kek_packets = kd.of_type(KeyPacketType.KEK)
    if parsed.kek is not None:
        if len(kek_packets) != 1 or kek_packets[0].spi != parsed.kek.spi:
            raise _refuse("KD: no KEK key packet for the SAK's SPI", NotifyType.INVALID_SPI)
        p = parsed.kek
        attrs = kek_packets[0].attributes
        key_attr = find(attrs, KekKeyAttribute.KEK_ALGORITHM_KEY)
        pub_attr = find(attrs, KekKeyAttribute.SIG_ALGORITHM_KEY)
        if key_attr is None or len(key_attr.bytes_value) != 16 + p.key_bits // 8:
            raise _refuse(
                "KD: KEK_ALGORITHM_KEY must be 16-octet IV plus the key",
                NotifyType.INVALID_KEY_INFORMATION,
            )
        if pub_attr is None:
            raise _refuse("KD: no SIG_ALGORITHM_KEY", NotifyType.INVALID_KEY_INFORMATION)
        try:
            pub = crypto.load_public_key_der(pub_attr.bytes_value)
            if crypto.sig_algorithm_of(pub) != p.sig_algorithm:
                raise CryptoError("signing key does not match SIG_ALGORITHM")
        except CryptoError as exc:
            raise _refuse(f"KD: KS signing key: {exc}", NotifyType.INVALID_KEY_INFORMATION) from exc
        pt = find(attrs, KekKeyAttribute.GROUP_PSEUDOTIME)
        pseudotime = pt.int_value if pt is not None else None
        if pseudotime is not None and pseudotime > MAX_PSEUDOTIME_MS:
            # The data path adds elapsed time and sends it back in 8 octets: keep the room.
            raise _refuse(
                f"KD: GROUP_PSEUDOTIME {pseudotime} out of range",
                NotifyType.INVALID_KEY_INFORMATION,
            )
        raw = key_attr.bytes_value
        kek = Kek(
            spi=p.spi,
            key_bits=p.key_bits,
            key=raw[16:],
            iv=raw[:16],
            configured_lifetime=p.lifetime,
            created_at=now,
            expires_at=now + p.lifetime,
            sig_hash=p.sig_hash,
            sig_algorithm=p.sig_algorithm,
            sig_key_bits=p.sig_key_bits,
            public_key_der=pub_attr.bytes_value,
            ks_address=p.ks_address,
            port=p.port,
        )
    elif kek_packets:
        raise _refuse("KD: KEK key packet without a SAK", NotifyType.INVALID_SPI)

    by_spi = {}
    wanted = {spi for spi, _, _ in parsed.teks}
    unused = 0  # TEK key packets for no ESP SAT: allowed once per skipped SAT, never read
    for pkt in kd.of_type(KeyPacketType.TEK):
        spi = int.from_bytes(pkt.spi, "big")
        if len(pkt.spi) == 4 and spi in wanted and spi not in by_spi:
            by_spi[spi] = pkt
        elif len(pkt.spi) != 4 and not parsed.skipped:
            raise _refuse("KD: TEK SPI must be 4 octets", NotifyType.INVALID_SPI)
        else:
            unused += 1
    if unused > len(parsed.skipped):
        raise _refuse("KD: keys for a TEK the SA does not describe", NotifyType.INVALID_SPI)
    teks = []
    for spi, policy, expires in parsed.teks:
        tek_keys = by_spi.pop(spi, None)
        if tek_keys is None:
            raise _refuse(f"KD: no keys for TEK SPI 0x{spi:08x}", NotifyType.INVALID_SPI)
        ck = find(tek_keys.attributes, TekKeyAttribute.TEK_ALGORITHM_KEY)
        ik = find(tek_keys.attributes, TekKeyAttribute.TEK_INTEGRITY_KEY)
        t = policy.transform
        if ck is None or len(ck.bytes_value) != t.cipher_key_len:
            raise _refuse(
                f"KD: TEK 0x{spi:08x} cipher key must be {t.cipher_key_len} octets",
                NotifyType.INVALID_KEY_INFORMATION,
            )
        ikey = ik.bytes_value if ik is not None else b""
        if len(ikey) != t.integrity_key_len:
            raise _refuse(
                f"KD: TEK 0x{spi:08x} integrity key must be {t.integrity_key_len} octets",
                NotifyType.INVALID_KEY_INFORMATION,
            )
        teks.append(Tek(spi, policy, ck.bytes_value, ikey, now, expires))

    sids = None
    sid_packets = kd.of_type(KeyPacketType.SID)
    if sid_packets:
        attrs = sid_packets[0].attributes
        bits_attr = find(attrs, SidAttribute.NUMBER_OF_SID_BITS)
        values = tuple(a.int_value for a in attrs if a.type == SidAttribute.SID_VALUE)
        if bits_attr is None or not 1 <= bits_attr.int_value <= 32 or not values:
            raise _refuse(
                "KD: SID packet without bits or values", NotifyType.INVALID_KEY_INFORMATION
            )
        if any(v >= 1 << bits_attr.int_value for v in values):
            raise _refuse(
                "KD: SID value wider than NUMBER_OF_SID_BITS", NotifyType.INVALID_KEY_INFORMATION
            )
        sids = SenderIds(bits_attr.int_value, values)
    if want_sids and sids is None:
        raise _refuse(
            "KD: sender IDs were requested but none came", NotifyType.INVALID_KEY_INFORMATION
        )
    activation = deactivation = 0
    if parsed.gap is not None:
        from gdoid.protocol.constants import GapAttribute

        a = find(parsed.gap.attributes, GapAttribute.ACTIVATION_TIME_DELAY)
        d = find(parsed.gap.attributes, GapAttribute.DEACTIVATION_TIME_DELAY)
        activation = a.int_value if a else 0
        deactivation = d.int_value if d else 0
    keys = GroupKeys(group_number, kek, tuple(teks), seq, pseudotime, activation, deactivation)
    return keys, sids
