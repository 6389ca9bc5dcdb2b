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
import socket
import struct
from dataclasses import dataclass

import trio

from muxtunnel.connection import MuxStream, MuxStreamResetError, OpenRejectedError
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
        self, tcp: trio.abc.HalfCloseableStream, mux: MuxStream, policy: StreamPolicy
    ) -> None:
        self.tcp = tcp
        self.mux = mux
        self.policy = policy
        self.result = SpliceResult()
        self.scope: trio.CancelScope | None = None
        self.sock = tcp.socket if isinstance(tcp, trio.SocketStream) else None

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
        failure = self.mux.failure or "session ended"
        if failure.startswith("rejected"):
            return  # not open yet: both directions wait on the stream and see the rejection
        self._fail(f"mux stream failed: {failure}", mux_code=None)

    def _rejected(self, exc: OpenRejectedError) -> None:
        self.result.rejected = True
        self.result.reject_reason = exc.reason
        self._fail(str(exc), mux_code=None)

    async def tcp_to_mux(self) -> None:
        tcp, mux, policy, info = self.tcp, self.mux, self.policy, self.mux.info
        while True:
            try:
                if mux.send_blocked and self.sock is not None:
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
                data = await tcp.receive_some(min(room, COPY_CHUNK))
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
                    await mux.send_eof()
                    return
                await mux.send_all(data)
            except OpenRejectedError as exc:
                self._rejected(exc)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"mux stream failed: {exc}", mux_code=None)
                return
            await policy.throttle(info, Direction.OUT, len(data))

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
            room = await self.mux.send_room()
            nursery.cancel_scope.cancel()
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
                    await tcp.send_eof()
                    return
                # Credit returns piece by piece as the bytes are written, so the peer can send
                # the next ones while a large batch is still going out.
                view = memoryview(chunk)
                for start in range(0, len(view), ACK_PIECE):
                    piece = view[start : start + ACK_PIECE]
                    await tcp.send_all(piece)
                    mux.acknowledge(len(piece))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(f"local write failed: {exc}", mux_code=ErrorCode.CONNECT_ERROR)
                return
            await policy.throttle(info, Direction.IN, len(chunk))


async def splice(
    tcp: trio.abc.HalfCloseableStream,
    mux: MuxStream,
    *,
    policy: StreamPolicy = DEFAULT_POLICY,
) -> SpliceResult:
    """Copy both ways until both directions finished or one side failed; close both.

    Never raises for I/O errors: they are returned in the result (and turned into RESET / RST).
    Cancellation resets the mux stream and aborts the TCP side.
    """
    state = _Splice(tcp, mux, policy)
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
        if clean:
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


def _mux_failure(mux: MuxStream) -> str:
    """Classify why ``mux`` failed (see :attr:`SpliceResult.mux_failure`)."""
    failure = mux.failure  # "KIND CODE: message"
    if failure is None:  # I/O refused because the connection is no longer usable
        return "session"
    kind = failure.partition(" ")[0]
    if kind in ("session", "rejected"):
        return kind
    # MuxConnection resets a stream whose received data is not consumed with this message.
    return "stalled" if "stalled:" in failure else "reset"


async def _wait_reset(sock: trio.socket.SocketType) -> None:
    """Return once the TCP connection of ``sock`` is reset or gone (state CLOSE).

    Waits for readability first (data, FIN or an error), then looks at the TCP state every
    :data:`RESET_POLL` seconds: pending data or a FIN (a legitimate half-close) keep the socket
    readable, so readiness alone cannot tell a reset apart.
    """
    await trio.lowlevel.wait_readable(sock)
    while True:
        if _tcp_closed(sock):
            return
        await trio.sleep(RESET_POLL)


def _tcp_closed(sock: trio.socket.SocketType) -> bool:
    try:
        if _TCP_INFO is not None:
            return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] == _TCP_STATE_CLOSE
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:
        return True


async def _graceful_close(tcp: trio.abc.HalfCloseableStream) -> None:
    try:
        await tcp.aclose()
    except (trio.BrokenResourceError, OSError):
        await trio.aclose_forcefully(tcp)
