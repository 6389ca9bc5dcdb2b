"""Streams that do not read never block the others, and what they make us hold is bounded.

Relay and client run in process over real TLS and loopback sockets (spec §8.5, §8.7, §9.2).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel import connection
from muxtunnel.config import TunnelSpec, build_client_config, build_server_config
from muxtunnel.connection import (
    SEND_LOW_WATER,
    MuxConnection,
    MuxStreamResetError,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import ConfigError
from muxtunnel.handshake import client_handshake
from muxtunnel.protocol.constants import Role
from muxtunnel.splice import splice
from muxtunnel.tls import client_ssl_context
from tests.conftest import (
    TOKEN,
    connect,
    mux_connection_pair,
    mux_stream_pair,
    random_bytes,
    start_client,
    start_echo,
    start_relay,
)

if TYPE_CHECKING:
    from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
SMALL_BUFFER = 8 * KiB


async def _serve_small_buffers(
    handler_bytes: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A local service that never reads and writes ``handler_bytes`` to each connection."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    listener = trio.SocketListener(sock)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            chunk = bytes(64 * KiB)
            for _ in range(handler_bytes // len(chunk)):
                await stream.send_all(chunk)
            await trio.sleep_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async with trio.open_nursery() as nursery:
        task_status.started(sock.getsockname()[1])
        await trio.serve_listeners(handler, [listener], handler_nursery=nursery)


class _Visitors:
    """Visitors that upload ``limit`` bytes each and never read (small receive buffers)."""

    def __init__(self) -> None:
        self.progress: list[int] = []
        self.failed = 0
        self.failed_event = trio.Event()

    async def visit(self, port: int, limit: int) -> None:
        index = len(self.progress)
        self.progress.append(0)
        with trio.socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            chunk = bytes(64 * KiB)
            try:
                for _ in range(limit // len(chunk)):
                    await stream.send_all(chunk)
                    self.progress[index] += len(chunk)
                await stream.receive_some(1)  # read nothing more: wait for the end
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.failed += 1
                self.failed_event.set()
            await trio.sleep_forever()

    async def wait_stalled(self, quiet: float = 0.5, bound: float = 30.0) -> None:
        """Return once no visitor made progress for ``quiet`` seconds (setup, bounded)."""
        with trio.fail_after(bound):
            before = -1
            while sum(self.progress) != before:
                before = sum(self.progress)
                await trio.sleep(quiet)


async def _echo_checks(port: int, rounds: int, size: int = 64 * KiB) -> list[float]:
    """Round trips of checked bytes through an echo tunnel; returns each latency."""
    latencies = []
    stream = await connect(port)
    async with stream:
        for i in range(rounds):
            payload = random_bytes(size, seed=i)
            start = trio.current_time()
            await stream.send_all(payload)
            got = bytearray()
            while len(got) < size:
                data = await stream.receive_some(size - len(got))
                assert data, "the echo tunnel closed"
                got += data
            assert bytes(got) == payload
            latencies.append(trio.current_time() - start)
    return latencies


@pytest.mark.parametrize("stalled", [8, 64])
async def test_stalled_streams_do_not_block_another_tunnel(
    nursery: trio.Nursery, tmp_path: Path, stalled: int
) -> None:
    hog = await nursery.start(_serve_small_buffers, 4 * MiB)
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=hog), TunnelSpec(local_port=echo)]
    )
    visitors = _Visitors()
    for _ in range(stalled):
        # Uploads to a service that does not read, downloads that the visitor does not read.
        nursery.start_soon(visitors.visit, client.port(0), 4 * MiB)
    await visitors.wait_stalled()
    assert sum(visitors.progress) > stalled * 256 * KiB  # every stream's window is full
    with trio.fail_after(60):
        latencies = await _echo_checks(client.port(1), rounds=64)  # 4 MiB each way
    assert max(latencies) < 5.0
    assert visitors.failed == 0  # within the receive budgets nothing is reset


async def test_stall_policy_resets_the_oldest_stalled_stream_when_the_budget_is_full(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel.connection")
    monkeypatch.setattr(connection, "CLIENT_RECEIVE_BUDGET", 512 * KiB)
    sink = await nursery.start(_serve_small_buffers, 0)
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [TunnelSpec(local_port=sink), TunnelSpec(local_port=echo)],
        stall_timeout=1.0,
    )
    visitors = _Visitors()
    for _ in range(8):  # 8 x 256 KiB held by the client: four times its budget
        nursery.start_soon(visitors.visit, client.port(0), 4 * MiB)
    with trio.fail_after(30):
        await visitors.failed_event.wait()  # a stalled stream was reset, its visitor too
    assert any("not consumed for 1 s" in r.getMessage() for r in caplog.records)
    with trio.fail_after(60):
        latencies = await _echo_checks(client.port(1), rounds=16)
    assert max(latencies) < 5.0


async def test_open_timeout_resets_an_unanswered_stream(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel.connection")
    relay = await start_relay(nursery, tmp_path, open_timeout=1.0)
    # A client that binds a tunnel and then never answers the relay's OPENs.
    tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
    tls = wrap_tls(tcp, client_ssl_context(), server_hostname="127.0.0.1")
    await tls.do_handshake()
    conn = MuxConnection(tls, make_session(Role.CLIENT), name="silent client")
    await nursery.start(conn.run)
    (outcome,) = await client_handshake(conn, TOKEN, [(1, 0, None)])
    assert outcome.bound is not None
    visitor = await connect(outcome.bound.port)
    incoming = await conn.accept_stream()  # the OPEN arrived; it is never answered
    assert conn.statistics()["remote_pending"] == 1
    with trio.fail_after(15):
        with pytest.raises(MuxStreamResetError, match="CANCEL"):
            await incoming.receive_some(1)
    assert conn.statistics()["remote_pending"] == 0  # the pending slot is free
    async with visitor:
        with trio.fail_after(15):
            try:
                assert await visitor.receive_some(1) == b""
            except trio.BrokenResourceError:
                pass  # reset: also fine
    assert any("no answer to OPEN within 1 s" in r.getMessage() for r in caplog.records)
    await conn.aclose()


async def test_small_payloads_do_not_pin_large_read_buffers(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    _s_quiet, c_quiet = await mux_stream_pair(server, client)
    _s_bulk, c_bulk = await mux_stream_pair(server, client)

    async def drain() -> None:
        while await c_bulk.receive_some(1 << 20):
            pass

    nursery.start_soon(drain)
    for _ in range(200):
        # One byte for a stream nobody reads, in the same write as 60 KB for another.
        server.queue_data(_s_quiet.stream_id, b"x")
        server.queue_data(_s_bulk.stream_id, bytes(60_000))
        await trio.testing.wait_all_tasks_blocked()
    assert c_quiet.buffered == 200
    pinned = sum(memoryview(chunk.obj).nbytes for chunk in c_quiet._chunks)
    assert pinned <= 4 * c_quiet.buffered


async def test_a_blocked_stream_holds_at_most_the_low_water_mark(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    near, far = await mux_stream_pair(server, client)  # far never reads
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0]:
        app = await connect(listeners[0].socket.getsockname()[1])
        local = await listeners[0].accept()
    nursery.start_soon(splice, local, near)

    async def push() -> None:
        chunk = bytes(64 * KiB)
        for _ in range(128):  # at most 8 MiB
            await app.send_all(chunk)

    async with trio.open_nursery() as pusher:
        pusher.start_soon(push)
        with trio.fail_after(30):
            before = -1
            while near.info.bytes_out != before:  # wait until the splice stops taking bytes
                before = near.info.bytes_out
                await trio.sleep(0.3)
        pusher.cancel_scope.cancel()
    window = client.local_settings.initial_stream_window
    assert near.info.bytes_out >= window  # the peer's window is full
    pending = near.unsent
    assert 0 < pending <= SEND_LOW_WATER
    # Everything the splice read from its socket went to the session: nothing more is held.
    assert near.info.bytes_out <= window + SEND_LOW_WATER
    assert far.buffered == window
    await app.aclose()


def test_open_and_stall_timeouts_are_options() -> None:
    cfg = build_server_config({}, {}, env={})
    assert (cfg.open_timeout, cfg.stall_timeout) == (30.0, 30.0)
    cfg = build_server_config({"open-timeout": 5, "stall-timeout": 7.5}, {}, env={})
    assert (cfg.open_timeout, cfg.stall_timeout) == (5.0, 7.5)
    flags: dict[str, object] = {"server": "r:1", "token": ["t"], "tunnel": ["1"]}
    assert build_client_config({}, flags, env={}).stall_timeout == 30.0
    client = build_client_config({}, {**flags, "stall-timeout": 2.0}, env={})
    assert client.stall_timeout == 2.0
    with pytest.raises(ConfigError, match="stall-timeout"):
        build_server_config({}, {"stall-timeout": 0}, env={})
