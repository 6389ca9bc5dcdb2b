"""Frame codec: ``Frame`` objects <-> bytes (protocol-spec.md §4-§6).

Pure functions over immutable dataclasses. The 16-byte header is one module-level
:class:`struct.Struct`; payload fields use module-level structs too. Decoding validates
every length and field and raises :class:`~muxtunnel.errors.ProtocolError` subclasses
carrying the wire error code the receiver must send in CLOSE.

DATA is the hot path both ways: :meth:`FrameReader.read_frames
<muxtunnel.protocol.reader.FrameReader.read_frames>` decodes DATA inline (the checks of
:func:`decode_payload`, without the dispatch), and :func:`pack_data_header` builds a DATA
header without an object.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import struct
from dataclasses import dataclass, field

from muxtunnel.errors import FlowControlError, FrameSizeError, ProtocolError

from .constants import (
    AUTH_NONCE_SIZE,
    BIND_FLAG_OPTIONS,
    BIND_NAME_MAX,
    BIND_OPTION_LIST_MAX,
    EXTENSION_MIN,
    FLAG_ACK,
    FLAG_FIN,
    FLAG_JOIN,
    MAX_CONNECTIONS,
    MAX_RESUME_WINDOW,
    MAX_STR16,
    TICKET_SIZE,
    BindOptionKind,
    FrameType,
    SettingId,
)

__all__ = [
    "DATA_HEADER",
    "HEADER",
    "MAX_WINDOW_OFFSET",
    "AckFrame",
    "Address",
    "AuthFrame",
    "BindFrame",
    "BindOptions",
    "ChallengeFrame",
    "CloseFrame",
    "DataFrame",
    "ExtensionFrame",
    "Frame",
    "GoAwayFrame",
    "HelloFrame",
    "IPNetwork",
    "OpenAckFrame",
    "OpenFailFrame",
    "OpenFrame",
    "PingFrame",
    "ResetFrame",
    "ResultFrame",
    "ResumeFrame",
    "ResumedFrame",
    "Settings",
    "TicketFrame",
    "UnbindFrame",
    "WindowFrame",
    "decode_payload",
    "encode_frame",
    "encode_into",
    "is_tunnel_name",
    "pack_data_header",
]

#: length u32, type u8, flags u8, reserved u16, stream id u64 — network byte order (§4).
HEADER = struct.Struct("!IBBHQ")
#: The header of a DATA frame without flags: ``DATA_HEADER.pack(length, stream_id)`` is
#: ``HEADER.pack(length, FrameType.DATA, 0, 0, stream_id)`` (DATA is type 0).
DATA_HEADER = struct.Struct("!I4xQ")
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_WINDOW = _U64
_RESET = struct.Struct("!IQ")
_UNBIND = struct.Struct("!III")
_HELLO_FIXED = struct.Struct("!BBBB")
_SETTING = struct.Struct("!HI")
_GOAWAY_FIXED = struct.Struct("!QI")
_AUTH_FIXED = struct.Struct("!IB")
_BIND_FIXED = struct.Struct("!IIBB")
_RESULT_FIXED = struct.Struct("!IH")
_OPEN_FIXED = _U32
_OPEN_FAIL_FIXED = _U32
_CLOSE_FIXED = _U32
_PORT = _U16
_TICKET_TAIL = _U32
_RESUME_FIXED = _U32
_RESUMED = struct.Struct("!IQ")

#: Largest WINDOW offset a peer may announce (§8.4); above it is FLOW_CONTROL_ERROR.
MAX_WINDOW_OFFSET = 1 << 62

# ADDR type codes (SOCKS5 values, §5.1).
_ATYP_NONE = 0x00
_ATYP_IPV4 = 0x01
_ATYP_DOMAIN = 0x03
_ATYP_IPV6 = 0x04
#: Addresses whose wire form (and text) :func:`_host_field`/:func:`_host_text` remember.
_HOST_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port as carried in ADDR fields (§5.1).

    ``host`` None means "no address" (atyp 0, no port on the wire; port must be 0).
    IP literals encode as IPv4/IPv6; anything else as a domain name.
    """

    host: str | None
    port: int = 0

    def __str__(self) -> str:
        if self.host is None:
            return "-"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


#: (id, minimum, maximum) of each known setting (§5.3).
_SETTING_RANGES: dict[int, tuple[int, int]] = {
    SettingId.INITIAL_STREAM_WINDOW: (16_384, 2**31 - 1),
    SettingId.INITIAL_CONN_WINDOW: (65_536, 2**32 - 1),
    SettingId.MAX_FRAME_PAYLOAD: (16_384, 16_777_215),
    SettingId.MAX_CONCURRENT_STREAMS: (0, 2**32 - 1),
    SettingId.MAX_PENDING_OPENS: (1, 65_535),
    SettingId.IDLE_TIMEOUT_MS: (0, 3_600_000),
    SettingId.MAX_CONTROL_PAYLOAD: (1_024, 65_535),
    SettingId.RESUME_WINDOW: (0, MAX_RESUME_WINDOW),
    SettingId.MAX_CONNECTIONS: (0, MAX_CONNECTIONS),
}
_SETTING_FIELDS: dict[int, str] = {
    SettingId.INITIAL_STREAM_WINDOW: "initial_stream_window",
    SettingId.INITIAL_CONN_WINDOW: "initial_conn_window",
    SettingId.MAX_FRAME_PAYLOAD: "max_frame_payload",
    SettingId.MAX_CONCURRENT_STREAMS: "max_concurrent_streams",
    SettingId.MAX_PENDING_OPENS: "max_pending_opens",
    SettingId.IDLE_TIMEOUT_MS: "idle_timeout_ms",
    SettingId.MAX_CONTROL_PAYLOAD: "max_control_payload",
    SettingId.RESUME_WINDOW: "resume_window",
    SettingId.MAX_CONNECTIONS: "max_connections",
}


#: Settings a HELLO lists only when they are not 0 (§5.3).
_LISTED_IF_SET = frozenset({SettingId.RESUME_WINDOW, SettingId.MAX_CONNECTIONS})


def _check_setting(setting_id: int, value: int) -> None:
    low, high = _SETTING_RANGES[setting_id]
    if not low <= value <= high or (setting_id == SettingId.IDLE_TIMEOUT_MS and 0 < value < 5_000):
        raise ProtocolError(f"setting {SettingId(setting_id).name} = {value} is out of range")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Receive limits that a HELLO's sender declares for the whole session (§5.3)."""

    #: Bytes the peer may send on each new stream before any WINDOW.
    initial_stream_window: int = 262_144
    #: Bytes the peer may send in total before any connection WINDOW.
    initial_conn_window: int = 2_097_152
    #: Largest DATA payload accepted.
    max_frame_payload: int = 65_536
    #: Streams the peer may have open that the peer initiated.
    max_concurrent_streams: int = 16_384
    #: OPENs from the peer not yet answered.
    max_pending_opens: int = 128
    #: Receive-silence limit in milliseconds; 0 disables it.
    idle_timeout_ms: int = 30_000
    #: Largest payload of any non-DATA frame.
    max_control_payload: int = 4_096
    #: Seconds the sender keeps a lost session for resumption; 0 = never (§10.6).
    resume_window: int = 0
    #: Relay: connections a session may have, the first included; 0 or 1 = no JOIN (§10.7).
    max_connections: int = 0

    def __post_init__(self) -> None:
        for setting_id, name in _SETTING_FIELDS.items():
            _check_setting(setting_id, getattr(self, name))

    def to_pairs(self) -> tuple[tuple[int, int], ...]:
        """The settings as ``(id, value)`` pairs in id order, for a HELLO frame.

        RESUME_WINDOW and MAX_CONNECTIONS are listed only when they are not 0 (absent means
        0, §5.3), so a HELLO without them is the same as before minor version 2.
        """
        return tuple(
            (int(sid), value)
            for sid, name in _SETTING_FIELDS.items()
            if (value := getattr(self, name)) or sid not in _LISTED_IF_SET
        )

    @classmethod
    def from_pairs(
        cls, pairs: tuple[tuple[int, int], ...], defaults: Settings | None = None
    ) -> Settings:
        """Build settings from HELLO pairs; unknown ids are ignored, missing ones default.

        ``defaults`` gives the values of settings the peer left out (the defaults of the
        peer's role, §5.3); without it the client defaults apply.

        Raises:
            ProtocolError: a setting is listed twice or its value is out of range.
        """
        seen: set[int] = set()
        values: dict[str, int] = {}
        for setting_id, value in pairs:
            if setting_id in seen:
                raise ProtocolError(f"setting 0x{setting_id:x} listed twice in HELLO")
            seen.add(setting_id)
            name = _SETTING_FIELDS.get(setting_id)
            if name is not None:
                _check_setting(setting_id, value)
                values[name] = value
        if defaults is not None:
            return dataclasses.replace(defaults, **values)
        return cls(**values)


@dataclass(slots=True, eq=False)
class DataFrame:
    """DATA (§6.1): stream payload; ``fin`` ends the sender's direction.

    Not frozen, unlike the other frames: one is built per DATA frame received, and a frozen
    dataclass costs twice as much to build. Treat it as read-only.
    """

    stream_id: int
    data: bytes | memoryview = b""
    fin: bool = False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataFrame):
            return NotImplemented
        return (self.stream_id, bytes(self.data), self.fin) == (
            other.stream_id,
            bytes(other.data),
            other.fin,
        )

    def __hash__(self) -> int:
        return hash((self.stream_id, bytes(self.data), self.fin))


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowFrame:
    """WINDOW (§6.2): the absolute receive limit; stream 0 is the connection."""

    stream_id: int
    max_offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenFrame:
    """OPEN (§6.3): a new stream for ``tunnel_id``; origin = visitor, target = public address."""

    stream_id: int
    tunnel_id: int
    origin: Address
    target: Address


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenAckFrame:
    """OPEN_ACK (§6.4): the acceptor took the stream."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenFailFrame:
    """OPEN_FAIL (§6.5): the acceptor refused the stream; no byte reached a target."""

    stream_id: int
    reason: int
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetFrame:
    """RESET (§6.6): abort a stream; ``final_offset`` = DATA bytes the sender wrote on it."""

    stream_id: int
    error_code: int
    final_offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloFrame:
    """HELLO (§6.7): version, role and settings; the first frame of each side."""

    major: int
    minor: int
    role: int
    flags: int = 0
    settings: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class PingFrame:
    """PING (§6.8): ``ack`` marks the answer, which echoes ``seq``."""

    seq: int
    ack: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAwayFrame:
    """GOAWAY (§6.9): no new streams; peer streams above ``last_stream_id`` are not processed."""

    last_stream_id: int
    error_code: int
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseFrame:
    """CLOSE (§6.10): the session ends now, for ``error_code``."""

    error_code: int
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthFrame:
    """AUTH (§7.1): the client's answer to CHALLENGE."""

    req_id: int
    method: int
    credential: bytes


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
"""An ALLOW or DENY entry of a BIND (§6.12)."""

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_DOTTED_QUAD = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
_KNOWN_KINDS = frozenset(int(kind) for kind in BindOptionKind)


def is_tunnel_name(name: str) -> bool:
    """True if ``name`` is a valid private tunnel name (§6.12).

    1..63 characters of ``[a-z0-9][a-z0-9._-]*``, and not four dot-separated groups of digits
    (an IPv4 literal), so that ``Address(name, 0)`` always travels as a domain (§5.1).
    """
    return (
        len(name) <= BIND_NAME_MAX
        and _NAME_RE.fullmatch(name) is not None
        and _DOTTED_QUAD.fullmatch(name) is None
    )


@dataclass(frozen=True, slots=True)
class BindOptions:
    """The ``options`` of a BIND (§6.12, minor version 1).

    ``allow``/``deny`` are the tunnel's visitor lists (at most 64 networks each, host bits
    zero); ``name`` publishes the tunnel privately; ``visit`` makes it a visit tunnel towards
    the private tunnel of that name. ``unknown`` lists the kinds of entries this
    implementation does not know, in wire order (their values are skipped; an encoder sends
    them with an empty value). An empty ``BindOptions()`` means "no option".
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    name: str | None = None
    visit: str | None = None
    unknown: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        """True if there is no entry at all."""
        return not (self.allow or self.deny or self.unknown) and (
            self.name is None and self.visit is None
        )

    @property
    def private(self) -> bool:
        """True for a NAME or VISIT bind, which has no public listener (bind atyp 0)."""
        return self.name is not None or self.visit is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class BindFrame:
    """BIND (§7.2): ask the relay for a public listener (or a private or visit tunnel).

    ``flags`` holds the flag bits other than OPTIONS, which is set exactly when ``options``
    is not None.
    """

    req_id: int
    tunnel_id: int
    proto: int
    bind: Address
    flags: int = 0
    options: BindOptions | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UnbindFrame:
    """UNBIND (§7.3): the client gives a tunnel up, or the relay revokes it (req_id 0)."""

    req_id: int
    tunnel_id: int
    error_code: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultFrame:
    """RESULT (§7.4): the relay's answer; ``bound`` is set for a successful BIND."""

    req_id: int
    status: int
    message: str = ""
    bound: Address | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChallengeFrame:
    """CHALLENGE (§7.1): the relay's 32-byte nonce."""

    nonce: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class AckFrame:
    """ACK (§10.6): the sender received the peer's session stream up to ``received``."""

    received: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TicketFrame:
    """TICKET (§10.6): the relay's 32-byte resumption ticket, valid ``lifetime`` seconds."""

    ticket: bytes
    lifetime: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeFrame:
    """RESUME (§10.6): continue the session of ``ticket``; ``received`` = the client's offset.

    With ``join`` (flag JOIN, §10.7) the connection instead joins the session of ``ticket`` as
    one more connection, a session stream of its own; ``received`` is then 0.
    """

    req_id: int
    ticket: bytes
    received: int
    join: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumedFrame:
    """RESUMED (§10.6): the session continues; ``received`` = the relay's offset."""

    req_id: int
    received: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtensionFrame:
    """A frame of the ignorable extension range 0x80-0xFF (§6.16)."""

    frame_type: int
    flags: int = 0
    stream_id: int = 0
    payload: bytes = field(default=b"")


ControlFrame = (
    WindowFrame
    | OpenFrame
    | OpenAckFrame
    | OpenFailFrame
    | ResetFrame
    | HelloFrame
    | PingFrame
    | GoAwayFrame
    | CloseFrame
    | AuthFrame
    | BindFrame
    | UnbindFrame
    | ResultFrame
    | ChallengeFrame
    | AckFrame
    | TicketFrame
    | ResumeFrame
    | ResumedFrame
    | ExtensionFrame
)
"""Every frame but DATA."""
Frame = DataFrame | ControlFrame
"""Any frame."""


# ---------------------------------------------------------------------------------------
# Encoding


def pack_data_header(stream_id: int, length: int, fin: bool) -> bytes:
    """Header of a DATA frame carrying ``length`` payload bytes."""
    return HEADER.pack(length, FrameType.DATA, FLAG_FIN if fin else 0, 0, stream_id)


def _str16(text: str) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) > MAX_STR16:
        raw = raw[:MAX_STR16].decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(len(raw)) + raw


def _bytes16(raw: bytes) -> bytes:
    if len(raw) > 0xFFFF:
        raise ValueError("BYTES16 field longer than 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _ticket(ticket: bytes) -> bytes:
    if len(ticket) != TICKET_SIZE:
        raise ValueError(f"a ticket is {TICKET_SIZE} bytes, not {len(ticket)}")
    return bytes(ticket)


@functools.lru_cache(maxsize=_HOST_CACHE_SIZE)
def _host_field(host: str) -> bytes:
    """The ATYP and address bytes of ``host`` (spec §6.3); cached, as visitors' addresses
    repeat and an ``ipaddress`` parse costs more than building the rest of the field."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not 1 <= len(raw) <= 255:
            raise ValueError(f"domain name length {len(raw)} not in 1..255") from None
        return bytes((_ATYP_DOMAIN, len(raw))) + raw
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


@functools.lru_cache(maxsize=_HOST_CACHE_SIZE)
def _host_text(packed: bytes) -> str:
    """The text form of a 4- or 16-byte address (cached, like :func:`_host_field`)."""
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    return str(ipaddress.IPv6Address(packed))


def _addr(address: Address) -> bytes:
    host = address.host
    if not 0 <= address.port <= 0xFFFF:
        raise ValueError(f"port {address.port} out of range")
    if host is None:
        if address.port:
            raise ValueError("an address without host must have port 0")
        return b"\x00"
    return _host_field(host) + _PORT.pack(address.port)


def _check_options(options: BindOptions, bind: Address) -> None:
    """Raise ValueError for options a decoder would reject (§6.12)."""
    for label, nets in (("ALLOW", options.allow), ("DENY", options.deny)):
        if len(nets) > BIND_OPTION_LIST_MAX:
            raise ValueError(f"more than {BIND_OPTION_LIST_MAX} {label} entries in one BIND")
        for net in nets:
            if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                raise ValueError(f"{label} entry {net!r} is not an IP network")
    for label, name in (("NAME", options.name), ("VISIT", options.visit)):
        if name is not None and not is_tunnel_name(name):
            raise ValueError(f"{label} {name!r} is not a valid private tunnel name")
    if options.private:
        if options.name is not None and options.visit is not None:
            raise ValueError("NAME and VISIT exclude each other")
        if bind.host is not None:
            raise ValueError("a NAME or VISIT bind must have no address (atyp 0)")
    for kind in options.unknown:
        if not 0 <= kind <= 0xFF or kind in _KNOWN_KINDS:
            raise ValueError(f"unknown option kind {kind} is a known kind or not a byte")


def _options(options: BindOptions, bind: Address) -> bytes:
    _check_options(options, bind)
    parts: list[bytes] = []
    for kind, nets in ((BindOptionKind.ALLOW, options.allow), (BindOptionKind.DENY, options.deny)):
        for net in nets:
            raw = net.network_address.packed
            parts.append(bytes((kind, 1 + len(raw), net.prefixlen)) + raw)
    for kind, name in ((BindOptionKind.NAME, options.name), (BindOptionKind.VISIT, options.visit)):
        if name is not None:
            parts.append(bytes((kind, len(name))) + name.encode("ascii"))
    parts.extend(bytes((kind, 0)) for kind in options.unknown)
    return _bytes16(b"".join(parts))


def _payload(frame: ControlFrame) -> tuple[int, int, int, bytes]:
    """(type, flags, stream_id, payload) of any non-DATA frame."""
    match frame:
        case WindowFrame():
            return FrameType.WINDOW, 0, frame.stream_id, _WINDOW.pack(frame.max_offset)
        case OpenFrame():
            body = _OPEN_FIXED.pack(frame.tunnel_id) + _addr(frame.origin) + _addr(frame.target)
            return FrameType.OPEN, 0, frame.stream_id, body
        case OpenAckFrame():
            return FrameType.OPEN_ACK, 0, frame.stream_id, b""
        case OpenFailFrame():
            body = _OPEN_FAIL_FIXED.pack(frame.reason) + _str16(frame.message)
            return FrameType.OPEN_FAIL, 0, frame.stream_id, body
        case ResetFrame():
            body = _RESET.pack(frame.error_code, frame.final_offset)
            return FrameType.RESET, 0, frame.stream_id, body
        case HelloFrame():
            body = _HELLO_FIXED.pack(frame.major, frame.minor, frame.role, frame.flags) + b"".join(
                _SETTING.pack(sid, value) for sid, value in frame.settings
            )
            return FrameType.HELLO, 0, 0, body
        case PingFrame():
            return FrameType.PING, FLAG_ACK if frame.ack else 0, 0, _U64.pack(frame.seq)
        case GoAwayFrame():
            body = _GOAWAY_FIXED.pack(frame.last_stream_id, frame.error_code) + _str16(
                frame.message
            )
            return FrameType.GOAWAY, 0, 0, body
        case CloseFrame():
            return (
                FrameType.CLOSE,
                0,
                0,
                _CLOSE_FIXED.pack(frame.error_code) + _str16(frame.message),
            )
        case AuthFrame():
            body = _AUTH_FIXED.pack(frame.req_id, frame.method) + _bytes16(frame.credential)
            return FrameType.AUTH, 0, 0, body
        case BindFrame():
            if frame.flags & BIND_FLAG_OPTIONS:
                raise ValueError("the OPTIONS flag of a BIND follows its options field")
            options = frame.options
            flags = frame.flags if options is None else frame.flags | BIND_FLAG_OPTIONS
            tail = b"" if options is None else _options(options, frame.bind)
            body = _BIND_FIXED.pack(frame.req_id, frame.tunnel_id, frame.proto, flags)
            return FrameType.BIND, 0, 0, body + _addr(frame.bind) + tail
        case UnbindFrame():
            body = _UNBIND.pack(frame.req_id, frame.tunnel_id, frame.error_code)
            return FrameType.UNBIND, 0, 0, body
        case ResultFrame():
            body = _RESULT_FIXED.pack(frame.req_id, frame.status) + _str16(frame.message)
            if frame.bound is not None:
                body += _addr(frame.bound)
            return FrameType.RESULT, 0, 0, body
        case ChallengeFrame():
            return FrameType.CHALLENGE, 0, 0, bytes(frame.nonce)
        case AckFrame():
            return FrameType.ACK, 0, 0, _U64.pack(frame.received)
        case TicketFrame():
            body = _ticket(frame.ticket) + _TICKET_TAIL.pack(frame.lifetime)
            return FrameType.TICKET, 0, 0, body
        case ResumeFrame():
            body = _RESUME_FIXED.pack(frame.req_id) + _ticket(frame.ticket)
            flags = FLAG_JOIN if frame.join else 0
            return FrameType.RESUME, flags, 0, body + _U64.pack(frame.received)
        case ResumedFrame():
            return FrameType.RESUMED, 0, 0, _RESUMED.pack(frame.req_id, frame.received)
        case _:  # ExtensionFrame: every other control frame is matched above
            return frame.frame_type, frame.flags, frame.stream_id, bytes(frame.payload)


def encode_into(buf: bytearray, frame: Frame) -> None:
    """Append the wire bytes of ``frame`` to ``buf``."""
    if isinstance(frame, DataFrame):
        buf += pack_data_header(frame.stream_id, len(frame.data), frame.fin)
        buf += frame.data
        return
    frame_type, flags, stream_id, payload = _payload(frame)
    buf += HEADER.pack(len(payload), frame_type, flags, 0, stream_id)
    buf += payload


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes (header and payload) of ``frame``."""
    buf = bytearray()
    encode_into(buf, frame)
    return bytes(buf)


# ---------------------------------------------------------------------------------------
# Decoding

_SESSION_TYPES = frozenset(
    {
        FrameType.HELLO,
        FrameType.PING,
        FrameType.GOAWAY,
        FrameType.CLOSE,
        FrameType.AUTH,
        FrameType.BIND,
        FrameType.UNBIND,
        FrameType.RESULT,
        FrameType.CHALLENGE,
        FrameType.ACK,
        FrameType.TICKET,
        FrameType.RESUME,
        FrameType.RESUMED,
    }
)
_STREAM_TYPES = frozenset(
    {FrameType.DATA, FrameType.OPEN, FrameType.OPEN_ACK, FrameType.OPEN_FAIL, FrameType.RESET}
)
#: Exact payload lengths of fixed-size frames (§6); a different length is FRAME_SIZE_ERROR.
_FIXED_LENGTHS: dict[int, int] = {
    FrameType.WINDOW: 8,
    FrameType.OPEN_ACK: 0,
    FrameType.RESET: 12,
    FrameType.PING: 8,
    FrameType.UNBIND: 12,
    FrameType.CHALLENGE: AUTH_NONCE_SIZE,
    FrameType.ACK: 8,
    FrameType.TICKET: TICKET_SIZE + 4,
    FrameType.RESUME: 4 + TICKET_SIZE + 8,
    FrameType.RESUMED: 12,
}


_OPTION_HEAD = struct.Struct("!BB")


def _network(kind: int, value: bytes) -> IPNetwork:
    """An ALLOW/DENY value: ``prefix_len u8`` + 4 or 16 address bytes, host bits zero."""
    label = BindOptionKind(kind).name
    net: IPNetwork
    try:
        if len(value) == 5:
            net = ipaddress.IPv4Network((value[1:], value[0]))
        elif len(value) == 17:
            net = ipaddress.IPv6Network((value[1:], value[0]))
        else:
            raise ProtocolError(f"BIND: {label} option of {len(value)} bytes, must be 5 or 17")
    except ValueError:  # prefix too long, or host bits set
        raise ProtocolError(f"BIND: {label} option is not a valid network") from None
    return net


def _tunnel_name(kind: int, value: bytes) -> str:
    """A NAME/VISIT value: 1..63 bytes of ``[a-z0-9][a-z0-9._-]*``."""
    name = value.decode("latin-1")
    if not is_tunnel_name(name):
        raise ProtocolError(f"BIND: {BindOptionKind(kind).name} option is not a valid name")
    return name


class _Cursor:
    """Reads fields off a payload; any overrun or leftover is PROTOCOL_ERROR (§5)."""

    __slots__ = ("_data", "_name", "_pos")

    def __init__(self, data: bytes | memoryview, name: str) -> None:
        self._data = data
        self._pos = 0
        self._name = name

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise ProtocolError(f"{self._name} payload ends inside a field")
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack(self.take(st.size))

    def str16(self) -> str:
        (length,) = self.unpack(_U16)
        return self.take(length).decode("utf-8", "replace")

    def bytes16(self) -> bytes:
        (length,) = self.unpack(_U16)
        return self.take(length)

    def addr(self) -> Address:
        (atyp,) = self.unpack(_U8)
        if atyp == _ATYP_NONE:
            return Address(None, 0)
        if atyp == _ATYP_IPV4:
            host = _host_text(self.take(4))
        elif atyp == _ATYP_IPV6:
            host = _host_text(self.take(16))
        elif atyp == _ATYP_DOMAIN:
            (length,) = self.unpack(_U8)
            if length == 0:
                raise ProtocolError(f"{self._name}: empty domain name in address")
            raw = self.take(length)
            if not raw.isascii():
                raise ProtocolError(f"{self._name}: domain name is not ASCII")
            host = raw.decode("ascii")
        else:
            raise ProtocolError(f"{self._name}: unknown address type 0x{atyp:02x}")
        (port,) = self.unpack(_PORT)
        return Address(host, port)

    def options(self, bind: Address) -> BindOptions:
        """A BIND's ``options BYTES16`` (§6.12); any violation is PROTOCOL_ERROR."""
        entries = _Cursor(self.bytes16(), "BIND options")
        nets: dict[int, list[IPNetwork]] = {BindOptionKind.ALLOW: [], BindOptionKind.DENY: []}
        names: dict[int, str] = {}
        unknown: list[int] = []
        while entries.remaining:
            kind, length = entries.unpack(_OPTION_HEAD)
            value = entries.take(length)
            if kind in nets:
                nets[kind].append(_network(kind, value))
            elif kind in (BindOptionKind.NAME, BindOptionKind.VISIT):
                if kind in names:
                    raise ProtocolError(f"BIND: two {BindOptionKind(kind).name} options")
                names[kind] = _tunnel_name(kind, value)
            else:
                unknown.append(kind)
        for kind, lst in nets.items():
            if len(lst) > BIND_OPTION_LIST_MAX:
                raise ProtocolError(
                    f"BIND: more than {BIND_OPTION_LIST_MAX} {BindOptionKind(kind).name} options"
                )
        if names:
            if len(names) > 1:
                raise ProtocolError("BIND: NAME and VISIT exclude each other")
            if bind.host is not None:
                raise ProtocolError("BIND: a NAME or VISIT bind must have no address (atyp 0)")
        return BindOptions(
            allow=tuple(nets[BindOptionKind.ALLOW]),
            deny=tuple(nets[BindOptionKind.DENY]),
            name=names.get(BindOptionKind.NAME),
            visit=names.get(BindOptionKind.VISIT),
            unknown=tuple(unknown),
        )

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError(f"{self._name} payload has {self.remaining} trailing bytes")


def check_stream_id(frame_type: int, stream_id: int) -> None:
    """Reject a session frame on a stream or a stream frame on stream 0 (§4).

    Raises:
        ProtocolError: the stream id is not allowed for this frame type.
    """
    if stream_id == 0:
        if frame_type in _STREAM_TYPES:
            raise ProtocolError(f"{FrameType(frame_type).name} frame on stream 0")
    elif frame_type in _SESSION_TYPES:
        raise ProtocolError(f"{FrameType(frame_type).name} frame on stream {stream_id}")


def decode_payload(
    frame_type: int, flags: int, stream_id: int, payload: bytes | memoryview
) -> Frame:
    """Decode one frame whose header has been read.

    Args:
        frame_type: the header's type code (already known to be a defined or extension type).
        flags: the header's flags; undefined bits are ignored.
        stream_id: the header's stream id.
        payload: exactly the header's Length bytes.

    Raises:
        FrameSizeError: a fixed-size frame has the wrong length, or HELLO is not 4 + 6n.
        FlowControlError: a WINDOW offset above 2^62.
        ProtocolError: any other malformed field or stream-id rule violation.
    """
    if frame_type >= EXTENSION_MIN:
        return ExtensionFrame(
            frame_type=frame_type, flags=flags, stream_id=stream_id, payload=bytes(payload)
        )
    check_stream_id(frame_type, stream_id)
    length = len(payload)
    fixed = _FIXED_LENGTHS.get(frame_type)
    if fixed is not None and length != fixed:
        name = FrameType(frame_type).name
        raise FrameSizeError(f"{name} payload is {length} bytes, must be {fixed}")
    if frame_type == FrameType.DATA:
        fin = bool(flags & FLAG_FIN)
        if length == 0 and not fin:
            raise ProtocolError("empty DATA frame without FIN")
        return DataFrame(stream_id=stream_id, data=payload, fin=fin)
    if frame_type == FrameType.WINDOW:
        (max_offset,) = _WINDOW.unpack(payload)
        if max_offset > MAX_WINDOW_OFFSET:
            raise FlowControlError(f"WINDOW offset {max_offset} above 2^62")
        return WindowFrame(stream_id=stream_id, max_offset=max_offset)
    if frame_type == FrameType.ACK:
        (received,) = _U64.unpack(payload)
        return AckFrame(received=received)
    if frame_type == FrameType.OPEN_ACK:
        return OpenAckFrame(stream_id=stream_id)
    if frame_type == FrameType.RESET:
        code, final_offset = _RESET.unpack(payload)
        return ResetFrame(stream_id=stream_id, error_code=code, final_offset=final_offset)
    if frame_type == FrameType.PING:
        (seq,) = _U64.unpack(payload)
        return PingFrame(seq=seq, ack=bool(flags & FLAG_ACK))
    if frame_type == FrameType.UNBIND:
        req_id, tunnel_id, code = _UNBIND.unpack(payload)
        return UnbindFrame(req_id=req_id, tunnel_id=tunnel_id, error_code=code)
    if frame_type == FrameType.CHALLENGE:
        return ChallengeFrame(nonce=bytes(payload))
    if frame_type == FrameType.TICKET:
        raw = bytes(payload)
        (lifetime,) = _TICKET_TAIL.unpack_from(raw, TICKET_SIZE)
        return TicketFrame(ticket=raw[:TICKET_SIZE], lifetime=lifetime)
    if frame_type == FrameType.RESUME:
        raw = bytes(payload)
        (req_id,) = _RESUME_FIXED.unpack_from(raw, 0)
        (received,) = _U64.unpack_from(raw, 4 + TICKET_SIZE)
        return ResumeFrame(
            req_id=req_id,
            ticket=raw[4 : 4 + TICKET_SIZE],
            received=received,
            join=bool(flags & FLAG_JOIN),
        )
    if frame_type == FrameType.RESUMED:
        req_id, received = _RESUMED.unpack(payload)
        return ResumedFrame(req_id=req_id, received=received)
    if frame_type == FrameType.HELLO:
        if length < _HELLO_FIXED.size or (length - _HELLO_FIXED.size) % _SETTING.size:
            raise FrameSizeError(f"HELLO payload is {length} bytes, must be 4 + 6n")
        major, minor, role, hello_flags = _HELLO_FIXED.unpack_from(payload, 0)
        settings = tuple(
            _SETTING.unpack_from(payload, off) for off in range(_HELLO_FIXED.size, length, 6)
        )
        return HelloFrame(
            major=major,
            minor=minor,
            role=role,
            flags=hello_flags,
            settings=settings,
        )
    cur = _Cursor(payload, FrameType(frame_type).name)
    frame: Frame
    if frame_type == FrameType.OPEN:
        (tunnel_id,) = cur.unpack(_OPEN_FIXED)
        frame = OpenFrame(
            stream_id=stream_id, tunnel_id=tunnel_id, origin=cur.addr(), target=cur.addr()
        )
    elif frame_type == FrameType.OPEN_FAIL:
        (reason,) = cur.unpack(_OPEN_FAIL_FIXED)
        frame = OpenFailFrame(stream_id=stream_id, reason=reason, message=cur.str16())
    elif frame_type == FrameType.GOAWAY:
        last, code = cur.unpack(_GOAWAY_FIXED)
        frame = GoAwayFrame(last_stream_id=last, error_code=code, message=cur.str16())
    elif frame_type == FrameType.CLOSE:
        (code,) = cur.unpack(_CLOSE_FIXED)
        frame = CloseFrame(error_code=code, message=cur.str16())
    elif frame_type == FrameType.AUTH:
        req_id, method = cur.unpack(_AUTH_FIXED)
        frame = AuthFrame(req_id=req_id, method=method, credential=cur.bytes16())
    elif frame_type == FrameType.BIND:
        req_id, tunnel_id, proto, bind_flags = cur.unpack(_BIND_FIXED)
        bind = cur.addr()
        frame = BindFrame(
            req_id=req_id,
            tunnel_id=tunnel_id,
            proto=proto,
            flags=bind_flags & ~BIND_FLAG_OPTIONS,
            bind=bind,
            options=cur.options(bind) if bind_flags & BIND_FLAG_OPTIONS else None,
        )
    else:  # RESULT: every other defined type was handled above
        req_id, status = cur.unpack(_RESULT_FIXED)
        message = cur.str16()
        bound = cur.addr() if cur.remaining else None
        frame = ResultFrame(req_id=req_id, status=status, message=message, bound=bound)
    cur.finish()
    return frame
