"""The data path's shortcuts: sends that need no task switch, and the reader's direct sink."""

from __future__ import annotations

import select
import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from muxtunnel.tls import client_ssl_context, load_or_create_identity, server_ssl_context
from muxtunnel.tlsstream import TLSStream
from tests.conftest import mux_connection_pair, mux_stream_pair

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings("error")


async def _tls_pair(tmp_path: Path) -> tuple[TLSStream, TLSStream]:
    """(client, server) TLSStreams over loopback TCP, handshaken."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    c_tcp = await trio.open_tcp_stream("127.0.0.1", port)
    s_tcp = await listeners[0].accept()
    await listeners[0].aclose()
    identity = load_or_create_identity(tmp_path / "relay")
    client = TLSStream(c_tcp, client_ssl_context(), server_hostname="localhost")
    server = TLSStream(s_tcp, server_ssl_context(identity), server_side=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(client.do_handshake)
            n.start_soon(server.do_handshake)
    return client, server


def _raw(stream: TLSStream) -> socket.socket:
    transport = stream.transport_stream
    assert isinstance(transport, trio.SocketStream)
    return socket.fromfd(transport.socket.fileno(), socket.AF_INET, socket.SOCK_STREAM)  # a dup


async def test_send_nowait_leaves_the_rest_in_order(tmp_path: Path) -> None:
    client, server = await _tls_pair(tmp_path)
    transport = client.transport_stream
    assert isinstance(transport, trio.SocketStream)
    transport.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    payload = bytes(range(256)) * 8192  # 2 MiB: more than the socket takes at once
    ready_before = client.can_send_nowait
    assert client.send_nowait(payload) is False
    ready_after = client.can_send_nowait  # False until a send_all has sent the backlog
    assert (ready_before, ready_after) == (True, False)
    assert client.backlog > 0
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(payload) + 4:
            data = await server.receive_some(1 << 20)
            assert data
            got.extend(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(read_all)
            await client.send_all(b"tail")
    assert client.backlog == 0
    assert bytes(got) == payload + b"tail"
    assert client.send_nowait(b"small") is True
    with trio.fail_after(10):
        assert await server.receive_some(100) == b"small"
    await client.aclose()
    await server.aclose()


async def test_a_quiet_connection_sends_without_a_task_switch(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With the writer asleep, queued stream data is on the socket before any checkpoint."""
    client_tls, server_tls = await _tls_pair(tmp_path)
    relay, client = await mux_connection_pair(nursery, (server_tls, client_tls))
    s, c = await mux_stream_pair(relay, client)
    await trio.testing.wait_all_tasks_blocked()  # both writers asleep
    peer = _raw(client_tls)
    try:
        assert select.select([peer], [], [], 0)[0] == []
        assert s.send_nowait(b"keystroke") == len(b"keystroke")  # no await from here on
        assert server_tls.backlog == 0
        assert select.select([peer], [], [], 5.0)[0] == [peer]
    finally:
        peer.close()
    with trio.fail_after(10):
        assert await c.receive_some(100) == b"keystroke"


async def test_send_nowait_refuses_while_another_send_waits(nursery: trio.Nursery) -> None:
    relay, client = await mux_connection_pair(nursery)
    s, _c = await mux_stream_pair(relay, client)
    # Nobody reads: the windows fill up and this send_all waits for room (until the test's
    # nursery is cancelled).
    nursery.start_soon(s.send_all, bytes(64 << 20))
    await trio.testing.wait_all_tasks_blocked()
    assert s.send_blocked
    with pytest.raises(trio.BusyResourceError):
        s.send_nowait(b"x")


async def test_send_eof_nowait_ends_the_direction_like_send_eof(nursery: trio.Nursery) -> None:
    relay, client = await mux_connection_pair(nursery)
    s, c = await mux_stream_pair(relay, client)
    s.send_nowait(b"last words")
    s.send_eof_nowait()
    s.send_eof_nowait()  # idempotent, like send_eof
    got = b""
    with trio.fail_after(5):
        while chunk := await c.receive_some(100):
            got += chunk
    assert got == b"last words"  # the data first, then the FIN
    with pytest.raises(trio.ClosedResourceError):
        s.send_nowait(b"more")  # the direction is finished
    await c.send_all(b"reply")  # the other direction still works
    assert await s.receive_some(100) == b"reply"
    s.close_nowait()
    with pytest.raises(trio.ClosedResourceError):
        s.send_eof_nowait()


async def test_send_eof_nowait_refuses_while_another_send_waits(nursery: trio.Nursery) -> None:
    relay, client = await mux_connection_pair(nursery)
    s, _c = await mux_stream_pair(relay, client)
    nursery.start_soon(s.send_all, bytes(64 << 20))  # nobody reads: it waits for room
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.BusyResourceError):
        s.send_eof_nowait()


async def test_close_nowait_closes_like_aclose(nursery: trio.Nursery) -> None:
    relay, client = await mux_connection_pair(nursery)
    s, c = await mux_stream_pair(relay, client)
    await s.send_all(b"bye")
    s.close_nowait()
    s.close_nowait()  # idempotent, like aclose
    with trio.fail_after(5):
        assert await c.receive_some(100) == b"bye"
        assert await c.receive_some(100) == b""  # FIN: nothing was left unread
    with pytest.raises(trio.ClosedResourceError):
        await s.send_all(b"x")
    await c.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert relay.stream_count == client.stream_count == 0  # both sides forgot the stream


async def test_direct_sink_takes_data_for_a_waiting_reader(nursery: trio.Nursery) -> None:
    relay, client = await mux_connection_pair(nursery)
    s, c = await mux_stream_pair(relay, client)
    sunk: list[bytes] = []

    def sink(data: bytes | memoryview) -> int:
        sunk.append(bytes(data[:3]))
        return min(3, len(data))  # takes part: the rest is buffered for the reader

    c.direct_sink = sink
    received: list[bytes] = []
    done = trio.Event()

    async def reader() -> None:
        received.append(await c.receive_some(100))
        done.set()

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    await s.send_all(b"hello")
    with trio.fail_after(10):
        await done.wait()
    assert sunk == [b"hel"]
    assert received == [b"lo"]
    assert c.info.bytes_in == 5
    # A reader that is not waiting (data already buffered) gets everything in order.
    await s.send_all(b"abc")
    await s.send_all(b"def")
    await trio.testing.wait_all_tasks_blocked()
    c.direct_sink = None
    with trio.fail_after(10):
        got = b""
        while len(got) < 6:
            got += await c.receive_some(100)
    assert got == b"abcdef"
    assert sunk == [b"hel"]
