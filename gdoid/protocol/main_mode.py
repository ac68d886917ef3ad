"""IKEv1 Main Mode (RFC 2409 §5): what initiator and responder share.

    (1) I -> R : HDR, SA                    (2) R -> I : HDR, SA
    (3) I -> R : HDR, KE, Ni [, CR]         (4) R -> I : HDR, KE, Nr [, CR]
    (5) I -> R : HDR*, IDii, HASH_I | CERT, SIG_I
    (6) R -> I : HDR*, IDir, HASH_R | CERT, SIG_R

Like strongSwan's ``phase1.c`` next to one task per role: key derivation
(SKEYID by PSK or signature), HASH_I/HASH_R and SIG_I/SIG_R, the phase-1 CBC
chain of messages 5 and 6, retransmission and failure, and the
:class:`~gdoid.protocol.ike_sa.IkeSa` that results.  The roles are
:class:`~gdoid.protocol.main_mode_initiator.MainModeInitiator` and
:class:`~gdoid.protocol.main_mode_responder.MainModeResponder`; both are sans-I/O:
``(datagram, now)`` in, a :data:`~gdoid.protocol.output.Phase1Output` out,
``deadline`` and ``on_timeout(now)`` for timers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from enum import Enum, auto

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from gdoid.protocol import crypto
from gdoid.protocol.constants import (
    MAIN_MODE,
    AuthenticationMethod,
    CertEncoding,
    ExchangeType,
    HeaderFlag,
    IdType,
    NotifyType,
)
from gdoid.protocol.crypto import DhKeyPair, Phase1Keys
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError
from gdoid.protocol.events import Phase1Established, Phase1Failed
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Config, Phase1Proposal
from gdoid.protocol.ike_sa import MAX_CBC_PADDING, IkeSa
from gdoid.protocol.informational import plain_notify
from gdoid.protocol.message import (
    Message,
    build_header,
    decode_payloads,
    decode_plain,
    encode_payloads,
)
from gdoid.protocol.output import Phase1Output
from gdoid.protocol.payloads import (
    CertPayload,
    HashPayload,
    IdPayload,
    NotifyPayload,
    Payload,
    SigPayload,
)
from gdoid.protocol.pki import PkiError, der_subject_name
from gdoid.protocol.rng import SYSTEM_RANDOM, RandomSource
from gdoid.protocol.version import SoftwareVersion


class MainModeState(Enum):
    """Where an exchange stands: the last message sent, or its end."""

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
        return IdPayload(
            IdType.ID_DER_ASN1_DN, 0, 0, der_subject_name(config.signature.certificate)
        )
    return IdPayload(IdType.ID_IPV4_ADDR, 0, 0, config.local_address.packed)


def _id_names(ident: IdPayload, identity: str) -> bool:
    """Does an ID payload carry ``identity`` (an IPv4 address or a DNS name)?"""
    try:
        addr = ipaddress.IPv4Address(identity)
    except ValueError:
        return (
            ident.id_type == IdType.ID_FQDN and ident.data.lower().rstrip(b".") == identity.encode()
        )
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
    text = (
        data.decode("ascii")
        if data.isascii() and data.decode("ascii").isprintable()
        else data.hex()
    )
    return f"{type_name} {text}" + ("..." if len(ident.data) > 64 else "")


class MainModeExchange:
    """What initiator and responder share: keys, auth payloads, retransmission."""

    def __init__(
        self,
        config: Phase1Config,
        peer: ipaddress.IPv4Address,
        now: float,
        rng: RandomSource = SYSTEM_RANDOM,
    ) -> None:
        self.config = config
        self.rng = rng  # cookies, nonces; handed to the SA
        self.peer = peer
        self.state = MainModeState.INIT
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
            if not isinstance(sig.private_key, rsa.RSAPrivateKey):
                raise NotifyError(NotifyType.AUTHENTICATION_FAILED, "phase-1 key must be RSA")
            return [
                ident,
                CertPayload(
                    CertEncoding.X509_CERT_SIGNATURE, sig.certificate.public_bytes(Encoding.DER)
                ),
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
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED, "RSA signature auth without CERT/SIG"
            )
        if certp.encoding != CertEncoding.X509_CERT_SIGNATURE:
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED, f"certificate encoding {certp.encoding}"
            )
        creds = self.config.signature
        if creds is None:
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED, "no certificate authority configured"
            )
        try:
            cert = creds.validator.validate(certp.data, dt.datetime.fromtimestamp(now, dt.UTC))
        except PkiError as exc:
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED, f"certificate refused: {exc}"
            ) from exc
        if peer_id.id_type == IdType.ID_DER_ASN1_DN and peer_id.data != der_subject_name(cert):
            raise NotifyError(
                NotifyType.INVALID_ID_INFORMATION, "ID does not match the certificate subject"
            )
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
            self.icky,
            self.rcky,
            payloads[0].payload_type,
            MAIN_MODE,
            HeaderFlag.ENCRYPTION,
            0,
            len(ct),
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

    def _send(self, data: bytes, now: float, out: Phase1Output, expect_reply: bool = True) -> None:
        self.last_sent = data
        self.retries = 0
        self.deadline = now + self.config.retransmit_interval if expect_reply else None
        out.send.append(data)

    def _fail(
        self, out: Phase1Output, reason: str, notify: NotifyType | None, send: bool
    ) -> Phase1Output:
        self.state = MainModeState.FAILED
        self.deadline = None
        if send and notify is not None:
            out.send.append(plain_notify(self.icky, self.rcky, notify))
        out.events.append(Phase1Failed(reason, notify))
        return out

    def _established(
        self, peer_id: IdPayload, cert: x509.Certificate | None, now: float, out: Phase1Output
    ) -> None:
        assert self.keys is not None and self.proposal is not None
        self.state = MainModeState.ESTABLISHED
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
            rng=self.rng,
        )
        out.events.append(Phase1Established(self.sa))

    @property
    def failed(self) -> bool:
        return self.state == MainModeState.FAILED

    @property
    def established(self) -> bool:
        return self.state == MainModeState.ESTABLISHED

    def on_timeout(self, now: float) -> Phase1Output:
        out = Phase1Output()
        if (
            self.deadline is None
            or now < self.deadline
            or self.state in (MainModeState.FAILED, MainModeState.ESTABLISHED)
        ):
            return out
        if self.last_sent is None or self.retries >= self.config.retransmit_count:
            return self._fail(
                out, f"no response from {self.peer} (state {self.state.name})", None, False
            )
        self.retries += 1
        self.deadline = now + self.config.retransmit_interval * (2 ** min(self.retries, 4))
        out.send.append(self.last_sent)
        return out

    def receive(self, data: bytes, now: float) -> Phase1Output:
        """Feed one datagram that belongs to this exchange."""
        out = Phase1Output()
        if self.state in (MainModeState.FAILED,):
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
                    self.state = MainModeState.FAILED
                    self.deadline = None
                    out.events.append(Phase1Failed(reason, name, received=True))
                return out
            if header.exchange_type != MAIN_MODE:
                raise DecodeError(
                    "ISAKMP header", "exchange_type", f"{header.exchange_type} during Main Mode"
                )
            self._step(data, header, now, out)
            self.last_received = data
        except NotifyError as exc:
            return self._fail(out, exc.reason, NotifyType(exc.notify), True)
        except (DecodeError, CryptoError) as exc:
            return self._fail(out, str(exc), NotifyType.PAYLOAD_MALFORMED, True)
        return out

    def _step(self, data: bytes, header: IsakmpHeader, now: float, out: Phase1Output) -> None:
        raise NotImplementedError


__all__ = ["MainModeExchange", "MainModeState"]
