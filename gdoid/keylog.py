"""Wireshark key-log files (wire.md §7), written only when ``--keylog DIR`` is given.

``DIR`` can then be used as ``WIRESHARK_CONFIG_DIR``: ``ikev1_decryption_table``
decrypts Main Mode 5/6 and GROUPKEY-PULL, ``esp_sa`` decrypts the ESP traffic.
"""

from __future__ import annotations

import os
from pathlib import Path

from gdoid.protocol.ike import IkeSa
from gdoid.protocol.policy import Tek

IKE_TABLE = "ikev1_decryption_table"
ESP_TABLE = "esp_sa"
PREFERENCES = "preferences"

_PREFS = """# written by gdoid --keylog
esp.enable_encryption_decode: TRUE
esp.enable_authentication_check: TRUE
"""


def ikev1_line(sa: IkeSa) -> str:
    return f"{sa.initiator_cookie.hex()},{sa.cipher_key.hex()}\n"


def esp_sa_line(tek: Tek) -> str:
    t = tek.policy.transform
    spi = f"0x{tek.spi:08x}"
    if t.is_gcm:
        return (
            f'"IPv4","*","*","{spi}","AES-GCM with 16 octet ICV [RFC4106]",'
            f'"0x{tek.cipher_key.hex()}","NULL",""\n'
        )
    return (
        f'"IPv4","*","*","{spi}","AES-CBC [RFC3602]","0x{tek.cipher_key.hex()}",'
        f'"HMAC-SHA-256-128 [RFC4868]","0x{tek.integrity_key.hex()}"\n'
    )


class KeyLog:
    """Appends key lines; files are created owner-only since they hold keys."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._esp_spis: set[int] = set()
        prefs = directory / PREFERENCES
        if not prefs.exists():
            self._append(PREFERENCES, _PREFS)

    def _append(self, name: str, line: str) -> None:
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def ike(self, sa: IkeSa) -> None:
        self._append(IKE_TABLE, ikev1_line(sa))

    def esp(self, tek: Tek) -> None:
        if tek.spi in self._esp_spis:
            return
        self._esp_spis.add(tek.spi)
        self._append(ESP_TABLE, esp_sa_line(tek))
