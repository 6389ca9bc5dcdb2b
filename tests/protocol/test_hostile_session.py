"""A hostile peer against the session core: every control frame is O(1) or rate-limited.

Each test feeds hand-made frames to a :class:`Session` and proves one bound of
protocol-spec.md §12 (work per frame, events per frame, queued requests), and that the bursts
a conforming peer produces stay below every flood limit. No wall clock: ``now`` is passed in.
"""

from __future__ import annotations

import pytest

from muxtunnel.errors import ErrorCode, ProtocolError
from muxtunnel.protocol.constants import FrameType, OpenFailReason, ResultStatus
from muxtunnel.protocol.events import (
    BindRequested,
    GoAwayReceived,
    PongReceived,
    ResultReceived,
    StreamOpened,
    StreamRejected,
    StreamReset,
    UnbindReceived,
)
from muxtunnel.protocol.frames import (
    Address,
    BindFrame,
    CloseFrame,
    GoAwayFrame,
    OpenFailFrame,
    OpenFrame,
    PingFrame,
    ResetFrame,
    Settings,
    UnbindFrame,
    decode_payload,
)
from muxtunnel.protocol.session import SessionConfig

from .helpers import (
    ORIGIN,
    TARGET,
    SessionPair,
    close_code,
    data_frame,
    expect_close,
    frames,
    parse_frames,
)

#: The limits a second implementation must know (spec §7.5, §9.2, §10.1, §12).
MAX_OUTSTANDING_REQUESTS = 16
NONPRODUCTIVE_BURST = 1000
#: A low open rate the open-rate tests configure (the defaults are far higher).
OPEN_BURST = 400
OPEN_RATE = 200
PING_BURST = 100
ANY = Address(None, 0)
BOUND = Address("0.0.0.0", 20000)
MANY = Settings(max_concurrent_streams=20_000, max_pending_opens=20_000)


def open_frame(sid: int, tunnel: int = 1) -> bytes:
    return frames(OpenFrame(stream_id=sid, tunnel_id=tunnel, origin=ORIGIN, target=TARGET))


def goaway(last: int) -> bytes:
    return frames(GoAwayFrame(last_stream_id=last, error_code=0))


def open_fails(wire: bytes) -> list[OpenFailFrame]:
    out = []
    for ftype, flags, sid, payload in parse_frames(wire):
        if ftype == FrameType.OPEN_FAIL:
            frame = decode_payload(ftype, flags, sid, payload)
            assert isinstance(frame, OpenFailFrame)
            out.append(frame)
    return out


def many_streams(count: int) -> tuple[SessionPair, list[int]]:
    """A pair whose server (the opener) has ``count`` streams open on the client."""
    pair = SessionPair(
        server_config=SessionConfig(settings=Settings(max_concurrent_streams=0)),
        client_config=SessionConfig(settings=MANY, open_burst=count),
    )
    sids = [pair.server.open_stream(1, ORIGIN, TARGET) for _ in range(count)]
    pair.send(pair.server)
    for sid in sids:
        pair.client.accept_stream(sid)
    pair.send(pair.client)
    assert pair.server.statistics()["local_pending"] == 0
    return pair, sids


# --- GOAWAY: O(1) unless it refuses streams, and reported at most once per lowering ---------


def test_lowering_goaway_touches_only_the_streams_it_refuses() -> None:
    pair, sids = many_streams(3000)
    server = pair.server
    events = server.receive_data(goaway(sids[-11]), 0.0)
    refused = [e.stream_id for e in events if isinstance(e, StreamReset)]
    assert refused == sids[-10:]
    assert server.statistics()["goaway_stream_checks"] == 10
    assert server.statistics()["local_open"] == 2990
    # A second lowering: again only the streams above the new id are looked at.
    events = server.receive_data(goaway(sids[-21]), 0.0)
    assert [e.stream_id for e in events if isinstance(e, StreamReset)] == sids[-20:-10]
    assert server.statistics()["goaway_stream_checks"] == 20


def test_repeated_goaways_cost_nothing_and_are_not_reported() -> None:
    pair = SessionPair()
    server = pair.server
    sids = [pair.open() for _ in range(3)]
    events = server.receive_data(goaway(sids[-1]), 0.0)
    assert [type(e) for e in events] == [GoAwayReceived]
    # Just below the non-productive burst: no event, no stream touched.
    events = server.receive_data(goaway(sids[-1]) * (NONPRODUCTIVE_BURST - 1), 0.0)
    assert events == []
    assert all(server.stream_is_open(sid) for sid in sids)
    # The next one is one too many.
    expect_close(server, goaway(sids[-1]) * 2, ErrorCode.ENHANCE_YOUR_CALM)


def test_goaway_flood_of_10000_is_refused() -> None:
    pair = SessionPair()
    server = pair.server
    pair.open()
    with pytest.raises(ProtocolError) as info:
        server.receive_data(goaway(2**64 - 1) * 10_000, 0.0)
    assert info.value.error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert close_code(server.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM


def test_repeated_goaways_with_3000_streams_do_no_work() -> None:
    pair, sids = many_streams(3000)
    server = pair.server
    server.receive_data(goaway(sids[-1]) * (NONPRODUCTIVE_BURST - 1), 0.0)
    assert server.statistics()["goaway_stream_checks"] == 0
    assert server.statistics()["local_open"] == 3000


def test_lowering_goaways_that_refuse_nothing_are_non_productive() -> None:
    pair = SessionPair()
    client = pair.client
    # The first GOAWAY is free; each later one that refuses nothing takes a token.
    events = client.receive_data(b"".join(goaway(2**64 - 1 - i) for i in range(1001)), 0.0)
    assert len([e for e in events if isinstance(e, GoAwayReceived)]) == 1001
    expect_close(client, goaway(5), ErrorCode.ENHANCE_YOUR_CALM)


def test_goaway_work_stays_bounded_after_much_churn() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    keep = pair.open()
    for i in range(3000):  # open and reset: the id index is compacted as streams close
        pair.now = i * 0.01
        sid = server.open_stream(1, ORIGIN, TARGET)
        server.reset_stream(sid)
        pair.send(server)
        pair.send(client)
    events = server.receive_data(goaway(keep), 0.0)
    assert [e for e in events if isinstance(e, StreamReset)] == []
    assert server.statistics()["goaway_stream_checks"] <= 2 * 1 + 64 + 1
    assert server.stream_is_open(keep)


# --- requests: at most 16 without RESULT; refused ones are non-productive -------------------


def bind_frames(first: int, count: int) -> bytes:
    return b"".join(
        frames(BindFrame(req_id=first + i, tunnel_id=first + i, proto=1, bind=ANY))
        for i in range(count)
    )


def test_server_takes_16_outstanding_requests_and_no_more() -> None:
    pair = SessionPair(tunnels=())
    server = pair.server
    events = server.receive_data(bind_frames(100, MAX_OUTSTANDING_REQUESTS), 0.0)
    assert len(events) == MAX_OUTSTANDING_REQUESTS
    assert all(isinstance(e, BindRequested) for e in events)
    expect_close(server, bind_frames(200, 1), ErrorCode.ENHANCE_YOUR_CALM)


def test_answered_requests_make_room_and_unbind_counts_too() -> None:
    pair = SessionPair(tunnels=())
    server = pair.server
    server.receive_data(bind_frames(100, MAX_OUTSTANDING_REQUESTS), 0.0)
    server.send_result(100, ResultStatus.OK, bound=BOUND)
    events = server.receive_data(frames(UnbindFrame(req_id=300, tunnel_id=100, error_code=0)), 0.0)
    assert events == [UnbindReceived(req_id=300, tunnel_id=100, error_code=ErrorCode.NO_ERROR)]
    unbind = frames(UnbindFrame(req_id=301, tunnel_id=101, error_code=0))
    expect_close(server, unbind, ErrorCode.ENHANCE_YOUR_CALM)


def test_client_holds_requests_back_beyond_16_and_releases_them_in_order() -> None:
    pair = SessionPair(tunnels=())
    client, server = pair.client, pair.server
    for tunnel in range(1, 41):
        client.send_bind(tunnel, tunnel, ANY)
    with pytest.raises(ValueError, match="already outstanding"):
        client.send_bind(40, 99, ANY)  # a held-back id is taken as well
    seen: list[int] = []
    for _ in range(100):
        events = pair.send(client)
        assert len(events) <= MAX_OUTSTANDING_REQUESTS
        for event in events:
            assert isinstance(event, BindRequested)
            seen.append(event.tunnel_id)
            status = ResultStatus.OK if event.tunnel_id % 2 else ResultStatus.ADDRESS_IN_USE
            server.send_result(event.req_id, status, bound=BOUND if event.tunnel_id % 2 else None)
        results = pair.send(server)
        assert all(isinstance(e, ResultReceived) for e in results)
        if len(seen) == 40:
            break
    assert seen == list(range(1, 41))
    assert not server.closed
    assert [t for t in range(1, 42) if client.tunnel_is_bound(t)] == list(range(1, 41, 2))
    # The bound tunnels accept OPENs, the refused ones do not.
    sid = server.open_stream(3, ORIGIN, TARGET)
    refused = server.open_stream(4, ORIGIN, TARGET)
    events = pair.send(server)
    (opened,) = events
    assert isinstance(opened, StreamOpened)
    assert opened.stream_id == sid
    answer = open_fails(client.data_to_send())
    assert [(f.stream_id, f.reason) for f in answer] == [(refused, OpenFailReason.UNKNOWN_TUNNEL)]


def test_refused_binds_are_non_productive() -> None:
    pair = SessionPair(tunnels=())
    client, server = pair.client, pair.server
    refused = 0
    for req in range(1, 5000):
        if server.closed:
            break
        client.send_bind(req, req, ANY)
        events = pair.send(client)
        assert len(events) == 1
        server.send_result(req, ResultStatus.DENIED, "no")
        refused += 1
        if not server.closed:
            pair.send(server)
    assert server.closed
    assert refused == NONPRODUCTIVE_BURST + 1
    assert close_code(server.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM


def test_a_legitimate_client_can_have_every_bind_refused() -> None:
    pair = SessionPair(tunnels=())
    client, server = pair.client, pair.server
    answered = 0
    for first in (1, 101):  # the default tunnel limit, all refused, twice
        for req in range(first, first + 64):
            client.send_bind(req, req, ANY)
        for _ in range(10):
            for event in pair.send(client):
                assert isinstance(event, BindRequested)
                server.send_result(event.req_id, ResultStatus.ADDRESS_IN_USE)
            answered += len(pair.send(server))
    assert answered == 128
    assert not server.closed


def test_answer_after_the_peer_closed_is_a_no_op() -> None:
    pair = SessionPair(tunnels=())
    server = pair.server
    events = server.receive_data(
        frames(UnbindFrame(req_id=7, tunnel_id=1, error_code=0), CloseFrame(error_code=0)), 0.0
    )
    assert isinstance(events[0], UnbindReceived)
    assert server.closed
    server.send_result(7, ResultStatus.OK)  # the request arrived before CLOSE: no error
    assert server.data_to_send() == b""


# --- DATA on closed streams --------------------------------------------------------------


def test_small_data_frames_on_a_closed_stream_are_non_productive() -> None:
    pair = SessionPair()
    client = pair.client
    sid = pair.open()
    client.reset_stream(sid)
    client.data_to_send()
    flood = data_frame(sid, b"x") * 20_000
    with pytest.raises(ProtocolError) as info:
        client.receive_data(flood, 0.0)
    assert info.value.error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_data_crossing_a_reset_stays_below_the_limit() -> None:
    # What a sender has in flight when the receiver resets: full frames, then a short tail.
    pair = SessionPair()
    client = pair.client
    sids = [pair.open() for _ in range(8)]
    for sid in sids:
        client.reset_stream(sid)
    client.data_to_send()
    late = b"".join(
        data_frame(sid, bytes(16_384)) * 15 + data_frame(sid, b"tail", fin=True) for sid in sids
    )
    for _ in range(4):
        assert client.receive_data(late, 0.0) == []
    assert not client.closed
    # Bigger frames cost what any DATA costs; the threshold is 1,024 bytes.
    client.receive_data(data_frame(sids[0], bytes(1024)) * 2000, 0.0)
    assert not client.closed
    with pytest.raises(ProtocolError):
        client.receive_data(data_frame(sids[0], bytes(1023)) * 2000, 0.0)


# --- OPEN: only for bound tunnels, and at most OPEN_RATE per second ----------------------


def test_open_for_a_tunnel_that_is_not_bound_is_refused_by_the_session() -> None:
    pair = SessionPair(tunnels=(1,))
    client = pair.client
    # OPEN for an unknown tunnel, its early DATA and a RESET, all in one write.
    raw = (
        open_frame(2, tunnel=7)
        + data_frame(2, b"hello")
        + frames(ResetFrame(stream_id=2, error_code=ErrorCode.CANCEL, final_offset=5))
    )
    assert client.receive_data(raw, 0.0) == []
    answer = open_fails(client.data_to_send())
    assert [(f.stream_id, f.reason) for f in answer] == [(2, OpenFailReason.UNKNOWN_TUNNEL)]
    assert client.statistics()["streams"] == 0
    assert client.statistics()["opens_refused"] == 1
    # Tunnel 1 is bound: its OPEN is reported.
    events = client.receive_data(open_frame(4, tunnel=1), 0.0)
    assert [type(e) for e in events] == [StreamOpened]


def test_open_for_a_refused_bind_is_unknown_tunnel() -> None:
    pair = SessionPair(tunnels=())
    client, server = pair.client, pair.server
    client.send_bind(5, 3, ANY)
    pair.send(client)
    server.send_result(5, ResultStatus.DENIED, "no")
    pair.send(server)
    sid = server.open_stream(3, ORIGIN, TARGET)  # the relay misbehaves
    assert pair.send(server) == []
    events = pair.send(client)
    assert events == [
        StreamRejected(
            stream_id=sid, reason=OpenFailReason.UNKNOWN_TUNNEL, message="tunnel 3 is not bound"
        )
    ]
    assert not server.stream_is_open(sid)


def test_unbind_notice_for_a_tunnel_that_is_not_bound_is_ignored() -> None:
    pair = SessionPair(tunnels=(1,))
    client = pair.client
    events = client.receive_data(frames(UnbindFrame(req_id=0, tunnel_id=1, error_code=0)), 0.0)
    assert events == [UnbindReceived(req_id=0, tunnel_id=1, error_code=ErrorCode.NO_ERROR)]
    assert not client.tunnel_is_bound(1)
    notice = frames(UnbindFrame(req_id=0, tunnel_id=1, error_code=0))  # not bound any more
    assert client.receive_data(notice * (NONPRODUCTIVE_BURST - 1), 0.0) == []
    expect_close(client, notice * 2, ErrorCode.ENHANCE_YOUR_CALM)


def test_open_rate_limit_refuses_the_excess_with_resource_shortage() -> None:
    pair = SessionPair(
        client_config=SessionConfig(settings=MANY, open_rate=OPEN_RATE, open_burst=OPEN_BURST)
    )
    client = pair.client
    raw = b"".join(open_frame(2 * i) for i in range(1, 1001))
    events = client.receive_data(raw, now=10.0)
    assert len(events) == OPEN_BURST
    answer = open_fails(client.data_to_send())
    assert len(answer) == 1000 - OPEN_BURST
    assert {f.reason for f in answer} == {OpenFailReason.RESOURCE_SHORTAGE}
    assert not client.closed
    # One second later OPEN_RATE more are taken.
    raw = b"".join(open_frame(2 * i) for i in range(1001, 2001))
    events = client.receive_data(raw, now=11.0)
    assert len(events) == OPEN_RATE
    # 20,000 OPENs over 40 s reach the application at most burst + rate * 40 times.
    pair = SessionPair(
        client_config=SessionConfig(settings=MANY, open_rate=OPEN_RATE, open_burst=OPEN_BURST)
    )
    client = pair.client
    opened = 0
    for second in range(40):
        raw = b"".join(open_frame(2 * (second * 500 + i)) for i in range(1, 501))
        opened += len(client.receive_data(raw, now=float(second)))
        for sid in [2 * (second * 500 + i) for i in range(1, 501)]:
            if client.stream_is_open(sid):
                client.reject_stream(sid, OpenFailReason.CONNECT_FAILED)
        client.data_to_send()
    assert opened <= OPEN_BURST + OPEN_RATE * 40
    assert not client.closed


def test_open_rate_bucket_is_taken_only_by_opens_that_reach_it() -> None:
    """Spec §9.2 item 3.6: full at the start; an OPEN refused in step 5 takes no token."""
    pair = SessionPair(client_config=SessionConfig(settings=MANY, open_rate=1.0, open_burst=2))
    client = pair.client
    # Step 5: tunnel 77777 is not bound -> UNKNOWN_TUNNEL, no token taken.
    assert (
        client.receive_data(open_frame(2, tunnel=77_777) + open_frame(4, tunnel=77_777), 5.0) == []
    )
    assert {f.reason for f in open_fails(client.data_to_send())} == {OpenFailReason.UNKNOWN_TUNNEL}
    # The bucket is still full: two OPENs are taken, the third is refused.
    events = client.receive_data(open_frame(6) + open_frame(8) + open_frame(10), 5.0)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [6, 8]
    assert [(f.stream_id, f.reason) for f in open_fails(client.data_to_send())] == [
        (10, OpenFailReason.RESOURCE_SHORTAGE)
    ]
    # One second refills one token, and no more.
    events = client.receive_data(open_frame(12) + open_frame(14), 6.0)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [12]
    assert [f.stream_id for f in open_fails(client.data_to_send())] == [14]
    assert not client.closed


def test_open_rate_limits_the_client_opened_streams_of_a_relay_session() -> None:
    """The relay is an acceptor too (visit streams, §9.9): the same bucket, per session."""
    config = SessionConfig(settings=MANY, open_rate=1.0, open_burst=1)
    pair = SessionPair(server_config=config)
    server = pair.server
    events = server.receive_data(open_frame(1) + open_frame(3), 0.0)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [1]
    assert [(f.stream_id, f.reason) for f in open_fails(server.data_to_send())] == [
        (3, OpenFailReason.RESOURCE_SHORTAGE)
    ]
    assert not server.closed


# --- PING: answered, and a burst of probes does not trip the limit -------------------------


def test_a_burst_of_probes_is_answered_and_tolerated() -> None:
    pair = SessionPair()
    client = pair.client
    probes = b"".join(frames(PingFrame(seq=i)) for i in range(1, 65))
    assert client.receive_data(probes, now=5.0) == []
    pongs = [p for p in parse_frames(client.data_to_send()) if p[0] == FrameType.PING]
    assert len(pongs) == 1
    assert int.from_bytes(pongs[0][3], "big") == 64  # answers all of them
    assert not client.closed
    more = b"".join(frames(PingFrame(seq=i)) for i in range(65, 65 + PING_BURST))
    with pytest.raises(ProtocolError) as info:
        client.receive_data(more, now=5.0)
    assert info.value.error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_sequential_probes_of_a_relay_never_trip_the_client() -> None:
    # A relay probing once per BIND it handles (64 tunnels), each PING answered before the next.
    pair = SessionPair()
    server = pair.server
    pongs = 0
    for i in range(64):
        pair.now = 1.0 + i * 0.001
        assert server.ping(pair.now) is not None
        pair.send(server)
        pongs += sum(isinstance(e, PongReceived) for e in pair.send(pair.client))
    assert pongs == 64
    assert not pair.client.closed


# --- every event per inbound frame is bounded ----------------------------------------------


def test_server_role_takes_no_tunnel_check() -> None:
    # A server session that allows client OPENs does not track tunnels (it binds none).
    pair = SessionPair(server_config=SessionConfig(settings=Settings(max_concurrent_streams=4)))
    sid = pair.open(opener=pair.client, tunnel_id=42)
    assert pair.server.stream_is_open(sid)


def test_visitors_of_a_dead_local_service_never_trip_the_limit() -> None:
    # Each visitor: OPEN + its first bytes + FIN pipelined; the client refuses every stream
    # (connect failed). 7,500 visitors at 1,500 per second.
    pair = SessionPair(client_config=SessionConfig(settings=MANY, open_rate=2000))
    client = pair.client
    sid = 2
    for second in range(5):
        for step in range(10):
            raw = b""
            for _ in range(150):
                raw += open_frame(sid) + data_frame(sid, b"GET / HTTP/1.1\r\n\r\n")
                sid += 2
            client.receive_data(raw, now=second + step / 10)
            for s in range(sid - 300, sid, 2):
                client.reject_stream(s, OpenFailReason.CONNECT_FAILED)
            late = b"".join(data_frame(s, b"more", fin=True) for s in range(sid - 300, sid, 2))
            assert client.receive_data(late, now=second + step / 10) == []
            client.data_to_send()
    assert not client.closed


def test_streams_refused_by_the_open_rate_may_have_early_data() -> None:
    pair = SessionPair(
        client_config=SessionConfig(settings=MANY, open_rate=OPEN_RATE, open_burst=OPEN_BURST)
    )
    client = pair.client
    raw = b"".join(
        open_frame(2 * i) + data_frame(2 * i, b"hello") * 3 + data_frame(2 * i, b"", fin=True)
        for i in range(1, 1001)
    )
    events = client.receive_data(raw, now=0.0)
    assert len([e for e in events if isinstance(e, StreamOpened)]) == OPEN_BURST
    assert not client.closed
    # Beyond the allowance, small late frames count again.
    with pytest.raises(ProtocolError):
        client.receive_data(data_frame(2000, b"x") * (NONPRODUCTIVE_BURST + 1), now=0.0)
