"""``Session.send_data_now``: one DATA frame at once, or None and nothing queued."""

from __future__ import annotations

import pytest

from muxtunnel.errors import LocalProtocolError, SessionClosedError
from muxtunnel.protocol.constants import FrameType
from muxtunnel.protocol.events import DataReceived, StreamEnded
from muxtunnel.protocol.frames import Settings
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import TIGHT_CONFIG, SessionPair, parse_frames
from .resume_helpers import CLIENT_CONFIG, SERVER_CONFIG

KiB = 1024
MiB = 1024 * KiB


def _counts(session: Session) -> tuple[int, int, int, dict[str, int]]:
    stats = session.statistics()
    return session.sent_offset, session.replay_size, session.send_credit(1), stats


@pytest.mark.parametrize(
    ("server_config", "client_config"),
    [(None, None), (SERVER_CONFIG, CLIENT_CONFIG)],
    ids=["plain", "resumable"],
)
@pytest.mark.parametrize("payload", [b"k", bytearray(b"keystroke"), memoryview(bytes(64 * KiB))])
def test_the_frame_and_counts_are_those_of_the_queue(
    server_config: SessionConfig | None,
    client_config: SessionConfig | None,
    payload: bytes | bytearray | memoryview,
) -> None:
    now_pair = SessionPair(server_config=server_config, client_config=client_config)
    queue_pair = SessionPair(server_config=server_config, client_config=client_config)
    sid = now_pair.open()
    assert queue_pair.open() == sid
    assert now_pair.server.resume_enabled is (server_config is not None)

    out = now_pair.server.send_data_now(sid, payload)
    queue_pair.server.send_data(sid, payload)
    queued = queue_pair.server.data_to_send()

    assert out == queued
    assert [(t, s, len(p)) for t, _f, s, p in parse_frames(queued)] == [
        (FrameType.DATA, sid, len(payload))
    ]
    assert not now_pair.server.wants_write()
    assert _counts(now_pair.server) == _counts(queue_pair.server)
    events = now_pair.client.receive_data(out, now_pair.now)
    assert events == [DataReceived(sid, bytes(payload))]


def test_none_and_nothing_queued_while_other_output_waits() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    sid, other = pair.open(), pair.open()

    def refused(data: bytes = b"x") -> None:
        before = _counts(server)
        assert server.send_data_now(sid, data) is None
        assert _counts(server) == before
        assert server.pending_bytes(sid) == 0

    server.ping(0.0)  # a control frame
    refused()
    server.data_to_send()
    client.ping(0.0)
    pair.send(client)  # the server owes a PONG
    refused()
    pair.pump()
    server.send_data(other, b"queued first")  # another stream's data
    refused()
    pair.pump()
    third = pair.open()
    server.send_data(other, bytes(200 * KiB))
    server.send_data(third, bytes(200 * KiB))
    server.data_to_send(64 * KiB)  # both streams used a quantum: old flows now
    refused()
    pair.pump()
    server.end_stream(third)  # only a FIN queued
    refused()
    pair.pump()
    client.send_data(sid, bytes(256 * KiB))
    pair.send(client, 1 << 20)
    for _ in range(256):  # until a WINDOW update is due
        if server.acknowledge(sid, KiB, 0.0):
            break
    refused()
    pair.pump()
    refused(b"")  # nothing to frame
    refused(bytes(64 * KiB + 1))  # more than one frame
    assert server.send_data_now(sid, b"now") is not None


def test_none_while_a_connection_window_update_waits() -> None:
    pair = SessionPair(client_config=TIGHT_CONFIG)
    server, client = pair.server, pair.client
    sid = pair.open()
    server.send_data(sid, bytes(MiB))
    pair.send(server, 2 * MiB)  # held within the receive budget: its connection credit returns
    assert client.wants_write()  # a connection WINDOW, nothing for the stream (not consumed)
    assert client.send_data_now(sid, b"x") is None
    out = [(t, s) for t, _f, s, _p in parse_frames(client.data_to_send())]
    assert out == [(FrameType.WINDOW, 0)]
    assert client.send_data_now(sid, b"x") is not None


def test_none_when_the_credit_does_not_cover_it() -> None:
    config = SessionConfig(
        settings=Settings(initial_stream_window=64 * KiB, initial_conn_window=96 * KiB),
        max_stream_window=64 * KiB,
        max_conn_window=96 * KiB,
    )
    pair = SessionPair(client_config=config)
    server = pair.server
    sid, other = pair.open(), pair.open()
    assert server.send_data_now(sid, bytes(60 * KiB)) is not None
    assert server.send_data_now(sid, bytes(5 * KiB)) is None  # the stream's window: 4 KiB left
    assert server.send_data_now(sid, bytes(4 * KiB - 100)) is not None
    server.send_data(sid, bytes(200))  # 100 bytes of credit: below the SWS threshold, it waits
    assert server.data_to_send() == b""
    assert server.pending_bytes(sid) == 200
    assert server.send_data_now(sid, b"x") is None  # not before this stream's blocked bytes
    assert server.send_data_now(other, bytes(32 * KiB + 101)) is None  # the connection's limit
    assert server.send_data_now(other, bytes(32 * KiB + 100)) is not None


def test_none_when_the_replay_log_is_full() -> None:
    settings = {"initial_stream_window": MiB, "initial_conn_window": 8 * MiB, "resume_window": 60}
    client_config = SessionConfig(
        settings=Settings(**settings), max_stream_window=MiB, max_conn_window=8 * MiB
    )
    server_config = SessionConfig(
        settings=Settings(max_concurrent_streams=0, **settings),
        max_stream_window=MiB,
        max_conn_window=8 * MiB,
        max_replay=4 * MiB,
    )
    pair = SessionPair(server_config=server_config, client_config=client_config)
    server = pair.server
    sids = [pair.open() for _ in range(5)]
    chunk = bytes(64 * KiB)
    refused_at = None
    for i in range(80):
        sid = sids[i // 16]
        assert server.send_credit(sid) >= len(chunk)  # stream and connection credit left
        if server.send_data_now(sid, chunk) is None:
            refused_at = i
            break
    assert refused_at == 63  # 63 frames and their headers leave less than 64 KiB of log room
    assert server.replay_size > 4 * MiB - len(chunk)
    assert server.pending_bytes(sids[3]) == 0


def test_none_while_suspended() -> None:
    pair = SessionPair(server_config=SERVER_CONFIG, client_config=CLIENT_CONFIG)
    sid = pair.open()
    pair.server.suspend()
    assert pair.server.send_data_now(sid, b"x") is None


def test_raises_like_send_data() -> None:
    pair = SessionPair()
    server = pair.server
    sid = pair.open()
    with pytest.raises(LocalProtocolError):
        server.send_data_now(sid + 200, b"x")  # never opened
    server.end_stream(sid)
    with pytest.raises(LocalProtocolError):
        server.send_data_now(sid, b"x")  # finished for sending
    server.reset_stream(sid)
    with pytest.raises(LocalProtocolError):
        server.send_data_now(sid, b"x")  # gone
    server.close()
    with pytest.raises(SessionClosedError):
        server.send_data_now(sid, b"x")


@pytest.mark.parametrize(
    ("server_config", "client_config"),
    [(None, None), (SERVER_CONFIG, CLIENT_CONFIG)],
    ids=["plain", "resumable"],
)
@pytest.mark.parametrize("peer_done", [False, True], ids=["open", "peer-finished"])
def test_end_stream_now_is_end_stream_and_the_queue(
    server_config: SessionConfig | None, client_config: SessionConfig | None, peer_done: bool
) -> None:
    now_pair = SessionPair(server_config=server_config, client_config=client_config)
    queue_pair = SessionPair(server_config=server_config, client_config=client_config)
    sid = now_pair.open()
    assert queue_pair.open() == sid
    if peer_done:  # the peer's FIN came first: ours closes the stream
        for pair in (now_pair, queue_pair):
            pair.client.end_stream(sid)
            pair.send(pair.client)

    out = now_pair.server.end_stream_now(sid)
    queue_pair.server.end_stream(sid)
    queued = queue_pair.server.data_to_send()

    assert out == queued
    assert [(t, f, s, len(p)) for t, f, s, p in parse_frames(queued)] == [
        (FrameType.DATA, 1, sid, 0)
    ]
    assert not now_pair.server.wants_write()
    assert _counts(now_pair.server) == _counts(queue_pair.server)
    for pair in (now_pair, queue_pair):
        assert pair.server.stream_is_open(sid) is not peer_done
        with pytest.raises(LocalProtocolError):
            pair.server.end_stream(sid)  # finished for sending either way
    assert now_pair.client.receive_data(out, now_pair.now) == [StreamEnded(stream_id=sid)]


def test_end_stream_now_none_while_output_waits_and_raises_like_end_stream() -> None:
    pair = SessionPair(server_config=SERVER_CONFIG, client_config=CLIENT_CONFIG)
    server = pair.server
    sid, other = pair.open(), pair.open()
    server.send_data(sid, b"unsent")  # the stream's own bytes go first
    assert server.end_stream_now(sid) is None
    assert server.pending_bytes(sid) == 6
    pair.pump()
    server.ping(0.0)  # a control frame
    assert server.end_stream_now(sid) is None
    pair.pump()
    server.suspend()
    assert server.end_stream_now(sid) is None
    assert server.stream_is_open(sid)
    with pytest.raises(LocalProtocolError):
        server.end_stream_now(other + 200)  # never opened
    fresh = SessionPair()
    sid, queued = fresh.open(), fresh.open()
    fresh.server.end_stream(queued)
    with pytest.raises(LocalProtocolError):
        fresh.server.end_stream_now(queued)  # its FIN is queued already
    fresh.server.reset_stream(sid)
    with pytest.raises(LocalProtocolError):
        fresh.server.end_stream_now(sid)  # gone
    fresh.server.close()
    with pytest.raises(SessionClosedError):
        fresh.server.end_stream_now(sid)
