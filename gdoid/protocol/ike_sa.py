"""An established IKEv1 phase-1 SA and the phase-2 protection it gives.

:class:`IkeSa` encrypts phase-2 messages with the IV chains of RFC 2409
appendix B and computes their HASH: ``seal_hashed`` / ``open_hashed`` are the one
implementation of

    HASH = prf(SKEYID_a, M-ID | <prefix> | every payload after HASH as sent)

behind the Informational exchange (RFC 2409 §5.7, below), GROUPKEY-PULL
HASH(1)..(4) (``pull.py``) and COOP ANN (``ann.py``); GROUPKEY-PUSH
acknowledgements (``push.py``) use :func:`phase2_hash` with their own key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from gdoid.protocol import crypto
from gdoid.protocol.constants import ExchangeType, HeaderFlag, IdType, NotifyType
from gdoid.protocol.crypto import HashAlgorithm, Phase1Keys
from gdoid.protocol.errors import DecodeError, NotifyError
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Proposal
from gdoid.protocol.message import Message, build_header, decode_payloads, encode_payloads
from gdoid.protocol.payloads import DeletePayload, HashPayload, IdPayload, NotifyPayload, Payload
from gdoid.protocol.rng import SYSTEM_RANDOM, RandomSource, message_id
from gdoid.protocol.version import SoftwareVersion

NONCE_LEN = 32
MAX_CBC_PADDING = 255  # peers may pad encrypted bodies generously (RFC 2408 §3.1)


def phase2_hash(
    hash_alg: HashAlgorithm, key: bytes, message_id: int, prefix: bytes, covered: bytes
) -> bytes:
    """prf(key, M-ID | prefix | covered): the HASH payload of every hashed phase-2 message."""
    return crypto.prf(hash_alg, key, message_id.to_bytes(4, "big") + prefix + covered)


def phase2_hash_matches(
    hash_alg: HashAlgorithm, key: bytes, message_id: int, prefix: bytes, covered: bytes, got: bytes
) -> bool:
    """Does ``got`` carry the HASH of ``covered``? Compared in constant time."""
    return crypto.constant_time_equal(phase2_hash(hash_alg, key, message_id, prefix, covered), got)


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
    # Message IDs of the SA's own exchanges (Informational, ANN): injectable for tests.
    rng: RandomSource = field(default=SYSTEM_RANDOM, repr=False, compare=False)

    @property
    def cookies(self) -> bytes:
        return self.initiator_cookie + self.responder_cookie

    @property
    def hash(self) -> HashAlgorithm:
        return self.proposal.hash

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

    # HDR*, HASH, payloads: one implementation for Informational, PULL and ANN
    def seal_hashed(
        self, exchange: int, message_id: int, payloads: Sequence[Payload], prefix: bytes = b""
    ) -> bytes:
        """Encrypt ``HASH, payloads`` with HASH = prf(SKEYID_a, M-ID | prefix | payloads)."""
        h = phase2_hash(
            self.hash, self.keys.skeyid_a, message_id, prefix, encode_payloads(payloads)
        )
        return self.seal(exchange, message_id, [HashPayload(h), *payloads])

    def open_hashed(self, message: Message, prefix: bytes = b"", name: str = "HASH") -> None:
        """Check the HASH that starts an opened message, over every payload after it as sent.

        Raises INVALID_HASH_INFORMATION, naming the hash (``name``) in the reason.
        """
        first = message.payloads[0].payload if message.payloads else None
        if not isinstance(first, HashPayload):
            raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, f"{name} must start with HASH")
        covered = b"".join(d.raw for d in message.payloads[1:])
        if not phase2_hash_matches(
            self.hash, self.keys.skeyid_a, message.header.message_id, prefix, covered, first.data
        ):
            raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, f"{name} mismatch")

    # Informational exchange (RFC 2409 §5.7): HDR*, HASH(1), N/D
    def informational(self, payload: NotifyPayload | DeletePayload) -> bytes:
        mid = message_id(self.rng)
        out = self.seal_hashed(ExchangeType.INFORMATIONAL, mid, [payload])
        self.forget_exchange(mid)
        return out

    def open_informational(self, data: bytes) -> Message:
        opened = self.open(data)
        msg = opened.message
        if len(msg.payloads) < 2 or not isinstance(msg.payloads[0].payload, HashPayload):
            raise NotifyError(NotifyType.INVALID_HASH_INFORMATION, "Informational without HASH(1)")
        self.open_hashed(msg, name="Informational HASH(1)")
        self.forget_exchange(msg.header.message_id)
        return msg


__all__ = [
    "MAX_CBC_PADDING",
    "NONCE_LEN",
    "IkeSa",
    "Opened",
    "phase2_hash",
    "phase2_hash_matches",
]
