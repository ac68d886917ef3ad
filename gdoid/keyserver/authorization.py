"""Per-group GM authorization: IOS ``authorization address ipv4`` / ``authorization identity``.

Pure: the KS engine asks :func:`check` during GROUPKEY-PULL message 1, after phase 1
authenticated the peer.  Where an identity comes from:

* a peer authenticated with a certificate (validated against the CA in phase 1) is
  known by that certificate only: ``dn:`` matches its subject, ``fqdn:`` its
  subjectAltName dNSNames.  Its ID payload adds nothing (a holder of any valid
  certificate could put any name there), so ``key-id:`` never matches it;
* a peer authenticated with a pre-shared key is known by the ID payload it sent
  under that key: ``fqdn:`` matches ID_FQDN, ``key-id:`` ID_KEY_ID.  ``dn:`` never
  matches it (nothing checks a DN claimed under a PSK).  With a group-wide PSK any
  holder can claim any such name: use per-peer keys, certificates or addresses.

The address is the datagram source the phase-1 SA was built with, never an ID claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from gdoid.config.model import AuthorizedIdentity, GroupAuthorization
from gdoid.protocol.constants import IdType
from gdoid.protocol.ike_sa import IkeSa

MAX_LOGGED = 128  # characters of a peer-chosen identity that reach a log line
MAX_MATCHED = 1024  # longer names never match a pattern (and cost nothing to refuse)

_OIDS: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "STREET": NameOID.STREET_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "E": NameOID.EMAIL_ADDRESS,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "T": NameOID.TITLE,
    "TITLE": NameOID.TITLE,
    "GN": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME,
}


@dataclass(frozen=True)
class Refusal:
    """Why a GM may not join: which check failed, and for what (bounded, printable)."""

    kind: Literal["address", "identity"]
    group: str
    value: str

    @property
    def reason(self) -> str:
        return f"unauthorized {'ip address' if self.kind == 'address' else 'identity'} {self.value}"


def printable(text: str, limit: int = MAX_LOGGED) -> str:
    """``text`` made safe for one log line: control characters escaped, length bounded."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def wildcard_match(pattern: str, text: str) -> bool:
    """Case-insensitive match where ``*`` is any run of characters.

    Two pointers, back to the last ``*`` only: O(len(pattern) * len(text)) at worst,
    unlike a regex of several ``.*``, which a peer-chosen name could make explode.
    """
    if len(text) > MAX_MATCHED:
        return False  # no real DN value or host name is this long
    p, t = pattern.casefold(), text.casefold()
    i = j = 0
    star, mark = -1, 0
    while j < len(t):
        if i < len(p) and p[i] == "*":
            star, mark = i, j
            i += 1
        elif i < len(p) and p[i] == t[j]:
            i += 1
            j += 1
        elif star >= 0:
            i, mark = star + 1, mark + 1
            j = mark
        else:
            return False
    return all(c == "*" for c in p[i:])


def _str(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.rstrip(".") for n in san.get_values_for_type(x509.DNSName)]


def _psk_id(sa: IkeSa, id_type: IdType) -> str | None:
    if sa.peer_certificate is not None or sa.peer_id.id_type != id_type:
        return None
    try:
        return sa.peer_id.data.decode("ascii")
    except UnicodeDecodeError:
        return None


def matches(pattern: AuthorizedIdentity, sa: IkeSa) -> bool:
    cert = sa.peer_certificate
    if pattern.kind == "dn":
        if cert is None:
            return False
        for attr, value in pattern.dn:
            values = [_str(a.value) for a in cert.subject.get_attributes_for_oid(_OIDS[attr])]
            if not any(wildcard_match(value, v) for v in values):
                return False
        return True
    if pattern.kind == "fqdn":
        names = (
            _dns_names(cert)
            if cert is not None
            else [n for n in [_psk_id(sa, IdType.ID_FQDN)] if n]
        )
        return any(wildcard_match(pattern.value, n.rstrip(".")) for n in names)
    if pattern.kind == "key-id":
        return _psk_id(sa, IdType.ID_KEY_ID) == pattern.value
    return False


def peer_identity(sa: IkeSa) -> str:
    """The identity a refusal names: certificate subject, else the ID payload's value."""
    if sa.peer_certificate is not None:
        return printable(sa.peer_certificate.subject.rfc4514_string())
    for id_type, label in ((IdType.ID_FQDN, "fqdn"), (IdType.ID_KEY_ID, "key-id")):
        value = _psk_id(sa, id_type)
        if value is not None:
            return printable(f"{label}:{value}")
    return printable(sa.peer_identity())


def check(auth: GroupAuthorization, group: str, sa: IkeSa) -> Refusal | None:
    """None if the peer may join ``group``; else what failed (address first, as IOS)."""
    if auth.addresses and not any(sa.peer_address in net for net in auth.addresses):
        return Refusal("address", group, str(sa.peer_address))
    if auth.identities and not any(matches(p, sa) for p in auth.identities):
        return Refusal("identity", group, peer_identity(sa))
    return None


def describe(auth: GroupAuthorization) -> list[str]:
    """The authorization in force, as ``show crypto gdoi`` prints it (one item a line)."""
    if not auth.restricted:
        return ["none (any authenticated peer)"]
    lines = []
    if auth.addresses:
        lines.append("address " + ", ".join(str(n) for n in auth.addresses))
    if auth.identities:
        lines.append("identity " + ", ".join(str(p) for p in auth.identities))
    return lines


class LogTokenBucket:
    """A token bucket for log lines a peer can trigger: ``burst`` at once, then ``rate``/s.

    :meth:`allow` returns ``(emit, suppressed)``: whether to log this one, and how many
    were dropped since the last line that was logged (for a summary line).
    """

    def __init__(self, rate: float = 1.0, burst: int = 10) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last: float | None = None
        self.suppressed = 0

    def allow(self, now: float) -> tuple[bool, int]:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return False, 0
        self.tokens -= 1.0
        dropped, self.suppressed = self.suppressed, 0
        return True, dropped
