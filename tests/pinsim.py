"""GROUPKEY-PULL with the KS's proof of its role (POP_R) and GM-side KS pinning, in memory.

Used by tests/security/test_gm_ks_pinning.py and benchmarks/ks_pop.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from gdoid.protocol import crypto
from gdoid.protocol.constants import ExchangeType
from gdoid.protocol.header import IsakmpHeader
from gdoid.protocol.identity import IdentityPattern
from gdoid.protocol.ike_sa import IkeSa
from gdoid.protocol.pki import (
    CertificateValidator,
    PrivateKey,
    load_certificates,
    load_private_key,
)
from gdoid.protocol.policy import GroupKeys, SenderIds
from gdoid.protocol.pull import (
    KsPinning,
    PopMethod,
    PopSigner,
    PullInitiator,
    PullResponder,
)
from tests.pullsim import GROUP, Chain, make_kek, make_tek, phase1


def cert_of(pki: dict[str, Path], name: str) -> Any:
    return load_certificates(pki[f"{name}.pem"])[0]


def new_rekey_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class PopDirectory:
    """A KS's group directory with the keys it proves its role with."""

    keys: GroupKeys
    signer: PopSigner
    allocated: list[str] = field(default_factory=list)

    def snapshot(self, group_number: int, now: float) -> GroupKeys | None:
        return self.keys if group_number == GROUP else None

    def allocate_sender_ids(self, group_number: int, count: int, member: str) -> SenderIds | None:
        self.allocated.append(member)
        return SenderIds(8, tuple(range(1, count + 1)))

    def authorize(self, group_number: int, sa: IkeSa) -> str | None:
        return None

    def pop_signer(self, group_number: int) -> PopSigner:
        return self.signer


class SilentKs(PullResponder):
    """A KS that ignores the POP request (an older gdoid, or a rogue without the key)."""

    def _proof(self, method: int) -> list:  # type: ignore[override]
        return []


@dataclass
class Run:
    gm_events: list[object]
    ks_events: list[object]
    plain: list[list[tuple[int, bytes]]]  # every PULL message, decrypted by the test
    notifies: list[bytes]
    chain: Chain
    gm: PullInitiator


def pull(
    pinning: KsPinning | None,
    signer: PopSigner,
    *,
    kek_public_der: bytes,
    responder: type[PullResponder] = PullResponder,
) -> Run:
    now = float(int(time.time()))  # the test certificates are valid around the real time
    kek = dataclasses.replace(make_kek(now), public_key_der=kek_public_der)
    keys = GroupKeys(GROUP, kek, (make_tek("esp-gcm-256", now),), 7)
    p1 = phase1()
    gm = PullInitiator(p1.gm, GROUP, pinning=pinning)
    chain = Chain(p1, gm.message_id)
    [m] = gm.start(now).send
    ks = responder(p1.ks, PopDirectory(keys, signer), IsakmpHeader.decode(m).message_id, now)
    run = Run([], [], [], [], chain, gm)
    to_ks = True
    while m is not None:
        run.plain.append(chain.open(m).payloads)
        out = ks.receive(m, now) if to_ks else gm.receive(m, now)
        (run.ks_events if to_ks else run.gm_events).extend(out.events)
        to_ks = not to_ks
        pulls = [
            d
            for d in out.send
            if IsakmpHeader.decode(d).exchange_type == ExchangeType.GROUPKEY_PULL
        ]
        run.notifies += [d for d in out.send if d not in pulls]
        m = pulls[0] if pulls and not run.notifies else None
    return run


def ks_signer(
    pki: dict[str, Path], name: str, rekey: PrivateKey, key_of: str | None = None
) -> PopSigner:
    return PopSigner(
        cert_of(pki, name),
        load_private_key(pki[f"{key_of or name}.key"]),
        rekey,
        crypto.SigHash.SHA256,
    )


def cert_pinning(pki: dict[str, Path], *patterns: str) -> KsPinning:
    validator = CertificateValidator(load_certificates(pki["ca.pem"]))
    return KsPinning(
        PopMethod.CERTIFICATE, tuple(IdentityPattern.parse(p) for p in patterns), validator
    )


def rekey_pinning(key: PrivateKey) -> KsPinning:
    return KsPinning(
        PopMethod.REKEY_KEY, rekey_key_sha256=hashlib.sha256(crypto.public_key_der(key)).digest()
    )
