"""Wire constants of muxtunnel protocol version 1 (protocol-spec.md §2-§4, §10.6, §11)."""

from __future__ import annotations

from enum import IntEnum

from muxtunnel.errors import ErrorCode

__all__ = [
    "ACK_INTERVAL",
    "ALPN",
    "AUTH_CONTEXT",
    "AUTH_NONCE_SIZE",
    "BIND_FLAG_OPTIONS",
    "BIND_NAME_MAX",
    "BIND_OPTION_LIST_MAX",
    "CARRIER_TUNNEL",
    "EXTENSION_MIN",
    "FLAG_ACK",
    "FLAG_FIN",
    "FLAG_JOIN",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CONNECTIONS",
    "MAX_RESUME_WINDOW",
    "MAX_STR16",
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "TICKET_SIZE",
    "AuthMethod",
    "BindOptionKind",
    "ErrorCode",
    "FrameType",
    "OpenFailReason",
    "ResultStatus",
    "Role",
    "SettingId",
    "TunnelProto",
]

#: Connection preface, sent first by each side (§3.1). PNG-style: catches line-ending mangling.
MAGIC = b"MUXT\r\n\x1a\n"
#: TLS ALPN protocol id (§2).
ALPN = "muxtunnel/1"
PROTOCOL_MAJOR = 1
#: Minor version 1 adds BIND options, private tunnels and client-opened streams (§3.2);
#: minor version 2 adds session resumption (§10.6).
PROTOCOL_MINOR = 2
#: Size of the fixed frame header (§4).
HEADER_SIZE = 16
#: Size of each side's nonce in the challenge-response authentication (§7.1).
AUTH_NONCE_SIZE = 32
#: Domain-separation prefix of the HMAC input (§7.1).
AUTH_CONTEXT = b"muxtunnel/1 auth\x00"
#: Longest UTF-8 message carried in a STR16 field (§5.2); longer input is truncated by senders.
MAX_STR16 = 1024

#: DATA flag: this is the last frame of the sender's direction (§6.1).
FLAG_FIN = 0x01
#: PING flag: this frame answers a PING (§6.8).
FLAG_ACK = 0x01
#: RESUME: join the ticket's session as one more connection instead of resuming it (§10.7).
FLAG_JOIN = 0x01
#: BIND flag: an ``options`` field follows ``bind`` (§6.12; minor version 1).
BIND_FLAG_OPTIONS = 0x01
#: Most ALLOW entries, and most DENY entries, in one BIND (§6.12, §12).
BIND_OPTION_LIST_MAX = 64
#: Longest private tunnel name in bytes (§6.12, §12).
BIND_NAME_MAX = 63
#: Size of a session resumption ticket (§10.6).
TICKET_SIZE = 32
#: An endpoint with resumption on sends an ACK of its own whenever its received offset grew by
#: this many bytes since its last ACK; smaller growth rides along with its WINDOW and PING
#: answers (§10.6.2).
ACK_INTERVAL = 1_048_576
#: Largest RESUME_WINDOW setting, in seconds (one week, §5.3).
MAX_RESUME_WINDOW = 604_800
#: Tunnel id of a client's OPEN whose stream carries another connection of its session: the
#: stream's bytes are that connection's byte stream from its MAGIC on (§10.7). Never bound.
CARRIER_TUNNEL = 0xFFFF_FFFF
#: Largest MAX_CONNECTIONS setting: connections of one session, the first included (§10.7).
MAX_CONNECTIONS = 16


class Role(IntEnum):
    """Which end of the session we are (§3.2)."""

    #: The tunnel client; opens odd stream ids.
    CLIENT = 1
    #: The relay; opens even stream ids.
    SERVER = 2


class FrameType(IntEnum):
    """Frame type codes (§6). 0x80-0xFF are ignorable extensions."""

    #: Stream payload, FIN flag ends the direction.
    DATA = 0x00
    #: Absolute flow-control limit for a stream (or the connection on stream 0).
    WINDOW = 0x01
    #: Opens a stream for a tunnel, with visitor and target addresses.
    OPEN = 0x02
    #: The acceptor took the stream.
    OPEN_ACK = 0x03
    #: The acceptor refused the stream; no byte reached a target.
    OPEN_FAIL = 0x04
    #: Aborts a stream with a code and the sender's final offset.
    RESET = 0x05
    #: Resumption: the sender received the peer's session stream up to an offset (minor 2).
    ACK = 0x06
    #: First frame of each side: version, role, settings.
    HELLO = 0x08
    #: Liveness and RTT probe; ACK flag answers.
    PING = 0x09
    #: No new streams; drain.
    GOAWAY = 0x0A
    #: Immediate end of the session with a code.
    CLOSE = 0x0B
    #: Client's challenge response.
    AUTH = 0x10
    #: Client asks for a public listener.
    BIND = 0x11
    #: Client gives a listener up; server revokes one (req_id 0).
    UNBIND = 0x12
    #: Server's answer to AUTH, BIND and UNBIND.
    RESULT = 0x13
    #: Server's authentication nonce.
    CHALLENGE = 0x14
    #: Resumption: the relay's ticket for resuming this session (minor 2).
    TICKET = 0x15
    #: Resumption: the client asks to continue a lost session, before its AUTH (minor 2).
    RESUME = 0x16
    #: Resumption: the relay continues the session; the resume boundary (minor 2).
    RESUMED = 0x17


#: Lowest type code in the ignorable extension range (§6.16).
EXTENSION_MIN = 0x80


class SettingId(IntEnum):
    """HELLO settings: each declares a receive limit of the HELLO's sender (§5.3)."""

    INITIAL_STREAM_WINDOW = 0x1
    INITIAL_CONN_WINDOW = 0x2
    MAX_FRAME_PAYLOAD = 0x3
    MAX_CONCURRENT_STREAMS = 0x4
    MAX_PENDING_OPENS = 0x5
    IDLE_TIMEOUT_MS = 0x6
    MAX_CONTROL_PAYLOAD = 0x7
    #: Seconds the sender keeps a lost session for resumption; 0 = never (minor 2, §10.6).
    RESUME_WINDOW = 0x8
    #: Relay: connections one session may have, the first included; 0 or 1 = no JOIN (§10.7).
    MAX_CONNECTIONS = 0x9


class OpenFailReason(IntEnum):
    """Why an acceptor refused a stream (§11.2)."""

    ADMINISTRATIVELY_PROHIBITED = 1
    CONNECT_FAILED = 2
    UNKNOWN_TUNNEL = 3
    RESOURCE_SHORTAGE = 4
    CONNECT_TIMEOUT = 5
    UNREACHABLE = 6
    NAME_RESOLUTION_FAILED = 7
    REFUSED = 8


class ResultStatus(IntEnum):
    """Status of a RESULT frame (§11.3)."""

    OK = 0
    MALFORMED = 1
    AUTH_REQUIRED = 2
    AUTH_FAILED = 3
    UNSUPPORTED_METHOD = 4
    DENIED = 5
    ADDRESS_IN_USE = 6
    UNSUPPORTED_PROTO = 7
    LIMIT_REACHED = 8
    DUPLICATE_TUNNEL = 9
    UNKNOWN_TUNNEL = 10
    INTERNAL = 11
    OUT_OF_RANGE = 12
    #: RESUME: the ticket is unknown, expired, revoked, superseded or another token's (§10.6).
    TICKET_UNKNOWN = 13
    #: RESUME: the ticket is good but the offsets do not fit; the old session has ended.
    RESUME_FAILED = 14


class AuthMethod(IntEnum):
    """AUTH methods (§7.1)."""

    #: credential = client_nonce(32) || HMAC-SHA256(token, AUTH_CONTEXT || server_nonce || client_nonce)
    HMAC_SHA256 = 1
    #: Like 1, but the relay needs only the token's stored key (§7.1; minor version 1):
    #: credential = client_nonce(32) || client_key XOR HMAC-SHA256(stored_key, AUTH2_CONTEXT || ...)
    HMAC_SHA256_STORED_KEY = 2


class BindOptionKind(IntEnum):
    """Kinds of the BIND option entries (§6.12, §11.4)."""

    #: Visitors the relay admits: ``prefix_len u8`` + IPv4 (4) or IPv6 (16) address.
    ALLOW = 1
    #: Visitors the relay refuses; same value layout as ALLOW.
    DENY = 2
    #: Publish the tunnel privately under this name (no public listener).
    NAME = 3
    #: The tunnel is a visit tunnel: client-opened streams go to the private tunnel of this name.
    VISIT = 4


class TunnelProto(IntEnum):
    """BIND protocols (§7.2)."""

    TCP = 1
