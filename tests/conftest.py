"""Shared fixtures and helpers for the adapter and tunnel tests (real sockets, loopback only)."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from muxtunnel.client import ClientInfo, run_client
from muxtunnel.config import ClientConfig, ServerConfig, TunnelSpec
from muxtunnel.connection import MuxConnection, MuxStream, make_session
from muxtunnel.handshake import authenticate_client, client_handshake
from muxtunnel.protocol.constants import ResultStatus, Role
from muxtunnel.protocol.events import BindRequested
from muxtunnel.protocol.frames import Address
from muxtunnel.server import ServerInfo, serve
from muxtunnel.tokens import plaintext_entry
from tests.system.harness import port_window
from tests.waiting import LogWatch, ReportLines

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

TOKEN = "test-token-0123456789abcdef"


def free_port_range(size: int = 40) -> tuple[int, int]:
    """A range of ports that were free just now (the relay's public range in tests).

    Picked in 10000-32000, or in ``$MUXTUNNEL_TEST_PORTS`` (tests/system/harness.py).
    """
    window_lo, window_hi = port_window(10000, 32000)
    for _ in range(200):
        lo = random.randrange(window_lo, window_hi - size)
        ok = True
        for port in (lo, lo + size // 2, lo + size - 1):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return lo, lo + size - 1
    raise RuntimeError("no free port range")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Mux connection pairs over in-memory transports


async def mux_connection_pair(
    nursery: trio.Nursery,
    transports: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
    *,
    settings: dict[str, int] | None = None,
) -> tuple[MuxConnection, MuxConnection]:
    """A relay-side and a client-side MuxConnection, authenticated, running in ``nursery``."""
    t_server, t_client = transports or trio.testing.memory_stream_pair()
    server = MuxConnection(
        t_server, make_session(Role.SERVER, settings_overrides=settings), name="server"
    )
    client = MuxConnection(
        t_client, make_session(Role.CLIENT, settings_overrides=settings), name="client"
    )
    await nursery.start(server.run)
    await nursery.start(client.run)
    await handshake_and_bind(server, client)
    return server, client


async def handshake_and_bind(server: MuxConnection, client: MuxConnection) -> None:
    """Authenticate ``client`` to ``server`` and bind :data:`BOUND_TUNNELS`."""
    async with trio.open_nursery() as n:
        n.start_soon(_authenticate_and_bind, server)
        n.start_soon(client_handshake, client, TOKEN, [(t, 0, None) for t in BOUND_TUNNELS])


#: Tunnels that ``mux_connection_pair`` binds: the client session refuses OPENs for others.
BOUND_TUNNELS = range(1, 9)


async def _authenticate_and_bind(server: MuxConnection) -> None:
    """Relay side of ``mux_connection_pair``: AUTH, then RESULT(OK) for each BIND."""
    await authenticate_client(server, [plaintext_entry(TOKEN)])
    for _ in BOUND_TUNNELS:
        event = await server.next_control_event()
        assert isinstance(event, BindRequested)
        bound = Address("127.0.0.1", 40000 + event.tunnel_id)
        server.send_result(event.req_id, ResultStatus.OK, "", bound)


async def mux_stream_pair(
    server: MuxConnection, client: MuxConnection
) -> tuple[MuxStream, MuxStream]:
    """Open a stream relay -> client and accept it; returns (relay side, client side)."""
    await server.wait_open_slot()
    s = server.open_stream(1, Address("127.0.0.1", 40000), Address("127.0.0.1", 20000))
    c = await client.accept_stream()
    c.accept()
    return s, c


# --------------------------------------------------------------------------------------------
# Relay + client in process


@dataclass
class Relay:
    info: ServerInfo
    config: ServerConfig
    shutdown: trio.Event
    scope: trio.CancelScope
    done: trio.Event
    lines: ReportLines = field(default_factory=ReportLines)


@dataclass
class Client:
    info: ClientInfo
    config: ClientConfig
    shutdown: trio.Event
    scope: trio.CancelScope
    done: trio.Event
    lines: ReportLines = field(default_factory=ReportLines)
    error: BaseException | None = None

    def port(self, index: int = 0) -> int:
        return self.info.tunnels[index].remote_port


async def _run_cancellable(
    fn: Callable[..., Awaitable[None]],
    holder: dict[str, object],
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        holder["scope"] = scope
        try:
            await fn(task_status=task_status)
        except Exception as exc:  # kept for the test to inspect
            holder["error"] = exc
            raise
        finally:
            done.set()


async def _start_entry_point(
    nursery: trio.Nursery, entry: Callable[..., Awaitable[None]], config: object
) -> tuple[object, trio.Event, trio.CancelScope, trio.Event, ReportLines]:
    """Start ``entry(config, shutdown=..., report=...)`` in ``nursery``; wait for its start value."""
    shutdown = trio.Event()
    done = trio.Event()
    lines = ReportLines()
    holder: dict[str, object] = {}
    info = await nursery.start(
        _run_cancellable,
        partial(entry, config, shutdown=shutdown, report=lines.append),
        holder,
        done,
    )
    scope = holder["scope"]
    assert isinstance(scope, trio.CancelScope)
    return info, shutdown, scope, done, lines


async def start_relay(
    nursery: trio.Nursery, tmp_path: Path, name: str = "relay", **overrides: object
) -> Relay:
    """Start ``serve`` on 127.0.0.1 with a free public port range; returns a handle."""
    state = tmp_path / name
    config = ServerConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        port_range=free_port_range(),
        bind_host="127.0.0.1",
        tokens=(TOKEN,),
        state_dir=state,
        keepalive_timeout=30.0,
        lease_seconds=60.0,
        drain_timeout=5.0,
        handshake_timeout=5.0,
    )
    config = replace(config, **overrides)  # type: ignore[arg-type]
    info, shutdown, scope, done, lines = await _start_entry_point(nursery, serve, config)
    assert isinstance(info, ServerInfo)
    return Relay(info, config, shutdown, scope, done, lines)


def client_config(
    relay: Relay,
    state_dir: Path,
    tunnels: list[TunnelSpec],
    *,
    port: int | None = None,
    **overrides: object,
) -> ClientConfig:
    """A client config pinned to ``relay``: retries for ever, quick backoff and dials; ``port``
    dials another port (a proxy in front of the relay) instead of the relay's own."""
    config = ClientConfig(
        server_host="127.0.0.1",
        server_port=relay.info.port if port is None else port,
        token=TOKEN,
        fingerprint=relay.info.fingerprint,
        state_dir=state_dir,
        tunnels=tuple(tunnels),
        max_retries=None,
        connect_timeout=2.0,
        backoff_cap=1.0,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


async def start_client(
    nursery: trio.Nursery,
    tmp_path: Path,
    relay: Relay,
    tunnels: list[TunnelSpec],
    *,
    name: str = "client",
    **overrides: object,
) -> Client:
    """Start ``run_client`` against ``relay`` (pinned fingerprint); waits until it is up."""
    # ``overrides`` may name any field, the state directory included.
    config = replace(client_config(relay, tmp_path / name, tunnels), **overrides)  # type: ignore[arg-type]
    info, shutdown, scope, done, lines = await _start_entry_point(nursery, run_client, config)
    assert isinstance(info, ClientInfo)
    return Client(info, config, shutdown, scope, done, lines)


# --------------------------------------------------------------------------------------------
# Local services


async def _echo_handler(stream: trio.SocketStream) -> None:
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                await stream.send_eof()
                return
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _serve_tcp(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def start_service(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    """A TCP server on 127.0.0.1 running ``handler`` for each connection; returns its port."""
    port = await nursery.start(_serve_tcp, handler)
    assert isinstance(port, int)
    return port


async def start_echo(nursery: trio.Nursery) -> int:
    """An echo server on 127.0.0.1 (echoes until EOF, then half-closes); returns its port."""
    return await start_service(nursery, _echo_handler)


def dead_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def echo_roundtrip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` through ``port``, half-close, read everything back."""
    stream = await connect(port)
    got = bytearray()
    async with stream:

        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(view), 65536):
                await stream.send_all(view[i : i + 65536])
            await stream.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(send)
            while True:
                chunk = await stream.receive_some(262144)
                if not chunk:
                    break
                got += chunk
    return bytes(got)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n) if n < 1 << 16 else os.urandom(n)


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    return await start_echo(nursery)


@pytest.fixture
async def logs(caplog: pytest.LogCaptureFixture) -> AsyncIterator[LogWatch]:
    """The ``muxtunnel`` log messages (INFO and above) of the test, awaitable (tests/waiting.py).

    The level is lowered through ``caplog`` first: it restores the logger's original level after
    the test even when the test calls ``caplog.set_level`` too (the first saved level wins).
    """
    caplog.set_level(logging.INFO, logger="muxtunnel")
    with LogWatch() as watch:
        yield watch
