"""Client-opened streams on visit tunnels (protocol-spec.md §9.1, §9.2; minor version 1).

A relay that carries visit streams declares MAX_CONCURRENT_STREAMS > 0 in its HELLO; the
visiting client then opens streams with odd ids for its VISIT tunnel, and the relay forwards
each one as a relay-opened stream on the publisher's session. These tests drive the sans-IO
sessions end to end, three of them for the forwarding: visitor <-> relay <-> publisher.
"""

from __future__ import annotations

import pytest

from muxtunnel.connection import make_session
from muxtunnel.errors import ErrorCode, LocalProtocolError
from muxtunnel.protocol.constants import MAGIC, AuthMethod, OpenFailReason, ResultStatus, Role
from muxtunnel.protocol.events import (
    AuthRequested,
    BindRequested,
    DataReceived,
    Event,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
)
from muxtunnel.protocol.frames import Address, BindOptions, OpenFrame, Settings, encode_frame
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import (
    SERVER_NONCE,
    SessionPair,
    expect_close,
    hello_bytes,
    make_credential,
    received_bytes,
)

NONE = Address(None, 0)
VISIT_TUNNEL = 1
LOCAL_PEER = Address("127.0.0.1", 50123)  # the visiting client's local connection (informative)
VISIT_TARGET = Address("db", 0)  # ADDR(NAME, 0)
RELAY_CONFIG = SessionConfig(settings=Settings(max_concurrent_streams=256))


def visit_pair(name: str = "db") -> SessionPair:
    """An authenticated visitor client and a relay that declared 256 client-opened streams."""
    pair = SessionPair(server_config=RELAY_CONFIG, tunnels=())
    pair.client.send_bind(2, VISIT_TUNNEL, NONE, options=BindOptions(visit=name))
    events = pair.send(pair.client)
    assert events == [
        BindRequested(
            req_id=2, tunnel_id=VISIT_TUNNEL, proto=1, bind=NONE, options=BindOptions(visit=name)
        )
    ]
    pair.server.send_result(2, ResultStatus.OK, bound=Address(name, 0))
    pair.send(pair.server)
    return pair


def test_relay_declaring_streams_lets_the_client_open() -> None:
    pair = visit_pair()
    assert pair.client.peer_settings is not None
    assert pair.client.peer_settings.max_concurrent_streams == 256
    assert pair.client.can_open_stream()


def test_client_opened_stream_end_to_end() -> None:
    pair = visit_pair()
    client, relay = pair.client, pair.server
    sid = client.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)
    assert sid % 2 == 1
    client.send_data(sid, b"SSH-2.0-visitor\r\n")  # early data right behind OPEN (§9.2)
    events = pair.send(client)
    assert events[0] == StreamOpened(
        stream_id=sid, tunnel_id=VISIT_TUNNEL, origin=LOCAL_PEER, target=VISIT_TARGET
    )
    assert received_bytes(events, sid) == b"SSH-2.0-visitor\r\n"
    relay.acknowledge(sid, 17, 0.0)
    relay.accept_stream(sid)
    relay.send_data(sid, b"SSH-2.0-service\r\n")
    events = pair.send(relay)
    assert events[0] == StreamAccepted(stream_id=sid)
    assert received_bytes(events, sid) == b"SSH-2.0-service\r\n"
    client.acknowledge(sid, 17, 0.0)
    second = client.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)
    assert second == sid + 2
    client.end_stream(sid)
    relay.end_stream(sid)
    client_events, relay_events = pair.pump()
    assert StreamEnded(stream_id=sid) in client_events
    assert StreamEnded(stream_id=sid) in relay_events
    assert not client.stream_is_open(sid)
    assert not relay.stream_is_open(sid)
    assert client.statistics()["streams_opened_local"] == 2
    assert relay.statistics()["streams_opened_remote"] == 2


def test_client_opened_stream_refused_with_open_fail() -> None:
    pair = visit_pair()
    sid = pair.client.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)
    pair.client.send_data(sid, b"early")
    pair.send(pair.client)
    pair.server.reject_stream(sid, OpenFailReason.UNREACHABLE, "no private tunnel db is up")
    events = pair.send(pair.server)
    assert events == [
        StreamRejected(
            stream_id=sid, reason=OpenFailReason.UNREACHABLE, message="no private tunnel db is up"
        )
    ]
    assert not pair.client.stream_is_open(sid)
    assert pair.client.can_open_stream()


def test_client_opened_stream_reset_by_the_relay() -> None:
    pair = visit_pair()
    sid = pair.client.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)
    pair.send(pair.client)
    pair.server.accept_stream(sid)
    pair.server.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    events = pair.send(pair.server)
    assert events[-1] == StreamReset(stream_id=sid, error_code=ErrorCode.CONNECT_ERROR, remote=True)


def test_relay_declaring_0_streams_treats_a_client_open_as_stream_limit_error() -> None:
    pair = SessionPair(tunnels=())  # the relay's default: MAX_CONCURRENT_STREAMS 0
    assert not pair.client.can_open_stream()
    with pytest.raises(LocalProtocolError):
        pair.client.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)
    assert not pair.client.wants_write()
    opened = encode_frame(
        OpenFrame(stream_id=1, tunnel_id=VISIT_TUNNEL, origin=LOCAL_PEER, target=VISIT_TARGET)
    )
    expect_close(pair.server, opened, ErrorCode.STREAM_LIMIT_ERROR)


def test_client_cannot_open_before_authentication() -> None:
    client = Session(Role.CLIENT)
    client.receive_data(
        MAGIC + hello_bytes(Role.SERVER, Settings(max_concurrent_streams=8), minor=1), 0.0
    )
    with pytest.raises(LocalProtocolError):
        client.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)


def test_adapter_sessions_with_a_relay_override() -> None:
    """``make_session`` with a MAX_CONCURRENT_STREAMS override: the relay accepts client OPENs."""
    relay = make_session(Role.SERVER, settings_overrides={"max_concurrent_streams": 256})
    client = make_session(Role.CLIENT)
    relay.send_challenge(SERVER_NONCE)
    client.receive_data(relay.data_to_send(), 0.0)
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    client.send_bind(2, VISIT_TUNNEL, NONE, options=BindOptions(visit="db"))
    events = relay.receive_data(client.data_to_send(), 0.0)
    assert isinstance(events[-1], AuthRequested)
    relay.send_result(1, ResultStatus.OK)
    events = relay.receive_data(b"", 0.0)
    assert events == [
        BindRequested(
            req_id=2, tunnel_id=VISIT_TUNNEL, proto=1, bind=NONE, options=BindOptions(visit="db")
        )
    ]
    relay.send_result(2, ResultStatus.OK, bound=Address("db", 0))
    client.receive_data(relay.data_to_send(), 0.0)
    sid = client.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)
    events = relay.receive_data(client.data_to_send(), 0.0)
    assert events == [
        StreamOpened(stream_id=sid, tunnel_id=VISIT_TUNNEL, origin=LOCAL_PEER, target=VISIT_TARGET)
    ]


# ---------------------------------------------------------------------------------------
# Forwarding through the relay: visitor <-> relay <-> publisher, as spec §9.2 describes

WINDOW = 16_384
SMALL = Settings(initial_stream_window=WINDOW, max_concurrent_streams=256)
PUBLISHER_ORIGIN = Address("192.0.2.10", 40400)  # the visitor's TLS peer address at the relay
PUBLISHER_TARGET = Address("198.51.100.1", 7835)  # the relay's local address of that connection


class Leg:
    """One direction of the relay's copy: bytes received on ``src`` go out on ``dst``.

    The relay acknowledges (returns credit for) a byte on ``src`` only once ``dst`` framed it,
    which the peer's window on ``dst`` allows: the two windows chain into end-to-end flow
    control, and the relay holds at most one window per direction.
    """

    def __init__(self, src: Session, ssid: int, dst: Session, dsid: int) -> None:
        self.src, self.ssid, self.dst, self.dsid = src, ssid, dst, dsid
        self.owed = 0

    def take(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived) and event.stream_id == self.ssid:
                self.dst.send_data(self.dsid, bytes(event.data))
                self.owed += len(event.data)
            elif isinstance(event, StreamEnded) and event.stream_id == self.ssid:
                self.dst.end_stream(self.dsid)

    def settle(self) -> None:
        framed = self.owed - self.dst.pending_bytes(self.dsid)
        if framed:
            self.src.acknowledge(self.ssid, framed, 0.0)
            self.owed -= framed


class Chain:
    """Visitor and relay (one SessionPair), relay and publisher (another), 16 KiB windows."""

    def __init__(self) -> None:
        self.visit = SessionPair(
            client_config=SessionConfig(settings=Settings(initial_stream_window=WINDOW)),
            server_config=SessionConfig(settings=SMALL),
            tunnels=(),
        )
        self.visit.client.send_bind(2, VISIT_TUNNEL, NONE, options=BindOptions(visit="db"))
        self.visit.send(self.visit.client)
        self.visit.server.send_result(2, ResultStatus.OK, bound=Address("db", 0))
        self.visit.send(self.visit.server)
        self.publish = SessionPair(
            client_config=SessionConfig(settings=Settings(initial_stream_window=WINDOW)),
            tunnels=(7,),
        )
        self.visitor, self.relay_v = self.visit.client, self.visit.server
        self.publisher, self.relay_p = self.publish.client, self.publish.server
        self.vsid = self.visitor.open_stream(VISIT_TUNNEL, LOCAL_PEER, VISIT_TARGET)
        opened = self.visit.send(self.visitor)
        assert opened == [
            StreamOpened(
                stream_id=self.vsid, tunnel_id=VISIT_TUNNEL, origin=LOCAL_PEER, target=VISIT_TARGET
            )
        ]
        self.psid = self.relay_p.open_stream(7, PUBLISHER_ORIGIN, PUBLISHER_TARGET)
        forwarded = self.publish.send(self.relay_p)
        assert forwarded == [
            StreamOpened(
                stream_id=self.psid, tunnel_id=7, origin=PUBLISHER_ORIGIN, target=PUBLISHER_TARGET
            )
        ]
        self.up = Leg(self.relay_v, self.vsid, self.relay_p, self.psid)
        self.down = Leg(self.relay_p, self.psid, self.relay_v, self.vsid)

    def answer(self, accept: bool) -> list[Event]:
        """The publisher answers; the relay gives the visitor the same answer."""
        if accept:
            self.publisher.accept_stream(self.psid)
        else:
            self.publisher.reject_stream(
                self.psid, OpenFailReason.CONNECT_FAILED, "connection refused"
            )
        answer = self.publish.send(self.publisher)[0]
        if isinstance(answer, StreamAccepted):
            self.relay_v.accept_stream(self.vsid)
        else:
            assert isinstance(answer, StreamRejected)
            self.relay_v.reject_stream(self.vsid, OpenFailReason(answer.reason), answer.message)
        return self.visit.send(self.relay_v)

    def step(self, *, publisher_reads: bool) -> list[Event]:
        """One round of every hop; returns the publisher's events."""
        self.up.take(self.visit.send(self.visitor))
        events = self.publish.send(self.relay_p)
        self.up.settle()
        if publisher_reads:
            for event in events:
                if isinstance(event, DataReceived):
                    self.publisher.acknowledge(self.psid, len(event.data), 0.0)
        self.down.take(self.publish.send(self.publisher))
        self.visit.send(self.relay_v)
        self.down.settle()
        return events


def test_forwarded_stream_is_flow_controlled_end_to_end() -> None:
    chain = Chain()
    assert chain.answer(accept=True) == [StreamAccepted(stream_id=chain.vsid)]
    payload = bytes(range(256)) * 800  # 200 KiB: many 16 KiB windows
    chain.visitor.send_data(chain.vsid, payload, end_stream=True)
    got = b""
    for _ in range(20):  # the publisher reads nothing: the copy stops after its window
        got += received_bytes(chain.step(publisher_reads=False), chain.psid)
    assert len(got) == WINDOW
    # The relay holds at most one window per hop; the rest waits at the visitor.
    assert chain.relay_p.pending_bytes(chain.psid) <= WINDOW
    assert chain.visitor.pending_bytes(chain.vsid) >= len(payload) - 3 * WINDOW
    chain.publisher.acknowledge(chain.psid, len(got), 0.0)  # the publisher reads at last
    ended = False
    for _ in range(1000):
        events = chain.step(publisher_reads=True)
        got += received_bytes(events, chain.psid)
        if StreamEnded(stream_id=chain.psid) in events:
            ended = True
            break
    assert ended
    assert got == payload
    chain.publisher.send_data(chain.psid, b"bye", end_stream=True)
    for _ in range(10):
        chain.step(publisher_reads=True)
    log = chain.visit.client_log
    assert received_bytes(log, chain.vsid) == b"bye"
    assert StreamEnded(stream_id=chain.vsid) in log
    assert not chain.visitor.stream_is_open(chain.vsid)
    assert not chain.publisher.stream_is_open(chain.psid)


def test_forwarded_open_fail_reaches_the_visitor_with_its_reason() -> None:
    chain = Chain()
    events = chain.answer(accept=False)
    assert events == [
        StreamRejected(
            stream_id=chain.vsid, reason=OpenFailReason.CONNECT_FAILED, message="connection refused"
        )
    ]


def test_forwarded_reset_propagates() -> None:
    chain = Chain()
    chain.answer(accept=True)
    chain.publisher.reset_stream(chain.psid, ErrorCode.CONNECT_ERROR)
    reset = chain.publish.send(chain.publisher)[-1]
    assert reset == StreamReset(
        stream_id=chain.psid, error_code=ErrorCode.CONNECT_ERROR, remote=True
    )
    chain.relay_v.reset_stream(chain.vsid, reset.error_code)
    events = chain.visit.send(chain.relay_v)
    assert events[-1] == StreamReset(
        stream_id=chain.vsid, error_code=ErrorCode.CONNECT_ERROR, remote=True
    )
