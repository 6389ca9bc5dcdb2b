"""Edge cases of the session, scheduler and codec that the scenario tests do not reach."""

from __future__ import annotations

import pytest

from muxtunnel.errors import ErrorCode, FlowControlError, FrameSizeError, LocalProtocolError
from muxtunnel.protocol.constants import MAGIC, MAX_STR16, AuthMethod, FrameType, ResultStatus, Role
from muxtunnel.protocol.events import HelloReceived, WindowUpdated
from muxtunnel.protocol.frames import (
    HEADER,
    Address,
    AuthFrame,
    BindFrame,
    DataFrame,
    HelloFrame,
    OpenFrame,
    PingFrame,
    ResultFrame,
    Settings,
    UnbindFrame,
    WindowFrame,
    decode_payload,
    encode_frame,
)
from muxtunnel.protocol.scheduler import OutboundStream, Scheduler
from muxtunnel.protocol.session import Session

from .helpers import (
    ORIGIN,
    SERVER_NONCE,
    TARGET,
    TIGHT_CONFIG,
    SessionPair,
    data_frame,
    exhaust_connection_window,
    expect_close,
    frames,
    make_credential,
    parse_frames,
    preface,
    received_bytes,
)

NONE = Address(None, 0)


# --- requests (spec §7.3-§7.5) ---------------------------------------------------------


def test_request_id_zero_is_reserved() -> None:
    server = Session(Role.SERVER)
    server.send_challenge(SERVER_NONCE)
    auth = frames(AuthFrame(req_id=0, method=1, credential=make_credential()))
    expect_close(server, preface(Role.CLIENT) + auth, ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    bind = frames(BindFrame(req_id=0, tunnel_id=1, proto=1, bind=NONE))
    expect_close(pair.server, bind, ErrorCode.PROTOCOL_ERROR)
    pair = SessionPair()
    with pytest.raises(ValueError):
        pair.client.send_bind(0, 1, NONE)


def test_unbind_notice_must_use_request_id_zero() -> None:
    pair = SessionPair()
    notice = frames(UnbindFrame(req_id=3, tunnel_id=1, error_code=0))
    expect_close(pair.client, notice, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("kind", "status", "bound"),
    [
        ("bind", ResultStatus.OK, None),
        ("bind", ResultStatus.DENIED, Address("0.0.0.0", 1)),
        ("unbind", ResultStatus.OK, Address("0.0.0.0", 1)),
    ],
)
def test_result_bound_rules(kind: str, status: ResultStatus, bound: Address | None) -> None:
    pair = SessionPair()
    if kind == "bind":
        pair.client.send_bind(5, 1, NONE)
    else:
        pair.client.send_unbind(5, 1)
    pair.send(pair.client)
    with pytest.raises(ValueError):
        pair.server.send_result(5, status, bound=bound)
    raw = frames(ResultFrame(req_id=5, status=status, bound=bound))
    expect_close(pair.client, raw, ErrorCode.PROTOCOL_ERROR)


def test_server_hello_defaults_follow_the_server_role() -> None:
    client = Session(Role.CLIENT)
    hello = HelloFrame(major=1, minor=0, role=Role.SERVER, settings=((1, 65536),))
    events = client.receive_data(MAGIC + encode_frame(hello), 0.0)
    expected = Settings(initial_stream_window=65536, max_concurrent_streams=0)
    assert events == [HelloReceived(settings=expected, minor=0)]
    server = Session(Role.SERVER)
    hello = HelloFrame(major=1, minor=0, role=Role.CLIENT, settings=())
    assert server.receive_data(MAGIC + encode_frame(hello), 0.0) == [
        HelloReceived(settings=Settings(), minor=0)
    ]


def test_cannot_open_before_authentication() -> None:
    pair = SessionPair(handshake=False)
    pair.server.send_challenge(SERVER_NONCE)
    pair.send(pair.server)
    pair.send(pair.client)
    assert pair.server.peer_settings is not None
    assert not pair.server.can_open_stream()
    pair.client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    pair.send(pair.client)
    assert not pair.server.can_open_stream()
    pair.server.send_result(1, ResultStatus.OK)
    assert pair.server.can_open_stream()
    pair.server.close()
    assert not pair.server.can_open_stream()


# --- flow control on the slow paths ----------------------------------------------------


def test_fin_frame_beyond_the_stream_window() -> None:
    pair = SessionPair()
    sid = pair.open()
    pair.client.receive_data(data_frame(sid, bytes(65536)) * 4, 0.0)
    raw = data_frame(sid, b"x", fin=True)
    expect_close(pair.client, raw, ErrorCode.FLOW_CONTROL_ERROR, FlowControlError)


def test_fin_frame_beyond_the_connection_window() -> None:
    pair = SessionPair(client_config=TIGHT_CONFIG)
    *_, last = exhaust_connection_window(pair)
    raw = data_frame(last, b"x", fin=True)
    expect_close(pair.client, raw, ErrorCode.FLOW_CONTROL_ERROR, FlowControlError)


def test_late_data_beyond_the_connection_window() -> None:
    pair = SessionPair(client_config=TIGHT_CONFIG)
    sid = pair.open()
    pair.client.reset_stream(sid)
    exhaust_connection_window(pair)
    late = data_frame(sid, b"x")
    expect_close(pair.client, late, ErrorCode.FLOW_CONTROL_ERROR, FlowControlError)


def test_window_frame_on_peer_stream_before_answer_is_fine() -> None:
    pair = SessionPair()
    sid = pair.server.open_stream(1, ORIGIN, TARGET)
    pair.send(pair.server)
    pair.server.receive_data(b"", 0.0)
    assert pair.client.receive_data(frames(WindowFrame(stream_id=sid, max_offset=100)), 0.0) == []
    assert pair.client.receive_data(frames(WindowFrame(stream_id=sid, max_offset=1 << 21)), 0.0)


# --- wants_write -----------------------------------------------------------------------


def test_wants_write_tracks_every_kind_of_output() -> None:
    pair = SessionPair()
    server, client = pair.server, pair.client
    assert not client.wants_write()
    client.receive_data(frames(PingFrame(seq=1)), 0.0)
    assert client.wants_write()  # a PONG
    client.data_to_send()
    sid = pair.open()
    server.send_data(sid, bytes(200_000))
    pair.send(server, 1 << 20)
    client.acknowledge(sid, 200_000, 0.0)
    assert client.wants_write()  # a WINDOW
    client.data_to_send()
    assert not client.wants_write()
    # A bare FIN, and a FIN made stale by a reset.
    server.end_stream(sid)
    assert server.wants_write()
    server.reset_stream(sid)
    assert server.wants_write()  # the RESET
    server.data_to_send()
    assert not server.wants_write()
    # A stream reset while scheduled is skipped lazily; the next one still counts.
    a, b = pair.open(), pair.open()
    server.send_data(a, b"1")
    server.send_data(b, b"2")
    server.reset_stream(a)
    server.data_to_send()  # the RESET of a, then b's DATA
    server.send_data(b, b"3")
    c = pair.open()
    server.send_data(c, b"4")
    server.reset_stream(c)
    server.data_to_send()
    assert not server.wants_write()
    d, e = pair.open(), pair.open()
    server.send_data(d, b"5")
    server.send_data(e, b"6")
    server._control.clear()  # look at the scheduler alone
    server._control_bytes = 0
    server.reset_stream(d)
    server._control.clear()
    server._control_bytes = 0
    assert server.wants_write()
    out = parse_frames(server.data_to_send())
    assert [(t, s) for t, _f, s, _p in out] == [(FrameType.DATA, e)]


def test_send_data_on_a_stream_finished_for_sending() -> None:
    pair = SessionPair()
    sid = pair.open()
    pair.server.send_data(sid, b"x", end_stream=True)
    pair.send(pair.server)
    with pytest.raises(LocalProtocolError):
        pair.server.send_data(sid, b"y")


# --- scheduler units -------------------------------------------------------------------


def test_scheduler_activate_without_work_and_stale_fin() -> None:
    sched = Scheduler(quantum=16, single_max=64)
    idle = OutboundStream(1, limit=10)
    sched.activate(idle)
    assert len(sched) == 0
    done = OutboundStream(3, limit=10)
    done.fin_queued = True
    sched.activate(done)
    assert len(sched) == 1
    done.drop_pending()  # reset before the FIN went out
    parts: list[bytes | memoryview] = []
    assert sched.fill(parts, 100, 100) == (0, 0, [])
    assert parts == []


# --- codec details (frames.py) ---------------------------------------------------------


def test_address_text() -> None:
    assert str(Address(None, 0)) == "-"
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("1.2.3.4", 80)) == "1.2.3.4:80"
    assert str(Address("example.com", 443)) == "example.com:443"


def test_data_frame_equality_and_hash() -> None:
    a = DataFrame(stream_id=1, data=memoryview(b"ab"), fin=True)
    b = DataFrame(stream_id=1, data=b"ab", fin=True)
    assert a == b
    assert hash(a) == hash(b)
    assert a != "ab"


def test_encoding_limits() -> None:
    long = "é" * MAX_STR16
    raw = encode_frame(ResultFrame(req_id=1, status=0, message=long))
    frame = decode_payload(FrameType.RESULT, 0, 0, raw[16:])
    assert isinstance(frame, ResultFrame)
    assert len(frame.message.encode()) <= MAX_STR16
    assert long.startswith(frame.message)
    with pytest.raises(ValueError):
        encode_frame(AuthFrame(req_id=1, method=1, credential=bytes(70_000)))
    with pytest.raises(ValueError):
        encode_frame(OpenFrame(stream_id=2, tunnel_id=1, origin=Address("h", 70_000), target=NONE))
    with pytest.raises(ValueError):
        encode_frame(OpenFrame(stream_id=2, tunnel_id=1, origin=Address("a" * 256, 1), target=NONE))


def test_wants_write_skips_a_fin_made_stale_by_reset() -> None:
    pair = SessionPair()
    sid = pair.open()
    pair.server.end_stream(sid)
    pair.server.reset_stream(sid)
    pair.server._control.clear()  # look at the scheduler alone
    pair.server._control_bytes = 0
    assert not pair.server.wants_write()
    assert pair.server.data_to_send() == b""


def test_send_data_copies_a_bytearray() -> None:
    pair = SessionPair()
    sid = pair.open()
    buf = bytearray(b"abc")
    pair.server.send_data(sid, buf)
    buf[:] = b"xyz"
    assert received_bytes(pair.send(pair.server), sid) == b"abc"


def test_window_before_hello_and_before_authentication() -> None:
    client = Session(Role.CLIENT)
    raw = frames(WindowFrame(stream_id=0, max_offset=1 << 30))
    expect_close(client, MAGIC + raw, ErrorCode.PROTOCOL_ERROR)
    server = Session(Role.SERVER)
    server.send_challenge(SERVER_NONCE)
    expect_close(server, preface(Role.CLIENT) + raw, ErrorCode.PROTOCOL_ERROR)
    client = Session(Role.CLIENT)  # the client takes a connection WINDOW before its RESULT
    assert client.receive_data(preface(Role.SERVER) + raw, 0.0) == [
        HelloReceived(settings=Settings(max_concurrent_streams=0), minor=0),
        WindowUpdated(stream_id=0),
    ]


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_malformed_first_frame_is_a_decoding_error_not_a_handshake_error(role: Role) -> None:
    """Spec §4.5: a wrong-length RESET before HELLO is FRAME_SIZE_ERROR (step 4 before 7)."""
    session = Session(role)
    wrong = HEADER.pack(13, FrameType.RESET, 0, 0, 1) + bytes(13)
    expect_close(session, MAGIC + wrong, ErrorCode.FRAME_SIZE_ERROR, FrameSizeError)
    # A well-formed RESET in the same place is the handshake-order error.
    session = Session(role)
    reset = HEADER.pack(12, FrameType.RESET, 0, 0, 1) + bytes(12)
    expect_close(session, MAGIC + reset, ErrorCode.PROTOCOL_ERROR)
