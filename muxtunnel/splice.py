"""Copy bytes both ways between a local TCP stream and a mux stream.

Two copy loops run side by side, one per direction, so a local application that writes without
reading never blocks the other direction. EOF on one side becomes
``send_eof()`` on the other (TCP half-close kept: a FIN travels as FIN). Any error or reset
aborts both sides: the mux stream gets RESET(CONNECT_ERROR) (or the peer's reset stands), and the
TCP socket is closed with ``SO_LINGER`` = (1, 0) so its peer sees an RST instead of a clean EOF
(RFC 9113 §8.5; protocol-spec §9.8).

Buffers and memory: the mux→TCP direction hands the stream's received chunks (read-only views
of the decrypted record) straight to ``send_all`` without copying, and acknowledges them only
once they are written: until then they count against the stream's receive window, so a local
application that does not read holds the stream at its window (and shows as stalled, spec §8.7)
instead of making us hold a further chunk outside flow control. The TCP→mux direction asks the
stream for its send room first and reads at most that much with ``receive_some`` (trio's stream
API has no ``recv_into``): a stream whose peer does not read keeps at most
``muxtunnel.connection.SEND_LOW_WATER`` bytes in our memory, and the rest waits in the kernel.
The fresh ``bytes`` read is passed to the session without another copy.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass

import trio

from muxtunnel.connection import FailureKind, MuxStream, MuxStreamResetError, OpenRejectedError
from muxtunnel.errors import ErrorCode
from muxtunnel.policy import DEFAULT_POLICY, Direction, StreamPolicy

__all__ = ["COPY_CHUNK", "SpliceResult", "abort_tcp", "splice"]

logger = logging.getLogger(__name__)

#: Most bytes read from the local socket per ``receive_some`` (when the stream has the room).
#: 256 KiB (four DATA frames): fewer, larger reads and hand-offs cost less CPU per byte.
COPY_CHUNK = 256 * 1024
#: The mux->TCP direction writes a batch in pieces of this size and returns each piece's credit
#: once it is written.
ACK_PIECE = 64 * 1024
#: Whether local reads and writes are tried on the raw socket first (``MUXTUNNEL_SPLICE_RAW=0``
#: turns it off, for A/B measurements).
RAW_SOCKET = os.environ.get("MUXTUNNEL_SPLICE_RAW", "1") == "1"
#: A local read shorter than this suggests interactive traffic: the next read waits for
#: readability first (a bulk sender's socket usually has more, so it is read at once).
SMALL_READ = 16 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)
#: While a stream is blocked on its peer's window, how often (seconds) a readable local socket
#: is checked for a reset.
RESET_POLL = 0.5
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
#: ``tcpi_state`` of a connection that was reset or fully closed (Linux ``TCP_CLOSE``).
_TCP_STATE_CLOSE = 7


@dataclass(slots=True)
class SpliceResult:
    """How a splice ended."""

    #: None for a clean end (both directions finished with FIN), else what went wrong.
    error: str | None = None
    #: True if the peer refused the stream (OPEN_FAIL).
    rejected: bool = False
    #: The OPEN_FAIL reason (``OpenFailReason`` value) when ``rejected``.
    reject_reason: int | None = None
    #: Which side failed first: "tcp" (the local socket: read or write error, reset) or "mux"
    #: (the stream: see ``mux_failure``); None for a clean end or a cancellation.
    failed_side: str | None = None
    #: How the stream failed when ``failed_side`` is "mux": "reset" (RESET from the peer),
    #: "stalled" (reset here: received data not consumed, protocol-spec §8.7), "session" (its
    #: connection ended) or "rejected" (OPEN_FAIL).
    mux_failure: str | None = None
    #: Which side sent its FIN first ("tcp" or "mux"); None if neither did.
    first_eof: str | None = None


async def abort_tcp(stream: trio.abc.AsyncResource) -> None:
    """Close a TCP stream so its peer sees an RST (``SO_LINGER`` on with a zero timeout)."""
    if isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except (OSError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


class _Splice:
    def __init__(
        self,
        tcp: trio.abc.HalfCloseableStream,
        mux: MuxStream,
        policy: StreamPolicy,
        direct: bool | None,
    ) -> None:
        self.tcp = tcp
        self.mux = mux
        self.policy = policy
        self.result = SpliceResult()
        self.scope: trio.CancelScope | None = None
        self.sock = tcp.socket if isinstance(tcp, trio.SocketStream) else None
        #: The non-blocking stdlib socket under ``tcp`` (None for other streams): reads and
        #: writes are tried on it directly and wait only when the kernel says so.
        self.raw = _stdlib_socket(self.sock) if RAW_SOCKET else None
        #: The last local read was small (interactive traffic): the socket is most likely empty,
        #: so the next read waits for readability first instead of failing with EAGAIN.
        self.short_read = False
        #: Whether the last ``_receive_local`` waited for readability (a schedule point).
        self.waited = False
        #: Let the connection's reader write arriving bytes straight into the local socket
        #: (None: while ``policy.throttles`` says no, asked at every write).
        self.direct = direct is not False and self.raw is not None
        self.ask_policy = direct is None

    def _fail(self, error: str, *, mux_code: ErrorCode | None) -> None:
        if self.result.error is None:
            self.result.error = error
            if mux_code is None:
                self.result.failed_side = "mux"
                self.result.mux_failure = _mux_failure(self.mux)
            else:
                self.result.failed_side = "tcp"
                self.mux.reset(mux_code, error)
        if self.scope is not None:
            self.scope.cancel()

    def stream_failed(self) -> None:
        """The mux stream failed under us (see :attr:`MuxStream.on_failure`)."""
        failure = self.mux.failure
        if failure is not None and failure.kind is FailureKind.REJECTED:
            return  # not open yet: both directions wait on the stream and see the rejection
        self._fail(f"mux stream failed: {failure or 'session ended'}", mux_code=None)

    def _rejected(self, exc: OpenRejectedError) -> None:
        self.result.rejected = True
        self.result.reject_reason = exc.reason
        self._fail(str(exc), mux_code=None)

    async def tcp_to_mux(self) -> None:
        mux, policy, info = self.mux, self.policy, self.mux.info
        raw = self.raw
        while True:
            # With a raw socket: no schedule point when there is room already and the read
            # waits anyway (an idle stream's round is one task run); one checkpoint a round
            # otherwise, so a busy stream still lets the others run.
            room = mux.send_room_now if raw is not None else 0
            yielded = room <= 0
            try:
                if room > 0:
                    pass
                elif mux.send_blocked and self.sock is not None:
                    room = await self._send_room_watching_reset(self.sock)
                else:
                    room = await mux.send_room()
            except OpenRejectedError as exc:
                self._rejected(exc)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"mux stream failed: {exc}", mux_code=None)
                return
            try:
                data = await self._receive_local(min(room, COPY_CHUNK))
            except (trio.BrokenResourceError, OSError) as exc:
                self._fail(f"local read failed: {exc}", mux_code=ErrorCode.CONNECT_ERROR)
                return
            except trio.ClosedResourceError:
                self._fail("local socket closed", mux_code=ErrorCode.CONNECT_ERROR)
                return
            try:
                if not data:
                    if self.result.first_eof is None:
                        self.result.first_eof = "tcp"
                    if raw is None:
                        await mux.send_eof()
                    else:
                        mux.send_eof_nowait()  # the loop ends: no schedule point needed here
                    return
                if raw is None:
                    await mux.send_all(data)
                else:
                    taken = mux.send_nowait(bytes(data) if type(data) is not bytes else data)
                    if taken < len(data):
                        await mux.send_all(data[taken:])
                    elif not (yielded or self.waited):
                        await trio.lowlevel.checkpoint()
            except OpenRejectedError as exc:
                self._rejected(exc)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"mux stream failed: {exc}", mux_code=None)
                return
            if policy.throttles(info):
                await policy.throttle(info, Direction.OUT, len(data))

    async def _receive_local(self, max_bytes: int) -> bytes | bytearray:
        """``tcp.receive_some(max_bytes)`` without its extra schedule point.

        Reading from the raw socket is safe without one: every loop around this call has a
        schedule point (``send_room`` and ``send_all`` on the mux stream).
        """
        raw = self.raw
        if raw is None:
            return await self.tcp.receive_some(max_bytes)
        self.waited = self.short_read
        if self.short_read:
            await _wait_readable(raw)
        while True:
            try:
                data = raw.recv(max_bytes)
            except BlockingIOError:
                self.waited = True
                await _wait_readable(raw)
                continue
            except OSError as exc:
                if raw.fileno() == -1:
                    raise trio.ClosedResourceError("the local socket was closed") from exc
                raise
            self.short_read = len(data) < SMALL_READ
            return data

    async def _send_local(self, data: memoryview) -> None:
        """``tcp.send_all(data)``, trying the raw socket first (no schedule point when it takes
        everything: the loop's ``receive_batch`` has one)."""
        raw = self.raw
        if raw is not None:
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if raw.fileno() == -1:
                    raise trio.ClosedResourceError("the local socket was closed") from exc
                raise
            if sent == len(data):
                return
            data = data[sent:]
        await self.tcp.send_all(data)

    def _sink(self, data: bytes | memoryview) -> int:
        """:attr:`MuxStream.direct_sink`: what the local socket takes now without waiting.

        Errors and a full socket take nothing: the bytes are then buffered in the stream and
        this task's own write meets the error (or waits) as usual.
        """
        raw = self.raw
        if raw is None or self.result.error is not None:
            return 0
        if self.ask_policy and self.policy.throttles(self.mux.info):
            return 0  # a limit applies now: the copy loop writes and calls ``throttle``
        try:
            return raw.send(data)
        except OSError:
            return 0

    async def _send_room_watching_reset(self, sock: trio.socket.SocketType) -> int:
        """``mux.send_room()``, while watching the local socket for a reset.

        A stream blocked on its peer's window reads nothing from its socket, so without this
        a local peer that resets (or vanishes) would keep its socket, descriptor and stream
        until the window opened: a tunnel full of blocked, dead connections admits nobody.
        """
        # Most waits are short (a window update is on its way): no watcher for those.
        with trio.move_on_after(RESET_POLL):
            return await self.mux.send_room()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await _wait_reset(sock)
                self._fail("local connection reset", mux_code=ErrorCode.CONNECT_ERROR)

            nursery.start_soon(watch)
            failure: Exception | None = None
            room = 0
            try:
                room = await self.mux.send_room()
            except Exception as exc:
                # Raised out of the nursery, the stream's error would come wrapped in an
                # ExceptionGroup that the caller's ``except`` does not match (and would end
                # the whole session's handler): hand it over as it is.
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return room

    async def mux_to_tcp(self) -> None:
        tcp, mux, policy, info = self.tcp, self.mux, self.policy, self.mux.info
        prologue = policy.prologue(info)
        try:
            if prologue:
                await tcp.send_all(prologue)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"local write failed: {exc}", mux_code=ErrorCode.CONNECT_ERROR)
            return
        if self.direct:
            mux.direct_sink = self._sink
        while True:
            try:
                chunk = await mux.receive_batch(COPY_CHUNK, acknowledge=False)
            except OpenRejectedError as exc:
                self._rejected(exc)
                return
            except (MuxStreamResetError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"mux stream failed: {exc}", mux_code=None)
                return
            try:
                if not chunk:
                    if self.result.first_eof is None:
                        self.result.first_eof = "mux"
                    if self.sock is None:
                        await tcp.send_eof()
                    else:  # receive_batch had the schedule point; the loop ends here
                        self.sock.shutdown(socket.SHUT_WR)
                    return
                # Credit returns piece by piece as the bytes are written, so the peer can send
                # the next ones while a large batch is still going out.
                view = memoryview(chunk)
                for start in range(0, len(view), ACK_PIECE):
                    piece = view[start : start + ACK_PIECE]
                    await self._send_local(piece)
                    mux.acknowledge(len(piece))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(f"local write failed: {exc}", mux_code=ErrorCode.CONNECT_ERROR)
                return
            if policy.throttles(info):
                await policy.throttle(info, Direction.IN, len(chunk))


async def splice(
    tcp: trio.abc.HalfCloseableStream,
    mux: MuxStream,
    *,
    policy: StreamPolicy = DEFAULT_POLICY,
    direct: bool | None = None,
) -> SpliceResult:
    """Copy both ways until both directions finished or one side failed; close both.

    Never raises for I/O errors: they are returned in the result (and turned into RESET / RST).
    Cancellation resets the mux stream and aborts the TCP side.

    With ``direct`` (default None: whenever ``policy.throttles(mux.info)`` is False at the
    time of the write), the connection's reader writes arriving bytes straight into the
    local socket while this splice waits for them (:attr:`MuxStream.direct_sink`); only what
    the socket does not take at once goes through the stream's buffer and this task, which
    calls ``throttle``. ``direct=True`` skips the question (for a policy whose ``throttle``
    never waits); ``direct=False`` turns the shortcut off.
    """
    state = _Splice(tcp, mux, policy, direct)
    clean = False
    try:
        async with trio.open_nursery() as nursery:
            state.scope = nursery.cancel_scope
            # A stream that fails while both directions wait on the local socket (reset by
            # the stall policy, protocol-spec §8.7, while the local peer neither reads nor
            # writes) ends the splice at once instead of when the local peer next acts.
            mux.on_failure = state.stream_failed
            nursery.start_soon(state.tcp_to_mux)
            await state.mux_to_tcp()  # the other direction runs in this task: one spawn less
        clean = state.result.error is None
    finally:
        mux.on_failure = None
        mux.direct_sink = None
        if clean:
            if isinstance(tcp, trio.SocketStream):
                # Closed without the schedule points of ``aclose``: the nursery's exit had one.
                tcp.socket.close()
                mux.close_nowait()
            else:
                await _graceful_close(tcp)
                await mux.aclose()
        else:
            if state.result.error is None:
                state.result.error = "cancelled"
            mux.reset(
                ErrorCode.CANCEL if state.result.error == "cancelled" else ErrorCode.CONNECT_ERROR
            )
            await abort_tcp(tcp)
        policy.finished(mux.info, trio.current_time(), state.result.error)
    return state.result


def _stdlib_socket(sock: trio.socket.SocketType | None) -> socket.socket | None:
    """The non-blocking stdlib socket inside a trio socket, or None."""
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, socket.socket) and not raw.getblocking() else None


async def _wait_readable(raw: socket.socket) -> None:
    if raw.fileno() == -1:
        raise trio.ClosedResourceError("the local socket was closed")
    await trio.lowlevel.wait_readable(raw)


def _mux_failure(mux: MuxStream) -> str:
    """Classify why ``mux`` failed (see :attr:`SpliceResult.mux_failure`)."""
    failure = mux.failure
    if failure is None:  # I/O refused because the connection is no longer usable
        return "session"
    return failure.kind.value  # "reset", "stalled", "rejected" or "session"


async def _wait_reset(sock: trio.socket.SocketType) -> None:
    """Return once the TCP connection of ``sock`` is reset or gone (state CLOSE with an error).

    Waits for readability first (data, FIN or an error), then looks at the TCP state every
    :data:`RESET_POLL` seconds: pending data or a FIN (a legitimate half-close) keep the socket
    readable, so readiness alone cannot tell a reset apart. A connection both sides closed
    (our FIN after the peer's half-close, then the local peer's FIN) is in state CLOSE too on
    Linux, with its last bytes possibly still unread: no error, so no reset.
    """
    await trio.lowlevel.wait_readable(sock)
    while True:
        if _tcp_closed(sock):
            return
        await trio.sleep(RESET_POLL)


def _tcp_closed(sock: trio.socket.SocketType) -> bool:
    try:
        if (
            _TCP_INFO is not None
            and sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] != _TCP_STATE_CLOSE
        ):
            return False
        # A reset (or a timeout) leaves an error; a close by both sides does not.
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:
        return True


async def _graceful_close(tcp: trio.abc.HalfCloseableStream) -> None:
    try:
        await tcp.aclose()
    except (trio.BrokenResourceError, OSError):
        await trio.aclose_forcefully(tcp)
