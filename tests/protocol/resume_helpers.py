"""A resumable client/relay pair over a lossy pipe, for the session-resumption tests (spec §10.6).

``Link`` wires a client and a relay :class:`Session` back to back through two in-flight byte
buffers. ``write`` moves one ``data_to_send()`` batch of a side into its buffer, ``deliver``
hands a prefix of a buffer (any length: frames are cut anywhere) to the other side's
``receive_data``. ``cut`` loses both buffers, as a dead TCP connection loses what was written
but not read, and suspends both sessions (or only the client: the relay has not noticed yet).
``resume`` runs the real resume handshake: a fresh relay handshake session on the new
connection, RESUME + AUTH, RESULT(OK), then ``Session.resume`` on the old relay session and the
rotated TICKET.

An application model sits on both ends: the client accepts every stream, each side
acknowledges what it receives at once, and ``Model`` keeps what each side wrote and what the
other side's application got, per stream, so ``check`` can demand exactly-once, in-order
delivery of every byte and FIN.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from muxtunnel.errors import ErrorCode
from muxtunnel.protocol.constants import ACK_INTERVAL, AuthMethod, ResultStatus, Role
from muxtunnel.protocol.events import (
    AuthRequested,
    ChallengeReceived,
    DataReceived,
    Event,
    HelloReceived,
    ResultReceived,
    ResumeRequested,
    SessionResumed,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    TicketReceived,
)
from muxtunnel.protocol.frames import Address, Settings
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import ORIGIN, SERVER_NONCE, TARGET, make_credential

__all__ = [
    "CLIENT_CONFIG",
    "RESUME_AUTH_REQ",
    "RESUME_REQ",
    "SERVER_CONFIG",
    "TUNNEL",
    "WINDOW",
    "Link",
    "Model",
    "ticket_for",
]

#: Small, fixed windows so that the replay log's bound (spec §10.6) is tight enough to test.
WINDOW = 256 * 1024
_SETTINGS = {
    "initial_stream_window": 64 * 1024,
    "initial_conn_window": WINDOW,
    "resume_window": 60,
}
CLIENT_CONFIG = SessionConfig(
    settings=Settings(**_SETTINGS),
    max_stream_window=64 * 1024,
    max_conn_window=WINDOW,
)
SERVER_CONFIG = SessionConfig(
    settings=Settings(max_concurrent_streams=0, **_SETTINGS),
    max_stream_window=64 * 1024,
    max_conn_window=WINDOW,
)
RESUME_REQ = 0xFFFF_FFFF
RESUME_AUTH_REQ = 0xFFFF_FFFE
#: The bound tunnel.
TUNNEL = 1
#: Slack of the replay bound on top of window + ACK_INTERVAL: frame headers and control frames.
BOUND_SLACK = 64 * 1024


def ticket_for(n: int) -> bytes:
    """The n-th ticket the relay issues."""
    return n.to_bytes(4, "big") * 8


@dataclass
class Model:
    """What each side's application wrote and what the other side's application received."""

    #: (writer role, stream id) -> bytes written with send_data.
    sent: dict[tuple[Role, int], bytearray] = field(default_factory=dict)
    #: (receiver role, stream id) -> bytes received (DataReceived, in order).
    received: dict[tuple[Role, int], bytearray] = field(default_factory=dict)
    fin_sent: set[tuple[Role, int]] = field(default_factory=set)
    fin_received: set[tuple[Role, int]] = field(default_factory=set)
    #: Streams reset or refused (by either side).
    reset: set[int] = field(default_factory=set)
    #: Streams each side knows as open (OPEN sent / StreamOpened seen and accepted).
    live: dict[Role, set[int]] = field(
        default_factory=lambda: {Role.CLIENT: set(), Role.SERVER: set()}
    )
    opened_events: list[int] = field(default_factory=list)

    def check(self) -> None:
        """Every byte and FIN of every stream that was not reset arrived exactly once, in order."""
        for (writer, sid), data in self.sent.items():
            reader = Role.CLIENT if writer == Role.SERVER else Role.SERVER
            got = bytes(self.received.get((reader, sid), b""))
            if sid in self.reset:
                assert bytes(data).startswith(got), f"stream {sid}: not a prefix after RESET"
            else:
                assert got == bytes(data), (
                    f"stream {sid} {writer.name}->: {len(got)} != {len(data)}"
                )
        for writer, sid in self.fin_sent:
            reader = Role.CLIENT if writer == Role.SERVER else Role.SERVER
            if sid not in self.reset:
                assert (reader, sid) in self.fin_received, f"stream {sid}: FIN lost"
        for reader, sid in self.fin_received:
            writer = Role.CLIENT if reader == Role.SERVER else Role.SERVER
            assert (writer, sid) in self.fin_sent, f"stream {sid}: FIN nobody sent"
        assert len(self.opened_events) == len(set(self.opened_events)), "an OPEN arrived twice"


class Link:
    """A resumable client/relay pair over a lossy pipe (see the module docstring)."""

    def __init__(
        self,
        rng: random.Random | None = None,
        client_config: SessionConfig = CLIENT_CONFIG,
        server_config: SessionConfig = SERVER_CONFIG,
        *,
        handshake: bool = True,
    ) -> None:
        self.rng = rng if rng is not None else random.Random(0)
        self.client_config = client_config
        self.server_config = server_config
        self.client = Session(Role.CLIENT, client_config)
        self.server = Session(Role.SERVER, server_config)
        self.c2s = bytearray()
        self.s2c = bytearray()
        self.model = Model()
        self.now = 0.0
        self.tickets = 0
        self.ticket: bytes | None = None
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        self.resumes = 0
        self.max_replay = 0
        if handshake:
            self._handshake()

    # --- the pipe -------------------------------------------------------------------------

    def _buffer(self, src: Session) -> bytearray:
        return self.c2s if src is self.client else self.s2c

    def write(self, src: Session, max_bytes: int | None = None) -> int:
        """One data_to_send() batch of ``src`` into the pipe; returns its size."""
        out = src.data_to_send(max_bytes)
        self._buffer(src).extend(out)
        self._check_bound(src)
        return len(out)

    def deliver(self, dst: Session, n: int | None = None) -> list[Event]:
        """Hand ``n`` bytes (None: all) of the pipe towards ``dst`` to it; react to the events."""
        buf = self.s2c if dst is self.client else self.c2s
        n = len(buf) if n is None else min(n, len(buf))
        chunk = bytes(buf[:n])
        del buf[:n]
        events = dst.receive_data(chunk, self.now) if chunk else []
        self.react(dst, events)
        return events

    def pump(self, max_rounds: int = 100_000) -> None:
        """Move bytes both ways, whole batches, until both sides are quiet."""
        for _ in range(max_rounds):
            busy = False
            for src in (self.client, self.server):
                if src.wants_write():
                    self.write(src)
                    busy = True
            if self.c2s or self.s2c:
                busy = True
                self.deliver(self.server)
                self.deliver(self.client)
            if not busy:
                return
        raise AssertionError("Link.pump did not settle")

    def _check_bound(self, src: Session) -> None:
        """The replay log never exceeds the peer's connection window + ACK_INTERVAL, nor the
        sender's own bound (spec §10.6.2), by more than the slack."""
        size = src.replay_size
        self.max_replay = max(self.max_replay, size)
        peer = self.client_config if src is self.server else self.server_config
        bound = min(peer.max_conn_window + ACK_INTERVAL, src._max_replay) + BOUND_SLACK
        assert size <= bound, f"replay log of {size} bytes (bound {bound})"

    # --- application ----------------------------------------------------------------------

    def react(self, dst: Session, events: list[Event]) -> None:
        role = dst.role
        (self.client_events if role == Role.CLIENT else self.server_events).extend(events)
        model = self.model
        for event in events:
            if isinstance(event, DataReceived):
                model.received.setdefault((role, event.stream_id), bytearray()).extend(event.data)
                dst.acknowledge(event.stream_id, len(event.data), self.now)
            elif isinstance(event, StreamOpened):
                model.opened_events.append(event.stream_id)
                dst.accept_stream(event.stream_id)
                model.live[role].add(event.stream_id)
            elif isinstance(event, StreamEnded):
                model.fin_received.add((role, event.stream_id))
            elif isinstance(event, StreamReset | StreamRejected):
                model.reset.add(event.stream_id)
                model.live[role].discard(event.stream_id)
            elif isinstance(event, TicketReceived):
                self.ticket = event.ticket
                assert event.lifetime == 60
            elif isinstance(event, StreamAccepted):
                pass

    def open(self) -> int | None:
        """The relay opens a stream for a visitor (None if its limits say no now)."""
        if not self.server.can_open_stream():
            return None
        sid = self.server.open_stream(TUNNEL, ORIGIN, TARGET)
        self.model.live[Role.SERVER].add(sid)
        return sid

    def sendable(self, side: Session) -> list[int]:
        model = self.model
        return sorted(
            sid
            for sid in model.live[side.role]
            if (side.role, sid) not in model.fin_sent and sid not in model.reset
        )

    def send(self, side: Session, sid: int, data: bytes, fin: bool = False) -> None:
        side.send_data(sid, data, end_stream=fin)
        self.model.sent.setdefault((side.role, sid), bytearray()).extend(data)
        if fin:
            self.model.fin_sent.add((side.role, sid))

    def reset(self, side: Session, sid: int) -> None:
        side.reset_stream(sid, ErrorCode.CANCEL)
        self.model.reset.add(sid)
        self.model.live[side.role].discard(sid)

    # --- handshake, loss and resume -------------------------------------------------------

    def issue_ticket(self, session: Session) -> None:
        self.tickets += 1
        session.send_ticket(ticket_for(self.tickets), 60)

    def _handshake(self) -> None:
        client, server = self.client, self.server
        server.send_challenge(SERVER_NONCE)
        self.write(server)
        events = self.deliver(client)
        challenge = events[-1]
        assert isinstance(challenge, ChallengeReceived)
        client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential(server_nonce=challenge.nonce))
        client.send_bind(2, TUNNEL, Address(None, 0))
        self.write(client)
        events = self.deliver(server)
        auth = events[-1]
        assert isinstance(auth, AuthRequested)
        assert server.resume_enabled
        assert client.resume_enabled
        server.send_result(auth.req_id, ResultStatus.OK)
        self.issue_ticket(server)
        events = server.receive_data(b"", self.now)  # the BIND held behind the AUTH
        self.react(server, events)
        server.send_result(2, ResultStatus.OK, bound=Address("0.0.0.0", 20000))
        self.pump()
        assert self.ticket == ticket_for(1)
        assert client.tunnel_is_bound(TUNNEL)

    def cut(self, *, relay_notices: bool = True) -> None:
        """The connection dies: what is in flight is lost; the client (and relay) suspend."""
        self.c2s.clear()
        self.s2c.clear()
        self.client.suspend()
        if relay_notices and not self.server.suspended:
            self.server.suspend()

    def resume(self, *, fail_at: int | None = None) -> bool:
        """Run the resume handshake on a new connection; True once RESUMED arrived.

        ``fail_at``: the new connection dies after that many handshake steps (0-3); the sessions
        are suspended again and False is returned.
        """
        client = self.client
        hs = Session(Role.SERVER, self.server_config)  # the relay's handshake session
        hs.send_challenge(SERVER_NONCE)
        client.begin_resume()
        pipe_c = bytearray(client.data_to_send())
        pipe_s = bytearray(hs.data_to_send())
        if fail_at == 0:
            return self._failed(hs)
        events = client.receive_data(bytes(pipe_s), self.now)
        assert [type(e) for e in events] == [HelloReceived, ChallengeReceived]
        assert isinstance(events[1], ChallengeReceived)
        assert self.ticket is not None
        client.send_resume(RESUME_REQ, self.ticket)
        client.send_auth(
            RESUME_AUTH_REQ, AuthMethod.HMAC_SHA256, make_credential(server_nonce=events[1].nonce)
        )
        pipe_c += client.data_to_send()
        if fail_at == 1:
            return self._failed(hs)
        events = hs.receive_data(bytes(pipe_c), self.now)
        assert [type(e) for e in events] == [HelloReceived, ResumeRequested, AuthRequested]
        request = events[1]
        assert isinstance(request, ResumeRequested)
        assert request.ticket == self.ticket
        assert hs.input_paused
        hs.send_result(RESUME_AUTH_REQ, ResultStatus.OK)
        assert hs.receive_data(b"", self.now) == []
        if fail_at == 2:
            return self._failed(hs)
        events = client.receive_data(hs.data_to_send(), self.now)
        assert [type(e) for e in events] == [ResultReceived]
        # The relay: the old session continues on this connection; the fresh one is dropped.
        assert self.server.can_resume(request.received)
        self.server.resume(RESUME_REQ, request.received)
        self.issue_ticket(self.server)
        if fail_at == 3:  # dies right after RESUMED was written: nothing of it arrives
            self.write(self.server)
            self.s2c.clear()
            return self._failed(hs)
        self.write(self.server)
        events = self.deliver(client)
        assert isinstance(events[0], SessionResumed)
        self.resumes += 1
        return True

    def _failed(self, hs: Session) -> bool:
        del hs  # the relay drops its handshake session with the connection
        self.cut()
        return False
