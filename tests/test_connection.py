"""MuxConnection / MuxStream: trio's stream conformance checker and adapter behaviour."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from muxtunnel.connection import (
    SEND_CHUNK,
    SEND_LOW_WATER,
    FailureKind,
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    MuxStreamResetError,
    OpenRejectedError,
    StreamFailure,
)
from muxtunnel.errors import ErrorCode, StreamResetError
from muxtunnel.protocol.constants import OpenFailReason
from muxtunnel.protocol.frames import Address
from tests.conftest import mux_connection_pair, mux_stream_pair


async def _clog(s: MuxStream) -> None:
    """Fill the stream until ``send_all`` blocks (peer window used up, low-water exceeded)."""
    async with trio.open_nursery() as nursery:

        async def fill() -> None:
            while True:
                await s.send_all(b"x" * 65536)

        nursery.start_soon(fill)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


def _makers(nursery: trio.Nursery, transport: str) -> tuple[object, object]:
    async def pair() -> tuple[MuxStream, MuxStream]:
        transports = (
            trio.testing.lockstep_stream_pair()
            if transport == "lockstep"
            else trio.testing.memory_stream_pair()
        )
        server, client = await mux_connection_pair(nursery, transports)
        return await mux_stream_pair(server, client)

    async def clogged() -> tuple[MuxStream, MuxStream]:
        s, c = await pair()
        # The checker also flips the pair, so clog both directions.
        await _clog(s)
        await _clog(c)
        return s, c

    return pair, clogged


async def test_check_half_closeable_stream_memory(nursery: trio.Nursery) -> None:
    maker, clogged = _makers(nursery, "memory")
    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(maker, clogged)  # type: ignore[arg-type]


async def test_check_half_closeable_stream_lockstep(nursery: trio.Nursery) -> None:
    maker, clogged = _makers(nursery, "lockstep")
    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(maker, clogged)  # type: ignore[arg-type]


async def test_client_to_relay_direction_checker(nursery: trio.Nursery) -> None:
    """The same checker with the client side as sender (the maker pairs are flipped)."""

    async def pair() -> tuple[MuxStream, MuxStream]:
        server, client = await mux_connection_pair(nursery)
        s, c = await mux_stream_pair(server, client)
        return c, s

    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(pair, None)


async def test_buffering_is_bounded_by_low_water(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    s, c = await mux_stream_pair(server, client)
    sent = 0

    async def sender() -> None:
        nonlocal sent
        while True:
            await s.send_all(b"y" * 10_000)
            sent += 10_000

    async with trio.open_nursery() as n:
        n.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        # Nobody reads: the receiver holds at most its window, the sender at most low water + chunk.
        window = client.local_settings.initial_stream_window
        assert s.unsent <= SEND_LOW_WATER + SEND_CHUNK
        assert sent <= window + SEND_LOW_WATER + SEND_CHUNK + 10_000
        assert c.buffered <= window
        n.cancel_scope.cancel()


async def test_slow_stream_does_not_block_others(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    stuck_s, _stuck_c = await mux_stream_pair(server, client)
    s2, c2 = await mux_stream_pair(server, client)

    async def fill() -> None:
        while True:
            await stuck_s.send_all(b"z" * 65536)

    async with trio.open_nursery() as n:
        n.start_soon(fill)
        await trio.testing.wait_all_tasks_blocked()
        payload = bytes(range(256)) * 4096  # 1 MiB on the second stream
        with trio.fail_after(10):
            async with trio.open_nursery() as n2:

                async def send() -> None:
                    await s2.send_all(payload)
                    await s2.send_eof()

                n2.start_soon(send)
                got = bytearray()
                while chunk := await c2.receive_some():
                    got += chunk
        assert got == payload
        n.cancel_scope.cancel()


async def test_peer_reset_raises_stream_reset_error(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    s, c = await mux_stream_pair(server, client)
    await s.send_all(b"hello")
    c.reset(ErrorCode.CONNECT_ERROR)

    async def drain() -> None:
        while True:
            await s.receive_some()

    with trio.fail_after(5), pytest.raises(MuxStreamResetError) as info:
        await drain()
    assert isinstance(info.value, StreamResetError)
    assert isinstance(info.value, trio.BrokenResourceError)
    assert info.value.error_code == ErrorCode.CONNECT_ERROR


async def test_reject_reaches_opener_as_open_rejected(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    await server.wait_open_slot()
    s = server.open_stream(7, Address("127.0.0.1", 1), Address("127.0.0.1", 2))
    await s.send_all(b"early data")  # pipelined before the answer
    c = await client.accept_stream()
    assert c.info.tunnel_id == 7
    assert str(c.info.origin) == "127.0.0.1:1"
    c.reject(OpenFailReason.CONNECT_FAILED, "nothing listens")
    with trio.fail_after(5), pytest.raises(OpenRejectedError) as info:
        await s.wait_opened()
    assert info.value.reason == OpenFailReason.CONNECT_FAILED
    assert "nothing listens" in str(info.value)
    # The early data was credited: the connection keeps working.
    s2, c2 = await mux_stream_pair(server, client)
    await s2.send_all(b"ok")
    assert await c2.receive_some() == b"ok"


async def test_connection_end_fails_streams(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    _s, c = await mux_stream_pair(server, client)
    await server.aclose(ErrorCode.NO_ERROR, "bye")
    with trio.fail_after(5):
        try:
            await c.receive_some()
        except MuxSessionClosedError:
            pass
        else:  # pragma: no cover
            raise AssertionError("stream survived its session")
        await client.wait_closed()
    assert "NO_ERROR" in (client.close_reason or "")
    try:
        await client.accept_stream()
    except MuxSessionClosedError:
        pass
    else:  # pragma: no cover
        raise AssertionError("accept after close")


async def test_transport_eof_is_not_a_clean_end(nursery: trio.Nursery) -> None:
    t_server, t_client = trio.testing.memory_stream_pair()
    server, client = await mux_connection_pair(nursery, (t_server, t_client))
    s, c = await mux_stream_pair(server, client)
    await s.send_all(b"partial")
    assert await c.receive_some() == b"partial"
    await trio.aclose_forcefully(t_server)  # no CLOSE frame
    with trio.fail_after(5):
        try:
            await c.receive_some()
        except MuxSessionClosedError:
            pass
        else:  # pragma: no cover
            raise AssertionError("EOF turned into a clean end")


async def test_idle_timeout_declares_peer_dead(autojump_clock: trio.testing.MockClock) -> None:
    # A peer that stops sending anything at all (its transport stays open) is dead after the
    # idle timeout; before that, PINGs keep an answering peer alive.
    async with trio.open_nursery() as nursery:
        a, b = trio.testing.memory_stream_pair()
        server, client = await mux_connection_pair(
            nursery, (a, b), settings={"idle_timeout_ms": 5000}
        )
        assert server.idle_timeout == 5.0
        await trio.sleep(20)  # keepalive PINGs answered: still alive
        assert not server.closed
        assert not client.closed
        # Freeze the client: it no longer reads nor writes.
        client_transport = b
        frozen = trio.Event()

        async def freeze_hook() -> None:
            await frozen.wait()

        assert isinstance(client_transport, trio.StapledStream)
        client_transport.send_stream.send_all_hook = freeze_hook
        start = trio.current_time()
        last = server.last_receive
        await server.wait_closed()
        assert server.close_code == ErrorCode.TIMEOUT
        # Dead exactly one idle timeout after the last inbound byte (at most 5 s after freezing).
        assert trio.current_time() - start <= 5.0 + 2.5  # + CLOSE_GRACE flush allowance
        assert server.last_receive == last
        frozen.set()
        nursery.cancel_scope.cancel()


async def test_statistics_and_probe(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    assert await server.probe(2.0)
    stats = server.statistics()
    assert stats["transport_bytes_received"] > 0
    assert isinstance(client, MuxConnection)


async def test_several_tasks_wait_for_an_open_slot(nursery: trio.Nursery) -> None:
    """The client allows one pending open: two more openers wait, then get slots in turn."""
    server, client = await mux_connection_pair(nursery, settings={"max_pending_opens": 1})
    first = server.open_stream(1, Address("127.0.0.1", 1), Address("127.0.0.1", 2))
    opened: list[MuxStream] = []

    async def opener() -> None:
        await server.wait_open_slot()
        opened.append(server.open_stream(1, Address("127.0.0.1", 3), Address("127.0.0.1", 2)))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(opener)
            n.start_soon(opener)
            await trio.testing.wait_all_tasks_blocked()
            assert opened == []
            for _ in range(3):
                incoming = await client.accept_stream()
                incoming.accept()
    assert len(opened) == 2
    assert first.stream_id not in {s.stream_id for s in opened}


async def test_probe_waiters_and_dead_peer(nursery: trio.Nursery) -> None:
    server, _client = await mux_connection_pair(nursery)
    results: list[bool] = []

    async def probe() -> None:
        results.append(await server.probe(2.0))

    async with trio.open_nursery() as n:
        n.start_soon(probe)
        n.start_soon(probe)
    assert results == [True, True]


async def test_open_mux_connection_context_manager() -> None:
    from muxtunnel.connection import make_session, open_mux_connection
    from muxtunnel.protocol.constants import Role
    from tests.conftest import handshake_and_bind

    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with (
            open_mux_connection(a, make_session(Role.SERVER), name="s") as server,
            open_mux_connection(b, make_session(Role.CLIENT), name="c") as client,
        ):
            await handshake_and_bind(server, client)
            s, c = await mux_stream_pair(server, client)
            await s.send_all(b"ctx")
            assert await c.receive_some() == b"ctx"
        assert server.closed
        assert client.closed


async def test_an_idle_session_pings_only_for_keepalive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # protocol-spec §10.1: no PING on an idle session before T/4 (7.5 s with the default
    # 30 s idle timeout); after that only the keepalive's PINGs.
    async with trio.open_nursery() as nursery:
        server, client = await mux_connection_pair(nursery)
        await trio.sleep(0.5)  # the handshake (and its one early RTT PING) is over
        sent = (server.bytes_sent, client.bytes_sent)
        before = (server.pings_sent, client.pings_sent)
        await trio.sleep(6.5)
        assert (server.bytes_sent, client.bytes_sent) == sent  # not one byte, so no PING
        await trio.sleep(23.0)
        # Each side pings when it has received nothing for 7.5 s: at most 4 times in 30 s.
        pings = (server.pings_sent - before[0], client.pings_sent - before[1])
        assert sum(pings) >= 1
        assert max(pings) <= 4
        assert not server.closed
        assert not client.closed
        nursery.cancel_scope.cancel()


async def test_rtt_samples_at_most_once_a_second_while_data_flows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        server, client = await mux_connection_pair(nursery)
        s, c = await mux_stream_pair(server, client)
        before = (server.pings_sent, client.pings_sent)
        for _ in range(100):  # 10 s of traffic relay -> client
            await s.send_all(b"x" * 1000)
            assert len(await c.receive_some()) == 1000
            await trio.sleep(0.1)
        server_pings = server.pings_sent - before[0]
        client_pings = client.pings_sent - before[1]
        # The sender and the receiver of the DATA each sample the RTT about once a second.
        assert 5 <= server_pings <= 11
        assert 5 <= client_pings <= 11
        assert server.rtt is not None
        assert client.rtt is not None
        # Once the data stops, so do the samples.
        await trio.sleep(1.5)
        sent = (server.bytes_sent, client.bytes_sent)
        await trio.sleep(5.5)
        assert (server.bytes_sent, client.bytes_sent) == sent
        nursery.cancel_scope.cancel()


async def test_an_unanswered_open_is_reset_after_the_default_open_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # protocol-spec §9.2 item 6: the opener resets a stream its peer never answers (30 s).
    async with trio.open_nursery() as nursery:
        server, client = await mux_connection_pair(nursery)
        start = trio.current_time()
        s = server.open_stream(1, Address("127.0.0.1", 1), Address("127.0.0.1", 2))
        incoming = await client.accept_stream()  # never accepted nor rejected
        with trio.fail_after(120), pytest.raises(MuxStreamResetError, match="no answer to OPEN"):
            await s.wait_opened()
        assert 30.0 <= trio.current_time() - start < 31.0
        assert server.statistics()["open_timeouts"] == 1
        assert not server.closed  # one slow open never ends the session
        with trio.fail_after(5), pytest.raises(MuxStreamResetError) as info:
            await incoming.receive_some(1)
        assert info.value.error_code == ErrorCode.CANCEL
        nursery.cancel_scope.cancel()


async def test_stream_failures_are_typed(nursery: trio.Nursery) -> None:
    server, client = await mux_connection_pair(nursery)
    s, c = await mux_stream_pair(server, client)
    assert [s.failure, c.failure] == [None, None]
    c.reset(ErrorCode.CONNECT_ERROR, "local read failed")
    assert c.failure == StreamFailure(
        FailureKind.RESET, ErrorCode.CONNECT_ERROR, "local read failed"
    )
    with trio.fail_after(5), pytest.raises(MuxStreamResetError):
        await s.receive_some()
    assert s.failure is not None
    assert s.failure.kind is FailureKind.RESET
    assert s.failure.code == ErrorCode.CONNECT_ERROR
    assert str(s.failure) == "reset CONNECT_ERROR: reset by peer (CONNECT_ERROR)"

    await server.wait_open_slot()
    r = server.open_stream(1, Address("127.0.0.1", 1), Address("127.0.0.1", 2))
    (await client.accept_stream()).reject(OpenFailReason.CONNECT_FAILED, "nothing listens")
    with trio.fail_after(5), pytest.raises(OpenRejectedError):
        await r.wait_opened()
    assert r.failure is not None
    assert r.failure.detail == "nothing listens"
    assert (r.failure.kind, r.failure.reason) == (
        FailureKind.REJECTED,
        OpenFailReason.CONNECT_FAILED,
    )
    assert (
        str(r.failure)
        == "rejected REFUSED_STREAM: open refused by peer: CONNECT_FAILED: nothing listens"
    )

    s2, _c2 = await mux_stream_pair(server, client)
    await client.aclose()
    with trio.fail_after(5), pytest.raises(MuxSessionClosedError):
        await s2.receive_some()
    assert s2.failure is not None
    assert s2.failure.kind is FailureKind.SESSION
