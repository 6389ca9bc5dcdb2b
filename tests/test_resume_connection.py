"""MuxConnection across transports: suspend on loss, attach / resume_over, window expiry.

Real TLS over loopback TCP. Each link runs through a small in-process proxy so that a test can
cut it like a network would: both legs reset (both ends notice), or only one leg reset while
the other stays open and silent (a NAT rebinding: one end still thinks the path is alive).
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import struct
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from muxtunnel.connection import (
    FailureKind,
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    MuxStreamResetError,
    ResumeRefusedError,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import ErrorCode, HandshakeError
from muxtunnel.handshake import authenticate_client, client_credential, client_handshake
from muxtunnel.protocol.constants import ResultStatus, Role
from muxtunnel.protocol.events import BindRequested, Event, ResumeRequested
from muxtunnel.protocol.frames import Address
from muxtunnel.tls import client_ssl_context, load_or_create_identity, server_ssl_context
from muxtunnel.tokens import plaintext_entry
from tests.conftest import TOKEN

if TYPE_CHECKING:
    from muxtunnel.tls import ServerIdentity

WINDOW = 30
TUNNELS = range(1, 5)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> ServerIdentity:
    return load_or_create_identity(tmp_path_factory.mktemp("relay"))


# --------------------------------------------------------------------------------------------
# A cuttable loopback path: client TCP <-> [proxy leg a | proxy leg b] <-> relay TCP


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        near = await trio.open_tcp_stream("127.0.0.1", port)
        far = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    assert isinstance(far, trio.SocketStream)
    return near, far


def _reset(stream: trio.SocketStream) -> None:
    """Close the socket with an RST (SO_LINGER 0), as a dropped path eventually shows."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@dataclass
class Link:
    """One TCP path through the proxy; ``client``/``relay`` are the ends the peers use."""

    client: trio.SocketStream
    relay: trio.SocketStream
    leg_a: trio.SocketStream  # the proxy's end facing the client
    leg_b: trio.SocketStream  # the proxy's end facing the relay
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @classmethod
    async def open(cls, nursery: trio.Nursery) -> Link:
        client, leg_a = await _tcp_pair()
        leg_b, relay = await _tcp_pair()
        link = cls(client, relay, leg_a, leg_b)
        nursery.start_soon(link._run)
        return link

    async def _run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as n:
                    n.start_soon(_pump, self.leg_a, self.leg_b)
                    n.start_soon(_pump, self.leg_b, self.leg_a)
            await trio.sleep_forever()  # a leg left open stays silent until the test ends
        finally:
            for end in (self.leg_a, self.leg_b, self.client, self.relay):
                end.socket.close()

    def cut(self, *, client_notices: bool = True, relay_notices: bool = True) -> None:
        """Stop forwarding; reset the legs whose end should notice (the others stay silent)."""
        self.scope.cancel()
        if client_notices:
            _reset(self.leg_a)
        if relay_notices:
            _reset(self.leg_b)


def _tls(
    identity: ServerIdentity, link: Link, kind: str
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """(relay end, client end) TLS streams over ``link``; the relay's is ``kind`` (ours/trio)."""
    if kind == "trio":
        relay: trio.abc.Stream = trio.SSLStream(
            link.relay, server_ssl_context(identity), server_side=True
        )
    else:
        relay = wrap_tls(link.relay, server_ssl_context(identity), server_side=True)
    client = wrap_tls(link.client, client_ssl_context(), server_hostname="localhost")
    return relay, client


def _conn(
    transport: trio.abc.Stream, role: Role, window: int, name: str, idle: float | None = None
) -> MuxConnection:
    session = make_session(role, idle_timeout=idle, settings_overrides={"resume_window": window})
    return MuxConnection(transport, session, name=name)


# --------------------------------------------------------------------------------------------
# Building and resuming sessions


async def _relay_auth(server: MuxConnection, window: int) -> None:
    await authenticate_client(server, [plaintext_entry(TOKEN)])
    if window:
        server.send_ticket(secrets.token_bytes(32), window)
    for _ in TUNNELS:
        event = await server.next_control_event()
        assert isinstance(event, BindRequested)
        server.send_result(event.req_id, ResultStatus.OK, "", Address("127.0.0.1", 40000))


async def session_pair(
    nursery: trio.Nursery,
    identity: ServerIdentity,
    *,
    window: int = WINDOW,
    kind: str = "ours",
    idle: float | None = None,
) -> tuple[MuxConnection, MuxConnection, Link]:
    """A relay-side and a client-side connection over a cuttable link, authenticated."""
    link = await Link.open(nursery)
    t_relay, t_client = _tls(identity, link, kind)
    server = _conn(t_relay, Role.SERVER, window, "relay", idle)
    client = _conn(t_client, Role.CLIENT, window, "client", idle)
    await nursery.start(server.run)
    await nursery.start(client.run)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(_relay_auth, server, window)
            n.start_soon(client_handshake, client, TOKEN, [(t, 0, None) for t in TUNNELS])
    # The TICKET came before the BIND results, so the client holds it now.
    assert client.resumable == bool(window)
    assert server.resumable == bool(window)
    return server, client, link


async def hand_over(
    nursery: trio.Nursery,
    identity: ServerIdentity,
    server: MuxConnection,
    client: MuxConnection,
    *,
    kind: str = "ours",
) -> Link:
    """Resume the pair on a new link: the relay's handshake connection releases its transport
    to ``server.attach``; the client runs ``resume_over``."""
    link = await Link.open(nursery)
    t_relay, t_client = _tls(identity, link, kind)
    handshake = _conn(t_relay, Role.SERVER, WINDOW, "relay-handshake")
    await nursery.start(handshake.run)
    old_ticket = server.ticket
    requests: list[ResumeRequested] = []

    def note(event: Event) -> None:
        if isinstance(event, ResumeRequested):
            requests.append(event)

    async def relay_side() -> None:
        await authenticate_client(handshake, [plaintext_entry(TOKEN)], before_auth=note)
        (request,) = requests
        assert request.ticket == old_ticket
        transport = await handshake.release_transport()
        assert transport is t_relay
        server.attach(transport, req_id=request.req_id, peer_received=request.received)
        server.send_ticket(secrets.token_bytes(32), WINDOW)

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(relay_side)
            n.start_soon(client.resume_over, t_client, partial(client_credential, TOKEN))
    assert handshake.closed
    assert handshake.close_reason is not None
    assert "handed over" in handshake.close_reason
    return link


async def stream_pairs(
    server: MuxConnection, client: MuxConnection, n: int
) -> list[tuple[MuxStream, MuxStream]]:
    pairs = []
    for i in range(n):
        await server.wait_open_slot()
        s = server.open_stream(
            1 + i % len(TUNNELS), Address("127.0.0.1", 40000 + i), Address("127.0.0.1", 20000)
        )
        c = await client.accept_stream()
        c.accept()
        pairs.append((s, c))
    return pairs


def pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    rotated = (block[seed % 4096 :] + block[: seed % 4096]) * (size // len(block) + 1)
    return rotated[:size]


async def send_all_of(stream: MuxStream, data: bytes, *, eof: bool = True) -> None:
    view = memoryview(data)
    for offset in range(0, len(data), 50_000):
        await stream.send_all(view[offset : offset + 50_000])
    if eof:
        await stream.send_eof()


class Progress:
    """Bytes received so far on some streams; ``reached`` is set at ``threshold``."""

    def __init__(self, threshold: int) -> None:
        self.count = 0
        self.threshold = threshold
        self.reached = trio.Event()

    def add(self, n: int) -> None:
        self.count += n
        if self.count >= self.threshold:
            self.reached.set()


async def receive_all(stream: MuxStream, progress: Progress | None = None) -> bytes:
    parts = []
    while chunk := await stream.receive_some(65536):
        parts.append(chunk)
        if progress is not None:
            progress.add(len(chunk))
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("kind", ["ours", "trio"])
async def test_bulk_both_ways_survives_cut(
    nursery: trio.Nursery, identity: ServerIdentity, kind: str
) -> None:
    """Several streams carry bulk both ways; the TCP path is reset mid-transfer; a new
    connection takes over (attach / resume_over) and every byte arrives once, in order."""
    server, client, link = await session_pair(nursery, identity, kind=kind)
    pairs = await stream_pairs(server, client, 4)
    size = 3 * MiB
    results: dict[tuple[str, int], bytes] = {}
    # Cut once a third of the relay->client bytes arrived: mid-transfer both ways.
    progress = Progress(len(pairs) * size // 3)

    async def down(i: int, s: MuxStream, c: MuxStream) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(send_all_of, s, pattern(size, i))
            results["down", i] = await receive_all(c, progress)

    async def up(i: int, s: MuxStream, c: MuxStream) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(send_all_of, c, pattern(size, 100 + i))
            results["up", i] = await receive_all(s)

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for i, (s, c) in enumerate(pairs):
                n.start_soon(down, i, s, c)
                n.start_soon(up, i, s, c)
            await progress.reached.wait()
            assert server.suspensions == 0
            link.cut()
            await server.wait_suspended()
            await client.wait_suspended()
            assert (server.suspended, client.suspended) == (True, True)
            assert server.resume_deadline is not None
            await hand_over(nursery, identity, server, client, kind=kind)
            assert (server.suspended, client.suspended) == (False, False)
    for i in range(len(pairs)):
        assert results["down", i] == pattern(size, i)
        assert results["up", i] == pattern(size, 100 + i)
    assert (server.suspensions, server.resumes) == (1, 1)
    assert (client.suspensions, client.resumes) == (1, 1)
    assert not server.closed
    assert not client.closed
    # The session goes on: a new stream works on the new connection.
    ((s, c),) = await stream_pairs(server, client, 1)
    with trio.fail_after(20):
        await s.send_all(b"after")
        assert await c.receive_some(5) == b"after"


async def test_fin_and_reset_across_cut(nursery: trio.Nursery, identity: ServerIdentity) -> None:
    """FIN and RESET queued at or during the cut reach the peer once the session resumes."""
    server, client, link = await session_pair(nursery, identity)
    (a_s, a_c), (b_s, b_c), (c_s, c_c), (d_s, d_c) = await stream_pairs(server, client, 4)
    # In flight at the cut (may be lost in the path, then replayed).
    await a_s.send_all(b"before-cut")
    await a_s.send_eof()
    link.cut()
    await server.wait_suspended()
    await client.wait_suspended()
    # Queued while suspended: local API calls keep working.
    await b_s.send_all(b"while-suspended")
    b_s.reset(ErrorCode.CANCEL)
    await c_c.send_all(b"up-while-suspended")
    await c_c.send_eof()
    d_c.reset(ErrorCode.INTERNAL_ERROR)
    new_s = server.open_stream(1, Address("127.0.0.1", 40100), Address("127.0.0.1", 20000))
    await new_s.send_all(b"opened-while-suspended")
    await new_s.send_eof()
    await hand_over(nursery, identity, server, client)
    with trio.fail_after(20):
        assert await receive_all(a_c) == b"before-cut"
        with pytest.raises(MuxStreamResetError) as info:
            await receive_all(b_c)
        assert info.value.error_code == ErrorCode.CANCEL
        assert b_c.failure is not None
        assert b_c.failure.kind is FailureKind.RESET
        assert await receive_all(c_s) == b"up-while-suspended"
        with pytest.raises(MuxStreamResetError) as info:
            await receive_all(d_s)
        assert info.value.error_code == ErrorCode.INTERNAL_ERROR
        new_c = await client.accept_stream()
        new_c.accept()
        assert await receive_all(new_c) == b"opened-while-suspended"


async def test_window_expiry_ends_streams(nursery: trio.Nursery, identity: ServerIdentity) -> None:
    """Nobody resumes: when the window passes, every stream fails with the reason."""
    server, client, link = await session_pair(nursery, identity, window=1)
    ((s, c),) = await stream_pairs(server, client, 1)
    link.cut()
    await server.wait_suspended()
    await client.wait_suspended()
    assert server.resume_window == 1.0
    with trio.fail_after(20):
        await server.wait_closed()
        await client.wait_closed()
    for conn, stream in ((server, s), (client, c)):
        assert conn.close_reason == "resume window of 1 s passed"
        assert not conn.suspended
        with pytest.raises(MuxSessionClosedError, match="resume window of 1 s passed"):
            await stream.receive_some(1)
        assert stream.failure is not None
        assert stream.failure.kind is FailureKind.SESSION


@pytest.mark.parametrize("alive", ["relay", "client"])
async def test_cut_while_old_transport_looks_alive(
    nursery: trio.Nursery, identity: ServerIdentity, alive: str
) -> None:
    """Only one end notices the cut; the other still has its old transport attached. The
    resume lets the old transport go (the relay's attach aborts it) and the data goes on."""
    server, client, link = await session_pair(nursery, identity)
    ((s, c),) = await stream_pairs(server, client, 1)
    await s.send_all(b"one")
    with trio.fail_after(20):
        assert await c.receive_some(3) == b"one"
    link.cut(client_notices=alive != "client", relay_notices=alive != "relay")
    quiet, noticing = (server, client) if alive == "relay" else (client, server)
    await noticing.wait_suspended()
    assert not quiet.suspended
    await s.send_all(b"two")
    await c.send_all(b"up")
    await hand_over(nursery, identity, server, client)
    with trio.fail_after(20):
        assert await c.receive_some(3) == b"two"
        assert await s.receive_some(2) == b"up"
    if alive == "relay":
        # The relay aborted the old transport: its proxy leg sees the end of the stream.
        with trio.fail_after(10):
            try:
                while await link.leg_b.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
    assert server.resumes == 1
    assert client.resumes == 1


async def test_resume_refused_ends_session(nursery: trio.Nursery, identity: ServerIdentity) -> None:
    """A refused RESUME ends the client's session with ResumeRefusedError."""
    server, client, link = await session_pair(nursery, identity)
    ((_s, c),) = await stream_pairs(server, client, 1)
    link.cut()
    await client.wait_suspended()
    new = await Link.open(nursery)
    t_relay, t_client = _tls(identity, new, "ours")
    handshake = _conn(t_relay, Role.SERVER, WINDOW, "relay-handshake")
    await nursery.start(handshake.run)
    requests: list[ResumeRequested] = []

    async def relay_side() -> None:
        await authenticate_client(
            handshake,
            [plaintext_entry(TOKEN)],
            before_auth=lambda e: requests.append(e) if isinstance(e, ResumeRequested) else None,
        )
        handshake.send_result(requests[0].req_id, ResultStatus.TICKET_UNKNOWN, "unknown ticket")

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(relay_side)
            with pytest.raises(ResumeRefusedError) as info:
                await client.resume_over(t_client, partial(client_credential, TOKEN))
        await client.wait_closed()
    assert info.value.status == ResultStatus.TICKET_UNKNOWN
    assert client.close_reason is not None
    assert "TICKET_UNKNOWN" in client.close_reason
    with pytest.raises(MuxSessionClosedError):
        await c.receive_some(1)


async def test_release_transport_needs_paused_input(
    nursery: trio.Nursery, identity: ServerIdentity
) -> None:
    """release_transport() refuses on a connection whose input is not paused (no RESUME)."""
    server, client, _link = await session_pair(nursery, identity)
    with pytest.raises(RuntimeError, match="input paused"):
        await server.release_transport()
    ((s, c),) = await stream_pairs(server, client, 1)
    await s.send_all(b"still fine")
    with trio.fail_after(20):
        assert await c.receive_some(10) == b"still fine"


async def test_resumption_off_ends_as_before(
    nursery: trio.Nursery, identity: ServerIdentity
) -> None:
    """Without resumption a cut ends the session at once, as it always did."""
    server, client, link = await session_pair(nursery, identity, window=0)
    ((_s, c),) = await stream_pairs(server, client, 1)
    assert server.resume_window == 0.0
    assert not server.resumable
    link.cut()
    with trio.fail_after(20):
        await server.wait_closed()
        await client.wait_closed()
    assert server.suspensions == client.suspensions == 0
    for conn in (server, client):
        assert conn.close_reason is not None
        assert conn.close_reason.startswith("transport")
    with pytest.raises(MuxSessionClosedError):
        await c.receive_some(1)


async def test_close_while_suspended_ends_at_once(
    nursery: trio.Nursery, identity: ServerIdentity
) -> None:
    """close() on a suspended session ends it at once: nothing waits for the window."""
    server, client, link = await session_pair(nursery, identity)
    ((s, _c),) = await stream_pairs(server, client, 1)
    link.cut()
    await server.wait_suspended()
    assert server.resume_deadline is not None
    started = trio.current_time()
    with trio.fail_after(10):
        await server.aclose(ErrorCode.NO_ERROR, "shutting down")
    assert trio.current_time() - started < WINDOW / 2
    assert not server.suspended
    assert server.close_reason is not None
    assert "shutting down" in server.close_reason
    with pytest.raises(MuxSessionClosedError):
        await s.receive_some(1)


async def test_failed_resume_attempts_stay_suspended(
    nursery: trio.Nursery, identity: ServerIdentity
) -> None:
    """A resume attempt that times out or whose connection breaks leaves the session
    suspended; the next attempt resumes it."""
    server, client, link = await session_pair(nursery, identity)
    ((s, c),) = await stream_pairs(server, client, 1)
    link.cut()
    await server.wait_suspended()
    await client.wait_suspended()
    await s.send_all(b"kept")
    # 1. Nobody answers on the relay's end: the caller's deadline passes.
    silent = await Link.open(nursery)
    _, t_client = _tls(identity, silent, "ours")
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(0.5):
            await client.resume_over(t_client, partial(client_credential, TOKEN))
    assert (client.suspended, client.closed) == (True, False)
    # 2. The new connection breaks during the handshake.
    broken = await Link.open(nursery)
    _, t_client = _tls(identity, broken, "ours")
    broken.cut()
    with trio.fail_after(20), pytest.raises(HandshakeError):
        await client.resume_over(t_client, partial(client_credential, TOKEN))
    assert (client.suspended, client.closed) == (True, False)
    assert client.suspensions == 1
    # 3. This one works; nothing was lost on the way.
    await hand_over(nursery, identity, server, client)
    with trio.fail_after(20):
        assert await c.receive_some(4) == b"kept"
    assert (client.resumes, server.resumes) == (1, 1)


@pytest.fixture
def slow_autojump() -> trio.testing.MockClock:
    """A clock that jumps only once every task waited 50 ms of real time (real sockets)."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_keepalive_silence_suspends(
    slow_autojump: trio.testing.MockClock, nursery: trio.Nursery, identity: ServerIdentity
) -> None:
    """A path that goes silent (nothing reset) ends in the keepalive timeout: with
    resumption on that suspends the session on both ends instead of ending it."""
    server, client, link = await session_pair(nursery, identity, idle=5)
    ((s, c),) = await stream_pairs(server, client, 1)
    assert server.idle_timeout == 5.0
    link.cut(client_notices=False, relay_notices=False)
    await s.send_all(b"queued before the timeout")
    started = trio.current_time()
    with trio.fail_after(60):
        await server.wait_suspended()
        await client.wait_suspended()
    assert trio.current_time() - started >= 5.0
    assert (server.closed, client.closed) == (False, False)
    await hand_over(nursery, identity, server, client)
    with trio.fail_after(20):
        assert await c.receive_some(100) == b"queued before the timeout"


async def test_open_timeout_does_not_run_while_suspended(
    slow_autojump: trio.testing.MockClock, nursery: trio.Nursery, identity: ServerIdentity
) -> None:
    """An OPEN sent (queued) while suspended gets its full open timeout after the resume."""
    server, client, link = await session_pair(nursery, identity)
    server.open_timeout = 2.0
    link.cut()
    await server.wait_suspended()
    await client.wait_suspended()
    s = server.open_stream(1, Address("127.0.0.1", 40200), Address("127.0.0.1", 20000))
    await s.send_all(b"hello")
    await trio.sleep(5)  # suspended for longer than the open timeout
    await hand_over(nursery, identity, server, client)
    with trio.fail_after(1):  # within the open timeout, counted from the resume
        c = await client.accept_stream()
    c.accept()
    with trio.fail_after(20):
        await s.wait_opened()
        assert await c.receive_some(5) == b"hello"
    assert server.open_timeouts == 0
