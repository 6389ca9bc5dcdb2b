"""The muxtunnel session: one side of one connection, as a pure state machine (protocol-spec.md).

Theory of operation
===================

A :class:`Session` owns everything one side knows about one muxtunnel connection and does no
I/O. Bytes from the peer go in through :meth:`Session.receive_data`, which returns
:mod:`events <muxtunnel.protocol.events>`; API calls (``open_stream``, ``send_data``,
``acknowledge`` ...) queue output; :meth:`Session.data_to_send` hands the queued output out
as one ``bytes`` per call. The adapter (``muxtunnel.connection``) runs one reader task that
feeds ``receive_data`` and one writer task that writes ``data_to_send()``; it passes the
clock in as ``now`` (seconds, monotonic), for RTT, window auto-tuning and flood limits.

Input path. ``receive_data`` feeds a :class:`~muxtunnel.protocol.reader.FrameReader`, which
returns decoded frames (spec §4.5 steps 1-5; DATA payloads are zero-copy views). The session
sees frames only. DATA without FIN on a stream in a data-accepting state is handled inline
(one dict lookup, two window checks, one event); every other frame goes to its handler,
after the handshake-order check (§4.5 step 7). Every stream state change goes through the
one transition table of :mod:`~muxtunnel.protocol.state`; the session's own lifecycle
(HELLO, CHALLENGE, AUTH, open, CLOSE) through the tables of
:mod:`~muxtunnel.protocol.lifecycle`; AUTH/BIND/UNBIND bookkeeping lives in
:mod:`~muxtunnel.protocol.requests`; windows in :mod:`~muxtunnel.protocol.flowcontrol`.

Output path. Control frames are encoded at once into a FIFO of ``bytes``. WINDOW updates and
the PING answer are coalesced (only the latest value goes out) and written after the FIFO.
DATA is queued per stream (``send_data`` keeps references, no copy) and framed by the
:class:`~muxtunnel.protocol.scheduler.Scheduler` (deficit round robin, new flows first) only
when ``data_to_send`` runs, so RESET can drop unsent data and carry the exact final offset.
All pieces of one batch are joined once.

Peer faults. Every violation raises a :class:`~muxtunnel.errors.ProtocolError` subclass whose
``error_code`` is the wire code, *after* ``CLOSE(code)`` has been queued and the session
marked closed: the adapter flushes ``data_to_send()`` and ends the connection. (A wrong
preface raises ``PrefaceError`` and queues nothing: the peer does not speak our framing.)
Stream errors (DATA after the peer's FIN on a stream we answered) reset only that stream,
report ``StreamReset(remote=False)`` and raise nothing; before our answer the same input is a
connection STREAM_STATE_ERROR, since the acceptor cannot RESET an unanswered stream.
Local misuse raises ``LocalProtocolError`` (a call the session's or the stream's state does
not allow), ``SessionClosedError`` (the session is closed) or ``ValueError`` (bad arguments),
without queueing anything.

Handshake. Each side queues MAGIC + HELLO at construction. The first frame from the peer must
be HELLO (after the frame decoded: a malformed first frame is its decoding error, §4.5). The server sends CHALLENGE (``send_challenge``); the client answers with AUTH
(``send_auth``) and may pipeline BINDs. Until the server has sent RESULT(OK) for the AUTH it
accepts only HELLO, AUTH, PING, CLOSE and extension frames, at most ``preauth_limit`` bytes.
When AUTH arrives the server session *holds* every later frame until the application answers
with ``send_result``; on success the held frames are processed by the next ``receive_data``
call (the adapter calls ``receive_data(b"")`` right after ``send_result``); on failure
RESULT + CLOSE(AUTH_FAILED) are queued and the held frames are never processed.

Streams. Client-initiated ids are odd, server-initiated even, each strictly increasing. A
frame on an id above the highest one its initiator has used is a PROTOCOL_ERROR (an idle
stream); at or below it with no table entry, the stream is *known closed*: late DATA is
discarded but credited to the connection window, other late frames are ignored. The
opener may pipeline DATA after OPEN; the acceptor's first frame must be OPEN_ACK or
OPEN_FAIL. A stream is closed (and forgotten) when both FINs are on the wire, on RESET sent or
received, or on OPEN_FAIL sent or received. Bytes received on a stream that closed gracefully
but that the application has not consumed yet are remembered in ``_drain`` so that their
later ``acknowledge`` still returns connection credit; a reset or refused stream's unconsumed
bytes are credited at once (the application drops them).

Flow control. Absolute offsets. The receiver counts DATA against the stream and connection
windows on arrival. Stream credit returns only on ``acknowledge`` (consumption). Connection
credit returns as soon as the bytes are held in a stream buffer, while the bytes held
unconsumed across the whole connection stay within the receive budget; beyond it, on
consumption (spec §8.5). The budget in force is never below the largest stream window, so one
stream that does not read never keeps connection credit; several use up the connection window
only once they hold the budget plus about half the window, and ``stalled_stream`` names the
one to reset then (§8.7). The half-window update rule (for the connection: on the credit still
open to the sender) and auto-tuning toward the bandwidth-delay product apply at both levels;
the connection window is kept at >= 1.5x the largest stream window. The scheduler never
frames beyond the peer's limits.

Flood limits (ENHANCE_YOUR_CALM): inbound PINGs (token bucket, 10/s, burst 100),
non-productive frames (1000/s, burst 1000: ignored extensions, WINDOWs that raise nothing,
stray PONGs, late non-DATA frames, late DATA under 1 KiB beyond the 8 expected on each of the
last 1024 streams we closed with RESET/OPEN_FAIL, GOAWAYs after the first that refuse none of
our streams, UNBIND notices and OPENs for tunnels not bound, and the server's refused
BIND/UNBIND answers), inbound RESETs (200/s, burst 1000), requests without RESULT (16) and
queued control output (1 MiB / 4096 frames). Token buckets refill from ``now``, so the
adapter must pass a real clock.

Bounded work and events. Every inbound frame costs O(1), or O(streams it closes): GOAWAY pops
our stream ids above ``last_stream_id`` from an ascending index (each id once per session), a
repeated GOAWAY touches nothing and is not reported. Each frame yields at most one event, plus
one StreamReset per stream it closes; control events (BindRequested, UnbindReceived,
ResultReceived, GoAwayReceived ...) are bounded by the request limit, by our own requests and
binds, or by the non-productive budget, so an adapter's control-event queue stays bounded.

Tunnels and opens (client). The client session knows which tunnels the relay bound (an OK
RESULT for the BIND, until UNBIND) and answers an OPEN for any other tunnel itself with
OPEN_FAIL(UNKNOWN_TUNNEL), without an event (§9.2). On either role, OPENs beyond
``open_rate``/``open_burst`` get OPEN_FAIL(RESOURCE_SHORTAGE) the same way. A client session
keeps at most 16 requests on the wire and holds later ones back until RESULTs arrive; before
its AUTH succeeded it also keeps the BIND/UNBIND bytes pipelined behind the AUTH within
``PIPELINE_BUDGET`` (the relay bounds pre-authentication input, spec §7.6).

Tunnels and opens (server). A server session takes the client's OPENs (odd ids: visit
streams, spec §9.9) once authenticated, within the MAX_CONCURRENT_STREAMS it declared (0 by
default: any client OPEN is STREAM_LIMIT_ERROR); which tunnel ids are visit tunnels is the
application's to judge. BIND options (spec §6.12) arrive in ``BindRequested.options``; a BIND
that carries them while the negotiated minor version is 0 is a PROTOCOL_ERROR.

Session resumption (spec §10.6). On when the negotiated minor version is >= 2 and both HELLOs
declare RESUME_WINDOW > 0; otherwise none of this happens. Each direction is one byte stream
from the first connection's MAGIC: ``sent_offset`` counts what ``data_to_send`` handed out,
``received_offset`` the bytes of complete frames the reader returned. Every counted batch is
kept by reference in a :class:`~muxtunnel.protocol.replay.ReplayLog` until the peer's ACK
(queued by the session itself: every ACK_INTERVAL bytes received, and before each WINDOW
and PONG it sends) releases it. ``suspend()`` keeps everything when the transport is
lost; local calls keep queueing. The relay's old session continues with ``resume()`` (RESUMED
uncounted, then the log's tail from the client's offset); the client's old session runs a resume
handshake on the new connection (``begin_resume``, ``send_resume``, ``send_auth``) whose frames
are not part of the stream, and its reader stops exactly after RESUMED: the bytes behind it are
the relay's replay. The relay's handshake session takes the RESUME before the AUTH, reports
``ResumeRequested`` just before ``AuthRequested`` and pauses its input (``input_paused``) until
the application answered the RESUME or dropped the session.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

from muxtunnel.errors import (
    ErrorCode,
    FinalSizeError,
    FlowControlError,
    LocalProtocolError,
    PrefaceError,
    ProtocolError,
    SessionClosedError,
    StreamLimitError,
    StreamStateError,
    VersionMismatchError,
)

from .constants import (
    ACK_INTERVAL,
    AUTH_NONCE_SIZE,
    EXTENSION_MIN,
    FLAG_FIN,
    MAGIC,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    TICKET_SIZE,
    AuthMethod,
    FrameType,
    OpenFailReason,
    ResultStatus,
    Role,
    TunnelProto,
)
from .events import (
    AuthRequested,
    BindRequested,
    ChallengeReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    JoinRequested,
    PongReceived,
    ResultReceived,
    ResumeRefused,
    ResumeRequested,
    SessionResumed,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    TicketReceived,
    UnbindReceived,
    WindowUpdated,
)
from .flowcontrol import ReceiveWindow, SendCredit, WindowBudget, min_conn_window
from .frames import (
    DATA_HEADER,
    HEADER,
    AckFrame,
    Address,
    AuthFrame,
    BindFrame,
    BindOptions,
    ChallengeFrame,
    CloseFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HelloFrame,
    OpenAckFrame,
    OpenFailFrame,
    OpenFrame,
    PingFrame,
    ResetFrame,
    ResultFrame,
    ResumedFrame,
    ResumeFrame,
    Settings,
    TicketFrame,
    UnbindFrame,
    WindowFrame,
    encode_frame,
)
from .lifecycle import Lifecycle, SessionInput, SessionState
from .reader import FrameReader
from .replay import ReplayLog
from .requests import IncomingRequests, OutgoingRequests
from .scheduler import OutboundStream, Scheduler
from .state import (
    RECV_DATA_STATES,
    SEND_DATA_STATES,
    SEND_WINDOW_STATES,
    StreamInput,
    StreamState,
    advance,
    allows,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Session", "SessionConfig"]

_MiB = 1024 * 1024

#: Inbound PINGs: sustained rate per second and burst (spec §10.1, §12). The burst leaves room
#: for a peer that probes liveness once per request it handles (at most 4 PINGs in flight).
PING_RATE: Final = 10.0
PING_BURST: Final = 100
#: Non-productive frames per second (and burst).
NONPRODUCTIVE_RATE: Final = 1000.0
NONPRODUCTIVE_BURST: Final = 1000
#: Inbound RESETs per second and burst (Rapid Reset, CVE-2023-44487).
RESET_RATE: Final = 200.0
RESET_BURST: Final = 1000
#: Queued control output that makes us stop reading (CVE-2019-9517).
MAX_CONTROL_BYTES: Final = 1 * _MiB
MAX_CONTROL_FRAMES: Final = 4096
#: Our own PINGs outstanding at most.
MAX_OUTSTANDING_PINGS: Final = 4
#: Inbound OPENs the acceptor takes per second (and burst); more are refused with
#: OPEN_FAIL(RESOURCE_SHORTAGE) (spec §9.2, §12). Defaults of ``SessionConfig``: far above
#: what a legitimate burst of visitors reaches through one session (a connection pool refill,
#: a load test), so they only cut open/reset churn; the client's ``--max-open-rate`` lowers them.
OPEN_RATE: Final = 5000.0
OPEN_BURST: Final = 10_000
#: DATA for a closed stream carrying fewer bytes than this counts as non-productive (spec §9.6);
#: larger frames (what a sender has in flight when a stream is reset) cost what any DATA costs.
LATE_DATA_FREE_SIZE: Final = 1024
#: Except for the first LATE_DATA_ALLOWANCE small frames after we closed the stream ourselves
#: (RESET or OPEN_FAIL sent: the peer may have sent them before it knew), remembered for the
#: last MAX_CLOSED_BY_US streams we closed.
LATE_DATA_ALLOWANCE: Final = 8
MAX_CLOSED_BY_US: Final = 1024
#: Largest DATA frame we send, whatever the peer allows (one 64 KiB slice of a batch).
MAX_SEND_FRAME: Final = 65_536
_MAX_STREAM_ID: Final = (1 << 64) - 1

_S = StreamState
_I = StreamInput
_L = SessionInput
_LS = SessionState
_U32_MAX: Final = (1 << 32) - 1
#: The header of an ACK frame (spec §6.17); its payload is the 8-byte offset.
_ACK_HEADER: Final = HEADER.pack(8, FrameType.ACK, 0, 0, 0)
_REMOTE_FINISHED = frozenset({_S.OPENING_IN_REMOTE_DONE, _S.REMOTE_DONE})
_OPENING_IN = frozenset({_S.OPENING_IN, _S.OPENING_IN_REMOTE_DONE})
#: What the server accepts before it has sent RESULT(OK) for the AUTH (spec §7.1, §7.6).
_PREAUTH_TYPES = frozenset(
    {FrameType.HELLO, FrameType.AUTH, FrameType.PING, FrameType.CLOSE, FrameType.RESUME}
)
#: RESULT statuses that refuse a RESUME (spec §10.6).
_RESUME_REFUSALS = frozenset({ResultStatus.TICKET_UNKNOWN, ResultStatus.RESUME_FAILED})
#: RESULT statuses that answer a JOIN (spec §10.7).
_JOIN_ANSWERS = frozenset(
    {ResultStatus.OK, ResultStatus.TICKET_UNKNOWN, ResultStatus.LIMIT_REACHED}
)
#: The type code of each decoded frame class (extension frames carry their own).
_FRAME_TYPES: dict[type, FrameType] = {
    DataFrame: FrameType.DATA,
    WindowFrame: FrameType.WINDOW,
    OpenFrame: FrameType.OPEN,
    OpenAckFrame: FrameType.OPEN_ACK,
    OpenFailFrame: FrameType.OPEN_FAIL,
    ResetFrame: FrameType.RESET,
    HelloFrame: FrameType.HELLO,
    PingFrame: FrameType.PING,
    GoAwayFrame: FrameType.GOAWAY,
    CloseFrame: FrameType.CLOSE,
    AuthFrame: FrameType.AUTH,
    BindFrame: FrameType.BIND,
    UnbindFrame: FrameType.UNBIND,
    ResultFrame: FrameType.RESULT,
    ChallengeFrame: FrameType.CHALLENGE,
    AckFrame: FrameType.ACK,
    TicketFrame: FrameType.TICKET,
    ResumeFrame: FrameType.RESUME,
    ResumedFrame: FrameType.RESUMED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Local knobs of a session.

    Attributes:
        settings: our declared receive limits (sent in HELLO); None -> the role's defaults
            (the server allows 0 client-initiated streams).
        max_stream_window: auto-tuning cap of each stream's receive window.
        max_conn_window: auto-tuning cap of the connection receive window.
        quantum: DRR quantum, and the DATA frame size while several streams compete.
        max_batch: bytes one ``data_to_send()`` call returns at most (soft: control frames
            always go out whole, and a DATA frame is never cut below one quantum).
        preauth_limit: bytes the server accepts before authentication succeeds.
        window_budget: optional process-wide memory budget, asked before any window grows.
        receive_budget: bytes held unconsumed across all streams of the connection whose
            connection credit is returned on receipt (spec §8.5); None -> ``max_conn_window``.
            The budget in force is never below the largest stream window so far (a smaller
            value is raised to it), so one stream that does not read can never hold back the
            others (§8.7).
        open_rate: inbound OPENs accepted per second (token bucket); more are refused with
            OPEN_FAIL(RESOURCE_SHORTAGE) without creating the stream.
        open_burst: the bucket's size: OPENs accepted at once after a quiet period.
        max_replay: with resumption on, no DATA is framed while the replay log holds this many
            bytes or more (spec §10.6.2 item 5: a local bound against a peer that announces
            huge windows or sends no ACK; the peer's next ACK, sent on receipt, releases it).
            None -> our own connection window cap (``max_conn_window``); never below
            4 x ACK_INTERVAL, so that a peer acknowledging every ACK_INTERVAL keeps it moving.
    """

    settings: Settings | None = None
    max_stream_window: int = 16 * _MiB
    max_conn_window: int = 64 * _MiB
    quantum: int = 16_384
    max_batch: int = 262_144
    preauth_limit: int = 16_384
    window_budget: WindowBudget | None = None
    receive_budget: int | None = None
    open_rate: float = OPEN_RATE
    open_burst: int = OPEN_BURST
    max_replay: int | None = None


class _Bucket:
    """Token bucket refilled from the ``now`` the adapter passes in."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last: float | None = None

    def take(self, now: float) -> bool:
        last = self.last
        if last is not None and now > last:
            self.tokens = min(self.burst, self.tokens + (now - last) * self.rate)
        if last is None or now > last:
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Stream(OutboundStream):
    """One stream: the scheduler's sending half plus state and the receive window."""

    __slots__ = ("adv_sent", "local", "pending_open", "recv", "since", "state")

    def __init__(
        self, stream_id: int, *, local: bool, send_limit: int, recv: ReceiveWindow
    ) -> None:
        super().__init__(stream_id, send_limit)
        #: We opened it.
        self.local = local
        self.state = _S.IDLE
        #: OPEN not answered yet (counts against MAX_PENDING_OPENS).
        self.pending_open = True
        self.recv = recv
        #: The last receive limit we told the peer (WINDOW or the HELLO default).
        self.adv_sent = recv.advertised
        #: When the stream last made receive progress: its buffer became non-empty, or the
        #: application consumed from it (the stall clock of spec §8.7).
        self.since = 0.0


class Session:
    """One side of a muxtunnel connection (sans-IO).

    Args:
        role: ``Role.CLIENT`` or ``Role.SERVER``.
        config: local knobs; None -> defaults.

    MAGIC and HELLO are queued at once.
    """

    def __init__(self, role: Role, config: SessionConfig | None = None) -> None:
        if role not in (Role.CLIENT, Role.SERVER):
            raise ValueError(f"unknown role {role!r}")
        cfg = config if config is not None else SessionConfig()
        self.config = cfg
        self.role = Role(role)
        settings = cfg.settings
        if settings is None:
            settings = Settings(max_concurrent_streams=0) if role == Role.SERVER else Settings()
        #: Our declared receive limits.
        self.local_settings: Settings = settings
        #: The peer's declared receive limits (our send limits); None until its HELLO.
        self.peer_settings: Settings | None = None
        #: The negotiated minor version (valid once the peer's HELLO arrived).
        self.minor = PROTOCOL_MINOR
        self._life = Lifecycle(self.role)
        #: Smoothed RTT in seconds (EWMA 1/8 over PING round trips), None before the first.
        self.rtt: float | None = None

        self._now = 0.0
        self._reader = FrameReader(
            max_data_payload=settings.max_frame_payload,
            max_control_payload=settings.max_control_payload,
        )
        self._control: list[bytes] = [MAGIC]
        self._control_bytes = len(MAGIC)
        self._pong: int | None = None
        self._dirty: dict[int, _Stream] = {}
        self._conn_dirty = False
        self._streams: dict[int, _Stream] = {}
        self._drain: dict[int, int] = {}
        self._sched = Scheduler(cfg.quantum, MAX_SEND_FRAME)

        self._max_conn_window = max(
            cfg.max_conn_window, settings.initial_conn_window, min_conn_window(16_384)
        )
        self._max_stream_window = max(
            settings.initial_stream_window,
            min(cfg.max_stream_window, self._max_conn_window * 2 // 3),
        )
        self._conn_send = SendCredit(0)
        self._conn_recv = ReceiveWindow(settings.initial_conn_window, self._max_conn_window)
        if self._conn_recv.ensure_window(min_conn_window(settings.initial_stream_window)):
            self._conn_dirty = True
        self._conn_adv_sent = settings.initial_conn_window
        #: Bytes received on streams and not consumed yet (live streams and ``_drain``).
        self._unconsumed = 0
        budget = cfg.receive_budget
        #: The configured receive budget; the budget in force is never below the largest
        #: stream window so far (:attr:`_stream_window_peak`, spec §8.5 item 2).
        self._receive_budget = self._max_conn_window if budget is None else max(0, budget)

        self._local_parity = 1 if role == Role.CLIENT else 0
        self._next_id = 1 if role == Role.CLIENT else 2
        self._highest_local = 0
        self._highest_remote = 0
        self._local_open = 0
        self._local_pending = 0
        self._remote_open = 0
        self._remote_pending = 0

        self._auth_req: int | None = None  # server: AUTH awaiting send_result
        self._held: list[Frame] = []  # server: frames held behind that AUTH
        self._preauth_bytes = 0
        self._requests_in = IncomingRequests()  # server
        self._requests_out = OutgoingRequests()  # client
        self._local_ids: list[int] = []  # ids of our streams, ascending (closed ones linger)
        self._closed_by_us: dict[int, int] = {}  # sid -> small late DATA frames still expected

        self._ping_seq = 0
        self._pings: dict[int, float] = {}
        self._stream_window_peak = settings.initial_stream_window
        self._peer_ping_seq = -1
        self._goaway_sent: int | None = None
        self._goaway_received: int | None = None

        # Session resumption (spec §10.6).
        self._resume_on = False
        self._resume_window = 0.0
        #: Our stream from offset 0, while resumption may be on (dropped at the peer's HELLO
        #: if it is off, and at the end of the session).
        self._log: ReplayLog | None = ReplayLog() if settings.resume_window > 0 else None
        #: No DATA is framed while the log holds this many bytes (spec §10.6.2 item 5).
        self._max_replay = max(
            4 * ACK_INTERVAL, self._max_conn_window if cfg.max_replay is None else cfg.max_replay
        )
        self._uncounted = 0  # bytes handed out that are not part of our stream (bytes_sent)
        self._recv_base = 0  # received offset where the current reader's stream starts
        self._recv_mark = 0  # stats["bytes_received"] when the current reader started
        self._ack_sent = 0  # the last ACK we sent
        self._ack_recv = 0  # the last ACK (or resume offset) the peer gave us
        #: The transport is lost or a resume handshake runs: stream output is held back.
        self._detached = False
        #: receive_data() leaves the plain path (detached, or input paused behind a RESUME).
        self._special_in = False
        #: data_to_send() leaves the plain path (detached, or a prefix / replay is pending).
        self._special_out = False
        #: Uncounted output: a resume handshake's frames (client), RESUMED (relay).
        self._hs_out: list[bytes] = []
        #: The replay still to send after a resume (views of the log's chunks).
        self._replay: deque[memoryview] = deque()
        self._resume_in: ResumeFrame | None = None  # relay: the RESUME held until the AUTH
        self._join_in: ResumeFrame | None = None  # relay: the JOIN reported with the AUTH
        self._join_req: int | None = None  # relay: the JOIN not answered yet
        self._resume_hold = False  # relay: input paused behind RESUME + AUTH
        self._hs_resume_req: int | None = None  # client: our RESUME's req_id
        self._hs_auth_req: int | None = None  # client: the resume handshake's AUTH req_id
        self._hs_fatal = False  # client: the handshake error ends the session

        self._ping_bucket = _Bucket(PING_RATE, PING_BURST)
        self._idle_bucket = _Bucket(NONPRODUCTIVE_RATE, NONPRODUCTIVE_BURST)
        self._reset_bucket = _Bucket(RESET_RATE, RESET_BURST)
        self._open_bucket = _Bucket(cfg.open_rate, cfg.open_burst)

        # Each handler takes its own frame class; the dict is keyed by that class.
        self._handlers: dict[type, Callable[[Any, list[Event]], None]] = {
            WindowFrame: self._on_window,
            OpenFrame: self._on_open,
            OpenAckFrame: self._on_open_answer,
            OpenFailFrame: self._on_open_answer,
            ResetFrame: self._on_reset,
            HelloFrame: self._on_hello,
            PingFrame: self._on_ping,
            GoAwayFrame: self._on_goaway,
            CloseFrame: self._on_close,
            AuthFrame: self._on_auth,
            BindFrame: self._on_bind,
            UnbindFrame: self._on_unbind,
            ResultFrame: self._on_result,
            ChallengeFrame: self._on_challenge,
            AckFrame: self._on_ack,
            TicketFrame: self._on_ticket,
            ResumeFrame: self._on_resume,
            ResumedFrame: self._on_resumed,
            ExtensionFrame: self._on_extension,
        }

        self._stats = {
            "frames_received": 0,
            "bytes_received": 0,
            "data_bytes_received": 0,
            "bytes_sent": 0,
            "data_bytes_sent": 0,
            "streams_opened_local": 0,
            "streams_opened_remote": 0,
            "opens_refused": 0,
            "goaway_stream_checks": 0,
        }

        self._queue(
            HelloFrame(
                major=PROTOCOL_MAJOR,
                minor=PROTOCOL_MINOR,
                role=self.role,
                flags=0,
                settings=settings.to_pairs(),
            )
        )

    @property
    def closed(self) -> bool:
        """True once CLOSE was sent or received (or a fault happened); input is ignored."""
        return self._life.closed

    @property
    def authenticated(self) -> bool:
        """Server: RESULT(OK) sent for AUTH. Client: RESULT(OK) received for our AUTH."""
        return self._life.authenticated

    @property
    def resume_enabled(self) -> bool:
        """Session resumption is on (minor >= 2, both HELLOs declare RESUME_WINDOW > 0)."""
        return self._resume_on

    @property
    def resume_window(self) -> float:
        """Seconds a lost session is kept: the smaller declared window; 0.0 if off."""
        return self._resume_window

    @property
    def suspended(self) -> bool:
        """From ``suspend()`` until a resume completes (RESUMED) or the session closes.

        Also True during a client's resume handshake; a peer fault there leaves it True
        (the session is SUSPENDED again), a fatal one makes ``closed`` True instead.
        """
        return self._detached

    @property
    def input_paused(self) -> bool:
        """Relay handshake session: RESUME + AUTH processed, the RESUME not answered yet.

        Read nothing more from the transport meanwhile (the client sends nothing: after the
        answer its bytes belong to the resumed session, or to this one after a refusal).
        """
        return self._resume_hold

    @property
    def sent_offset(self) -> int:
        """Bytes of our session stream handed out by ``data_to_send`` (spec §10.6)."""
        return self._stats["bytes_sent"] - self._uncounted

    @property
    def received_offset(self) -> int:
        """Bytes of the peer's session stream received as complete frames (spec §10.6)."""
        if self._detached:
            return self._recv_base
        received = self._stats["bytes_received"] - self._recv_mark - self._reader.buffered
        return self._recv_base + received

    @property
    def replay_size(self) -> int:
        """Bytes held in the replay log (0 with resumption off)."""
        log = self._log
        return 0 if log is None else log.size

    # ------------------------------------------------------------------------------------
    # Input

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Process bytes received from the peer.

        Args:
            data: the bytes (any chunking). ``b""`` processes frames held behind an AUTH.
            now: the current time in seconds (monotonic); drives RTT, window auto-tuning
                and the flood limits' token buckets.

        Returns:
            The events, in order.

        Raises:
            ProtocolError: the peer broke the protocol; ``CLOSE(error_code)`` is already
                queued (except for ``PrefaceError``) and the session is closed.
        """
        if self._life.closed:
            return []
        self._now = now
        if self._special_in:
            return self._receive_special(data, now)
        events: list[Event] = []
        try:
            size = len(data)
            self._stats["bytes_received"] += size
            if not self._life.authenticated and self.role == Role.SERVER:
                self._preauth_bytes += size
                if self._preauth_bytes > self.config.preauth_limit:
                    raise ProtocolError(
                        f"more than {self.config.preauth_limit} bytes before authentication"
                    )
            frames = self._reader.read_frames(data) if size else []
            if self._auth_req is not None:
                self._held += frames
                return events
            if self._held:
                frames = self._held + frames
                self._held = []
            if frames:
                self._process(frames, events, now)
            if self._log is not None and self._life.authenticated:
                received = self.received_offset
                if received - self._ack_sent >= ACK_INTERVAL:
                    self._ack_sent = received
                    raw = _ACK_HEADER + received.to_bytes(8, "big")
                    self._control.append(raw)
                    self._control_bytes += 24
            if len(self._control) > MAX_CONTROL_FRAMES or self._control_bytes > MAX_CONTROL_BYTES:
                raise ProtocolError(
                    "peer makes us queue too much control output", ErrorCode.ENHANCE_YOUR_CALM
                )
        except ProtocolError as exc:
            self._fail(exc)
            raise
        return events

    def _process(self, frames: list[Frame], events: list[Event], now: float) -> None:
        streams = self._streams
        conn = self._conn_recv
        append = events.append
        recv_ok = RECV_DATA_STATES
        handlers = self._handlers
        data_frame = DataFrame
        data_event = DataReceived
        stats = self._stats
        stats["frames_received"] += len(frames)
        received_before = conn.received
        # The hot path counts its bytes in ``taken`` and adds them to ``conn.received`` and
        # ``_unconsumed`` before anything else looks at those (spec §8.3, §8.5).
        taken = 0
        room = conn.advertised - conn.received
        it = iter(frames)
        try:
            for frame in it:
                if frame.__class__ is data_frame:
                    # DATA without FIN on a live stream whose state takes it: the hot path.
                    sid = frame.stream_id
                    stream = streams.get(sid)
                    if stream is not None and not frame.fin and stream.state in recv_ok:
                        payload = frame.data
                        n = len(payload)
                        recv = stream.recv
                        total = recv.received + n
                        if total > recv.advertised or n > room:
                            self._window_exceeded(stream, n, taken)
                        if recv.received == recv.consumed:
                            stream.since = now  # the buffer was empty: the stall clock starts
                        recv.received = total
                        room -= n
                        taken += n
                        append(data_event(sid, payload))
                        continue
                conn.received += taken
                self._unconsumed += taken
                taken = 0
                if frame.__class__ is data_frame:
                    self._on_data(stream, frame, events)
                else:
                    cls = frame.__class__
                    self._check_allowed(_FRAME_TYPES.get(cls, EXTENSION_MIN))
                    handlers[cls](frame, events)
                    if self._auth_req is not None:
                        self._held = list(it)
                        if self._held and self._resume_hold:
                            raise ProtocolError("frames after the AUTH of a resume handshake")
                        return
                    if self._life.closed:
                        return
                room = conn.advertised - conn.received
        finally:
            conn.received += taken
            self._unconsumed += taken
            stats["data_bytes_received"] += conn.received - received_before
            if not self._life.closed:
                self._settle()

    # --- DATA ---------------------------------------------------------------------------

    def _window_exceeded(self, stream: _Stream, n: int, uncounted: int = 0) -> NoReturn:
        """Raise FLOW_CONTROL_ERROR for ``n`` bytes on ``stream`` (spec §8.3).

        ``uncounted``: bytes received just before and not yet in ``conn.received``.
        """
        recv = stream.recv
        if recv.received + n > recv.advertised:
            raise FlowControlError(
                f"stream {stream.stream_id}: {recv.received + n} bytes exceed "
                f"the window {recv.advertised}"
            )
        conn = self._conn_recv
        raise FlowControlError(
            f"{conn.received + uncounted + n} bytes exceed the connection window {conn.advertised}"
        )

    def _on_data(self, stream: _Stream | None, frame: DataFrame, events: list[Event]) -> None:
        """DATA with FIN, or on a closed/unknown stream, or in a state that forbids it.

        (DATA without FIN on a live stream whose state accepts it takes the hot path.)
        """
        self._check_allowed(FrameType.DATA)
        sid = frame.stream_id
        payload = frame.data
        n = len(payload)
        fin = frame.fin
        if stream is None:
            self._check_known(sid, "DATA")
            self._receive_conn(n)
            self._settle()  # late DATA on a known-closed stream: discard, credit
            if n < LATE_DATA_FREE_SIZE:  # small late frames are cheap to forge (spec §9.6)
                expected = self._closed_by_us.get(sid, 0)
                if expected > 1 and not fin:
                    self._closed_by_us[sid] = expected - 1
                elif expected:
                    del self._closed_by_us[sid]
                else:
                    self._nonproductive()
            return
        if (n and not allows(stream, _I.RECV_DATA)) or (fin and not allows(stream, _I.RECV_FIN)):
            state = stream.state
            if state is _S.OPENING_IN_REMOTE_DONE:
                # Not answered yet, so no RESET is possible: a connection error (§9.3).
                raise StreamStateError(f"DATA after FIN on stream {sid} (not answered yet)")
            if state is _S.REMOTE_DONE:
                # Stream error: the peer kept sending after its FIN.
                self._receive_conn(n)
                self._settle()  # discarded: its connection credit returns
                self._reset(stream, ErrorCode.STREAM_STATE_ERROR)
                events.append(
                    StreamReset(
                        stream_id=sid, error_code=ErrorCode.STREAM_STATE_ERROR, remote=False
                    )
                )
                return
            raise ProtocolError(
                f"DATA on stream {sid} before OPEN_ACK/OPEN_FAIL (state {state.name})"
            )
        # Only FIN frames get here: data-only frames on a live stream took the hot path.
        recv = stream.recv
        if recv.received + n > recv.advertised or not self._conn_recv.receive(n):
            self._window_exceeded(stream, n)
        if n:
            if recv.received == recv.consumed:
                stream.since = self._now
            recv.received += n
            self._unconsumed += n
            events.append(DataReceived(sid, payload))
        nxt = advance(stream, _I.RECV_FIN)
        self._dirty.pop(sid, None)
        events.append(StreamEnded(stream_id=sid))
        if nxt is _S.CLOSED:
            self._forget(stream, discard=False)

    def _receive_conn(self, n: int) -> None:
        conn = self._conn_recv
        if not conn.receive(n):
            raise FlowControlError(
                f"{conn.received + n} bytes exceed the connection window {conn.advertised}"
            )

    def _settle(self) -> None:
        """Return the connection credit that the receive budget allows (spec §8.5).

        Of the bytes received on the connection, those held unconsumed beyond
        ``receive_budget`` keep their connection credit; every other received byte (held
        within the budget, consumed, or discarded) has it returned. Each change to the
        received or held counts is followed by this, so the release is never negative.
        """
        conn = self._conn_recv
        budget = self._receive_budget
        if budget < self._stream_window_peak:
            budget = self._stream_window_peak  # one stream's window always fits (§8.5 item 2)
        over = self._unconsumed - budget
        kept = over if over > 0 else 0
        release = conn.received - conn.consumed - kept
        if release > 0:
            conn.consumed += release
            # ``maybe_update``'s half-window test first, inline: most releases stop there.
            if conn.advertised - conn.consumed - kept <= conn.window // 2 and conn.maybe_update(
                self._now, self.rtt, self.config.window_budget, kept
            ):
                self._conn_dirty = True

    # --- everything else ---------------------------------------------------------------

    def _check_allowed(self, frame_type: int) -> None:
        """Spec §4.5 step 7, first part: handshake order and authentication (§3.2, §7.6)."""
        if not self._life.hello_received and frame_type != FrameType.HELLO:
            raise ProtocolError("the first frame must be HELLO")
        if (
            self.role == Role.SERVER
            and not self._life.authenticated
            and frame_type not in _PREAUTH_TYPES
            and frame_type < EXTENSION_MIN
        ):
            raise ProtocolError(
                f"{FrameType(frame_type).name} frame before authentication succeeded"
            )

    def _check_known(self, sid: int, what: str) -> None:
        """Raise if ``sid`` is idle (above its initiator's highest id)."""
        highest = self._highest_local if sid & 1 == self._local_parity else self._highest_remote
        if sid > highest:
            raise ProtocolError(f"{what} frame on idle stream {sid}")

    def _nonproductive(self) -> None:
        if not self._idle_bucket.take(self._now):
            raise ProtocolError("too many frames that do nothing", ErrorCode.ENHANCE_YOUR_CALM)

    def _on_ack(self, frame: AckFrame, events: list[Event]) -> None:
        log = self._log
        if log is None or not self._life.authenticated:
            raise ProtocolError("ACK while resumption is off or before authentication")
        received = frame.received
        if received > log.end:
            raise ProtocolError(f"ACK of {received} bytes; {log.end} were sent")
        if received <= self._ack_recv:
            self._nonproductive()  # not above the previous ACK: ignored (spec §10.6)
            return
        self._ack_recv = received
        blocked = self._max_replay - log.size < self._sched.sws
        log.release(received)
        if blocked:  # the local bound held DATA back: the writer may go on (spec §10.6.2)
            events.append(WindowUpdated(stream_id=0))

    def _on_ticket(self, frame: TicketFrame, events: list[Event]) -> None:
        if self.role != Role.CLIENT:
            raise ProtocolError("TICKET sent to a relay")
        if self._log is None or not self._life.authenticated:
            raise ProtocolError("TICKET while resumption is off or before authentication")
        events.append(TicketReceived(ticket=frame.ticket, lifetime=frame.lifetime))

    def _on_resume(self, frame: ResumeFrame, events: list[Event]) -> None:
        if self.role != Role.SERVER:
            raise ProtocolError("RESUME sent to a client")
        if not self._resume_on:
            raise ProtocolError("RESUME while resumption is off")
        if frame.join:
            if frame.received:
                raise ProtocolError("JOIN with a received offset other than 0")
            if self.local_settings.max_connections < 2:
                raise ProtocolError("JOIN to a relay that takes one connection per session")
        if not self._life.advance(_L.RECV_RESUME):
            raise ProtocolError("RESUME outside the handshake's place between HELLO and AUTH")
        self._requests_in.take(frame.req_id, FrameType.RESUME)
        if frame.join:
            self._join_in = frame
            self._join_req = frame.req_id
        else:
            self._resume_in = frame

    def _on_resumed(self, frame: ResumedFrame, events: list[Event]) -> None:
        raise ProtocolError("RESUMED outside a resume handshake")

    def _on_extension(self, frame: ExtensionFrame, events: list[Event]) -> None:
        self._nonproductive()  # skipped (§6.16), but it counts as non-productive

    def _on_close(self, frame: CloseFrame, events: list[Event]) -> None:
        code = ErrorCode.from_wire(frame.error_code)
        self._shutdown()
        self._drop_output()  # the peer is gone: nothing more is worth sending
        events.append(ConnectionClosed(error_code=code, message=frame.message))

    def _on_hello(self, frame: HelloFrame, events: list[Event]) -> None:
        if not self._life.allows(_L.RECV_HELLO):
            raise ProtocolError("second HELLO")
        if frame.major != PROTOCOL_MAJOR:
            raise VersionMismatchError(
                f"peer speaks protocol {frame.major}.{frame.minor}, we speak {PROTOCOL_MAJOR}"
            )
        expected = Role.SERVER if self.role == Role.CLIENT else Role.CLIENT
        if frame.role != expected:
            raise ProtocolError(f"peer HELLO has role {frame.role}, expected {int(expected)}")
        defaults = Settings(max_concurrent_streams=0) if expected == Role.SERVER else Settings()
        settings = Settings.from_pairs(frame.settings, defaults)  # §4.5 step 6
        self._life.advance(_L.RECV_HELLO)
        self.peer_settings = settings
        self.minor = min(PROTOCOL_MINOR, frame.minor)
        ours = self.local_settings.resume_window
        if self.minor >= 2 and ours and settings.resume_window:  # spec §10.6
            self._resume_on = True
            self._resume_window = float(min(ours, settings.resume_window))
        else:
            self._log = None
        self._conn_send.limit = settings.initial_conn_window
        self._sched.single_max = min(MAX_SEND_FRAME, settings.max_frame_payload)
        events.append(HelloReceived(settings=settings, minor=self.minor))

    def _on_window(self, frame: WindowFrame, events: list[Event]) -> None:
        sid = frame.stream_id
        max_offset = frame.max_offset
        if sid == 0:
            if self._conn_send.raise_limit(max_offset):
                events.append(WindowUpdated(stream_id=0))
            else:
                self._nonproductive()
            return
        stream = self._streams.get(sid)
        if stream is None:
            self._check_known(sid, "WINDOW")
            self._nonproductive()
            return
        if not allows(stream, _I.RECV_WINDOW):
            raise ProtocolError(f"WINDOW on stream {sid} before OPEN_ACK/OPEN_FAIL")
        if max_offset > stream.limit:
            stream.limit = max_offset
            self._sched.credit_raised(stream)
            events.append(WindowUpdated(stream_id=sid))
        else:
            self._nonproductive()

    def _on_ping(self, frame: PingFrame, events: list[Event]) -> None:
        seq = frame.seq
        now = self._now
        if frame.ack:
            if seq > self._ping_seq:
                raise ProtocolError(f"PONG for PING {seq}, which was never sent")
            sent_at = self._pings.get(seq)
            if sent_at is None:
                self._nonproductive()
                return
            for old in [s for s in self._pings if s <= seq]:
                del self._pings[old]
            sample = max(0.0, now - sent_at)
            srtt = self.rtt
            self.rtt = sample if srtt is None else srtt + (sample - srtt) / 8
            events.append(PongReceived(seq=seq, rtt=sample))
            return
        if not self._ping_bucket.take(now):
            raise ProtocolError("PING flood", ErrorCode.ENHANCE_YOUR_CALM)
        if seq <= self._peer_ping_seq:
            raise ProtocolError(f"PING seq {seq} does not increase")
        self._peer_ping_seq = seq
        self._pong = seq

    def _on_open(self, frame: OpenFrame, events: list[Event]) -> None:
        """Spec §9.2 item 3: the acceptor's checks, in order; §9.1 for the id."""
        sid = frame.stream_id
        if self.role == Role.CLIENT and not self._life.authenticated:
            raise ProtocolError("OPEN before authentication succeeded")
        if sid & 1 == self._local_parity:
            raise ProtocolError(f"OPEN with our parity: stream {sid}")
        if sid <= self._highest_remote:
            raise ProtocolError(f"OPEN stream {sid} not above {self._highest_remote}")
        self._highest_remote = sid
        if self._goaway_sent is not None and sid > self._goaway_sent:
            return  # after our GOAWAY: not processed; later frames are late frames
        requests = self._requests_out
        if requests.was_unbound(frame.tunnel_id):
            raise ProtocolError(f"OPEN for tunnel {frame.tunnel_id} after it was unbound")
        local = self.local_settings
        if self._remote_open >= local.max_concurrent_streams:
            raise StreamLimitError(
                f"peer exceeds MAX_CONCURRENT_STREAMS = {local.max_concurrent_streams}"
            )
        if self._remote_pending >= local.max_pending_opens:
            raise StreamLimitError(f"peer exceeds MAX_PENDING_OPENS = {local.max_pending_opens}")
        if self.role == Role.CLIENT and not requests.is_bound(frame.tunnel_id):
            # The relay opens streams only for tunnels it bound (§9.2): nothing to connect to.
            self._nonproductive()
            reason, text = OpenFailReason.UNKNOWN_TUNNEL, f"tunnel {frame.tunnel_id} is not bound"
        elif not self._open_bucket.take(self._now):
            reason, text = OpenFailReason.RESOURCE_SHORTAGE, "too many new streams per second"
        else:
            reason = None
        if reason is not None:
            # Refused at once, without a table entry: its later frames are late frames (§9.6).
            self._stats["opens_refused"] += 1
            self._queue(OpenFailFrame(stream_id=sid, reason=reason, message=text))
            if reason == OpenFailReason.RESOURCE_SHORTAGE:
                self._expect_late_data(sid)  # its early DATA may follow (§9.2 item 2)
            return
        stream = self._new_stream(sid, local=False)
        advance(stream, _I.RECV_OPEN)
        self._remote_open += 1
        self._remote_pending += 1
        self._stats["streams_opened_remote"] += 1
        events.append(
            StreamOpened(
                stream_id=sid, tunnel_id=frame.tunnel_id, origin=frame.origin, target=frame.target
            )
        )

    def _on_open_answer(self, frame: OpenAckFrame | OpenFailFrame, events: list[Event]) -> None:
        sid = frame.stream_id
        fail = frame if isinstance(frame, OpenFailFrame) else None
        name = "OPEN_ACK" if fail is None else "OPEN_FAIL"
        if sid & 1 != self._local_parity:
            raise ProtocolError(f"{name} for stream {sid}, which the peer opened")
        stream = self._streams.get(sid)
        if stream is None:
            self._check_known(sid, name)
            self._nonproductive()  # an answer that crossed our RESET
            return
        state = stream.state
        if advance(stream, _I.RECV_ACK if fail is None else _I.RECV_FAIL) is None:
            raise ProtocolError(f"{name} on stream {sid} in state {state.name}")
        stream.pending_open = False
        self._local_pending -= 1
        if fail is None:
            events.append(StreamAccepted(stream_id=sid))
        else:
            self._forget(stream, discard=True)
            events.append(StreamRejected(stream_id=sid, reason=fail.reason, message=fail.message))

    def _on_reset(self, frame: ResetFrame, events: list[Event]) -> None:
        if not self._reset_bucket.take(self._now):
            raise ProtocolError("RESET flood", ErrorCode.ENHANCE_YOUR_CALM)
        sid = frame.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            self._check_known(sid, "RESET")
            return  # never answer a RESET; late ones are ignored
        if not allows(stream, _I.RECV_RESET):
            raise ProtocolError(f"RESET on stream {sid} before OPEN_ACK/OPEN_FAIL")
        if frame.final_offset != stream.recv.received:
            raise FinalSizeError(
                f"RESET on stream {sid}: final offset {frame.final_offset}, "
                f"received {stream.recv.received}"
            )
        advance(stream, _I.RECV_RESET)
        self._forget(stream, discard=True)
        events.append(
            StreamReset(
                stream_id=sid, error_code=ErrorCode.from_wire(frame.error_code), remote=True
            )
        )

    def _on_goaway(self, frame: GoAwayFrame, events: list[Event]) -> None:
        last = frame.last_stream_id
        previous = self._goaway_received
        if previous is not None and last > previous:
            raise ProtocolError(f"GOAWAY last_stream_id grew from {previous} to {last}")
        self._goaway_received = last
        # Our ids ascend in _local_ids, so the streams above ``last`` are at its end: each id
        # is popped once in the session's life, never scanned again (spec §10.2).
        ids = self._local_ids
        streams = self._streams
        refused: list[_Stream] = []
        while ids and ids[-1] > last:
            self._stats["goaway_stream_checks"] += 1
            stream = streams.get(ids.pop())
            if stream is not None:
                refused.append(stream)
        if previous is not None and not refused:
            self._nonproductive()  # a repeated GOAWAY that refuses nothing: not reported
            if last == previous:
                return
        events.append(
            GoAwayReceived(
                last_stream_id=last,
                error_code=ErrorCode.from_wire(frame.error_code),
                message=frame.message,
            )
        )
        for stream in reversed(refused):
            advance(stream, _I.RECV_GOAWAY)  # never processed by the peer: as if refused
            self._forget(stream, discard=True)
            events.append(
                StreamReset(
                    stream_id=stream.stream_id, error_code=ErrorCode.REFUSED_STREAM, remote=True
                )
            )

    def _on_auth(self, frame: AuthFrame, events: list[Event]) -> None:
        if self.role != Role.SERVER:
            raise ProtocolError("AUTH sent to a client")
        if not self._life.advance(_L.RECV_AUTH):
            if self._life.allows(_L.SEND_CHALLENGE):
                raise ProtocolError("AUTH before CHALLENGE")
            raise ProtocolError("second AUTH")
        self._requests_in.take(frame.req_id, FrameType.AUTH)
        if frame.method not in (AuthMethod.HMAC_SHA256, AuthMethod.HMAC_SHA256_STORED_KEY):
            self._queue(
                ResultFrame(
                    req_id=frame.req_id,
                    status=ResultStatus.UNSUPPORTED_METHOD,
                    message=f"unsupported auth method {frame.method}",
                )
            )
            raise ProtocolError("unsupported auth method", ErrorCode.AUTH_FAILED)
        if len(frame.credential) != 2 * AUTH_NONCE_SIZE:
            self._queue(
                ResultFrame(
                    req_id=frame.req_id,
                    status=ResultStatus.MALFORMED,
                    message="credential must be 64 bytes",
                )
            )
            raise ProtocolError("malformed auth credential", ErrorCode.AUTH_FAILED)
        self._auth_req = frame.req_id
        join = self._join_in
        if join is not None:
            self._join_in = None
            events.append(JoinRequested(req_id=join.req_id, ticket=join.ticket))
        resume = self._resume_in
        if resume is not None:
            if self._reader.buffered:
                raise ProtocolError("bytes after the AUTH of a resume handshake")
            self._resume_hold = self._special_in = True
            events.append(
                ResumeRequested(
                    req_id=resume.req_id, ticket=resume.ticket, received=resume.received
                )
            )
        events.append(
            AuthRequested(req_id=frame.req_id, method=frame.method, credential=frame.credential)
        )

    def _on_bind(self, frame: BindFrame, events: list[Event]) -> None:
        if self.role != Role.SERVER:
            raise ProtocolError("BIND sent to a client")
        self._requests_in.take(frame.req_id, FrameType.BIND)
        options = frame.options
        if options is not None and self.minor < 1:
            raise ProtocolError("BIND options need protocol minor version 1")
        events.append(
            BindRequested(
                req_id=frame.req_id,
                tunnel_id=frame.tunnel_id,
                proto=frame.proto,
                bind=frame.bind,
                options=BindOptions() if options is None else options,
            )
        )

    def _on_unbind(self, frame: UnbindFrame, events: list[Event]) -> None:
        if self.role == Role.SERVER:
            self._requests_in.take(frame.req_id, FrameType.UNBIND)
        else:
            if frame.req_id != 0:
                raise ProtocolError(f"UNBIND notice with request id {frame.req_id}, not 0")
            if not self._requests_out.revoke(frame.tunnel_id):
                self._nonproductive()  # nothing of ours to revoke: ignored (§7.3)
                return
        events.append(
            UnbindReceived(
                req_id=frame.req_id,
                tunnel_id=frame.tunnel_id,
                error_code=ErrorCode.from_wire(frame.error_code),
            )
        )

    def _on_result(self, frame: ResultFrame, events: list[Event]) -> None:
        if self.role != Role.CLIENT:
            raise ProtocolError("RESULT sent to a server")
        ok = frame.status == ResultStatus.OK
        kind, released = self._requests_out.complete(frame.req_id, ok, frame.bound is not None)
        if kind == FrameType.AUTH and not self._life.advance(_L.AUTH_OK if ok else _L.AUTH_REFUSED):
            raise ProtocolError("RESULT for the AUTH before CHALLENGE")
        for raw in released:
            self._control.append(raw)
            self._control_bytes += len(raw)
        status: ResultStatus | int
        try:
            status = ResultStatus(frame.status)
        except ValueError:
            status = frame.status
        events.append(
            ResultReceived(
                req_id=frame.req_id, status=status, message=frame.message, bound=frame.bound
            )
        )

    def _on_challenge(self, frame: ChallengeFrame, events: list[Event]) -> None:
        if self.role != Role.CLIENT:
            raise ProtocolError("CHALLENGE sent to a server")
        if not self._life.advance(_L.RECV_CHALLENGE):
            raise ProtocolError("second CHALLENGE")
        events.append(ChallengeReceived(nonce=frame.nonce))

    # ------------------------------------------------------------------------------------
    # Output

    def _queue(self, frame: Frame) -> None:
        raw = encode_frame(frame)
        self._control.append(raw)
        self._control_bytes += len(raw)

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Everything that may be sent now, as one ``bytes`` (``b""`` if nothing).

        Control frames come first (FIFO), then coalesced PING answers and WINDOW updates,
        then DATA frames chosen by the scheduler until about ``max_bytes``.

        With resumption on, every byte of the stream is recorded in the replay log. After a
        resume, RESUMED (relay) and the replay come first, at most ``max_bytes`` per call;
        while suspended only the frames of a resume handshake go out (spec §10.6).

        Args:
            max_bytes: soft size limit of the batch; None -> ``config.max_batch``.
        """
        if self._special_out:
            return self._special_output(max_bytes)
        log = self._log
        parts: list[bytes | memoryview] = list(self._control)
        used = self._control_bytes
        self._control.clear()
        self._control_bytes = 0
        if not self._life.closed:
            pack = HEADER.pack
            if (
                log is not None
                and (self._pong is not None or self._conn_dirty or self._dirty)
                and self._life.authenticated
            ):
                received = self.received_offset
                if received > self._ack_sent:  # the ACK rule of spec §10.6
                    self._ack_sent = received
                    parts.append(_ACK_HEADER)
                    parts.append(received.to_bytes(8, "big"))
                    used += 24
            if self._pong is not None:
                parts.append(encode_frame(PingFrame(seq=self._pong, ack=True)))
                used += 24
                self._pong = None
            conn = self._conn_recv
            # Invariant: a dirty entry always has a raised offset that the peer has not
            # seen, and a stream leaves _dirty when it stops taking WINDOWs (peer FIN, close).
            if self._conn_dirty:
                self._conn_dirty = False
                self._conn_adv_sent = conn.advertised
                parts.append(pack(8, FrameType.WINDOW, 0, 0, 0))
                parts.append(conn.advertised.to_bytes(8, "big"))
                used += 24
            if self._dirty:
                for sid, stream in self._dirty.items():
                    offset = stream.recv.advertised
                    stream.adv_sent = offset
                    parts.append(pack(8, FrameType.WINDOW, 0, 0, sid))
                    parts.append(offset.to_bytes(8, "big"))
                    used += 24
                self._dirty.clear()
            sched = self._sched
            if sched.new or sched.old or sched.fins:
                room = (self.config.max_batch if max_bytes is None else max_bytes) - used
                conn_send = self._conn_send
                credit = conn_send.limit - conn_send.sent
                if log is not None:
                    credit = min(credit, self._replay_room())
                added, charged, finished = sched.fill(parts, room, credit)
                conn_send.sent += charged
                used += added
                self._stats["data_bytes_sent"] += charged
                for done in finished:
                    stream = cast("_Stream", done)
                    if advance(stream, _I.SEND_FIN) is _S.CLOSED:
                        self._forget(stream, discard=False)
        if not parts:
            return b""
        out = b"".join(parts)
        self._stats["bytes_sent"] += len(out)
        if log is not None:
            log.record(out)
        return out

    def _special_output(self, max_bytes: int | None) -> bytes:
        """Uncounted frames (resume handshake, RESUMED), then the replay, then fresh output."""
        parts: list[bytes | memoryview] = list(self._hs_out)
        self._hs_out.clear()
        if self._detached:  # no stream output without a resumed transport
            out = b"".join(parts)
            self._stats["bytes_sent"] += len(out)
            self._uncounted += len(out)
            return out
        limit = max(1, self.config.max_batch if max_bytes is None else max_bytes)
        used = sum(len(part) for part in parts)
        replay = self._replay
        while replay and used < limit:
            chunk = replay[0]
            room = limit - used
            if len(chunk) > room:
                parts.append(chunk[:room])
                replay[0] = chunk[room:]
                used = limit
            else:
                parts.append(replay.popleft())
                used += len(chunk)
        head = b"".join(parts)
        self._stats["bytes_sent"] += len(head)
        self._uncounted += len(head)
        if replay:
            return head
        self._special_out = False
        return head + self.data_to_send(limit - used)  # the plain batch, counted

    def _replay_room(self) -> int:
        """DATA bytes the local bound on the replay log allows now (``config.max_replay``)."""
        log = self._log
        assert log is not None
        return max(0, self._max_replay - log.size)

    def wants_write(self) -> bool:
        """True if :meth:`data_to_send` would return something now."""
        if self._special_out:
            if self._hs_out or self._replay:
                return True
            if self._detached:
                return False
        if self._control:
            return True
        if self._life.closed:
            return False
        if self._pong is not None:
            return True
        if self._conn_dirty or self._dirty:
            return True
        sched = self._sched
        if not (sched.new or sched.old or sched.fins):
            return False  # no stream has anything queued (the usual answer after input)
        for out in sched.fins:
            if out.fin_queued and not out.pending:
                return True
        conn_available = self._conn_send.limit - self._conn_send.sent
        if self._log is not None:
            conn_available = min(conn_available, self._replay_room())
        # The same test as Scheduler.fill: a stream is blocked while its credit (or the
        # connection's) is below both what it has pending and the scheduler's SWS threshold.
        sws = sched.sws
        for lst in (sched.new, sched.old):
            for out in lst:
                pending = out.pending
                if not pending:
                    continue
                need = pending if pending < sws else sws
                if out.limit - out.sent >= need:
                    return conn_available >= need
        return False

    # ------------------------------------------------------------------------------------
    # Handshake and control requests

    def _check_open_session(self) -> None:
        if self._life.closed:
            raise SessionClosedError("the session is closed")

    def send_challenge(self, nonce: bytes) -> None:
        """Server: queue CHALLENGE with our 32-byte nonce.

        Raises:
            LocalProtocolError: not a server, or sent already.
            ValueError: the nonce is not 32 bytes.
            SessionClosedError: the session is closed.
        """
        self._check_open_session()
        if self.role != Role.SERVER or not self._life.allows(_L.SEND_CHALLENGE):
            raise LocalProtocolError("only a server sends CHALLENGE, once")
        if len(nonce) != AUTH_NONCE_SIZE:
            raise ValueError(f"the nonce must be {AUTH_NONCE_SIZE} bytes")
        self._life.advance(_L.SEND_CHALLENGE)
        self._queue(ChallengeFrame(nonce=bytes(nonce)))

    def _new_request(self, req_id: int, kind: FrameType, tunnel_id: int, frame: Frame) -> None:
        """Queue a client request, or hold it back while 16 are out (spec §7.5)."""
        self._check_open_session()
        if self.role != Role.CLIENT:
            raise LocalProtocolError(f"only a client sends {kind.name} requests")
        if req_id == 0 or self._requests_out.outstanding(req_id):
            raise LocalProtocolError(f"request id {req_id} is 0 or already outstanding")
        if kind == FrameType.AUTH and self._requests_out.auth_sent:
            raise LocalProtocolError("a session sends one AUTH")
        raw = encode_frame(frame)  # validates before any state changes
        for released in self._requests_out.add(req_id, kind, tunnel_id, raw):
            self._control.append(released)
            self._control_bytes += len(released)

    def send_auth(self, req_id: int, method: int, credential: bytes) -> None:
        """Client: queue AUTH (normally right after ChallengeReceived).

        In a resume handshake (spec §10.6) the AUTH follows ``send_resume`` and goes out on the
        new connection, outside the session stream.

        Raises:
            LocalProtocolError: not a client, ``req_id`` is outstanding, or AUTH was sent.
            SessionClosedError: the session is closed.
        """
        frame = AuthFrame(req_id=req_id, method=method, credential=bytes(credential))
        if self._detached:
            self._send_resume_auth(req_id, frame)
            return
        self._new_request(req_id, FrameType.AUTH, 0, frame)

    def send_bind(
        self,
        req_id: int,
        tunnel_id: int,
        bind: Address,
        proto: int = TunnelProto.TCP,
        options: BindOptions | None = None,
    ) -> None:
        """Client: queue BIND for a public listener (may be pipelined after AUTH).

        While 16 requests are unanswered the BIND waits in the session and goes out when a
        RESULT arrives (spec §7.5); the same holds for ``send_auth`` and ``send_unbind``.

        ``options`` (spec §6.12: allow/deny lists, private NAME, VISIT) need the negotiated
        minor version 1, so the relay's HELLO must have arrived: it precedes CHALLENGE, and
        BINDs are sent after AUTH, so a client that binds after ChallengeReceived always
        knows ``minor``. None sends no options field (the OPTIONS flag clear).

        Raises:
            LocalProtocolError: not a client, ``req_id`` is outstanding, or ``options`` are
                given and the peer's HELLO has not arrived or the negotiated minor version is
                below 1.
            ValueError: ``options`` are invalid (nothing is queued).
            SessionClosedError: the session is closed.
        """
        if options is not None and (not self._life.hello_received or self.minor < 1):
            raise LocalProtocolError(
                "BIND options need a peer that speaks protocol minor version 1"
            )
        frame = BindFrame(
            req_id=req_id, tunnel_id=tunnel_id, proto=proto, bind=bind, options=options
        )
        self._new_request(req_id, FrameType.BIND, tunnel_id, frame)

    def send_unbind(
        self, req_id: int, tunnel_id: int, code: ErrorCode = ErrorCode.NO_ERROR
    ) -> None:
        """Client: request UNBIND. Server: notify a revocation (``req_id`` must be 0).

        Raises:
            LocalProtocolError: a client's ``req_id`` is outstanding, or a server's is not 0.
            SessionClosedError: the session is closed.
        """
        frame = UnbindFrame(req_id=req_id, tunnel_id=tunnel_id, error_code=code)
        if self.role == Role.SERVER:
            self._check_open_session()
            if req_id != 0:
                raise LocalProtocolError("a server's UNBIND is a notice with req_id 0")
            self._queue(frame)
        else:
            self._new_request(req_id, FrameType.UNBIND, tunnel_id, frame)

    def send_result(
        self, req_id: int, status: ResultStatus, message: str = "", bound: Address | None = None
    ) -> None:
        """Server: answer a request. The answer to AUTH decides the session's fate.

        The answer to a RESUME (spec §10.6) is a refusal, TICKET_UNKNOWN or RESUME_FAILED
        (success is ``resume`` on the old session), after the AUTH's answer; it ends the pause
        of ``input_paused``.

        An OK answer to the AUTH marks the session authenticated; frames held behind the AUTH
        are processed by the next ``receive_data`` call (``receive_data(b"")`` will do). Any
        other answer to the AUTH also queues ``CLOSE(AUTH_FAILED)`` and closes the session.
        A refused BIND or UNBIND counts as non-productive (spec §12): past that limit the
        session queues ``CLOSE(ENHANCE_YOUR_CALM)`` instead and closes. A no-op once the
        session is closed: a request that arrived just before the peer's CLOSE (or before a
        fault) needs no answer, and the application cannot tell the two orders apart.

        Raises:
            LocalProtocolError: not a server, or ``req_id`` is not an unanswered request.
            ValueError: ``bound`` is missing on the OK answer to a BIND or present on any
                other answer, or a RESUME's answer is not a refusal.
        """
        if self._life.closed:
            return
        kind = self._requests_in.kind(req_id)
        if self.role != Role.SERVER or kind is None:
            raise LocalProtocolError(f"no unanswered request {req_id}")
        if (bound is not None) != (kind == FrameType.BIND and status == ResultStatus.OK):
            raise ValueError("bound goes with exactly the OK answer to a BIND")
        if kind == FrameType.RESUME:
            if req_id == self._join_req:
                self._answer_join(req_id, status, message)
            else:
                self._refuse_resume(req_id, status, message)
            return
        self._requests_in.answer(req_id)
        self._queue(ResultFrame(req_id=req_id, status=status, message=message, bound=bound))
        if req_id == self._auth_req:
            self._auth_req = None
            if status == ResultStatus.OK:
                self._life.advance(_L.AUTH_OK)
            else:
                self.close(ErrorCode.AUTH_FAILED, "authentication failed")
        elif status != ResultStatus.OK and not self._idle_bucket.take(self._now):
            # A refused BIND/UNBIND did nothing: non-productive (spec §12).
            self._control.clear()
            self._control_bytes = 0
            self.close(ErrorCode.ENHANCE_YOUR_CALM, "too many refused requests")

    # ------------------------------------------------------------------------------------
    # Session resumption (spec §10.6)

    def _new_reader(self, *, magic: bool, stop_after: int | None = None) -> FrameReader:
        local = self.local_settings
        return FrameReader(
            max_data_payload=local.max_frame_payload,
            max_control_payload=local.max_control_payload,
            expect_magic=magic,
            stop_after=stop_after,
        )

    def suspend(self) -> None:
        """The transport is gone: keep the session for a resume (spec §10.6).

        OPEN -> SUSPENDED (a client's failed resume handshake: back to SUSPENDED). The partial
        frame in the reader is dropped (it comes again by replay), outstanding PINGs are
        forgotten, a replay in progress stops. Streams, queued output and the replay log stay;
        local calls keep working and their output goes out after the resume.

        Raises:
            LocalProtocolError: resumption is off, the session is not OPEN (or resuming), or a
                GOAWAY was sent or received (a session going away is not resumed).
        """
        if not self._resume_on or not self._life.allows(_L.SUSPEND):
            raise LocalProtocolError(
                f"cannot suspend: resumption is {'on' if self._resume_on else 'off'}, "
                f"session state {self._life.state.name}"
            )
        if self._goaway_sent is not None or self._goaway_received is not None:
            raise LocalProtocolError("cannot suspend: the session is going away (GOAWAY)")
        if not self._detached:
            self._recv_base = self.received_offset
        self._life.advance(_L.SUSPEND)
        self._detached = self._special_in = self._special_out = True
        self._reader = self._new_reader(magic=False)
        self._pings.clear()
        self._hs_out = []
        self._replay.clear()
        self._hs_resume_req = self._hs_auth_req = None
        self._hs_fatal = False

    def can_resume(self, peer_received: int) -> bool:
        """Relay: True if a resume from the peer's offset ``peer_received`` can work now.

        The session is resumable (resumption on, OPEN or SUSPENDED) and the offset lies in
        ``[log start, sent]``. Nothing changes.
        """
        log = self._log
        return (
            log is not None
            and self._resume_on
            and self._life.state in (_LS.OPEN, _LS.SUSPENDED)
            and self._goaway_sent is None
            and self._goaway_received is None
            and log.start <= peer_received <= log.end
        )

    def resume(self, req_id: int, peer_received: int) -> None:
        """Relay: continue this (old) session on a new connection (spec §10.6).

        Call it after RESULT(OK) for the new connection's AUTH went out. Suspends first if the
        old transport was still attached. Queues RESUMED(req_id, received_offset) outside the
        stream, then the replay of our stream from ``peer_received``; the reader starts afresh
        without MAGIC: the client's bytes after its AUTH continue its stream. Then call
        ``send_ticket`` with the rotated ticket.

        Raises:
            ResumeOffsetError: ``peer_received`` is outside ``[log start, sent]`` (nothing
                changed; the session cannot resume: answer RESUME_FAILED and end it).
            LocalProtocolError: not a relay, resumption off, the session is not OPEN or
                SUSPENDED, or it is going away (GOAWAY sent or received).
            ValueError: ``req_id`` is not a request id (1 .. 2^32-1).
        """
        log = self._log
        if (
            self.role != Role.SERVER
            or log is None
            or not self._resume_on
            or self._life.state not in (_LS.OPEN, _LS.SUSPENDED)
            or self._goaway_sent is not None
            or self._goaway_received is not None
        ):
            raise LocalProtocolError(
                f"cannot resume a session in state {self._life.state.name} (or going away)"
            )
        if not 0 < req_id <= _U32_MAX:
            raise ValueError(f"request id {req_id} out of range")
        tail = log.tail(peer_received)  # raises ResumeOffsetError
        if not self._detached:
            self.suspend()
        self._hs_out = [encode_frame(ResumedFrame(req_id=req_id, received=self._recv_base))]
        self._boundary(peer_received, tail)

    def _boundary(self, peer_received: int, tail: list[memoryview]) -> None:
        """The resume boundary: the replay from ``peer_received``, a fresh reader, OPEN."""
        log = self._log
        assert log is not None
        self._replay = deque(tail)
        log.release(peer_received)  # what the peer holds needs no replay
        if peer_received > self._ack_recv:
            self._ack_recv = peer_received
        self._reader = self._new_reader(magic=False)
        self._recv_mark = self._stats["bytes_received"]
        self._life.advance(_L.RESUME)
        self._detached = self._special_in = False
        self._special_out = True

    def send_ticket(self, ticket: bytes, lifetime: int) -> None:
        """Relay: queue TICKET (right after RESULT(OK) for the AUTH, or after ``resume``).

        Raises:
            LocalProtocolError: not a relay, resumption off, or not authenticated.
            ValueError: the ticket is not 32 bytes or the lifetime not a u32.
            SessionClosedError: the session is closed.
        """
        self._check_open_session()
        if self.role != Role.SERVER or not self._resume_on or not self._life.authenticated:
            raise LocalProtocolError("only an authenticated relay with resumption on sends TICKET")
        if len(ticket) != TICKET_SIZE or not 0 <= lifetime <= _U32_MAX:
            raise ValueError(f"a ticket is {TICKET_SIZE} bytes and its lifetime a u32")
        self._queue(TicketFrame(ticket=bytes(ticket), lifetime=lifetime))

    def _answer_join(self, req_id: int, status: ResultStatus, message: str) -> None:
        """Relay: answer a JOIN (spec §10.7); a refusal closes this session."""
        if status not in _JOIN_ANSWERS:
            raise ValueError("a JOIN is answered OK, TICKET_UNKNOWN or LIMIT_REACHED")
        if not self._life.authenticated:
            raise LocalProtocolError("answer the AUTH before the JOIN")
        self._requests_in.answer(req_id)
        self._join_req = None
        self._queue(ResultFrame(req_id=req_id, status=status, message=message))
        if status != ResultStatus.OK:
            self.close(ErrorCode.NO_ERROR, "join refused")

    def send_join(self, req_id: int, ticket: bytes) -> None:
        """Client: ask to join the session of ``ticket`` as one more connection (spec §10.7).

        Sent on a new session after ``ChallengeReceived`` and before ``send_auth``; the relay
        answers with a RESULT (``ResultReceived``) after the AUTH's. Only when the relay's
        HELLO declared MAX_CONNECTIONS >= 2 and resumption is on.

        Raises:
            LocalProtocolError: not a client, not between CHALLENGE and AUTH, the relay takes
                no JOIN, or ``req_id`` is outstanding.
            ValueError: the ticket is not 32 bytes.
        """
        if len(ticket) != TICKET_SIZE:
            raise ValueError(f"a ticket is {TICKET_SIZE} bytes")
        peer = self.peer_settings
        if (
            self.role != Role.CLIENT
            or self._life.state != SessionState.CHALLENGE_RECEIVED
            or self._requests_out.auth_sent
        ):
            raise LocalProtocolError("a JOIN goes between CHALLENGE and AUTH, from a client")
        if not self._resume_on or peer is None or peer.max_connections < 2:
            raise LocalProtocolError("the relay takes no extra connections (MAX_CONNECTIONS)")
        frame = ResumeFrame(req_id=req_id, ticket=bytes(ticket), received=0, join=True)
        self._new_request(req_id, FrameType.RESUME, 0, frame)

    def _refuse_resume(self, req_id: int, status: ResultStatus, message: str) -> None:
        """Relay handshake session: answer a RESUME with a refusal; input flows again."""
        if status not in _RESUME_REFUSALS:
            raise ValueError("a RESUME is refused with TICKET_UNKNOWN or RESUME_FAILED")
        if not self._life.authenticated:
            raise LocalProtocolError("answer the AUTH before the RESUME")
        self._requests_in.answer(req_id)
        self._queue(ResultFrame(req_id=req_id, status=status, message=message))
        self._resume_in = None
        self._resume_hold = self._special_in = False

    def begin_resume(self) -> None:
        """Client: start a resume handshake on a new connection (spec §10.6).

        Queues MAGIC + HELLO (our settings; outside the session stream) and expects the
        relay's MAGIC. Then: ``HelloReceived``, ``ChallengeReceived`` -> ``send_resume`` and
        ``send_auth`` -> ``ResultReceived`` -> ``SessionResumed`` (OPEN again) or
        ``ResumeRefused`` (closed). A failure of the new connection: ``suspend()`` again.

        Raises:
            LocalProtocolError: not a client, or the session is not SUSPENDED.
        """
        if self.role != Role.CLIENT or not self._life.allows(_L.BEGIN_RESUME):
            raise LocalProtocolError(
                f"cannot begin a resume in state {self._life.state.name} ({self.role.name})"
            )
        self._life.advance(_L.BEGIN_RESUME)
        hello = HelloFrame(
            major=PROTOCOL_MAJOR,
            minor=PROTOCOL_MINOR,
            role=self.role,
            flags=0,
            settings=self.local_settings.to_pairs(),
        )
        self._hs_out = [MAGIC, encode_frame(hello)]
        self._reader = self._new_reader(magic=True, stop_after=FrameType.RESUMED)

    def send_resume(self, req_id: int, ticket: bytes) -> None:
        """Client: queue RESUME (after ChallengeReceived, before ``send_auth``).

        Carries ``received_offset``, the offset the relay's replay starts from.

        Raises:
            LocalProtocolError: not in a resume handshake after CHALLENGE, or sent already.
            ValueError: ``req_id`` is not 1 .. 2^32-1, or the ticket is not 32 bytes.
        """
        if not self._life.allows(_L.SEND_RESUME):
            raise LocalProtocolError("RESUME goes right after the CHALLENGE of a resume handshake")
        if not 0 < req_id <= _U32_MAX:
            raise ValueError(f"request id {req_id} out of range")
        frame = ResumeFrame(req_id=req_id, ticket=bytes(ticket), received=self._recv_base)
        raw = encode_frame(frame)  # checks the ticket's size
        self._life.advance(_L.SEND_RESUME)
        self._hs_resume_req = req_id
        self._hs_out.append(raw)

    def _send_resume_auth(self, req_id: int, frame: AuthFrame) -> None:
        if not self._life.allows(_L.SEND_AUTH):
            raise LocalProtocolError("the AUTH of a resume handshake follows send_resume, once")
        if not 0 < req_id <= _U32_MAX or req_id == self._hs_resume_req:
            raise LocalProtocolError(f"request id {req_id} is 0, too large or the RESUME's")
        raw = encode_frame(frame)
        self._life.advance(_L.SEND_AUTH)
        self._hs_auth_req = req_id
        self._hs_out.append(raw)

    def _receive_special(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """receive_data() while suspended, paused behind a RESUME, or in a resume handshake."""
        if not data:
            return []
        if self._life.state is _LS.SUSPENDED:
            raise LocalProtocolError("the session is suspended: it has no transport")
        self._stats["bytes_received"] += len(data)
        if self._resume_hold:
            exc = ProtocolError("bytes after the AUTH of a resume handshake, before the answer")
            self._fail(exc)
            raise exc
        events: list[Event] = []
        reader = self._reader
        try:
            for frame in reader.read_frames(data):
                self._handshake_frame(frame, events)
                if self._life.closed:
                    return events
        except ProtocolError as exc:
            self._handshake_failed(exc)
            raise
        rest = reader.leftover
        if rest:  # the relay's replay and stream behind RESUMED, in the same read
            self._stats["bytes_received"] -= len(rest)
            self._recv_mark -= len(rest)
            events += self.receive_data(rest, now)
        return events

    def _handshake_failed(self, exc: ProtocolError) -> None:
        """A peer fault in a resume handshake: CLOSE(code) on that connection, SUSPENDED again.

        A bad RESUMED, or a fault once the AUTH was refused, ends the session instead.
        """
        if self._hs_fatal or not self._life.allows(_L.SUSPEND):
            self._fail(exc)
            return
        self.suspend()
        if not isinstance(exc, PrefaceError):
            self._hs_out = [encode_frame(CloseFrame(error_code=exc.error_code, message=str(exc)))]

    def _handshake_frame(self, frame: Frame, events: list[Event]) -> None:
        """One frame of the relay's side of a resume handshake (not the session stream)."""
        cls = frame.__class__
        life = self._life
        if life.state is _LS.RESUME_AWAIT_HELLO and cls is not HelloFrame:
            raise ProtocolError("the first frame must be HELLO")
        if cls is HelloFrame:
            self._handshake_hello(cast("HelloFrame", frame), events)
        elif cls is ChallengeFrame:
            if not life.advance(_L.RECV_CHALLENGE):
                raise ProtocolError("second CHALLENGE")
            events.append(ChallengeReceived(nonce=cast("ChallengeFrame", frame).nonce))
        elif cls is ResultFrame:
            self._handshake_result(cast("ResultFrame", frame), events)
        elif cls is ResumedFrame:
            self._handshake_resumed(cast("ResumedFrame", frame), events)
        elif cls is CloseFrame:
            self._on_close(cast("CloseFrame", frame), events)
        elif (
            (cls is PingFrame and not cast("PingFrame", frame).ack)
            or cls in (TicketFrame, GoAwayFrame, ExtensionFrame)
            or (cls is WindowFrame and cast("WindowFrame", frame).stream_id == 0)
        ):
            # The relay's handshake session speaks for itself: nothing of ours. A PING is
            # not answered: after our AUTH we send nothing but the resumed stream.
            self._nonproductive()
        else:
            name = "PONG" if cls is PingFrame else _FRAME_TYPES[cls].name
            raise ProtocolError(f"{name} frame in a resume handshake")

    def _handshake_hello(self, frame: HelloFrame, events: list[Event]) -> None:
        if not self._life.allows(_L.RECV_HELLO):
            raise ProtocolError("second HELLO")
        if frame.major != PROTOCOL_MAJOR:
            raise VersionMismatchError(
                f"peer speaks protocol {frame.major}.{frame.minor}, we speak {PROTOCOL_MAJOR}"
            )
        if frame.role != Role.SERVER:
            raise ProtocolError(f"peer HELLO has role {frame.role}, expected {int(Role.SERVER)}")
        settings = Settings.from_pairs(frame.settings, Settings(max_concurrent_streams=0))
        minor = min(PROTOCOL_MINOR, frame.minor)
        self._life.advance(_L.RECV_HELLO)
        # Informational: the session keeps the settings and minor of its first connection.
        events.append(HelloReceived(settings=settings, minor=minor))
        if minor < 2 or not settings.resume_window:
            events.append(
                ResumeRefused(
                    req_id=0,
                    status=ResultStatus.TICKET_UNKNOWN,
                    message="the relay no longer offers session resumption",
                )
            )
            self.close(ErrorCode.NO_ERROR, "cannot resume: resumption is off")

    def _handshake_result(self, frame: ResultFrame, events: list[Event]) -> None:
        if frame.bound is not None:
            raise ProtocolError("a bound address on the RESULT of an AUTH or RESUME")
        status: ResultStatus | int
        try:
            status = ResultStatus(frame.status)
        except ValueError:
            status = frame.status
        req_id = frame.req_id
        state = self._life.state
        if req_id == self._hs_auth_req and state is _LS.RESUME_AUTH_SENT:
            self._life.advance(_L.AUTH_OK if status == ResultStatus.OK else _L.AUTH_REFUSED)
            events.append(
                ResultReceived(req_id=req_id, status=status, message=frame.message, bound=None)
            )
        elif req_id == self._hs_resume_req and state is _LS.RESUME_AUTHENTICATED:
            if status == ResultStatus.OK:
                raise ProtocolError("RESULT(OK) for a RESUME: success is RESUMED")
            events.append(ResumeRefused(req_id=req_id, status=status, message=frame.message))
            self.close(ErrorCode.NO_ERROR, "resume refused")
        else:
            raise ProtocolError(f"RESULT for request id {req_id}, unexpected in a resume handshake")

    def _handshake_resumed(self, frame: ResumedFrame, events: list[Event]) -> None:
        """RESUMED: the boundary. Anything wrong here ends the session for good."""
        self._hs_fatal = True
        log = self._log
        assert log is not None  # a resume handshake needs resumption on
        if self._life.state is not _LS.RESUME_AUTHENTICATED or frame.req_id != self._hs_resume_req:
            raise ProtocolError(f"RESUMED for request {frame.req_id} out of place")
        received = frame.received
        if not log.start <= received <= log.end:
            raise ProtocolError(
                f"RESUMED offset {received} is outside what we kept [{log.start}, {log.end}]"
            )
        self._boundary(received, log.tail(received))
        self._hs_fatal = False
        events.append(SessionResumed(peer_received=received))

    # ------------------------------------------------------------------------------------
    # Streams

    def _new_stream(self, sid: int, *, local: bool) -> _Stream:
        peer = self.peer_settings
        assert peer is not None  # OPEN is only accepted or sent after the peer's HELLO
        recv = ReceiveWindow(
            self.local_settings.initial_stream_window, self._max_stream_window, self._now
        )
        stream = _Stream(sid, local=local, send_limit=peer.initial_stream_window, recv=recv)
        self._streams[sid] = stream
        return stream

    def _forget(self, stream: _Stream, *, discard: bool) -> None:
        """Drop a stream that just became CLOSED, and settle its accounting."""
        sid = stream.stream_id
        del self._streams[sid]
        self._dirty.pop(sid, None)
        stream.drop_pending()
        if stream.local:
            self._local_open -= 1
            if stream.pending_open:
                self._local_pending -= 1
            ids = self._local_ids
            if len(ids) > 2 * self._local_open + 64:  # drop closed ids: amortized O(1)
                streams = self._streams
                self._local_ids = [s for s in ids if s in streams]
        else:
            self._remote_open -= 1
            if stream.pending_open:
                self._remote_pending -= 1
        stream.pending_open = False
        buffered = stream.recv.buffered
        if buffered:
            if discard:
                self._unconsumed -= buffered
                self._settle()
            else:
                self._drain[sid] = buffered

    def _stream_for(self, sid: int) -> _Stream | None:
        """The live stream ``sid``; None if it is known-closed.

        Raises:
            SessionClosedError: the session is closed.
            LocalProtocolError: ``sid`` was never opened.
        """
        self._check_open_session()
        stream = self._streams.get(sid)
        if stream is None and (
            sid == 0
            or sid
            > (self._highest_local if sid & 1 == self._local_parity else self._highest_remote)
        ):
            raise LocalProtocolError(f"stream {sid} was never opened")
        return stream

    def can_open_stream(self) -> bool:
        """True if we may open one more stream now.

        False before authentication completed, after GOAWAY (either way) or close, and while
        the peer's MAX_CONCURRENT_STREAMS or MAX_PENDING_OPENS would be exceeded.
        """
        peer = self.peer_settings
        return (
            not self._life.closed
            and self._life.authenticated
            and peer is not None
            and self._goaway_received is None
            and self._goaway_sent is None
            and self._local_open < peer.max_concurrent_streams
            and self._local_pending < peer.max_pending_opens
            and self._next_id <= _MAX_STREAM_ID
        )

    def open_stream(self, tunnel_id: int, origin: Address, target: Address) -> int:
        """Queue OPEN for a new stream; DATA may follow at once.

        Returns:
            The new stream id.

        Raises:
            SessionClosedError: the session is closed, or a GOAWAY was sent or received.
            LocalProtocolError: the peer's limits allow no more streams now, or the session is
                not authenticated yet (nothing sent).
        """
        self._check_open_session()
        if self._goaway_received is not None or self._goaway_sent is not None:
            raise SessionClosedError("the session is going away: no new streams")
        if not self.can_open_stream():
            raise LocalProtocolError("the peer's stream limits allow no new stream now")
        sid = self._next_id
        frame = OpenFrame(stream_id=sid, tunnel_id=tunnel_id, origin=origin, target=target)
        raw = encode_frame(frame)  # validates the addresses before any state changes
        self._next_id += 2
        self._highest_local = sid
        self._local_ids.append(sid)
        stream = self._new_stream(sid, local=True)
        advance(stream, _I.SEND_OPEN)
        self._local_open += 1
        self._local_pending += 1
        self._stats["streams_opened_local"] += 1
        self._control.append(raw)
        self._control_bytes += len(raw)
        return sid

    def _answer(self, sid: int, inp: StreamInput) -> _Stream | None:
        stream = self._stream_for(sid)
        if stream is None:
            return None
        state = stream.state
        if advance(stream, inp) is None:
            raise LocalProtocolError(
                f"stream {sid} is not waiting for an answer (state {state.name})"
            )
        stream.pending_open = False
        self._remote_pending -= 1
        return stream

    def accept_stream(self, stream_id: int) -> None:
        """Queue OPEN_ACK for a stream the peer opened. No-op if it is closed already.

        Raises:
            LocalProtocolError: the stream was never opened, or is not awaiting an answer.
            SessionClosedError: the session is closed.
        """
        stream = self._answer(stream_id, _I.SEND_ACK)
        if stream is None:
            return
        self._queue(OpenAckFrame(stream_id=stream_id))
        if stream.recv.advertised > stream.adv_sent and stream.state in SEND_WINDOW_STATES:
            self._dirty[stream_id] = stream

    def reject_stream(self, stream_id: int, reason: OpenFailReason, message: str = "") -> None:
        """Queue OPEN_FAIL for a stream the peer opened; its early data is credited.

        No-op if the stream is closed already.

        Raises:
            LocalProtocolError: the stream was never opened, or is not awaiting an answer.
            SessionClosedError: the session is closed.
        """
        stream = self._answer(stream_id, _I.SEND_FAIL)
        if stream is None:
            return
        self._queue(OpenFailFrame(stream_id=stream_id, reason=reason, message=message))
        self._forget(stream, discard=True)
        self._expect_late_data(stream_id)

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> None:
        """Queue bytes (and optionally FIN) on a stream.

        ``bytes`` and ``memoryview`` data are queued by reference (not copied): the caller must
        not change a viewed buffer afterwards; a ``bytearray`` is copied.

        The core does not bound the queue: the adapter bounds it with :meth:`pending_bytes`.

        Raises:
            LocalProtocolError: the stream is unknown, closed, or finished for sending.
            SessionClosedError: the session is closed.
        """
        stream = self._sending_stream(stream_id)
        chunk: bytes | memoryview
        if isinstance(data, memoryview):
            chunk = data if data.itemsize == 1 and data.ndim == 1 else data.cast("B")
        elif isinstance(data, bytes):
            chunk = data
        else:
            chunk = bytes(data)  # the caller may reuse its bytearray: keep a private copy
        n = len(chunk)
        was_idle = not stream.pending
        if n:
            stream.chunks.append(chunk)
            stream.pending += n
        if end_stream:
            stream.fin_queued = True
        if was_idle and (n or end_stream):
            self._sched.activate(stream)

    def _sending_stream(self, stream_id: int) -> _Stream:
        """The live stream ``stream_id``, open for sending and without a queued FIN.

        Raises:
            LocalProtocolError: the stream is unknown, closed, or finished for sending.
            SessionClosedError: the session is closed.
        """
        stream = self._stream_for(stream_id)
        if stream is None or stream.state not in SEND_DATA_STATES or stream.fin_queued:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        return stream

    def _idle_sending_stream(self, stream_id: int) -> _Stream | None:
        """The stream for a frame sent at once (:meth:`send_data_now`, :meth:`end_stream_now`);
        None if any output is queued (the stream's own included) or the session is in a
        resume. Raises like :meth:`_sending_stream`."""
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or self._life.closed
            or stream.state not in SEND_DATA_STATES
            or stream.fin_queued
        ):
            stream = self._sending_stream(stream_id)  # raises for each of these
        sched = self._sched
        if (
            self._special_out
            or self._control
            or self._pong is not None
            or self._conn_dirty
            or self._dirty
            or sched.new
            or sched.old
            or sched.fins
            or stream.pending
        ):
            return None
        return stream

    def send_data_now(self, stream_id: int, data: bytes | bytearray | memoryview) -> bytes | None:
        """Frame ``data`` on a stream at once when nothing else waits to be sent.

        Returns the bytes to send (one DATA frame: exactly what :meth:`send_data` followed by
        :meth:`data_to_send` would give, counted and recorded alike), or None, queueing
        nothing, if that is not so: other output is queued (control frames, WINDOW, PONG, an
        ACK, data of any stream, this stream's bytes blocked on credit), the session is in a
        resume, ``data`` is empty or more than one frame, or the stream's or the connection's
        credit (or the replay bound) does not cover all of it. Then use :meth:`send_data`.
        Raises like :meth:`send_data`.
        """
        stream = self._idle_sending_stream(stream_id)
        if stream is None:
            return None
        n = len(data)
        conn_send = self._conn_send
        log = self._log
        if (
            not 0 < n <= self._sched.single_max
            or n > stream.limit - stream.sent
            or n > conn_send.limit - conn_send.sent
            or (log is not None and n > self._max_replay - (log.end - log.start))
        ):
            return None
        out = DATA_HEADER.pack(n, stream_id) + data
        stream.sent += n
        conn_send.sent += n
        stats = self._stats
        stats["data_bytes_sent"] += n
        stats["bytes_sent"] += len(out)
        if log is not None:
            log.record(out)
        return out

    def end_stream(self, stream_id: int) -> None:
        """Queue FIN on a stream, after every byte queued before it.

        Raises:
            LocalProtocolError: the stream is unknown, closed, or finished for sending.
            SessionClosedError: the session is closed.
        """
        self.send_data(stream_id, b"", end_stream=True)

    def end_stream_now(self, stream_id: int) -> bytes | None:
        """Frame FIN on a stream at once when nothing else waits to be sent.

        Returns the bytes to send (an empty DATA frame with FIN: exactly what
        :meth:`end_stream` followed by :meth:`data_to_send` would give, counted, recorded and
        with the same state change), or None, queueing nothing, if other output is queued
        (as for :meth:`send_data_now`; the stream's own unsent bytes included) or the session
        is in a resume. Then use :meth:`end_stream`. Raises like :meth:`end_stream`.
        """
        stream = self._idle_sending_stream(stream_id)
        if stream is None:
            return None
        out = HEADER.pack(0, FrameType.DATA, FLAG_FIN, 0, stream_id)
        if advance(stream, _I.SEND_FIN) is _S.CLOSED:
            self._forget(stream, discard=False)
        self._stats["bytes_sent"] += len(out)
        if self._log is not None:
            self._log.record(out)
        return out

    def _reset(self, stream: _Stream, code: ErrorCode) -> None:
        """Abort a live stream; an unanswered peer stream gets OPEN_FAIL(REFUSED) instead."""
        sid = stream.stream_id
        if stream.state in _OPENING_IN:
            # The acceptor's first frame must be an answer, and no byte reached a target.
            frame: Frame = OpenFailFrame(
                stream_id=sid, reason=OpenFailReason.REFUSED, message=f"reset ({code.name})"
            )
            advance(stream, _I.SEND_FAIL)
        else:
            frame = ResetFrame(stream_id=sid, error_code=code, final_offset=stream.sent)
            advance(stream, _I.SEND_RESET)
        self._queue(frame)
        self._forget(stream, discard=True)
        self._expect_late_data(sid)

    def _expect_late_data(self, sid: int) -> None:
        """We closed ``sid``: a few small DATA frames the peer sent meanwhile are expected."""
        expected = self._closed_by_us
        if len(expected) >= MAX_CLOSED_BY_US:
            del expected[next(iter(expected))]
        expected[sid] = LATE_DATA_ALLOWANCE

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort a stream: queue RESET (with the final offset) and drop its unsent data.

        On a peer-opened stream not answered yet, this sends OPEN_FAIL(REFUSED) instead (the
        acceptor's first frame must be an answer). No-op on a closed stream or session.

        Raises:
            LocalProtocolError: the stream was never opened.
        """
        if self._life.closed:
            return
        stream = self._stream_for(stream_id)
        if stream is not None:
            self._reset(stream, code)

    def pending_bytes(self, stream_id: int) -> int:
        """Bytes queued on a stream and not framed yet (0 for an unknown stream)."""
        stream = self._streams.get(stream_id)
        return stream.pending if stream is not None else 0

    def send_room(self, stream_id: int, beyond_credit: int, cap: int, min_room: int) -> int:
        """How many more bytes an adapter may queue on a stream now, by its own bounds.

        ``min(cap, beyond_credit + send_credit) - pending_bytes``, and 0 instead of a room
        below ``min_room`` while bytes are queued; <= 0 means wait. (An unknown stream counts
        as one without credit or queued bytes.)
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return min(cap, beyond_credit)
        conn = self._conn_send
        credit = stream.limit - stream.sent
        conn_credit = conn.limit - conn.sent
        total = beyond_credit + (credit if credit < conn_credit else conn_credit)
        pending = stream.pending
        room = (cap if cap < total else total) - pending
        if pending and room < min_room:
            return 0
        return room

    def send_credit(self, stream_id: int) -> int:
        """Bytes the peer's windows allow on a stream now, beyond what is already framed.

        The smaller of the stream's and the connection's credit (0 for an unknown stream).
        Queued bytes (:meth:`pending_bytes`) use it up once they are framed.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        conn = self._conn_send
        return min(stream.limit - stream.sent, conn.limit - conn.sent)

    def acknowledge(self, stream_id: int, n: int, now: float) -> bool:
        """The application consumed ``n`` bytes of a stream: return them as credit.

        Unknown and reset streams are ignored (their bytes were credited when they closed).

        Returns:
            True if a WINDOW update is queued (for the next :meth:`data_to_send`; while
            suspended, for the one after the resume): the caller's cue to write.

        Raises:
            ValueError: ``n`` exceeds the bytes received and not yet acknowledged.
        """
        if self._life.closed or n == 0:
            return False
        self._now = now
        stream = self._streams.get(stream_id)
        if stream is None:
            remaining = self._drain.get(stream_id)
            if remaining is None:
                return False
            if n > remaining:
                raise ValueError(f"cannot acknowledge {n} bytes: {remaining} are buffered")
            if remaining == n:
                del self._drain[stream_id]
            else:
                self._drain[stream_id] = remaining - n
            self._unconsumed -= n
            self._settle()
            return self._conn_dirty
        state = stream.state
        recv = stream.recv
        if n < 0 or n > recv.received - recv.consumed:  # ``recv.consume(n)``, inline
            raise ValueError(f"cannot acknowledge {n} bytes: {recv.buffered} are buffered")
        recv.consumed += n
        stream.since = now
        self._unconsumed -= n
        # ``maybe_update``'s half-window test first, inline: most acknowledgements stop there.
        if state not in _REMOTE_FINISHED and recv.advertised - recv.consumed <= recv.window // 2:
            before = recv.window
            budget = self.config.window_budget
            if recv.maybe_update(now, self.rtt, budget) and state in SEND_WINDOW_STATES:
                self._dirty[stream_id] = stream
            if recv.window > before:
                if recv.window > self._stream_window_peak:
                    self._stream_window_peak = recv.window
                if self._conn_recv.ensure_window(min_conn_window(recv.window)):
                    self._conn_dirty = True
        self._settle()
        return self._conn_dirty or bool(self._dirty)

    def _budget_in_force(self) -> int:
        """The receive budget, raised to the largest stream window so far (spec §8.5 item 2)."""
        return max(self._receive_budget, self._stream_window_peak)

    def stalled_stream(self, now: float, timeout: float) -> int | None:
        """The stream that the stall policy of spec §8.7 resets now, or None.

        Only while the bytes held unconsumed exceed ``receive_budget`` (so held bytes pin
        connection credit): the live stream whose unconsumed data has waited longest without
        the application consuming any, if that is at least ``timeout`` seconds.
        """
        if self._life.closed or self._unconsumed <= self._budget_in_force():
            return None
        oldest: _Stream | None = None
        for stream in self._streams.values():
            recv = stream.recv
            if recv.received != recv.consumed and (oldest is None or stream.since < oldest.since):
                oldest = stream
        if oldest is None or now - oldest.since < timeout:
            return None
        return oldest.stream_id

    def share_binds(self, first: Session) -> None:
        """Client: this session is an extra connection of ``first``'s session (spec §10.7): it
        takes OPENs for the tunnels bound on ``first`` (and refuses the others)."""
        self._requests_out.share(first._requests_out)

    def tunnel_is_bound(self, tunnel_id: int) -> bool:
        """Client: True while the tunnel has an OK RESULT for its BIND and no UNBIND since.

        The session answers OPENs for any other tunnel itself (OPEN_FAIL(UNKNOWN_TUNNEL)).
        """
        return self._requests_out.is_bound(tunnel_id)

    def stream_is_open(self, stream_id: int) -> bool:
        """True while the stream is in the table (not closed)."""
        return stream_id in self._streams

    # ------------------------------------------------------------------------------------
    # Session

    def ping(self, now: float) -> int | None:
        """Queue PING; the answer yields PongReceived and an RTT sample.

        Returns:
            The PING's seq, or None if 4 PINGs are outstanding already or the session is
            suspended (no PING waits out a lost transport, spec §10.6).

        Raises:
            SessionClosedError: the session is closed.
        """
        self._check_open_session()
        if len(self._pings) >= MAX_OUTSTANDING_PINGS or self._detached:
            return None
        self._now = now
        self._ping_seq += 1
        seq = self._ping_seq
        self._pings[seq] = now
        self._queue(PingFrame(seq=seq, ack=False))
        return seq

    def go_away(
        self,
        code: ErrorCode = ErrorCode.NO_ERROR,
        message: str = "",
        last_stream_id: int | None = None,
    ) -> None:
        """Queue GOAWAY: we open no new streams; peer streams above the id are not processed.

        Args:
            code: why.
            message: diagnostic text.
            last_stream_id: the highest peer stream id we process; None -> the highest seen.
                Use ``2**64 - 1`` for the first phase of a two-phase shutdown. Never raised
                above a previous GOAWAY's value.
        """
        if self._life.closed:
            return
        last = self._highest_remote if last_stream_id is None else last_stream_id
        if self._goaway_sent is not None:
            last = min(last, self._goaway_sent)
        self._goaway_sent = last
        self._queue(GoAwayFrame(last_stream_id=last, error_code=code, message=message))

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Queue CLOSE and close the session at once (no-op if closed already)."""
        if self._life.closed:
            return
        self._shutdown()
        self._queue(CloseFrame(error_code=code, message=message))

    def _shutdown(self) -> None:
        """Mark closed and drop all stream state and non-FIFO output."""
        if self._detached:
            # Held stream output never goes out; unsent handshake frames go before the CLOSE.
            self._control[:] = self._hs_out
            self._control_bytes = sum(len(raw) for raw in self._hs_out)
            self._hs_out = []
            self._detached = self._special_out = False
        self._special_in = self._resume_hold = False
        self._log = None
        self._life.advance(_L.CLOSE)
        for stream in self._streams.values():
            stream.drop_pending()
        self._streams.clear()
        self._local_ids.clear()
        self._closed_by_us.clear()
        self._drain.clear()
        self._unconsumed = 0
        self._dirty.clear()
        self._conn_dirty = False
        self._pong = None
        self._held = []
        self._auth_req = None
        sched = self._sched
        sched.new.clear()
        sched.old.clear()
        sched.fins.clear()

    def _fail(self, exc: ProtocolError) -> None:
        """Close the session for a peer fault: CLOSE(code) queued, except for a wrong preface."""
        if isinstance(exc, PrefaceError):
            self._shutdown()
            self._drop_output()
            return
        if exc.error_code == ErrorCode.ENHANCE_YOUR_CALM:
            self._control.clear()
            self._control_bytes = 0
        self.close(exc.error_code, str(exc))

    def _drop_output(self) -> None:
        self._control.clear()
        self._control_bytes = 0
        self._hs_out.clear()
        self._replay.clear()
        self._special_out = False

    def statistics(self) -> dict[str, int]:
        """A debugging snapshot of counters and windows.

        ``conn_recv_window`` is the connection receive window now; ``stream_recv_window_peak``
        the largest any stream's receive window has grown to; ``conn_recv_budget`` the receive
        budget in force (spec §8.5 item 2); ``rtt_us`` the smoothed RTT in microseconds (-1
        before the first PONG).
        """
        stats = dict(self._stats)
        stats.update(
            streams=len(self._streams),
            local_open=self._local_open,
            local_pending=self._local_pending,
            remote_open=self._remote_open,
            remote_pending=self._remote_pending,
            scheduled=len(self._sched),
            control_queued=self._control_bytes,
            conn_send_available=self._conn_send.limit - self._conn_send.sent,
            conn_recv_window=self._conn_recv.window,
            stream_recv_window_peak=self._stream_window_peak,
            rtt_us=-1 if self.rtt is None else round(self.rtt * 1e6),
            conn_recv_buffered=self._conn_recv.buffered,
            conn_recv_held=self._unconsumed,
            conn_recv_budget=self._budget_in_force(),
            pings_outstanding=len(self._pings),
            closed=int(self._life.closed),
            authenticated=int(self._life.authenticated),
        )
        return stats
