"""The trio adapter: one sans-IO :class:`~muxtunnel.protocol.session.Session` on one transport.

Theory of operation
-------------------
A :class:`MuxConnection` owns a transport stream (:class:`muxtunnel.tlsstream.TLSStream`, or
``trio.SSLStream`` when :data:`FAST_TLS` is off, in production; any ``trio.abc.Stream``
in tests) and a ``Session``. :meth:`MuxConnection.run` runs its tasks in a nursery that the
caller owns (``await nursery.start(conn.run)``):

* the **reader** awaits nothing but ``transport.receive_some``. It feeds the bytes to
  ``session.receive_data`` and dispatches the events with a dict lookup. Dispatch never blocks:
  stream data goes into the stream's chunk deque (bounded by the receive window the session
  advertised), new streams and control events go into unbounded memory channels (bounded by the
  session's pending-open and flood limits). So a slow stream can never stop the reader (protocol-spec §14.1).
* the **writer** is the only caller of ``transport.send_all``. It loops on
  ``session.data_to_send()`` (control frames first, then DATA by deficit round robin, all
  coalesced into one batch) and sleeps on an event when there is nothing to send. A failed or
  cancelled ``send_all`` leaves an unknown frame boundary on the wire, so it ends the
  connection; it is never retried. While the writer sleeps, whoever queues a frame (a stream's
  ``send_all``, the reader's acknowledgements) sends it at once from its own task over
  :meth:`TLSStream.send_nowait <muxtunnel.tlsstream.TLSStream.send_nowait>` (no waiting; what
  the socket does not take is left to the writer), so a quiet connection has no task hop. While
  several streams are open, the writer waits for the socket to drain below trio's
  ``TCP_NOTSENT_LOWAT`` after each big batch, so bulk waits in the session, where the scheduler
  orders it, and not in the kernel ahead of an interactive frame.
* a stream may name a **direct sink** (a splice's local socket): DATA that arrives while the
  stream's reader waits with nothing buffered is written there by the reader itself.
* the **keepalive** task sends a PING after ``idle/4`` of receive silence and declares the peer
  dead after ``idle`` of receive silence; any inbound byte counts as life (protocol-spec §10.1).
* the **RTT sampler** sleeps until a stream sends or receives DATA, then sends a PING unless
  one went out within :data:`RTT_SAMPLE_INTERVAL`, and waits out that interval: while streams
  carry data the RTT estimate (which drives window auto-tuning) stays current, and an idle
  session sends nothing but the keepalive's PINGs (and one PING when the peer's HELLO
  arrives, for an early sample).

The session is private: control frames go out through the connection's ``send_*`` methods,
which queue the frame and wake the writer in one step, and callers read what they need
through read-only properties (``minor``, ``peer_settings``, ``rtt`` ...). Streams talk to the
connection through a few small methods (``send_room``, ``queue_data``, ``queue_fin``,
``acknowledge``, ``reset_stream`` ...) and the connection to its streams through
``deliver_*``, ``wake_sender`` and ``fail``; neither touches the other's fields.

While several streams send, the writer asks for batches of at most :data:`WRITE_BATCH` (64 KiB),
so an interactive frame waits behind at most one such batch plus the kernel's 16 KiB
``TCP_NOTSENT_LOWAT`` (set by trio); a lone bulk stream gets :data:`BULK_WRITE_BATCH`. The
session's DRR quantum is :data:`SCHEDULER_QUANTUM`.

A :class:`MuxStream` is a ``trio.abc.HalfCloseableStream``. The session holds a stream's
unframed bytes until the peer's windows allow them. ``send_all`` hands them over piece by piece
and waits while the stream's *send room* is used up: a stream may have at most
:data:`SEND_LOW_WATER` bytes queued beyond its send credit, and :data:`SEND_HIGH_WATER` in all
(:meth:`MuxStream.send_room`). A blocked stream therefore holds at most 256 KiB in our memory;
a copy loop (``muxtunnel.splice``) asks for the room before it reads its socket, so the rest
waits in the kernel. ``receive_some`` hands out buffered chunks and acknowledges them to the
session (stream credit returns on consumption, spec §8.5); a copy loop may acknowledge only
once the bytes are written (``receive_batch(acknowledge=False)`` + :meth:`MuxStream.acknowledge`).
A small DATA payload is copied out of the large decrypted read it arrived in, so held bytes
never pin more than :data:`PIN_FACTOR` times their size. ``send_eof`` queues FIN behind the
stream's data (protocol-spec §9.4); the peer's RESET raises :class:`MuxStreamResetError` (a
``StreamResetError`` that is also a ``trio.BrokenResourceError``), never a clean EOF (protocol-spec §9.8).

The **timer** task enforces two local bounds (both off when None): ``open_timeout`` (default
:data:`DEFAULT_OPEN_TIMEOUT`, 30 s) resets a stream we opened with RESET(CANCEL) when the peer
has not answered its OPEN in time (spec §9.2 item 6), which frees its pending-open slot; ``stall_timeout`` applies the stall policy of spec
§8.7: while the bytes held unconsumed exceed the session's receive budget, the stream whose
data has waited longest without being consumed is reset with CANCEL once it has waited that
long.

``aclose`` behaves like ``close()`` on a TCP socket: with unread received data it resets the
stream; otherwise it sends FIN, and data that arrives later resets the stream (the peer's
``send_all`` then fails, like EPIPE).

**Resumption** (protocol-spec §10.6). :meth:`MuxConnection.run` runs until the *session*
ends; the reader, writer, keepalive, RTT sampler and timer are the tasks of one transport and
run in a nursery of their own. While the session is :attr:`~MuxConnection.resumable`
(resumption negotiated and a ticket issued or received), a lost transport (read or write error,
EOF without CLOSE, keepalive silence) does not end it: the transport's tasks are cancelled, the
transport is aborted and the session is *suspended* (``Session.suspend``). Streams stay, local
calls keep queueing, and keepalive, open timeout and stall checks do not run. The next
transport arrives through :meth:`~MuxConnection.attach` (relay) or
:meth:`~MuxConnection.resume_over` (client); when the resume window passes first, the session
ends as it would have without resumption, with the reason ``resume window of N s passed``.
The relay's handshake connection of a resume gives its transport away with
:meth:`~MuxConnection.release_transport`: its session pauses its input after the AUTH that
followed a RESUME, so the reader is never inside a TLS receive at that point (a cancelled
receive is safe with :class:`~muxtunnel.tlsstream.TLSStream`, but ``trio.SSLStream`` breaks when
the cancel lands in a write that a read needed), and the writer stops by itself after the write
under way. A task of an earlier transport stops as soon as it sees the transport change.

When the connection ends (CLOSE sent or received, EOF, transport error, idle timeout) every
stream that is not finished fails with :class:`MuxSessionClosedError` and both channels close.
Why a stream failed is :attr:`MuxStream.failure`, a :class:`StreamFailure` (kind, error code,
message, OPEN_FAIL reason).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import operator
import os
from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio

from muxtunnel.errors import (
    AuthError,
    ErrorCode,
    HandshakeError,
    LocalProtocolError,
    MuxtunnelError,
    ProtocolError,
    SessionClosedError,
    StreamResetError,
)
from muxtunnel.logsafe import peer_text
from muxtunnel.policy import StreamInfo
from muxtunnel.protocol.constants import OpenFailReason, ResultStatus, Role, TunnelProto
from muxtunnel.protocol.events import (
    AuthRequested,
    ChallengeReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    ResultReceived,
    ResumeRefused,
    SessionResumed,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    TicketReceived,
    WindowUpdated,
)
from muxtunnel.protocol.replay import ResumeOffsetError
from muxtunnel.protocol.session import Session, SessionConfig
from muxtunnel.tlsstream import TLSStream

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

    from muxtunnel.protocol.frames import Address, BindOptions, Settings

__all__ = [
    "BULK_WRITE_BATCH",
    "DEFAULT_OPEN_TIMEOUT",
    "FAST_TLS",
    "PIN_FACTOR",
    "RECEIVE_SIZE",
    "SCHEDULER_QUANTUM",
    "SEND_CHUNK",
    "SEND_HIGH_WATER",
    "SEND_LOW_WATER",
    "SEND_MIN_ROOM",
    "WRITE_BATCH",
    "FailureKind",
    "MuxConnection",
    "MuxSessionClosedError",
    "MuxStream",
    "MuxStreamResetError",
    "OpenRejectedError",
    "ResumeRefusedError",
    "StreamFailure",
    "make_session",
    "open_mux_connection",
    "wrap_tls",
]

logger = logging.getLogger(__name__)

#: Unframed bytes a stream may queue beyond its send credit: what a stream the peer does not
#: read holds in our memory (1,000 blocked streams: at most 250 MiB; the rest waits in the
#: kernel). Less costs bulk throughput: with 64 KiB a single stream moved 10-20% less, since
#: less is ready to go out the moment credit returns.
SEND_LOW_WATER: Final = 256 * 1024
#: Unframed bytes a stream may queue in all, however much credit it has: enough to keep the
#: writer's batches full.
SEND_HIGH_WATER: Final = 512 * 1024
#: ``send_all`` waits until at least this much room is free (or the queue is empty), so that
#: credit returning in small steps does not turn into many small reads and pieces.
SEND_MIN_ROOM: Final = 64 * 1024
#: Largest piece ``MuxStream.send_all`` hands to the session at once.
SEND_CHUNK: Final = SEND_HIGH_WATER
#: A received DATA payload whose buffer is more than this many times its size is copied out,
#: so bytes held for a slow reader never keep a large decrypted read alive (spec §8.3).
PIN_FACTOR: Final = 4
#: How often (at most) the timer task looks for a stalled stream, in seconds.
STALL_CHECK_INTERVAL: Final = 1.0
#: The relay's connection receive window maximum and receive budget (spec §8.5, §8.6): a
#: session holds at most RELAY_RECEIVE_BUDGET + RELAY_MAX_CONN_WINDOW (96 MiB) unconsumed.
#: 64 MiB covers the initial windows of 256 stalled streams (one tunnel's visitor limit)
#: before anything waits for the stall policy.
RELAY_MAX_CONN_WINDOW: Final = 32 * 1024 * 1024
RELAY_RECEIVE_BUDGET: Final = 64 * 1024 * 1024
#: The client's receive budget: its connection window maximum is the core default, 64 MiB, so
#: a client session holds at most 128 MiB unconsumed.
CLIENT_RECEIVE_BUDGET: Final = 64 * 1024 * 1024
#: ``receive_some`` size for the transport. trio's SSLStream returns at most one TLS record
#: (16 KiB) per call whatever we ask (and allocates ``max_bytes`` for it): 64 KiB is plenty.
RECEIVE_SIZE: Final = 64 * 1024
#: The same with :class:`muxtunnel.tlsstream.TLSStream`, which decrypts every complete record
#: of one socket read into a reused buffer: ask for many records at once.
FAST_TLS_RECEIVE_SIZE: Final = 256 * 1024
#: Use :class:`muxtunnel.tlsstream.TLSStream` (on by default: it moves bulk data with less CPU
#: per byte, see its module docs) instead of ``trio.SSLStream`` for the tunnel's TLS connection.
#: ``MUXTUNNEL_FAST_TLS=0`` in the environment selects trio.SSLStream (A/B runs).
FAST_TLS = os.environ.get("MUXTUNNEL_FAST_TLS", "1") == "1"
#: After a writer batch of at least this many bytes, while more than one stream is open, the
#: writer waits until the transport is writable (below trio's 16 KiB ``TCP_NOTSENT_LOWAT``)
#: before it takes the next batch.
DRAIN_THRESHOLD: Final = 16 * 1024
#: Whether a frame queued while the writer sleeps is sent by the queuing task itself
#: (``MUXTUNNEL_INLINE_FLUSH=0`` turns it off, for A/B measurements).
INLINE_FLUSH = os.environ.get("MUXTUNNEL_INLINE_FLUSH", "1") == "1"
#: Switch for that wait (``MUXTUNNEL_WRITER_DRAIN=0`` turns it off, for A/B measurements).
DRAIN_BEFORE_BATCH = os.environ.get("MUXTUNNEL_WRITER_DRAIN", "1") == "1"
#: Soft size of one writer batch (one ``transport.send_all``) while several streams send.
#: trio TLS was measured at 418 MB/s with 64 KiB writes and 423 MB/s with 256 KiB:
#: larger batches buy little there but make an interactive frame wait longer behind bulk data
#: already handed to TLS (protocol-spec §14).
WRITE_BATCH: Final = 64 * 1024
#: Batch size while at most one stream sends: nobody waits behind it, and with fewer, larger
#: batches the relay spent about a third less CPU per byte (512 MiB put, 2.9-3.2 against
#: 4.4-5.0 ms/MiB with 64 KiB batches and reads).
BULK_WRITE_BATCH: Final = 256 * 1024
#: DRR quantum, which is also the DATA frame size while several streams compete. 64 KiB
#: rather than 16 KiB: every frame costs an event, a buffer entry and a local ``send`` on the
#: receiving side, and with 16 KiB frames 32 bulk streams took twice the CPU per byte of one.
#: Interactive latency does not suffer: a newly active stream goes first in the next batch and
#: a batch is at most WRITE_BATCH.
SCHEDULER_QUANTUM: Final = 64 * 1024
#: While streams carry data (DATA sent or received), a PING goes out at most this often
#: (seconds) so the smoothed RTT that drives window auto-tuning reflects the loaded path
#: (protocol-spec §8.6, §10.1); an idle session sends only the keepalive's PINGs.
RTT_SAMPLE_INTERVAL: Final = 1.0
#: Seconds the peer gets to answer our OPEN before the stream is reset with CANCEL (spec
#: §9.2 item 6): longer than the acceptor's own 10 s connect timeout.
DEFAULT_OPEN_TIMEOUT: Final = 30.0
#: How long a closing connection may take to flush its CLOSE and TLS close_notify.
CLOSE_GRACE: Final = 2.0
#: Request ids of the RESUME and the AUTH of a resume handshake: far above the client's
#: BIND counter, so they never collide with a request of the session being resumed.
RESUME_REQ_ID: Final = 0xFFFF_FFFF
RESUME_AUTH_REQ_ID: Final = 0xFFFF_FFFE


class MuxStreamResetError(StreamResetError, trio.BrokenResourceError):
    """The stream was reset (by the peer, or by the session after a peer stream error)."""


class OpenRejectedError(MuxStreamResetError):
    """The peer refused to open our stream (OPEN_FAIL); no byte reached its target."""

    def __init__(self, message: str, reason: int, detail: str = "") -> None:
        super().__init__(message, ErrorCode.REFUSED_STREAM)
        #: The OPEN_FAIL reason (an ``OpenFailReason`` value).
        self.reason = reason
        #: The OPEN_FAIL message as sent (peer text: log it via ``logsafe.peer_text``).
        self.detail = detail


class MuxSessionClosedError(SessionClosedError, trio.BrokenResourceError):
    """Stream I/O after the session ended (CLOSE, EOF, transport error or idle timeout)."""


class ResumeRefusedError(MuxtunnelError):
    """The relay refused to resume the session (RESULT TICKET_UNKNOWN or RESUME_FAILED).

    The session is ended (CLOSE NO_ERROR on the new connection); start a fresh one.
    """

    def __init__(self, message: str, status: int, detail: str = "") -> None:
        super().__init__(message)
        #: The RESULT status (a ``ResultStatus`` value).
        self.status = status
        #: The relay's message as sent (peer text: log it via ``logsafe.peer_text``).
        self.detail = detail


class FailureKind(enum.Enum):
    """Why a :class:`MuxStream` failed (see :class:`StreamFailure`)."""

    #: RESET from the peer, or a local reset (``MuxStream.reset``, open timeout).
    RESET = "reset"
    #: Reset here by the stall policy: received data not consumed in time (spec §8.7).
    STALLED = "stalled"
    #: The peer refused our OPEN (OPEN_FAIL), or we refused the peer's.
    REJECTED = "rejected"
    #: The connection ended before the stream finished.
    SESSION = "session"


@dataclasses.dataclass(frozen=True, slots=True)
class StreamFailure:
    """Why a stream failed; ``str()`` gives one line: ``KIND CODE: message``."""

    kind: FailureKind
    code: ErrorCode
    message: str = ""
    #: The OPEN_FAIL reason (an ``OpenFailReason`` value) when ``kind`` is REJECTED, else 0.
    reason: int = 0
    #: The OPEN_FAIL message as sent when ``kind`` is REJECTED (peer text if the peer refused).
    detail: str = ""

    def __str__(self) -> str:
        text = f": {self.message}" if self.message else ""
        return f"{self.kind.value} {self.code.name}{text}"

    def error(self, stream_id: int) -> trio.BrokenResourceError:
        """The exception that stream I/O raises for this failure."""
        text = f"stream {stream_id}: {self.message}" if self.message else f"stream {stream_id}"
        if self.kind is FailureKind.REJECTED:
            return OpenRejectedError(text, self.reason, self.detail)
        if self.kind is FailureKind.SESSION:
            return MuxSessionClosedError(text, self.code)
        return MuxStreamResetError(text, self.code)


class _ConflictDetector:
    """Raise ``trio.BusyResourceError`` when two tasks use one side of a stream at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._held = False
        self._message = message

    def check(self) -> None:
        """Raise if a task is inside; for a method that never waits (it need not enter)."""
        if self._held:
            raise trio.BusyResourceError(self._message)

    def __enter__(self) -> None:
        if self._held:  # check(), inline: this runs on every receive and send
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._held = False


def _unpinned(view: memoryview) -> memoryview:
    """``view``, or a copy of it if it is small next to the buffer it keeps alive."""
    base = view.obj
    if isinstance(base, bytes | bytearray) and len(view) * PIN_FACTOR < len(base):
        return memoryview(view.tobytes())
    return view


def _effective_idle(local_ms: int, peer_ms: int | None) -> float | None:
    """Return the idle timeout in seconds: the minimum of the non-zero values, None if off."""
    values = [v for v in (local_ms, peer_ms or 0) if v > 0]
    return min(values) / 1000.0 if values else None


class MuxStream(trio.abc.HalfCloseableStream):
    """One multiplexed stream; a ``trio.abc.HalfCloseableStream``.

    Created by :meth:`MuxConnection.open_stream` (our open) or handed out by
    :meth:`MuxConnection.accept_stream` (the peer's open, which must be answered with
    :meth:`accept` or :meth:`reject`).
    """

    def __init__(
        self,
        conn: MuxConnection,
        stream_id: int,
        info: StreamInfo,
        *,
        incoming: bool,
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        #: Accounting and identity; the policy hook point (see :mod:`muxtunnel.policy`).
        self.info = info
        self.incoming = incoming
        # incoming: not yet accepted/rejected; outgoing: no OPEN_ACK yet.
        self._pending = True
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._unacked = 0  # taken by receive_batch(acknowledge=False), not acknowledged yet
        self._recv_eof = False  # peer FIN received
        self._eof_sent = False  # our FIN queued
        self._closed = False  # aclose()/reset() called
        self._failure: StreamFailure | None = None  # why I/O fails
        self._recv_waiter: trio.Event | None = None
        self._send_waiter: trio.Event | None = None
        self._opened_waiter: trio.Event | None = None
        #: Called once, from the task that fails the stream (reset by the peer or by the
        #: connection's stall policy, session end), so that a task blocked elsewhere (a
        #: splice writing to a local socket that does not read) can give up at once.
        self.on_failure: Callable[[], None] | None = None
        #: Optional direct consumer (a splice's local socket): while the receiving task waits
        #: with nothing buffered, arriving DATA is offered to it first, from the reader, and the
        #: bytes it takes (its return value) are consumed and acknowledged at once: no task
        #: hop. It must not block or raise.
        self.direct_sink: Callable[[bytes | memoryview], int] | None = None
        self._send_conflict = _ConflictDetector("another task is already sending on this stream")
        self._recv_conflict = _ConflictDetector("another task is already receiving on this stream")

    def __repr__(self) -> str:
        return (
            f"<MuxStream {self.stream_id} tunnel={self.info.tunnel_id} origin={self.info.origin}>"
        )

    # -- state helpers -------------------------------------------------------------------

    @property
    def failure(self) -> StreamFailure | None:
        """Why the stream failed (reset, rejection or session end), or None."""
        return self._failure

    @property
    def receive_finished(self) -> bool:
        """True once the peer's FIN has arrived."""
        return self._recv_eof

    @property
    def send_finished(self) -> bool:
        """True once our FIN is queued (``send_eof`` or a clean ``aclose``)."""
        return self._eof_sent

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet (``receive_*``)."""
        return self._buffered

    @property
    def unsent(self) -> int:
        """Bytes given to ``send_all`` that the session still holds (not framed yet)."""
        return self._conn.unsent(self.stream_id)

    @property
    def pending(self) -> bool:
        """True until the open is answered (OPEN_ACK/OPEN_FAIL) or the stream fails."""
        return self._pending

    def _make_error(self) -> trio.BrokenResourceError:
        assert self._failure is not None
        return self._failure.error(self.stream_id)

    def _wake_all(self) -> None:
        for ev in (self._recv_waiter, self._send_waiter, self._opened_waiter):
            if ev is not None:
                ev.set()
        self._recv_waiter = self._send_waiter = self._opened_waiter = None

    def _drop_buffer(self) -> None:
        """Discard unread bytes, acknowledging them so the connection window is not lost (protocol-spec §8.5)."""
        n = self._buffered + self._unacked
        if n:
            self._conn.acknowledge(self.stream_id, n)
            self._buffered = self._unacked = 0
            self._chunks.clear()

    # -- called by the connection (its reader, timer and teardown) ------------------------

    def fail(self, failure: StreamFailure) -> None:
        """Fail the stream (MuxConnection: reset, rejection, session end); wakes every waiter.

        The first failure stands. Unread bytes are dropped (and credited) unless the session
        ended: then what arrived before the end may still be read.
        """
        if self._failure is None:
            self._failure = failure
        if failure.kind is not FailureKind.SESSION:
            self._drop_buffer()
        self._pending = False
        self._wake_all()
        callback, self.on_failure = self.on_failure, None
        if callback is not None:
            callback()

    def _check_send(self) -> None:
        if self._closed or self._eof_sent:
            raise trio.ClosedResourceError("stream is closed for sending")
        if self._failure is not None:
            raise self._make_error()
        if not self._conn.usable:
            raise self._conn.ended_error()

    def deliver_data(self, data: bytes | memoryview, now: float) -> None:
        """Buffer a DATA payload for the reader (MuxConnection's reader; ``now``: trio's
        clock when the bytes arrived)."""
        n = len(data)
        if self._closed or self._failure is not None:
            # Data for a stream the application closed: like TCP, answer with a reset.
            self._conn.acknowledge(self.stream_id, n)
            if self._failure is None:
                self._conn.reset_stream(
                    self, StreamFailure(FailureKind.RESET, ErrorCode.CANCEL, "data after close")
                )
            return
        sink = self.direct_sink
        if sink is not None and self._recv_waiter is not None and not self._chunks:
            taken = sink(data)
            if taken > 0:
                self.info.bytes_in += taken
                self._conn.acknowledge(self.stream_id, taken, now)
                if taken >= n:
                    return
                data = memoryview(data)[taken:]
                n -= taken
        # A small payload is copied rather than keeping the whole decrypted read alive.
        self._chunks.append(_unpinned(data) if isinstance(data, memoryview) else memoryview(data))
        self._buffered += n
        ev = self._recv_waiter
        if ev is not None:
            self._recv_waiter = None
            ev.set()

    def deliver_eof(self) -> None:
        """The peer's FIN arrived (MuxConnection's reader)."""
        self._recv_eof = True
        ev = self._recv_waiter
        if ev is not None:
            self._recv_waiter = None
            ev.set()

    def deliver_accepted(self) -> None:
        """The peer's OPEN_ACK arrived (MuxConnection's reader)."""
        self._pending = False
        ev = self._opened_waiter
        if ev is not None:
            self._opened_waiter = None
            ev.set()

    def wake_sender(self) -> None:
        """The stream may have send room again (MuxConnection's writer)."""
        ev = self._send_waiter
        if ev is not None:
            self._send_waiter = None
            ev.set()

    # -- open handshake ------------------------------------------------------------------

    def accept(self) -> None:
        """Accept a stream the peer opened (queue OPEN_ACK). Idempotent.

        Raises:
            trio.BrokenResourceError: The stream or session already failed.
        """
        if not self.incoming:
            raise RuntimeError("accept() is for streams the peer opened")
        if self._failure is not None:
            raise self._make_error()
        if not self._conn.usable:
            raise self._conn.ended_error()
        if self._pending:
            self._pending = False
            self._conn.accept_open(self.stream_id)

    def reject(self, reason: OpenFailReason, message: str = "") -> None:
        """Refuse a stream the peer opened (queue OPEN_FAIL); the stream is closed after it.

        A no-op for a stream that already failed (reset by the peer, session ended).
        """
        if self.incoming and not self._pending and self._failure is not None:
            return
        if not self.incoming or not self._pending:
            raise RuntimeError("reject() is only for streams the peer opened and not yet accepted")
        self._pending = False
        self._closed = True
        self._drop_buffer()
        if self._failure is None:
            self._failure = StreamFailure(
                FailureKind.REJECTED, ErrorCode.REFUSED_STREAM, message, int(reason), message
            )
            self._conn.reject_open(self, reason, message)
        else:
            self._conn.forget(self)
        self._wake_all()

    async def wait_opened(self) -> None:
        """Wait until the peer acknowledged our open.

        Raises:
            OpenRejectedError: The peer refused the stream.
            trio.BrokenResourceError: The stream or the session failed first.
        """
        while True:
            if self._failure is not None:
                raise self._make_error()
            if not self._pending:
                await trio.lowlevel.checkpoint()
                return
            ev = self._opened_waiter = trio.Event()
            await ev.wait()

    # -- trio.abc.SendStream -------------------------------------------------------------

    @property
    def send_blocked(self) -> bool:
        """True if :meth:`send_room` would wait (the peer has not made room for more)."""
        conn = self._conn
        return self._failure is None and conn.usable and conn.send_room(self.stream_id) <= 0

    async def _wait_writable(self) -> tuple[int, bool]:
        """Wait until the stream has send room; return (room, whether it had to wait)."""
        waited = False
        while True:
            self._check_send()
            room = self._conn.send_room(self.stream_id)
            if room > 0:
                return room, waited
            ev = self._send_waiter = trio.Event()
            self._conn.watch_send_room(self)
            await ev.wait()
            waited = True

    async def send_room(self) -> int:
        """Wait until ``send_all`` can take bytes without waiting; return how many (> 0).

        A copy loop reads at most this much before its next ``send_all``, so that a stream
        whose peer does not read holds at most :data:`SEND_LOW_WATER` bytes in our memory.

        Raises:
            The same as :meth:`send_all`.
        """
        with self._send_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            room, waited = await self._wait_writable()
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return room

    @property
    def send_room_now(self) -> int:
        """What :meth:`send_room` would return without waiting; 0 if it would wait."""
        if self._failure is not None or self._closed or self._eof_sent:
            return 0
        return max(0, self._conn.send_room(self.stream_id))

    def send_nowait(self, data: bytes) -> int:
        """Queue as much of ``data`` as the send room takes now; return how many bytes.

        No schedule point (a copy loop that waits elsewhere on every round uses it to hand
        over what it just read). Raises like :meth:`send_all` does without waiting.
        """
        self._send_conflict.check()  # a send_all of another task may be waiting
        self._check_send()
        conn = self._conn
        accepted = not (self.incoming and self._pending)
        if accepted and conn.send_now(self.stream_id, data):
            # Framed and sent whole: within the send room (the stream had nothing queued and
            # the credit covered it), so the room need not be asked first.
            n = len(data)
            self.info.bytes_out += n
            return n
        n = min(len(data), conn.send_room(self.stream_id))
        if n <= 0:
            return 0
        if not accepted:
            self.accept()
        conn.queue_data(self.stream_id, data if n == len(data) else data[:n], try_now=accepted)
        self.info.bytes_out += n
        return n

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on the stream; waits while too much of it is still unsent.

        Raises:
            trio.ClosedResourceError: ``aclose``/``send_eof``/``reset`` was called.
            MuxStreamResetError: The stream was reset (a ``trio.BrokenResourceError``).
            MuxSessionClosedError: The session ended (a ``trio.BrokenResourceError``).
            trio.BusyResourceError: Another task is sending on this stream.
        """
        with self._send_conflict:
            # trio's idiom: a cancellation check first, exactly one schedule point in all.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            if isinstance(data, bytes):
                view = memoryview(data)
            elif isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes):
                view = data.cast("B") if data.format != "B" else data
            else:
                # The caller may reuse a mutable buffer once we return: copy it.
                view = memoryview(bytes(data))
            total = len(view)
            offset = 0
            waited = False
            conn = self._conn
            while offset < total:
                room, did_wait = await self._wait_writable()
                waited |= did_wait
                n = min(total - offset, room)
                if self.incoming and self._pending:
                    self.accept()
                conn.queue_data(self.stream_id, view[offset : offset + n])
                offset += n
                self.info.bytes_out += n
            if not waited:
                # After queueing: the writer gets to run before this task goes on.
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until ``send_all`` would not have to wait for buffer space.

        Raises:
            trio.ClosedResourceError: The stream is closed for sending.
            trio.BrokenResourceError: The stream or session failed.
        """
        with self._send_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            if not (await self._wait_writable())[1]:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_eof(self) -> None:
        """Finish our direction (FIN after all queued data); idempotent.

        Raises:
            trio.ClosedResourceError: The stream was closed with ``aclose``/``reset``.
            trio.BrokenResourceError: The stream or session failed before FIN was queued.
        """
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
            await trio.lowlevel.checkpoint()
            self._queue_eof()

    def send_eof_nowait(self) -> None:
        """:meth:`send_eof` without its schedule point (for a copy loop that ends here, after
        waiting elsewhere); raises like it, and ``trio.BusyResourceError`` while a send waits."""
        self._send_conflict.check()
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        self._queue_eof()

    def _queue_eof(self) -> None:
        if self._eof_sent:
            return
        if self._failure is not None:
            raise self._make_error()
        if not self._conn.usable:
            raise self._conn.ended_error()
        if self.incoming and self._pending:
            self.accept()
        self._eof_sent = True
        self._conn.queue_fin(self)

    # -- trio.abc.ReceiveStream ----------------------------------------------------------

    async def receive_chunk(self, max_bytes: int) -> bytes | memoryview:
        """Like :meth:`receive_some` but may return a read-only memoryview (no copy).

        Raises:
            The same as :meth:`receive_some`.
        """
        return await self._receive(max_bytes, batch=False)

    async def receive_batch(
        self, max_bytes: int, *, acknowledge: bool = True
    ) -> bytes | memoryview:
        """Like :meth:`receive_chunk`, but joins several buffered chunks (up to ``max_bytes``).

        For a copy loop: one local ``send`` and one wake-up for many DATA frames. With
        ``acknowledge=False`` the bytes still count against the stream's window until
        :meth:`acknowledge` is called for them (after they were written on), so what the copy
        loop holds is flow controlled too and a stalled writer shows as a stalled stream.

        Raises:
            The same as :meth:`receive_some`.
        """
        return await self._receive(max_bytes, batch=True, ack=acknowledge)

    def acknowledge(self, n: int) -> None:
        """Return credit for ``n`` bytes taken with ``receive_batch(acknowledge=False)``.

        Bytes of a stream that was reset or closed meanwhile were credited already: ignored.
        """
        n = min(n, self._unacked)
        if n > 0:
            self._unacked -= n
            self._conn.acknowledge(self.stream_id, n)

    async def _receive(
        self, max_bytes: int, *, batch: bool, ack: bool = True
    ) -> bytes | memoryview:
        with self._recv_conflict:
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
            # One schedule point per call (trio's idiom), not one plus the wait.
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream is closed")
                if not yielded and (self._chunks or self._recv_eof or self._failure is not None):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    yielded = True
                    continue  # look again: another task may have closed the stream
                if self._chunks:
                    if batch and len(self._chunks) > 1:
                        return self._take_many(max_bytes, ack)
                    return self._take(max_bytes, ack)
                if self._recv_eof:
                    return b""
                if self._failure is not None:
                    raise self._make_error()
                ev = self._recv_waiter = trio.Event()
                await ev.wait()
                yielded = True

    def _taken(self, n: int, ack: bool) -> None:
        self._buffered -= n
        self.info.bytes_in += n
        if ack:
            self._conn.acknowledge(self.stream_id, n)
        else:
            self._unacked += n

    def _take_many(self, limit: int, ack: bool) -> bytes | memoryview:
        chunks = self._chunks
        if len(chunks[0]) >= limit:
            return self._take(limit, ack)
        parts: list[memoryview] = []
        n = 0
        while chunks and n < limit:
            chunk = chunks[0]
            room = limit - n
            if len(chunk) <= room:
                chunks.popleft()
            else:
                chunks[0] = _unpinned(chunk[room:])
                chunk = chunk[:room]
            parts.append(chunk)
            n += len(chunk)
        self._taken(n, ack)
        return b"".join(parts)

    def _take(self, limit: int, ack: bool) -> memoryview:
        chunk = self._chunks[0]
        if len(chunk) <= limit:
            self._chunks.popleft()
            out = chunk
        else:
            out = chunk[:limit]
            self._chunks[0] = _unpinned(chunk[limit:])
        self._taken(len(out), ack)
        return out

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return the next buffered bytes (at most ``max_bytes``); b"" after the peer's FIN.

        Raises:
            trio.ClosedResourceError: The stream was closed locally.
            MuxStreamResetError: The stream was reset (peer RESET, or OPEN_FAIL:
                :class:`OpenRejectedError`); both are ``trio.BrokenResourceError``.
            MuxSessionClosedError: The session ended before the peer's FIN.
            trio.BusyResourceError: Another task is receiving on this stream.
        """
        limit = 1 << 30 if max_bytes is None else operator.index(max_bytes)
        chunk = await self.receive_chunk(limit)
        if isinstance(chunk, memoryview):
            obj = chunk.obj
            if isinstance(obj, bytes) and len(obj) == len(chunk):
                return obj
            return bytes(chunk)
        return chunk

    # -- closing -------------------------------------------------------------------------

    def reset(self, code: ErrorCode = ErrorCode.CANCEL, message: str = "") -> None:
        """Abort the stream (RESET to the peer); further local I/O raises ClosedResourceError."""
        self.reset_with(StreamFailure(FailureKind.RESET, code, message or "reset locally"))

    def reset_with(self, failure: StreamFailure) -> None:
        """Abort the stream for ``failure`` (RESET with its code); like :meth:`reset`."""
        self._closed = True
        if self._failure is None:
            self._conn.reset_stream(self, failure)
        self._drop_buffer()
        self._wake_all()

    async def aclose(self) -> None:
        """Close the stream like a TCP socket's ``close()``.

        Unread received data (or a stream never accepted) gives a RESET; otherwise FIN is sent
        (after queued data) and any data that still arrives resets the stream.
        """
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """:meth:`aclose` without its schedule point; idempotent."""
        if not self._closed:
            self._close_now()

    def _close_now(self) -> None:
        self._closed = True
        conn = self._conn
        if self._failure is None and conn.usable:
            if self.incoming and self._pending:
                self.reject(OpenFailReason.REFUSED, "closed before accept")
                return
            if self._chunks:
                conn.reset_stream(
                    self,
                    StreamFailure(FailureKind.RESET, ErrorCode.CANCEL, "closed with unread data"),
                )
            elif not self._eof_sent:
                self._eof_sent = True
                conn.queue_fin(self)
            else:
                conn.forget_if_finished(self)
        else:
            conn.forget(self)
        self._drop_buffer()
        self._wake_all()


class MuxConnection:
    """One session: reader, writer and keepalive tasks on its transport (see module docs).

    With resumption on, the session outlives its transport (suspend, :meth:`attach`,
    :meth:`resume_over`; module docs, "Resumption").

    Args:
        transport: The byte stream the session runs over (normally a ``trio.SSLStream``).
        session: A fresh ``Session`` (its MAGIC and HELLO are already queued).
        name: Used in log lines (e.g. the peer address).
        token_id: Stored in every stream's :class:`StreamInfo`.
        open_timeout: Seconds the peer gets to answer our OPEN before the stream is reset
            with CANCEL (spec §9.2 item 6; default :data:`DEFAULT_OPEN_TIMEOUT`); None: no
            bound.
        stall_timeout: Seconds a stream's received data may wait unconsumed, while the
            receive budget is exceeded, before the stream is reset with CANCEL (spec §8.7);
            None: never.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        session: Session,
        *,
        name: str = "",
        token_id: str | None = None,
        receive_size: int | None = None,
        open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
        stall_timeout: float | None = None,
    ) -> None:
        self.transport = transport
        #: The transport when it can send without waiting (``_flush_or_wake``), else None.
        self._fast_transport = (
            transport if INLINE_FLUSH and isinstance(transport, TLSStream) else None
        )
        #: See the class docstring.
        self.open_timeout = open_timeout
        self.stall_timeout = stall_timeout
        #: (deadline, stream id) of our OPENs, in order (one timeout: deadlines ascend).
        self._open_deadlines: deque[tuple[float, int]] = deque()
        self._timer_waiter: trio.Event | None = None
        #: Streams reset by the open timeout and by the stall policy.
        self.open_timeouts = 0
        self.stall_resets = 0
        #: Bytes asked of the transport per read.
        self.receive_size = receive_size or _receive_size_for(transport)
        self._fixed_receive_size = receive_size is not None
        self._session = session
        self.name = name
        self.token_id = token_id
        self._streams: dict[int, MuxStream] = {}
        self._blocked: set[MuxStream] = set()
        #: Streams that queued data since the writer's last batch (sizes the next batch).
        self._senders: set[int] = set()
        self._writer_waiter: trio.Event | None = None
        self._slot_waiter: trio.Event | None = None
        self._rx_waiter: trio.Event | None = None
        self._keepalive_waiter: trio.Event | None = None
        #: Set (by the first DATA sent or received) while the RTT sampler waits for traffic.
        self._activity_waiter: trio.Event | None = None
        self._control_send, self._control_recv = trio.open_memory_channel[Event](math.inf)
        self._incoming_send, self._incoming_recv = trio.open_memory_channel[MuxStream](math.inf)
        self._closing = trio.Event()  # teardown started
        self._closed = trio.Event()  # run() finished
        self._dead: str | None = None  # transport unusable: do not write
        # -- session resumption (protocol-spec §10.6); see "Resumption" in the module docs --
        #: Why the current transport was let go while the session goes on (lost, replaced,
        #: handed over), else None.
        self._lost: str | None = None
        #: Counts transports: a task of an earlier transport stops when it sees it changed.
        self._generation = 0
        #: The cancel scope and nursery of the current transport's tasks.
        self._transport_scope: trio.CancelScope | None = None
        self._transport_nursery: trio.Nursery | None = None
        self._writer_done = trio.Event()
        #: Set when a new transport is handed to the suspended session (attach, resume_over).
        self._transport_ready = trio.Event()
        #: attach(): (transport, req_id, peer_received) to resume on; resume_over(): transport.
        self._pending_attach: tuple[trio.abc.Stream, int, int] | None = None
        self._pending_resume: trio.abc.Stream | None = None
        #: TICKETs sent between attach() and the RESUMED it queues (sent right after it).
        self._deferred_tickets: list[tuple[bytes, int]] = []
        self._released = False  # release_transport(): the transport belongs to someone else
        self._input_held = False  # the session paused its input: the reader waits
        self._reader_waiter: trio.Event | None = None
        self._resuming = False  # client: resume handshake under way on a new transport
        #: resume_over() waits on this for the handshake's events (instead of the control channel).
        self._resume_events: trio.MemorySendChannel[Event | None] | None = None
        self._control_out: trio.MemorySendChannel[Event] | trio.MemorySendChannel[Event | None]
        self._control_out = self._control_send
        self._suspended_event = trio.Event()
        self._suspended = False  # from a transport loss until resumed (or the end)
        self._suspended_at = 0.0
        self._window_scope = trio.CancelScope()
        #: Transports handed over but never used (aborted when run() ends).
        self._orphans: list[trio.abc.Stream] = []
        self._goaway_sent = False
        #: The newest ticket: relay, the one we issued; client, the one we received.
        self.ticket: bytes | None = None
        #: Another connection of the same session (protocol-spec.md §10.7) whose open waiters
        #: are woken with ours: a session shares its pending-open slots over its connections.
        self.open_change_peer: MuxConnection | None = None
        #: Client: the transport is a stream of another connection of the session (§10.7).
        self.carried = False
        #: Times the session lost its transport and was kept, and times it was resumed.
        self.suspensions = 0
        self.resumes = 0
        #: ``trio.current_time()`` when the resume window of the current suspension ends.
        self.resume_deadline: float | None = None
        #: Called (no arguments) when the session is suspended and when it is resumed.
        self.on_suspend: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None
        #: Why the connection ended (set once it ends).
        self.close_reason: str | None = None
        #: The error code of the CLOSE we sent or received, if any.
        self.close_code: ErrorCode | None = None
        #: The peer's GOAWAY, once received.
        self.goaway: GoAwayReceived | None = None
        self._last_receive = trio.current_time()
        #: trio's clock when the reader's current input arrived (for the events it dispatches).
        self._now_in = self._last_receive
        self._last_ping = -math.inf
        self.bytes_received = 0
        self.bytes_sent = 0
        #: PINGs sent (keepalive, RTT samples, probes).
        self.pings_sent = 0
        #: Called with each RTT sample (seconds) when a PONG arrives (e.g. a histogram).
        self.on_rtt: Callable[[float], None] | None = None
        #: Called each time the stall policy resets a stream (spec §8.7; e.g. a counter).
        self.on_stall: Callable[[], None] | None = None
        local = session.local_settings
        self._local_idle_ms = local.idle_timeout_ms
        self._peer_idle_ms: int | None = None
        self._handlers: dict[type[object], Callable[[object], None]] = {
            DataReceived: self._on_data,  # type: ignore[dict-item]
            WindowUpdated: self._on_window,  # type: ignore[dict-item]
            StreamEnded: self._on_end,  # type: ignore[dict-item]
            StreamReset: self._on_reset,  # type: ignore[dict-item]
            StreamOpened: self._on_opened,  # type: ignore[dict-item]
            StreamAccepted: self._on_accepted,  # type: ignore[dict-item]
            StreamRejected: self._on_rejected,  # type: ignore[dict-item]
            HelloReceived: self._on_hello,  # type: ignore[dict-item]
            PongReceived: self._on_pong,  # type: ignore[dict-item]
            GoAwayReceived: self._on_goaway,  # type: ignore[dict-item]
            ConnectionClosed: self._on_connection_closed,  # type: ignore[dict-item]
            AuthRequested: self._on_auth_requested,  # type: ignore[dict-item]
            TicketReceived: self._on_ticket,  # type: ignore[dict-item]
            SessionResumed: self._on_session_resumed,  # type: ignore[dict-item]
            ResumeRefused: self._on_resume_refused,  # type: ignore[dict-item]
        }

    # -- public API ----------------------------------------------------------------------

    @property
    def minor(self) -> int:
        """The negotiated protocol minor version (valid once the peer's HELLO arrived)."""
        return self._session.minor

    @property
    def local_settings(self) -> Settings:
        """The receive limits we declared in our HELLO."""
        return self._session.local_settings

    @property
    def peer_settings(self) -> Settings | None:
        """The peer's HELLO settings (our send limits); None until it arrived."""
        return self._session.peer_settings

    @property
    def rtt(self) -> float | None:
        """The smoothed round-trip time in seconds; None before the first RTT sample."""
        return self._session.rtt

    @property
    def authenticated(self) -> bool:
        """Relay: RESULT(OK) sent for the AUTH. Client: RESULT(OK) received for ours."""
        return self._session.authenticated

    @property
    def closed(self) -> bool:
        """True once the connection is ending or has ended."""
        return self._closing.is_set()

    @property
    def idle_timeout(self) -> float | None:
        """The effective idle timeout in seconds (None: off)."""
        return _effective_idle(self._local_idle_ms, self._peer_idle_ms)

    @property
    def last_receive(self) -> float:
        """``trio.current_time()`` when bytes last arrived."""
        return self._last_receive

    # -- session resumption (protocol-spec §10.6) ------------------------------------------

    @property
    def resume_window(self) -> float:
        """Seconds a lost session is kept for resumption (0.0: resumption is off)."""
        return float(self._session.resume_window)

    @property
    def resumable(self) -> bool:
        """True if a lost transport suspends the session instead of ending it.

        Resumption is on for the session and a ticket exists (relay: issued with
        :meth:`send_ticket`; client: received).
        """
        return self.ticket is not None and self._session.resume_enabled

    @property
    def suspended(self) -> bool:
        """True from a transport loss (resumption on) until the session is resumed or ends."""
        return self._suspended and not self._closing.is_set()

    @property
    def lost_reason(self) -> str | None:
        """While suspended: why the transport was lost, as one readable phrase; else None."""
        return self._lost if self._suspended else None

    async def wait_suspended(self) -> None:
        """Wait until the session is suspended or the connection has ended (at once if so)."""
        while not self._suspended and not self._closing.is_set():
            await self._suspended_event.wait()
        await trio.lowlevel.checkpoint()

    @property
    def sent_offset(self) -> int:
        """Bytes of our session byte stream written so far (protocol-spec §10.6)."""
        return int(self._session.sent_offset)

    @property
    def received_offset(self) -> int:
        """Bytes of the peer's session byte stream received in complete frames."""
        return int(self._session.received_offset)

    @property
    def replay_size(self) -> int:
        """Bytes held in the replay log (sent, not yet acknowledged by the peer)."""
        return int(self._session.replay_size)

    def can_resume(self, peer_received: int) -> bool:
        """Relay: True if the log can continue the session from the client's ``peer_received``."""
        return bool(self._session.can_resume(peer_received))

    def send_ticket(self, ticket: bytes, lifetime: int) -> None:
        """Relay: send TICKET (new session: right after RESULT(OK); after :meth:`attach`).

        A ticket sent right after :meth:`attach` goes out after RESUMED and the replay.
        """
        self.ticket = ticket
        if self._pending_attach is not None:
            self._deferred_tickets.append((ticket, lifetime))
            return
        self._session.send_ticket(ticket, lifetime)
        self._queued()

    def attach(self, transport: trio.abc.Stream, *, req_id: int, peer_received: int) -> None:
        """Relay: continue the session on ``transport`` (a resumed client's new connection).

        Queues RESUMED(``req_id``) and the replay from the client's ``peer_received``. A
        transport still attached is let go first: its tasks are cancelled and it is aborted
        (no frame is written on it). From here the connection owns ``transport`` (if this
        raises, it stays the caller's).

        Raises:
            ResumeOffsetError: ``peer_received`` is outside what the log holds; the session
                is ended (the caller answers RESULT RESUME_FAILED).
            MuxSessionClosedError: The session has ended.
            RuntimeError: Resumption is not on for this session.
        """
        if self._closing.is_set() or self._released:
            raise self.ended_error()
        if not self.resumable:
            raise RuntimeError(f"{self.name}: this session cannot be resumed")
        if not self.can_resume(peer_received):
            reason = (
                f"resume failed: the client has received {peer_received} bytes, outside "
                f"what the replay log holds (up to {self.sent_offset})"
            )
            if self._lost is None:
                self._lose_transport(reason)
            self._begin_close(reason, ErrorCode.PROTOCOL_ERROR)
            raise ResumeOffsetError(reason)
        if self._pending_attach is not None:
            # A newer connection wins; the older one is aborted with the suspension.
            self._orphans.append(self._pending_attach[0])
        self._pending_attach = (transport, req_id, peer_received)
        if self._lost is None:
            self._lose_transport("replaced by a resumed connection")
        self._transport_ready.set()

    async def release_transport(self) -> trio.abc.Stream:
        """Relay: stop this connection's tasks and hand its transport over, unclosed.

        For the handshake connection of a resume: the session paused its input after the
        AUTH that followed a RESUME (the reader waits; a TLS receive is never cancelled).
        Frames already queued (the RESULT for the AUTH) are written first. The connection then
        ends (:meth:`run` returns) without writing or closing anything.

        Raises:
            RuntimeError: The session's input is not paused.
            trio.BrokenResourceError: Writing the queued frames failed.
        """
        if self._lost is not None or self._closing.is_set():
            raise self.ended_error()
        if not self._input_held:
            raise RuntimeError(f"{self.name}: release_transport() needs the input paused")
        transport = self.transport
        self._released = True
        self.close_reason = "transport handed over to a resumed session"
        # Not _lose_transport(): a cancelled send would break the TLS stream. The writer
        # finishes what it is writing and stops by itself; then the other tasks are cancelled
        # (the reader waits on an event, not in a receive).
        self._lost = self._dead = self.close_reason
        self._generation += 1
        self._fast_transport = None
        self._wake_writer()
        try:
            await self._writer_done.wait()
            out = self._session.data_to_send(1 << 30)
            if out or (isinstance(transport, TLSStream) and transport.backlog):
                await transport.send_all(out)
                self.bytes_sent += len(out)
            await self._closed.wait()
        except BaseException:
            # Cancelled or the write failed: nobody takes the transport; abort it.
            self._transport_scope_cancel()
            await trio.aclose_forcefully(transport)
            raise
        return transport

    async def resume_over(
        self,
        transport: trio.abc.Stream,
        authenticate: Callable[[bytes, int], tuple[int, bytes]],
    ) -> None:
        """Client: resume the suspended session over ``transport`` (new, connected, TLS).

        Runs the resume handshake (protocol-spec §10.6.4): MAGIC + HELLO, then on CHALLENGE
        RESUME + AUTH (``authenticate(server_nonce, minor)`` returns the AUTH method and
        credential), then waits for RESUMED; the replay follows. A transport still attached is
        let go first. The connection owns ``transport`` from the call on (aborted on failure).
        Bound the wait with the caller's own cancel scope.

        Raises:
            ResumeRefusedError: The relay refused (ticket unknown, offsets): the session ended.
            AuthError: The relay refused the token: the session ended.
            HandshakeError: The new connection failed, or the relay broke the protocol on it:
                still suspended.
            MuxSessionClosedError: The session ended (window passed, closed locally, or the
                relay sent CLOSE on the new connection before its answer).
            RuntimeError: Resumption is not on for this session, or a resume is under way.
        """
        if self._session.role != Role.CLIENT:
            raise RuntimeError("resume_over() is for the client")
        try:
            if self._closing.is_set():
                raise self.ended_error()
            if not self.resumable:
                raise RuntimeError(f"{self.name}: this session cannot be resumed")
            if self._resume_events is not None:
                raise RuntimeError(f"{self.name}: a resume is already under way")
            if self._lost is None and not self._suspended:
                self._lose_transport("replaced by a new connection")
            await self.wait_suspended()
            if self._closing.is_set():
                raise self.ended_error()
        except BaseException:
            await trio.aclose_forcefully(transport)
            raise
        send, receive = trio.open_memory_channel[Event | None](math.inf)
        self._resume_events = send
        self._control_out = send
        self._pending_resume = transport
        self._transport_ready.set()
        done = False
        try:
            await self._resume_handshake(receive, authenticate)
            done = True
        finally:
            self._control_out = self._control_send
            self._resume_events = None
            if not done:
                if self._pending_resume is transport:
                    self._pending_resume = None  # the connection never took it
                    await trio.aclose_forcefully(transport)
                elif self._resuming and self._lost is None and not self._closing.is_set():
                    self._lose_transport("resume handshake abandoned")

    async def _resume_handshake(
        self,
        events: trio.MemoryReceiveChannel[Event | None],
        authenticate: Callable[[bytes, int], tuple[int, bytes]],
    ) -> None:
        """resume_over(): answer CHALLENGE with RESUME + AUTH, then wait for RESUMED."""
        challenged = False
        while True:
            event = await events.receive()
            if event is None:
                if self._closing.is_set():
                    raise self.ended_error()
                raise HandshakeError(f"resume failed: {self._lost or 'connection lost'}")
            if isinstance(event, ChallengeReceived) and not challenged:
                challenged = True
                method, credential = authenticate(event.nonce, self.minor)
                assert self.ticket is not None
                self._session.send_resume(RESUME_REQ_ID, self.ticket)
                self._session.send_auth(RESUME_AUTH_REQ_ID, method, credential)
                self._queued()
            elif isinstance(event, SessionResumed):
                return
            elif isinstance(event, ResumeRefused):
                raise ResumeRefusedError(
                    f"relay refused to resume the session ({_status_name(event.status)}: "
                    f"{peer_text(event.message)})",
                    int(event.status),
                    event.message,
                )
            elif isinstance(event, ResultReceived) and event.req_id == RESUME_AUTH_REQ_ID:
                if event.status != ResultStatus.OK:
                    raise AuthError(
                        "authentication failed: the relay refused the token "
                        f"({peer_text(event.message) or _status_name(event.status)})"
                    )
            elif isinstance(event, ConnectionClosed):
                if event.error_code == ErrorCode.AUTH_FAILED:
                    raise AuthError(
                        f"authentication failed: the relay refused the token "
                        f"({peer_text(event.message)})"
                    )
                raise HandshakeError(
                    f"relay closed the connection during the resume ({event.error_code.name}: "
                    f"{peer_text(event.message)})"
                )

    # -- control frames: each queues its frame and wakes the writer ----------------------

    def send_challenge(self, nonce: bytes) -> None:
        """Relay: send CHALLENGE with our 32-byte nonce (``Session.send_challenge``)."""
        self._session.send_challenge(nonce)
        self._queued()

    def send_auth(self, req_id: int, method: int, credential: bytes) -> None:
        """Client: send AUTH (``Session.send_auth``)."""
        self._session.send_auth(req_id, method, credential)
        self._queued()

    def send_join(self, req_id: int, ticket: bytes) -> None:
        """Client: join the session of ``ticket`` as one more connection (``Session.send_join``,
        protocol-spec.md §10.7); send the AUTH right after it."""
        self._session.send_join(req_id, ticket)
        self._queued()

    def share_binds(self, first: MuxConnection) -> None:
        """Client: take OPENs for the tunnels bound on ``first``, the session's first
        connection (``Session.share_binds``, protocol-spec.md §10.7)."""
        self._session.share_binds(first._session)

    @property
    def stream_count(self) -> int:
        """Streams open on this connection (the load a session's placement compares)."""
        return len(self._streams)

    @property
    def max_connections_local(self) -> int:
        """Connections per session this side takes (its own HELLO's MAX_CONNECTIONS)."""
        return self._session.local_settings.max_connections

    @property
    def max_connections(self) -> int:
        """Connections the relay takes per session (its HELLO's MAX_CONNECTIONS; 0 before)."""
        peer = self._session.peer_settings
        return 0 if peer is None else peer.max_connections

    def send_bind(
        self,
        req_id: int,
        tunnel_id: int,
        bind: Address,
        proto: int = TunnelProto.TCP,
        options: BindOptions | None = None,
    ) -> None:
        """Client: send BIND (``Session.send_bind``; held back while 16 requests are out).

        Raises:
            ValueError: ``req_id`` is outstanding or ``options`` need protocol minor 1.
            SessionClosedError: the session is closed.
        """
        self._session.send_bind(req_id, tunnel_id, bind, proto, options)
        self._queued()

    def send_unbind(
        self, req_id: int, tunnel_id: int, code: ErrorCode = ErrorCode.NO_ERROR
    ) -> None:
        """Client: request UNBIND. Relay: notify a revocation (``req_id`` 0)."""
        self._session.send_unbind(req_id, tunnel_id, code)
        self._queued()

    def send_result(
        self, req_id: int, status: ResultStatus, message: str = "", bound: Address | None = None
    ) -> None:
        """Relay: answer a request (``Session.send_result``; a no-op once the session closed).

        A refused AUTH, or one refused request too many (spec §12), also closes the session:
        the connection then flushes the CLOSE and ends.
        """
        self._session.send_result(req_id, status, message, bound)
        self._queued()
        if self._input_held:
            self._release_input()

    def process_held(self) -> None:
        """Process frames the server session held behind the AUTH (after ``send_result``)."""
        if self._input_held:
            self._release_input()
        if not self.closed:
            self._feed(b"", trio.current_time())
        self._queued()

    @property
    def usable(self) -> bool:
        """True while streams and control requests may still be queued on the session."""
        return not self._closing.is_set() and not self._session.closed

    def open_stream(self, tunnel_id: int, origin: Address, target: Address) -> MuxStream:
        """Open a stream to the peer (OPEN is queued; data may follow at once).

        Raises:
            MuxSessionClosedError: The connection is closed or the session refuses new streams
                (check :meth:`wait_open_slot` first).
        """
        if not self.usable or not self._session.can_open_stream():
            raise MuxSessionClosedError(f"{self.name}: cannot open a stream now")
        sid = self._session.open_stream(tunnel_id, origin, target)
        info = StreamInfo(
            stream_id=sid,
            tunnel_id=tunnel_id,
            origin=origin,
            target=target,
            started=trio.current_time(),
            token_id=self.token_id,
        )
        stream = MuxStream(self, sid, info, incoming=False)
        self._streams[sid] = stream
        if self.open_timeout is not None:
            self._open_deadlines.append((info.started + self.open_timeout, sid))
            ev = self._timer_waiter
            if ev is not None and len(self._open_deadlines) == 1:
                self._timer_waiter = None
                ev.set()
        self._flush_or_wake()
        return stream

    def open_slot_available(self) -> bool:
        """True if :meth:`open_stream` would succeed right now (no await needed)."""
        return self.usable and self.goaway is None and self._session.can_open_stream()

    async def wait_open_slot(self) -> None:
        """Wait until the session allows one more open (pending-open and concurrency limits).

        Returns without a checkpoint after the last check, so an ``open_stream`` right after
        it cannot fail for lack of a slot.

        Raises:
            MuxSessionClosedError: The connection ended first, or a GOAWAY forbids new streams.
        """
        await trio.lowlevel.checkpoint()
        # No await between the final check and returning: the caller's open_stream() that
        # follows is guaranteed to find the slot.
        while True:
            if not self.usable or self.goaway is not None:
                raise MuxSessionClosedError(f"{self.name}: connection closed")
            if self._session.can_open_stream():
                return
            if self._slot_waiter is None:
                self._slot_waiter = trio.Event()
            await self._slot_waiter.wait()

    async def wait_open_change(self) -> None:
        """Wait until one of our opens is answered or ends, a stream closes or the connection
        ends (whatever may free a pending-open slot or a share of them)."""
        if self._slot_waiter is None:
            self._slot_waiter = trio.Event()
        await self._slot_waiter.wait()

    def notify_open_change(self) -> None:
        """Wake every :meth:`wait_open_change` and :meth:`wait_open_slot` waiter."""
        self._wake_slot()

    async def accept_stream(self) -> MuxStream:
        """Return the next stream the peer opened; answer it with ``accept()``/``reject()``.

        Raises:
            MuxSessionClosedError: The connection ended.
        """
        try:
            return await self._incoming_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self.ended_error() from None

    async def next_control_event(self) -> Event:
        """Return the next control event (challenge, auth, bind, result, goaway ...).

        Raises:
            MuxSessionClosedError: The connection ended.
        """
        try:
            return await self._control_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self.ended_error() from None

    def go_away(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Queue GOAWAY: we open no new streams (the peer may finish its own)."""
        if self.usable:
            self._goaway_sent = True
            self._session.go_away(code, message)
            self._wake_writer()

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Queue CLOSE and end the connection once it is flushed (bounded by CLOSE_GRACE).

        A suspended session (or one in its resume handshake) ends at once: no frame is sent.
        """
        if not self._session.closed and not self._suspended:
            self._session.close(code, message)
        self._begin_close(f"closed locally: {code.name}{': ' + message if message else ''}", code)

    async def aclose(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Close (CLOSE frame, close_notify) and wait until :meth:`run` has finished."""
        self.close(code, message)
        await self._closed.wait()

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has finished."""
        await self._closed.wait()

    async def probe(self, within: float) -> bool:
        """Return True if the peer sends anything within ``within`` s (a PING is sent now)."""
        if not self.usable:
            await trio.lowlevel.checkpoint()
            return False
        start = trio.current_time()
        self._ping(start)
        with trio.move_on_after(within):
            while not self.closed:
                if self._last_receive > start:
                    return True
                if self._rx_waiter is None:
                    self._rx_waiter = trio.Event()
                await self._rx_waiter.wait()
        return self._last_receive > start and not self.closed

    def statistics(self) -> dict[str, int]:
        """A debug snapshot: streams, bytes, plus the session's counters."""
        stats = dict(self._session.statistics())
        stats.update(
            adapter_streams=len(self._streams),
            adapter_blocked_senders=len(self._blocked),
            open_timeouts=self.open_timeouts,
            pings_sent=self.pings_sent,
            resumes=self.resumes,
            stall_resets=self.stall_resets,
            suspensions=self.suspensions,
            transport_bytes_received=self.bytes_received,
            transport_bytes_sent=self.bytes_sent,
        )
        return stats

    async def run(
        self, *, task_status: trio.TaskStatus[MuxConnection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the connection's tasks until the session ends.

        The reader, writer, keepalive, RTT sampler and timer run per transport. With
        resumption on (:attr:`resumable`) a lost transport suspends the session and they start
        again on the transport that :meth:`attach` or :meth:`resume_over` hands over, unless the
        resume window passes first. Returns normally whatever ended the connection (see
        :attr:`close_reason`); every stream that is not finished fails with
        :class:`MuxSessionClosedError`.
        """
        try:
            await self._run_transport(task_status)
            while not self._released and not self._closing.is_set():
                if self._lost is None:
                    if not self._resuming:
                        break  # defensive: the tasks ended with neither loss nor close
                    self._lost = "resume handshake did not finish within the resume window"
                await trio.aclose_forcefully(self.transport)
                if not await self._suspended_phase():
                    break
                await self._run_transport(None)
        finally:
            self._finish()
            if not self._released:
                await trio.aclose_forcefully(self.transport)
            if self._pending_attach is not None:
                self._orphans.append(self._pending_attach[0])
                self._pending_attach = None
            for orphan in self._orphans:
                await trio.aclose_forcefully(orphan)
            self._closed.set()

    async def _run_transport(self, task_status: trio.TaskStatus[MuxConnection] | None) -> None:
        """Run the current transport's tasks until it is closed, fails or is let go."""
        transport = self.transport
        self._writer_done = trio.Event()
        window = trio.CancelScope()
        if self._resuming and self.resume_deadline is not None:
            window.deadline = self.resume_deadline  # the handshake must end within the window
        self._window_scope = window
        try:
            with window:
                async with trio.open_nursery() as nursery:
                    self._transport_scope = nursery.cancel_scope
                    self._transport_nursery = nursery
                    nursery.start_soon(self._reader_loop)
                    if not self._resuming:
                        self._start_timers(nursery)
                    nursery.start_soon(self._close_watchdog, nursery.cancel_scope)
                    if task_status is not None:
                        task_status.started(self)
                    try:
                        await self._writer_loop()
                    finally:
                        self._writer_done.set()
                    if self._dead is None:
                        # CLOSE is flushed: send TLS close_notify and close the socket.
                        with trio.move_on_after(CLOSE_GRACE):
                            await transport.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            self._transport_scope = self._transport_nursery = None

    def _start_timers(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._keepalive_loop)
        nursery.start_soon(self._rtt_sampler)
        if self.open_timeout is not None or self.stall_timeout is not None:
            nursery.start_soon(self._timer_loop)

    async def _suspended_phase(self) -> bool:
        """The transport is gone and the session kept: wait for the next one.

        Returns True once a new transport is installed (attach: resumed; resume_over: the
        handshake runs on it), False if the session ended (window passed, closed, refused).
        """
        try:
            if not self._suspended:
                self._enter_suspension()
            elif self._resuming:
                # The new connection failed during the resume handshake: suspended again.
                self._resuming = False
                self._session.suspend()
        except LocalProtocolError as exc:
            self._begin_close(f"{self._lost} (cannot suspend: {exc})", self.close_code)
            return False
        deadline = self.resume_deadline if self.resume_deadline is not None else -math.inf
        with trio.move_on_at(deadline):
            while (
                not self._closing.is_set()
                and self._pending_attach is None
                and self._pending_resume is None
            ):
                self._transport_ready = trio.Event()
                await self._transport_ready.wait()
        if self._closing.is_set():
            return False
        pending = self._pending_attach
        if pending is not None:
            self._pending_attach = None
            transport, req_id, peer_received = pending
            try:
                self._session.resume(req_id, peer_received)
            except (LocalProtocolError, ValueError) as exc:
                self._orphans.append(transport)
                self._begin_close(f"resume failed: {exc}", ErrorCode.PROTOCOL_ERROR)
                return False
            self._install_transport(transport)
            self._resumed()
            tickets, self._deferred_tickets = self._deferred_tickets, []
            for ticket, lifetime in tickets:
                self._session.send_ticket(ticket, lifetime)
            return True
        transport_ = self._pending_resume
        if transport_ is not None:
            self._pending_resume = None
            try:
                self._session.begin_resume()
            except LocalProtocolError as exc:
                self._orphans.append(transport_)
                self._begin_close(f"cannot resume: {exc}", ErrorCode.INTERNAL_ERROR)
                return False
            self._install_transport(transport_)
            self._resuming = True
            return True
        window = self.resume_window
        reason = f"resume window of {window:g} s passed"
        logger.debug("%s: %s; the session ends", self.name, reason)
        self._begin_close(reason, ErrorCode.TIMEOUT)
        return False

    def _enter_suspension(self) -> None:
        """The transport was lost: keep the session for the resume window."""
        now = trio.current_time()
        self._session.suspend()  # first: it raises if the session cannot be suspended
        self._suspended = True
        self._suspended_at = now
        self.resume_deadline = now + self.resume_window
        self.suspensions += 1
        ev, self._suspended_event = self._suspended_event, trio.Event()
        ev.set()
        if self._pending_attach is None:
            # DEBUG: the owner logs the loss in its own words (relay: on_suspend; client).
            logger.debug(
                "%s: transport lost (%s); session kept for up to %g s",
                self.name,
                self._lost,
                self.resume_window,
            )
            if self.on_suspend is not None:
                self.on_suspend()

    def _install_transport(self, transport: trio.abc.Stream) -> None:
        """Make ``transport`` the session's transport (resume)."""
        kind_changed = isinstance(transport, TLSStream) != isinstance(self.transport, TLSStream)
        self.transport = transport
        self._fast_transport = (
            transport if INLINE_FLUSH and isinstance(transport, TLSStream) else None
        )
        if kind_changed and not self._fixed_receive_size:
            # Otherwise the read size stays what the owner set (the relay tunes it).
            self.receive_size = _receive_size_for(transport)
        self._dead = None
        self._lost = None
        self._last_receive = trio.current_time()
        # Events of the previous transport's tasks (cancelled while waiting) are stale.
        self._writer_waiter = self._keepalive_waiter = self._timer_waiter = None
        self._activity_waiter = self._reader_waiter = None

    def _resumed(self) -> None:
        """The session continues on the new transport (RESUMED queued or received)."""
        now = trio.current_time()
        paused = now - self._suspended_at
        timeout = self.open_timeout
        if timeout is not None and self._open_deadlines:
            # The open timeout does not run while suspended (spec §10.6.3).
            start = self._suspended_at
            shifted = [
                (deadline + now - max(start, deadline - timeout), sid)
                for deadline, sid in self._open_deadlines
            ]
            self._open_deadlines.clear()
            self._open_deadlines.extend(shifted)
        self._suspended = False
        self._resuming = False
        self.resume_deadline = None
        self._window_scope.deadline = math.inf
        self.resumes += 1
        # The relay and the client log the resume themselves, with their figures.
        logger.debug("%s: session resumed after %.1f s", self.name, paused)
        if self.on_resume is not None:
            self.on_resume()

    def _lose_transport(self, reason: str) -> None:
        """Let the current transport go while the session goes on (see :meth:`run`)."""
        self._lost = reason
        if self._dead is None:
            self._dead = reason
        self._generation += 1
        self._fast_transport = None
        self._transport_scope_cancel()
        events = self._resume_events
        if events is not None:
            events.send_nowait(None)

    def _transport_scope_cancel(self) -> None:
        scope = self._transport_scope
        if scope is not None:
            scope.cancel()

    def _may_suspend(self) -> bool:
        """True if losing the transport now suspends the session rather than ending it."""
        return (
            self.resumable
            and not self._closing.is_set()
            and not self._session.closed
            and self.goaway is None
            and not self._goaway_sent
        )

    # -- for MuxStream: its requests to the session ---------------------------------------

    def send_room(self, stream_id: int) -> int:
        """Bytes the session may take for the stream now; <= 0 means wait (see module docs)."""
        return self._session.send_room(stream_id, SEND_LOW_WATER, SEND_HIGH_WATER, SEND_MIN_ROOM)

    def unsent(self, stream_id: int) -> int:
        """Bytes queued on the stream that the session has not framed yet."""
        return self._session.pending_bytes(stream_id)

    def watch_send_room(self, stream: MuxStream) -> None:
        """Call ``stream.wake_sender()`` once the stream has send room again."""
        self._blocked.add(stream)

    def queue_data(self, stream_id: int, data: bytes | memoryview, *, try_now: bool = True) -> None:
        """Queue stream bytes (within :meth:`send_room`) and wake the writer.

        With the writer idle and nothing else queued, the bytes are framed and sent right
        here (:meth:`send_now`), without a trip through the scheduler. ``try_now=False``: the
        caller just tried :meth:`send_now` for these bytes.
        """
        if try_now and self.send_now(stream_id, data):
            return
        ev = self._activity_waiter
        if ev is not None:
            self._activity_waiter = None
            ev.set()
        self._session.send_data(stream_id, data)
        self._senders.add(stream_id)
        self._flush_or_wake()

    def send_now(self, stream_id: int, data: bytes | memoryview) -> bool:
        """Frame all of ``data`` as one DATA frame and send it from the calling task, if the
        writer is idle and the session takes it at once (``Session.send_data_now``: nothing
        else queued, the credit covers it). False, with nothing queued, otherwise."""
        transport = self._inline_transport()
        if transport is None:
            return False
        out = self._session.send_data_now(stream_id, data)
        if out is None:
            return False
        ev = self._activity_waiter
        if ev is not None:
            self._activity_waiter = None
            ev.set()
        self._send_framed(transport, out)
        return True

    def queue_fin(self, stream: MuxStream) -> None:
        """Queue the stream's FIN (after its data) and wake the writer.

        With the writer idle and nothing else queued, the FIN is framed and sent right here
        (``Session.end_stream_now``), as :meth:`send_now` does for data.
        """
        transport = self._inline_transport()
        out = None if transport is None else self._session.end_stream_now(stream.stream_id)
        if transport is None or out is None:
            self._session.end_stream(stream.stream_id)
            self._flush_or_wake()
        else:
            self._send_framed(transport, out)
        self.forget_if_finished(stream)

    def accept_open(self, stream_id: int) -> None:
        """Queue OPEN_ACK for a stream the peer opened."""
        self._session.accept_stream(stream_id)
        self._flush_or_wake()

    def reject_open(self, stream: MuxStream, reason: OpenFailReason, message: str) -> None:
        """Queue OPEN_FAIL for a stream the peer opened (if still possible); forget it."""
        if self.usable:
            self._session.reject_stream(stream.stream_id, reason, message)
            self._wake_writer()
        self.forget(stream)

    def acknowledge(self, stream_id: int, n: int, now: float | None = None) -> None:
        """Return the credit of ``n`` bytes the application consumed (spec §8.5); ``now``:
        trio's clock if the caller has it."""
        if n and self._session.acknowledge(
            stream_id, n, trio.current_time() if now is None else now
        ):
            self._wake_writer()

    def reset_stream(self, stream: MuxStream, failure: StreamFailure) -> None:
        """Queue RESET(``failure.code``) for the stream, fail it and forget it."""
        if self.usable:
            self._session.reset_stream(stream.stream_id, failure.code)
            self._wake_writer()
        stream.fail(failure)
        self.forget(stream)

    def forget(self, stream: MuxStream) -> None:
        """Drop a finished or failed stream from the connection's tables."""
        if self._streams.pop(stream.stream_id, None) is not None:
            self._wake_slot()
        self._blocked.discard(stream)

    def forget_if_finished(self, stream: MuxStream) -> None:
        """Forget the stream once both FINs went (ours queued, the peer's received)."""
        if stream.receive_finished and stream.send_finished:
            self.forget(stream)

    def ended_error(self) -> MuxSessionClosedError:
        """The error for stream I/O once the connection is no longer usable."""
        return MuxSessionClosedError(
            f"{self.name}: connection ended ({self.close_reason or 'closing'})", self.close_code
        )

    # -- internals: wakeups --------------------------------------------------------------

    def _queued(self) -> None:
        """A control frame was queued: wake the writer; a session it closed ends the connection."""
        if self._session.closed and not self._closing.is_set():
            self._begin_close("session closed", self.close_code)
        self._wake_writer()

    def _ping(self, now: float) -> None:
        """Queue a PING (unless 4 are outstanding) and note when.

        Never while suspended, in a resume handshake or with the input paused, nor before
        authentication on a relay with resumption on: a resuming client must get nothing but
        the handshake's frames (protocol-spec §10.6.4).
        """
        if (
            self.usable
            and not self._suspended
            and not self._input_held
            and (
                self._session.authenticated
                or self._session.role == Role.CLIENT
                or not self._session.resume_enabled
            )
            and self._session.ping(now) is not None
        ):
            self.pings_sent += 1
            self._wake_writer()
        self._last_ping = now

    def _wake_writer(self) -> None:
        ev = self._writer_waiter
        if ev is not None:
            self._writer_waiter = None
            ev.set()

    def _flush_or_wake(self) -> None:
        """Send what the session has queued right here if the writer is idle, else wake it.

        An idle writer (parked on its event, nothing in flight) means no bulk is queued ahead:
        the frames go straight to the socket from the calling task (``TLSStream.send_nowait``,
        no waiting, no task hop). What the socket does not take, and everything while the
        writer is busy, is left to the writer task, which keeps the order.
        """
        transport = self._inline_transport()
        if transport is None:
            self._wake_writer()
        else:
            self._send_inline(transport)

    def _inline_transport(self) -> TLSStream | None:
        """The transport, if the calling task may send on it now: the writer is idle (parked
        on its event), the connection is not ending, and ``TLSStream.send_nowait`` is
        possible. Else None."""
        transport = self._fast_transport
        if (
            transport is None
            or self._writer_waiter is None
            or self._dead is not None
            or self._closing.is_set()
            or not transport.can_send_nowait
        ):
            return None
        return transport

    def _send_inline(self, transport: TLSStream) -> None:
        """Send what the session has queued from the calling task (see :meth:`_flush_or_wake`)."""
        senders = self._senders
        out = self._session.data_to_send(BULK_WRITE_BATCH if len(senders) <= 1 else WRITE_BATCH)
        senders.clear()
        if not out:
            return
        if self._blocked:
            self._release_blocked()
        self._send_framed(transport, out)

    def _send_framed(self, transport: TLSStream, out: bytes) -> None:
        """Hand frames the session just gave out to the transport from the calling task (the
        caller checked :meth:`_inline_transport`); the writer sends what the socket leaves."""
        self.bytes_sent += len(out)
        if not transport.send_nowait(out, checked=True):
            self._wake_writer()  # sends the rest (or reports the error)

    def _wake_slot(self) -> None:
        ev = self._slot_waiter
        if ev is not None:
            self._slot_waiter = None
            ev.set()
        peer = self.open_change_peer
        if peer is not None:
            peer._wake_slot()

    # -- internals: tasks ----------------------------------------------------------------

    async def _writer_loop(self) -> None:
        session = self._session
        transport = self.transport
        drain = False
        while True:
            if self._dead is not None:
                return
            if drain and DRAIN_BEFORE_BATCH:
                # After a big batch: wait until the kernel's unsent bytes are below trio's
                # TCP_NOTSENT_LOWAT before taking the next batch, so bulk queues in the session
                # (where the scheduler orders it) and not in the socket's FIFO, ahead of an
                # interactive frame.
                drain = False
                try:
                    await transport.wait_send_all_might_not_block()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._mark_dead(f"transport write failed: {_failure_text(exc)}")
                    return
            senders = self._senders
            out = session.data_to_send(BULK_WRITE_BATCH if len(senders) <= 1 else WRITE_BATCH)
            senders.clear()
            if out:
                if self._blocked:
                    self._release_blocked()
                try:
                    await transport.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._mark_dead(f"transport write failed: {_failure_text(exc)}")
                    return
                except trio.Cancelled:
                    self._mark_dead("write cancelled")
                    raise
                self.bytes_sent += len(out)
                # Only with other streams open: a lone bulk stream keeps the kernel full.
                drain = len(out) >= DRAIN_THRESHOLD and len(self._streams) > 1
                continue
            fast = self._fast_transport
            if fast is not None and fast.backlog:
                # What ``send_nowait`` left over goes out first (``send_all`` sends it).
                try:
                    await transport.send_all(b"")
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._mark_dead(f"transport write failed: {_failure_text(exc)}")
                    return
                except trio.Cancelled:
                    self._mark_dead("write cancelled")
                    raise
                continue
            if self._blocked:
                self._release_blocked()
            if session.closed or self._closing.is_set():
                return
            ev = self._writer_waiter = trio.Event()
            if session.wants_write():
                self._writer_waiter = None
                continue
            await ev.wait()

    def _release_blocked(self) -> None:
        room = self.send_room
        ready = [s for s in self._blocked if room(s.stream_id) > 0]
        for stream in ready:
            self._blocked.discard(stream)
            stream.wake_sender()

    async def _reader_loop(self) -> None:
        transport = self.transport
        generation = self._generation
        while True:
            try:
                data = await transport.receive_some(self.receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if not self.closed and generation == self._generation:
                    self._mark_dead(f"transport read failed: {_failure_text(exc)}")
                return
            if generation != self._generation:
                return  # the transport was let go (resume) while this read completed
            if not data:
                if not self.closed:
                    self._mark_dead("transport EOF without CLOSE")
                return
            now = trio.current_time()
            self._last_receive = now
            self.bytes_received += len(data)
            ev = self._rx_waiter
            if ev is not None:
                self._rx_waiter = None
                ev.set()
            if not self._feed(data, now):
                return
            if self._input_held:
                # The session paused its input (a RESUME before the AUTH): no TLS receive is
                # pending while the relay decides, so release_transport() cancels nothing.
                while self._input_held and generation == self._generation:
                    ev = self._reader_waiter = trio.Event()
                    await ev.wait()
                if generation != self._generation:
                    return

    def _release_input(self) -> None:
        """Let the reader go on once the session no longer pauses its input."""
        if self._input_held and not self._session.input_paused:
            self._input_held = False
            ev, self._reader_waiter = self._reader_waiter, None
            if ev is not None:
                ev.set()

    def _feed(self, data: bytes | bytearray, now: float) -> bool:
        """Give bytes to the session and dispatch its events; False if the session ended."""
        session = self._session
        self._now_in = now
        try:
            events = session.receive_data(data, now)
        except ProtocolError as exc:
            if self._resuming and not session.closed:
                # A fault on the resume handshake's connection: the session stays suspended.
                logger.warning("%s: resume handshake failed: %s", self.name, exc)
                self._resuming = False  # the session went back to SUSPENDED itself
                self._lose_transport(f"resume handshake failed: {exc}")
                return False
            logger.warning(
                "%s: protocol error from peer: %s (%s)", self.name, exc, exc.error_code.name
            )
            self._begin_close(f"protocol error: {exc}", exc.error_code)
            return False
        handlers = self._handlers
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event)
            else:
                self._control_out.send_nowait(event)
        if session.closed:
            if not self._closing.is_set():
                self._begin_close(self.close_reason or "session closed", self.close_code)
            return False
        if session.wants_write():
            self._flush_or_wake()
        return True

    async def _keepalive_loop(self) -> None:
        while not self.closed:
            idle = self.idle_timeout
            if idle is None:
                ev = self._keepalive_waiter = trio.Event()
                await ev.wait()
                continue
            now = trio.current_time()
            if now - self._last_receive >= idle:
                if self._may_suspend():
                    silent = f"peer silent for {now - self._last_receive:.1f} s"
                    # DEBUG: the owner logs the loss with this reason (lost_reason).
                    logger.debug("%s: %s; suspending the session", self.name, silent)
                    self._mark_dead(silent)
                    return
                logger.warning(
                    "%s: peer silent for %.1f s, declaring it dead",
                    self.name,
                    now - self._last_receive,
                )
                self.close(ErrorCode.TIMEOUT, "idle timeout")
                return
            ping_at = max(self._last_receive, self._last_ping) + idle / 4
            if now >= ping_at:
                self._ping(now)
                ping_at = now + idle / 4
            await trio.sleep_until(min(ping_at, self._last_receive + idle))

    async def _rtt_sampler(self) -> None:
        """While streams carry data, PING at most every RTT_SAMPLE_INTERVAL (spec §10.1).

        Waits for the first DATA sent or received, pings at once unless a PING (keepalive,
        probe, the previous sample) went out within the interval, then sleeps out the
        interval. An idle session therefore sends only the keepalive's PINGs.
        """
        while not self.closed:
            ev = self._activity_waiter = trio.Event()
            await ev.wait()
            now = trio.current_time()
            if now - self._last_ping >= RTT_SAMPLE_INTERVAL:
                self._ping(now)
            await trio.sleep_until(self._last_ping + RTT_SAMPLE_INTERVAL)

    async def _timer_loop(self) -> None:
        """Enforce ``open_timeout`` and ``stall_timeout`` (see the class docstring)."""
        stall = self.stall_timeout
        interval = None if stall is None else min(STALL_CHECK_INTERVAL, max(stall / 4, 0.01))
        # After a resume a stream gets a full stall_timeout again (the check was paused).
        wait = stall if self.resumes and stall is not None else interval
        next_stall = math.inf if wait is None else trio.current_time() + wait
        deadlines = self._open_deadlines
        while not self.closed:
            now = trio.current_time()
            while deadlines and deadlines[0][0] <= now:
                _, sid = deadlines.popleft()
                stream = self._streams.get(sid)
                if stream is not None and stream.pending:
                    self.open_timeouts += 1
                    logger.info(
                        "%s: stream %d: no answer to OPEN within %.0f s; reset",
                        self.name,
                        sid,
                        self.open_timeout,
                    )
                    stream.reset(ErrorCode.CANCEL, "no answer to OPEN in time")
            if stall is not None and now >= next_stall:
                next_stall = now + (interval or 0.0)
                self._reset_stalled(now, stall)
            wake = min(next_stall, deadlines[0][0] if deadlines else math.inf)
            ev = self._timer_waiter = trio.Event()
            with trio.move_on_at(wake):
                await ev.wait()
            self._timer_waiter = None

    def _reset_stalled(self, now: float, timeout: float) -> None:
        """Reset stalled streams while the receive budget is exceeded (spec §8.7)."""
        session = self._session
        for _ in range(1024):  # a bounded amount of work per check
            if not self.usable:
                return
            sid = session.stalled_stream(now, timeout)
            if sid is None:
                return
            self.stall_resets += 1
            if self.on_stall is not None:
                self.on_stall()
            logger.info(
                "%s: stream %d: received data not consumed for %.0f s while the receive "
                "budget is full; reset",
                self.name,
                sid,
                timeout,
            )
            stream = self._streams.get(sid)
            if stream is not None:
                failure = StreamFailure(
                    FailureKind.STALLED, ErrorCode.CANCEL, "received data not consumed"
                )
                stream.reset_with(failure)
            if session.stream_is_open(sid):
                session.reset_stream(sid, ErrorCode.CANCEL)
                self._wake_writer()

    async def _close_watchdog(self, scope: trio.CancelScope) -> None:
        await self._closing.wait()
        await trio.sleep(CLOSE_GRACE)
        scope.cancel()

    # -- internals: ending ---------------------------------------------------------------

    def _begin_close(self, reason: str, code: ErrorCode | None) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            self.close_code = code
        self._closing.set()
        self._fail_streams()
        self._wake_writer()
        self._wake_slot()
        for ev in (
            self._keepalive_waiter,
            self._timer_waiter,
            self._activity_waiter,
            self._transport_ready,
            self._suspended_event,
        ):
            if ev is not None:
                ev.set()
        events = self._resume_events
        if events is not None:
            events.send_nowait(None)

    def _mark_dead(self, reason: str) -> None:
        if self._lost is not None:
            return  # this transport was let go already; the session goes on
        if self._dead is None:
            self._dead = reason
        if self._may_suspend():
            self._lose_transport(reason)
            return
        self._begin_close(reason, self.close_code)

    def _fail_streams(self) -> None:
        """The session is gone: every stream still in the table fails (buffered data stays)."""
        failure = StreamFailure(
            FailureKind.SESSION,
            self.close_code or ErrorCode.INTERNAL_ERROR,
            f"connection ended ({self.close_reason})",
        )
        for stream in list(self._streams.values()):
            stream.fail(failure)
        self._streams.clear()
        self._blocked.clear()
        self._wake_slot()

    def _finish(self) -> None:
        """Fail every unfinished stream and close the channels (idempotent)."""
        if self.close_reason is None:
            self.close_reason = "connection task ended"
        self._closing.set()
        self._fail_streams()
        failure = StreamFailure(
            FailureKind.SESSION, self.close_code or ErrorCode.INTERNAL_ERROR, "connection ended"
        )
        self._control_send.close()
        self._incoming_send.close()
        # Streams the peer opened that nobody picked up are dropped with the connection.
        while True:
            try:
                orphan = self._incoming_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            orphan.fail(failure)

    # -- event handlers (called by the reader; never block) ------------------------------

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            # The stream is gone on our side: discard, but credit the connection window (protocol-spec §9.6).
            self.acknowledge(event.stream_id, len(event.data), self._now_in)
            return
        ev = self._activity_waiter
        if ev is not None:
            self._activity_waiter = None
            ev.set()
        stream.deliver_data(event.data, self._now_in)

    def _on_window(self, event: WindowUpdated) -> None:
        self._wake_writer()

    def _on_end(self, event: StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.deliver_eof()
            self.forget_if_finished(stream)

    def _on_reset(self, event: StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            who = "peer" if event.remote else "session"
            text = f"reset by {who} ({event.error_code.name})"
            stream.fail(StreamFailure(FailureKind.RESET, event.error_code, text))
            self.forget(stream)
        else:
            self._wake_slot()

    def _on_opened(self, event: StreamOpened) -> None:
        info = StreamInfo(
            stream_id=event.stream_id,
            tunnel_id=event.tunnel_id,
            origin=event.origin,
            target=event.target,
            started=trio.current_time(),
            token_id=self.token_id,
        )
        stream = MuxStream(self, event.stream_id, info, incoming=True)
        self._streams[event.stream_id] = stream
        self._incoming_send.send_nowait(stream)

    def _on_accepted(self, event: StreamAccepted) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.deliver_accepted()
        self._wake_slot()

    def _on_rejected(self, event: StreamRejected) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            try:
                reason_name = OpenFailReason(event.reason).name
            except ValueError:
                reason_name = str(event.reason)
            text = f"open refused by peer: {reason_name}{': ' + event.message if event.message else ''}"
            failure = StreamFailure(
                FailureKind.REJECTED, ErrorCode.REFUSED_STREAM, text, event.reason, event.message
            )
            stream.fail(failure)
            self.forget(stream)
        self._wake_slot()

    def _on_hello(self, event: HelloReceived) -> None:
        if not self._resuming:  # a resumed session keeps its first HELLOs' settings
            self._peer_idle_ms = event.settings.idle_timeout_ms
        ev = self._keepalive_waiter
        if ev is not None:
            ev.set()
        # One RTT sample from the start, so window auto-tuning can begin early (spec §8.6).
        self._ping(trio.current_time())
        self._control_out.send_nowait(event)

    def _on_pong(self, event: PongReceived) -> None:
        if self.on_rtt is not None:
            self.on_rtt(event.rtt)

    def _on_goaway(self, event: GoAwayReceived) -> None:
        self.goaway = event
        self._wake_slot()
        self._control_out.send_nowait(event)

    def _on_connection_closed(self, event: ConnectionClosed) -> None:
        self._control_out.send_nowait(event)  # before the end, so resume_over() sees it
        msg = f": {event.message}" if event.message else ""
        self._begin_close(
            f"peer closed the connection ({event.error_code.name}{msg})", event.error_code
        )

    def _on_auth_requested(self, event: AuthRequested) -> None:
        if self._session.input_paused:
            self._input_held = True  # a RESUME came before this AUTH (relay)
        self._control_out.send_nowait(event)

    def _on_ticket(self, event: TicketReceived) -> None:
        self.ticket = event.ticket

    def _on_session_resumed(self, event: SessionResumed) -> None:
        events = self._resume_events
        self._control_out = self._control_send  # what follows RESUMED is the session's again
        self._resumed()
        nursery = self._transport_nursery
        if nursery is not None:
            self._start_timers(nursery)
        if events is not None:
            events.send_nowait(event)

    def _on_resume_refused(self, event: ResumeRefused) -> None:
        self._control_out.send_nowait(event)  # before the end, so resume_over() sees it
        text = f": {event.message}" if event.message else ""
        self._begin_close(
            f"relay refused to resume the session ({_status_name(event.status)}{text})",
            ErrorCode.NO_ERROR,
        )


def _failure_text(exc: BaseException) -> str:
    """A transport failure as a short readable phrase for log lines (no exception repr).

    The OS error that caused it when there is one (``connection reset by peer``), else the
    exception's own message, else its class name.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain is short; bounded in case it loops
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror[0].lower() + seen.strerror[1:]
        seen = seen.__cause__ or seen.__context__
    text = str(exc).strip()
    return text or type(exc).__name__


def _status_name(status: int) -> str:
    try:
        return ResultStatus(status).name
    except ValueError:
        return str(status)


def _receive_size_for(transport: trio.abc.Stream) -> int:
    return FAST_TLS_RECEIVE_SIZE if isinstance(transport, TLSStream) else RECEIVE_SIZE


def wrap_tls(
    tcp: trio.SocketStream,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
) -> trio.SSLStream[trio.SocketStream] | TLSStream:
    """The TLS stream for a tunnel connection: ``trio.SSLStream``, or TLSStream if FAST_TLS."""
    if FAST_TLS:
        return TLSStream(tcp, context, server_side=server_side, server_hostname=server_hostname)
    return trio.SSLStream(tcp, context, server_side=server_side, server_hostname=server_hostname)


def make_session(
    role: Role,
    *,
    idle_timeout: float | None = None,
    settings_overrides: dict[str, int] | None = None,
    receive_budget: int | None = None,
    open_rate: float | None = None,
) -> Session:
    """Build a ``Session`` with the role's default settings, optionally changed.

    The relay's session uses :data:`RELAY_MAX_CONN_WINDOW` and :data:`RELAY_RECEIVE_BUDGET`,
    the client's the core's 64 MiB window maximum and :data:`CLIENT_RECEIVE_BUDGET`.

    Args:
        role: CLIENT or SERVER.
        idle_timeout: Receive-silence limit in seconds (0 or None: the default).
        settings_overrides: ``Settings`` field names mapped to values (tests use small windows).
        receive_budget: Overrides the receive budget (bytes; see ``SessionConfig``).
        open_rate: Inbound OPENs taken per second (burst: twice as many); None: the default.
    """
    from muxtunnel.protocol.frames import Settings

    values: dict[str, int] = {"max_concurrent_streams": 0 if role == Role.SERVER else 16_384}
    if idle_timeout:
        # The wire allows 5 s .. 1 h (protocol-spec §5.3); clamp rather than fail.
        values["idle_timeout_ms"] = min(max(round(idle_timeout * 1000), 5_000), 3_600_000)
    values.update(settings_overrides or {})
    config = SessionConfig(settings=Settings(**values), quantum=SCHEDULER_QUANTUM)
    if role == Role.SERVER:
        config = dataclasses.replace(config, max_conn_window=RELAY_MAX_CONN_WINDOW)
        default_budget = RELAY_RECEIVE_BUDGET
    else:
        default_budget = CLIENT_RECEIVE_BUDGET
    config = dataclasses.replace(
        config, receive_budget=default_budget if receive_budget is None else receive_budget
    )
    if open_rate is not None:
        config = dataclasses.replace(
            config, open_rate=open_rate, open_burst=max(1, round(2 * open_rate))
        )
    return Session(role, config)


@asynccontextmanager
async def open_mux_connection(
    transport: trio.abc.Stream,
    session: Session,
    *,
    name: str = "",
) -> AsyncIterator[MuxConnection]:
    """Run a :class:`MuxConnection` for the duration of an ``async with`` block.

    On exit the connection is closed gracefully (CLOSE NO_ERROR, bounded by CLOSE_GRACE).
    """
    conn = MuxConnection(transport, session, name=name)
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            yield conn
        finally:
            conn.close()
            with trio.move_on_after(CLOSE_GRACE + 1):
                await conn.wait_closed()
            nursery.cancel_scope.cancel()
