"""Issue 9 §2, GM side: a GM accepts only the key servers it pins.

A GM-certificate holder (same CA) or a holder of the group's PSK answering a
GM's registration in place of the KS must be refused before anything is
installed: by identity pinning (``ks_identities``) and by the proof of the KS
role in GROUPKEY-PULL message 4 (RFC 6407 CERT + POP_R, or POP_R by the pinned
rekey key). The protocol logic runs on the sans-I/O machines and engines here;
test_gm_ks_pinning_engines.py runs the attack through the engines and
test_gm_ks_pinning_daemons.py with real daemons.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gdoid.protocol import crypto
from gdoid.protocol.attributes import find
from gdoid.protocol.constants import NotifyType, PayloadType
from gdoid.protocol.events import PullFailed, Registered
from gdoid.protocol.gdoi_payloads import GapPayload
from gdoid.protocol.pull import (
    GAP_POP_REQUEST,
    PopMethod,
    PopSigner,
)
from tests.pinsim import (
    Run,
    SilentKs,
    cert_of,
    cert_pinning,
    ks_signer,
    new_rekey_key,
    pull,
    rekey_pinning,
)
from tests.pki import generate_test_pki
from tests.pullsim import prf_a

# --- sans-I/O: PullInitiator / PullResponder ---------------------------------------


def refused(run: Run, notify: NotifyType) -> PullFailed:
    assert not any(isinstance(e, Registered) for e in run.gm_events), "keys were accepted"
    [failed] = [e for e in run.gm_events if isinstance(e, PullFailed)]
    assert failed.notify == notify, failed
    assert run.notifies, "the KS is told why"
    return failed


def test_certificate_pop_from_the_pinned_ks_is_accepted_and_covered_by_hash4(
    pki: dict[str, Path],
) -> None:
    rekey = new_rekey_key()
    run = pull(
        cert_pinning(pki, "CN=ks"),
        ks_signer(pki, "ks", rekey),
        kek_public_der=crypto.public_key_der(rekey),
    )
    [reg] = [e for e in run.gm_events if isinstance(e, Registered)]
    assert "CN=ks" in reg.ks_proof and "POP_R" in reg.ks_proof
    # Message 3 asks for the proof with the private-use GAP attribute.
    gap = GapPayload.decode_body(next(r for t, r in run.plain[2] if t == PayloadType.GAP)[4:])
    pop_attr = find(gap.attributes, GAP_POP_REQUEST)
    assert pop_attr is not None and pop_attr.int_value == PopMethod.CERTIFICATE
    # Message 4: HASH(4), SEQ, KD, CERT, POP_R (a SIG payload), as RFC 6407 §3.2 orders them.
    m4 = run.plain[3]
    assert [t for t, _ in m4] == [
        PayloadType.HASH,
        PayloadType.SEQ,
        PayloadType.KD,
        PayloadType.CERT,
        PayloadType.SIG,
    ]
    cert_body = next(r for t, r in m4 if t == PayloadType.CERT)[4:]
    assert cert_body[1:] == cert_of(pki, "ks").public_bytes(serialization.Encoding.DER)
    # HASH(4) covers CERT and POP_R: recompute it over every payload after HASH.
    sa = run.chain.sa
    want = prf_a(
        sa,
        run.chain.mid.to_bytes(4, "big")
        + run.chain.ni_b
        + run.gm.nr_b
        + b"".join(r for _, r in m4[1:]),
    )
    assert m4[0][1][4:] == want
    # POP_R is the phase-1 style RSA signature over hash(Ni_b | Nr_b) by the KS certificate's key.
    sig = next(r for t, r in m4 if t == PayloadType.SIG)[4:]
    digest = crypto.hash_digest(sa.hash, run.chain.ni_b + run.gm.nr_b)
    assert crypto.ike_rsa_verify(cert_of(pki, "ks").public_key(), digest, sig)


def test_gm_certificate_holder_posing_as_ks_fails_identity_pinning(pki: dict[str, Path]) -> None:
    """gm9 holds a valid certificate from the group's CA and proves possession of it:
    it is still not a KS identity the GM pins."""
    rekey = new_rekey_key()
    run = pull(
        cert_pinning(pki, "CN=ks", "dns:ks.example.com"),
        ks_signer(pki, "gm9", rekey),
        kek_public_der=crypto.public_key_der(rekey),
    )
    failed = refused(run, NotifyType.INVALID_ID_INFORMATION)
    assert "CN=gm9" in failed.reason and "ks_identities" in failed.reason


def test_stolen_ks_certificate_without_its_key_fails_pop(pki: dict[str, Path]) -> None:
    """The KS certificate is public: sending it is no proof. POP_R signed with another
    key (gm9's) does not verify with the certificate's public key."""
    rekey = new_rekey_key()
    run = pull(
        cert_pinning(pki, "CN=ks"),
        ks_signer(pki, "ks", rekey, key_of="gm9"),
        kek_public_der=crypto.public_key_der(rekey),
    )
    failed = refused(run, NotifyType.INVALID_SIGNATURE)
    assert "POP_R" in failed.reason


def test_ks_without_pop_is_refused_when_pop_is_required(pki: dict[str, Path]) -> None:
    rekey = new_rekey_key()
    run = pull(
        cert_pinning(pki, "CN=ks"),
        ks_signer(pki, "ks", rekey),
        kek_public_der=crypto.public_key_der(rekey),
        responder=SilentKs,
    )
    failed = refused(run, NotifyType.AUTHENTICATION_FAILED)
    assert "did not prove its role" in failed.reason


def test_certificate_from_another_ca_is_refused(pki: dict[str, Path], tmp_path: Path) -> None:
    other = generate_test_pki(tmp_path / "other", ["ks"])  # same subject, foreign CA
    rekey = new_rekey_key()
    run = pull(
        cert_pinning(pki, "CN=ks"),
        ks_signer(other, "ks", rekey),
        kek_public_der=crypto.public_key_der(rekey),
    )
    refused(run, NotifyType.INVALID_CERTIFICATE)


def test_rekey_key_pop_accepts_the_pinned_rekey_key(pki: dict[str, Path]) -> None:
    real = new_rekey_key()
    run = pull(
        rekey_pinning(real),
        PopSigner(None, None, real, crypto.SigHash.SHA256),
        kek_public_der=crypto.public_key_der(real),
    )
    [reg] = [e for e in run.gm_events if isinstance(e, Registered)]
    assert "rekey key" in reg.ks_proof
    m4 = run.plain[3]
    assert [t for t, _ in m4] == [
        PayloadType.HASH,
        PayloadType.SEQ,
        PayloadType.KD,
        PayloadType.SIG,
    ]


def test_psk_holder_with_its_own_rekey_key_is_refused() -> None:
    """Anyone holding the group PSK can run a KS; its rekey key is not the pinned one."""
    real, rogue = new_rekey_key(), new_rekey_key()
    run = pull(
        rekey_pinning(real),
        PopSigner(None, None, rogue, crypto.SigHash.SHA256),
        kek_public_der=crypto.public_key_der(rogue),
    )
    failed = refused(run, NotifyType.INVALID_KEY_INFORMATION)
    assert "rekey_key_sha256" in failed.reason


def test_psk_holder_copying_the_public_rekey_key_fails_pop() -> None:
    """The rekey public key reaches every GM; without the private key POP_R fails."""
    real, rogue = new_rekey_key(), new_rekey_key()
    run = pull(
        rekey_pinning(real),
        PopSigner(None, None, rogue, crypto.SigHash.SHA256),
        kek_public_der=crypto.public_key_der(real),
    )
    failed = refused(run, NotifyType.INVALID_SIGNATURE)
    assert "POP_R" in failed.reason
