"""Events that :meth:`Session.receive_data <muxtunnel.protocol.session.Session.receive_data>` returns.

Each event is a frozen, keyword-only dataclass describing one thing the peer did (except
:class:`DataReceived`, the hot path, which is a plain slotted dataclass). The adapter
dispatches on the event's type. ``DataReceived.data`` is a read-only view of the received bytes
that stays valid; the adapter must call ``Session.acknowledge`` once it has consumed them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .frames import BindOptions

if TYPE_CHECKING:
    from muxtunnel.errors import ErrorCode

    from .constants import ResultStatus
    from .frames import Address, Settings

__all__ = [
    "AuthRequested",
    "BindRequested",
    "ChallengeReceived",
    "ConnectionClosed",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "HelloReceived",
    "JoinRequested",
    "PongReceived",
    "ResultReceived",
    "ResumeRefused",
    "ResumeRequested",
    "SessionResumed",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamRejected",
    "StreamReset",
    "TicketReceived",
    "UnbindReceived",
    "WindowUpdated",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReceived:
    """The peer's HELLO arrived."""

    #: The peer's declared receive limits (our send limits).
    settings: Settings
    #: The effective minor version: min(ours, the peer's).
    minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChallengeReceived:
    """Client side: the server's authentication nonce arrived; answer with ``send_auth``."""

    #: The server's 32-byte nonce.
    nonce: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthRequested:
    """Server side: the client authenticates; answer with ``send_result``.

    The session processes no further frame until the answer has been given.
    """

    #: The request id to echo in the RESULT.
    req_id: int
    #: The authentication method (``AuthMethod``: 1 or 2, §7.1).
    method: int
    #: ``client_nonce || mac`` or ``|| proof`` (64 bytes; the session checked the length).
    credential: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinRequested:
    """Server side: this handshake's AUTH comes with a JOIN (RESUME flag JOIN, §10.7).

    Reported just before the :class:`AuthRequested` of the same handshake. Only once that
    AUTH succeeded: answer ``send_result(req_id, OK)`` (this session is one more connection of
    the ticket's session) or a refusal (TICKET_UNKNOWN or LIMIT_REACHED; the session closes).
    """

    #: The JOIN's request id (echoed by the RESULT).
    req_id: int
    #: The 32-byte ticket presented (the session's, not this connection's).
    ticket: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeRequested:
    """Server side: this handshake's AUTH comes with a RESUME (§10.6).

    Reported just before the :class:`AuthRequested` of the same handshake. Only once that
    AUTH succeeded: continue the old session with ``Session.resume`` on it, or refuse with
    ``send_result(req_id, TICKET_UNKNOWN or RESUME_FAILED)`` on this session.
    """

    #: The RESUME's request id (echoed by RESUMED or by the refusing RESULT).
    req_id: int
    #: The 32-byte ticket presented.
    ticket: bytes
    #: The client's received offset of the relay's session stream.
    received: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TicketReceived:
    """Client side: the relay's resumption ticket for this session (keep the newest)."""

    #: The 32-byte ticket.
    ticket: bytes
    #: Seconds the relay keeps the session after a loss (the window in force).
    lifetime: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionResumed:
    """Client side: RESUMED arrived; the session continues on the new connection."""

    #: The relay's received offset of our session stream (our replay starts there).
    peer_received: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeRefused:
    """Client side: the relay refused the RESUME; the session is closed (CLOSE queued)."""

    #: The RESUME's request id (0: the relay's HELLO no longer offers resumption).
    req_id: int
    #: ``ResultStatus.TICKET_UNKNOWN`` or ``RESUME_FAILED`` (a plain int if unknown).
    status: ResultStatus | int
    #: Diagnostic text.
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BindRequested:
    """Server side: the client asks for a tunnel; answer with ``send_result``.

    A public listener, or with ``options.name`` / ``options.visit`` a private or visit tunnel
    (spec §7.2). ``options`` were validated by the codec (§6.12); ``options.unknown`` kinds and
    ALLOW/DENY on a visit tunnel are the application's to refuse with MALFORMED.
    """

    #: The request id to echo in the RESULT.
    req_id: int
    #: The client's id for this tunnel.
    tunnel_id: int
    #: ``TunnelProto`` value.
    proto: int
    #: The address asked for (host None or port 0: the server chooses).
    bind: Address
    #: The BIND's options (§6.12); empty when the BIND had none.
    options: BindOptions = field(default_factory=BindOptions)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnbindReceived:
    """An UNBIND: a client request (server side) or a revocation notice, req_id 0 (client side)."""

    #: The request id (0 for a server notice, which has no reply).
    req_id: int
    #: The tunnel given up or revoked.
    tunnel_id: int
    #: Why.
    error_code: ErrorCode


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultReceived:
    """Client side: the answer to one of our AUTH/BIND/UNBIND requests."""

    #: The request this answers.
    req_id: int
    #: ``ResultStatus`` member (a plain int for a status we do not know).
    status: ResultStatus | int
    #: Diagnostic text.
    message: str
    #: The bound address of a successful BIND, else None.
    bound: Address | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpened:
    """The peer opened a stream; answer with ``accept_stream`` or ``reject_stream``."""

    #: The new stream's id.
    stream_id: int
    #: The tunnel it belongs to.
    tunnel_id: int
    #: The visitor's address.
    origin: Address
    #: The public address the visitor connected to.
    target: Address


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamAccepted:
    """One of our opens got OPEN_ACK."""

    #: The stream id.
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamRejected:
    """One of our opens got OPEN_FAIL; the stream is closed (no byte reached a target)."""

    #: The stream id.
    stream_id: int
    #: ``OpenFailReason`` value.
    reason: int
    #: Diagnostic text.
    message: str


@dataclass(slots=True)
class DataReceived:
    """Stream bytes arrived; call ``Session.acknowledge(stream_id, len(data), now)`` once consumed.

    Not frozen, unlike the other events: one is built per DATA frame, and a frozen dataclass
    costs twice as much to build. Treat it as read-only.
    """

    #: The stream id.
    stream_id: int
    #: The payload: an immutable ``bytes`` or a read-only view of one.
    data: bytes | memoryview


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded:
    """The peer finished its direction of the stream (FIN), after all its data."""

    #: The stream id.
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset:
    """The stream was aborted: by the peer's RESET (``remote``) or by our stream-error RESET."""

    #: The stream id.
    stream_id: int
    #: The RESET's code.
    error_code: ErrorCode
    #: True if the peer reset it; False if the session reset it because of a peer stream error.
    remote: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowUpdated:
    """Send credit grew; stream 0 means the connection. The writer may have more to send."""

    #: The stream id, or 0 for the connection.
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PongReceived:
    """The answer to one of our PINGs arrived."""

    #: The PING's sequence number.
    seq: int
    #: This round trip's time in seconds (``now`` at receipt minus ``now`` at ``ping``).
    rtt: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAwayReceived:
    """The peer opens no new streams; ours above ``last_stream_id`` were not processed."""

    #: The highest of our stream ids the peer processes.
    last_stream_id: int
    #: Why.
    error_code: ErrorCode
    #: Diagnostic text.
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The peer sent CLOSE; the session is closed now."""

    #: Why.
    error_code: ErrorCode
    #: Diagnostic text.
    message: str


Event = (
    HelloReceived
    | ChallengeReceived
    | AuthRequested
    | BindRequested
    | UnbindReceived
    | ResultReceived
    | StreamOpened
    | StreamAccepted
    | StreamRejected
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PongReceived
    | GoAwayReceived
    | ConnectionClosed
    | ResumeRequested
    | JoinRequested
    | TicketReceived
    | SessionResumed
    | ResumeRefused
)
