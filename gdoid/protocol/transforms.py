"""The TEK transforms and rekey signature hashes gdoid implements, by configuration name.

The one table of each: the configuration validates ``transform`` and ``sig_hash``
against it (gdoid/config), the KS builds TEKs and KEKs from it (keyserver/group.py),
and SATs, the state file and ANN GROUP_KEYS name transforms by it (docs/config.md
lists the same names).  Pure data, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gdoid.protocol.constants import AuthenticationAlgorithm, EspTransformId
from gdoid.protocol.crypto import SigHash


@dataclass(frozen=True)
class TekTransform:
    """An ESP transform a TEK uses: cipher, key size, integrity."""

    transform_id: EspTransformId
    key_bits: int
    integrity: AuthenticationAlgorithm | None

    @property
    def is_gcm(self) -> bool:
        return self.transform_id == EspTransformId.ESP_AES_GCM_16

    @property
    def cipher_key_len(self) -> int:
        """Octets of TEK_ALGORITHM_KEY: the AES key, plus a 4-octet salt for GCM (RFC 4106)."""
        return self.key_bits // 8 + (4 if self.is_gcm else 0)

    @property
    def integrity_key_len(self) -> int:
        return 32 if self.integrity == AuthenticationAlgorithm.HMAC_SHA2_256 else 0

    @property
    def name(self) -> str:
        """The configuration name (``esp-gcm-256``); a made-up one for a transform not in the table."""
        return _TRANSFORM_NAMES.get(self) or f"esp-{int(self.transform_id)}-{self.key_bits}"

    @classmethod
    def from_name(cls, name: str) -> TekTransform:
        try:
            return TEK_TRANSFORMS[name]
        except KeyError:
            raise ValueError(f"unknown transform {name!r}") from None


_HMAC_SHA256 = AuthenticationAlgorithm.HMAC_SHA2_256

# IOS ``crypto ipsec transform-set`` names, in the order docs/config.md and errors list them.
TEK_TRANSFORMS: Mapping[str, TekTransform] = {
    "esp-gcm-128": TekTransform(EspTransformId.ESP_AES_GCM_16, 128, None),
    "esp-gcm-256": TekTransform(EspTransformId.ESP_AES_GCM_16, 256, None),
    "esp-cbc-128-sha256": TekTransform(EspTransformId.ESP_AES_CBC, 128, _HMAC_SHA256),
    "esp-cbc-256-sha256": TekTransform(EspTransformId.ESP_AES_CBC, 256, _HMAC_SHA256),
}
_TRANSFORM_NAMES: Mapping[TekTransform, str] = {t: n for n, t in TEK_TRANSFORMS.items()}

# ``rekey authentication`` hashes (RFC 6407 SIG_HASH_ALGORITHM), by configuration name.
SIG_HASHES: Mapping[str, SigHash] = {
    "sha256": SigHash.SHA256,
    "sha384": SigHash.SHA384,
    "sha512": SigHash.SHA512,
}
