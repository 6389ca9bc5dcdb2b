"""splice(): half-close kept, resets mapped to RST both ways, policy hooks called."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
import trio
import trio.testing

from muxtunnel.connection import MuxStream, MuxStreamResetError
from muxtunnel.errors import ErrorCode
from muxtunnel.policy import Direction, StreamInfo, StreamPolicy
from muxtunnel.splice import RESET_POLL, SpliceResult, splice
from tests.conftest import mux_connection_pair, mux_stream_pair


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0]:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    return client, server


class RecordingPolicy(StreamPolicy):
    def __init__(self) -> None:
        self.moved: dict[Direction, int] = {Direction.IN: 0, Direction.OUT: 0}
        self.finished_with: list[tuple[int, int, str | None]] = []

    def prologue(self, info: StreamInfo) -> bytes:
        return f"PROXY TCP4 {info.origin.host} 127.0.0.1 {info.origin.port} 0\r\n".encode()

    async def throttle(self, info: StreamInfo, direction: Direction, nbytes: int) -> None:
        self.moved[direction] += nbytes
        await trio.lowlevel.checkpoint()

    def finished(self, info: StreamInfo, now: float, error: str | None) -> None:
        self.finished_with.append((info.bytes_in, info.bytes_out, error))


async def _setup(nursery: trio.Nursery) -> tuple[MuxStream, MuxStream]:
    server, client = await mux_connection_pair(nursery)
    return await mux_stream_pair(server, client)


async def test_half_close_both_ways_and_policy(nursery: trio.Nursery) -> None:
    far, near = await _setup(nursery)  # far: the peer's end of the mux stream
    app, local = await tcp_pair()  # app: the local application; local: what splice copies
    policy = RecordingPolicy()
    results: list[SpliceResult] = []
    done = trio.Event()

    async def run() -> None:
        results.append(await splice(local, near, policy=policy))
        done.set()

    nursery.start_soon(run)
    with trio.fail_after(10):
        # The application sees the prologue first.
        header = await app.receive_some(100)
        assert header.startswith(b"PROXY TCP4 127.0.0.1 ")
        # Peer -> app, then the peer half-closes: the app reads EOF but can still answer.
        await far.send_all(b"request")
        await far.send_eof()
        got = b""
        while chunk := await app.receive_some(100):
            got += chunk
        assert got == b"request"
        await app.send_all(b"response after FIN")
        await app.send_eof()
        reply = b""
        while chunk := await far.receive_some(100):
            reply += chunk
        assert reply == b"response after FIN"
        await app.aclose()
        await far.aclose()
        await done.wait()
    assert results[0].error is None
    assert policy.moved[Direction.IN] == len(b"request")
    assert policy.moved[Direction.OUT] == len(b"response after FIN")
    assert policy.finished_with == [(len(b"request"), len(b"response after FIN"), None)]


async def test_mux_reset_becomes_tcp_rst(nursery: trio.Nursery) -> None:
    far, near = await _setup(nursery)
    app, local = await tcp_pair()
    nursery.start_soon(splice, local, near)
    await far.send_all(b"partial")
    async with app:
        await _expect_rst(app, far)


async def _expect_rst(app: trio.SocketStream, far: MuxStream) -> None:
    with trio.fail_after(10):
        assert await app.receive_some(100) == b"partial"
        far.reset(ErrorCode.CONNECT_ERROR)
        with pytest.raises(trio.BrokenResourceError) as info:
            await app.receive_some(100)
    cause = info.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == errno.ECONNRESET


async def test_tcp_rst_becomes_mux_reset(nursery: trio.Nursery) -> None:
    far, near = await _setup(nursery)
    app, local = await tcp_pair()
    results: list[SpliceResult] = []
    done = trio.Event()

    async def run() -> None:
        results.append(await splice(local, near))
        done.set()

    nursery.start_soon(run)
    await app.send_all(b"bye")
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(app)

    async def read_all() -> None:
        # "bye" may or may not arrive first: a RESET drops data not yet framed.
        while await far.receive_some(100):
            pass

    with trio.fail_after(10), pytest.raises(MuxStreamResetError) as info:
        await read_all()
    assert info.value.error_code == ErrorCode.CONNECT_ERROR
    with trio.fail_after(5):
        await done.wait()
    assert results[0].error is not None


async def test_reset_while_blocked_on_a_silent_local_peer_ends_the_splice(
    nursery: trio.Nursery,
) -> None:
    """A local peer that neither reads nor writes keeps both directions of the splice waiting
    on its socket; a RESET of the stream (by the peer, or by the stall policy of
    protocol-spec §8.7) must still end the splice at once and free the socket."""
    far, near = await _setup(nursery)
    app, local = await tcp_pair()
    # Small kernel buffers: the splice blocks writing to ``app`` after a few hundred KiB.
    app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    results: list[SpliceResult] = []
    done = trio.Event()

    async def run() -> None:
        results.append(await splice(local, near))
        done.set()

    nursery.start_soon(run)
    sent = 0
    with trio.move_on_after(3):  # until the windows and socket buffers are full
        while True:
            await far.send_all(b"x" * 65536)
            sent += 65536
    assert sent, "nothing could be sent"
    assert not done.is_set()
    far.reset(ErrorCode.CANCEL)
    with trio.fail_after(5):
        await done.wait()
    error = results[0].error
    assert error is not None
    assert "mux stream failed" in error
    assert results[0].failed_side == "mux"

    async def drain() -> None:
        while await app.receive_some(65536):
            pass

    async with app:
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await drain()


async def _blocked_on_window(
    nursery: trio.Nursery,
) -> tuple[MuxStream, trio.SocketStream, list[SpliceResult], trio.Event]:
    """A splice whose stream peer (``far``, returned) half-closes at once and reads nothing;
    the local application (returned) has big kernel buffers, so it can write far more than the
    stream's 16 KiB window before blocking."""
    server, client = await mux_connection_pair(nursery, settings={"initial_stream_window": 16384})
    far, near = await mux_stream_pair(server, client)
    app, local = await tcp_pair()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    local.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    results: list[SpliceResult] = []
    done = trio.Event()

    async def run() -> None:
        results.append(await splice(local, near))
        done.set()

    nursery.start_soon(run)
    await far.send_eof()
    with trio.fail_after(10):
        assert await app.receive_some(100) == b""  # the splice passed the half-close on
    return far, app, results, done


async def test_an_answer_closed_by_both_sides_is_not_taken_for_a_reset(
    nursery: trio.Nursery,
) -> None:
    """The peer half-closed, the local application answers more than the window and closes:
    both sides of the local connection have sent FIN (Linux: TCP state CLOSE, the answer still
    unread) while the splice waits for window. Every byte arrives, then a clean EOF."""
    far, app, results, done = await _blocked_on_window(nursery)
    answer = bytes(range(256)) * 1024  # 256 KiB
    with trio.fail_after(10):
        await app.send_all(answer)
    await app.aclose()
    await trio.sleep(RESET_POLL * 3)  # the splice watches the local socket meanwhile
    got = bytearray()
    with trio.fail_after(10):
        while chunk := await far.receive_some(65536):
            got += chunk
        await done.wait()
    assert got == answer
    assert results[0].error is None


async def test_a_reset_while_blocked_on_the_window_is_noticed(nursery: trio.Nursery) -> None:
    """The local application resets while the splice waits for window: the stream is reset
    within a few RESET_POLL periods, not when the window opens."""
    far, app, results, done = await _blocked_on_window(nursery)
    with trio.fail_after(10):
        await app.send_all(b"x" * 65536)
    await trio.sleep(RESET_POLL * 2)  # the splice watches the local socket meanwhile
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(app)
    with trio.fail_after(RESET_POLL * 6):
        await done.wait()
    assert results[0].error is not None
    assert results[0].failed_side == "tcp"

    async def drain() -> None:
        while await far.receive_some(65536):
            pass

    with pytest.raises(MuxStreamResetError):
        await drain()


class _SwitchablePolicy(StreamPolicy):
    """Counts what ``throttle`` sees; ``limited`` is what ``throttles`` answers."""

    def __init__(self) -> None:
        self.limited = True
        self.moved: dict[Direction, int] = {Direction.IN: 0, Direction.OUT: 0}

    async def throttle(self, info: StreamInfo, direction: Direction, nbytes: int) -> None:
        self.moved[direction] += nbytes
        await trio.lowlevel.checkpoint()

    def throttles(self, info: StreamInfo) -> bool:
        return self.limited


async def test_throttle_sees_every_byte_while_the_policy_throttles(nursery: trio.Nursery) -> None:
    """The reader's shortcut into the local socket skips ``throttle``: it is taken only while
    the policy says the stream is not throttled, asked at every write."""
    far, near = await _setup(nursery)
    app, local = await tcp_pair()
    policy = _SwitchablePolicy()
    nursery.start_soon(lambda: splice(local, near, policy=policy))

    async def exchange(data: bytes) -> None:
        await far.send_all(data)
        got = b""
        while len(got) < len(data):
            got += await app.receive_some(1 << 16)
        assert got == data

    with trio.fail_after(10):
        for _ in range(20):
            await exchange(b"limited")
        assert policy.moved[Direction.IN] == 20 * len(b"limited")
        policy.limited = False
        await trio.testing.wait_all_tasks_blocked()  # the splice waits for data
        for _ in range(20):
            await exchange(b"free")
            await trio.testing.wait_all_tasks_blocked()
        # Written by the connection's reader: the policy was not asked to throttle them.
        assert policy.moved[Direction.IN] == 20 * len(b"limited")
        policy.limited = True
        await exchange(b"limited again")
        assert policy.moved[Direction.IN] == 20 * len(b"limited") + len(b"limited again")
    await far.aclose()
    await app.aclose()
