"""Protocol numbers, named as RFC 2408/2409/2407/6407 name them.

Values marked *private* are this project's own extensions (wire.md §6,
docs/wire.md); every one of them lives in a private-use range so a peer that
does not know it can ignore it.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

GDOI_PORT = 848  # GDOI's registered UDP port (RFC 6407 §5)
ISAKMP_VERSION = 0x10  # major 1, minor 0


class ExchangeType(IntEnum):
    BASE = 1
    IDENTITY_PROTECTION = 2  # IKEv1 Main Mode
    AUTHENTICATION_ONLY = 3
    AGGRESSIVE = 4
    INFORMATIONAL = 5
    GROUPKEY_PULL = 32
    GROUPKEY_PUSH = 33
    COOP_ANN = 240  # private: KS-to-KS announcement (wire.md §6.3)


MAIN_MODE = ExchangeType.IDENTITY_PROTECTION


class HeaderFlag(IntFlag):
    NONE = 0
    ENCRYPTION = 0x01
    COMMIT = 0x02
    AUTHENTICATION_ONLY = 0x04


class PayloadType(IntEnum):
    NONE = 0
    SA = 1
    PROPOSAL = 2
    TRANSFORM = 3
    KE = 4
    ID = 5
    CERT = 6
    CR = 7
    HASH = 8
    SIG = 9
    NONCE = 10
    NOTIFY = 11
    DELETE = 12
    VID = 13
    SAK = 15  # RFC 6407 SA KEK
    SAT = 16  # RFC 6407 SA TEK
    KD = 17  # RFC 6407 Key Download
    SEQ = 18  # RFC 6407 Sequence Number
    GAP = 22  # RFC 6407 Group Associated Policy
    ANN = 128  # private: COOP announcement body


class Doi(IntEnum):
    ISAKMP = 0
    IPSEC = 1
    GDOI = 2


SIT_IDENTITY_ONLY = 1  # IPsec DOI situation used in phase 1


class NotifyType(IntEnum):
    INVALID_PAYLOAD_TYPE = 1
    DOI_NOT_SUPPORTED = 2
    SITUATION_NOT_SUPPORTED = 3
    INVALID_COOKIE = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_MINOR_VERSION = 6
    INVALID_EXCHANGE_TYPE = 7
    INVALID_FLAGS = 8
    INVALID_MESSAGE_ID = 9
    INVALID_PROTOCOL_ID = 10
    INVALID_SPI = 11
    INVALID_TRANSFORM_ID = 12
    ATTRIBUTES_NOT_SUPPORTED = 13
    NO_PROPOSAL_CHOSEN = 14
    BAD_PROPOSAL_SYNTAX = 15
    PAYLOAD_MALFORMED = 16
    INVALID_KEY_INFORMATION = 17
    INVALID_ID_INFORMATION = 18
    INVALID_CERT_ENCODING = 19
    INVALID_CERTIFICATE = 20
    CERT_TYPE_UNSUPPORTED = 21
    INVALID_CERT_AUTHORITY = 22
    INVALID_HASH_INFORMATION = 23
    AUTHENTICATION_FAILED = 24
    INVALID_SIGNATURE = 25
    ADDRESS_NOTIFICATION = 26
    NOTIFY_SA_LIFETIME = 27
    CERTIFICATE_UNAVAILABLE = 28
    UNSUPPORTED_EXCHANGE_TYPE = 29
    UNEQUAL_PAYLOAD_LENGTHS = 30
    GM_REMOVAL = 36864  # private status type (wire.md §6.2)
    POLICY_REPLACE = 36865  # private status type (wire.md §6.2)


class ProtocolId(IntEnum):
    """Proposal protocol IDs (RFC 2407 §4.4.1)."""

    PROTO_ISAKMP = 1
    PROTO_IPSEC_AH = 2
    PROTO_IPSEC_ESP = 3


KEY_IKE = 1  # the only phase-1 transform ID (RFC 2407 §4.4.2)


class Phase1Attribute(IntEnum):
    """IKEv1 phase-1 transform attribute classes (RFC 2409 appendix A)."""

    ENCRYPTION_ALGORITHM = 1
    HASH_ALGORITHM = 2
    AUTHENTICATION_METHOD = 3
    GROUP_DESCRIPTION = 4
    GROUP_TYPE = 5
    LIFE_TYPE = 11
    LIFE_DURATION = 12
    KEY_LENGTH = 14


class EncryptionAlgorithm(IntEnum):
    DES_CBC = 1
    DES3_CBC = 5
    AES_CBC = 7


class AuthenticationMethod(IntEnum):
    PRE_SHARED_KEY = 1
    DSS_SIG = 2
    RSA_SIG = 3


class LifeType(IntEnum):
    SECONDS = 1
    KILOBYTES = 2


class IdType(IntEnum):
    ID_IPV4_ADDR = 1
    ID_FQDN = 2
    ID_USER_FQDN = 3
    ID_IPV4_ADDR_SUBNET = 4
    ID_IPV6_ADDR = 5
    ID_IPV6_ADDR_SUBNET = 6
    ID_IPV4_ADDR_RANGE = 7
    ID_IPV6_ADDR_RANGE = 8
    ID_DER_ASN1_DN = 9
    ID_DER_ASN1_GN = 10
    ID_KEY_ID = 11


class CertEncoding(IntEnum):
    X509_CERT_SIGNATURE = 4


class GdoiProtocol(IntEnum):
    """Protocol IDs in SAT payloads and push DELETEs (RFC 6407 §5.4 / wire.md §4)."""

    GDOI_PROTO_KEK = 0  # wire.md §4: DELETE of a KEK uses 0
    GDOI_PROTO_IPSEC_ESP = 1
    GDOI_PROTO_IPSEC_AH = 2  # RFC 6407 §5.4; same SAT layout as ESP, not implemented


class KekAttribute(IntEnum):
    """SAK attributes (RFC 6407 §5.3.1)."""

    KEK_MANAGEMENT_ALGORITHM = 1
    KEK_ALGORITHM = 2
    KEK_KEY_LENGTH = 3
    KEK_KEY_LIFETIME = 4
    SIG_HASH_ALGORITHM = 5
    SIG_ALGORITHM = 6
    SIG_KEY_LENGTH = 7


class KekAlgorithm(IntEnum):
    KEK_ALG_DES = 1
    KEK_ALG_3DES = 2
    KEK_ALG_AES = 3


class IpsecAttribute(IntEnum):
    """IPsec DOI SA attributes carried in SATs (RFC 2407 §4.5, RFC 6407 §5.4.1)."""

    SA_LIFE_TYPE = 1
    SA_LIFE_DURATION = 2
    GROUP_DESCRIPTION = 3
    ENCAPSULATION_MODE = 4
    AUTHENTICATION_ALGORITHM = 5
    KEY_LENGTH = 6
    ADDRESS_PRESERVATION = 14
    SA_DIRECTION = 15
    TBAR_WINDOW = 32001  # private: time-based anti-replay window, ms (wire.md §6.4)
    REPLAY_WINDOW = 32002  # private: classic sequence window size, packets
    RECEIVE_ONLY = 32003  # private: GM decrypts but sends in the clear
    CONFIGURED_LIFETIME = 32004  # private: TEK_CLT, so GMs can compute TEK_SLT


class EncapsulationMode(IntEnum):
    TUNNEL = 1
    TRANSPORT = 2


class AuthenticationAlgorithm(IntEnum):
    HMAC_SHA2_256 = 5


class AddressPreservation(IntEnum):
    NONE = 1
    SOURCE_ONLY = 2
    DESTINATION_ONLY = 3
    SOURCE_AND_DESTINATION = 4


class SaDirection(IntEnum):
    SENDER_ONLY = 1
    RECEIVER_ONLY = 2
    SYMMETRIC = 3


class EspTransformId(IntEnum):
    ESP_AES_CBC = 12  # RFC 2407 "ESP_AES"
    ESP_AES_GCM_16 = 20


class KeyPacketType(IntEnum):
    """KD key packet types (RFC 6407 §5.5)."""

    TEK = 1
    KEK = 2
    LKH = 3
    SID = 4


class TekKeyAttribute(IntEnum):
    TEK_ALGORITHM_KEY = 1
    TEK_INTEGRITY_KEY = 2
    TEK_SOURCE_AUTH_KEY = 3


class KekKeyAttribute(IntEnum):
    KEK_ALGORITHM_KEY = 1
    SIG_ALGORITHM_KEY = 2
    GROUP_PSEUDOTIME = 32001  # private: KS pseudotime in ms, 8 octets (wire.md §6.4)


class SidAttribute(IntEnum):
    NUMBER_OF_SID_BITS = 1
    SID_VALUE = 2


class GapAttribute(IntEnum):
    ACTIVATION_TIME_DELAY = 1
    DEACTIVATION_TIME_DELAY = 2
    SENDER_ID_REQUEST = 3
