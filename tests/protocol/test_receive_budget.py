"""Connection credit on receipt within the receive budget, and the stall policy (spec §8.5, §8.7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from muxtunnel.protocol.constants import Role
from muxtunnel.protocol.events import DataReceived, StreamEnded
from muxtunnel.protocol.frames import Settings
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import ORIGIN, TARGET, SessionPair, data_frame

if TYPE_CHECKING:
    from collections.abc import Sequence

KiB = 1024
WINDOW = 256 * KiB  # the default INITIAL_STREAM_WINDOW


def _fill(pair: SessionPair, sids: list[int], n: int = WINDOW) -> None:
    """The server sends ``n`` bytes on each stream; the client consumes nothing."""
    for sid in sids:
        pair.server.send_data(sid, bytes(n))
    pair.pump()


def _received(events: Sequence[object], sid: int) -> int:
    return sum(len(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_streams_that_do_not_read_leave_the_connection_window_to_the_others() -> None:
    pair = SessionPair()
    stalled = [pair.open() for _ in range(64)]  # 64 x 256 KiB = 16 MiB: 8x the 2 MiB window
    _fill(pair, stalled)
    client = pair.client
    stats = client.statistics()
    assert stats["conn_recv_held"] == 64 * WINDOW
    assert stats["conn_recv_buffered"] == 0  # within the budget: all credit returned
    # Another stream still moves 4 MiB, consuming as it goes.
    live = pair.open()
    pair.server.send_data(live, bytes(4 << 20))
    got = 0
    for _ in range(1000):
        events = pair.send(pair.server)
        n = _received(events, live)
        if n:
            client.acknowledge(live, n, 0.0)
            got += n
        pair.send(client)
        if got == 4 << 20:
            break
    assert got == 4 << 20
    assert client.stalled_stream(1e6, 30.0) is None  # under the budget: nothing is reset


def test_beyond_the_budget_credit_returns_on_consumption() -> None:
    budget = 512 * KiB
    config = SessionConfig(receive_budget=budget, max_stream_window=WINDOW)
    pair = SessionPair(client_config=config)
    client = pair.client
    a, b, c, d = pair.open(), pair.open(), pair.open(), pair.open()
    _fill(pair, [a, b])
    stats = client.statistics()
    assert stats["conn_recv_held"] == 2 * WINDOW
    assert stats["conn_recv_buffered"] == 0
    pair.now = 5.0
    _fill(pair, [c])
    stats = client.statistics()
    assert stats["conn_recv_held"] == 3 * WINDOW
    assert stats["conn_recv_buffered"] == 3 * WINDOW - budget  # held beyond the budget
    # More data for a stream beyond the budget is charged in full (nothing released).
    client.acknowledge(c, 1000, now=5.0)
    before = client.statistics()["conn_recv_buffered"]
    assert before == 3 * WINDOW - 1000 - budget
    pair.server.send_data(d, bytes(1000))
    pair.pump()
    assert client.statistics()["conn_recv_buffered"] == before + 1000
    # Consumption returns the credit of the bytes held beyond the budget first.
    client.acknowledge(a, 100 * KiB, now=6.0)
    assert client.statistics()["conn_recv_buffered"] == before + 1000 - 100 * KiB
    # A reset stream's bytes leave the count at once.
    client.reset_stream(b)
    stats = client.statistics()
    assert stats["conn_recv_held"] == 2 * WINDOW - 100 * KiB
    assert stats["conn_recv_buffered"] == 0  # back within the budget


def test_stalled_stream_is_the_oldest_without_progress_and_only_over_budget() -> None:
    config = SessionConfig(receive_budget=512 * KiB, max_stream_window=WINDOW)
    pair = SessionPair(client_config=config)
    client = pair.client
    a, b, c = pair.open(), pair.open(), pair.open()
    pair.now = 1.0
    _fill(pair, [a])
    pair.now = 2.0
    _fill(pair, [b])
    assert client.stalled_stream(100.0, 30.0) is None  # exactly the budget: no pressure
    pair.now = 3.0
    _fill(pair, [c])
    assert client.stalled_stream(30.9, 30.0) is None  # the oldest waited 29.9 s
    assert client.stalled_stream(31.0, 30.0) == a
    # Consuming is progress: a's clock restarts, b is now the oldest.
    client.acknowledge(a, 1, now=31.5)
    assert client.stalled_stream(32.0, 30.0) == b
    client.reset_stream(b)
    assert client.stalled_stream(32.0, 30.0) is None  # back within the budget
    # Data into an emptied buffer restarts the clock; into a non-empty one it does not.
    client.acknowledge(c, WINDOW, now=40.0)
    pair.now = 50.0
    pair.server.send_data(c, bytes(100))
    pair.pump()
    pair.now = 60.0
    pair.server.send_data(c, bytes(100))
    pair.pump()
    client.acknowledge(a, WINDOW - 1, now=61.0)
    assert client.statistics()["conn_recv_held"] == 200
    assert client.stalled_stream(100.0, 1.0) is None


def test_stall_clock_of_a_fin_frame_and_of_closed_streams() -> None:
    small = Settings(initial_stream_window=16 * KiB)
    config = SessionConfig(settings=small, max_stream_window=16 * KiB, receive_budget=0)
    pair = SessionPair(client_config=config)
    client, server = pair.client, pair.server
    # Budget 0 in force is one stream window, 16 KiB: the smallest (spec §8.5 item 2).
    a, b, full = pair.open(), pair.open(), pair.open()
    pair.now = 1000.0  # later than every check below, so never the oldest
    _fill(pair, [full], 16 * KiB)  # the budget is used up: any other held byte is over it
    pair.now = 7.0
    server.send_data(a, b"first", end_stream=True)  # one DATA frame with FIN
    client_events, _ = pair.pump()
    assert StreamEnded(stream_id=a) in client_events
    assert client.stalled_stream(7.5, 0.5) == a
    # FIN with data on a stream that already holds data keeps its older clock.
    pair.now = 8.0
    server.send_data(b, b"x")
    pair.pump()
    pair.now = 9.0
    server.send_data(b, b"y", end_stream=True)
    pair.pump()
    client.acknowledge(a, 5, now=9.0)
    assert client.stalled_stream(8.9, 1.0) is None
    assert client.stalled_stream(9.0, 1.0) == b
    # Both FINs out: b is closed and its bytes wait in the drain, where no RESET can reach.
    client.end_stream(b)
    pair.pump()
    assert not client.stream_is_open(b)
    assert client.statistics()["conn_recv_held"] == 16 * KiB + 2
    assert client.stalled_stream(100.0, 1.0) is None
    client.acknowledge(b, 2, now=10.0)
    assert client.statistics()["conn_recv_held"] == 16 * KiB
    client.close()
    assert client.stalled_stream(100.0, 1.0) is None


def test_late_data_for_a_closed_stream_is_credited_beyond_the_budget() -> None:
    small = Settings(initial_stream_window=64 * KiB)
    config = SessionConfig(settings=small, max_stream_window=64 * KiB, receive_budget=0)
    pair = SessionPair(client_config=config)
    client = pair.client
    a, b, c = pair.open(), pair.open(), pair.open()
    _fill(pair, [a, c], 64 * KiB)
    client.reset_stream(b)
    before = client.statistics()["conn_recv_buffered"]
    client.receive_data(data_frame(b, bytes(8 * KiB)), 0.0)
    assert client.statistics()["conn_recv_buffered"] == before == 64 * KiB


def test_send_credit_is_the_smaller_of_stream_and_connection_credit() -> None:
    settings = Settings(initial_conn_window=96 * KiB, initial_stream_window=64 * KiB)
    pair = SessionPair(client_config=SessionConfig(settings=settings, receive_budget=0))
    server = pair.server
    sid = server.open_stream(1, ORIGIN, TARGET)
    assert server.send_credit(sid) == 64 * KiB
    assert server.send_credit(sid + 2) == 0  # unknown
    other = server.open_stream(1, ORIGIN, TARGET)
    server.send_data(other, bytes(64 * KiB))
    pair.send(server)
    assert server.send_credit(other) == 0
    assert server.send_credit(sid) == 32 * KiB  # the connection is the tighter limit
    assert server.pending_bytes(sid) == 0


def test_send_room_bounds_the_queue_beyond_the_credit() -> None:
    settings = Settings(initial_conn_window=96 * KiB, initial_stream_window=64 * KiB)
    pair = SessionPair(client_config=SessionConfig(settings=settings, receive_budget=0))
    server = pair.server
    sid = server.open_stream(1, ORIGIN, TARGET)
    # min(cap, beyond + credit) - pending, credit 64 KiB:
    assert server.send_room(sid, 16 * KiB, 1 << 20, 4 * KiB) == 80 * KiB
    assert server.send_room(sid, 16 * KiB, 48 * KiB, 4 * KiB) == 48 * KiB  # the cap
    assert server.send_room(sid + 2, 16 * KiB, 48 * KiB, 4 * KiB) == 16 * KiB  # unknown
    server.send_data(sid, bytes(78 * KiB))
    assert server.send_room(sid, 16 * KiB, 1 << 20, 1 * KiB) == 2 * KiB
    assert server.send_room(sid, 16 * KiB, 1 << 20, 4 * KiB) == 0  # below the minimum
    other = server.open_stream(1, ORIGIN, TARGET)
    pair.send(server)  # 64 KiB framed: the connection has 32 KiB of credit left
    assert server.pending_bytes(sid) == 14 * KiB
    assert server.send_room(other, 16 * KiB, 1 << 20, 4 * KiB) == 48 * KiB
    assert server.send_room(sid, 16 * KiB, 1 << 20, 4 * KiB) == 0  # 16 + 0 - 14 < 4
    assert server.send_room(sid, 16 * KiB, 1 << 20, 1 * KiB) == 2 * KiB


def test_receive_budget_defaults_to_the_connection_maximum() -> None:
    session = Session(Role.CLIENT)
    assert session._receive_budget == session._max_conn_window == 64 << 20
    assert Session(Role.CLIENT, SessionConfig(receive_budget=-5))._receive_budget == 0


def _move(pair: SessionPair, live: list[int], total: int, rounds: int = 2000) -> dict[int, int]:
    """The server sends ``total`` bytes on each live stream; the client consumes them at once."""
    for sid in live:
        pair.server.send_data(sid, bytes(total))
    got = dict.fromkeys(live, 0)
    for _ in range(rounds):
        for event in pair.send(pair.server):
            if isinstance(event, DataReceived) and event.stream_id in got:
                got[event.stream_id] += len(event.data)
                pair.client.acknowledge(event.stream_id, len(event.data), pair.now)
        pair.send(pair.client)
        if all(n == total for n in got.values()):
            break
    return got


def test_one_stalled_stream_never_starves_the_others_at_the_smallest_budget() -> None:
    """Spec §8.5-§8.7: the connection window at 1.5x the stream window, the smallest budget.

    One stream fills its whole stream window and its application never reads; two other
    streams must still move 4 MiB each (with credit returned on consumption only, the stalled
    stream's bytes pinned more than half the connection window and no connection WINDOW was
    ever sent again).
    """
    settings = Settings(initial_stream_window=1 << 20, initial_conn_window=3 << 19)
    config = SessionConfig(
        settings=settings, max_stream_window=1 << 20, max_conn_window=3 << 19, receive_budget=0
    )
    pair = SessionPair(client_config=config)
    stalled = pair.open()
    _fill(pair, [stalled], 1 << 20)
    assert pair.client.statistics()["conn_recv_held"] == 1 << 20
    live = [pair.open(), pair.open()]
    assert _move(pair, live, 4 << 20) == dict.fromkeys(live, 4 << 20)
    assert pair.client.stream_is_open(stalled)


def test_one_stalled_stream_with_a_grown_window_never_starves_the_others() -> None:
    """The same with auto-tuned windows: a stream that read fast, then stalled at 16 MiB."""
    config = SessionConfig(max_stream_window=16 << 20, max_conn_window=24 << 20, receive_budget=0)
    pair = SessionPair(client_config=config)
    pair.client.ping(0.0)
    pair.now = 0.001
    pair.pump()  # an RTT sample of 1 ms, and a clock that stands still: windows double
    stalled = pair.open()
    assert _move(pair, [stalled], 64 << 20, rounds=20_000) == {stalled: 64 << 20}
    window = pair.client.statistics()["stream_recv_window_peak"]
    assert window == 16 << 20
    recv = pair.client._streams[stalled].recv
    _move(pair, [stalled], recv.advertised - recv.consumed - window // 2)  # one more update
    assert recv.advertised - recv.consumed == window
    _fill(pair, [stalled], window)  # now it stops reading with a full window
    stats = pair.client.statistics()
    assert stats["conn_recv_held"] > stats["conn_recv_window"] // 2  # more than half of it
    live = [pair.open(), pair.open()]
    assert _move(pair, live, 8 << 20, rounds=20_000) == dict.fromkeys(live, 8 << 20)
