"""Several connections per session (spec §10.7), fed as bytes: JOIN (RESUME with the flag JOIN)
between CHALLENGE and AUTH, the relay's answer, the MAX_CONNECTIONS setting, and a joined
connection that takes OPENs for the tunnels bound on the session's first connection."""

from __future__ import annotations

import pytest

from muxtunnel.errors import ErrorCode, LocalProtocolError, ProtocolError
from muxtunnel.protocol.constants import (
    FLAG_JOIN,
    MAGIC,
    MAX_CONNECTIONS,
    FrameType,
    OpenFailReason,
    ResultStatus,
    Role,
    SettingId,
)
from muxtunnel.protocol.events import (
    AuthRequested,
    ChallengeReceived,
    ConnectionClosed,
    HelloReceived,
    JoinRequested,
    ResultReceived,
    StreamOpened,
    TicketReceived,
)
from muxtunnel.protocol.frames import (
    OpenFrame,
    ResumeFrame,
    Settings,
    decode_payload,
    encode_frame,
)
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import (
    ORIGIN,
    SERVER_NONCE,
    TARGET,
    SessionPair,
    expect_close,
    hello_bytes,
    make_credential,
    parse_frames,
)

TICKET = bytes(range(100, 132))
JOIN_REQ = 0xFFFF_FFFD
RESUMABLE = SessionConfig(settings=Settings(resume_window=60))
RELAY = SessionConfig(
    settings=Settings(max_concurrent_streams=0, resume_window=60, max_connections=4)
)


def _challenged(relay_config: SessionConfig = RELAY) -> tuple[Session, Session, bytes]:
    """A fresh client and relay session, the relay's HELLO + CHALLENGE delivered; the nonce."""
    client = Session(Role.CLIENT, RESUMABLE)
    relay = Session(Role.SERVER, relay_config)
    relay.send_challenge(SERVER_NONCE)
    events = client.receive_data(relay.data_to_send(), 0.0)
    assert [type(e) for e in events] == [HelloReceived, ChallengeReceived]
    challenge = events[1]
    assert isinstance(challenge, ChallengeReceived)
    return client, relay, challenge.nonce


def test_max_connections_is_listed_only_when_set() -> None:
    assert SettingId.MAX_CONNECTIONS not in dict(Settings().to_pairs())
    assert dict(Settings(max_connections=8).to_pairs())[SettingId.MAX_CONNECTIONS] == 8
    with pytest.raises(ProtocolError, match="MAX_CONNECTIONS"):
        Settings(max_connections=MAX_CONNECTIONS + 1)
    parsed = Settings.from_pairs(((SettingId.MAX_CONNECTIONS, 3),))
    assert parsed.max_connections == 3


def test_join_frame_carries_the_flag() -> None:
    raw = encode_frame(ResumeFrame(req_id=5, ticket=TICKET, received=0, join=True))
    ((ftype, flags, sid, payload),) = parse_frames(raw)
    assert (ftype, flags, sid) == (FrameType.RESUME, FLAG_JOIN, 0)
    frame = decode_payload(ftype, flags, sid, payload)
    assert frame == ResumeFrame(req_id=5, ticket=TICKET, received=0, join=True)
    plain = decode_payload(ftype, 0, sid, payload)
    assert isinstance(plain, ResumeFrame)
    assert not plain.join


def test_join_then_auth_is_reported_and_answered() -> None:
    client, relay, nonce = _challenged()
    client.send_join(JOIN_REQ, TICKET)
    client.send_auth(1, 1, make_credential(server_nonce=nonce))
    events = relay.receive_data(client.data_to_send(), 0.0)
    assert [type(e) for e in events] == [HelloReceived, JoinRequested, AuthRequested]
    assert events[1] == JoinRequested(req_id=JOIN_REQ, ticket=TICKET)
    with pytest.raises(LocalProtocolError, match="AUTH before the JOIN"):
        relay.send_result(JOIN_REQ, ResultStatus.OK)
    relay.send_result(1, ResultStatus.OK)
    relay.send_result(JOIN_REQ, ResultStatus.OK)
    relay.send_ticket(bytes(32), 60)
    events = client.receive_data(relay.data_to_send(), 0.0)
    assert [(type(e), getattr(e, "req_id", None)) for e in events] == [
        (ResultReceived, 1),
        (ResultReceived, JOIN_REQ),
        (TicketReceived, None),
    ]
    assert client.authenticated
    assert relay.authenticated
    assert not relay.closed


@pytest.mark.parametrize("status", [ResultStatus.TICKET_UNKNOWN, ResultStatus.LIMIT_REACHED])
def test_a_refused_join_closes_the_connection(status: ResultStatus) -> None:
    client, relay, nonce = _challenged()
    client.send_join(JOIN_REQ, TICKET)
    client.send_auth(1, 1, make_credential(server_nonce=nonce))
    relay.receive_data(client.data_to_send(), 0.0)
    relay.send_result(1, ResultStatus.OK)
    with pytest.raises(ValueError, match="answered OK, TICKET_UNKNOWN or LIMIT_REACHED"):
        relay.send_result(JOIN_REQ, ResultStatus.DENIED)
    relay.send_result(JOIN_REQ, status, "no")
    assert relay.closed
    events = client.receive_data(relay.data_to_send(), 0.0)
    refusal = events[1]
    assert isinstance(refusal, ResultReceived)
    assert refusal.status == status
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].error_code == ErrorCode.NO_ERROR


def test_send_join_guards() -> None:
    client, _relay, nonce = _challenged()
    with pytest.raises(ValueError, match="32 bytes"):
        client.send_join(JOIN_REQ, b"short")
    client.send_auth(1, 1, make_credential(server_nonce=nonce))
    with pytest.raises(LocalProtocolError, match="between CHALLENGE and AUTH"):
        client.send_join(JOIN_REQ, TICKET)
    # Before CHALLENGE, and from a relay.
    with pytest.raises(LocalProtocolError, match="between CHALLENGE and AUTH"):
        Session(Role.CLIENT, RESUMABLE).send_join(JOIN_REQ, TICKET)
    with pytest.raises(LocalProtocolError, match="between CHALLENGE and AUTH"):
        Session(Role.SERVER, RELAY).send_join(JOIN_REQ, TICKET)
    # A relay that offers one connection per session, or no resumption.
    one = SessionConfig(settings=Settings(max_concurrent_streams=0, resume_window=60))
    client, _relay, _nonce = _challenged(one)
    with pytest.raises(LocalProtocolError, match="MAX_CONNECTIONS"):
        client.send_join(JOIN_REQ, TICKET)
    off = SessionConfig(settings=Settings(max_concurrent_streams=0, max_connections=4))
    client, _relay, _nonce = _challenged(off)
    with pytest.raises(LocalProtocolError, match="MAX_CONNECTIONS"):
        client.send_join(JOIN_REQ, TICKET)


def _client_hello() -> bytes:
    return MAGIC + hello_bytes(Role.CLIENT, Settings(resume_window=60), minor=2)


def test_join_with_an_offset_is_a_protocol_error() -> None:
    relay = Session(Role.SERVER, RELAY)
    relay.send_challenge(SERVER_NONCE)
    relay.data_to_send()
    frame = ResumeFrame(req_id=JOIN_REQ, ticket=TICKET, received=1, join=True)
    wire = _client_hello() + encode_frame(frame)
    wire = expect_close(relay, wire, ErrorCode.PROTOCOL_ERROR)
    assert b"JOIN with a received offset" in wire


def test_join_to_a_relay_of_one_connection_is_a_protocol_error() -> None:
    relay = Session(
        Role.SERVER, SessionConfig(settings=Settings(max_concurrent_streams=0, resume_window=60))
    )
    relay.send_challenge(SERVER_NONCE)
    relay.data_to_send()
    frame = ResumeFrame(req_id=JOIN_REQ, ticket=TICKET, received=0, join=True)
    wire = expect_close(relay, _client_hello() + encode_frame(frame), ErrorCode.PROTOCOL_ERROR)
    assert b"takes one connection per session" in wire


def test_a_joined_connection_takes_opens_for_the_first_connections_tunnels() -> None:
    first = SessionPair(tunnels=(1, 2))
    joined = SessionPair(tunnels=())
    joined.client.share_binds(first.client)
    sid = joined.server.open_stream(2, ORIGIN, TARGET)
    events = joined.send(joined.server)
    assert events == [StreamOpened(stream_id=sid, tunnel_id=2, origin=ORIGIN, target=TARGET)]
    # A tunnel the first connection did not bind is refused on the joined one too.
    joined.server.open_stream(3, ORIGIN, TARGET)
    assert joined.send(joined.server) == []
    answer = joined.client.data_to_send()
    ((ftype, _flags, _sid, payload),) = parse_frames(answer)
    assert ftype == FrameType.OPEN_FAIL
    assert int.from_bytes(payload[:4], "big") == OpenFailReason.UNKNOWN_TUNNEL
    # An UNBIND on the first connection applies to the joined one as well.
    first.client.send_unbind(9, 2)
    first.send(first.client)
    first.server.send_result(9, ResultStatus.OK)
    first.send(first.server)
    wire = encode_frame(OpenFrame(stream_id=sid + 2, tunnel_id=2, origin=ORIGIN, target=TARGET))
    expect_close(joined.client, wire, ErrorCode.PROTOCOL_ERROR)
