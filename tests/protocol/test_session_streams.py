"""Streams, flow control, reset and shutdown (protocol-spec.md §8-§10)."""

from __future__ import annotations

import pytest

from muxtunnel.errors import (
    ErrorCode,
    FinalSizeError,
    FlowControlError,
    LocalProtocolError,
    SessionClosedError,
    StreamLimitError,
    StreamStateError,
)
from muxtunnel.protocol.constants import FLAG_FIN, FrameType, OpenFailReason, Role
from muxtunnel.protocol.events import (
    DataReceived,
    GoAwayReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    WindowUpdated,
)
from muxtunnel.protocol.frames import (
    Address,
    GoAwayFrame,
    OpenAckFrame,
    OpenFailFrame,
    OpenFrame,
    ResetFrame,
    Settings,
    WindowFrame,
)
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import (
    ORIGIN,
    TARGET,
    TIGHT_CONFIG,
    SessionPair,
    data_frame,
    exhaust_connection_window,
    expect_close,
    frames,
    parse_frames,
    received_bytes,
)

KiB = 1024
MiB = 1024 * KiB
NONE = Address(None, 0)


def open_frame(sid: int, tunnel: int = 1) -> bytes:
    return frames(OpenFrame(stream_id=sid, tunnel_id=tunnel, origin=ORIGIN, target=TARGET))


def test_case15_pipelined_open_data_fin_before_ack() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = server.open_stream(1, ORIGIN, TARGET)
    server.send_data(sid, b"hello")
    server.end_stream(sid)
    events = pair.send(server)
    assert events == [
        StreamOpened(stream_id=sid, tunnel_id=1, origin=ORIGIN, target=TARGET),
        DataReceived(stream_id=sid, data=b"hello"),
        StreamEnded(stream_id=sid),
    ]
    with pytest.raises(LocalProtocolError):
        client.send_data(sid, b"too early")  # the acceptor answers first
    client.accept_stream(sid)
    client.send_data(sid, b"response", end_stream=True)
    kinds = [(t, s) for t, _f, s, _p in parse_frames(client.data_to_send())]
    assert kinds == [(FrameType.OPEN_ACK, sid), (FrameType.DATA, sid)]
    assert not client.stream_is_open(sid)  # both FINs are on the wire


def test_case16_open_fail_credits_early_data() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = server.open_stream(1, ORIGIN, TARGET)
    server.send_data(sid, bytes(200 * KiB))
    pair.send(server)
    assert client.statistics()["conn_recv_held"] == 200 * KiB
    client.reject_stream(sid, OpenFailReason.CONNECT_FAILED, "refused")
    assert client.statistics()["conn_recv_held"] == 0
    client.acknowledge(sid, 100, 0.0)  # ignored: the stream is gone
    events = pair.send(client)
    assert events[0] == StreamRejected(
        stream_id=sid, reason=OpenFailReason.CONNECT_FAILED, message="refused"
    )
    assert not server.stream_is_open(sid)
    client.reject_stream(sid, OpenFailReason.REFUSED)  # closed already: no-op
    client.accept_stream(sid)


@pytest.mark.parametrize(
    "frame",
    [
        data_frame(2, b"x"),
        frames(WindowFrame(stream_id=2, max_offset=1 << 20)),
        frames(ResetFrame(stream_id=2, error_code=0, final_offset=0)),
        data_frame(2, b"", fin=True),
    ],
)
def test_case17_acceptor_frame_before_ack(frame: bytes) -> None:
    pair = SessionPair()
    sid = pair.server.open_stream(1, ORIGIN, TARGET)
    assert sid == 2
    expect_close(pair.server, frame, ErrorCode.PROTOCOL_ERROR)


def test_second_ack_and_fail_after_ack() -> None:
    for late in (OpenAckFrame(stream_id=2), OpenFailFrame(stream_id=2, reason=1)):
        pair = SessionPair()
        sid = pair.open()
        assert sid == 2
        expect_close(pair.server, frames(late), ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    pair.server.open_stream(1, ORIGIN, TARGET)
    expect_close(pair.client, frames(OpenAckFrame(stream_id=2)), ErrorCode.PROTOCOL_ERROR)


def test_case18_pending_open_limit() -> None:
    client_settings = Settings(max_pending_opens=2)
    pair = SessionPair(client_config=SessionConfig(settings=client_settings))
    server, client = pair.server, pair.client
    sids = [server.open_stream(1, ORIGIN, TARGET) for _ in range(2)]
    assert not server.can_open_stream()
    with pytest.raises(LocalProtocolError):
        server.open_stream(1, ORIGIN, TARGET)
    pair.send(server)
    client.accept_stream(sids[0])
    pair.send(client)
    assert server.can_open_stream()  # admitted only after an OPEN_ACK, nothing reset
    # A non-conforming opener: a 3rd OPEN without any answer.
    pair = SessionPair(client_config=SessionConfig(settings=client_settings))
    raw = open_frame(2) + open_frame(4) + open_frame(6)
    expect_close(pair.client, raw, ErrorCode.STREAM_LIMIT_ERROR, StreamLimitError)


@pytest.mark.parametrize("close_by", ["fin", "reset", "remote_reset"])
def test_case19_concurrency_limit_frees_at_once(close_by: str) -> None:
    settings = Settings(max_concurrent_streams=3)
    pair = SessionPair(client_config=SessionConfig(settings=settings))
    server, client = pair.server, pair.client
    sids = [pair.open() for _ in range(3)]
    assert not server.can_open_stream()
    first = sids[0]
    if close_by == "fin":
        server.end_stream(first)
        client.end_stream(first)
        pair.pump()
    elif close_by == "reset":
        server.reset_stream(first)
        pair.pump()
    else:
        client.reset_stream(first, ErrorCode.CONNECT_ERROR)
        pair.pump()
    assert not server.stream_is_open(first)
    assert not client.stream_is_open(first)
    assert server.can_open_stream()
    sid = pair.open()
    assert client.stream_is_open(sid)
    # A non-conforming opener exceeds the limit.
    expect_close(client, open_frame(sid + 2), ErrorCode.STREAM_LIMIT_ERROR, StreamLimitError)


@pytest.mark.parametrize("sid", [2, 1, 3])
def test_case20_open_id_rules(sid: int) -> None:
    pair = SessionPair()
    pair.open()  # stream 2 opened by the server
    expect_close(pair.client, open_frame(sid), ErrorCode.PROTOCOL_ERROR)


def test_client_initiated_streams_need_server_permission() -> None:
    pair = SessionPair()
    assert not pair.client.can_open_stream()  # the server's default allows 0
    pair = SessionPair(server_config=SessionConfig(settings=Settings(max_concurrent_streams=1)))
    sid = pair.open(pair.client)
    assert sid == 1
    pair.client.send_data(sid, b"ping", end_stream=True)
    assert received_bytes(pair.send(pair.client), sid) == b"ping"
    expect_close(pair.server, open_frame(3), ErrorCode.STREAM_LIMIT_ERROR, StreamLimitError)


def test_idle_stream_frames_are_errors() -> None:
    for raw in (
        data_frame(4, b"x"),
        frames(WindowFrame(stream_id=3, max_offset=99)),
        frames(ResetFrame(stream_id=5, error_code=0, final_offset=0)),
        frames(OpenAckFrame(stream_id=1)),
        data_frame(0, b"x"),
        data_frame(2, b""),
    ):
        pair = SessionPair()
        pair.open()
        expect_close(pair.client, raw, ErrorCode.PROTOCOL_ERROR)


def test_case22_fin_waits_behind_data_without_credit() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = pair.open()
    server.send_data(sid, bytes(1 * MiB))
    server.end_stream(sid)
    with pytest.raises(LocalProtocolError):
        server.send_data(sid, b"x")
    got = bytearray()
    ended = False
    for _ in range(100):
        for event in pair.send(server):
            if isinstance(event, DataReceived):
                assert not ended
                got += event.data
                client.acknowledge(sid, len(event.data), 0.0)
            elif isinstance(event, StreamEnded):
                ended = True
        pair.send(client)
        if ended:
            break
    assert ended
    assert len(got) == 1 * MiB


def test_case24_reset_with_data_in_flight_credits_everything() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = pair.open()
    client.send_data(sid, bytes(200 * KiB))
    in_flight = client.data_to_send()  # B's data is on the wire ...
    server.reset_stream(sid, ErrorCode.CANCEL)  # ... when A resets the stream
    assert server.receive_data(in_flight, 0.0) == []  # discarded, no RESET in reply
    back = server.data_to_send()
    kinds = [(t, s) for t, _f, s, _p in parse_frames(back)]
    assert (FrameType.RESET, sid) in kinds
    assert not [k for k in kinds if k[0] == FrameType.RESET and k != (FrameType.RESET, sid)]
    assert server.statistics()["conn_recv_buffered"] == 0
    events = client.receive_data(back, 0.0)
    assert StreamReset(stream_id=sid, error_code=ErrorCode.CANCEL, remote=True) in events
    assert client.data_to_send() == b""  # nothing in reply to the RESET
    # No credit was lost: the client may still send the whole connection window.
    pair.pump()
    assert client.statistics()["conn_send_available"] == server._conn_recv.advertised - 200 * KiB
    sid2 = pair.open(pair.server)
    server.send_data(sid2, bytes(256 * KiB))
    pair.pump()
    assert received_bytes(pair.client_log, sid2) == bytes(256 * KiB)


def test_case25_final_size_and_reset_on_closed_stream() -> None:
    pair = SessionPair()
    sid = pair.open()
    pair.server.send_data(sid, b"12345")
    pair.send(pair.server)
    bad = frames(ResetFrame(stream_id=sid, error_code=9, final_offset=4))
    expect_close(pair.client, bad, ErrorCode.FINAL_SIZE_ERROR, FinalSizeError)
    pair = SessionPair()
    sid = pair.open()
    pair.server.send_data(sid, b"12345")
    pair.send(pair.server)
    pair.server.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    events = pair.send(pair.server)
    assert events == [StreamReset(stream_id=sid, error_code=ErrorCode.CONNECT_ERROR, remote=True)]
    again = frames(ResetFrame(stream_id=sid, error_code=9, final_offset=77))
    assert pair.client.receive_data(again, 0.0) == []  # ignored
    assert pair.client.data_to_send() == b""
    pair.server.reset_stream(sid)  # no-op on a closed stream
    with pytest.raises(LocalProtocolError):
        pair.server.reset_stream(sid + 2)  # never opened


def test_case26_data_after_fin_is_a_stream_error() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    a, b = pair.open(), pair.open()
    server.send_data(a, b"last", end_stream=True)
    pair.send(server)
    events = client.receive_data(data_frame(a, b"more"), 0.0)
    assert events == [
        StreamReset(stream_id=a, error_code=ErrorCode.STREAM_STATE_ERROR, remote=False)
    ]
    assert not client.closed
    assert not client.stream_is_open(a)
    out = parse_frames(client.data_to_send())
    assert [(t, s) for t, _f, s, _p in out] == [(FrameType.RESET, a)]
    server.send_data(b, b"still flowing")
    assert received_bytes(pair.send(server), b) == b"still flowing"
    # "last" was dropped with the reset stream; only b's bytes wait for the application.
    assert client.statistics()["conn_recv_held"] == len(b"still flowing")


def test_case27_flow_control_errors_and_low_window_ignored() -> None:
    pair = SessionPair()
    sid = pair.open()
    window = pair.client.local_settings.initial_stream_window
    pair.client.receive_data(data_frame(sid, bytes(65536)) * (window // 65536), 0.0)
    expect_close(pair.client, data_frame(sid, b"x"), ErrorCode.FLOW_CONTROL_ERROR, FlowControlError)
    # Connection window exceeded by one byte across streams.
    pair = SessionPair(client_config=TIGHT_CONFIG)
    *_, last = exhaust_connection_window(pair)
    expect_close(
        pair.client, data_frame(last, b"x"), ErrorCode.FLOW_CONTROL_ERROR, FlowControlError
    )
    # A WINDOW that does not raise the limit changes nothing.
    pair = SessionPair()
    sid = pair.open()
    before = pair.server.statistics()["conn_send_available"]
    assert pair.server.receive_data(frames(WindowFrame(stream_id=sid, max_offset=10)), 0.0) == []
    assert pair.server.receive_data(frames(WindowFrame(stream_id=0, max_offset=10)), 0.0) == []
    assert pair.server.statistics()["conn_send_available"] == before
    events = pair.server.receive_data(frames(WindowFrame(stream_id=0, max_offset=1 << 40)), 0.0)
    assert events == [WindowUpdated(stream_id=0)]
    raw = WindowFrame(stream_id=sid, max_offset=(1 << 62) + 1)
    expect_close(pair.server, frames(raw), ErrorCode.FLOW_CONTROL_ERROR, FlowControlError)


def test_late_frames_on_known_closed_streams_are_ignored_and_credited() -> None:
    pair = SessionPair()
    server, _client = pair.server, pair.client
    sid = pair.open()
    server.reset_stream(sid)
    pair.send(server)
    late = (
        data_frame(sid, bytes(1000))
        + data_frame(sid, b"", fin=True)
        + frames(WindowFrame(stream_id=sid, max_offset=1 << 30))
        + frames(ResetFrame(stream_id=sid, error_code=0, final_offset=1000))
        + frames(OpenAckFrame(stream_id=sid))
        + frames(OpenFailFrame(stream_id=sid, reason=1))
    )
    assert server.receive_data(late, 0.0) == []
    assert server.statistics()["conn_recv_buffered"] == 0
    assert not server.closed


def test_reset_of_pending_stream_then_crossing_ack_is_ignored() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = server.open_stream(1, ORIGIN, TARGET)
    pair.send(server)
    server.reset_stream(sid)
    client.accept_stream(sid)
    client.send_data(sid, b"crossing")
    crossing = client.data_to_send()
    assert server.receive_data(crossing, 0.0) == []
    events = pair.send(server)
    assert events == [StreamReset(stream_id=sid, error_code=ErrorCode.CANCEL, remote=True)]
    assert server.can_open_stream()


def test_reset_of_unanswered_peer_stream_sends_open_fail() -> None:
    pair = SessionPair()
    sid = pair.server.open_stream(1, ORIGIN, TARGET)
    pair.send(pair.server)
    pair.client.reset_stream(sid, ErrorCode.CANCEL)
    events = pair.send(pair.client)
    assert events == [
        StreamRejected(stream_id=sid, reason=OpenFailReason.REFUSED, message="reset (CANCEL)")
    ]


def test_peer_reset_of_pending_open_and_late_accept() -> None:
    pair = SessionPair()
    sid = pair.server.open_stream(1, ORIGIN, TARGET)
    pair.server.send_data(sid, b"early")
    pair.send(pair.server)
    pair.server.reset_stream(sid)
    pair.send(pair.server)
    assert pair.client.statistics()["remote_pending"] == 0
    assert pair.client.statistics()["conn_recv_buffered"] == 0
    pair.client.accept_stream(sid)  # the dial finished after the reset: no-op
    assert pair.client.data_to_send() == b""


def test_opener_fin_before_ack() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = server.open_stream(1, ORIGIN, TARGET)
    server.send_data(sid, b"req", end_stream=True)
    pair.send(server)
    client.accept_stream(sid)
    events = pair.send(client)
    assert events == [StreamAccepted(stream_id=sid)]
    client.send_data(sid, b"resp", end_stream=True)
    events = pair.send(client)
    assert events == [DataReceived(stream_id=sid, data=b"resp"), StreamEnded(stream_id=sid)]
    assert not server.stream_is_open(sid)
    assert not client.stream_is_open(sid)


def test_acknowledge_after_graceful_close_still_credits() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = pair.open()
    server.send_data(sid, bytes(200 * KiB), end_stream=True)
    client.end_stream(sid)
    pair.pump()
    assert received_bytes(pair.client_log, sid) == bytes(200 * KiB)
    assert not client.stream_is_open(sid)
    assert client.statistics()["conn_recv_held"] == 200 * KiB
    with pytest.raises(ValueError):
        client.acknowledge(sid, 200 * KiB + 1, 0.0)
    client.acknowledge(sid, 100 * KiB, 0.0)
    client.acknowledge(sid, 100 * KiB, 0.0)
    client.acknowledge(sid, 0, 0.0)
    assert client.statistics()["conn_recv_held"] == 0
    client.acknowledge(sid, 5, 0.0)  # unknown by now: ignored


def test_acknowledge_after_close_says_when_the_connection_window_moves() -> None:
    pair = SessionPair(client_config=TIGHT_CONFIG)
    server, client = pair.server, pair.client
    sids = exhaust_connection_window(pair)
    client.data_to_send()
    server.end_stream(sids[1])
    client.end_stream(sids[1])
    pair.pump()
    assert not client.stream_is_open(sids[1])  # its 1 MiB is held beyond the budget
    client.data_to_send()
    assert client.acknowledge(sids[1], 1 * MiB, 0.0) is client.wants_write() is True
    client.data_to_send()
    assert client.acknowledge(sids[1], 1, 0.0) is client.wants_write() is False  # all acked


def test_acknowledge_more_than_received() -> None:
    pair = SessionPair()
    sid = pair.open()
    with pytest.raises(ValueError):
        pair.client.acknowledge(sid, 1, 0.0)


def test_no_stream_window_after_peer_fin() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = pair.open()
    server.send_data(sid, bytes(256 * KiB), end_stream=True)
    pair.send(server, 1 << 20)
    client.acknowledge(sid, 256 * KiB, 0.0)
    assert not client.wants_write()
    assert client.data_to_send() == b""


def test_window_updates_are_coalesced_and_acknowledge_says_when_one_is_due() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = pair.open()
    server.send_data(sid, bytes(256 * KiB))
    pair.send(server, 1 << 20)
    assert not client.wants_write()
    answers = []
    for _ in range(256):
        answers.append(client.acknowledge(sid, 1 * KiB, 0.0))
        assert answers[-1] is client.wants_write()
    assert answers[0] is False
    assert answers[-1] is True  # the half-window rule (spec §8.5)
    out = [(t, s) for t, _f, s, _p in parse_frames(client.data_to_send())]
    assert out.count((FrameType.WINDOW, sid)) == 1
    assert client.acknowledge(sid, 0, 0.0) is False
    assert client.acknowledge(sid + 2, 1, 0.0) is False  # never opened: ignored


def test_acknowledge_before_accept_defers_window() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = server.open_stream(1, ORIGIN, TARGET)
    server.send_data(sid, bytes(256 * KiB))
    pair.send(server, 1 << 20)
    client.acknowledge(sid, 256 * KiB, 0.0)
    out = [(t, s) for t, _f, s, _p in parse_frames(client.data_to_send())]
    assert (FrameType.WINDOW, sid) not in out
    client.accept_stream(sid)
    assert client.wants_write()
    out = [(t, s) for t, _f, s, _p in parse_frames(client.data_to_send())]
    assert out == [(FrameType.OPEN_ACK, sid), (FrameType.WINDOW, sid)]


def test_window_autotune_grows_with_rtt() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    client.ping(0.0)
    pair.send(client)
    pair.now = 0.05
    pair.send(server)
    assert client.rtt == pytest.approx(0.05)
    sid = pair.open()
    server.send_data(sid, bytes(8 * MiB))
    for i in range(400):
        pair.now = 0.05 + i * 0.001
        for event in pair.send(server):
            if isinstance(event, DataReceived):
                client.acknowledge(sid, len(event.data), pair.now)
        pair.send(client)
    stream = client._streams[sid]
    assert stream.recv.window > 256 * KiB
    assert client._conn_recv.window >= stream.recv.window * 3 // 2
    stats = client.statistics()
    assert stats["stream_recv_window_peak"] == stream.recv.window
    assert stats["conn_recv_window"] == client._conn_recv.window
    assert stats["rtt_us"] == 50_000
    assert pair.server.statistics()["rtt_us"] == -1


def test_case37_two_phase_goaway() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid = pair.open()
    server.go_away(ErrorCode.NO_ERROR, "draining soon", 2**64 - 1)
    events = pair.send(server)
    assert events == [
        GoAwayReceived(
            last_stream_id=2**64 - 1, error_code=ErrorCode.NO_ERROR, message="draining soon"
        )
    ]
    assert not server.can_open_stream()
    with pytest.raises(SessionClosedError):
        server.open_stream(1, ORIGIN, TARGET)
    server.go_away(ErrorCode.NO_ERROR, "", 2**64 - 1)  # never raised above the previous one
    server.go_away()
    events = pair.send(server)
    # The repeated GOAWAY changes nothing and is not reported; the lowering one is.
    assert [e.last_stream_id for e in events if isinstance(e, GoAwayReceived)] == [0]
    # The existing stream still completes.
    server.send_data(sid, b"bye", end_stream=True)
    client.send_data(sid, b"ok", end_stream=True)
    pair.pump()
    assert received_bytes(pair.client_log, sid) == b"bye"
    assert received_bytes(pair.server_log, sid) == b"ok"
    assert not server.stream_is_open(sid)
    server.close()
    pair.pump()
    assert client.closed
    # A later GOAWAY with a higher id is an error.
    pair = SessionPair()
    pair.client.receive_data(frames(GoAwayFrame(last_stream_id=4, error_code=0)), 0.0)
    raw = frames(GoAwayFrame(last_stream_id=6, error_code=0))
    expect_close(pair.client, raw, ErrorCode.PROTOCOL_ERROR)


def test_goaway_refuses_our_streams_above_last_id() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    a = pair.open()
    b = server.open_stream(1, ORIGIN, TARGET)
    pair.send(server)
    events = server.receive_data(frames(GoAwayFrame(last_stream_id=a, error_code=0)), 0.0)
    assert events[1:] == [
        StreamReset(stream_id=b, error_code=ErrorCode.REFUSED_STREAM, remote=True)
    ]
    assert server.stream_is_open(a)
    del client


def test_our_goaway_discards_later_peer_opens() -> None:
    pair = SessionPair()
    client = pair.client
    client.go_away(ErrorCode.NO_ERROR, "", 0)
    assert client.receive_data(open_frame(2) + data_frame(2, bytes(100)), 0.0) == []
    assert client.statistics()["conn_recv_buffered"] == 0
    assert not client.can_open_stream()


def test_reset_flood() -> None:
    pair = SessionPair()
    raw = b"".join(
        frames(ResetFrame(stream_id=2, error_code=0, final_offset=0)) for _ in range(1001)
    )
    pair.open()
    expect_close(pair.client, raw, ErrorCode.ENHANCE_YOUR_CALM)


def test_control_output_flood() -> None:
    settings = Settings(max_concurrent_streams=5000, max_pending_opens=5000)
    pair = SessionPair(client_config=SessionConfig(settings=settings, open_burst=5000))
    client = pair.client
    count = 4200
    client.receive_data(
        b"".join(open_frame(2 * i) + data_frame(2 * i, b"x", fin=True) for i in range(1, count)),
        0.0,
    )
    for i in range(1, count):
        client.accept_stream(2 * i)
    client.data_to_send()
    # Each of these is a stream error that queues a RESET: more than 4096 frames at once.
    flood = b"".join(data_frame(2 * i, b"y") for i in range(1, count))
    expect_close(client, flood, ErrorCode.ENHANCE_YOUR_CALM)


def test_data_after_fin_before_answer_is_a_connection_error() -> None:
    pair = SessionPair()
    sid = pair.server.open_stream(1, ORIGIN, TARGET)
    pair.server.end_stream(sid)
    pair.send(pair.server)
    expect_close(pair.client, data_frame(sid, b"x"), ErrorCode.STREAM_STATE_ERROR, StreamStateError)


def test_local_misuse_of_stream_calls() -> None:
    pair = SessionPair()
    server = pair.server
    with pytest.raises(LocalProtocolError):
        server.send_data(2, b"x")  # never opened
    with pytest.raises(LocalProtocolError):
        server.accept_stream(0)
    sid = pair.open()
    with pytest.raises(LocalProtocolError):
        server.accept_stream(sid)  # our own stream
    assert server.pending_bytes(999) == 0
    server.send_data(sid, memoryview(bytes(8)).cast("Q"))
    assert server.pending_bytes(sid) == 8
    server.send_data(sid, b"")
    assert server.pending_bytes(sid) == 8
    with pytest.raises(ValueError):
        server.open_stream(1, Address(None, 5), TARGET)  # invalid address: nothing changes
    assert server.statistics()["local_open"] == 1
    pair.server.close()
    server.reset_stream(sid)  # no-op on a closed session
    server.acknowledge(sid, 1, 0.0)
    server.go_away()
    with pytest.raises(SessionClosedError):
        server.open_stream(1, ORIGIN, TARGET)


def test_open_before_peer_hello_and_client_open_before_auth() -> None:
    server = Session(Role.SERVER)
    assert not server.can_open_stream()
    with pytest.raises(LocalProtocolError):
        server.open_stream(1, ORIGIN, TARGET)
    client = Session(Role.CLIENT)
    from .helpers import preface

    client.receive_data(preface(Role.SERVER), 0.0)
    expect_close(client, open_frame(2), ErrorCode.PROTOCOL_ERROR)


def test_window_budget_is_consulted() -> None:
    asked: list[int] = []

    def budget(n: int) -> bool:
        asked.append(n)
        return True

    pair = SessionPair(client_config=SessionConfig(window_budget=budget))
    server, client = pair.server, pair.client
    client.ping(0.0)
    pair.send(client)
    pair.now = 0.1
    pair.send(server)
    sid = pair.open()
    server.send_data(sid, bytes(1 * MiB))
    for _ in range(20):
        for event in pair.send(server):
            if isinstance(event, DataReceived):
                client.acknowledge(sid, len(event.data), 0.11)
        pair.send(client)
    assert asked


def test_fin_flag_frames() -> None:
    pair = SessionPair()
    sid = pair.open()
    pair.server.send_data(sid, b"abc", end_stream=True)
    out = parse_frames(pair.server.data_to_send())
    assert out == [(FrameType.DATA, FLAG_FIN, sid, b"abc")]
    assert pair.server.statistics()["scheduled"] == 0
    with pytest.raises(LocalProtocolError):
        pair.server.end_stream(sid)
