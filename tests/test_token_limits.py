"""Per-token limits of the relay, fair pending opens, and clients sharing a token (real TLS)."""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel.client import run_client
from muxtunnel.config import TunnelSpec, build_server_config, load_toml
from muxtunnel.errors import ConfigError, SessionClosedError
from muxtunnel.limits import DescriptorBudget, descriptor_reserve
from muxtunnel.protocol.constants import ResultStatus
from muxtunnel.registry import BindError, PortRegistry
from tests.conftest import (
    TOKEN,
    connect,
    echo_roundtrip,
    free_port_range,
    random_bytes,
    sha,
    start_client,
    start_echo,
    start_relay,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import Client, Relay

TOKEN_B = "second-token-fedcba9876543210"


async def _check_bytes(port: int, seed: int, size: int = 50_000) -> None:
    payload = random_bytes(size, seed)
    with trio.fail_after(15):
        assert sha(await echo_roundtrip(port, payload)) == sha(payload)


async def _held_visitor(port: int) -> trio.SocketStream:
    """A visitor that proved it reached the echo service and stays connected."""
    stream = await connect(port)
    try:
        with trio.fail_after(10):
            await stream.send_all(b"ping")
            got = b""
            while len(got) < 4:
                chunk = await stream.receive_some(4 - len(got))
                assert chunk, "visitor closed before the echo came back"
                got += chunk
        assert got == b"ping"
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _refused(port: int) -> bool:
    """True if a visitor is closed by the relay without reaching the local service."""
    try:
        stream = await connect(port)
    except OSError:
        return True  # reset before trio saw the connection complete
    async with stream:
        try:
            await stream.send_all(b"ping")
            with trio.fail_after(10):
                return await stream.receive_some(4) == b""
        except (trio.BrokenResourceError, OSError):
            return True


def _forwards(client: Client) -> int:
    return sum(1 for line in client.lines if line.startswith("forwarding "))


def _count(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for record in caplog.records if text in record.getMessage())


async def test_token_limits_span_sessions_and_other_tokens_still_work(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    echo = await start_echo(nursery)
    relay = await start_relay(
        nursery,
        tmp_path,
        tokens=(TOKEN, TOKEN_B),
        max_tunnels_per_client=4,
        max_tunnels_per_token=6,
        max_sessions_per_token=2,
    )
    specs = [TunnelSpec(local_port=echo)] * 4
    first = await start_client(nursery, tmp_path, relay, specs, name="first")
    second = await start_client(nursery, tmp_path, relay, specs, name="second")
    assert len(first.info.tunnels) == 4
    # The token holds 6 tunnels across both sessions: the second session got only 2.
    assert len(second.info.tunnels) == 2
    ports_a = [t.remote_port for t in (*first.info.tunnels, *second.info.tunnels)]
    assert len(set(ports_a)) == 6

    # A third session of the token is refused with a readable reason; the live ones stay.
    third = replace(first.config, state_dir=tmp_path / "third", max_retries=0)
    with trio.fail_after(20), pytest.raises(SessionClosedError, match="too many sessions"):
        await run_client(third)
    assert _count(caplog, "already has 2 sessions") >= 1

    other = await start_client(nursery, tmp_path, relay, specs, name="other", token=TOKEN_B)
    assert len(other.info.tunnels) == 4
    for seed, port in enumerate([*ports_a, *(t.remote_port for t in other.info.tunnels)]):
        await _check_bytes(port, seed)
    # Nobody was disconnected or replaced along the way.
    assert _forwards(first) == 4
    assert _forwards(second) == 2
    assert _count(caplog, "replaced") == 0


async def test_streams_per_token_span_sessions(nursery: trio.Nursery, tmp_path: Path) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path, tokens=(TOKEN, TOKEN_B), max_streams_per_token=4)
    spec = [TunnelSpec(local_port=echo)]
    first = await start_client(nursery, tmp_path, relay, spec, name="first")
    second = await start_client(nursery, tmp_path, relay, spec, name="second")
    other = await start_client(nursery, tmp_path, relay, spec, name="other", token=TOKEN_B)
    held = [await _held_visitor(c.port()) for c in (first, second, first, second)]
    # The token has 4 streams open over its two sessions: a fifth visitor is refused.
    assert await _refused(first.port())
    assert await _refused(second.port())
    # Another token is not affected.
    others = [await _held_visitor(other.port()) for _ in range(3)]
    await _check_bytes(other.port(), 1)
    for stream in others:
        await stream.aclose()
    # Once a stream ends, the token may open one again.
    await held.pop().aclose()
    with trio.fail_after(10):
        while True:
            try:
                held.append(await _held_visitor(first.port()))
                break
            except (AssertionError, trio.BrokenResourceError, OSError):
                await trio.sleep(0.05)
    for stream in held:
        await stream.aclose()


async def test_visitors_per_tunnel(nursery: trio.Nursery, tmp_path: Path) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path, max_visitors_per_tunnel=3)
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=echo), TunnelSpec(local_port=echo)]
    )
    held = [await _held_visitor(client.port(0)) for _ in range(3)]
    assert await _refused(client.port(0))
    # The limit is per tunnel: the client's other tunnel still takes visitors and bytes.
    held += [await _held_visitor(client.port(1)) for _ in range(2)]
    await _check_bytes(client.port(1), 7)
    for stream in held:
        await stream.aclose()


async def test_clients_sharing_a_token_do_not_knock_each_other_off(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    echo = await start_echo(nursery)
    relay = await start_relay(
        nursery, tmp_path, port_range=free_port_range(160), max_tunnels_per_token=200
    )
    specs = [TunnelSpec(local_port=echo)] * 40
    clients = [await start_client(nursery, tmp_path, relay, specs, name=f"c{i}") for i in range(3)]
    ports = {t.remote_port for c in clients for t in c.info.tunnels}
    assert len(ports) == 120
    # Watch for 10 s: no session may end, be replaced or reconnect.
    await trio.sleep(10)
    assert _count(caplog, "reconnecting to") == 0, [r.getMessage() for r in caplog.records]
    assert _count(caplog, "ended:") == 0
    assert _count(caplog, "replaced") == 0
    assert [_forwards(c) for c in clients] == [40, 40, 40]
    await _check_bytes(clients[2].info.tunnels[39].remote_port, 3)


def _stuck_listener() -> tuple[socket.socket, socket.socket]:
    """A local port whose accept queue is full: a connect to it never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.socket()
    filler.connect(listener.getsockname())
    return listener, filler


async def test_a_stuck_tunnel_cannot_take_every_pending_open(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    listener, filler = _stuck_listener()
    relay: Relay = await start_relay(nursery, tmp_path)
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [TunnelSpec(local_port=listener.getsockname()[1]), TunnelSpec(local_port=echo)],
        connect_timeout=30.0,
    )
    stuck: list[trio.SocketStream] = []
    try:
        # 200 visitors of the stuck tunnel: more than the client's 128 pending opens.
        for _ in range(200):
            stream = await connect(client.port(0))
            await stream.send_all(b"hello")
            stuck.append(stream)
        await trio.sleep(0.5)  # let the relay open what it will for them
        start = trio.current_time()
        await _check_bytes(client.port(1), 11, size=1000)
        assert trio.current_time() - start < 3.0
        # A second, concurrent visitor of the healthy tunnel is not starved either.
        async with trio.open_nursery() as inner:
            inner.start_soon(_check_bytes, client.port(1), 12)
            inner.start_soon(_check_bytes, client.port(1), 13)
        assert trio.current_time() - start < 6.0
    finally:
        for stream in stuck:
            await stream.aclose()
        filler.close()
        listener.close()


class _FreezableProxy:
    """A TCP proxy to the relay that can stop forwarding (a client gone silent, half-open)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.frozen = trio.Event()

    async def _pipe(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if self.frozen.is_set():
                    await trio.sleep_forever()  # silent: sockets stay open, nothing moves
                if not data:
                    await dst.send_eof()
                    return
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    async def _handle(self, down: trio.SocketStream) -> None:
        async with down, await connect(self.target) as up, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, down, up)
            nursery.start_soon(self._pipe, up, down)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as nursery:
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)


async def test_session_limit_evicts_a_silent_session_not_a_live_one(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path, max_sessions_per_token=1)
    proxy = _FreezableProxy(relay.info.port)
    proxy_port = await nursery.start(proxy.serve)
    spec = [TunnelSpec(local_port=echo)]
    silent = await start_client(
        nursery, tmp_path, relay, spec, name="silent", server_port=proxy_port
    )
    # While the first session answers, a second one is refused.
    refused = replace(
        silent.config, server_port=relay.info.port, state_dir=tmp_path / "x", max_retries=0
    )
    with trio.fail_after(20), pytest.raises(SessionClosedError, match="too many sessions"):
        await run_client(refused)
    # Once it is silent (half-open), a new session of the token replaces it and gets its port.
    proxy.frozen.set()
    with trio.fail_after(20):
        fresh = await start_client(nursery, tmp_path, relay, spec, name="fresh")
    assert fresh.port() == silent.port()
    assert _count(caplog, "silent; replaced") == 1
    await _check_bytes(fresh.port(), 5)
    silent.scope.cancel()


def test_descriptor_budget_keeps_its_reserve() -> None:
    assert descriptor_reserve(1024) == 64
    assert descriptor_reserve(100_000) == 5000
    now = [0.0]
    open_fds = [10]
    budget = DescriptorBudget(200, 64, counter=lambda: open_fds[0], clock=lambda: now[0])
    assert budget.ceiling == 136
    assert budget.room(2)
    budget.opened(120)  # 130 by the estimate (closes are not seen until the next count)
    assert budget.room(6)
    assert not budget.room(7)
    # Visitors and a token's first tunnel may use half of the reserve, never all of it.
    assert budget.room(38, priority=True)
    assert not budget.room(39, priority=True)
    # At the ceiling the estimate is checked against a fresh count (not more than every 50 ms).
    open_fds[0] = 20
    assert not budget.room(7)
    now[0] = 0.1
    assert budget.room(7)
    assert budget.room(116)
    assert not budget.room(117)
    assert DescriptorBudget(None).room(10**9)


def test_per_token_options_from_file_and_flags(tmp_path: Path) -> None:
    defaults = build_server_config({}, {}, env={"MUXTUNNEL_TOKEN": TOKEN})
    assert (
        defaults.max_sessions_per_token,
        defaults.max_tunnels_per_token,
        defaults.max_streams_per_token,
        defaults.max_visitors_per_tunnel,
    ) == (8, 64, 1024, 256)
    path = tmp_path / "relay.toml"
    path.write_text(
        "max_sessions_per_token = 3\nmax-tunnels-per-token = 5\n"
        "[server]\nmax_visitors_per_tunnel = 9\n"
    )
    config = build_server_config(
        load_toml(path, "server"),
        {"max-streams-per-token": 7, "max-tunnels-per-token": 6},
        config_path=path,
        env={"MUXTUNNEL_TOKEN": TOKEN},
    )
    assert (
        config.max_sessions_per_token,
        config.max_tunnels_per_token,
        config.max_streams_per_token,
        config.max_visitors_per_tunnel,
    ) == (3, 6, 7, 9)
    with pytest.raises(ConfigError, match="max-visitors-per-tunnel"):
        build_server_config({"max-visitors-per-tunnel": 0}, {}, env={"MUXTUNNEL_TOKEN": TOKEN})


class _Owner:
    """A stand-in for a relay session that answers every probe after a short delay."""

    def __init__(self, token_id: str) -> None:
        self.token_id = token_id
        self.alive = True
        self.probes = 0

    async def probe(self, within: float) -> bool:
        self.probes += 1
        await trio.sleep(0.05)
        return True

    def replaced(self, reason: str) -> None:
        self.alive = False


async def test_registry_refuses_beyond_the_token_limit_without_a_port_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = PortRegistry(free_port_range(10), "127.0.0.1", 60.0, max_per_token=2)
    owner = _Owner("a")
    try:
        await registry.acquire(owner, 1, 0)
        await registry.acquire(owner, 2, 0)
        opened: list[int] = []

        async def no_open(port: int) -> list[trio.SocketListener]:
            opened.append(port)
            raise AssertionError("a refused BIND must not try ports")

        monkeypatch.setattr(registry, "_open", no_open)
        for tunnel_id in range(3, 1003):
            with pytest.raises(BindError) as refused:
                await registry.acquire(owner, tunnel_id, 0)
            assert refused.value.status == ResultStatus.LIMIT_REACHED
        assert opened == []
        assert registry.held_by("a") == 2
    finally:
        registry.close_all()


async def test_sessions_of_one_token_share_one_probe() -> None:
    registry = PortRegistry(free_port_range(160), "127.0.0.1", 60.0)
    first = _Owner("t")
    try:
        ports = {(await registry.acquire(first, tid, 0)).port for tid in range(1, 41)}
        others = [_Owner("t"), _Owner("t")]

        async def bind_all(owner: _Owner) -> None:
            for tid in range(1, 41):
                ports.add((await registry.acquire(owner, tid, 0)).port)

        async with trio.open_nursery() as nursery:
            for owner in others:
                nursery.start_soon(bind_all, owner)
        # 80 BINDs asked about a live session's port: about one PING per session (another
        # only once the answer is a second old), and fresh ports instead of a takeover.
        assert 1 <= first.probes <= 3
        assert others[0].probes + others[1].probes <= 3
        assert len(ports) == 120
        assert first.alive
        assert all(owner.alive for owner in others)
    finally:
        registry.close_all()
