"""GROUPKEY-PULL (RFC 6407 §3), exchange 32, protected by a phase-1 SA.

    (1) GM -> KS : HDR*, HASH(1), Ni, ID
    (2) KS -> GM : HDR*, HASH(2), Nr, SA
    (3) GM -> KS : HDR*, HASH(3) [, GAP]
    (4) KS -> GM : HDR*, HASH(4) [, SEQ], KD [, CERT] [, POP_R]

HASH(n) = prf(SKEYID_a, M-ID | <prefix> | every payload after HASH as sent),
with the prefix empty for (1), Ni_b for (2) and Ni_b | Nr_b for (3)/(4)
(wire.md §3: no leading zero octet); built and checked by ``IkeSa.seal_hashed`` /
``IkeSa.open_hashed``.

Proof of the KS role (RFC 6407 §3.2, wire.md §3): a GM that pins its KS asks for
it with the project-private GAP attribute POP_REQUEST in (3); the KS answers with
CERT + POP_R (a SIG payload: the phase-1 style RSA signature of
hash(Ni_b | Nr_b) by the certificate's key) or, for the rekey-key variant, POP_R
alone (the group's rekey signature over "pop_r" | Ni_b | Nr_b, verified with the
SIG_ALGORITHM_KEY the KD carries). HASH(4) covers both, as every payload.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, auto
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from gdoid.protocol import crypto
from gdoid.protocol.attributes import Attribute, find
from gdoid.protocol.constants import (
    CertEncoding,
    Doi,
    ExchangeType,
    GapAttribute,
    IdType,
    NotifyType,
)
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError
from gdoid.protocol.events import MemberRegistered, PullFailed, Registered
from gdoid.protocol.gdoi_payloads import GapPayload, GdoiSaPayload, KdPayload, SeqPayload
from gdoid.protocol.identity import IdentityPattern, describe_certificate, matching_pattern
from gdoid.protocol.ike_sa import NONCE_LEN, IkeSa
from gdoid.protocol.message import Message
from gdoid.protocol.output import PullOutput
from gdoid.protocol.payloads import (
    CertPayload,
    IdPayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SigPayload,
)
from gdoid.protocol.pki import CertificateValidator, PkiError, PrivateKey
from gdoid.protocol.policy import (
    GroupKeys,
    ParsedSa,
    SenderIds,
    build_kd,
    build_sa,
    gap_payloads,
    parse_keys,
    parse_sa,
)
from gdoid.protocol.rng import message_id

# GAP attribute in message 3 asking the KS to prove its role in message 4; the
# value is a PopMethod. Private-use range of RFC 6407's GAP attribute registry.
GAP_POP_REQUEST = 16384
POP_R_LABEL = b"pop_r"  # rekey-key variant: keeps POP_R apart from push signatures ("rekey")


class PopMethod(IntEnum):
    """How the KS proves its role in message 4 (wire.md §3)."""

    CERTIFICATE = 1  # RFC 6407 CERT + POP_R with the KS certificate's key
    REKEY_KEY = 2  # POP_R with the group's rekey signing key (project variant)


@dataclass(frozen=True)
class KsPinning:
    """What a GM requires of its KS before it installs anything (docs/config.md).

    ``pop`` asks for a proof of the KS role in message 4. ``identities`` are the
    certificates accepted for CERTIFICATE (checked against ``validator``'s CA);
    ``rekey_key_sha256`` pins the rekey signing key the KD carries (SHA-256 of
    its DER SubjectPublicKeyInfo), with or without a POP.
    """

    pop: PopMethod | None = None
    identities: tuple[IdentityPattern, ...] = ()
    validator: CertificateValidator | None = None
    rekey_key_sha256: bytes | None = None


@dataclass(frozen=True)
class PopSigner:
    """The KS's means to prove its role: its phase-1 certificate, the rekey key."""

    certificate: x509.Certificate | None
    certificate_key: PrivateKey | None
    rekey_key: PrivateKey | None
    rekey_sig_hash: crypto.SigHash


def pop_hash(sa: IkeSa, ni_b: bytes, nr_b: bytes) -> bytes:
    """The hash the certificate POP signs: hash(Ni_b | Nr_b), phase-1 hash algorithm."""
    return crypto.hash_digest(sa.hash, ni_b + nr_b)


def rekey_key_fingerprint(public_key_der: bytes) -> bytes:
    """SHA-256 of the rekey public key's DER SubjectPublicKeyInfo (``rekey_key_sha256``)."""
    return hashlib.sha256(public_key_der).digest()


def group_id(group_number: int) -> IdPayload:
    """ID_KEY_ID, 3 zero octets, group number as 4 octets (wire.md §3)."""
    return IdPayload(IdType.ID_KEY_ID, 0, 0, group_number.to_bytes(4, "big"))


def group_number_of(ident: IdPayload) -> int:
    if ident.id_type != IdType.ID_KEY_ID or len(ident.data) != 4 or ident.protocol_id or ident.port:
        raise NotifyError(
            NotifyType.INVALID_ID_INFORMATION,
            f"group ID must be ID_KEY_ID with a 4-octet group number (type {ident.id_type}, "
            f"{len(ident.data)} octets)",
        )
    return int.from_bytes(ident.data, "big")


def error_notify(sa: IkeSa, notify: NotifyType, data: bytes = b"") -> bytes:
    """An Informational NOTIFY protected by phase 1 (wire.md §3)."""
    return sa.informational(NotifyPayload(Doi.GDOI, 0, notify, b"", data[:200]))


class _State(Enum):
    SENT_1 = auto()
    SENT_2 = auto()
    SENT_3 = auto()
    DONE = auto()
    FAILED = auto()


# --- GM: initiator ----------------------------------------------------------


class PullInitiator:
    def __init__(
        self,
        sa: IkeSa,
        group_number: int,
        *,
        retransmit_interval: float = 2.0,
        retransmit_count: int = 4,
        sender_ids_wanted: int = 1,
        pinning: KsPinning | None = None,
    ) -> None:
        self.sa = sa
        rng = sa.rng
        self.pinning = pinning
        self.group_number = group_number
        self.message_id = message_id(rng)
        self.ni_b = rng.token_bytes(NONCE_LEN)
        self.nr_b = b""
        self.state = _State.SENT_1
        self.parsed: ParsedSa | None = None
        self.requested_sids = 0
        self.sender_ids_wanted = sender_ids_wanted
        self.retransmit_interval = retransmit_interval
        self.retransmit_count = retransmit_count
        self.last_sent: bytes | None = None
        self.retries = 0
        self.deadline: float | None = None

    def start(self, now: float) -> PullOutput:
        out = PullOutput()
        msg = self.sa.seal_hashed(
            ExchangeType.GROUPKEY_PULL,
            self.message_id,
            [NoncePayload(self.ni_b), group_id(self.group_number)],
        )
        self._send(msg, now, out)
        return out

    def _send(self, data: bytes, now: float, out: PullOutput) -> None:
        self.last_sent = data
        self.retries = 0
        self.deadline = now + self.retransmit_interval
        out.send.append(data)

    def _fail(
        self,
        out: PullOutput,
        reason: str,
        notify: NotifyType | None,
        tell_peer: bool,
        received: bool = False,
    ) -> PullOutput:
        self.state = _State.FAILED
        self.deadline = None
        if tell_peer and notify is not None:
            out.send.append(error_notify(self.sa, notify, reason.encode()))
        out.events.append(PullFailed(self.group_number, reason, notify, received))
        return out

    @property
    def finished(self) -> bool:
        return self.state in (_State.DONE, _State.FAILED)

    def on_timeout(self, now: float) -> PullOutput:
        out = PullOutput()
        if self.finished or self.deadline is None or now < self.deadline:
            return out
        if self.retries >= self.retransmit_count or self.last_sent is None:
            return self._fail(out, f"no response from KS {self.sa.peer_address}", None, False)
        self.retries += 1
        self.deadline = now + self.retransmit_interval * (2 ** min(self.retries, 4))
        out.send.append(self.last_sent)
        return out

    def notify_received(self, notify: int, data: bytes) -> PullOutput:
        """The KS refused us with an Informational NOTIFY."""
        try:
            name = NotifyType(notify).name
            ntype: NotifyType | None = NotifyType(notify)
        except ValueError:
            name, ntype = str(notify), None
        text = data.decode("utf-8", "replace") if data else ""
        reason = f"KS sent notify {name}" + (f": {text}" if text else "")
        return self._fail(PullOutput(), reason, ntype, False, received=True)

    def receive(self, data: bytes, now: float) -> PullOutput:
        out = PullOutput()
        if self.finished:
            return out
        try:
            opened = self.sa.open(data)
            msg = opened.message
            if msg.header.message_id != self.message_id:
                raise DecodeError("ISAKMP header", "message_id", "not this exchange")
            if self.state == _State.SENT_1:
                self._on_message_2(msg, now, opened.next_iv, out)
            elif self.state == _State.SENT_3:
                self._on_message_4(msg, now, opened.next_iv, out)
            else:
                raise DecodeError(
                    "GROUPKEY-PULL", "state", f"unexpected message in {self.state.name}"
                )
        except NotifyError as exc:
            return self._fail(out, exc.reason, NotifyType(exc.notify), True)
        except (DecodeError, CryptoError) as exc:
            # Could be garbage injected with our cookies: drop it, keep waiting.
            out.drops.append(str(exc))
        return out

    def _on_message_2(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        self.sa.open_hashed(msg, self.ni_b, "HASH(2)")
        self.sa.commit_iv(self.message_id, iv)
        nr = msg.require(NoncePayload, "GROUPKEY-PULL message 2")
        sa = msg.require(GdoiSaPayload, "GROUPKEY-PULL message 2")
        self.nr_b = nr.data
        self.parsed = parse_sa(sa, now)
        payloads: list[Payload] = []
        gap: list[Attribute] = []
        if self.parsed.needs_sender_ids and self.sender_ids_wanted:
            self.requested_sids = self.sender_ids_wanted
            gap.append(Attribute(GapAttribute.SENDER_ID_REQUEST, self.requested_sids))
        if self.pinning is not None and self.pinning.pop is not None:
            gap.append(Attribute(GAP_POP_REQUEST, self.pinning.pop))
        if gap:
            payloads.append(GapPayload(tuple(gap)))
        self.state = _State.SENT_3
        prefix = self.ni_b + self.nr_b
        self._send(
            self.sa.seal_hashed(ExchangeType.GROUPKEY_PULL, self.message_id, payloads, prefix),
            now,
            out,
        )

    def _on_message_4(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        self.sa.open_hashed(msg, self.ni_b + self.nr_b, "HASH(4)")
        self.sa.commit_iv(self.message_id, iv)
        kd = msg.require(KdPayload, "GROUPKEY-PULL message 4")
        seq = msg.get(SeqPayload)
        assert self.parsed is not None
        keys, sids = parse_keys(
            self.parsed, kd, seq.seq if seq else 0, self.group_number, now, self.requested_sids > 0
        )
        proof = self._check_ks(msg, keys, now) if self.pinning is not None else ""
        self.state = _State.DONE
        self.deadline = None
        self.sa.forget_exchange(self.message_id)
        out.events.append(Registered(self.group_number, keys, sids, proof))

    def _check_ks(self, msg: Message, keys: GroupKeys, now: float) -> str:
        """Refuse message 4 unless the KS proved what the GM pins; say what it proved."""
        pin = self.pinning
        assert pin is not None
        proved: list[str] = []
        if pin.rekey_key_sha256 is not None or pin.pop == PopMethod.REKEY_KEY:
            if keys.kek is None:
                raise NotifyError(
                    NotifyType.INVALID_KEY_INFORMATION, "no KEK: the rekey key cannot be checked"
                )
            got = rekey_key_fingerprint(keys.kek.public_key_der)
            if pin.rekey_key_sha256 is None or not crypto.constant_time_equal(
                got, pin.rekey_key_sha256
            ):
                raise NotifyError(
                    NotifyType.INVALID_KEY_INFORMATION,
                    f"rekey signing key sha256 {got.hex()} is not the pinned rekey_key_sha256",
                )
            proved.append("rekey key pinned")
        if pin.pop is None:
            return ", ".join(proved)
        sig = msg.get(SigPayload)
        if sig is None:
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED,
                "message 4 carries no POP_R: the KS did not prove its role",
            )
        if pin.pop == PopMethod.REKEY_KEY:
            assert keys.kek is not None
            public = crypto.load_public_key_der(keys.kek.public_key_der)
            if not crypto.rekey_verify(
                public, keys.kek.sig_hash, POP_R_LABEL + self.ni_b + self.nr_b, sig.data
            ):
                raise NotifyError(
                    NotifyType.INVALID_SIGNATURE, "POP_R does not verify with the pinned rekey key"
                )
            return ", ".join([*proved, "POP_R by the rekey key"])
        certp = msg.get(CertPayload)
        if certp is None:
            raise NotifyError(
                NotifyType.AUTHENTICATION_FAILED,
                "message 4 carries no CERT: the KS did not prove its role",
            )
        if certp.encoding != CertEncoding.X509_CERT_SIGNATURE:
            raise NotifyError(NotifyType.CERT_TYPE_UNSUPPORTED, f"CERT encoding {certp.encoding}")
        if pin.validator is None:
            raise NotifyError(
                NotifyType.INVALID_CERT_AUTHORITY, "no CA configured to check the KS certificate"
            )
        try:
            cert = pin.validator.validate(certp.data, dt.datetime.fromtimestamp(now, dt.UTC))
        except PkiError as exc:
            raise NotifyError(
                NotifyType.INVALID_CERTIFICATE, f"KS certificate refused: {exc}"
            ) from exc
        match = matching_pattern(pin.identities, cert)
        if match is None:
            raise NotifyError(
                NotifyType.INVALID_ID_INFORMATION,
                f"KS certificate {describe_certificate(cert)} matches none of ks_identities",
            )
        cert_key = cert.public_key()
        if not isinstance(cert_key, rsa.RSAPublicKey) or not crypto.ike_rsa_verify(
            cert_key, pop_hash(self.sa, self.ni_b, self.nr_b), sig.data
        ):
            raise NotifyError(
                NotifyType.INVALID_SIGNATURE, "POP_R does not verify with the KS certificate"
            )
        return ", ".join(
            [*proved, f"CERT+POP_R {describe_certificate(cert, 120)} (matches {match.text})"]
        )


# --- KS: responder ----------------------------------------------------------


class GroupDirectory(Protocol):
    """What the PULL responder asks the KS about groups (pure, no I/O)."""

    def pop_signer(self, group_number: int) -> PopSigner:
        """Keys to prove the KS role with, asked only when a GM requests a POP."""
        ...

    def snapshot(self, group_number: int, now: float) -> GroupKeys | None: ...

    def allocate_sender_ids(
        self, group_number: int, count: int, member: str
    ) -> SenderIds | None: ...

    def authorize(self, group_number: int, sa: IkeSa) -> str | None:
        """None if the peer may join; else the reason it may not."""
        ...


MAX_SIDS_PER_MEMBER = 4


class PullResponder:
    def __init__(
        self,
        sa: IkeSa,
        directory: GroupDirectory,
        message_id: int,
        now: float,
        timeout: float = 30.0,
    ) -> None:
        self.sa = sa
        self.directory = directory
        self.message_id = message_id
        self.state = _State.SENT_1  # waiting for message 1
        self.group_number: int | None = None
        self.ni_b = self.nr_b = b""
        self.keys: GroupKeys | None = None
        self.last_received: bytes | None = None
        self.last_sent: bytes | None = None
        self.deadline: float | None = now + timeout
        self.notify_text = b""  # Notification Data of a refusal (empty unless said below)

    @property
    def finished(self) -> bool:
        return self.state in (_State.DONE, _State.FAILED)

    def abort(self) -> None:
        self.state = _State.FAILED
        self.deadline = None

    def on_timeout(self, now: float) -> PullOutput:
        out = PullOutput()
        if not self.finished and self.deadline is not None and now >= self.deadline:
            self.state = _State.FAILED
            out.events.append(PullFailed(self.group_number, "GROUPKEY-PULL timed out", None))
        return out

    def receive(self, data: bytes, now: float) -> PullOutput:
        out = PullOutput()
        if data == self.last_received and self.last_sent is not None:
            out.send.append(self.last_sent)  # our answer was lost
            return out
        if self.finished:
            return out
        try:
            opened = self.sa.open(data)
            msg = opened.message
            if self.state == _State.SENT_1:
                self._on_message_1(msg, now, opened.next_iv, out)
            elif self.state == _State.SENT_2:
                self._on_message_3(msg, now, opened.next_iv, out)
            else:
                raise DecodeError(
                    "GROUPKEY-PULL", "state", f"unexpected message in {self.state.name}"
                )
            self.last_received = data
        except NotifyError as exc:
            self.state = _State.FAILED
            self.deadline = None
            out.send.append(error_notify(self.sa, NotifyType(exc.notify), self.notify_text))
            out.events.append(PullFailed(self.group_number, exc.reason, NotifyType(exc.notify)))
        except (DecodeError, CryptoError) as exc:
            out.drops.append(str(exc))
        return out

    def _reply(self, prefix: bytes, payloads: Sequence[Payload], out: PullOutput) -> None:
        self.last_sent = self.sa.seal_hashed(
            ExchangeType.GROUPKEY_PULL, self.message_id, payloads, prefix
        )
        out.send.append(self.last_sent)

    def _on_message_1(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        self.sa.open_hashed(msg, b"", "HASH(1)")
        self.sa.commit_iv(self.message_id, iv)
        ni = msg.require(NoncePayload, "GROUPKEY-PULL message 1")
        ident = msg.require(IdPayload, "GROUPKEY-PULL message 1")
        self.ni_b = ni.data
        self.group_number = group_number_of(ident)
        keys = self.directory.snapshot(self.group_number, now)
        if keys is None:
            raise NotifyError(
                NotifyType.INVALID_ID_INFORMATION, f"unknown group number {self.group_number}"
            )
        refusal = self.directory.authorize(self.group_number, self.sa)
        if refusal is not None:
            # Phase 1 authenticated the GM: it may learn why, though not the list it failed.
            self.notify_text = f"not authorized for group {self.group_number}".encode()
            raise NotifyError(NotifyType.AUTHENTICATION_FAILED, refusal)
        self.keys = keys
        self.nr_b = self.sa.rng.token_bytes(NONCE_LEN)
        self.state = _State.SENT_2
        self._reply(
            self.ni_b, [NoncePayload(self.nr_b), build_sa(keys, now, gap_payloads(keys))], out
        )

    def _on_message_3(self, msg: Message, now: float, iv: bytes, out: PullOutput) -> None:
        self.sa.open_hashed(msg, self.ni_b + self.nr_b, "HASH(3)")
        self.sa.commit_iv(self.message_id, iv)
        assert self.keys is not None and self.group_number is not None
        sids = None
        gap = msg.get(GapPayload)
        pop_req = find(gap.attributes, GAP_POP_REQUEST) if gap is not None else None
        proof = self._proof(pop_req.int_value) if pop_req is not None else []
        if gap is not None:
            req = find(gap.attributes, GapAttribute.SENDER_ID_REQUEST)
            if req is not None and req.int_value:
                count = min(req.int_value, MAX_SIDS_PER_MEMBER)
                sids = self.directory.allocate_sender_ids(
                    self.group_number, count, self.sa.peer_identity()
                )
                if sids is None:
                    raise NotifyError(
                        NotifyType.INVALID_KEY_INFORMATION, "sender-ID space exhausted"
                    )
        self.state = _State.DONE
        self.deadline = None
        self._reply(
            self.ni_b + self.nr_b,
            [SeqPayload(self.keys.seq), build_kd(self.keys, sids), *proof],
            out,
        )
        out.events.append(MemberRegistered(self.group_number, self.sa, self.keys, sids))

    def _proof(self, method: int) -> list[Payload]:
        """CERT + POP_R or POP_R for message 4 (before any sender ID is spent)."""
        assert self.group_number is not None
        try:
            pop = PopMethod(method)
        except ValueError:
            raise NotifyError(
                NotifyType.ATTRIBUTES_NOT_SUPPORTED, f"POP method {method} unknown"
            ) from None
        signer = self.directory.pop_signer(self.group_number)
        if pop == PopMethod.CERTIFICATE:
            key = signer.certificate_key
            if signer.certificate is None or not isinstance(key, rsa.RSAPrivateKey):
                raise NotifyError(
                    NotifyType.CERT_TYPE_UNSUPPORTED,
                    "KS has no RSA certificate ([auth.pki]) to prove its role",
                )
            der = signer.certificate.public_bytes(Encoding.DER)
            signature = crypto.ike_rsa_sign(key, pop_hash(self.sa, self.ni_b, self.nr_b))
            return [CertPayload(CertEncoding.X509_CERT_SIGNATURE, der), SigPayload(signature)]
        if signer.rekey_key is None:
            raise NotifyError(NotifyType.INVALID_KEY_INFORMATION, "group has no rekey signing key")
        data = POP_R_LABEL + self.ni_b + self.nr_b
        return [SigPayload(crypto.rekey_sign(signer.rekey_key, signer.rekey_sig_hash, data))]
