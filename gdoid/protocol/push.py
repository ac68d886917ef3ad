"""GROUPKEY-PUSH (RFC 6407 §4), exchange 33, and its acknowledgement.

    KS -> GM : HDR*, SEQ, [D,] [N,] [SA, KD,] SIG

The header's cookies are the current KEK SPI, M-ID 0; everything after the
header is AES-CBC encrypted with the KEK key and its static IV.  SIG signs
``"rekey" | HDR | every payload before SIG`` on the plaintext, where the
signed header's length field is the *plaintext* message length including SIG
(the sent header carries the ciphertext length).  ECDSA signatures are r‖s.

Acknowledgement (RFC 8263 style; exchange type and key are project choices,
docs/wire.md):

    GM -> KS : HDR, HASH, SEQ, ID       (exchange 35, cookies = KEK SPI, not encrypted)

HASH = prf(K_ack, M-ID | SEQ | ID) with K_ack = prf(SKEYID_a, "gdoid rekey ack" |
group number), known to both sides from the registration's phase 1; computed by
``ike_sa.phase2_hash``, as every phase-2 HASH.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gdoid.protocol import crypto
from gdoid.protocol.constants import Doi, ExchangeType, HeaderFlag, IdType, NotifyType, PayloadType
from gdoid.protocol.crypto import HashAlgorithm, PrivateKey, PublicKey, SigHash
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError
from gdoid.protocol.gdoi_payloads import GdoiSaPayload, KdPayload, SeqPayload
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.ike_sa import phase2_hash, phase2_hash_matches
from gdoid.protocol.message import decode_payloads, encode_payloads
from gdoid.protocol.payloads import (
    DeletePayload,
    HashPayload,
    IdPayload,
    NotifyPayload,
    Payload,
    SigPayload,
)
from gdoid.protocol.policy import Kek
from gdoid.protocol.rng import SYSTEM_RANDOM, RandomSource, message_id

GROUPKEY_PUSH_ACK = 35  # RFC 8263-style acknowledgement (project choice of number)
MAX_PUSH_PADDING = 16


class RemovalMode:
    """GM_REMOVAL notify data (wire.md §6.2)."""

    TRANSITIONAL = 1
    NOW = 2


POLICY_REPLACE_NOW = 0x01


def removal_notify(mode: int) -> NotifyPayload:
    return NotifyPayload(Doi.GDOI, 0, NotifyType.GM_REMOVAL, b"", bytes([mode]))


def policy_replace_notify(replace_now: bool) -> NotifyPayload:
    return NotifyPayload(
        Doi.GDOI,
        0,
        NotifyType.POLICY_REPLACE,
        b"",
        bytes([POLICY_REPLACE_NOW if replace_now else 0]),
    )


def _signed_data(header: IsakmpHeader, plain_len: int, before_sig: bytes) -> bytes:
    signed_header = IsakmpHeader(
        header.initiator_cookie,
        header.responder_cookie,
        header.next_payload,
        header.exchange_type,
        header.flags,
        header.message_id,
        plain_len,
        header.version,
    )
    return b"rekey" + signed_header.encode() + before_sig


def build_push(
    kek: Kek, signing_key: PrivateKey, sig_hash: SigHash, payloads: Sequence[Payload]
) -> bytes:
    """One signed, KEK-encrypted push; the caller sends the same bytes to every GM of a variant."""
    if not payloads or not isinstance(payloads[0], SeqPayload):
        raise ValueError("a push starts with SEQ")
    sig_len = crypto.rekey_signature_length(signing_key)
    placeholder = SigPayload(bytes(sig_len))
    body = encode_payloads([*payloads, placeholder])
    before_sig = body[: len(body) - 4 - sig_len]
    plain_len = HEADER_LEN + len(body)
    ct_len = len(crypto.pad_zero(body))
    header = IsakmpHeader(
        kek.spi[:8],
        kek.spi[8:],
        PayloadType.SEQ,
        ExchangeType.GROUPKEY_PUSH,
        HeaderFlag.ENCRYPTION,
        0,
        HEADER_LEN + ct_len,
    )
    signature = crypto.rekey_sign(
        signing_key, sig_hash, _signed_data(header, plain_len, before_sig)
    )
    body = before_sig + body[len(before_sig) : len(before_sig) + 4] + signature
    ct = crypto.kek_encrypt(kek.key, kek.iv, body)
    return header.encode() + ct


@dataclass(frozen=True)
class Push:
    seq: int
    notifies: tuple[NotifyPayload, ...]
    deletes: tuple[DeletePayload, ...]
    sa: GdoiSaPayload | None
    kd: KdPayload | None
    unknown: tuple[int, ...] = field(default=())  # payload types we did not understand

    def notify(self, ntype: int) -> NotifyPayload | None:
        return next((n for n in self.notifies if n.notify_type == ntype), None)


def open_push(data: bytes, kek: Kek, verify_key: PublicKey) -> Push:
    """Decrypt and verify a push under ``kek``; raises NotifyError/DecodeError/CryptoError."""
    header = IsakmpHeader.decode(data)
    if header.exchange_type != ExchangeType.GROUPKEY_PUSH:
        raise DecodeError("GROUPKEY-PUSH", "exchange_type", str(header.exchange_type))
    if header.cookies != kek.spi:
        raise DecodeError("GROUPKEY-PUSH", "cookies", "not the current KEK SPI")
    if not header.encrypted or header.message_id != 0:
        raise DecodeError("GROUPKEY-PUSH", "header", "must be encrypted with M-ID 0")
    ct = data[HEADER_LEN:]
    if not ct or len(ct) % 16:
        raise DecodeError("GROUPKEY-PUSH", "length", f"{len(ct)} octets of ciphertext")
    pt = crypto.kek_decrypt(kek.key, kek.iv, ct)
    try:
        payloads = decode_payloads(header.next_payload, pt, MAX_PUSH_PADDING)
    except DecodeError as exc:
        raise CryptoError(f"push does not decrypt under the KEK: {exc}") from exc
    if len(payloads) < 2 or not isinstance(payloads[-1].payload, SigPayload):
        raise NotifyError(NotifyType.INVALID_SIGNATURE, "push does not end with SIG")
    if not isinstance(payloads[0].payload, SeqPayload):
        raise NotifyError(NotifyType.PAYLOAD_MALFORMED, "push does not start with SEQ")
    before_sig = b"".join(d.raw for d in payloads[:-1])
    plain_len = HEADER_LEN + len(before_sig) + len(payloads[-1].raw)
    if not crypto.rekey_verify(
        verify_key,
        kek.sig_hash,
        _signed_data(header, plain_len, before_sig),
        payloads[-1].payload.data,
    ):
        raise NotifyError(NotifyType.INVALID_SIGNATURE, "push signature does not verify")
    body = [d.payload for d in payloads[1:-1]]
    sas = [p for p in body if isinstance(p, GdoiSaPayload)]
    kds = [p for p in body if isinstance(p, KdPayload)]
    if len(sas) > 1 or len(kds) > 1 or (bool(sas) != bool(kds)):
        raise NotifyError(NotifyType.PAYLOAD_MALFORMED, "push needs SA and KD together, once")
    known = (NotifyPayload, DeletePayload, GdoiSaPayload, KdPayload)
    return Push(
        seq=payloads[0].payload.seq,
        notifies=tuple(p for p in body if isinstance(p, NotifyPayload)),
        deletes=tuple(p for p in body if isinstance(p, DeletePayload)),
        sa=sas[0] if sas else None,
        kd=kds[0] if kds else None,
        unknown=tuple(p.payload_type for p in body if not isinstance(p, known)),
    )


# --- acknowledgement ----------------------------------------------------------


def ack_key(hash_alg: HashAlgorithm, skeyid_a: bytes, group_number: int) -> bytes:
    return crypto.prf(hash_alg, skeyid_a, b"gdoid rekey ack" + group_number.to_bytes(4, "big"))


def build_ack(
    hash_alg: HashAlgorithm,
    key: bytes,
    kek_spi: bytes,
    seq: int,
    gm_address: bytes,
    rng: RandomSource = SYSTEM_RANDOM,
) -> bytes:
    mid = message_id(rng)
    covered_payloads: list[Payload] = [
        SeqPayload(seq),
        IdPayload(IdType.ID_IPV4_ADDR, 0, 0, gm_address),
    ]
    covered = encode_payloads(covered_payloads)
    h = HashPayload(phase2_hash(hash_alg, key, mid, b"", covered))
    body = encode_payloads([h, *covered_payloads])
    header = IsakmpHeader(
        kek_spi[:8],
        kek_spi[8:],
        PayloadType.HASH,
        GROUPKEY_PUSH_ACK,
        HeaderFlag.NONE,
        mid,
        HEADER_LEN + len(body),
    )
    return header.encode() + body


@dataclass(frozen=True)
class Ack:
    kek_spi: bytes
    seq: int
    gm_address: bytes
    message_id: int
    hash: bytes
    covered: bytes


def parse_ack(data: bytes) -> Ack:
    header = IsakmpHeader.decode(data)
    if header.exchange_type != GROUPKEY_PUSH_ACK or header.encrypted:
        raise DecodeError("PUSH-ACK", "header", "not a plaintext acknowledgement")
    payloads = decode_payloads(header.next_payload, data[HEADER_LEN:])
    if len(payloads) != 3 or not isinstance(payloads[0].payload, HashPayload):
        raise DecodeError("PUSH-ACK", "payloads", "must be HASH, SEQ, ID")
    seq, ident = payloads[1].payload, payloads[2].payload
    if not isinstance(seq, SeqPayload) or not isinstance(ident, IdPayload):
        raise DecodeError("PUSH-ACK", "payloads", "must be HASH, SEQ, ID")
    if ident.id_type != IdType.ID_IPV4_ADDR or len(ident.data) != 4:
        raise DecodeError("PUSH-ACK", "id", "must be ID_IPV4_ADDR")
    return Ack(
        header.cookies,
        seq.seq,
        ident.data,
        header.message_id,
        payloads[0].payload.data,
        payloads[1].raw + payloads[2].raw,
    )


def verify_ack(ack: Ack, hash_alg: HashAlgorithm, key: bytes) -> bool:
    return phase2_hash_matches(hash_alg, key, ack.message_id, b"", ack.covered, ack.hash)
