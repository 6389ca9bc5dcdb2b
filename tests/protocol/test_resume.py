"""Session resumption in the sans-IO core (protocol-spec.md §10.6), fed bytes like h11's tests.

Negotiation, the ACK rule and its bounds, TICKET, the relay's RESUME handling before AUTH, the
client's resume handshake and its failures, the relay's ``resume`` with offset checks, the
replay (batching, exactly-once recovery of frames lost in flight), and that peers without
resumption (minor 1, or a window of 0) see none of it.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from muxtunnel.errors import (
    ErrorCode,
    LocalProtocolError,
    PrefaceError,
    ProtocolError,
    SessionClosedError,
    VersionMismatchError,
)
from muxtunnel.protocol import ResumeOffsetError
from muxtunnel.protocol.constants import (
    ACK_INTERVAL,
    MAGIC,
    AuthMethod,
    FrameType,
    ResultStatus,
    Role,
)
from muxtunnel.protocol.events import (
    AuthRequested,
    BindRequested,
    ConnectionClosed,
    DataReceived,
    HelloReceived,
    PongReceived,
    ResultReceived,
    ResumeRefused,
    ResumeRequested,
    SessionResumed,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TicketReceived,
    WindowUpdated,
)
from muxtunnel.protocol.frames import (
    AckFrame,
    Address,
    AuthFrame,
    ChallengeFrame,
    CloseFrame,
    ExtensionFrame,
    GoAwayFrame,
    OpenFrame,
    PingFrame,
    ResultFrame,
    ResumedFrame,
    ResumeFrame,
    Settings,
    TicketFrame,
    WindowFrame,
    encode_frame,
)
from muxtunnel.protocol.reader import FrameReader
from muxtunnel.protocol.replay import ReplayLog
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import (
    ORIGIN,
    SERVER_NONCE,
    TARGET,
    SessionPair,
    close_code,
    data_frame,
    frames,
    hello_bytes,
    make_credential,
    parse_frames,
)
from .resume_helpers import (
    CLIENT_CONFIG,
    RESUME_AUTH_REQ,
    RESUME_REQ,
    SERVER_CONFIG,
    TUNNEL,
    Link,
    ticket_for,
)

CHALLENGE = encode_frame(ChallengeFrame(nonce=SERVER_NONCE))
RW_SETTINGS = SERVER_CONFIG.settings
assert RW_SETTINGS is not None


def relay_preface(settings: Settings = RW_SETTINGS, minor: int = 2) -> bytes:
    return MAGIC + hello_bytes(Role.SERVER, settings, minor=minor)


def types(wire: bytes) -> list[int]:
    return [frame[0] for frame in parse_frames(wire)]


# ---------------------------------------------------------------------------------------
# The replay log and the reader's stop


def test_replay_log_keeps_chunks_by_reference_and_releases_them() -> None:
    log = ReplayLog()
    first, second = b"abcdef", b"ghij"
    log.record(first)
    log.record(b"")
    log.record(second)
    assert (log.start, log.end, log.size) == (0, 10, 10)
    assert [bytes(v) for v in log.tail(0)] == [first, second]
    assert log.tail(0)[0].obj is first  # a view, not a copy
    log.release(4)
    assert (log.start, log.size) == (4, 6)
    assert [bytes(v) for v in log.tail(4)] == [b"ef", b"ghij"]
    assert [bytes(v) for v in log.tail(7)] == [b"hij"]
    assert log.tail(10) == []
    log.release(2)  # below start: nothing
    assert log.start == 4
    log.release(6)
    assert [bytes(v) for v in log.tail(6)] == [b"ghij"]
    with pytest.raises(ResumeOffsetError):
        log.tail(5)
    with pytest.raises(ResumeOffsetError):
        log.tail(11)
    with pytest.raises(ValueError, match="only 10 bytes"):
        log.release(11)
    log.release(10)
    assert log.size == 0
    assert log.tail(10) == []


def _stop_reader() -> FrameReader:
    return FrameReader(
        max_data_payload=65_536, max_control_payload=4_096, stop_after=FrameType.RESUMED
    )


@pytest.mark.parametrize("step", [1, 7, 16, 40, 1000])
def test_reader_stops_right_after_the_stop_frame(step: int) -> None:
    head = MAGIC + frames(ChallengeFrame(nonce=SERVER_NONCE), ResumedFrame(req_id=3, received=9))
    after = data_frame(5, b"continuation") + b"\x00\x00"
    wire = head + after
    reader = _stop_reader()
    got = []
    for off in range(0, len(wire), step):
        got += reader.read_frames(wire[off : off + step])
        if reader.leftover is not None:
            rest = reader.leftover + wire[off + step :]
            break
    assert got[-1] == ResumedFrame(req_id=3, received=9)
    assert len(got) == 2
    assert rest == after


def test_reader_stop_leftover_is_empty_at_a_chunk_end() -> None:
    reader = _stop_reader()
    assert reader.read_frames(MAGIC + frames(ResumedFrame(req_id=1, received=0)))
    assert reader.leftover == b""


def test_ticket_codec_checks_the_size() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encode_frame(TicketFrame(ticket=b"short", lifetime=1))


# ---------------------------------------------------------------------------------------
# Negotiation: resumption is on only for minor >= 2 with both windows > 0


@pytest.mark.parametrize(
    ("client_window", "server_window", "expected"),
    [(60, 60, 60.0), (30, 600, 30.0), (600, 45, 45.0), (0, 60, 0.0), (60, 0, 0.0)],
)
def test_the_window_in_force_is_the_smaller_one(
    client_window: int, server_window: int, expected: float
) -> None:
    client = Session(Role.CLIENT, SessionConfig(settings=Settings(resume_window=client_window)))
    server = Session(
        Role.SERVER,
        SessionConfig(settings=Settings(max_concurrent_streams=0, resume_window=server_window)),
    )
    server.send_challenge(SERVER_NONCE)
    client.receive_data(server.data_to_send(), 0.0)
    server.receive_data(client.data_to_send(), 0.0)
    assert client.resume_window == server.resume_window == expected
    assert client.resume_enabled is server.resume_enabled is (expected > 0)
    if not expected:
        assert client.replay_size == server.replay_size == 0


def _traffic_without_resumption(client: Session, server: Session) -> set[int]:
    """Authenticate, then a bulk stream and pings; return the frame types both sides sent."""
    sent: set[int] = set()

    def move(src: Session, dst: Session) -> list[object]:
        out = src.data_to_send()
        sent.update(types(out))
        return list(dst.receive_data(out, 0.0)) if out else []

    server.send_challenge(SERVER_NONCE)
    events = move(server, client)
    challenge = events[-1]
    assert isinstance(challenge, type(events[-1]))
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential(server_nonce=SERVER_NONCE))
    client.send_bind(2, TUNNEL, Address(None, 0))
    move(client, server)
    server.send_result(1, ResultStatus.OK)
    server.receive_data(b"", 0.0)
    server.send_result(2, ResultStatus.OK, bound=Address("0.0.0.0", 1))
    move(server, client)
    sid = server.open_stream(TUNNEL, ORIGIN, TARGET)
    move(server, client)
    client.accept_stream(sid)
    server.send_data(sid, bytes(600_000))
    for _ in range(60):
        client.ping(0.0)
        for event in move(server, client):
            if isinstance(event, DataReceived):
                client.acknowledge(sid, len(event.data), 0.0)
        move(client, server)
    return sent


@pytest.mark.parametrize("case", ["minor-1-relay", "window-0-client", "window-0-relay"])
def test_peers_without_resumption_see_none_of_it(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_window = 0 if case == "window-0-client" else 60
    server_window = 0 if case == "window-0-relay" else 60
    client = Session(Role.CLIENT, SessionConfig(settings=Settings(resume_window=client_window)))
    if case == "minor-1-relay":
        monkeypatch.setattr("muxtunnel.protocol.session.PROTOCOL_MINOR", 1)
    server = Session(
        Role.SERVER,
        SessionConfig(settings=Settings(max_concurrent_streams=0, resume_window=server_window)),
    )
    sent = _traffic_without_resumption(client, server)
    assert FrameType.DATA in sent
    assert FrameType.PING in sent
    assert FrameType.WINDOW in sent
    assert not sent & {FrameType.ACK, FrameType.TICKET, FrameType.RESUME, FrameType.RESUMED}
    for session in (client, server):
        assert not session.resume_enabled
        assert session.replay_size == 0
        with pytest.raises(LocalProtocolError, match="resumption is off"):
            session.suspend()
    with pytest.raises(LocalProtocolError):
        server.send_ticket(ticket_for(1), 60)
    assert not server.can_resume(0)
    with pytest.raises(LocalProtocolError):
        server.resume(RESUME_REQ, 0)


def test_a_resume_off_hello_is_the_minor_1_hello_but_for_the_minor() -> None:
    wire = Session(Role.CLIENT).data_to_send()
    (hello,) = parse_frames(wire)
    assert hello[0] == FrameType.HELLO
    assert hello[3][1] == 2  # minor
    assert len(hello[3]) == 4 + 7 * 6  # seven settings: RESUME_WINDOW 0 is left out
    wire = Session(Role.CLIENT, CLIENT_CONFIG).data_to_send()
    assert parse_frames(wire)[0][3][-6:] == bytes.fromhex("00080000003c")


@pytest.mark.parametrize(
    "frame",
    [
        AckFrame(received=1),
        TicketFrame(ticket=ticket_for(1), lifetime=1),
        ResumeFrame(req_id=1, ticket=ticket_for(1), received=0),
        ResumedFrame(req_id=1, received=0),
    ],
)
@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER])
def test_resumption_frames_are_protocol_errors_when_it_is_off(
    frame: AckFrame | TicketFrame | ResumeFrame | ResumedFrame, role: Role
) -> None:
    pair = SessionPair()  # authenticated, resumption off (RESUME_WINDOW 0)
    session = pair.client if role == Role.CLIENT else pair.server
    with pytest.raises(ProtocolError) as info:
        session.receive_data(frames(frame), 0.0)
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR
    assert close_code(session.data_to_send()) == ErrorCode.PROTOCOL_ERROR


# ---------------------------------------------------------------------------------------
# ACK


def test_ack_after_every_interval_received_and_never_a_useless_one() -> None:
    client_config, server_config = _bounded(None)  # windows take more than ACK_INTERVAL unread
    link = Link(client_config=client_config, server_config=server_config)
    client, server = link.client, link.server
    sids = [link.open() for _ in range(4)]
    link.pump()
    for sid in sids:  # 4 x 300,000 bytes: more than ACK_INTERVAL, within every window
        assert sid is not None
        link.send(server, sid, bytes(300_000))
    link.write(server)
    before = client.statistics()["bytes_received"]
    for _ in range(20):  # reads of all the relay wrote, until more than ACK_INTERVAL arrived
        link.deliver(client)
        if client.statistics()["bytes_received"] - before >= ACK_INTERVAL:
            break
        link.write(server)
    assert client.statistics()["bytes_received"] - before >= ACK_INTERVAL
    wire = client.data_to_send()
    acks = [int.from_bytes(f[3], "big") for f in parse_frames(wire) if f[0] == FrameType.ACK]
    assert acks == [client.received_offset]  # once: the WINDOWs after it add none
    assert parse_frames(wire)[0][0] == FrameType.ACK
    assert types(wire) == [FrameType.ACK]  # no WINDOW is due: the ACK goes on its own
    server.receive_data(wire, 0.0)
    assert server.replay_size == server.sent_offset - acks[0]


def test_a_window_after_nothing_new_arrived_carries_no_ack() -> None:
    link = Link()
    client, server = link.client, link.server
    a, b = link.open(), link.open()
    assert a is not None
    assert b is not None
    link.pump()
    link.send(client, a, bytes(40_000))
    link.send(client, b, bytes(40_000))
    link.write(client)
    server.receive_data(bytes(link.c2s), 0.0)  # read, not consumed yet: nothing is due
    link.c2s.clear()
    assert FrameType.ACK not in types(server.data_to_send())
    server.acknowledge(a, 40_000, 0.0)
    first = types(server.data_to_send())
    assert first[0] == FrameType.ACK
    assert FrameType.WINDOW in first
    server.acknowledge(b, 40_000, 0.0)
    assert types(server.data_to_send()) == [FrameType.WINDOW]  # nothing new to acknowledge


def test_ack_goes_right_before_a_connection_window() -> None:
    link = Link()
    client, server = link.client, link.server
    sid = link.open()
    assert sid is not None
    link.pump()
    for _ in range(3):
        link.send(server, sid, bytes(30_000))
        link.write(server)
        link.deliver(client)
        wire = client.data_to_send()
        kinds = types(wire)
        conn_windows = [
            i for i, f in enumerate(parse_frames(wire)) if f[0] == FrameType.WINDOW and f[2] == 0
        ]
        for i in conn_windows:
            assert kinds[i - 1] == FrameType.ACK
        server.receive_data(wire, 0.0)
    assert server.replay_size < 100_000


def test_ack_rides_with_the_pong_and_releases_the_log() -> None:
    link = Link()
    client, server = link.client, link.server
    before = server.replay_size
    assert before > 0
    server.ping(0.0)
    link.write(server)
    link.deliver(client)
    wire = client.data_to_send()
    assert types(wire)[:2] == [FrameType.ACK, FrameType.PING]
    events = server.receive_data(wire, 0.0)
    assert isinstance(events[0], PongReceived)
    assert server.replay_size == server.sent_offset - client.received_offset == 0


def test_ack_bounds() -> None:
    link = Link()
    client, server = link.client, link.server
    sent = server.sent_offset
    server.ping(0.0)
    link.pump()  # the PONG carries an ACK of everything
    assert server.replay_size == 0
    events = server.receive_data(frames(AckFrame(received=1)), 0.0)
    assert events == []  # not above the previous ACK: ignored (non-productive)
    assert server.statistics()["closed"] == 0
    with pytest.raises(ProtocolError, match="were sent") as info:
        client.receive_data(frames(AckFrame(received=sent + 10**6)), 0.0)
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR
    assert close_code(client.data_to_send()) == ErrorCode.PROTOCOL_ERROR


def test_ack_before_authentication_is_a_protocol_error() -> None:
    link = Link(handshake=False)
    client, server = link.client, link.server
    server.send_challenge(SERVER_NONCE)
    client.receive_data(server.data_to_send(), 0.0)
    with pytest.raises(ProtocolError, match="before authentication"):
        server.receive_data(client.data_to_send() + frames(AckFrame(received=0)), 0.0)
    client2 = Session(Role.CLIENT, CLIENT_CONFIG)
    with pytest.raises(ProtocolError, match="before authentication"):
        client2.receive_data(relay_preface() + frames(AckFrame(received=0)), 0.0)


def test_ack_flood_of_stale_values_is_enhance_your_calm() -> None:
    link = Link()
    with pytest.raises(ProtocolError) as info:
        link.server.receive_data(frames(AckFrame(received=0)) * 2000, 0.0)
    assert info.value.error_code == ErrorCode.ENHANCE_YOUR_CALM


# ---------------------------------------------------------------------------------------
# TICKET


def test_ticket_goes_to_the_client_only_with_resumption_and_authentication() -> None:
    link = Link()
    assert link.ticket == ticket_for(1)
    ticket = frames(TicketFrame(ticket=ticket_for(9), lifetime=60))
    with pytest.raises(ProtocolError, match="TICKET sent to a relay"):
        link.server.receive_data(ticket, 0.0)
    early = Session(Role.CLIENT, CLIENT_CONFIG)
    with pytest.raises(ProtocolError, match="before authentication"):
        early.receive_data(relay_preface() + ticket, 0.0)


def test_send_ticket_checks() -> None:
    link = Link()
    server = link.server
    with pytest.raises(ValueError, match="32 bytes"):
        server.send_ticket(b"x" * 31, 60)
    with pytest.raises(ValueError, match="u32"):
        server.send_ticket(ticket_for(1), 1 << 32)
    with pytest.raises(LocalProtocolError, match="relay"):
        link.client.send_ticket(ticket_for(1), 60)
    fresh = Session(Role.SERVER, SERVER_CONFIG)
    with pytest.raises(LocalProtocolError):
        fresh.send_ticket(ticket_for(1), 60)
    server.close()
    with pytest.raises(SessionClosedError):
        server.send_ticket(ticket_for(1), 60)


# ---------------------------------------------------------------------------------------
# The relay's handshake session: RESUME between HELLO and AUTH


def _client_hello() -> bytes:
    return MAGIC + hello_bytes(Role.CLIENT, CLIENT_CONFIG.settings, minor=2)


def _resume_and_auth(received: int = 0, auth_req: int = RESUME_AUTH_REQ) -> bytes:
    return frames(
        ResumeFrame(req_id=RESUME_REQ, ticket=ticket_for(1), received=received),
        AuthFrame(req_id=auth_req, method=1, credential=make_credential()),
    )


def _relay_handshake() -> Session:
    hs = Session(Role.SERVER, SERVER_CONFIG)
    hs.send_challenge(SERVER_NONCE)
    hs.data_to_send()
    return hs


def test_relay_reports_the_resume_just_before_the_auth_and_pauses() -> None:
    hs = _relay_handshake()
    events = hs.receive_data(_client_hello() + _resume_and_auth(received=77), 0.0)
    assert [type(e) for e in events] == [HelloReceived, ResumeRequested, AuthRequested]
    assert events[1] == ResumeRequested(req_id=RESUME_REQ, ticket=ticket_for(1), received=77)
    assert hs.input_paused
    hs.send_result(RESUME_AUTH_REQ, ResultStatus.OK)
    assert hs.input_paused  # until the RESUME is answered (or the session dropped)
    assert hs.receive_data(b"", 0.0) == []
    assert types(hs.data_to_send()) == [FrameType.RESULT]
    with pytest.raises(ProtocolError, match="before the answer"):
        hs.receive_data(frames(PingFrame(seq=1)), 0.0)
    assert hs.closed


def test_relay_refuses_a_resume_and_goes_on_as_a_new_session() -> None:
    hs = _relay_handshake()
    hs.receive_data(_client_hello() + _resume_and_auth(), 0.0)
    with pytest.raises(LocalProtocolError, match="AUTH before the RESUME"):
        hs.send_result(RESUME_REQ, ResultStatus.TICKET_UNKNOWN)
    hs.send_result(RESUME_AUTH_REQ, ResultStatus.OK)
    with pytest.raises(ValueError, match="TICKET_UNKNOWN or RESUME_FAILED"):
        hs.send_result(RESUME_REQ, ResultStatus.OK)
    hs.send_result(RESUME_REQ, ResultStatus.TICKET_UNKNOWN, "no such ticket")
    assert not hs.input_paused
    hs.send_ticket(ticket_for(5), 60)
    wire = hs.data_to_send()
    assert types(wire) == [FrameType.RESULT, FrameType.RESULT, FrameType.TICKET]
    events = hs.receive_data(frames(PingFrame(seq=1)), 0.0)
    assert events == []
    assert types(hs.data_to_send()) == [FrameType.ACK, FrameType.PING]  # ACK rides with PONG


def test_relay_resume_before_challenge_is_held_too() -> None:
    hs = Session(Role.SERVER, SERVER_CONFIG)
    hs.data_to_send()
    resume = frames(ResumeFrame(req_id=RESUME_REQ, ticket=ticket_for(1), received=0))
    assert hs.receive_data(_client_hello() + resume, 0.0) == [
        HelloReceived(settings=CLIENT_CONFIG.settings or Settings(), minor=2)
    ]
    with pytest.raises(ProtocolError, match="AUTH before CHALLENGE"):
        hs.receive_data(frames(AuthFrame(req_id=1, method=1, credential=make_credential())), 0.0)
    hs = Session(Role.SERVER, SERVER_CONFIG)
    hs.receive_data(_client_hello() + resume, 0.0)
    hs.send_challenge(SERVER_NONCE)
    events = hs.receive_data(
        frames(AuthFrame(req_id=1, method=1, credential=make_credential())), 0.0
    )
    assert [type(e) for e in events] == [ResumeRequested, AuthRequested]


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (frames(PingFrame(seq=1)), "frames after the AUTH"),
        (frames(PingFrame(seq=1))[:5], "bytes after the AUTH"),
    ],
)
def test_relay_rejects_bytes_behind_the_auth_of_a_resume(tail: bytes, match: str) -> None:
    hs = _relay_handshake()
    with pytest.raises(ProtocolError, match=match):
        hs.receive_data(_client_hello() + _resume_and_auth() + tail, 0.0)
    assert close_code(hs.data_to_send()) == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("where", ["twice", "after-auth", "authenticated", "resume-off"])
def test_resume_out_of_place_is_a_protocol_error(where: str) -> None:
    resume = frames(ResumeFrame(req_id=RESUME_REQ, ticket=ticket_for(1), received=0))
    if where == "authenticated":
        session = Link().server
        data = resume
    elif where == "resume-off":
        session = Session(Role.SERVER)
        session.send_challenge(SERVER_NONCE)
        data = _client_hello() + resume
    else:
        session = _relay_handshake()
        data = _client_hello() + (resume + resume if where == "twice" else _resume_and_auth())
        if where == "after-auth":
            session.receive_data(data, 0.0)
            session.send_result(RESUME_AUTH_REQ, ResultStatus.AUTH_FAILED)
            assert session.closed
            assert not session.input_paused
            return
    with pytest.raises(ProtocolError, match="RESUME"):
        session.receive_data(data, 0.0)
    assert session.closed


def test_a_client_rejects_resume_and_resumed_on_its_session() -> None:
    link = Link()
    with pytest.raises(ProtocolError, match="RESUME sent to a client"):
        link.client.receive_data(
            frames(ResumeFrame(req_id=1, ticket=ticket_for(1), received=0)), 0.0
        )
    link = Link()
    with pytest.raises(ProtocolError, match="RESUMED outside"):
        link.client.receive_data(frames(ResumedFrame(req_id=1, received=0)), 0.0)


# ---------------------------------------------------------------------------------------
# The relay's old session: resume()


def test_relay_resume_checks_the_offset_and_changes_nothing_on_error() -> None:
    link = Link()
    server = link.server
    link.cut()
    sent = server.sent_offset
    assert server.can_resume(sent)
    assert not server.can_resume(sent + 1)
    with pytest.raises(ResumeOffsetError):
        server.resume(RESUME_REQ, sent + 1)
    assert server.suspended
    server.ping(0.0)
    with pytest.raises(ValueError, match="request id"):
        server.resume(0, sent)
    with pytest.raises(LocalProtocolError):
        link.client.resume(RESUME_REQ, 0)
    with pytest.raises(LocalProtocolError):
        _relay_handshake().resume(RESUME_REQ, 0)
    # An ACK released the log: an offset below its start is too old.
    link2 = Link()
    link2.server.ping(0.0)
    link2.pump()
    assert link2.server.replay_size == 0
    assert not link2.server.can_resume(0)
    with pytest.raises(ResumeOffsetError):
        link2.server.resume(RESUME_REQ, 0)


def test_relay_resume_queues_resumed_outside_the_stream_then_the_replay() -> None:
    link = Link()
    client, server = link.client, link.server
    sid = link.open()
    assert sid is not None
    link.write(server)
    link.cut()
    sent = server.sent_offset
    received = server.received_offset
    assert not server.wants_write()
    assert server.data_to_send() == b""
    server.resume(RESUME_REQ, client.received_offset)
    assert server.wants_write()
    wire = server.data_to_send()
    assert parse_frames(wire)[0][0] == FrameType.RESUMED
    resumed = parse_frames(wire)[0][3]
    assert int.from_bytes(resumed[4:], "big") == received
    assert server.sent_offset == sent  # RESUMED and the replay count nothing new
    assert FrameType.OPEN in types(wire)


def test_replay_respects_max_bytes() -> None:
    link = Link()
    client, server = link.client, link.server
    for _ in range(3):
        sid = link.open()
        assert sid is not None
        link.send(server, sid, bytes(60_000))
    link.write(server)  # written, never read
    link.cut()
    server.resume(RESUME_REQ, client.received_offset)
    replay = server.sent_offset - client.received_offset
    assert replay > 100_000
    sizes = []
    while server.wants_write():
        chunk = server.data_to_send(7_000)
        sizes.append(len(chunk))
        link.s2c.extend(chunk)
    assert max(sizes[:-1]) <= 7_000
    assert sizes[0] == 7_000
    assert sum(sizes) >= replay


def test_relay_close_while_the_replay_is_pending_sends_it_first() -> None:
    link = Link()
    client, server = link.client, link.server
    sid = link.open()
    assert sid is not None
    link.write(server)
    link.cut()
    client.begin_resume()
    client.data_to_send()
    client.receive_data(relay_preface() + CHALLENGE, 0.0)
    client.send_resume(RESUME_REQ, ticket_for(1))
    client.send_auth(RESUME_AUTH_REQ, 1, make_credential())
    client.data_to_send()
    client.receive_data(frames(ResultFrame(req_id=RESUME_AUTH_REQ, status=0)), 0.0)
    server.resume(RESUME_REQ, client.received_offset)
    server.close(ErrorCode.NO_ERROR, "bye")
    events = client.receive_data(server.data_to_send(), 0.0)
    assert [type(e) for e in events] == [SessionResumed, StreamOpened, ConnectionClosed]
    assert client.closed


def test_frames_held_behind_the_auth_survive_a_loss() -> None:
    link = Link(handshake=False)
    client, server = link.client, link.server
    server.send_challenge(SERVER_NONCE)
    client.receive_data(server.data_to_send(), 0.0)
    client.send_auth(1, 1, make_credential())
    client.send_bind(2, TUNNEL, Address(None, 0))
    server.receive_data(client.data_to_send(), 0.0)
    server.send_result(1, ResultStatus.OK)
    server.send_ticket(ticket_for(1), 60)
    client.receive_data(server.data_to_send(), 0.0)
    link.ticket = ticket_for(1)
    link.tickets = 1
    # The connection dies before the relay processed the BIND held behind the AUTH.
    link.cut()
    assert link.resume()
    events = server.receive_data(b"", 0.0)
    assert events == [BindRequested(req_id=2, tunnel_id=TUNNEL, proto=1, bind=Address(None, 0))]


# ---------------------------------------------------------------------------------------
# The client's resume handshake


def _suspended_client() -> Link:
    link = Link()
    link.cut()
    return link


def _at_challenge(link: Link) -> Session:
    client = link.client
    client.begin_resume()
    hello = client.data_to_send()
    assert hello.startswith(MAGIC)
    assert types(hello) == [FrameType.HELLO]
    assert client.received_offset == link.server.sent_offset or client.suspended
    client.receive_data(relay_preface() + CHALLENGE, 0.0)
    return client


def _at_auth_sent(link: Link) -> Session:
    client = _at_challenge(link)
    client.send_resume(RESUME_REQ, ticket_for(1))
    client.send_auth(RESUME_AUTH_REQ, AuthMethod.HMAC_SHA256, make_credential())
    wire = client.data_to_send()
    assert types(wire) == [FrameType.RESUME, FrameType.AUTH]
    resume = parse_frames(wire)[0][3]
    assert int.from_bytes(resume[36:], "big") == client.received_offset
    return client


def _at_authenticated(link: Link) -> Session:
    client = _at_auth_sent(link)
    events = client.receive_data(frames(ResultFrame(req_id=RESUME_AUTH_REQ, status=0)), 0.0)
    assert [type(e) for e in events] == [ResultReceived]
    return client


def test_client_handshake_api_order() -> None:
    link = Link()
    client = link.client
    with pytest.raises(LocalProtocolError, match="cannot begin"):
        client.begin_resume()
    with pytest.raises(LocalProtocolError, match="cannot begin"):
        link.server.begin_resume()
    link.cut()
    with pytest.raises(LocalProtocolError, match="cannot suspend"):
        client.suspend()
    assert client.ping(0.0) is None
    assert client.receive_data(b"", 0.0) == []
    with pytest.raises(LocalProtocolError, match="no transport"):
        client.receive_data(b"x", 0.0)
    with pytest.raises(LocalProtocolError, match="right after the CHALLENGE"):
        client.send_resume(RESUME_REQ, ticket_for(1))
    client.begin_resume()
    with pytest.raises(LocalProtocolError, match="follows send_resume"):
        client.send_auth(RESUME_AUTH_REQ, 1, make_credential())
    client.receive_data(relay_preface() + CHALLENGE, 0.0)
    with pytest.raises(ValueError, match="request id"):
        client.send_resume(0, ticket_for(1))
    with pytest.raises(ValueError, match="32 bytes"):
        client.send_resume(RESUME_REQ, b"short")
    client.send_resume(RESUME_REQ, ticket_for(1))
    with pytest.raises(LocalProtocolError, match="the RESUME's"):
        client.send_auth(RESUME_REQ, 1, make_credential())
    with pytest.raises(LocalProtocolError, match="is 0"):
        client.send_auth(0, 1, make_credential())


def test_client_queues_stream_work_while_suspended_and_sends_it_after_the_replay() -> None:
    link = Link()
    client = link.client
    sid = link.open()
    assert sid is not None
    link.pump()
    link.cut()
    link.send(client, sid, b"queued while suspended", fin=True)
    assert not client.wants_write()
    assert client.data_to_send() == b""
    client.begin_resume()
    assert client.wants_write()
    wire = client.data_to_send()
    assert types(wire) == [FrameType.HELLO]  # the stream work waits for RESUMED
    assert not client.wants_write()
    link.c2s.clear()
    client.suspend()  # that connection died too
    assert link.resume()
    link.pump()
    assert link.model.received[(Role.SERVER, sid)] == b"queued while suspended"
    assert (Role.SERVER, sid) in link.model.fin_received


@pytest.mark.parametrize(
    ("state", "data", "match"),
    [
        ("hello", frames(ChallengeFrame(nonce=SERVER_NONCE)), "first frame must be HELLO"),
        ("challenge", relay_preface()[len(MAGIC) :], "second HELLO"),
        ("challenge", CHALLENGE, "second CHALLENGE"),
        ("hello-major", b"", "protocol 2"),
        ("hello-role", b"", "role"),
        ("auth", frames(ResultFrame(req_id=5, status=0)), "request id 5"),
        (
            "auth",
            frames(ResultFrame(req_id=RESUME_AUTH_REQ, status=0, bound=Address("1.2.3.4", 1))),
            "bound address",
        ),
        ("authenticated", frames(ResultFrame(req_id=RESUME_REQ, status=0)), "success is RESUMED"),
        ("auth", data_frame(2, b"early"), "DATA frame in a resume handshake"),
        ("auth", frames(WindowFrame(stream_id=2, max_offset=1 << 20)), "WINDOW frame"),
        (
            "auth",
            frames(OpenFrame(stream_id=2, tunnel_id=1, origin=ORIGIN, target=TARGET)),
            "OPEN frame",
        ),
        ("auth", frames(PingFrame(seq=1, ack=True)), "PONG frame"),
        ("auth", frames(AckFrame(received=0)), "ACK frame"),
    ],
)
def test_a_peer_fault_in_the_handshake_suspends_again(state: str, data: bytes, match: str) -> None:
    link = _suspended_client()
    client = link.client
    if state in ("hello", "hello-major", "hello-role"):
        client.begin_resume()
        client.data_to_send()
        if state == "hello-major":
            data = MAGIC + hello_bytes(Role.SERVER, RW_SETTINGS, major=2)
        elif state == "hello-role":
            data = MAGIC + hello_bytes(Role.CLIENT, RW_SETTINGS, minor=2)
        else:
            data = MAGIC + data
    elif state == "challenge":
        _at_challenge(link)
    elif state == "auth":
        _at_auth_sent(link)
    else:
        _at_authenticated(link)
    expected = VersionMismatchError if state == "hello-major" else ProtocolError
    with pytest.raises(expected, match=match) as info:
        client.receive_data(data, 0.0)
    assert client.suspended
    assert not client.closed
    assert client.statistics()["closed"] == 0
    wire = client.data_to_send()
    assert types(wire) == [FrameType.CLOSE]
    assert close_code(wire) == info.value.error_code
    assert not client.wants_write()
    # The next connection resumes.
    assert link.resume()
    link.pump()
    link.model.check()


def test_a_wrong_preface_in_the_handshake_suspends_again_silently() -> None:
    link = _suspended_client()
    client = link.client
    client.begin_resume()
    client.data_to_send()
    with pytest.raises(PrefaceError):
        client.receive_data(b"HTTP/1.1 400 Bad Request\r\n", 0.0)
    assert client.suspended
    assert client.data_to_send() == b""
    assert link.resume()


def test_the_relay_handshake_session_s_own_frames_are_ignored() -> None:
    link = _suspended_client()
    client = _at_auth_sent(link)
    noise = frames(
        PingFrame(seq=1),
        WindowFrame(stream_id=0, max_offset=1 << 30),
        TicketFrame(ticket=ticket_for(7), lifetime=60),
        GoAwayFrame(last_stream_id=0, error_code=0),
        ExtensionFrame(frame_type=0x99, payload=b"x"),
    )
    assert client.receive_data(noise, 0.0) == []
    assert client.data_to_send() == b""  # the PING is not answered
    assert not client.wants_write()


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (ResumedFrame(req_id=RESUME_REQ + 0, received=10**9), "outside what we kept"),
        (ResumedFrame(req_id=12345, received=0), "out of place"),
    ],
)
def test_a_bad_resumed_ends_the_session_for_good(frame: ResumedFrame, match: str) -> None:
    link = _suspended_client()
    client = _at_authenticated(link)
    with pytest.raises(ProtocolError, match=match):
        client.receive_data(frames(frame), 0.0)
    assert client.closed
    assert not client.suspended
    assert close_code(client.data_to_send()) == ErrorCode.PROTOCOL_ERROR


def test_resumed_before_the_auth_result_ends_the_session() -> None:
    link = _suspended_client()
    client = _at_auth_sent(link)
    with pytest.raises(ProtocolError, match="out of place"):
        client.receive_data(frames(ResumedFrame(req_id=RESUME_REQ, received=0)), 0.0)
    assert client.closed


def test_resumed_offset_below_the_last_ack_is_refused() -> None:
    link = Link()
    client, server = link.client, link.server
    client.ping(0.0)
    link.pump()  # the relay's PONG carries an ACK: the client's log is released
    assert client.replay_size == 0
    link.cut()
    client = _at_authenticated(link)
    with pytest.raises(ProtocolError, match="outside"):
        client.receive_data(frames(ResumedFrame(req_id=RESUME_REQ, received=0)), 0.0)
    assert client.closed
    assert server.suspended


@pytest.mark.parametrize("status", [ResultStatus.TICKET_UNKNOWN, ResultStatus.RESUME_FAILED, 99])
def test_a_refused_resume_ends_the_session_with_close_no_error(status: int) -> None:
    link = _suspended_client()
    client = _at_authenticated(link)
    refusal = frames(
        ResultFrame(req_id=RESUME_REQ, status=status, message="gone"),
        TicketFrame(ticket=ticket_for(8), lifetime=60),  # the new session's: never seen
    )
    events = client.receive_data(refusal, 0.0)
    assert events == [ResumeRefused(req_id=RESUME_REQ, status=status, message="gone")]
    assert client.closed
    wire = client.data_to_send()
    assert types(wire) == [FrameType.CLOSE]
    assert close_code(wire) == ErrorCode.NO_ERROR


def test_a_relay_without_resumption_now_is_a_refusal() -> None:
    link = _suspended_client()
    client = link.client
    client.begin_resume()
    client.data_to_send()
    events = client.receive_data(relay_preface(Settings(max_concurrent_streams=0)), 0.0)
    assert [type(e) for e in events] == [HelloReceived, ResumeRefused]
    assert isinstance(events[1], ResumeRefused)
    assert events[1].req_id == 0
    assert events[1].status == ResultStatus.TICKET_UNKNOWN
    assert client.closed
    assert types(client.data_to_send()) == [FrameType.CLOSE]


def test_an_auth_refused_in_the_handshake_ends_the_session() -> None:
    link = _suspended_client()
    client = _at_auth_sent(link)
    refused = frames(ResultFrame(req_id=RESUME_AUTH_REQ, status=ResultStatus.AUTH_FAILED))
    events = client.receive_data(refused, 0.0)
    assert [type(e) for e in events] == [ResultReceived]
    assert not client.closed
    with pytest.raises(LocalProtocolError):
        client.suspend()
    with pytest.raises(ProtocolError):
        client.receive_data(data_frame(2, b"x"), 0.0)
    assert client.statistics()["closed"] == 1  # for good: no way back to SUSPENDED
    assert close_code(client.data_to_send()) == ErrorCode.PROTOCOL_ERROR


def test_a_close_in_the_handshake_ends_the_session() -> None:
    link = _suspended_client()
    client = _at_auth_sent(link)
    events = client.receive_data(
        frames(ResultFrame(req_id=RESUME_AUTH_REQ, status=3), CloseFrame(error_code=0xC)), 0.0
    )
    assert [type(e) for e in events] == [ResultReceived, ConnectionClosed]
    assert client.closed
    assert client.data_to_send() == b""


def test_close_while_suspended_or_resuming_sends_no_stream_bytes() -> None:
    link = Link()
    client = link.client
    sid = link.open()
    assert sid is not None
    link.pump()
    link.cut()
    link.send(client, sid, b"never sent")
    client.close(ErrorCode.NO_ERROR, "giving up")
    assert client.closed
    assert not client.suspended
    assert types(client.data_to_send()) == [FrameType.CLOSE]
    link = _suspended_client()
    client = link.client
    client.begin_resume()
    client.close(ErrorCode.NO_ERROR, "giving up")
    wire = client.data_to_send()
    assert wire.startswith(MAGIC)
    assert types(wire) == [FrameType.HELLO, FrameType.CLOSE]


def test_handshake_frames_and_the_replay_arrive_in_one_read() -> None:
    """RESUMED and the bytes behind it in one chunk: the reader stops exactly there."""
    link = Link()
    client, server = link.client, link.server
    sid = link.open()
    assert sid is not None
    link.pump()
    link.send(server, sid, b"lost in flight", fin=True)
    link.write(server)
    link.cut()
    client.begin_resume()
    client.data_to_send()
    client.receive_data(relay_preface() + CHALLENGE, 0.0)
    client.send_resume(RESUME_REQ, link.ticket or b"")
    client.send_auth(RESUME_AUTH_REQ, 1, make_credential())
    client.data_to_send()
    server.resume(RESUME_REQ, client.received_offset)
    server.send_ticket(ticket_for(2), 60)
    wire = frames(ResultFrame(req_id=RESUME_AUTH_REQ, status=0)) + server.data_to_send()
    events = client.receive_data(wire, 0.0)
    assert [type(e) for e in events] == [
        ResultReceived,
        SessionResumed,
        DataReceived,
        StreamEnded,
        TicketReceived,
    ]
    assert client.received_offset == server.sent_offset
    assert client.statistics()["bytes_received"] >= len(wire)


# ---------------------------------------------------------------------------------------
# What was lost in flight comes again, once


def _lose_and_resume(link: Link, src: Session) -> None:
    link.write(src)
    link.cut(relay_notices=False)
    assert link.resume()
    link.pump()


def test_a_lost_open_and_its_data_arrive_once() -> None:
    link = Link()
    sid = link.open()
    assert sid is not None
    link.send(link.server, sid, b"hello visitor", fin=True)
    _lose_and_resume(link, link.server)
    assert link.model.opened_events == [sid]
    assert link.model.received[(Role.CLIENT, sid)] == b"hello visitor"
    link.model.check()


def test_a_lost_fin_and_reset_arrive_once() -> None:
    link = Link()
    a, b = link.open(), link.open()
    assert a is not None
    assert b is not None
    link.pump()
    link.send(link.client, a, b"last words", fin=True)
    link.reset(link.client, b)
    _lose_and_resume(link, link.client)
    resets = [e for e in link.server_events if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.remote) for e in resets] == [(b, True)]
    assert (Role.SERVER, a) in link.model.fin_received
    assert not link.server.stream_is_open(b)
    link.model.check()


def test_a_lost_window_unblocks_the_sender_after_the_resume() -> None:
    link = Link()
    client, server = link.client, link.server
    sid = link.open()
    assert sid is not None
    link.pump()
    link.send(server, sid, bytes(300_000))  # more than the stream window of 64 KiB
    link.write(server)
    link.deliver(client)
    assert server.send_credit(sid) == 0
    wire = client.data_to_send()
    assert FrameType.WINDOW in types(wire)  # lost with the connection
    link.c2s.clear()
    link.cut()
    assert link.resume()
    link.pump()
    assert len(link.model.received[(Role.CLIENT, sid)]) == 300_000
    assert any(isinstance(e, WindowUpdated) for e in link.server_events)


def test_a_lost_bind_and_result_arrive_once() -> None:
    link = Link()
    client, server = link.client, link.server
    client.send_bind(20, 7, Address(None, 0))
    link.write(client)
    link.cut()
    assert link.resume()
    link.pump()
    binds = [e for e in link.server_events if isinstance(e, BindRequested)]
    assert [e.req_id for e in binds].count(20) == 1
    server.send_result(20, ResultStatus.OK, bound=Address("0.0.0.0", 2222))
    link.write(server)
    link.cut()
    assert link.resume()
    link.pump()
    results = [e for e in link.client_events if isinstance(e, ResultReceived)]
    assert [e.req_id for e in results].count(20) == 1
    assert client.tunnel_is_bound(7)


def test_a_resume_while_the_old_connection_still_looks_alive() -> None:
    """NAT rebinding: the relay has not noticed the loss; resume() suspends it first."""
    link = Link()
    sid = link.open()
    assert sid is not None
    link.send(link.server, sid, b"x" * 1000)
    link.write(link.server)
    link.deliver(link.client, 20)  # a partial frame in the client's reader is dropped
    link.cut(relay_notices=False)
    assert not link.server.suspended
    assert link.resume()
    link.pump()
    assert link.model.received[(Role.CLIENT, sid)] == b"x" * 1000
    assert link.ticket == ticket_for(2)  # rotated after RESUMED, in the stream


# ---------------------------------------------------------------------------------------
# The local bound on the replay log (spec §10.6.2 item 5)


#: Windows far larger than the relay's bound, so that only the bound holds its log back.
_WIDE = Settings(initial_stream_window=4 << 20, initial_conn_window=16 << 20, resume_window=60)


def _bounded(max_replay: int | None) -> tuple[SessionConfig, SessionConfig]:
    client = SessionConfig(settings=_WIDE, max_stream_window=4 << 20, max_conn_window=16 << 20)
    server = dataclasses.replace(SERVER_CONFIG, max_replay=max_replay)
    return client, server


def test_the_bound_defaults_to_our_window_cap_and_never_goes_below_4_ack_intervals() -> None:
    assert Session(Role.SERVER, SERVER_CONFIG)._max_replay == 4 * ACK_INTERVAL
    big = dataclasses.replace(SERVER_CONFIG, max_conn_window=32 << 20)
    assert Session(Role.SERVER, big)._max_replay == 32 << 20
    small = dataclasses.replace(SERVER_CONFIG, max_replay=1000)
    assert Session(Role.SERVER, small)._max_replay == 4 * ACK_INTERVAL
    assert Session(Role.SERVER, SessionConfig(max_replay=5 << 20))._max_replay == 5 << 20


def test_a_peer_that_never_acks_cannot_grow_the_log_past_the_bound() -> None:
    client_config, server_config = _bounded(None)  # the relay's own bound: 4 x ACK_INTERVAL
    link = Link(client_config=client_config, server_config=server_config)
    client, server = link.client, link.server
    sids = [link.open() for _ in range(4)]
    link.pump()
    for sid in sids:
        assert sid is not None
        link.send(server, sid, bytes(1_300_000))
    # The client's bytes never reach the relay: no ACK (its windows would allow 16 MiB).
    for _ in range(80):
        link.write(server)
        link.deliver(client)
        client.data_to_send()
    cap = 4 * ACK_INTERVAL
    assert cap - 16_384 <= server.replay_size <= cap + 4 * 16 + 1000  # the bound, one batch
    assert not server.wants_write()
    stuck = sum(server.pending_bytes(sid) for sid in sids if sid is not None)
    assert stuck > 0
    assert min(server.send_credit(sid) for sid in sids if sid is not None) > 0  # windows: open
    # An ACK releases the log, reports credit and the DATA flows again.
    events = server.receive_data(frames(AckFrame(received=client.received_offset)), 0.0)
    assert events == [WindowUpdated(stream_id=0)]
    assert server.wants_write()
    assert server.replay_size == 0


@pytest.mark.parametrize("seed", range(5))
def test_the_bound_slows_the_sender_but_never_deadlocks(seed: int) -> None:
    client_config, server_config = _bounded(0)  # raised to 4 x ACK_INTERVAL
    rng = random.Random(seed)
    link = Link(rng, client_config=client_config, server_config=server_config)
    sids = [link.open() for _ in range(3)]
    link.pump()
    for sid in sids:
        assert sid is not None
        link.send(link.server, sid, rng.randbytes(2_000_000), fin=True)
        link.send(link.client, sid, rng.randbytes(100_000), fin=True)
    for _ in range(30):
        link.write(link.server, rng.choice((None, 5000)))
        link.write(link.client, rng.choice((None, 5000)))
        link.deliver(link.client, rng.choice((None, 3000)))
        link.deliver(link.server, rng.choice((None, 3000)))
        if rng.random() < 0.2:
            link.cut()
            assert link.resume()
    link.pump()
    link.model.check()
    assert link.max_replay <= 4 * ACK_INTERVAL + 4096  # the bound + headers/control


@pytest.mark.parametrize("who", ["sent", "received"])
def test_a_session_going_away_is_not_resumed(who: str) -> None:
    link = Link()
    client, server = link.client, link.server
    if who == "sent":
        server.go_away()
    else:
        server.receive_data(frames(GoAwayFrame(last_stream_id=0, error_code=0)), 0.0)
    with pytest.raises(LocalProtocolError, match="going away"):
        server.suspend()
    assert not server.suspended
    assert not server.can_resume(server.sent_offset)
    with pytest.raises(LocalProtocolError, match="going away"):
        server.resume(RESUME_REQ, server.sent_offset)
    # A suspended relay that starts to drain cannot be resumed either.
    link = Link()
    link.cut()
    link.server.go_away()
    assert not link.server.can_resume(link.client.received_offset)
    with pytest.raises(LocalProtocolError, match="going away"):
        link.server.resume(RESUME_REQ, link.client.received_offset)
    assert client.resume_enabled
