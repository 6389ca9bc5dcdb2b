"""The relay's side of session resumption (protocol-spec.md §10.6) over real TLS on loopback.

The relay is the real one (``serve``, in-process). Its clients are built from muxtunnel's own
parts: a :class:`~muxtunnel.connection.MuxConnection` that authenticates and binds with
:func:`~muxtunnel.handshake.client_handshake` and resumes with ``resume_over``, reaching the
relay through :class:`Link`, a TCP forwarder whose connections the test can cut (both ends
see the connection reset, as after a network outage). A raw client (:func:`raw_resume`) sends
a RESUME with any ticket, to see how the relay answers stale, foreign and dead tickets without
disturbing a real session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import struct
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_client import generate_latest

from muxtunnel import tls
from muxtunnel.config import ServerConfig, build_server_config, load_toml
from muxtunnel.connection import (
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    ResumeRefusedError,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import AuthError, ConfigError
from muxtunnel.handshake import client_credential, client_handshake
from muxtunnel.metrics import make_registry
from muxtunnel.protocol.constants import (
    MAGIC,
    MAX_RESUME_WINDOW,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    ResultStatus,
    Role,
)
from muxtunnel.protocol.frames import (
    AuthFrame,
    ChallengeFrame,
    CloseFrame,
    HelloFrame,
    ResultFrame,
    ResumeFrame,
    Settings,
    encode_frame,
)
from muxtunnel.protocol.reader import FrameReader
from muxtunnel.server import ServerInfo, serve
from muxtunnel.stats import Stats
from muxtunnel.tickets import TicketBook
from muxtunnel.tokens import token_id
from tests.conftest import TOKEN, free_port_range

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from tests.waiting import LogWatch

OTHER = "other-token-for-the-resume-tests-0123456789"
#: What the test clients declare in HELLO (the relay's own window is the smaller one).
CLIENT_WINDOW = 120
_RST = struct.pack("ii", 1, 0)


# --------------------------------------------------------------------------------------------
# A cuttable link between the clients and the relay


def _reset_on_close(sock: trio.SocketStream) -> None:
    try:
        sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    except OSError:
        pass


@dataclass
class _Pair:
    near: trio.SocketStream  # the client's side
    far: trio.SocketStream  # the relay's side
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Leave the relay's side open and silent (the relay does not notice the cut).
    keep_far: bool = False


@dataclass
class Link:
    """A TCP forwarder to the relay; :meth:`cut` resets the connections through it."""

    target: int
    port: int = 0
    _pairs: list[_Pair] = field(default_factory=list)
    #: Relay-side sockets left open by ``cut(relay_notices=False)``; closed at the end.
    _kept: list[trio.SocketStream] = field(default_factory=list)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                await trio.serve_listeners(self._forward, listeners, handler_nursery=nursery)
        finally:
            for sock in self._kept:
                sock.socket.close()

    async def _forward(self, near: trio.SocketStream) -> None:
        try:
            pair = _Pair(near, await trio.open_tcp_stream("127.0.0.1", self.target))
        except BaseException:
            near.socket.close()
            raise
        self._pairs.append(pair)
        try:
            with pair.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, near, pair.far)
                    nursery.start_soon(self._pump, pair.far, near)
        finally:
            # Closed without a checkpoint: both legs close even when the test is torn down.
            near.socket.close()
            if pair.keep_far:
                self._kept.append(pair.far)
            else:
                pair.far.socket.close()

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def cut(self, *, relay_notices: bool = True) -> None:
        """Reset the client's side of every connection through the link (an outage), and the
        relay's side too unless ``relay_notices`` is False (then the relay's side stays open
        and silent, like a connection behind a NAT mapping that changed)."""
        for pair in self._pairs:
            _reset_on_close(pair.near)
            if relay_notices:
                _reset_on_close(pair.far)
            pair.keep_far = not relay_notices
            pair.scope.cancel()
        self._pairs.clear()


# --------------------------------------------------------------------------------------------
# The relay and a client built from MuxConnection


@dataclass
class Relay:
    info: ServerInfo
    stats: Stats
    config: ServerConfig

    def session(self) -> dict[str, object]:
        (session,) = self.stats.snapshot()["sessions"]
        assert isinstance(session, dict)
        return session

    def counter(self, name: str) -> int:
        return int(self.stats.counters[name])


async def start_relay(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    reload_config: Callable[[], ServerConfig] | None = None,
    **overrides: object,
) -> Relay:
    config = ServerConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        port_range=free_port_range(),
        bind_host="127.0.0.1",
        tokens=(TOKEN, OTHER),
        state_dir=tmp_path / "relay",
        lease_seconds=60.0,
        drain_timeout=2.0,
        handshake_timeout=10.0,
    )
    config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
    stats = Stats("relay")
    info = await nursery.start(
        partial(serve, config, report=lambda _: None, stats=stats, reload_config=reload_config)
    )
    assert isinstance(info, ServerInfo)
    return Relay(info, stats, config)


async def dial(port: int, host: str = "127.0.0.1") -> trio.abc.Stream:
    """TCP + TLS to ``port`` (the test's own relay: no identity check needed)."""
    tcp = await trio.open_tcp_stream(host, port)
    stream = wrap_tls(tcp, tls.client_ssl_context(), server_hostname=host)
    await stream.do_handshake()
    return stream


async def _echo_stream(stream: MuxStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()
    except trio.BrokenResourceError:
        pass


async def _serve_streams(conn: MuxConnection) -> None:
    """Answer every stream the relay opens with an echo."""
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await conn.accept_stream()
            except MuxSessionClosedError:
                return
            stream.accept()
            nursery.start_soon(_echo_stream, stream)


@dataclass
class Client:
    conn: MuxConnection
    token: str
    port: int  # the public port of its tunnel

    def authenticate(self, nonce: bytes, minor: int) -> tuple[int, bytes]:
        return client_credential(self.token, nonce, minor)

    async def resume(self, link: Link) -> None:
        with trio.fail_after(15):
            await self.conn.resume_over(await dial(link.port), self.authenticate)


async def start_client(nursery: trio.Nursery, link: Link, token: str = TOKEN) -> Client:
    """A session with one echo tunnel on a port the relay picks; waits for its ticket."""
    session = make_session(Role.CLIENT, settings_overrides={"resume_window": CLIENT_WINDOW})
    conn = MuxConnection(await dial(link.port), session, name="test client")
    await nursery.start(conn.run)
    with trio.fail_after(15):
        (outcome,) = await client_handshake(conn, token, [(1, 0, None)])
    assert outcome.ok
    assert outcome.bound is not None
    # TICKET comes right after the AUTH's RESULT, so before the BIND's.
    assert conn.ticket is not None
    nursery.start_soon(_serve_streams, conn)
    return Client(conn, token, outcome.bound.port)


async def connect(nursery: trio.Nursery, relay: Relay) -> tuple[Link, Client]:
    """A cuttable link to ``relay`` and a client session over it (:func:`start_client`)."""
    link = Link(relay.info.port)
    await nursery.start(link.run)
    return link, await start_client(nursery, link)


async def seen(logs: LogWatch, text: str, count: int = 1) -> str:
    """The ``count``-th log message containing ``text`` (waits up to 15 s)."""
    with trio.fail_after(15):
        return await logs.wait_for(text, count=count)


#: The relay's log line when a session loses its connection.
SUSPENDED = "s for a resume ("


async def cut_and_wait(link: Link, relay: Relay, client: Client, logs: LogWatch) -> None:
    """An outage: both sides keep the session, suspended."""
    count = len(logs.matching(SUSPENDED)) + 1
    link.cut()
    with trio.fail_after(15):
        await client.conn.wait_suspended()
    await seen(logs, SUSPENDED, count)
    session = relay.session()
    assert session["state"] == "suspended"
    assert isinstance(session["replay"], int)  # bytes held for the replay


class Visitor:
    """A connection to a public port that checks the echo of what it sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def expect(self, data: bytes) -> None:
        got = b""
        with trio.fail_after(15):
            while len(got) < len(data):
                chunk = await self.stream.receive_some(len(data) - len(got))
                assert chunk, f"visitor stream ended after {got!r}"
                got += chunk
        assert got == data

    async def ended(self) -> bool:
        """True once the relay closed or reset the visitor's connection."""
        with trio.fail_after(15):
            try:
                return await self.stream.receive_some(1024) == b""
            except trio.BrokenResourceError:
                return True


@pytest.fixture
async def visit() -> AsyncIterator[Callable[[int], Awaitable[Visitor]]]:
    """Connects a :class:`Visitor` to a public port; every one is closed after the test."""
    opened: list[Visitor] = []

    async def connect(port: int) -> Visitor:
        opened.append(Visitor(await trio.open_tcp_stream("127.0.0.1", port)))
        return opened[-1]

    yield connect
    for visitor in opened:
        await trio.aclose_forcefully(visitor.stream)


# --------------------------------------------------------------------------------------------
# A raw client: RESUME with any ticket


async def raw_resume(
    port: int, token: str, ticket: bytes, received: int = 0, host: str = "127.0.0.1"
) -> tuple[int, int]:
    """Connect, send RESUME(ticket, received) then AUTH; return (AUTH status, RESUME status).

    A refused resume leaves an ordinary new session: it is closed with CLOSE(NO_ERROR).
    """
    stream = await dial(port, host)
    reader = FrameReader(max_data_payload=1 << 20, max_control_payload=1 << 16)
    settings = Settings(resume_window=CLIENT_WINDOW)
    hello = HelloFrame(
        major=PROTOCOL_MAJOR, minor=PROTOCOL_MINOR, role=Role.CLIENT, settings=settings.to_pairs()
    )
    results: dict[int, int] = {}
    async with stream:
        await stream.send_all(MAGIC + encode_frame(hello))
        nonce: bytes | None = None
        with trio.fail_after(15):
            while nonce is None:
                for frame in reader.read_frames(await stream.receive_some(65536)):
                    if isinstance(frame, ChallengeFrame):
                        nonce = frame.nonce
            method, credential = client_credential(token, nonce, PROTOCOL_MINOR)
            await stream.send_all(
                encode_frame(ResumeFrame(req_id=2, ticket=ticket, received=received))
                + encode_frame(AuthFrame(req_id=1, method=method, credential=credential))
            )
            while len(results) < 2:
                data = await stream.receive_some(65536)
                if not data:
                    break
                for frame in reader.read_frames(data):
                    if isinstance(frame, ResultFrame):
                        results[frame.req_id] = frame.status
                    elif isinstance(frame, CloseFrame):
                        return results.get(1, -1), results.get(2, -1)
            with contextlib.suppress(trio.BrokenResourceError):  # refused as a session too
                await stream.send_all(encode_frame(CloseFrame(error_code=0, message="done")))
    return results[1], results[2]


# --------------------------------------------------------------------------------------------
# Tests


async def test_resume_continues_streams_and_queued_visitors(
    nursery: trio.Nursery,
    tmp_path: Path,
    logs: LogWatch,
    visit: Callable[[int], Awaitable[Visitor]],
) -> None:
    relay = await start_relay(nursery, tmp_path, max_sessions_per_token=1, resume_window=30.0)
    link, client = await connect(nursery, relay)
    first_ticket = client.conn.ticket
    assert client.conn.resume_window == 30.0  # the smaller of the two windows

    before = await visit(client.port)
    await before.send(b"before the outage")
    await before.expect(b"before the outage")

    await cut_and_wait(link, relay, client, logs)
    await seen(logs, "session kept 30 s for a resume")
    # The public port stays bound while the session waits: visitors queue.
    await before.send(b"sent during the outage")
    during = await visit(client.port)
    await during.send(b"a visitor that came during the outage")

    await client.resume(link)
    line = await seen(logs, "resumed after")
    assert "2 streams continued" in line
    await before.expect(b"sent during the outage")
    await during.expect(b"a visitor that came during the outage")
    await before.send(b"after")
    await before.expect(b"after")

    # A resume is no new session: the limit of one session per token was not in the way.
    assert relay.counter("resumes") == 1
    assert relay.counter("sessions_total") == 1
    session = relay.session()
    assert session["state"] == "up"
    assert session["resumes"] == 1
    # A fresh ticket came after RESUMED (so before the echo of "after").
    assert client.conn.ticket not in (None, first_ticket)

    # And again: the session survives a second outage the same way.
    await cut_and_wait(link, relay, client, logs)
    await client.resume(link)
    await before.send(b"second")
    await before.expect(b"second")
    assert relay.counter("resumes") == 2
    assert relay.counter("resume_refusals") == 0
    scrape = generate_latest(make_registry(relay.stats)).decode()
    assert 'muxtunnel_resumes_total{role="relay"} 2.0' in scrape
    assert 'muxtunnel_resume_refusals_total{role="relay"} 0.0' in scrape


async def test_stale_and_foreign_tickets_are_unknown(
    nursery: trio.Nursery,
    tmp_path: Path,
    logs: LogWatch,
    visit: Callable[[int], Awaitable[Visitor]],
) -> None:
    relay = await start_relay(nursery, tmp_path)
    link, client = await connect(nursery, relay)
    tickets = [client.conn.ticket]
    for _ in range(2):
        await cut_and_wait(link, relay, client, logs)
        await client.resume(link)
        visitor = await visit(client.port)  # the new TICKET came before its echo
        await visitor.send(b"x")
        await visitor.expect(b"x")
        assert client.conn.ticket not in (None, *tickets)
        tickets.append(client.conn.ticket)
    t0, _t1, t2 = tickets
    assert t0 is not None
    assert t2 is not None

    await cut_and_wait(link, relay, client, logs)
    ok, unknown = int(ResultStatus.OK), int(ResultStatus.TICKET_UNKNOWN)
    # Two resumes old: dead. Never issued: unknown. The live ticket with another token's AUTH:
    # the same answer, and the ticket stays good for its own token.
    assert await raw_resume(relay.info.port, TOKEN, t0) == (ok, unknown)
    assert await raw_resume(relay.info.port, TOKEN, os.urandom(32)) == (ok, unknown)
    assert await raw_resume(relay.info.port, OTHER, t2) == (ok, unknown)
    assert relay.counter("resume_refusals") == 3
    assert len(logs.matching("resume refused")) == 3
    await client.resume(link)
    visitor = await visit(client.port)
    await visitor.send(b"still the same session")
    await visitor.expect(b"still the same session")
    assert relay.counter("resumes") == 3
    # Tickets never reach the log.
    for ticket in tickets:
        assert ticket is not None
        assert not any(ticket.hex() in line for line in logs.matching(""))


async def test_window_end_ends_the_session_and_its_streams(
    nursery: trio.Nursery,
    tmp_path: Path,
    logs: LogWatch,
    visit: Callable[[int], Awaitable[Visitor]],
) -> None:
    relay = await start_relay(nursery, tmp_path, resume_window=2.0)
    link, client = await connect(nursery, relay)
    ticket = client.conn.ticket
    assert ticket is not None
    visitor = await visit(client.port)
    await visitor.send(b"hello")
    await visitor.expect(b"hello")

    await cut_and_wait(link, relay, client, logs)
    await seen(logs, "without a resume")
    assert await visitor.ended()
    assert relay.stats.snapshot()["sessions"] == []
    assert await raw_resume(relay.info.port, TOKEN, ticket) == (
        int(ResultStatus.OK),
        int(ResultStatus.TICKET_UNKNOWN),
    )
    # The port went back to its token for the lease time, as for any session that ended.
    await seen(logs, f"port {client.port} kept for its token")


async def test_reload_removing_the_token_ends_a_suspended_session(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    configs: list[ServerConfig] = []
    relay = await start_relay(nursery, tmp_path, reload_config=lambda: configs.pop(0))
    configs += [
        dataclasses.replace(relay.config, tokens=(TOKEN,)),
        dataclasses.replace(relay.config, tokens=(TOKEN, OTHER)),
    ]
    link = Link(relay.info.port)
    await nursery.start(link.run)
    client = await start_client(nursery, link, OTHER)
    ticket = client.conn.ticket
    assert ticket is not None
    await cut_and_wait(link, relay, client, logs)

    os.kill(os.getpid(), signal.SIGHUP)  # OTHER removed
    await seen(logs, f"token {token_id(OTHER)} revoked")
    await seen(logs, "without a resume")  # at once, not at the window's end
    assert relay.stats.snapshot()["sessions"] == []
    with pytest.raises(AuthError):
        await client.resume(link)
    # Its port is free at once, not kept for the lease.
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", client.port)

    os.kill(os.getpid(), signal.SIGHUP)  # OTHER accepted again: its old ticket stays dead
    await seen(logs, "reloaded: 2 tokens; added")
    assert await raw_resume(relay.info.port, OTHER, ticket) == (
        int(ResultStatus.OK),
        int(ResultStatus.TICKET_UNKNOWN),
    )


async def test_a_fresh_session_takes_the_ports_of_a_suspended_one(
    nursery: trio.Nursery,
    tmp_path: Path,
    logs: LogWatch,
    visit: Callable[[int], Awaitable[Visitor]],
) -> None:
    relay = await start_relay(nursery, tmp_path, max_sessions_per_token=1)
    link, client = await connect(nursery, relay)
    ticket = client.conn.ticket
    assert ticket is not None
    await cut_and_wait(link, relay, client, logs)
    client.conn.close()  # the client gave up (or restarted): it starts a fresh session
    # The suspended session cannot answer a probe: the fresh one is admitted at once and gets
    # the same port back (tunnel 1, port 0), and the suspended session ends.
    fresh = await start_client(nursery, link)
    assert fresh.port == client.port
    await seen(logs, "replaced by a new session of the same token")
    await seen(logs, "without a resume")
    assert relay.session()["state"] == "up"
    visitor = await visit(fresh.port)
    await visitor.send(b"the fresh session")
    await visitor.expect(b"the fresh session")
    assert await raw_resume(relay.info.port, TOKEN, ticket) == (
        int(ResultStatus.OK),
        int(ResultStatus.TICKET_UNKNOWN),
    )


async def test_a_refused_resume_does_not_evict_the_suspended_session(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path, max_sessions_per_token=1)
    link, client = await connect(nursery, relay)
    await cut_and_wait(link, relay, client, logs)
    # A refused RESUME leaves a new session, which must not make room for itself by ending
    # the suspended one: at the limit it is refused instead.
    assert await raw_resume(relay.info.port, TOKEN, os.urandom(32)) == (
        int(ResultStatus.OK),
        int(ResultStatus.TICKET_UNKNOWN),
    )
    await seen(logs, "already has 1 sessions")
    await client.resume(link)
    assert relay.counter("resumes") == 1
    assert relay.counter("sessions_total") == 1


async def test_resume_takes_over_a_connection_the_relay_thinks_is_up(
    nursery: trio.Nursery,
    tmp_path: Path,
    logs: LogWatch,
    visit: Callable[[int], Awaitable[Visitor]],
) -> None:
    relay = await start_relay(nursery, tmp_path)
    link, client = await connect(nursery, relay)
    visitor = await visit(client.port)
    await visitor.send(b"before")
    await visitor.expect(b"before")
    link.cut(relay_notices=False)  # the relay's side stays open: it sees no loss
    with trio.fail_after(15):
        await client.conn.wait_suspended()
    await visitor.send(b"while the relay thinks all is well")
    await client.resume(link)
    await visitor.expect(b"while the relay thinks all is well")
    line = await seen(logs, "resumed after 0.0 s")
    assert "1 streams continued" in line
    assert not logs.matching(SUSPENDED)  # the relay never saw the old connection fail
    assert relay.counter("resumes") == 1
    assert relay.session()["state"] == "up"


async def test_offsets_that_do_not_fit_end_the_session(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path)
    link, client = await connect(nursery, relay)
    ticket = client.conn.ticket
    assert ticket is not None
    await cut_and_wait(link, relay, client, logs)
    # The right ticket, but "received" beyond anything the relay sent: RESUME_FAILED, and the
    # old session is over for good (its ticket with it).
    assert await raw_resume(relay.info.port, TOKEN, ticket, received=1 << 40) == (
        int(ResultStatus.OK),
        int(ResultStatus.RESUME_FAILED),
    )
    await seen(logs, "without a resume (closed locally: PROTOCOL_ERROR: resume failed")
    with pytest.raises(ResumeRefusedError) as refused:
        await client.resume(link)
    assert refused.value.status == ResultStatus.TICKET_UNKNOWN
    assert relay.counter("resume_refusals") == 2
    assert relay.counter("resumes") == 0


def test_resume_window_option(tmp_path: Path) -> None:
    base = {"state-dir": str(tmp_path), "token": ["t"]}
    # Default: the lease time (capped at a week); 0 turns resumption off.
    assert build_server_config({**base, "lease": 120}, {}, env={}).resume_seconds() == 120
    assert build_server_config(base, {}, env={}).resume_seconds() == 60
    forever = build_server_config({**base, "lease": 86400 * 30}, {}, env={})
    assert forever.resume_seconds() == MAX_RESUME_WINDOW
    path = tmp_path / "relay.toml"
    path.write_text("[server]\nresume_window = 0\n", encoding="utf-8")
    off = build_server_config({**base, **load_toml(path, "server")}, {}, env={})
    assert off.resume_seconds() == 0
    flag = build_server_config(base, {"resume-window": 7.5}, env={})
    assert flag.resume_seconds() == 7.5
    for bad in (-1, MAX_RESUME_WINDOW + 1, "soon", True):
        with pytest.raises(ConfigError, match="resume-window"):
            build_server_config(base, {"resume-window": bad}, env={})


def test_ticket_book_rules() -> None:
    now = [100.0]
    book: TicketBook[str] = TicketBook(lambda: now[0])
    t0 = book.issue("alice", "s1")
    assert book.lookup(t0, "alice") == "s1"
    assert book.lookup(t0, "bob") is None
    assert not book.claimed("s1")
    assert book.claim(t0, "alice") == "s1"
    assert book.claimed("s1")
    assert book.lookup(t0, "alice") is None  # claimed by a resume under way
    book.unclaim("s1")
    assert book.claim(t0, "alice") == "s1"
    t1 = book.rotate("s1")
    assert t1 is not None
    # The presented ticket stays good (the new one may be lost); older ones die.
    assert book.lookup(t0, "alice") == "s1"
    assert book.claim(t1, "alice") == "s1"
    t2 = book.rotate("s1")
    assert t2 is not None
    assert book.lookup(t0, "alice") is None
    assert book.lookup(t1, "alice") == "s1"
    assert len(book) == 2
    book.suspended("s1", 5.0)
    now[0] += 5.0
    assert book.lookup(t2, "alice") is None  # the window passed: every ticket dead
    assert not book.holds("s1")
    t3 = book.issue("bob", "s2")
    book.issue("bob", "s3")
    assert book.revoke_token("bob") == 2
    assert book.lookup(t3, "bob") is None
    assert len(book) == 0
