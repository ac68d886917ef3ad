"""What the proof of the KS role costs: message 4 size and KS signing time (no sockets).

    python benchmarks/ks_pop.py [--rounds 200]

Runs GROUPKEY-PULL in memory (the machines of gdoid.protocol.pull after a PSK
Main Mode) without a POP, with CERT + POP_R (RSA-2048 test certificate) and with
the rekey-key POP_R (P-256 rekey key), and times the KS's two POP signatures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from gdoid.protocol import crypto  # noqa: E402
from gdoid.protocol.events import Registered  # noqa: E402
from gdoid.protocol.pki import load_private_key  # noqa: E402
from gdoid.protocol.pull import PopSigner  # noqa: E402
from tests import pinsim as t  # noqa: E402
from tests.pki import generate_test_pki  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    pki = generate_test_pki(Path(tempfile.mkdtemp()), ["ks"])
    rekey = t.new_rekey_key()
    der = crypto.public_key_der(rekey)

    def m4(pinning: t.KsPinning | None, signer: PopSigner) -> int:
        run = t.pull(pinning, signer, kek_public_der=der)
        assert any(isinstance(e, Registered) for e in run.gm_events)
        return sum(len(raw) for _, raw in run.plain[3])

    cert_signer = t.ks_signer(pki, "ks", rekey)
    print(f"message 4 payload octets, no POP:          {m4(None, cert_signer)}")
    print(
        f"message 4 payload octets, CERT + POP_R:    {m4(t.cert_pinning(pki, 'CN=ks'), cert_signer)}"
    )
    rekey_signer = PopSigner(None, None, rekey, crypto.SigHash.SHA256)
    print(f"message 4 payload octets, rekey-key POP_R: {m4(t.rekey_pinning(rekey), rekey_signer)}")

    key = load_private_key(pki["ks.key"])
    assert isinstance(key, rsa.RSAPrivateKey)  # the test PKI's KS key
    start = time.perf_counter()
    for _ in range(args.rounds):
        crypto.ike_rsa_sign(key, bytes(32))
    rsa_ms = (time.perf_counter() - start) / args.rounds * 1000
    start = time.perf_counter()
    for _ in range(args.rounds):
        crypto.rekey_sign(rekey, crypto.SigHash.SHA256, b"pop_r" + bytes(64))
    ec_ms = (time.perf_counter() - start) / args.rounds * 1000
    print(
        f"KS time per POP_R: RSA-2048 certificate {rsa_ms:.2f} ms, P-256 rekey key {ec_ms:.3f} ms"
    )


if __name__ == "__main__":
    main()
