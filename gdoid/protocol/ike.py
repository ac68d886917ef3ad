"""IKEv1 Main Mode (RFC 2409 §5) initiator and responder as sans-I/O machines.

A machine takes ``(message, now)`` and returns an :class:`Output`: datagrams to
send and events.  Timers are exposed as ``deadline``; the shell calls
``on_timeout(now)`` when it passes.  The established result is an
:class:`IkeSa`, which also protects the phase-2 exchanges (GROUPKEY-PULL,
Informational, COOP ANN) with the IV chains of RFC 2409 appendix B.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

from cryptography import x509

from gdoid.protocol import crypto
from gdoid.protocol.attributes import Attribute, find
from gdoid.protocol.constants import (
    KEY_IKE,
    MAIN_MODE,
    SIT_IDENTITY_ONLY,
    AuthenticationMethod,
    CertEncoding,
    Doi,
    EncryptionAlgorithm,
    ExchangeType,
    HeaderFlag,
    IdType,
    LifeType,
    NotifyType,
    PayloadType,
    Phase1Attribute,
    ProtocolId,
)
from gdoid.protocol.crypto import DhGroup, DhKeyPair, HashAlgorithm, Phase1Keys
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError, ProtocolError
from gdoid.protocol.events import Phase1Established, Phase1Event, Phase1Failed
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.message import (
    Message,
    build_header,
    decode_payloads,
    decode_plain,
    encode_payloads,
    encode_plain,
)
from gdoid.protocol.payloads import (
    CertPayload,
    CrPayload,
    DeletePayload,
    HashPayload,
    IdPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    SigPayload,
    Transform,
    VendorIdPayload,
)
from gdoid.protocol.pki import CertificateValidator, PkiError, PrivateKey, der_subject_name
from gdoid.protocol.version import SoftwareVersion, version_from_vids, version_vid

NONCE_LEN = 32
MAX_CBC_PADDING = 255  # peers may pad encrypted bodies generously (RFC 2408 §3.1)


# --- policy ---------------------------------------------------------------


@dataclass(frozen=True)
class Phase1Proposal:
    """One phase-1 transform: cipher, hash, authentication, DH group, lifetime."""

    key_bits: int  # AES-CBC 128 or 256
    hash: HashAlgorithm
    auth: AuthenticationMethod
    group: DhGroup
    lifetime: int

    def to_transform(self, number: int) -> Transform:
        return Transform(
            number,
            KEY_IKE,
            (
                Attribute(Phase1Attribute.ENCRYPTION_ALGORITHM, EncryptionAlgorithm.AES_CBC),
                Attribute(Phase1Attribute.KEY_LENGTH, self.key_bits),
                Attribute(Phase1Attribute.HASH_ALGORITHM, self.hash),
                Attribute(Phase1Attribute.AUTHENTICATION_METHOD, self.auth),
                Attribute(Phase1Attribute.GROUP_DESCRIPTION, self.group),
                Attribute(Phase1Attribute.LIFE_TYPE, LifeType.SECONDS),
                Attribute.long(Phase1Attribute.LIFE_DURATION, self.lifetime),
            ),
        )

    @classmethod
    def from_transform(cls, t: Transform) -> Phase1Proposal | None:
        """The proposal a transform describes, or None if we cannot implement it."""
        known = {a.type for a in t.attributes}
        if t.transform_id != KEY_IKE or not known <= {a.value for a in Phase1Attribute}:
            return None
        try:
            enc = find(t.attributes, Phase1Attribute.ENCRYPTION_ALGORITHM)
            keylen = find(t.attributes, Phase1Attribute.KEY_LENGTH)
            hash_ = find(t.attributes, Phase1Attribute.HASH_ALGORITHM)
            auth = find(t.attributes, Phase1Attribute.AUTHENTICATION_METHOD)
            group = find(t.attributes, Phase1Attribute.GROUP_DESCRIPTION)
            if None in (enc, keylen, hash_, auth, group):
                return None
            assert enc and keylen and hash_ and auth and group
            if enc.int_value != EncryptionAlgorithm.AES_CBC or keylen.int_value not in (128, 256):
                return None
            life = find(t.attributes, Phase1Attribute.LIFE_DURATION)
            ltype = find(t.attributes, Phase1Attribute.LIFE_TYPE)
            if ltype is not None and ltype.int_value != LifeType.SECONDS:
                return None
            return cls(
                keylen.int_value,
                HashAlgorithm(hash_.int_value),
                AuthenticationMethod(auth.int_value),
                DhGroup(group.int_value),
                life.int_value if life is not None else 86400,
            )
        except ValueError:
            return None

    def matches(self, other: Phase1Proposal) -> bool:
        """Same algorithms; lifetimes may differ (the shorter one applies)."""
        return (self.key_bits, self.hash, self.auth, self.group) == (
            other.key_bits,
            other.hash,
            other.auth,
            other.group,
        )

    def describe(self) -> str:
        return (
            f"aes-cbc-{self.key_bits} {self.hash.name.lower()} {self.auth.name.lower()} "
            f"group {int(self.group)}"
        )


@dataclass(frozen=True)
class SignatureCredentials:
    """Our certificate and key, and the validator for the peer's certificate."""

    certificate: x509.Certificate
    private_key: PrivateKey
    validator: CertificateValidator


@dataclass(frozen=True)
class Phase1Config:
    local_address: ipaddress.IPv4Address
    proposals: tuple[Phase1Proposal, ...]
    psk_lookup: Callable[[ipaddress.IPv4Address], bytes | None]
    signature: SignatureCredentials | None = None
    software_version: SoftwareVersion | None = None  # None: send no version VID
    # PSK: the phase-1 ID a peer may use besides its source address (an IPv4
    # address or a DNS name, from its [[auth.psk]] entry's ``identity``).
    psk_identity_lookup: Callable[[ipaddress.IPv4Address], str | None] | None = None
    retransmit_interval: float = 2.0
    retransmit_count: int = 4
    half_open_timeout: float = 30.0


# --- the established SA ---------------------------------------------------


@dataclass
class Opened:
    """A decrypted phase-2 message and the IV its ciphertext leaves behind."""

    message: Message
    next_iv: bytes


@dataclass
class IkeSa:
    """An established phase-1 SA; protects phase-2 exchanges."""

    initiator_cookie: bytes
    responder_cookie: bytes
    is_initiator: bool
    proposal: Phase1Proposal
    keys: Phase1Keys = field(repr=False)
    cipher_key: bytes = field(repr=False)
    last_phase1_block: bytes = field(repr=False)
    peer_address: ipaddress.IPv4Address
    peer_id: IdPayload
    peer_version: SoftwareVersion | None
    established_at: float
    expires_at: float
    peer_certificate: x509.Certificate | None = None
    # SHA-256 of the PSK that authenticated the SA (None with signatures): lets COOP
    # check that a KS peer proved its own key, not a GM's.
    psk_digest: bytes | None = field(default=None, repr=False)
    _ivs: dict[int, bytes] = field(default_factory=dict, repr=False)

    @property
    def cookies(self) -> bytes:
        return self.initiator_cookie + self.responder_cookie

    @property
    def hash(self) -> HashAlgorithm:
        return self.proposal.hash

    def prf_a(self, data: bytes) -> bytes:
        return crypto.prf(self.proposal.hash, self.keys.skeyid_a, data)

    def peer_identity(self) -> str:
        """How the peer names itself: its address, or its certificate subject."""
        if self.peer_certificate is not None:
            return self.peer_certificate.subject.rfc4514_string()
        if self.peer_id.id_type == IdType.ID_IPV4_ADDR and len(self.peer_id.data) == 4:
            return str(ipaddress.IPv4Address(self.peer_id.data))
        return self.peer_id.data.hex()

    def _iv(self, message_id: int) -> bytes:
        iv = self._ivs.get(message_id)
        if iv is None:
            iv = crypto.phase2_iv(self.proposal.hash, self.last_phase1_block, message_id)
        return iv

    def seal(self, exchange: int, message_id: int, payloads: Sequence[Payload]) -> bytes:
        """Encrypt a phase-2 message and advance that exchange's IV chain."""
        body = crypto.pad_zero(encode_payloads(payloads))
        ct = crypto.aes_cbc_encrypt(self.cipher_key, self._iv(message_id), body)
        self._ivs[message_id] = ct[-16:]
        header = build_header(
            self.initiator_cookie,
            self.responder_cookie,
            payloads[0].payload_type,
            exchange,
            HeaderFlag.ENCRYPTION,
            message_id,
            len(ct),
        )
        return header.encode() + ct

    def open(self, data: bytes) -> Opened:
        """Decrypt a phase-2 message; the caller commits ``next_iv`` once it verified it."""
        header = IsakmpHeader.decode(data)
        if header.cookies != self.cookies:
            raise DecodeError("ISAKMP header", "cookies", "do not belong to this SA")
        if not header.encrypted:
            raise DecodeError("ISAKMP header", "flags", "phase-2 message not encrypted")
        if header.message_id == 0:
            raise DecodeError("ISAKMP header", "message_id", "zero in a phase-2 exchange")
        ct = data[HEADER_LEN:]
        if not ct or len(ct) % 16:
            raise DecodeError("ISAKMP header", "length", f"{len(ct)} octets of ciphertext")
        pt = crypto.aes_cbc_decrypt(self.cipher_key, self._iv(header.message_id), ct)
        payloads = decode_payloads(header.next_payload, pt, MAX_CBC_PADDING)
        return Opened(Message(header, payloads), ct[-16:])

    def commit_iv(self, message_id: int, iv: bytes) -> None:
        self._ivs[message_id] = iv

    def forget_exchange(self, message_id: int) -> None:
        self._ivs.pop(message_id, None)

    # Informational exchange (RFC 2409 §5.7): HDR*, HASH(1), N/D
    def informational(self, payload: NotifyPayload | DeletePayload) -> bytes:
        mid = secrets.randbits(32) or 1
        from gdoid.protocol.message import encode_payload

        hash1 = self.prf_a(mid.to_bytes(4, "big") + encode_payload(payload))
        out = self.seal(ExchangeType.INFORMATIONAL, mid, [HashPayload(hash1), payload])
        self.forget_exchange(mid)
        return out

    def open_informational(self, data: bytes) -> Message:
        opened = self.open(data)
        msg = opened.message
        if len(msg.payloads) < 2 or not isinstance(msg.payloads[0].payload, HashPayload):
            raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, "Informational without HASH(1)")
        covered = b"".join(d.raw for d in msg.payloads[1:])
        want = self.prf_a(msg.header.message_id.to_bytes(4, "big") + covered)
        if not crypto.constant_time_equal(want, msg.payloads[0].payload.data):
            raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, "Informational HASH(1) mismatch")
        self.forget_exchange(msg.header.message_id)
        return msg


# --- output -----------------------------------------------------------------


@dataclass
class Output:
    send: list[bytes] = field(default_factory=list)
    events: list[Phase1Event] = field(default_factory=list)


def plain_notify(icky: bytes, rcky: bytes, notify: NotifyType, data: bytes = b"") -> bytes:
    """An unprotected Informational: used while no phase-1 keys are agreed."""
    return encode_plain(
        icky,
        rcky,
        ExchangeType.INFORMATIONAL,
        0,
        [NotifyPayload(Doi.IPSEC, ProtocolId.PROTO_ISAKMP, notify, icky + rcky, data)],
    )


class _State(Enum):
    INIT = auto()
    MM1_SENT = auto()
    MM2_SENT = auto()
    MM3_SENT = auto()
    MM4_SENT = auto()
    MM5_SENT = auto()
    ESTABLISHED = auto()
    FAILED = auto()


def _local_id(config: Phase1Config, auth: AuthenticationMethod) -> IdPayload:
    if auth == AuthenticationMethod.RSA_SIG:
        assert config.signature is not None
        return IdPayload(IdType.ID_DER_ASN1_DN, 0, 0, der_subject_name(config.signature.certificate))
    return IdPayload(IdType.ID_IPV4_ADDR, 0, 0, config.local_address.packed)


def _id_names(ident: IdPayload, identity: str) -> bool:
    """Does an ID payload carry ``identity`` (an IPv4 address or a DNS name)?"""
    try:
        addr = ipaddress.IPv4Address(identity)
    except ValueError:
        return ident.id_type == IdType.ID_FQDN and ident.data.lower().rstrip(b".") == identity.encode()
    return ident.id_type == IdType.ID_IPV4_ADDR and ident.data == addr.packed


def _describe_id(ident: IdPayload) -> str:
    """An ID for a log line: bounded, printable."""
    if ident.id_type == IdType.ID_IPV4_ADDR and len(ident.data) == 4:
        return f"ID_IPV4_ADDR {ipaddress.IPv4Address(ident.data)}"
    try:
        type_name = IdType(ident.id_type).name
    except ValueError:
        type_name = f"type {ident.id_type}"
    data = ident.data[:64]
    text = data.decode("ascii") if data.isascii() and data.decode("ascii").isprintable() else data.hex()
    return f"{type_name} {text}" + ("..." if len(ident.data) > 64 else "")


class _MainMode:
    """What initiator and responder share: keys, auth payloads, retransmission."""

    def __init__(self, config: Phase1Config, peer: ipaddress.IPv4Address, now: float) -> None:
        self.config = config
        self.peer = peer
        self.state = _State.INIT
        self.icky = b""
        self.rcky = bytes(8)
        self.proposal: Phase1Proposal | None = None
        self.sai_b = b""
        self.dh: DhKeyPair | None = None
        self.gxi = self.gxr = b""
        self.ni_b = self.nr_b = b""
        self.keys: Phase1Keys | None = None
        self.cipher_key = b""
        self.iv = b""
        self.peer_version: SoftwareVersion | None = None
        self.last_sent: bytes | None = None
        self.last_received: bytes | None = None
        self.retries = 0
        self.deadline: float | None = None
        self.created = now
        self.sa: IkeSa | None = None
        self.psk_digest: bytes | None = None

    @property
    def is_initiator(self) -> bool:
        raise NotImplementedError

    def _psk(self) -> bytes:
        psk = self.config.psk_lookup(self.peer)
        if psk is None:
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED, f"no pre-shared key configured for {self.peer}"
            )
        return psk

    def _derive(self, gxy: bytes) -> None:
        assert self.proposal is not None
        h = self.proposal.hash
        if self.proposal.auth == AuthenticationMethod.PRE_SHARED_KEY:
            psk = self._psk()
            self.psk_digest = hashlib.sha256(psk).digest()
            skeyid = crypto.skeyid_psk(h, psk, self.ni_b, self.nr_b)
        else:
            skeyid = crypto.skeyid_sig(h, self.ni_b, self.nr_b, gxy)
        self.keys = crypto.derive_phase1_keys(h, skeyid, gxy, self.icky, self.rcky)
        self.cipher_key = crypto.encryption_key(h, self.keys.skeyid_e, self.proposal.key_bits // 8)
        self.iv = crypto.phase1_iv(h, self.gxi, self.gxr)

    def _auth_hash(self, mine: bool, id_b: bytes) -> bytes:
        """HASH_I or HASH_R over the ID body ``id_b`` (RFC 2409 §5)."""
        assert self.keys is not None and self.proposal is not None
        from_initiator = mine == self.is_initiator
        if from_initiator:
            data = self.gxi + self.gxr + self.icky + self.rcky
        else:
            data = self.gxr + self.gxi + self.rcky + self.icky
        return crypto.prf(self.proposal.hash, self.keys.skeyid, data + self.sai_b + id_b)

    def _auth_payloads(self) -> list[Payload]:
        assert self.proposal is not None
        ident = _local_id(self.config, self.proposal.auth)
        h = self._auth_hash(True, ident.encode_body())
        if self.proposal.auth == AuthenticationMethod.RSA_SIG:
            sig = self.config.signature
            assert sig is not None
            from cryptography.hazmat.primitives.asymmetric import rsa
            from cryptography.hazmat.primitives.serialization import Encoding

            if not isinstance(sig.private_key, rsa.RSAPrivateKey):
                raise NotifyError(NotifyType.AUTHENTICATION_FAILED, "phase-1 key must be RSA")
            return [
                ident,
                CertPayload(CertEncoding.X509_CERT_SIGNATURE, sig.certificate.public_bytes(Encoding.DER)),
                SigPayload(crypto.ike_rsa_sign(sig.private_key, h)),
            ]
        return [ident, HashPayload(h)]

    def _verify_auth(self, msg: Message, now: float) -> tuple[IdPayload, x509.Certificate | None]:
        """Check the peer's HASH_x or SIG_x in MM5/MM6; return its ID and certificate."""
        assert self.proposal is not None
        peer_id = msg.get(IdPayload)
        if peer_id is None:
            raise NotifyError(NotifyType.INVALID_ID_INFORMATION, "no ID payload")
        want = self._auth_hash(False, peer_id.encode_body())
        if self.proposal.auth == AuthenticationMethod.PRE_SHARED_KEY:
            got = msg.get(HashPayload)
            if got is None:
                raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, "no HASH payload")
            if not crypto.constant_time_equal(want, got.data):
                raise NotifyError(
                    NotifyType.AUTHENTICATION_FAILED, "HASH mismatch: pre-shared keys differ"
                )
            self._check_psk_identity(peer_id)
            return peer_id, None
        sig = msg.get(SigPayload)
        certp = msg.get(CertPayload)
        if sig is None or certp is None:
            raise NotifyError(NotifyType.AUTHENTICATION_FAILED, "RSA signature auth without CERT/SIG")
        if certp.encoding != CertEncoding.X509_CERT_SIGNATURE:
            raise NotifyError(NotifyType.AUTHENTICATION_FAILED, f"certificate encoding {certp.encoding}")
        creds = self.config.signature
        if creds is None:
            raise NotifyError(NotifyType.AUTHENTICATION_FAILED, "no certificate authority configured")
        import datetime as dt

        try:
            cert = creds.validator.validate(certp.data, dt.datetime.fromtimestamp(now, dt.UTC))
        except PkiError as exc:
            raise NotifyError(NotifyType.AUTHENTICATION_FAILED, f"certificate refused: {exc}") from exc
        if peer_id.id_type == IdType.ID_DER_ASN1_DN and peer_id.data != der_subject_name(cert):
            raise NotifyError(NotifyType.INVALID_ID_INFORMATION, "ID does not match the certificate subject")
        from cryptography.hazmat.primitives.asymmetric import rsa

        pub = cert.public_key()
        if not isinstance(pub, rsa.RSAPublicKey) or not crypto.ike_rsa_verify(pub, want, sig.data):
            raise NotifyError(NotifyType.AUTHENTICATION_FAILED, "signature does not verify")
        return peer_id, cert

    def _check_psk_identity(self, peer_id: IdPayload) -> None:
        """A PSK proves the key, not the name: the ID must be the sender's own address.

        Otherwise any holder of a group-wide PSK could claim another GM's identity
        (and with it that GM's sender IDs). The one exception is the identity
        configured for the peer's PSK entry (a GM behind NAT names its inside address).
        """
        if peer_id.id_type == IdType.ID_IPV4_ADDR and peer_id.data == self.peer.packed:
            return
        lookup = self.config.psk_identity_lookup
        allowed = lookup(self.peer) if lookup is not None else None
        if allowed is not None and _id_names(peer_id, allowed):
            return
        raise NotifyError(
            NotifyType.INVALID_ID_INFORMATION,
            f"phase-1 ID {_describe_id(peer_id)} is not the peer's address {self.peer}"
            + (f" nor its configured identity {allowed}" if allowed is not None else ""),
        )

    def _encrypt(self, payloads: Sequence[Payload]) -> bytes:
        body = crypto.pad_zero(encode_payloads(payloads))
        ct = crypto.aes_cbc_encrypt(self.cipher_key, self.iv, body)
        self.iv = ct[-16:]
        hdr = build_header(
            self.icky, self.rcky, payloads[0].payload_type, MAIN_MODE, HeaderFlag.ENCRYPTION, 0, len(ct)
        )
        return hdr.encode() + ct

    def _decrypt(self, data: bytes, header: IsakmpHeader) -> Message:
        ct = data[HEADER_LEN:]
        if not header.encrypted:
            raise NotifyError(NotifyType.PAYLOAD_MALFORMED, "message 5/6 not encrypted")
        if not ct or len(ct) % 16:
            raise DecodeError("ISAKMP header", "length", f"{len(ct)} octets of ciphertext")
        try:
            pt = crypto.aes_cbc_decrypt(self.cipher_key, self.iv, ct)
            payloads = decode_payloads(header.next_payload, pt, MAX_CBC_PADDING)
        except (DecodeError, CryptoError) as exc:
            # Garbage after decryption almost always means different keys.
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED,
                f"cannot decrypt message 5/6 ({exc}): probable pre-shared key mismatch",
            ) from exc
        self.iv = ct[-16:]
        return Message(header, payloads)

    def _send(self, data: bytes, now: float, out: Output, expect_reply: bool = True) -> None:
        self.last_sent = data
        self.retries = 0
        self.deadline = now + self.config.retransmit_interval if expect_reply else None
        out.send.append(data)

    def _fail(self, out: Output, reason: str, notify: NotifyType | None, send: bool) -> Output:
        self.state = _State.FAILED
        self.deadline = None
        if send and notify is not None:
            out.send.append(plain_notify(self.icky, self.rcky, notify))
        out.events.append(Phase1Failed(reason, notify))
        return out

    def _established(self, peer_id: IdPayload, cert: x509.Certificate | None, now: float, out: Output) -> None:
        assert self.keys is not None and self.proposal is not None
        self.state = _State.ESTABLISHED
        self.sa = IkeSa(
            initiator_cookie=self.icky,
            responder_cookie=self.rcky,
            is_initiator=self.is_initiator,
            proposal=self.proposal,
            keys=self.keys,
            cipher_key=self.cipher_key,
            last_phase1_block=self.iv,
            peer_address=self.peer,
            peer_id=peer_id,
            peer_version=self.peer_version,
            established_at=now,
            expires_at=now + self.proposal.lifetime,
            peer_certificate=cert,
            psk_digest=self.psk_digest,
        )
        out.events.append(Phase1Established(self.sa))

    @property
    def failed(self) -> bool:
        return self.state == _State.FAILED

    @property
    def established(self) -> bool:
        return self.state == _State.ESTABLISHED

    def on_timeout(self, now: float) -> Output:
        out = Output()
        if self.deadline is None or now < self.deadline or self.state in (_State.FAILED, _State.ESTABLISHED):
            return out
        if self.last_sent is None or self.retries >= self.config.retransmit_count:
            return self._fail(out, f"no response from {self.peer} (state {self.state.name})", None, False)
        self.retries += 1
        self.deadline = now + self.config.retransmit_interval * (2 ** min(self.retries, 4))
        out.send.append(self.last_sent)
        return out

    def receive(self, data: bytes, now: float) -> Output:
        """Feed one datagram that belongs to this exchange."""
        out = Output()
        if self.state in (_State.FAILED,):
            return out
        if data == self.last_received:
            # A retransmission of the peer's last message: our answer was lost.
            if self.last_sent is not None and not self.is_initiator:
                out.send.append(self.last_sent)
            return out
        try:
            header = IsakmpHeader.decode(data)
            if not self.icky:  # a fresh responder: a notify about this datagram needs the cookie
                self.icky = header.initiator_cookie
            if header.exchange_type == ExchangeType.INFORMATIONAL and not header.encrypted:
                msg = decode_plain(data)
                n = msg.get(NotifyPayload)
                if n is not None:
                    try:
                        name = NotifyType(n.notify_type)
                    except ValueError:
                        name = None
                    reason = f"peer sent notify {name.name if name else n.notify_type}"
                    self.state = _State.FAILED
                    self.deadline = None
                    out.events.append(Phase1Failed(reason, name, received=True))
                return out
            if header.exchange_type != MAIN_MODE:
                raise DecodeError("ISAKMP header", "exchange_type", f"{header.exchange_type} during Main Mode")
            self._step(data, header, now, out)
            self.last_received = data
        except NotifyError as exc:
            return self._fail(out, exc.reason, NotifyType(exc.notify), True)
        except (DecodeError, CryptoError) as exc:
            return self._fail(out, str(exc), NotifyType.PAYLOAD_MALFORMED, True)
        return out

    def _step(self, data: bytes, header: IsakmpHeader, now: float, out: Output) -> None:
        raise NotImplementedError


MAX_RESTARTS = 3  # times an initiator starts over from message 1 when the responder asks


class MainModeInitiator(_MainMode):
    """The GM side (and the KS that initiates to a COOP peer)."""

    def __init__(self, config: Phase1Config, peer: ipaddress.IPv4Address, now: float) -> None:
        super().__init__(config, peer, now)
        self.mm1 = b""
        self.restarts = 0

    @property
    def is_initiator(self) -> bool:
        return True

    def start(self, now: float) -> Output:
        out = Output()
        self.icky = secrets.token_bytes(8)
        proposals = list(self.config.proposals)
        if self.config.signature is None:
            proposals = [p for p in proposals if p.auth != AuthenticationMethod.RSA_SIG]
        sa = SaPayload(
            Doi.IPSEC,
            SIT_IDENTITY_ONLY,
            (
                Proposal(
                    1,
                    ProtocolId.PROTO_ISAKMP,
                    b"",
                    tuple(p.to_transform(i + 1) for i, p in enumerate(proposals)),
                ),
            ),
        )
        self.sai_b = sa.encode_body()
        payloads: list[Payload] = [sa]
        if self.config.software_version is not None:
            payloads.append(version_vid(self.config.software_version))
        self.state = _State.MM1_SENT
        self.mm1 = encode_plain(self.icky, self.rcky, MAIN_MODE, 0, payloads)
        self._send(self.mm1, now, out)
        return out

    def receive(self, data: bytes, now: float) -> Output:
        if self.state == _State.MM3_SENT and self.restarts < MAX_RESTARTS and self._state_lost(data):
            # The responder kept message 1's state only briefly (a flood evicts it) and
            # says so once our cookie proved our address: start over from message 1.
            self.restarts += 1
            self.state = _State.MM1_SENT
            self.rcky = bytes(8)
            self.dh, self.gxi, self.ni_b, self.last_received = None, b"", b"", None
            out = Output()
            self._send(self.mm1, now, out)
            return out
        return super().receive(data, now)

    def _state_lost(self, data: bytes) -> bool:
        """An unprotected INVALID_COOKIE notify for this exchange."""
        try:
            msg = decode_plain(data)
        except ProtocolError:
            return False
        n = msg.get(NotifyPayload)
        return (
            msg.header.cookies == self.icky + self.rcky
            and msg.header.exchange_type == ExchangeType.INFORMATIONAL
            and n is not None
            and n.notify_type == NotifyType.INVALID_COOKIE
        )

    def _step(self, data: bytes, header: IsakmpHeader, now: float, out: Output) -> None:
        if header.initiator_cookie != self.icky:
            raise DecodeError("ISAKMP header", "initiator_cookie", "not ours")
        if self.state == _State.MM1_SENT:
            msg = decode_plain(data)
            self.rcky = header.responder_cookie
            if self.rcky == bytes(8):
                raise DecodeError("ISAKMP header", "responder_cookie", "zero in message 2")
            sa = msg.get(SaPayload)
            if sa is None or len(sa.proposals) != 1 or len(sa.proposals[0].transforms) != 1:
                raise NotifyError(NotifyType.BAD_PROPOSAL_SYNTAX, "message 2 must choose one transform")
            chosen = Phase1Proposal.from_transform(sa.proposals[0].transforms[0])
            ours = [p for p in self.config.proposals if chosen is not None and p.matches(chosen)]
            if chosen is None or not ours:
                raise NotifyError(NotifyType.NO_PROPOSAL_CHOSEN, "responder chose a transform we did not offer")
            self.proposal = Phase1Proposal(
                chosen.key_bits, chosen.hash, chosen.auth, chosen.group, min(chosen.lifetime, ours[0].lifetime)
            )
            self.peer_version = version_from_vids(msg.all(VendorIdPayload))
            self.dh = DhKeyPair.generate(self.proposal.group)
            self.gxi = self.dh.public_bytes
            self.ni_b = secrets.token_bytes(NONCE_LEN)
            payloads: list[Payload] = [KePayload(self.gxi), NoncePayload(self.ni_b)]
            if self.proposal.auth == AuthenticationMethod.RSA_SIG:
                payloads.append(CrPayload(CertEncoding.X509_CERT_SIGNATURE))
            self.state = _State.MM3_SENT
            self._send(encode_plain(self.icky, self.rcky, MAIN_MODE, 0, payloads), now, out)
        elif self.state == _State.MM3_SENT:
            self._check_rcky(header)
            msg = decode_plain(data)
            ke = msg.get(KePayload)
            nr = msg.get(NoncePayload)
            if ke is None or nr is None:
                raise NotifyError(NotifyType.PAYLOAD_MALFORMED, "message 4 needs KE and NONCE")
            assert self.dh is not None
            self.gxr = ke.data
            self.nr_b = nr.data
            try:
                gxy = self.dh.shared_secret(self.gxr)
            except CryptoError as exc:
                raise NotifyError(NotifyType.INVALID_KEY_INFORMATION, str(exc)) from exc
            self._derive(gxy)
            self.state = _State.MM5_SENT
            self._send(self._encrypt(self._auth_payloads()), now, out)
        elif self.state == _State.MM5_SENT:
            self._check_rcky(header)
            msg = self._decrypt(data, header)
            peer_id, cert = self._verify_auth(msg, now)
            self.deadline = None
            self._established(peer_id, cert, now, out)
        else:
            raise DecodeError("Main Mode", "state", f"unexpected message in {self.state.name}")

    def _check_rcky(self, header: IsakmpHeader) -> None:
        if header.responder_cookie != self.rcky:
            raise DecodeError("ISAKMP header", "responder_cookie", "changed during Main Mode")


# --- the responder: a stateless first step, then a machine ----------------------

# What unauthenticated message 1 may cost (RFC 2409 gives no limits; real offers are
# far smaller: IOS sends one transform per ISAKMP policy, strongSwan a few dozen).
MAX_MM1_LEN = 4096  # octets; larger MM1s are refused before any parsing
MAX_PROPOSALS = 8
MAX_TRANSFORMS = 32  # over all proposals
MIN_NONCE_LEN = 8  # RFC 2409 §5 minimum; our Nr is as long as Ni (up to NONCE_LEN): MM4 <= MM3
COOKIE_SECRET_LIFETIME = 300.0  # seconds; the previous secret is accepted for as long again
COOKIE_MAC = "sha256"


class ResponderCookies:
    """Responder cookies that prove return routability (IKEv1 has no cookie exchange).

    CKY-R = HMAC-SHA-256(secret, peer address | port | CKY-I)[:8]: only the real
    source of message 1 sees it in message 2, so a message 3 that echoes it comes
    from there, and the check needs no state.  The random secret is rotated every
    ``lifetime`` seconds; cookies made with the previous secret stay valid.
    """

    def __init__(self, lifetime: float = COOKIE_SECRET_LIFETIME) -> None:
        self.lifetime = lifetime
        self._current = secrets.token_bytes(32)
        self._previous: bytes | None = None
        self._rotated_at: float | None = None

    def _rotate(self, now: float) -> None:
        if self._rotated_at is None or now < self._rotated_at:
            self._rotated_at = now
        elif now - self._rotated_at >= self.lifetime:
            # Two lifetimes without a message: the old secret goes too.
            self._previous = self._current if now - self._rotated_at < 2 * self.lifetime else None
            self._current = secrets.token_bytes(32)
            self._rotated_at = now

    @staticmethod
    def _mac(secret: bytes, address: str, port: int, icky: bytes) -> bytes:
        return hmac.digest(secret, f"{address}|{port}|".encode() + icky, COOKIE_MAC)[:8]

    def make(self, address: str, port: int, icky: bytes, now: float) -> bytes:
        self._rotate(now)
        return self._mac(self._current, address, port, icky)

    def candidates(self, address: str, port: int, icky: bytes, now: float) -> list[bytes]:
        """The cookies this peer may hold: current secret first."""
        self._rotate(now)
        out = [self._mac(self._current, address, port, icky)]
        if self._previous is not None:
            out.append(self._mac(self._previous, address, port, icky))
        return out

    def check(self, address: str, port: int, icky: bytes, rcky: bytes, now: float) -> bool:
        ok = False
        for want in self.candidates(address, port, icky, now):
            ok |= hmac.compare_digest(want, rcky)  # constant time, both secrets always tried
        return ok


@dataclass(frozen=True, slots=True)
class HalfOpen:
    """All a responder keeps between message 1 and message 3: no DH key, no machine.

    ``sai_b`` (the SA body HASH_I/HASH_R cover) is at most ``MAX_MM1_LEN`` octets.
    """

    sai_b: bytes
    proposal: Phase1Proposal
    peer_version: SoftwareVersion | None
    created: float


def _check_offer_size(first: int, data: bytes) -> None:
    """Count proposals and transforms from their generic headers, before decoding them."""
    off, np = HEADER_LEN, first
    while np != PayloadType.NONE and off + 4 <= len(data):
        nxt, plen = data[off], struct.unpack_from("!H", data, off + 2)[0]
        if plen < 4:
            return  # the decoder names the error
        if np == PayloadType.SA:
            end = min(off + plen, len(data))
            p, proposals, transforms = off + 12, 0, 0  # generic header, DOI, situation
            while p + 8 <= end:
                proposals += 1
                prop_len, spi_size = struct.unpack_from("!H", data, p + 2)[0], data[p + 6]
                t, prop_end = p + 8 + spi_size, min(p + max(prop_len, 8), end)
                while t + 4 <= prop_end:
                    transforms += 1
                    if transforms > MAX_TRANSFORMS:
                        raise NotifyError(
                            NotifyType.BAD_PROPOSAL_SYNTAX,
                            f"message 1 offers more than {MAX_TRANSFORMS} transforms",
                        )
                    t += max(struct.unpack_from("!H", data, t + 2)[0], 4)
                if proposals > MAX_PROPOSALS:
                    raise NotifyError(
                        NotifyType.BAD_PROPOSAL_SYNTAX,
                        f"message 1 offers more than {MAX_PROPOSALS} proposals",
                    )
                p += max(prop_len, 8)
            return
        off += plen
        np = nxt


def _select(
    config: Phase1Config, peer: ipaddress.IPv4Address, sa: SaPayload
) -> tuple[Proposal, Transform, Phase1Proposal]:
    for prop in sa.proposals:
        if prop.protocol_id != ProtocolId.PROTO_ISAKMP:
            continue
        for t in prop.transforms:
            offered = Phase1Proposal.from_transform(t)
            if offered is None:
                continue
            if offered.auth == AuthenticationMethod.PRE_SHARED_KEY and config.psk_lookup(peer) is None:
                continue
            if offered.auth == AuthenticationMethod.RSA_SIG and config.signature is None:
                continue
            for ours in config.proposals:
                if ours.matches(offered):
                    if offered.lifetime >= ours.lifetime:
                        return prop, t, ours  # shared, not one object per message 1
                    return prop, t, Phase1Proposal(
                        offered.key_bits, offered.hash, offered.auth, offered.group, offered.lifetime
                    )
    transforms = [t for prop in sa.proposals for t in prop.transforms]
    offered_text = "; ".join(  # the first few: the reason is logged, and cheap to build
        p.describe() if p else "unsupported transform" for p in map(Phase1Proposal.from_transform, transforms[:4])
    )
    more = f"; {len(transforms) - 4} more" if len(transforms) > 4 else ""
    raise NotifyError(NotifyType.NO_PROPOSAL_CHOSEN, f"no acceptable proposal (offered: {offered_text}{more})")


def respond_mm1(
    config: Phase1Config,
    peer: ipaddress.IPv4Address,
    data: bytes,
    header: IsakmpHeader,
    rcky: bytes,
    now: float,
) -> tuple[HalfOpen, bytes]:
    """Answer message 1 with message 2 and return the little that message 3 needs.

    Cheap on hostile input: the size and the number of proposals/transforms are
    checked before the offer is decoded.  Message 2 is never longer than message 1
    (our version VID is left out when it would be: no amplification).
    Raises NotifyError/DecodeError for the notify to answer with.
    """
    if len(data) > MAX_MM1_LEN:
        raise DecodeError("Main Mode message 1", "length", f"{len(data)} octets, at most {MAX_MM1_LEN}")
    if header.responder_cookie != bytes(8):
        raise DecodeError("ISAKMP header", "responder_cookie", "must be zero in message 1")
    _check_offer_size(header.next_payload, data)
    msg = decode_plain(data)
    sa = msg.get(SaPayload)
    if sa is None:
        raise NotifyError(NotifyType.PAYLOAD_MALFORMED, "message 1 without SA")
    if sa.doi not in (Doi.IPSEC, Doi.GDOI):
        raise NotifyError(NotifyType.DOI_NOT_SUPPORTED, f"DOI {sa.doi}")
    sai_b = msg.payloads[0].body if msg.types[0] == sa.payload_type else sa.encode_body()
    prop, t, proposal = _select(config, peer, sa)
    peer_version = version_from_vids(msg.all(VendorIdPayload))
    reply_sa = SaPayload(sa.doi, sa.situation, (Proposal(prop.number, prop.protocol_id, prop.spi, (t,)),))
    icky = header.initiator_cookie
    mm2 = encode_plain(icky, rcky, MAIN_MODE, 0, [reply_sa])
    if config.software_version is not None:
        with_vid = encode_plain(icky, rcky, MAIN_MODE, 0, [reply_sa, version_vid(config.software_version)])
        if len(with_vid) <= len(data):
            mm2 = with_vid
    return HalfOpen(sai_b, proposal, peer_version, now), mm2


class MainModeResponder(_MainMode):
    """The KS side.

    The key server answers message 1 with :func:`respond_mm1` and keeps only a
    :class:`HalfOpen`; a machine (:meth:`resume`) exists from message 3 on, once the
    initiator proved its address with the responder cookie.  Created directly, the
    machine also takes message 1 itself (tests, simple shells).
    """

    @property
    def is_initiator(self) -> bool:
        return False

    def __init__(self, config: Phase1Config, peer: ipaddress.IPv4Address, now: float) -> None:
        super().__init__(config, peer, now)
        self.rcky = secrets.token_bytes(8)
        self.deadline = now + config.half_open_timeout

    @classmethod
    def resume(
        cls,
        config: Phase1Config,
        peer: ipaddress.IPv4Address,
        icky: bytes,
        rcky: bytes,
        half: HalfOpen,
        now: float,
    ) -> MainModeResponder:
        """A responder that answered message 1 statelessly and now gets message 3."""
        self = cls(config, peer, now)
        self.icky, self.rcky = icky, rcky
        self.sai_b, self.proposal, self.peer_version = half.sai_b, half.proposal, half.peer_version
        self.state = _State.MM2_SENT
        return self

    def on_timeout(self, now: float) -> Output:
        # Responders never retransmit on their own (the initiator drives);
        # they only expire half-open state.
        out = Output()
        if self.deadline is not None and now >= self.deadline and self.state != _State.ESTABLISHED:
            return self._fail(out, f"half-open exchange with {self.peer} timed out", None, False)
        return out

    def _send(self, data: bytes, now: float, out: Output, expect_reply: bool = True) -> None:
        self.last_sent = data
        out.send.append(data)

    def _step(self, data: bytes, header: IsakmpHeader, now: float, out: Output) -> None:
        if self.state == _State.INIT:
            self.icky = header.initiator_cookie
            half, mm2 = respond_mm1(self.config, self.peer, data, header, self.rcky, now)
            self.sai_b, self.proposal, self.peer_version = half.sai_b, half.proposal, half.peer_version
            self.state = _State.MM2_SENT
            self._send(mm2, now, out)
        elif self.state == _State.MM2_SENT:
            msg = decode_plain(data)
            ke = msg.get(KePayload)
            ni = msg.get(NoncePayload)
            if ke is None or ni is None:
                raise NotifyError(NotifyType.PAYLOAD_MALFORMED, "message 3 needs KE and NONCE")
            assert self.proposal is not None
            # The first Diffie-Hellman work of the exchange: the peer proved its address.
            self.dh = DhKeyPair.generate(self.proposal.group)
            self.gxi = ke.data
            self.gxr = self.dh.public_bytes
            try:
                gxy = self.dh.shared_secret(self.gxi)
            except CryptoError as exc:
                raise NotifyError(NotifyType.INVALID_KEY_INFORMATION, str(exc)) from exc
            self.ni_b = ni.data
            # Nr as long as Ni (RFC 2409 allows 8..256 octets): message 4 stays no longer than 3.
            self.nr_b = secrets.token_bytes(min(NONCE_LEN, max(MIN_NONCE_LEN, len(ni.data))))
            self._derive(gxy)
            payloads: list[Payload] = [KePayload(self.gxr), NoncePayload(self.nr_b)]
            mm4 = encode_plain(self.icky, self.rcky, MAIN_MODE, 0, payloads)
            if self.proposal.auth == AuthenticationMethod.RSA_SIG:
                with_cr = encode_plain(
                    self.icky, self.rcky, MAIN_MODE, 0, [*payloads, CrPayload(CertEncoding.X509_CERT_SIGNATURE)]
                )
                if len(with_cr) <= len(data):  # CR is a hint; our peers send CERT anyway
                    mm4 = with_cr
            self.state = _State.MM4_SENT
            self._send(mm4, now, out)
        elif self.state == _State.MM4_SENT:
            msg = self._decrypt(data, header)
            peer_id, cert = self._verify_auth(msg, now)
            self._send(self._encrypt(self._auth_payloads()), now, out)
            self.deadline = None
            self._established(peer_id, cert, now, out)
        else:
            raise DecodeError("Main Mode", "state", f"unexpected message in {self.state.name}")


def proposals_from_policy(
    key_bits: Sequence[int],
    hashes: Sequence[HashAlgorithm],
    groups: Sequence[DhGroup],
    auths: Sequence[AuthenticationMethod],
    lifetime: int,
) -> tuple[Phase1Proposal, ...]:
    """The cross product of a policy, in preference order (auth, group, cipher, hash)."""
    return tuple(
        Phase1Proposal(k, h, a, g, lifetime) for a in auths for g in groups for k in key_bits for h in hashes
    )


__all__ = [
    "MAX_MM1_LEN",
    "MAX_PROPOSALS",
    "MAX_TRANSFORMS",
    "NONCE_LEN",
    "HalfOpen",
    "IkeSa",
    "MainModeInitiator",
    "MainModeResponder",
    "Opened",
    "Output",
    "Phase1Config",
    "Phase1Proposal",
    "ProtocolError",
    "ResponderCookies",
    "SignatureCredentials",
    "plain_notify",
    "proposals_from_policy",
    "respond_mm1",
]
