"""IKEv1 Main Mode machines (gdoid.protocol.main_mode*), driven in memory.

Datagrams are passed by hand between a MainModeInitiator and a
MainModeResponder; time is a number the test controls.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable

import pytest

from gdoid.protocol import crypto
from gdoid.protocol.constants import (
    Doi,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
)
from gdoid.protocol.crypto import DhGroup, HashAlgorithm
from gdoid.protocol.events import Phase1Established, Phase1Failed
from gdoid.protocol.header import HEADER_LEN, IsakmpHeader
from gdoid.protocol.ike_policy import Phase1Config, SignatureCredentials
from gdoid.protocol.main_mode_initiator import MainModeInitiator
from gdoid.protocol.main_mode_responder import MainModeResponder
from gdoid.protocol.message import decode_plain
from gdoid.protocol.payloads import NotifyPayload, SaPayload
from gdoid.protocol.pki import (
    CertificateValidator,
    load_certificates,
    load_private_key,
)
from gdoid.protocol.version import SoftwareVersion
from tests.ikesim import (
    GM_ADDR,
    KS_ADDR,
    PSK,
    PSK_AUTH,
    RSA_AUTH,
    T0,
    config,
)
from tests.pki import generate_test_pki


class Run:
    """One exchange between an initiator (GM) and a responder (KS)."""

    def __init__(self, icfg: Phase1Config, rcfg: Phase1Config, now: float = T0) -> None:
        self.now = now
        self.init = MainModeInitiator(icfg, KS_ADDR, now)
        self.resp = MainModeResponder(rcfg, GM_ADDR, now)
        self.i_events: list[object] = []
        self.r_events: list[object] = []
        self.to_resp: list[bytes] = []  # everything the initiator sent
        self.to_init: list[bytes] = []  # everything the responder sent

    def start(self) -> list[bytes]:
        out = self.init.start(self.now)
        self.to_resp += out.send
        return out.send

    def deliver_to_resp(self, data: bytes) -> list[bytes]:
        out = self.resp.receive(data, self.now)
        self.r_events += out.events
        self.to_init += out.send
        return out.send

    def deliver_to_init(self, data: bytes) -> list[bytes]:
        out = self.init.receive(data, self.now)
        self.i_events += out.events
        self.to_resp += out.send
        return out.send

    def pump(
        self,
        first: list[bytes],
        drop: Callable[[str, bytes], bool] = lambda *_: False,
        to: str = "r",
    ) -> None:
        """Deliver ``first`` (to the responder, or the initiator if ``to="i"``) and every
        answer until quiet; ``drop(direction, data)`` may lose a datagram."""
        queue = [(to, d) for d in first]
        while queue:
            where, data = queue.pop(0)
            if drop(where, data):
                continue
            if where == "r":
                queue += [("i", d) for d in self.deliver_to_resp(data)]
            else:
                queue += [("r", d) for d in self.deliver_to_init(data)]

    def complete(self) -> None:
        self.pump(self.start())

    def established(self) -> bool:
        return self.init.established and self.resp.established


def failed_events(events: list[object]) -> list[Phase1Failed]:
    return [e for e in events if isinstance(e, Phase1Failed)]


def notify_of(data: bytes) -> int:
    msg = decode_plain(data)
    assert msg.header.exchange_type == ExchangeType.INFORMATIONAL
    assert not msg.header.encrypted
    n = msg.get(NotifyPayload)
    assert n is not None
    return n.notify_type


# --- successful exchanges ---------------------------------------------------


@pytest.mark.parametrize("group", [DhGroup.MODP_2048, DhGroup.ECP_256, DhGroup.ECP_384])
@pytest.mark.parametrize("key_bits", [128, 256])
@pytest.mark.parametrize("hash_", [HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384])
def test_psk_main_mode_completes(group: DhGroup, key_bits: int, hash_: HashAlgorithm) -> None:
    kw = dict(key_bits=(key_bits,), hashes=(hash_,), groups=(group,))
    run = Run(config(GM_ADDR, **kw), config(KS_ADDR, version=SoftwareVersion(1, 0, 1), **kw))
    run.complete()
    assert run.established()
    isa, rsa_ = run.init.sa, run.resp.sa
    assert isa is not None and rsa_ is not None
    assert len(run.to_resp) == 3 and len(run.to_init) == 3
    assert isa.cipher_key == rsa_.cipher_key
    assert len(isa.cipher_key) == key_bits // 8
    assert isa.keys.skeyid_a == rsa_.keys.skeyid_a
    assert len(isa.keys.skeyid_a) == crypto.digest_size(hash_)
    assert isa.last_phase1_block == rsa_.last_phase1_block == run.to_init[-1][-16:]
    assert isa.cookies == rsa_.cookies
    assert isa.proposal.group == group and isa.proposal.key_bits == key_bits
    assert isa.proposal.hash == hash_ and isa.proposal.auth == PSK_AUTH
    # Each side records the version from the other's vendor ID.
    assert isa.peer_version == SoftwareVersion(1, 0, 1)
    assert rsa_.peer_version == SoftwareVersion(1, 0, 2)
    assert isa.is_initiator and not rsa_.is_initiator
    assert [type(e) for e in run.i_events] == [Phase1Established]
    assert [type(e) for e in run.r_events] == [Phase1Established]
    # Messages 5 and 6 are encrypted, 1-4 are not.
    flags = [IsakmpHeader.decode(d).flags for d in run.to_resp]
    assert [bool(f & HeaderFlag.ENCRYPTION) for f in flags] == [False, False, True]
    assert rsa_.peer_identity() == str(GM_ADDR)
    assert isa.peer_identity() == str(KS_ADDR)


def test_keys_match_independent_derivation() -> None:
    """SKEYID_a and the cipher key follow RFC 2409 from values visible on the wire."""
    run = Run(config(GM_ADDR), config(KS_ADDR))
    run.complete()
    sa = run.init.sa
    assert sa is not None
    h = HashAlgorithm.SHA2_256
    # Recompute from the nonces and KE the initiator holds (g^xy from its DH pair).
    m = run.init
    assert m.dh is not None
    gxy = m.dh.shared_secret(m.gxr)
    skeyid = crypto.prf(h, PSK, m.ni_b + m.nr_b)
    tail = gxy + sa.initiator_cookie + sa.responder_cookie
    d = crypto.prf(h, skeyid, tail + b"\x00")
    a = crypto.prf(h, skeyid, d + tail + b"\x01")
    e = crypto.prf(h, skeyid, a + tail + b"\x02")
    assert sa.keys.skeyid_a == a
    assert sa.cipher_key == e[:32]


def test_peer_without_version_vid_is_none() -> None:
    run = Run(config(GM_ADDR, version=None), config(KS_ADDR, version=None))
    run.complete()
    assert run.established()
    assert run.init.sa is not None and run.resp.sa is not None
    assert run.init.sa.peer_version is None
    assert run.resp.sa.peer_version is None
    # and no VID was sent at all
    assert decode_plain(run.to_resp[0]).types == (PayloadType.SA,)
    assert decode_plain(run.to_init[0]).types == (PayloadType.SA,)


def test_lifetime_is_the_shorter_one() -> None:
    run = Run(config(GM_ADDR, lifetime=3600), config(KS_ADDR, lifetime=86400))
    run.complete()
    assert run.init.sa is not None and run.resp.sa is not None
    assert run.init.sa.proposal.lifetime == run.resp.sa.proposal.lifetime == 3600
    assert run.resp.sa.expires_at == T0 + 3600


def test_responder_picks_a_common_proposal_from_several() -> None:
    icfg = config(
        GM_ADDR,
        key_bits=(256, 128),
        hashes=(HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_256),
        groups=(DhGroup.ECP_384, DhGroup.MODP_2048),
    )
    rcfg = config(
        KS_ADDR, key_bits=(128,), hashes=(HashAlgorithm.SHA2_256,), groups=(DhGroup.MODP_2048,)
    )
    run = Run(icfg, rcfg)
    run.complete()
    assert run.established()
    assert run.init.sa is not None
    p = run.init.sa.proposal
    assert (p.key_bits, p.hash, p.group) == (128, HashAlgorithm.SHA2_256, DhGroup.MODP_2048)


# --- certificates -----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SignatureCredentials]:
    base = tmp_path_factory.mktemp("pki")
    a = generate_test_pki(base / "a", ["gm1", "ks1"])
    b = generate_test_pki(base / "b", ["rogue"])

    def creds(paths: dict, name: str, ca_paths: dict) -> SignatureCredentials:
        return SignatureCredentials(
            load_certificates(paths[f"{name}.pem"])[0],
            load_private_key(paths[f"{name}.key"]),
            CertificateValidator(load_certificates(ca_paths["ca.pem"])),
        )

    return {
        "gm1": creds(a, "gm1", a),
        "ks1": creds(a, "ks1", a),
        "rogue": creds(b, "rogue", b),  # another CA's certificate, trusting only that CA
        "rogue_ks": creds(b, "rogue", a),  # another CA's certificate, trusting CA a
    }


def test_rsa_signature_main_mode(pki: dict[str, SignatureCredentials]) -> None:
    icfg = config(GM_ADDR, auths=(RSA_AUTH,), psk=None, signature=pki["gm1"])
    rcfg = config(KS_ADDR, auths=(RSA_AUTH,), psk=None, signature=pki["ks1"])
    now = crypto_now()
    run = Run(icfg, rcfg, now)
    run.complete()
    assert run.established(), (run.i_events, run.r_events)
    isa, rsa_ = run.init.sa, run.resp.sa
    assert isa is not None and rsa_ is not None
    assert isa.proposal.auth == RSA_AUTH
    assert isa.cipher_key == rsa_.cipher_key
    assert isa.keys.skeyid_a == rsa_.keys.skeyid_a
    assert rsa_.peer_certificate is not None
    assert rsa_.peer_identity() == "CN=gm1"
    assert isa.peer_identity() == "CN=ks1"
    # MM3 and MM4 carry a certificate request
    assert PayloadType.CR in decode_plain(run.to_resp[1]).types
    assert PayloadType.CR in decode_plain(run.to_init[1]).types


def crypto_now() -> float:
    """Certificates from generate_test_pki are valid around the real time."""
    import time

    return float(int(time.time()))


def test_certificate_from_another_ca_is_refused(pki: dict[str, SignatureCredentials]) -> None:
    icfg = config(GM_ADDR, auths=(RSA_AUTH,), psk=None, signature=pki["rogue"])
    rcfg = config(KS_ADDR, auths=(RSA_AUTH,), psk=None, signature=pki["ks1"])
    run = Run(icfg, rcfg, crypto_now())
    run.complete()
    assert not run.resp.established and not run.init.established
    assert run.resp.failed and run.init.failed
    [rf] = failed_events(run.r_events)
    assert rf.notify == NotifyType.AUTHENTICATION_FAILED and not rf.received
    assert notify_of(run.to_init[-1]) == NotifyType.AUTHENTICATION_FAILED
    [inf] = failed_events(run.i_events)
    assert inf.notify == NotifyType.AUTHENTICATION_FAILED and inf.received


def test_responder_certificate_from_another_ca(pki: dict[str, SignatureCredentials]) -> None:
    icfg = config(GM_ADDR, auths=(RSA_AUTH,), psk=None, signature=pki["gm1"])
    rcfg = config(KS_ADDR, auths=(RSA_AUTH,), psk=None, signature=pki["rogue_ks"])
    run = Run(icfg, rcfg, crypto_now())
    run.complete()
    # It trusts the GM's CA, so it completes before hearing the GM's refusal.
    assert any(isinstance(e, Phase1Established) for e in run.r_events)
    assert run.init.failed and not run.init.established
    [inf] = failed_events(run.i_events)
    assert inf.notify == NotifyType.AUTHENTICATION_FAILED and not inf.received
    assert notify_of(run.to_resp[-1]) == NotifyType.AUTHENTICATION_FAILED


# --- refusals ---------------------------------------------------------------


def test_wrong_psk_authentication_failed() -> None:
    run = Run(config(GM_ADDR, psk=b"wrong"), config(KS_ADDR))
    run.complete()
    assert run.init.failed and run.resp.failed
    # The responder's answer to MM5 is an *unencrypted* Informational.
    last = run.to_init[-1]
    hdr = IsakmpHeader.decode(last)
    assert hdr.exchange_type == ExchangeType.INFORMATIONAL
    assert not hdr.flags & HeaderFlag.ENCRYPTION
    assert hdr.message_id == 0
    assert notify_of(last) == NotifyType.AUTHENTICATION_FAILED
    n = decode_plain(last).get(NotifyPayload)
    assert n is not None and n.spi == hdr.cookies
    [rf] = failed_events(run.r_events)
    [inf] = failed_events(run.i_events)
    assert rf.notify == inf.notify == NotifyType.AUTHENTICATION_FAILED
    assert not rf.received and inf.received
    assert not [e for e in run.i_events + run.r_events if isinstance(e, Phase1Established)]


def test_no_common_group_no_proposal_chosen() -> None:
    run = Run(
        config(GM_ADDR, groups=(DhGroup.MODP_2048,)), config(KS_ADDR, groups=(DhGroup.ECP_256,))
    )
    run.complete()
    assert len(run.to_init) == 1
    assert notify_of(run.to_init[0]) == NotifyType.NO_PROPOSAL_CHOSEN
    [rf] = failed_events(run.r_events)
    assert rf.notify == NotifyType.NO_PROPOSAL_CHOSEN
    [inf] = failed_events(run.i_events)
    assert inf.notify == NotifyType.NO_PROPOSAL_CHOSEN and inf.received
    assert run.init.failed and run.init.deadline is None


def test_no_common_cipher_no_proposal_chosen() -> None:
    run = Run(config(GM_ADDR, key_bits=(128,)), config(KS_ADDR, key_bits=(256,)))
    run.complete()
    assert notify_of(run.to_init[0]) == NotifyType.NO_PROPOSAL_CHOSEN


def test_psk_proposal_refused_when_responder_has_no_psk_for_peer() -> None:
    run = Run(config(GM_ADDR), config(KS_ADDR, psk=None))
    run.complete()
    assert notify_of(run.to_init[0]) == NotifyType.NO_PROPOSAL_CHOSEN


def test_sha1_refused_unless_configured() -> None:
    sha1 = (HashAlgorithm.SHA,)
    run = Run(config(GM_ADDR, hashes=sha1), config(KS_ADDR))
    run.complete()
    assert notify_of(run.to_init[0]) == NotifyType.NO_PROPOSAL_CHOSEN
    # Accepted by a responder that allows it.
    run = Run(
        config(GM_ADDR, hashes=sha1),
        config(KS_ADDR, hashes=(HashAlgorithm.SHA2_256, HashAlgorithm.SHA)),
    )
    run.complete()
    assert run.established()
    assert run.init.sa is not None and run.init.sa.proposal.hash == HashAlgorithm.SHA
    assert run.init.sa.cipher_key == run.resp.sa.cipher_key  # type: ignore[union-attr]  # both sides are established here


def test_initiator_refuses_a_transform_it_did_not_offer() -> None:
    """A responder (or attacker) choosing something else is NO_PROPOSAL_CHOSEN."""
    run = Run(
        config(GM_ADDR, groups=(DhGroup.ECP_256,)), config(KS_ADDR, groups=(DhGroup.ECP_384,))
    )
    mm1 = run.start()[0]
    # Forge MM2 from a responder that would have chosen group 20.
    other = MainModeInitiator(config(GM_ADDR, groups=(DhGroup.ECP_384,)), KS_ADDR, T0)
    other_mm1 = other.start(T0).send[0]
    forged_mm1 = mm1[:8] + other_mm1[8:]
    resp = MainModeResponder(config(KS_ADDR, groups=(DhGroup.ECP_384,)), GM_ADDR, T0)
    mm2 = resp.receive(forged_mm1, T0).send[0]
    sent = run.deliver_to_init(mm2)
    assert notify_of(sent[0]) == NotifyType.NO_PROPOSAL_CHOSEN
    [inf] = failed_events(run.i_events)
    assert inf.notify == NotifyType.NO_PROPOSAL_CHOSEN and not inf.received


# --- MM1 on the wire --------------------------------------------------------


def test_mm1_exact_bytes() -> None:
    icfg = config(
        GM_ADDR,
        key_bits=(256,),
        hashes=(HashAlgorithm.SHA2_384,),
        groups=(DhGroup.ECP_384,),
        lifetime=28800,
        version=SoftwareVersion(1, 0, 2),
    )
    init = MainModeInitiator(icfg, KS_ADDR, T0)
    [mm1] = init.start(T0).send
    icky = mm1[:8]
    assert icky != bytes(8)

    attrs = (
        struct.pack("!HH", 0x8000 | 1, 7)  # ENCRYPTION_ALGORITHM = AES-CBC
        + struct.pack("!HH", 0x8000 | 14, 256)  # KEY_LENGTH
        + struct.pack("!HH", 0x8000 | 2, 5)  # HASH = SHA2-384
        + struct.pack("!HH", 0x8000 | 3, 1)  # AUTH = pre-shared key
        + struct.pack("!HH", 0x8000 | 4, 20)  # GROUP = 20
        + struct.pack("!HH", 0x8000 | 11, 1)  # LIFE_TYPE = seconds
        + struct.pack("!HHI", 12, 4, 28800)  # LIFE_DURATION, TLV, 4 octets
    )
    transform = struct.pack("!BBH", 1, 1, 0) + attrs  # transform #1, KEY_IKE
    transform_pl = struct.pack("!BBH", 0, 0, 4 + len(transform)) + transform
    # proposal #1, PROTO_ISAKMP, no SPI, 1 transform
    proposal = struct.pack("!BBBB", 1, 1, 0, 1) + transform_pl
    proposal_pl = struct.pack("!BBH", 0, 0, 4 + len(proposal)) + proposal
    sa_body = struct.pack("!II", 1, 1) + proposal_pl  # DOI 1 (IPsec), SIT_IDENTITY_ONLY
    sa_pl = struct.pack("!BBH", PayloadType.VID, 0, 4 + len(sa_body)) + sa_body
    vid_data = hashlib.sha256(b"GDOI GET VPN software version").digest()[:16] + bytes([1, 0, 2])
    vid_pl = struct.pack("!BBH", 0, 0, 4 + len(vid_data)) + vid_data
    body = sa_pl + vid_pl
    header = (
        icky
        + bytes(8)
        + struct.pack("!BBBBII", PayloadType.SA, 0x10, 2, 0, 0, HEADER_LEN + len(body))
    )
    assert mm1 == header + body


def test_mm1_transforms_numbered_in_preference_order() -> None:
    icfg = config(GM_ADDR, key_bits=(256, 128), groups=(DhGroup.ECP_256, DhGroup.MODP_2048))
    [mm1] = MainModeInitiator(icfg, KS_ADDR, T0).start(T0).send
    sa = decode_plain(mm1).get(SaPayload)
    assert sa is not None and sa.doi == Doi.IPSEC
    ts = sa.proposals[0].transforms
    assert [t.number for t in ts] == [1, 2, 3, 4]
    assert [(t.attributes[1].value, t.attributes[4].value) for t in ts] == [
        (256, 19),
        (128, 19),
        (256, 14),
        (128, 14),
    ]
    # wire: walk the transform chain; every transform but the last says "next is TRANSFORM"
    # header, SA generic header, DOI + situation, proposal generic header, proposal fields
    pos = HEADER_LEN + 4 + 8 + 4 + 4
    nexts = []
    for _ in ts:
        np, _res, length = struct.unpack_from("!BBH", mm1, pos)
        nexts.append(np)
        pos += length
    assert nexts == [3, 3, 3, 0]


def test_responder_accepts_doi_2_in_mm1() -> None:
    run = Run(config(GM_ADDR), config(KS_ADDR))
    [mm1] = run.start()
    # DOI is the first 4 octets of the SA body: header 28 + generic 4.
    patched = mm1[:32] + struct.pack("!I", Doi.GDOI) + mm1[36:]
    # The initiator hashes its own SA body (DOI 1); keep both in step.
    run.init.sai_b = patched[32 : 32 + len(run.init.sai_b)]
    run.pump([patched])
    assert run.established()


# --- retransmission -----------------------------------------------------------


@pytest.mark.parametrize("lost", [0, 1, 2], ids=["MM2", "MM4", "MM6"])
def test_lost_responder_message_is_retransmitted(lost: int) -> None:
    run = Run(config(GM_ADDR), config(KS_ADDR))
    dropped: list[bytes] = []

    def drop(to: str, data: bytes) -> bool:
        if to == "i" and not dropped and len(run.to_init) > lost and data == run.to_init[lost]:
            dropped.append(data)
            return True
        return False

    run.pump(run.start(), drop)
    assert len(dropped) == 1
    assert not run.init.established
    assert run.resp.established == (lost == 2)
    # Nothing happens before the deadline.
    assert run.init.deadline == T0 + 2.0
    assert run.init.on_timeout(T0 + 1.0).send == []
    run.now = T0 + 2.0
    out = run.init.on_timeout(run.now)
    assert out.send == [run.to_resp[-1]]  # the last message again, unchanged
    assert out.events == []
    # The responder answers the duplicate with its cached reply.
    answer = run.deliver_to_resp(out.send[0])
    assert answer == dropped
    run.pump(answer, to="i")
    assert run.established()
    assert run.init.sa.cipher_key == run.resp.sa.cipher_key  # type: ignore[union-attr]  # both sides are established here
    assert len([e for e in run.r_events if isinstance(e, Phase1Established)]) == 1
    assert len([e for e in run.i_events if isinstance(e, Phase1Established)]) == 1


def test_initiator_fails_after_retransmit_count() -> None:
    run = Run(config(GM_ADDR, retransmit_count=3, retransmit_interval=1.0), config(KS_ADDR))
    [mm1] = run.start()
    resent = 0
    now = T0
    for _ in range(10):
        assert run.init.deadline is not None
        now = run.init.deadline
        out = run.init.on_timeout(now)
        if out.events:
            break
        assert out.send == [mm1]
        resent += 1
    assert resent == 3
    [ev] = out.events
    assert isinstance(ev, Phase1Failed) and ev.notify is None
    assert out.send == []
    assert run.init.failed and run.init.deadline is None
    # Backoff: intervals doubled between retransmissions.
    assert now == T0 + 1 + 2 + 4 + 8


def test_half_open_responder_times_out() -> None:
    run = Run(config(GM_ADDR), config(KS_ADDR, half_open_timeout=30.0))
    [mm1] = run.start()
    assert run.deliver_to_resp(mm1)
    assert run.resp.on_timeout(T0 + 29.9).events == []
    out = run.resp.on_timeout(T0 + 30.0)
    [ev] = out.events
    assert isinstance(ev, Phase1Failed) and ev.notify is None
    assert out.send == []
    assert run.resp.failed
    # Established responders do not time out.
    run2 = Run(config(GM_ADDR), config(KS_ADDR))
    run2.complete()
    assert run2.resp.on_timeout(T0 + 1000).events == []
    assert run2.resp.established


def test_duplicate_mm2_does_not_disturb_initiator() -> None:
    run = Run(config(GM_ADDR), config(KS_ADDR))
    [mm1] = run.start()
    [mm2] = run.deliver_to_resp(mm1)
    [mm3] = run.deliver_to_init(mm2)
    assert run.deliver_to_init(mm2) == []  # duplicate: ignored
    assert not run.init.failed
    run.pump([mm3])
    assert run.established()


# --- garbage --------------------------------------------------------------------


def _with_cookies(
    icky: bytes, rcky: bytes, body: bytes, xchg: int = 2, flags: int = 0, np: int = 1
) -> bytes:
    return (
        icky
        + rcky
        + struct.pack("!BBBBII", np, 0x10, xchg, flags, 0, HEADER_LEN + len(body))
        + body
    )


def _garbage_bodies(rng: random.Random) -> list[bytes]:
    out = [b"", b"\x00" * 4, b"\xff" * 40]
    for n in (1, 3, 4, 5, 16, 31, 32, 48, 100, 300):
        out.append(rng.randbytes(n))
    # Generic headers with absurd lengths.
    out += [
        struct.pack("!BBH", 0, 0, 0),
        struct.pack("!BBH", 0, 0, 65535) + b"xx",
        struct.pack("!BBH", 4, 0, 4),
    ]
    return out


def _machine_at(stage: int) -> tuple[Run, MainModeInitiator | MainModeResponder, bytes, bytes, str]:
    """A fresh exchange stopped after ``stage`` responder messages."""
    run = Run(config(GM_ADDR), config(KS_ADDR))
    [mm1] = run.start()
    if stage == 0:  # responder fresh (INIT)
        return run, run.resp, run.init.icky, bytes(8), "resp"
    [mm2] = run.deliver_to_resp(mm1)
    if stage == 1:  # initiator waits for MM2
        return run, run.init, run.init.icky, bytes(8), "init-mm2"
    [mm3] = run.deliver_to_init(mm2)
    if stage == 2:  # responder waits for MM3
        return run, run.resp, run.init.icky, run.resp.rcky, "resp-mm3"
    [mm4] = run.deliver_to_resp(mm3)
    if stage == 3:  # initiator waits for MM4
        return run, run.init, run.init.icky, run.resp.rcky, "init-mm4"
    [mm5] = run.deliver_to_init(mm4)
    if stage == 4:  # responder waits for MM5 (encrypted)
        return run, run.resp, run.init.icky, run.resp.rcky, "resp-mm5"
    run.deliver_to_resp(mm5)
    return run, run.init, run.init.icky, run.resp.rcky, "init-mm6"


@pytest.mark.parametrize("stage", range(6))
def test_garbage_with_right_cookies_never_raises(stage: int) -> None:
    rng = random.Random(stage)
    for body in _garbage_bodies(rng):
        for xchg, flags, np in ((2, 0, 1), (2, 0, 4), (2, 1, 5), (2, 1, 8), (5, 0, 11), (5, 0, 1)):
            run, machine, icky, rcky, _ = _machine_at(stage)
            data = _with_cookies(icky, rcky, body, xchg, flags, np)
            out = machine.receive(data, T0)  # must not raise
            if machine.failed:
                for ev in out.events:
                    assert isinstance(ev, Phase1Failed)
                    assert (
                        ev.notify
                        in (
                            None,
                            NotifyType.PAYLOAD_MALFORMED,
                            NotifyType.AUTHENTICATION_FAILED,
                            NotifyType.INVALID_PAYLOAD_TYPE,
                        )
                        or ev.received
                    )
                for d in out.send:
                    assert notify_of(d) in (
                        NotifyType.PAYLOAD_MALFORMED,
                        NotifyType.AUTHENTICATION_FAILED,
                    )
            else:
                assert out.events == [] and out.send == []


def test_truncated_and_bitflipped_messages_never_raise() -> None:
    rng = random.Random(7)
    for stage in range(6):
        for _ in range(25):
            run, machine, icky, rcky, _name = _machine_at(stage)
            # Mutate the genuine next message for this machine.
            ref = Run(config(GM_ADDR), config(KS_ADDR))
            ref.complete()
            genuine = (ref.to_resp + ref.to_init)[rng.randrange(6)]
            body = bytearray(genuine[HEADER_LEN:])
            if body and rng.random() < 0.5:
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
            else:
                body = body[: rng.randrange(len(body) + 1)]
            hdr = IsakmpHeader.decode(genuine)
            data = _with_cookies(
                icky, rcky, bytes(body), hdr.exchange_type, int(hdr.flags), hdr.next_payload
            )
            machine.receive(data, T0)  # must not raise


def test_malformed_mm1_gets_payload_malformed() -> None:
    resp = MainModeResponder(config(KS_ADDR), GM_ADDR, T0)
    icky = b"\x11" * 8
    data = _with_cookies(icky, bytes(8), struct.pack("!BBH", 0, 0, 200) + b"junk")
    out = resp.receive(data, T0)
    assert resp.failed
    [ev] = out.events
    assert isinstance(ev, Phase1Failed) and ev.notify == NotifyType.PAYLOAD_MALFORMED
    [sent] = out.send
    assert notify_of(sent) == NotifyType.PAYLOAD_MALFORMED


def test_failed_machine_ignores_everything() -> None:
    resp = MainModeResponder(config(KS_ADDR), GM_ADDR, T0)
    resp.receive(_with_cookies(b"\x11" * 8, bytes(8), b"\x00"), T0)
    assert resp.failed
    out = resp.receive(_with_cookies(b"\x11" * 8, bytes(8), b"\x00\x01"), T0)
    assert out.send == [] and out.events == []
