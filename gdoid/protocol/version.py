"""GET VPN software versions and the vendor-ID payload that carries them (wire.md §6.1).

Project-private encoding: VID data = 16-octet tag ‖ major ‖ minor ‖ mini.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

from gdoid.protocol.errors import DecodeError
from gdoid.protocol.payloads import VendorIdPayload

VERSION_VID_TAG = hashlib.sha256(b"GDOI GET VPN software version").digest()[:16]


class SoftwareVersion(NamedTuple):
    major: int
    minor: int
    mini: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.mini}"

    @classmethod
    def parse(cls, text: str) -> SoftwareVersion:
        m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", text)
        if m is None:
            raise ValueError(f"software version {text!r} is not major.minor.mini")
        values = [int(p) for p in m.groups()]
        if any(v > 255 for v in values):
            raise ValueError(f"software version {text!r}: each part must be 0..255")
        return cls(*values)


CURRENT_VERSION = SoftwareVersion(1, 0, 2)
# The first version with GM removal and policy replace (getvpn-features §1).
REMOVAL_AND_REPLACE_VERSION = SoftwareVersion(1, 0, 2)


def supports_removal_and_replace(version: SoftwareVersion | None) -> bool:
    """Unknown versions count as not supporting either feature (wire.md §6.1)."""
    return (
        version is not None
        and version.major == REMOVAL_AND_REPLACE_VERSION.major
        and version >= REMOVAL_AND_REPLACE_VERSION
    )


def version_vid(version: SoftwareVersion) -> VendorIdPayload:
    return VendorIdPayload(VERSION_VID_TAG + bytes(version))


def version_from_vids(vids: list[VendorIdPayload]) -> SoftwareVersion | None:
    """The software version announced in any of ``vids`` (others are ignored)."""
    for vid in vids:
        if vid.data[:16] == VERSION_VID_TAG:
            if len(vid.data) != 19:
                raise DecodeError(
                    "VID", "software_version", f"{len(vid.data) - 16} octets, must be 3"
                )
            return SoftwareVersion(*vid.data[16:19])
    return None


def format_version(version: SoftwareVersion | None) -> str:
    return str(version) if version is not None else "unknown"
