"""A session over several TLS connections (protocol-spec.md §10.7): a real relay and
``run_client --connections N`` in process on loopback, real TLS, and a TCP proxy between them
that counts each connection's bytes and can cut any one of them (RST both ways, as a path that
died) while refusing new connections (only the session's remaining connections are left)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from muxtunnel import tls
from muxtunnel.client import ClientInfo, run_client
from muxtunnel.config import ServerConfig, TunnelSpec, build_client_config
from muxtunnel.connection import (
    MuxConnection,
    MuxStream,
    ResumeRefusedError,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import ConfigError, HandshakeError, JoinRefusedError
from muxtunnel.handshake import client_credential, client_handshake
from muxtunnel.protocol.constants import CARRIER_TUNNEL, ResultStatus, Role
from muxtunnel.protocol.events import ResultReceived
from muxtunnel.protocol.frames import Address
from muxtunnel.stats import Stats
from tests.conftest import (
    TOKEN,
    Client,
    Relay,
    _start_entry_point,
    client_config,
    connect,
    random_bytes,
    sha,
    start_echo,
    start_relay,
    start_service,
)
from tests.cutproxy import CutProxy

if TYPE_CHECKING:
    from pathlib import Path

    from tests.waiting import LogWatch

#: Extra connection N of the client, as its log lines name it.
JOINED = "joined the session"


async def _setup(
    nursery: trio.Nursery,
    tmp_path: Path,
    logs: LogWatch,
    *,
    connections: int = 3,
    relay: dict[str, Any] | None = None,
) -> tuple[Relay, CutProxy, Client]:
    """Echo service, relay, proxy and a client with ``connections`` connections through it;
    waits until the extra connections joined."""
    echo = await start_echo(nursery)
    started = await start_relay(nursery, tmp_path, **(relay or {}))
    proxy = CutProxy(started.info.port)
    proxy_port = await start_service(nursery, proxy.handle)
    config = client_config(
        started,
        tmp_path / "client",
        [TunnelSpec(local_port=echo)],
        port=proxy_port,
        connections=connections,
    )
    stats = Stats("client")
    info, shutdown, scope, done, lines = await _start_entry_point(
        nursery, lambda config, **kw: run_client(config, stats=stats, **kw), config
    )
    assert isinstance(info, ClientInfo)
    limit = (relay or {}).get("max_connections_per_session", 8)
    assert isinstance(limit, int)
    with trio.fail_after(15):
        for n in range(1, min(connections, limit)):
            await logs.wait_for(JOINED, count=n)
    client = Client(info, config, shutdown, scope, done, lines)
    client.stats = stats  # type: ignore[attr-defined]
    return started, proxy, client


async def _echo_checked(
    port: int, size: int, seed: int, paced: bool = False, started: Started | None = None
) -> None:
    """``size`` bytes through the tunnel and back, compared by SHA-256. ``paced``: 64 KiB
    every 20 ms. ``started`` gets one entry once the first 256 KiB came back."""
    payload = random_bytes(size, seed)
    stream = await connect(port)
    got = bytearray()
    async with stream:

        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, size, 65536):
                await stream.send_all(view[i : i + 65536])
                if paced:
                    await trio.sleep(0.02)
            await stream.send_eof()

        async with trio.open_nursery() as inner:
            inner.start_soon(send)
            while chunk := await stream.receive_some(262144):
                if started is not None and len(got) < 262144 <= len(got) + len(chunk):
                    started.mark()
                got += chunk
    assert len(got) == size
    assert sha(bytes(got)) == sha(payload)


class Started:
    """Counts streams under way; ``all`` is set once ``n`` of them are."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.all = trio.Event()

    def mark(self) -> None:
        self.count += 1
        if self.count >= self.n:
            self.all.set()


async def test_streams_spread_over_the_connections_and_arrive_intact(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    _relay, proxy, client = await _setup(nursery, tmp_path, logs, connections=3)
    assert proxy.live() == [0, 1, 2]
    (session,) = client.stats.snapshot()["sessions"]  # type: ignore[attr-defined]
    assert session["connections"] == 3
    before = list(proxy.bytes_moved)
    with trio.fail_after(60):
        async with trio.open_nursery() as load:
            for i in range(9):
                load.start_soon(_echo_checked, client.port(), 512 * 1024, i)
    moved = [after - start for after, start in zip(proxy.bytes_moved, before, strict=True)]
    # Nine streams at once, least-loaded placement: each connection carries three of them.
    for number, count in enumerate(moved):
        assert count >= 2 * 512 * 1024, f"connection {number} carried only {count} bytes"


async def test_a_lost_connection_resumes_on_a_remaining_one(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    _relay, proxy, client = await _setup(nursery, tmp_path, logs, connections=3)
    size = 3 << 20
    with trio.fail_after(90):
        async with trio.open_nursery() as load:
            started = Started(6)
            for i in range(6):
                load.start_soon(_echo_checked, client.port(), size, 10 + i, True, started)
            await started.all.wait()
            # No new TCP connection gets through: connection 2's streams can only resume over
            # one of the remaining connections of the session.
            proxy.cut(down=True, number=2)
            await logs.wait_for("resumed over another connection of the session")
            assert proxy.live() == [0, 1]
            proxy.down = False
    # Every byte of all six streams came back (checked in _echo_checked), and the carried
    # connection got a TCP connection of its own again.
    with trio.fail_after(15):
        await logs.wait_for("runs on a connection of its own again")
    assert len(proxy.live()) == 3


async def test_a_lost_first_connection_resumes_on_a_joined_one(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    _relay, proxy, client = await _setup(nursery, tmp_path, logs, connections=2)
    with trio.fail_after(90):
        async with trio.open_nursery() as load:
            started = Started(4)
            for i in range(4):
                load.start_soon(_echo_checked, client.port(), 3 << 20, 20 + i, True, started)
            await started.all.wait()
            proxy.cut(down=True, number=0)
            line = await logs.wait_for("resumed over another connection of the session")
            assert f"session with relay {client.config.server_key}" in line
            proxy.down = False
    # A new visitor still works (the tunnel is bound on the first connection, now carried).
    await _echo_checked(client.port(), 100_000, 99)


async def test_the_relay_limits_connections_per_session(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    _relay, proxy, client = await _setup(
        nursery, tmp_path, logs, connections=4, relay={"max_connections_per_session": 2}
    )
    line = await logs.wait_for("takes at most 2 connections per session: running on 2, not 4")
    assert "relay" in line
    await _echo_checked(client.port(), 100_000, 1)
    assert len(proxy.live()) == 2


async def test_a_relay_with_one_connection_per_session_runs_one(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    _relay, proxy, client = await _setup(
        nursery, tmp_path, logs, connections=3, relay={"max_connections_per_session": 1}
    )
    await logs.wait_for("takes one connection per session: running on one, not 3")
    await _echo_checked(client.port(), 100_000, 1)
    assert proxy.live() == [0]


async def _dial(relay: Relay) -> trio.abc.Stream:
    tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
    stream = wrap_tls(tcp, tls.client_ssl_context(), server_hostname="127.0.0.1")
    await stream.do_handshake()
    return stream


async def _session(nursery: trio.Nursery, relay: Relay) -> MuxConnection:
    """A raw client session with resumption on (it gets a ticket) and one bound tunnel."""
    session = make_session(Role.CLIENT, settings_overrides={"resume_window": 30})
    conn = MuxConnection(await _dial(relay), session, name="test client")
    await nursery.start(conn.run)
    with trio.fail_after(15):
        (outcome,) = await client_handshake(conn, TOKEN, [(1, 0, None)])
    assert outcome.ok
    assert conn.ticket is not None
    return conn


async def _join(nursery: trio.Nursery, relay: Relay, ticket: bytes) -> MuxConnection:
    session = make_session(Role.CLIENT, settings_overrides={"resume_window": 30})
    conn = MuxConnection(await _dial(relay), session, name="joining")
    await nursery.start(conn.run)
    with trio.fail_after(15):
        await client_handshake(conn, TOKEN, [], join=ticket)
    return conn


async def test_join_with_an_unknown_ticket_is_refused(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path)
    first = await _session(nursery, relay)
    with pytest.raises(JoinRefusedError, match="TICKET_UNKNOWN"):
        await _join(nursery, relay, bytes(32))
    await logs.wait_for("extra connection refused: unknown ticket")
    # The real ticket joins; a BIND there is refused (tunnels belong to the first connection).
    assert first.ticket is not None
    joined = await _join(nursery, relay, first.ticket)
    assert joined.ticket is not None
    assert joined.ticket != first.ticket
    with trio.fail_after(15):
        (outcome,) = await client_handshake_binds(joined)
    assert outcome == ResultStatus.DENIED
    # A stream the client opens on a joined connection is refused too (visits use the first).
    mux = joined.open_stream(1, Address(None, 0), Address(None, 0))
    with trio.fail_after(15), pytest.raises(trio.BrokenResourceError, match="first connection"):
        await mux.wait_opened()


async def client_handshake_binds(conn: MuxConnection) -> list[int]:
    """Send one BIND on an authenticated connection; the RESULT statuses."""
    conn.send_bind(77, 2, Address(None, 0))
    while True:
        event = await conn.next_control_event()
        if isinstance(event, ResultReceived) and event.req_id == 77:
            return [int(event.status)]


async def test_a_carrier_stream_resumes_only_its_own_session(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path)
    first = await _session(nursery, relay)
    other = await _session(nursery, relay)

    async def carrier() -> MuxStream:
        mux = first.open_stream(CARRIER_TUNNEL, Address(None, 0), Address(None, 0))
        with trio.fail_after(15):
            await mux.wait_opened()
        return mux

    # A carried connection must resume a connection of the carrier's own session: a JOIN
    # over a carrier stream is a protocol error of the carried connection ...
    carried = MuxConnection(
        await carrier(),
        make_session(Role.CLIENT, settings_overrides={"resume_window": 30}),
        name="carried",
    )
    await nursery.start(carried.run)
    assert other.ticket is not None
    with trio.fail_after(15), pytest.raises(HandshakeError, match="PROTOCOL_ERROR"):
        await client_handshake(carried, TOKEN, [], join=other.ticket)
    await logs.wait_for("a carried connection must resume one of its session")
    # ... and another session's connection resumed over it is an unknown ticket.
    with trio.fail_after(15), pytest.raises(ResumeRefusedError, match="TICKET_UNKNOWN"):
        await other.resume_over(
            await carrier(), lambda nonce, minor: client_credential(TOKEN, nonce, minor)
        )
    # The carrier's session is unharmed.
    assert not first.closed
    (status,) = await client_handshake_binds(first)
    assert status == ResultStatus.OK


def test_connections_option(tmp_path: Path) -> None:
    base = {
        "server": "relay.example:7835",
        "token": TOKEN,
        "tunnel": ["22"],
        "state-dir": str(tmp_path),
    }
    assert build_client_config({}, {**base, "connections": 4}).connections == 4
    assert build_client_config({}, base).connections == 1
    with pytest.raises(ConfigError, match="1 to 16"):
        build_client_config({}, {**base, "connections": 17})
    with pytest.raises(ConfigError, match="needs session resumption"):
        build_client_config({}, {**base, "connections": 2, "resume-window": 0})


def test_server_option_default() -> None:
    assert ServerConfig.__dataclass_fields__["max_connections_per_session"].default == 8


async def test_carrier_handshakes_at_once_are_bounded(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path, max_connections_per_session=2)
    first = await _session(nursery, relay)
    idle = []
    for _ in range(2):  # carrier streams that never start their handshake
        mux = first.open_stream(CARRIER_TUNNEL, Address(None, 0), Address(None, 0))
        with trio.fail_after(15):
            await mux.wait_opened()
        idle.append(mux)
    extra = first.open_stream(CARRIER_TUNNEL, Address(None, 0), Address(None, 0))
    with trio.fail_after(15), pytest.raises(trio.BrokenResourceError, match="RESOURCE_SHORTAGE"):
        await extra.wait_opened()
    # One handshake ends (its stream is reset): room for a new carrier again.
    idle[0].reset()
    with trio.fail_after(15):
        while True:
            again = first.open_stream(CARRIER_TUNNEL, Address(None, 0), Address(None, 0))
            try:
                await again.wait_opened()
                break
            except trio.BrokenResourceError:
                await trio.sleep(0.05)
    assert not first.closed
