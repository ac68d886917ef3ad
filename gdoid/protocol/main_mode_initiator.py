"""IKEv1 Main Mode initiator (RFC 2409 §5): the GM, and a KS that initiates to a COOP peer.

Sends message 1 (SA) on ``start``, 3 (KE, Ni) and 5 (IDii, HASH_I or CERT+SIG_I),
retransmits on ``on_timeout`` and starts over from message 1 when the responder
lost its state (INVALID_COOKIE, see ``main_mode_responder.py``).
"""

from __future__ import annotations

import ipaddress

from gdoid.protocol.constants import (
    MAIN_MODE,
    SIT_IDENTITY_ONLY,
    AuthenticationMethod,
    CertEncoding,
    Doi,
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from gdoid.protocol.crypto import DhKeyPair
from gdoid.protocol.errors import CryptoError, DecodeError, NotifyError, ProtocolError
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Config, Phase1Proposal
from gdoid.protocol.ike_sa import NONCE_LEN
from gdoid.protocol.main_mode import MainModeExchange, MainModeState
from gdoid.protocol.message import decode_plain, encode_plain
from gdoid.protocol.output import Phase1Output
from gdoid.protocol.payloads import (
    CrPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    VendorIdPayload,
)
from gdoid.protocol.rng import SYSTEM_RANDOM, RandomSource
from gdoid.protocol.version import version_from_vids, version_vid

MAX_RESTARTS = 3  # times an initiator starts over from message 1 when the responder asks


class MainModeInitiator(MainModeExchange):
    """The GM side (and the KS that initiates to a COOP peer)."""

    def __init__(
        self,
        config: Phase1Config,
        peer: ipaddress.IPv4Address,
        now: float,
        rng: RandomSource = SYSTEM_RANDOM,
    ) -> None:
        super().__init__(config, peer, now, rng)
        self.mm1 = b""
        self.restarts = 0

    @property
    def is_initiator(self) -> bool:
        return True

    def start(self, now: float) -> Phase1Output:
        out = Phase1Output()
        self.icky = self.rng.token_bytes(8)
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
        self.state = MainModeState.MM1_SENT
        self.mm1 = encode_plain(self.icky, self.rcky, MAIN_MODE, 0, payloads)
        self._send(self.mm1, now, out)
        return out

    def receive(self, data: bytes, now: float) -> Phase1Output:
        if (
            self.state == MainModeState.MM3_SENT
            and self.restarts < MAX_RESTARTS
            and self._state_lost(data)
        ):
            # The responder kept message 1's state only briefly (a flood evicts it) and
            # says so once our cookie proved our address: start over from message 1.
            self.restarts += 1
            self.state = MainModeState.MM1_SENT
            self.rcky = bytes(8)
            self.dh, self.gxi, self.ni_b, self.last_received = None, b"", b"", None
            out = Phase1Output()
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

    def _step(self, data: bytes, header: IsakmpHeader, now: float, out: Phase1Output) -> None:
        if header.initiator_cookie != self.icky:
            raise DecodeError("ISAKMP header", "initiator_cookie", "not ours")
        if self.state == MainModeState.MM1_SENT:
            msg = decode_plain(data)
            self.rcky = header.responder_cookie
            if self.rcky == bytes(8):
                raise DecodeError("ISAKMP header", "responder_cookie", "zero in message 2")
            sa = msg.get(SaPayload)
            if sa is None or len(sa.proposals) != 1 or len(sa.proposals[0].transforms) != 1:
                raise NotifyError(
                    NotifyType.BAD_PROPOSAL_SYNTAX, "message 2 must choose one transform"
                )
            chosen = Phase1Proposal.from_transform(sa.proposals[0].transforms[0])
            ours = [p for p in self.config.proposals if chosen is not None and p.matches(chosen)]
            if chosen is None or not ours:
                raise NotifyError(
                    NotifyType.NO_PROPOSAL_CHOSEN, "responder chose a transform we did not offer"
                )
            self.proposal = Phase1Proposal(
                chosen.key_bits,
                chosen.hash,
                chosen.auth,
                chosen.group,
                min(chosen.lifetime, ours[0].lifetime),
            )
            self.peer_version = version_from_vids(msg.all(VendorIdPayload))
            self.dh = DhKeyPair.generate(self.proposal.group)
            self.gxi = self.dh.public_bytes
            self.ni_b = self.rng.token_bytes(NONCE_LEN)
            payloads: list[Payload] = [KePayload(self.gxi), NoncePayload(self.ni_b)]
            if self.proposal.auth == AuthenticationMethod.RSA_SIG:
                payloads.append(CrPayload(CertEncoding.X509_CERT_SIGNATURE))
            self.state = MainModeState.MM3_SENT
            self._send(encode_plain(self.icky, self.rcky, MAIN_MODE, 0, payloads), now, out)
        elif self.state == MainModeState.MM3_SENT:
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
            self.state = MainModeState.MM5_SENT
            self._send(self._encrypt(self._auth_payloads()), now, out)
        elif self.state == MainModeState.MM5_SENT:
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


__all__ = ["MAX_RESTARTS", "MainModeInitiator"]
