"""Test helpers for the sans-IO core: a connected Session pair and frame builders.

``SessionPair`` moves bytes between a client and a server :class:`Session` (the h11
``ConnectionPair`` idea): ``pump()`` shuttles ``data_to_send()`` output into the other side's
``receive_data()`` until both are quiet and returns the events each side saw.

Frame builders produce raw wire bytes so tests can play a misbehaving peer.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import pytest

from muxtunnel.errors import ErrorCode, ProtocolError
from muxtunnel.protocol.constants import (
    AUTH_CONTEXT,
    MAGIC,
    AuthMethod,
    FrameType,
    ResultStatus,
    Role,
)
from muxtunnel.protocol.events import (
    AuthRequested,
    BindRequested,
    ChallengeReceived,
    DataReceived,
    Event,
    HelloReceived,
    ResultReceived,
)
from muxtunnel.protocol.frames import (
    HEADER,
    Address,
    CloseFrame,
    Frame,
    HelloFrame,
    Settings,
    decode_payload,
    encode_frame,
    pack_data_header,
)
from muxtunnel.protocol.session import Session, SessionConfig

__all__ = [
    "BIND_REQ_BASE",
    "CLIENT_NONCE",
    "ORIGIN",
    "SERVER_NONCE",
    "TARGET",
    "TOKEN",
    "SessionPair",
    "close_code",
    "data_frame",
    "expect_close",
    "frames",
    "hello_bytes",
    "make_credential",
    "parse_frames",
    "preface",
    "received_bytes",
]

TOKEN = "s3cr3t-token"
#: ``SessionPair.bind`` uses request id BIND_REQ_BASE + tunnel_id.
BIND_REQ_BASE = 0x7000_0000
SERVER_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(32, 64))
ORIGIN = Address("198.51.100.23", 51514)
TARGET = Address("203.0.113.7", 40001)


def make_credential(
    token: str = TOKEN, server_nonce: bytes = SERVER_NONCE, client_nonce: bytes = CLIENT_NONCE
) -> bytes:
    """The AUTH credential for method 1: client_nonce || HMAC-SHA256(token, context+nonces)."""
    mac = hmac.new(
        token.encode("utf-8"), AUTH_CONTEXT + server_nonce + client_nonce, hashlib.sha256
    ).digest()
    return client_nonce + mac


def parse_frames(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    if wire.startswith(MAGIC):
        wire = wire[len(MAGIC) :]
    off = 0
    while off < len(wire):
        length, ftype, flags, _res, sid = HEADER.unpack_from(wire, off)
        out.append((ftype, flags, sid, wire[off + 16 : off + 16 + length]))
        off += 16 + length
    return out


def close_code(wire: bytes) -> int | None:
    """The code of the last CLOSE frame in ``wire`` (None if there is none)."""
    code = None
    for ftype, flags, sid, payload in parse_frames(wire):
        if ftype == FrameType.CLOSE:
            frame = decode_payload(ftype, flags, sid, payload)
            assert isinstance(frame, CloseFrame)
            code = frame.error_code
    return code


def expect_close(
    session: Session, data: bytes, code: ErrorCode, exc: type[ProtocolError] = ProtocolError
) -> bytes:
    with pytest.raises(exc) as info:
        session.receive_data(data, 0.0)
    assert info.value.error_code == code
    assert session.closed
    wire = session.data_to_send()
    assert close_code(wire) == code
    assert session.receive_data(b"anything", 0.0) == []  # input is ignored after close
    assert session.data_to_send() == b""
    return wire


def frames(*items: Frame) -> bytes:
    """The wire bytes of several frames."""
    return b"".join(encode_frame(f) for f in items)


def data_frame(stream_id: int, payload: bytes, *, fin: bool = False, flags: int = 0) -> bytes:
    """A DATA frame; ``flags`` adds extra (undefined) flag bits."""
    header = bytearray(pack_data_header(stream_id, len(payload), fin))
    header[5] |= flags
    return bytes(header) + payload


def hello_bytes(
    role: Role, settings: Settings | None = None, *, major: int = 1, minor: int = 0
) -> bytes:
    """A HELLO frame as ``role`` would send it (minor 0 by default: the oldest peer)."""
    if settings is None:
        settings = Settings(max_concurrent_streams=0) if role == Role.SERVER else Settings()
    return encode_frame(
        HelloFrame(major=major, minor=minor, role=role, flags=0, settings=settings.to_pairs())
    )


def preface(role: Role, settings: Settings | None = None) -> bytes:
    """MAGIC + HELLO of a peer with ``role``."""
    return MAGIC + hello_bytes(role, settings)


@dataclass
class SessionPair:
    """A client and a server session wired back to back.

    Args:
        client_config / server_config: the sessions' configs.
        handshake: run HELLO + CHALLENGE + AUTH at once (``authenticate``), then BIND
            ``tunnels`` (the client refuses OPENs for tunnels that are not bound).
        max_bytes: batch size passed to ``data_to_send`` while pumping (None = default).
    """

    client_config: SessionConfig | None = None
    server_config: SessionConfig | None = None
    handshake: bool = True
    max_bytes: int | None = None
    now: float = 0.0
    tunnels: tuple[int, ...] = tuple(range(1, 10))
    client: Session = field(init=False)
    server: Session = field(init=False)
    #: Every event each side produced, in order.
    client_log: list[Event] = field(default_factory=list, init=False)
    server_log: list[Event] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.client = Session(Role.CLIENT, self.client_config)
        self.server = Session(Role.SERVER, self.server_config)
        if self.handshake:
            self.authenticate()
            self.bind(*self.tunnels)

    def peer(self, session: Session) -> Session:
        """The other session."""
        return self.server if session is self.client else self.client

    def send(self, src: Session, max_bytes: int | None = None) -> list[Event]:
        """Move one ``data_to_send()`` batch from ``src`` to its peer; return the peer's events."""
        data = src.data_to_send(self.max_bytes if max_bytes is None else max_bytes)
        dst = self.peer(src)
        events = dst.receive_data(data, self.now) if data else []
        (self.server_log if dst is self.server else self.client_log).extend(events)
        return events

    def pump(self, max_rounds: int = 10_000) -> tuple[list[Event], list[Event]]:
        """Shuttle bytes both ways until neither side has anything to send.

        Returns:
            (events seen by the client, events seen by the server).
        """
        client_events: list[Event] = []
        server_events: list[Event] = []
        for _ in range(max_rounds):
            if not (self.client.wants_write() or self.server.wants_write()):
                return client_events, server_events
            server_events += self.send(self.client)
            client_events += self.send(self.server)
        raise AssertionError("SessionPair.pump did not settle")

    def authenticate(self, token: str = TOKEN) -> None:
        """Run HELLO, CHALLENGE, AUTH (method 1) and RESULT(OK) between the two sessions."""
        self.server.send_challenge(SERVER_NONCE)
        events = self.send(self.server)
        assert isinstance(events[0], HelloReceived)
        assert isinstance(events[1], ChallengeReceived)
        self.client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential(token, events[1].nonce))
        events = self.send(self.client)
        assert isinstance(events[0], HelloReceived)
        auth = events[1]
        assert isinstance(auth, AuthRequested)
        assert hmac.compare_digest(auth.credential, make_credential(token))
        self.server.send_result(auth.req_id, ResultStatus.OK)
        self.server_log += self.server.receive_data(b"", self.now)
        events = self.send(self.server)
        assert isinstance(events[0], ResultReceived)
        assert events[0].status == ResultStatus.OK
        assert self.client.authenticated
        assert self.server.authenticated

    def bind(self, *tunnel_ids: int) -> None:
        """BIND each tunnel and answer RESULT(OK), outside the event logs."""
        for tunnel_id in tunnel_ids:
            req_id = BIND_REQ_BASE + tunnel_id
            self.client.send_bind(req_id, tunnel_id, Address(None, 0))
            events = self.server.receive_data(self.client.data_to_send(), self.now)
            assert events == [
                BindRequested(req_id=req_id, tunnel_id=tunnel_id, proto=1, bind=Address(None, 0))
            ]
            self.server.send_result(req_id, ResultStatus.OK, bound=Address("0.0.0.0", 20000))
            events = self.client.receive_data(self.server.data_to_send(), self.now)
            assert len(events) == 1
            assert isinstance(events[0], ResultReceived)
            assert events[0].status == ResultStatus.OK

    def open(self, opener: Session | None = None, tunnel_id: int = 1) -> int:
        """Open a stream from ``opener`` (default: the server) and have the peer accept it."""
        opener = self.server if opener is None else opener
        sid = opener.open_stream(tunnel_id, ORIGIN, TARGET)
        self.send(opener)
        self.peer(opener).accept_stream(sid)
        self.send(self.peer(opener))
        return sid


def received_bytes(events: list[Event], stream_id: int) -> bytes:
    """Concatenate the DataReceived payloads of one stream."""
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


#: A client whose connection window is 1.5x its only stream window, with the smallest receive
#: budget (one stream window, spec §8.5 item 2) and no auto-tuning.
TIGHT_CONFIG = SessionConfig(
    settings=Settings(initial_stream_window=1 << 20, initial_conn_window=3 << 19),
    max_stream_window=1 << 20,
    max_conn_window=3 << 19,
    receive_budget=0,
)


def exhaust_connection_window(pair: SessionPair) -> list[int]:
    """Three streams whose unconsumed bytes use up a TIGHT_CONFIG client's connection window.

    The first stream's 1 MiB is within the budget; the next 1.5 MiB are held beyond it and
    keep their connection credit; the third stream has 512 KiB of stream credit left.
    """
    sids = [pair.open(), pair.open(), pair.open()]
    for sid, count in zip(sids, (16, 16, 8), strict=True):
        pair.client.receive_data(data_frame(sid, bytes(65536)) * count, pair.now)
    conn = pair.client.statistics()
    assert conn["conn_recv_buffered"] == 3 << 19  # kept: the whole connection window
    return sids
