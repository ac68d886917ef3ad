"""IKEv1 Main Mode responder (RFC 2409 §5): the KS side, a stateless first step then a machine.

Message 1 is answered by :func:`respond_mm1` with message 2 and leaves only a
:class:`HalfOpen` record; the responder cookie (:class:`ResponderCookies`)
proves the initiator's address before any Diffie-Hellman work, and a
:class:`MainModeResponder` exists from message 3 on (docs/wire.md,
"Responder cookies").
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from dataclasses import dataclass

from gdoid.protocol.constants import (
    MAIN_MODE,
    AuthenticationMethod,
    CertEncoding,
    Doi,
    NotifyType,
    PayloadType,
    ProtocolId,
)
from gdoid.protocol.crypto import DhKeyPair
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Config, Phase1Proposal
from gdoid.protocol.ike_sa import NONCE_LEN
from gdoid.protocol.main_mode import MainModeExchange, MainModeState
from gdoid.protocol.message import decode_plain, encode_plain
from gdoid.protocol.output import Phase1Output
from gdoid.protocol.payloads import (
    CrPayload,
    KePayload,
    NoncePayload,
    Payload,
    Proposal,
    SaPayload,
    Transform,
    VendorIdPayload,
)
from gdoid.protocol.rng import SYSTEM_RANDOM, RandomSource
from gdoid.protocol.version import SoftwareVersion, version_from_vids, version_vid

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

    def __init__(
        self, lifetime: float = COOKIE_SECRET_LIFETIME, rng: RandomSource = SYSTEM_RANDOM
    ) -> None:
        self.lifetime = lifetime
        self.rng = rng
        self._current = rng.token_bytes(32)
        self._previous: bytes | None = None
        self._rotated_at: float | None = None

    def _rotate(self, now: float) -> None:
        if self._rotated_at is None or now < self._rotated_at:
            self._rotated_at = now
        elif now - self._rotated_at >= self.lifetime:
            # Two lifetimes without a message: the old secret goes too.
            self._previous = self._current if now - self._rotated_at < 2 * self.lifetime else None
            self._current = self.rng.token_bytes(32)
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
            if (
                offered.auth == AuthenticationMethod.PRE_SHARED_KEY
                and config.psk_lookup(peer) is None
            ):
                continue
            if offered.auth == AuthenticationMethod.RSA_SIG and config.signature is None:
                continue
            for ours in config.proposals:
                if ours.matches(offered):
                    if offered.lifetime >= ours.lifetime:
                        return prop, t, ours  # shared, not one object per message 1
                    return (
                        prop,
                        t,
                        Phase1Proposal(
                            offered.key_bits,
                            offered.hash,
                            offered.auth,
                            offered.group,
                            offered.lifetime,
                        ),
                    )
    transforms = [t for prop in sa.proposals for t in prop.transforms]
    offered_text = "; ".join(  # the first few: the reason is logged, and cheap to build
        p.describe() if p else "unsupported transform"
        for p in map(Phase1Proposal.from_transform, transforms[:4])
    )
    more = f"; {len(transforms) - 4} more" if len(transforms) > 4 else ""
    raise NotifyError(
        NotifyType.NO_PROPOSAL_CHOSEN, f"no acceptable proposal (offered: {offered_text}{more})"
    )


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
        raise DecodeError(
            "Main Mode message 1", "length", f"{len(data)} octets, at most {MAX_MM1_LEN}"
        )
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
    reply_sa = SaPayload(
        sa.doi, sa.situation, (Proposal(prop.number, prop.protocol_id, prop.spi, (t,)),)
    )
    icky = header.initiator_cookie
    mm2 = encode_plain(icky, rcky, MAIN_MODE, 0, [reply_sa])
    if config.software_version is not None:
        with_vid = encode_plain(
            icky, rcky, MAIN_MODE, 0, [reply_sa, version_vid(config.software_version)]
        )
        if len(with_vid) <= len(data):
            mm2 = with_vid
    return HalfOpen(sai_b, proposal, peer_version, now), mm2


class MainModeResponder(MainModeExchange):
    """The KS side.

    The key server answers message 1 with :func:`respond_mm1` and keeps only a
    :class:`HalfOpen`; a machine (:meth:`resume`) exists from message 3 on, once the
    initiator proved its address with the responder cookie.  Created directly, the
    machine also takes message 1 itself (tests, simple shells).
    """

    @property
    def is_initiator(self) -> bool:
        return False

    def __init__(
        self,
        config: Phase1Config,
        peer: ipaddress.IPv4Address,
        now: float,
        rng: RandomSource = SYSTEM_RANDOM,
    ) -> None:
        super().__init__(config, peer, now, rng)
        self.rcky = self.rng.token_bytes(8)
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
        self.state = MainModeState.MM2_SENT
        return self

    def on_timeout(self, now: float) -> Phase1Output:
        # Responders never retransmit on their own (the initiator drives);
        # they only expire half-open state.
        out = Phase1Output()
        if (
            self.deadline is not None
            and now >= self.deadline
            and self.state != MainModeState.ESTABLISHED
        ):
            return self._fail(out, f"half-open exchange with {self.peer} timed out", None, False)
        return out

    def _send(self, data: bytes, now: float, out: Phase1Output, expect_reply: bool = True) -> None:
        self.last_sent = data
        out.send.append(data)

    def _step(self, data: bytes, header: IsakmpHeader, now: float, out: Phase1Output) -> None:
        if self.state == MainModeState.INIT:
            self.icky = header.initiator_cookie
            half, mm2 = respond_mm1(self.config, self.peer, data, header, self.rcky, now)
            self.sai_b, self.proposal, self.peer_version = (
                half.sai_b,
                half.proposal,
                half.peer_version,
            )
            self.state = MainModeState.MM2_SENT
            self._send(mm2, now, out)
        elif self.state == MainModeState.MM2_SENT:
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
            self.nr_b = self.rng.token_bytes(min(NONCE_LEN, max(MIN_NONCE_LEN, len(ni.data))))
            self._derive(gxy)
            payloads: list[Payload] = [KePayload(self.gxr), NoncePayload(self.nr_b)]
            mm4 = encode_plain(self.icky, self.rcky, MAIN_MODE, 0, payloads)
            if self.proposal.auth == AuthenticationMethod.RSA_SIG:
                with_cr = encode_plain(
                    self.icky,
                    self.rcky,
                    MAIN_MODE,
                    0,
                    [*payloads, CrPayload(CertEncoding.X509_CERT_SIGNATURE)],
                )
                if len(with_cr) <= len(data):  # CR is a hint; our peers send CERT anyway
                    mm4 = with_cr
            self.state = MainModeState.MM4_SENT
            self._send(mm4, now, out)
        elif self.state == MainModeState.MM4_SENT:
            msg = self._decrypt(data, header)
            peer_id, cert = self._verify_auth(msg, now)
            self._send(self._encrypt(self._auth_payloads()), now, out)
            self.deadline = None
            self._established(peer_id, cert, now, out)
        else:
            raise DecodeError("Main Mode", "state", f"unexpected message in {self.state.name}")


__all__ = [
    "MAX_MM1_LEN",
    "MAX_PROPOSALS",
    "MAX_TRANSFORMS",
    "HalfOpen",
    "MainModeResponder",
    "ResponderCookies",
    "respond_mm1",
]
