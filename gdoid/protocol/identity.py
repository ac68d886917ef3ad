"""Certificate identity patterns: which certificates a GM accepts as its key server.

As IOS pins a KS with an ISAKMP profile's ``match identity``, a GM group lists
patterns (docs/config.md, ``ks_identities``); a certificate is accepted when it
matches any one of them:

- ``CN=ks*.example.com``, ``O=Example, CN=ks1`` (or with a ``dn:`` prefix): every
  ``ATTR=glob`` component must match an attribute of that name in the subject
  (attribute names case-insensitive: CN, O, OU, C, L, ST, DC, emailAddress, ...;
  values compared case-insensitively with ``*``/``?`` wildcards);
- ``dns:ks1.example.com`` / ``dns:*.ks.example.com``: a subjectAltName dNSName;
- ``email:ks@example.com``: a subjectAltName rfc822Name;
- ``ip:192.0.2.1``: a subjectAltName iPAddress, exactly.

Pure: no files, no clocks.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import NameOID

MAX_PATTERN_LEN = 512


class IdentityKind(StrEnum):
    DN = "dn"
    DNS = "dns"
    EMAIL = "email"
    IP = "ip"


# RFC 4514 short names, plus the ones operators commonly write.
_ATTRIBUTE_NAMES: dict[str, x509.ObjectIdentifier] = {
    "cn": NameOID.COMMON_NAME,
    "o": NameOID.ORGANIZATION_NAME,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "c": NameOID.COUNTRY_NAME,
    "l": NameOID.LOCALITY_NAME,
    "st": NameOID.STATE_OR_PROVINCE_NAME,
    "street": NameOID.STREET_ADDRESS,
    "dc": NameOID.DOMAIN_COMPONENT,
    "uid": NameOID.USER_ID,
    "serialnumber": NameOID.SERIAL_NUMBER,
    "emailaddress": NameOID.EMAIL_ADDRESS,
    "e": NameOID.EMAIL_ADDRESS,
}


def _split_dn(text: str) -> list[str]:
    """Split on commas not escaped with a backslash (RFC 4514 style)."""
    parts, cur, escaped = [], [], False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _glob(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value.lower(), pattern.lower())


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


@dataclass(frozen=True)
class IdentityPattern:
    """One ``ks_identities`` entry, parsed."""

    kind: IdentityKind
    text: str  # as configured, for messages
    dn: tuple[tuple[x509.ObjectIdentifier, str], ...] = ()
    value: str = ""  # DNS/EMAIL glob, or IP address text

    @classmethod
    def parse(cls, text: str) -> IdentityPattern:
        """Parse one pattern; ValueError says what is wrong with it."""
        t = text.strip()
        if not t:
            raise ValueError("empty identity pattern")
        if len(t) > MAX_PATTERN_LEN:
            raise ValueError(f"identity pattern longer than {MAX_PATTERN_LEN} characters")
        prefix, sep, rest = t.partition(":")
        kind = prefix.lower() if sep and prefix.lower() in {k.value for k in IdentityKind} else ""
        if kind == IdentityKind.DNS or kind == IdentityKind.EMAIL:
            if not rest.strip():
                raise ValueError(f"{kind}: needs a name")
            return cls(IdentityKind(kind), t, value=rest.strip())
        if kind == IdentityKind.IP:
            try:
                addr = ipaddress.ip_address(rest.strip())
            except ValueError:
                raise ValueError(f"ip: {rest.strip()!r} is not an IP address") from None
            return cls(IdentityKind.IP, t, value=str(addr))
        body = rest if kind == IdentityKind.DN else t
        components: list[tuple[x509.ObjectIdentifier, str]] = []
        for part in _split_dn(body):
            name, eq, value = part.partition("=")
            oid = _ATTRIBUTE_NAMES.get(name.strip().lower())
            if not eq or oid is None:
                raise ValueError(
                    f"{part.strip()!r} is not ATTR=value with ATTR one of CN, O, OU, C, L, ST, "
                    "STREET, DC, UID, serialNumber, emailAddress (or use dns:, email:, ip:)"
                )
            if not value.strip():
                raise ValueError(f"{name.strip()}= needs a value")
            components.append((oid, value.strip()))
        return cls(IdentityKind.DN, t, dn=tuple(components))

    def matches(self, cert: x509.Certificate) -> bool:
        if self.kind == IdentityKind.DN:
            return all(
                any(_glob(want, _text(a.value)) for a in cert.subject.get_attributes_for_oid(oid))
                for oid, want in self.dn
            )
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, ValueError):
            return False
        if self.kind == IdentityKind.DNS:
            return any(_glob(self.value, n) for n in san.get_values_for_type(x509.DNSName))
        if self.kind == IdentityKind.EMAIL:
            return any(_glob(self.value, n) for n in san.get_values_for_type(x509.RFC822Name))
        want = ipaddress.ip_address(self.value)
        return any(a == want for a in san.get_values_for_type(x509.IPAddress))


def matching_pattern(
    patterns: tuple[IdentityPattern, ...], cert: x509.Certificate
) -> IdentityPattern | None:
    """The first pattern the certificate matches, or None."""
    return next((p for p in patterns if p.matches(cert)), None)


def describe_certificate(cert: x509.Certificate, limit: int = 200) -> str:
    """Subject and subjectAltNames for a log line, bounded in length."""
    text = cert.subject.rfc4514_string()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [f"dns:{n}" for n in san.get_values_for_type(x509.DNSName)]
        names += [f"email:{n}" for n in san.get_values_for_type(x509.RFC822Name)]
        names += [f"ip:{n}" for n in san.get_values_for_type(x509.IPAddress)]
        if names:
            text += " [" + ", ".join(names) + "]"
    except (x509.ExtensionNotFound, ValueError):
        pass
    return text if len(text) <= limit else text[: limit - 3] + "..."
