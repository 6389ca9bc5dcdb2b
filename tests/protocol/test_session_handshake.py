"""Session handshake, authentication and control requests (protocol-spec.md §3, §7)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from muxtunnel.errors import (
    ErrorCode,
    FrameSizeError,
    LocalProtocolError,
    PrefaceError,
    ProtocolError,
    SessionClosedError,
    VersionMismatchError,
)
from muxtunnel.protocol.constants import MAGIC, AuthMethod, FrameType, ResultStatus, Role
from muxtunnel.protocol.events import (
    AuthRequested,
    BindRequested,
    ConnectionClosed,
    DataReceived,
    Event,
    HelloReceived,
    PongReceived,
    ResultReceived,
    UnbindReceived,
)
from muxtunnel.protocol.frames import (
    HEADER,
    Address,
    AuthFrame,
    BindFrame,
    ChallengeFrame,
    CloseFrame,
    ExtensionFrame,
    HelloFrame,
    PingFrame,
    ResultFrame,
    Settings,
    UnbindFrame,
    decode_payload,
    encode_frame,
)
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import (
    SERVER_NONCE,
    SessionPair,
    close_code,
    expect_close,
    frames,
    make_credential,
    parse_frames,
    preface,
)

BIND_ANY = Address(None, 0)


def fresh_server() -> Session:
    server = Session(Role.SERVER)
    server.send_challenge(SERVER_NONCE)
    return server


def test_handshake_events_and_output() -> None:
    client = Session(Role.CLIENT)
    wire = client.data_to_send()
    assert wire.startswith(MAGIC)
    assert [f[0] for f in parse_frames(wire)] == [FrameType.HELLO]
    assert not client.wants_write()
    pair = SessionPair()
    assert pair.server_log[0] == HelloReceived(settings=Settings(), minor=2)
    assert pair.server.peer_settings == Settings()
    assert pair.client.peer_settings == Settings(max_concurrent_streams=0)


# Case 1: any chunking of a valid byte stream yields the same events.


def _transcript() -> tuple[bytes, list[Event]]:
    """The server->client byte stream of a busy session, and the client's events."""
    pair = SessionPair(handshake=False)
    server = pair.server
    client = Session(Role.CLIENT)  # a twin client that sees the server's whole byte stream
    server.send_challenge(SERVER_NONCE)
    wire = bytearray()

    def relay() -> None:
        data = server.data_to_send()
        wire.extend(data)
        client.receive_data(data, 0.0)  # keeps the twin's state in step
        pair.client.receive_data(data, 0.0)
        back = pair.client.data_to_send()
        if back:
            server.receive_data(back, 0.0)

    relay()
    pair.client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    pair.client.send_bind(2, 7, BIND_ANY)
    client.send_bind(2, 7, BIND_ANY)
    server.receive_data(pair.client.data_to_send(), 0.0)
    server.send_result(1, ResultStatus.OK)
    server.receive_data(b"", 0.0)
    server.send_result(2, ResultStatus.OK, "ok", Address("203.0.113.7", 40001))
    relay()
    sids = [server.open_stream(7, Address("198.51.100.1", 1000 + i), BIND_ANY) for i in range(3)]
    for i, sid in enumerate(sids):
        server.send_data(sid, bytes([i]) * (1000 * (i + 1)), end_stream=i == 1)
    server.ping(0.0)
    relay()
    server.reset_stream(sids[2])
    server.go_away(ErrorCode.NO_ERROR, "bye", 2**64 - 1)
    relay()
    wire.extend(server.data_to_send())
    reference = Session(Role.CLIENT)
    reference.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    reference.send_bind(2, 7, BIND_ANY)
    return bytes(wire), reference.receive_data(bytes(wire), 0.0)


TRANSCRIPT, TRANSCRIPT_EVENTS = _transcript()


def _replay(cuts: list[int]) -> list[Event]:
    client = Session(Role.CLIENT)
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    client.send_bind(2, 7, BIND_ANY)
    events: list[Event] = []
    prev = 0
    for cut in [*cuts, len(TRANSCRIPT)]:
        events += client.receive_data(TRANSCRIPT[prev:cut], 0.0)
        prev = cut
    return events


def _normalize(events: list[Event]) -> list[Event]:
    """Merge adjacent DataReceived of one stream (chunking may split nothing, but be exact)."""
    return [
        DataReceived(stream_id=e.stream_id, data=bytes(e.data))
        if isinstance(e, DataReceived)
        else e
        for e in events
    ]


def test_transcript_is_rich() -> None:
    kinds = {type(e).__name__ for e in TRANSCRIPT_EVENTS}
    assert {"HelloReceived", "ChallengeReceived", "ResultReceived", "StreamOpened"} <= kinds
    assert {"DataReceived", "StreamEnded", "StreamReset", "GoAwayReceived"} <= kinds


def test_chunking_whole_and_byte_by_byte() -> None:
    expected = _normalize(TRANSCRIPT_EVENTS)
    assert _normalize(_replay([])) == expected
    assert _normalize(_replay(list(range(1, len(TRANSCRIPT))))) == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(TRANSCRIPT)), max_size=30))
def test_chunking_random_splits(cuts: list[int]) -> None:
    assert _normalize(_replay(sorted(cuts))) == _normalize(TRANSCRIPT_EVENTS)


# Cases 2-9: framing and HELLO.


def test_case2_oversize_data_header_closes_before_payload() -> None:
    server = fresh_server()
    server.receive_data(preface(Role.CLIENT), 0.0)
    header = (65537).to_bytes(4, "big") + bytes([0, 0, 0, 0]) + (2).to_bytes(8, "big")
    expect_close(server, header, ErrorCode.FRAME_SIZE_ERROR, FrameSizeError)
    assert server._reader.buffered == 0


def test_case2_oversize_open_header() -> None:
    client = Session(Role.CLIENT)
    client.receive_data(preface(Role.SERVER), 0.0)
    header = (4097).to_bytes(4, "big") + bytes([FrameType.OPEN, 0, 0, 0]) + (2).to_bytes(8, "big")
    expect_close(client, header, ErrorCode.FRAME_SIZE_ERROR, FrameSizeError)


@pytest.mark.parametrize(
    ("frame_type", "length", "sid"),
    [(FrameType.WINDOW, 7, 0), (FrameType.PING, 9, 0), (FrameType.RESET, 11, 1)],
)
def test_case3_wrong_fixed_length(frame_type: int, length: int, sid: int) -> None:
    pair = SessionPair()
    if sid:
        sid = pair.open()
    raw = HEADER.pack(length, frame_type, 0, 0, sid) + bytes(length)
    expect_close(pair.client, raw, ErrorCode.FRAME_SIZE_ERROR, FrameSizeError)


def test_case3_open_ack_with_payload() -> None:
    pair = SessionPair(server_config=SessionConfig(settings=Settings()))
    sid = pair.client.open_stream(1, BIND_ANY, BIND_ANY)
    pair.send(pair.client)
    raw = HEADER.pack(1, FrameType.OPEN_ACK, 0, 0, sid) + b"x"
    expect_close(pair.client, raw, ErrorCode.FRAME_SIZE_ERROR, FrameSizeError)


def test_case4_unknown_type_and_extension_skip() -> None:
    pair = SessionPair()
    expect_close(pair.client, HEADER.pack(0, 0x7F, 0, 0, 0), ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    ext = encode_frame(ExtensionFrame(frame_type=0x80, payload=b"abc"))
    assert pair.client.receive_data(ext + frames(PingFrame(seq=5)), 0.0) == []
    pong = parse_frames(pair.client.data_to_send())
    assert pong == [(FrameType.PING, 1, 0, (5).to_bytes(8, "big"))]


def test_case5_unknown_flags_and_reserved_are_ignored() -> None:
    pair = SessionPair()
    sid = pair.open()
    raw = HEADER.pack(5, FrameType.DATA, 0x80, 0xFFFF, sid) + b"hello"
    assert pair.client.receive_data(raw, 0.0) == [DataReceived(stream_id=sid, data=b"hello")]


def test_case6_bad_preface_sends_nothing() -> None:
    server = fresh_server()
    with pytest.raises(PrefaceError):
        server.receive_data(b"HTTP/1.1 400 Bad Request\r\n", 0.0)
    assert server.closed
    assert server.data_to_send() == b""


def test_case7_first_frame_not_hello() -> None:
    server = fresh_server()
    expect_close(server, MAGIC + frames(PingFrame(seq=1)), ErrorCode.PROTOCOL_ERROR)


def test_case8_major_version_mismatch_and_minor() -> None:
    server = fresh_server()
    hello = encode_frame(HelloFrame(major=2, minor=0, role=Role.CLIENT))
    expect_close(server, MAGIC + hello, ErrorCode.VERSION_MISMATCH, VersionMismatchError)
    server = fresh_server()
    hello = encode_frame(HelloFrame(major=1, minor=7, role=Role.CLIENT))
    events = server.receive_data(MAGIC + hello, 0.0)
    assert events == [HelloReceived(settings=Settings(), minor=2)]  # min(ours = 2, 7)
    assert server.minor == 2
    server = fresh_server()
    hello = encode_frame(HelloFrame(major=1, minor=0, role=Role.CLIENT))
    events = server.receive_data(MAGIC + hello, 0.0)
    assert events == [HelloReceived(settings=Settings(), minor=0)]  # an older peer
    assert server.minor == 0


@pytest.mark.parametrize(
    "hello",
    [
        HelloFrame(major=1, minor=0, role=Role.SERVER),
        HelloFrame(major=1, minor=0, role=9),
        HelloFrame(major=1, minor=0, role=Role.CLIENT, settings=((3, 1000),)),
        HelloFrame(major=1, minor=0, role=Role.CLIENT, settings=((1, 65536), (1, 65536))),
    ],
)
def test_case9_bad_hello(hello: HelloFrame) -> None:
    server = fresh_server()
    expect_close(server, MAGIC + encode_frame(hello), ErrorCode.PROTOCOL_ERROR)


def test_case9_unknown_setting_ignored_and_second_hello() -> None:
    server = fresh_server()
    hello = HelloFrame(major=1, minor=0, role=Role.CLIENT, settings=((0x7777, 5), (1, 65536)))
    events = server.receive_data(MAGIC + encode_frame(hello), 0.0)
    assert events == [HelloReceived(settings=Settings(initial_stream_window=65536), minor=0)]
    expect_close(server, encode_frame(hello), ErrorCode.PROTOCOL_ERROR)


def test_hello_frame_size() -> None:
    server = fresh_server()
    raw = HEADER.pack(5, FrameType.HELLO, 0, 0, 0) + bytes([1, 0, 1, 0, 0])
    expect_close(server, MAGIC + raw, ErrorCode.FRAME_SIZE_ERROR, FrameSizeError)


# Cases 10-13: authentication and tunnels.


def client_flight(*extra: bytes) -> bytes:
    auth = AuthFrame(req_id=1, method=1, credential=make_credential())
    return preface(Role.CLIENT) + frames(auth) + b"".join(extra)


def test_case10_bind_before_auth() -> None:
    server = fresh_server()
    bind = frames(BindFrame(req_id=2, tunnel_id=1, proto=1, bind=BIND_ANY))
    expect_close(server, preface(Role.CLIENT) + bind, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("split", [False, True])
def test_case11_wrong_token_with_pipelined_bind(split: bool) -> None:
    server = fresh_server()
    bind = frames(BindFrame(req_id=2, tunnel_id=1, proto=1, bind=BIND_ANY))
    flight = client_flight(bind)
    if split:
        events = server.receive_data(flight[: -len(bind)], 0.0)
        events += server.receive_data(bind, 0.0)
    else:
        events = server.receive_data(flight, 0.0)
    assert [type(e) for e in events] == [HelloReceived, AuthRequested]
    auth = events[1]
    assert isinstance(auth, AuthRequested)
    assert auth.credential != make_credential("wrong")
    server.send_result(auth.req_id, ResultStatus.AUTH_FAILED, "bad token")
    assert server.closed
    out = parse_frames(server.data_to_send())
    kinds = [f[0] for f in out]
    assert kinds[-2:] == [FrameType.RESULT, FrameType.CLOSE]
    assert close_code(frames(CloseFrame(error_code=ErrorCode.AUTH_FAILED))) == 12
    assert server.receive_data(b"", 0.0) == []  # the BIND is never processed


def test_pipelined_bind_processed_after_auth_ok() -> None:
    server = fresh_server()
    bind = frames(BindFrame(req_id=2, tunnel_id=1, proto=1, bind=BIND_ANY))
    events = server.receive_data(client_flight(bind, frames(PingFrame(seq=1))), 0.0)
    assert isinstance(events[-1], AuthRequested)
    with pytest.raises(ValueError):
        server.send_result(99, ResultStatus.OK)
    server.send_result(1, ResultStatus.OK)
    assert server.authenticated
    events = server.receive_data(b"", 0.0)
    assert events == [BindRequested(req_id=2, tunnel_id=1, proto=1, bind=BIND_ANY)]
    server.send_result(2, ResultStatus.OK, bound=Address("0.0.0.0", 20000))
    kinds = [f[0] for f in parse_frames(server.data_to_send())]
    assert kinds.count(FrameType.RESULT) == 2
    assert FrameType.PING in kinds


def test_held_frames_accumulate_until_answer() -> None:
    server = fresh_server()
    events = server.receive_data(client_flight(), 0.0)
    assert isinstance(events[-1], AuthRequested)
    bind = frames(BindFrame(req_id=2, tunnel_id=1, proto=1, bind=BIND_ANY))
    assert server.receive_data(bind, 0.0) == []
    server.send_result(1, ResultStatus.OK)
    assert server.receive_data(b"", 0.0) == [
        BindRequested(req_id=2, tunnel_id=1, proto=1, bind=BIND_ANY)
    ]


@pytest.mark.parametrize(
    ("method", "credential", "status"),
    [
        (3, bytes(64), ResultStatus.UNSUPPORTED_METHOD),
        (1, bytes(63), ResultStatus.MALFORMED),
        (2, bytes(65), ResultStatus.MALFORMED),
    ],
)
def test_auth_method_and_credential_checked_by_core(
    method: int, credential: bytes, status: ResultStatus
) -> None:
    server = fresh_server()
    flight = preface(Role.CLIENT) + frames(
        AuthFrame(req_id=4, method=method, credential=credential)
    )
    wire = expect_close(server, flight, ErrorCode.AUTH_FAILED)
    results = [decode_payload(*f) for f in parse_frames(wire) if f[0] == FrameType.RESULT]
    assert len(results) == 1
    result = results[0]
    assert isinstance(result, ResultFrame)
    assert (result.req_id, result.status, result.bound) == (4, status, None)


def test_auth_rules() -> None:
    server = Session(Role.SERVER)  # no CHALLENGE sent yet
    expect_close(server, client_flight(), ErrorCode.PROTOCOL_ERROR)
    server = fresh_server()
    server.receive_data(client_flight(), 0.0)
    server.send_result(1, ResultStatus.OK)
    expect_close(
        server,
        frames(AuthFrame(req_id=5, method=1, credential=make_credential())),
        ErrorCode.PROTOCOL_ERROR,
    )
    client = Session(Role.CLIENT)
    client.receive_data(preface(Role.SERVER), 0.0)
    expect_close(
        client,
        frames(AuthFrame(req_id=5, method=1, credential=bytes(64))),
        ErrorCode.PROTOCOL_ERROR,
    )


def test_preauth_byte_limit() -> None:
    server = fresh_server()
    server.receive_data(preface(Role.CLIENT), 0.0)
    ext = encode_frame(ExtensionFrame(frame_type=0x90, payload=bytes(4000)))
    server.receive_data(ext * 4, 0.0)
    expect_close(server, ext, ErrorCode.PROTOCOL_ERROR)


def test_preauth_allows_ping_and_close() -> None:
    server = fresh_server()
    events = server.receive_data(preface(Role.CLIENT) + frames(PingFrame(seq=1)), 0.0)
    assert [type(e) for e in events] == [HelloReceived]
    events = server.receive_data(frames(CloseFrame(error_code=0, message="bye")), 0.0)
    assert events == [ConnectionClosed(error_code=ErrorCode.NO_ERROR, message="bye")]
    assert server.closed
    assert server.data_to_send() == b""


def test_case13_failed_bind_leaves_session_usable() -> None:
    pair = SessionPair()
    pair.client.send_bind(2, 1, Address("0.0.0.0", 8080))
    events = pair.send(pair.client)
    assert events == [BindRequested(req_id=2, tunnel_id=1, proto=1, bind=Address("0.0.0.0", 8080))]
    pair.server.send_result(2, ResultStatus.ADDRESS_IN_USE, "in use")
    events = pair.send(pair.server)
    assert events == [
        ResultReceived(req_id=2, status=ResultStatus.ADDRESS_IN_USE, message="in use", bound=None)
    ]
    pair.client.send_bind(3, 1, BIND_ANY)
    pair.send(pair.client)
    pair.server.send_result(3, ResultStatus.OK, bound=Address("0.0.0.0", 20001))
    events = pair.send(pair.server)
    assert events == [
        ResultReceived(
            req_id=3, status=ResultStatus.OK, message="", bound=Address("0.0.0.0", 20001)
        )
    ]


def test_request_id_rules() -> None:
    pair = SessionPair()
    pair.client.send_bind(2, 1, BIND_ANY)
    with pytest.raises(ValueError):
        pair.client.send_bind(2, 2, BIND_ANY)
    pair.send(pair.client)
    # A duplicate outstanding request id from the peer.
    dup = frames(BindFrame(req_id=2, tunnel_id=3, proto=1, bind=BIND_ANY))
    expect_close(pair.server, dup, ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    unknown = frames(ResultFrame(req_id=77, status=0))
    expect_close(pair.client, unknown, ErrorCode.PROTOCOL_ERROR)


def test_result_with_unknown_status_and_unbind_flow() -> None:
    pair = SessionPair()
    pair.client.send_unbind(3, 1)
    events = pair.send(pair.client)
    assert events == [UnbindReceived(req_id=3, tunnel_id=1, error_code=ErrorCode.NO_ERROR)]
    pair.server.send_result(3, 99)  # type: ignore[arg-type]
    events = pair.send(pair.server)
    assert events == [ResultReceived(req_id=3, status=99, message="", bound=None)]
    # Server revocation notice.
    pair.server.send_unbind(0, 5, ErrorCode.TUNNEL_CLOSED)
    events = pair.send(pair.server)
    assert events == [UnbindReceived(req_id=0, tunnel_id=5, error_code=ErrorCode.TUNNEL_CLOSED)]
    with pytest.raises(ValueError):
        pair.server.send_unbind(1, 5)


def test_direction_rules() -> None:
    pair = SessionPair()
    expect_close(pair.server, frames(ChallengeFrame(nonce=bytes(32))), ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    expect_close(pair.server, frames(ResultFrame(req_id=1, status=0)), ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    expect_close(
        pair.client,
        frames(BindFrame(req_id=1, tunnel_id=1, proto=1, bind=BIND_ANY)),
        ErrorCode.PROTOCOL_ERROR,
    )
    pair = SessionPair()
    expect_close(pair.client, frames(ChallengeFrame(nonce=bytes(32))), ErrorCode.PROTOCOL_ERROR)


def test_local_misuse_of_control_calls() -> None:
    client = Session(Role.CLIENT)
    server = Session(Role.SERVER)
    with pytest.raises(ValueError):
        client.send_challenge(bytes(32))
    with pytest.raises(ValueError):
        server.send_challenge(bytes(31))
    server.send_challenge(bytes(32))
    with pytest.raises(ValueError):
        server.send_challenge(bytes(32))
    with pytest.raises(LocalProtocolError):
        server.send_auth(1, 1, bytes(64))
    with pytest.raises(LocalProtocolError):
        client.send_result(1, ResultStatus.OK)
    client.send_auth(1, 1, bytes(64))
    with pytest.raises(LocalProtocolError):  # one AUTH per session, whatever its id
        client.send_auth(2, 1, bytes(64))
    with pytest.raises(ValueError):
        Session(3)  # type: ignore[arg-type]
    client.close()
    server.close()
    with pytest.raises(SessionClosedError):
        client.send_auth(1, 1, bytes(64))
    with pytest.raises(SessionClosedError):
        client.ping(0.0)
    with pytest.raises(SessionClosedError):
        server.send_unbind(0, 1)
    with pytest.raises(SessionClosedError):
        client.send_data(1, b"x")


# PING / PONG.


def test_ping_rtt_ewma_and_limits() -> None:
    pair = SessionPair()
    client = pair.client
    seqs = [client.ping(1.0) for _ in range(4)]
    assert seqs == [1, 2, 3, 4]
    assert client.ping(1.0) is None
    pair.send(client)
    pair.now = 1.2
    events = pair.send(pair.server)  # server coalesces: answers only seq 4
    assert len(events) == 1
    pong = events[0]
    assert isinstance(pong, PongReceived)
    assert pong.seq == 4
    assert pong.rtt == pytest.approx(0.2)
    assert client.rtt == pytest.approx(0.2)
    client.ping(2.0)
    pair.send(client)
    pair.now = 2.6
    pair.send(pair.server)
    assert client.rtt == pytest.approx(0.2 + (0.6 - 0.2) / 8)
    assert client.statistics()["pings_outstanding"] == 0


def test_ping_protocol_errors() -> None:
    pair = SessionPair()
    expect_close(pair.client, frames(PingFrame(seq=1, ack=True)), ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    pair.client.receive_data(frames(PingFrame(seq=5)), 0.0)
    expect_close(pair.client, frames(PingFrame(seq=5)), ErrorCode.PROTOCOL_ERROR)
    # A PONG for a seq already answered is ignored.
    pair = SessionPair()
    pair.client.ping(0.0)
    pair.client.ping(0.0)
    pair.send(pair.client)
    pair.server.data_to_send()
    assert pair.client.receive_data(frames(PingFrame(seq=2, ack=True)), 0.0) != []
    assert pair.client.receive_data(frames(PingFrame(seq=1, ack=True)), 0.0) == []


def test_case36_ping_flood() -> None:
    pair = SessionPair()
    server = pair.server
    flood = b"".join(frames(PingFrame(seq=i)) for i in range(1, 10_001))
    step = len(flood) // 100
    error: ProtocolError | None = None
    for i in range(100):  # 10,000 PINGs spread over one second, fed in 100 chunks
        try:
            server.receive_data(flood[i * step : (i + 1) * step], now=i / 100)
        except ProtocolError as exc:
            error = exc
            break
    assert error is not None
    assert error.error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert i < 100
    assert close_code(server.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM


def test_ping_rate_is_fine_at_a_sane_rate() -> None:
    pair = SessionPair()
    for i in range(1, 200):
        pair.server.receive_data(frames(PingFrame(seq=i)), now=i * 0.2)
    assert not pair.server.closed


def test_nonproductive_flood() -> None:
    pair = SessionPair()
    ext = encode_frame(ExtensionFrame(frame_type=0xF0, payload=b""))
    pair.client.receive_data(ext * 1000, now=0.0)
    expect_close(pair.client, ext, ErrorCode.ENHANCE_YOUR_CALM)


def test_close_received_and_sent() -> None:
    pair = SessionPair()
    pair.open()
    pair.client.close(ErrorCode.TIMEOUT, "idle")
    assert pair.client.closed
    pair.client.close()  # no-op
    events = pair.send(pair.client)
    assert events == [ConnectionClosed(error_code=ErrorCode.TIMEOUT, message="idle")]
    assert pair.server.closed
    assert not pair.server.wants_write()
    assert pair.server.statistics()["streams"] == 0


def test_unknown_close_code_reads_as_internal() -> None:
    pair = SessionPair()
    events = pair.client.receive_data(frames(CloseFrame(error_code=0x1234)), 0.0)
    assert events == [ConnectionClosed(error_code=ErrorCode.INTERNAL_ERROR, message="")]


def test_server_unbind_then_open_for_that_tunnel_is_an_error() -> None:
    pair = SessionPair()
    pair.server.send_unbind(0, 9, ErrorCode.TUNNEL_CLOSED)
    pair.send(pair.server)
    pair.server.open_stream(9, BIND_ANY, BIND_ANY)
    with pytest.raises(ProtocolError):
        pair.send(pair.server)
    assert pair.client.closed


def test_client_unbind_result_then_open_is_an_error_until_rebound() -> None:
    pair = SessionPair()
    pair.client.send_unbind(4, 3)
    pair.send(pair.client)
    pair.server.send_result(4, ResultStatus.OK)
    pair.send(pair.server)
    pair.client.send_bind(5, 3, BIND_ANY)
    pair.send(pair.client)
    pair.server.send_result(5, ResultStatus.OK, bound=Address("0.0.0.0", 20000))
    pair.send(pair.server)
    sid = pair.open(tunnel_id=3)  # rebound: allowed again
    assert pair.client.stream_is_open(sid)
    unbind = frames(UnbindFrame(req_id=0, tunnel_id=3))
    pair.client.receive_data(unbind, 0.0)
    with pytest.raises(ProtocolError):
        pair.open(tunnel_id=3)
