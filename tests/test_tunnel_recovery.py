"""Reconnects, leases, takeover of stale sessions, and graceful shutdown (in process, real TLS)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from muxtunnel.config import TunnelSpec
from tests.conftest import (
    Client,
    connect,
    echo_roundtrip,
    start_client,
    start_echo,
    start_relay,
    start_service,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from tests.waiting import LogWatch


async def _wait_lines(client: Client, count: int, within: float) -> None:
    with trio.move_on_after(within):
        await client.lines.wait_for(count)
    assert len(client.lines) >= count, f"only {client.lines} after {within} s"


def _ports(lines: list[str]) -> list[int]:
    return [int(line.split()[1].rsplit(":", 1)[1]) for line in lines]


async def test_relay_restart_client_returns_on_same_ports(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    lo, _hi = relay.config.port_range
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [TunnelSpec(local_port=echo), TunnelSpec(local_port=echo, remote_port=lo + 7)],
    )
    before = [t.remote_port for t in client.info.tunnels]
    assert before[1] == lo + 7
    relay.shutdown.set()
    with trio.fail_after(10):
        await relay.done.wait()
    # Same address, same state dir (same certificate), fresh process state: no leases at all.
    await start_relay(
        nursery, tmp_path, listen_port=relay.info.port, port_range=relay.config.port_range
    )
    await _wait_lines(client, 4, within=15)
    assert _ports(client.lines[2:]) == before, client.lines
    with trio.fail_after(10):
        for port in before:
            assert await echo_roundtrip(port, b"again") == b"again"


async def test_killed_client_new_client_gets_same_ports_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    lo, _hi = relay.config.port_range
    specs = [TunnelSpec(local_port=echo), TunnelSpec(local_port=echo, remote_port=lo + 9)]
    first = await start_client(nursery, tmp_path, relay, specs, name="first")
    ports = [t.remote_port for t in first.info.tunnels]
    first.scope.cancel()  # no goodbye: the TLS connection just drops
    await first.done.wait()
    start = trio.current_time()
    second = await start_client(nursery, tmp_path, relay, specs, name="second")
    assert [t.remote_port for t in second.info.tunnels] == ports
    assert trio.current_time() - start < 1.0
    with trio.fail_after(10):
        for port in ports:
            assert await echo_roundtrip(port, b"mine now") == b"mine now"


def _frozen_proxy(
    target_port: int, frozen: trio.Event
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A TCP forwarder that, once ``frozen`` is set, stops moving bytes but keeps sockets open."""

    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while data := await src.receive_some(65536):
            if frozen.is_set():
                await trio.sleep_forever()
            await dst.send_all(data)

    async def handler(down: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with down, up, trio.open_nursery() as n:
            n.start_soon(pump, down, up)
            n.start_soon(pump, up, down)

    return handler


async def test_half_open_session_is_taken_over(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The old client vanished without FIN (half-open TCP): a new client takes its ports."""
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    frozen = trio.Event()
    proxy_port = await start_service(nursery, _frozen_proxy(relay.info.port, frozen))
    specs = [TunnelSpec(local_port=echo)]
    old = await start_client(nursery, tmp_path, relay, specs, name="old", server_port=proxy_port)
    port = old.port()
    assert await echo_roundtrip(port, b"x") == b"x"
    frozen.set()
    start = trio.current_time()
    new = await start_client(nursery, tmp_path, relay, specs, name="new")
    assert new.port() == port
    assert trio.current_time() - start < 4.0  # the liveness probe, not the 30 s keepalive
    with trio.fail_after(10):
        assert await echo_roundtrip(port, b"new owner") == b"new owner"


async def test_live_twin_is_not_robbed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Two live clients with one token asking for one port: the second gets ADDRESS_IN_USE."""
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    lo, _hi = relay.config.port_range
    specs = [
        TunnelSpec(local_port=echo, remote_port=lo + 2),
        TunnelSpec(local_port=echo, remote_port=lo + 4),
    ]
    first = await start_client(nursery, tmp_path, relay, specs, name="first")
    second = await start_client(
        nursery,
        tmp_path,
        relay,
        [specs[0], TunnelSpec(local_port=echo, remote_port=lo + 6)],
        name="second",
    )
    assert [t.remote_port for t in first.info.tunnels] == [lo + 2, lo + 4]
    assert [t.remote_port for t in second.info.tunnels] == [lo + 6]
    with trio.fail_after(10):
        assert await echo_roundtrip(lo + 2, b"first") == b"first"


async def test_lease_keeps_port_then_expires(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path, lease_seconds=1.0)
    first = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)], name="a")
    port = first.port()
    first.scope.cancel()
    with trio.fail_after(10):
        await first.done.wait()
        await logs.wait_for(f"port {port} kept for its token")
    leased_at = trio.current_time()
    # Leased: still bound by the relay (visitors wait in the backlog).
    with trio.fail_after(5):
        probe = await connect(port)
        await probe.aclose()
    with trio.fail_after(10):
        await logs.wait_for(f"tunnel port {port} released")
    assert trio.current_time() - leased_at >= 0.9  # lease_seconds=1.0
    # Expired: released.
    try:
        probe = await connect(port)
    except OSError:
        pass
    else:
        await probe.aclose()
        raise AssertionError("port still bound after the lease expired")


class _SlowService:
    """Reads each request until EOF; answers after 0.5 s ("slow") or never ("hang")."""

    def __init__(self) -> None:
        #: Requests read completely so far.
        self.requests = 0
        self._changed = trio.Event()

    async def wait_requests(self, count: int) -> None:
        while self.requests < count:
            await self._changed.wait()

    async def __call__(self, stream: trio.SocketStream) -> None:
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
        self.requests += 1
        self._changed.set()
        self._changed = trio.Event()
        if data.startswith(b"hang"):
            await trio.sleep_forever()
        await trio.sleep(0.5)  # the service's own think time, part of the scenario
        await stream.send_all(b"done:" + bytes(data))
        await stream.send_eof()


async def test_shutdown_drains_open_streams(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    service = _SlowService()
    local = await start_service(nursery, service)
    relay = await start_relay(nursery, tmp_path, drain_timeout=3.0)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=local)])
    port = client.port()
    answers: dict[str, bytes | Exception] = {}

    async def visit(name: str, payload: bytes) -> None:
        stream = await connect(port)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            got = bytearray()
            try:
                while chunk := await stream.receive_some(65536):
                    got += chunk
            except trio.BrokenResourceError as exc:
                answers[name] = exc
                return
            answers[name] = bytes(got)

    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            n.start_soon(visit, "slow", b"slow request")
            n.start_soon(visit, "hang", b"hang forever")
            await service.wait_requests(2)  # both streams are open now
            start = trio.current_time()
            relay.shutdown.set()
            # The relay closes the public listeners right after this line, before it yields.
            await logs.wait_for("shutting down: draining")
            # Stopped accepting: a new visitor is refused (the public port is closed).
            try:
                late = await connect(port)
            except OSError:
                pass
            else:
                await late.aclose()
                raise AssertionError("relay still accepts visitors while draining")
            await relay.done.wait()
            elapsed = trio.current_time() - start
    assert answers["slow"] == b"done:slow request"  # finished during the drain
    assert isinstance(answers["hang"], Exception)  # cut at the drain deadline (RST)
    assert 2.5 <= elapsed <= 6.0


async def test_client_shutdown_drains_open_streams(nursery: trio.Nursery, tmp_path: Path) -> None:
    service = _SlowService()
    local = await start_service(nursery, service)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=local)])
    with trio.fail_after(10):
        stream = await connect(client.port())
        async with stream:
            await stream.send_all(b"in flight")
            await stream.send_eof()
            await service.wait_requests(1)
            client.shutdown.set()  # the answer comes 0.5 s after the request
            got = bytearray()
            while chunk := await stream.receive_some(65536):
                got += chunk
        await client.done.wait()
    assert bytes(got) == b"done:in flight"
    assert client.error is None


async def test_remembered_auto_port_taken_falls_back_to_a_new_one(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)])
    old = client.port()
    relay.shutdown.set()
    with trio.fail_after(10):
        await relay.done.wait()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", old))
    squatter.listen()
    try:
        await start_relay(
            nursery, tmp_path, listen_port=relay.info.port, port_range=relay.config.port_range
        )
        await _wait_lines(client, 2, within=15)
        new = _ports(client.lines[1:])[0]
        assert new != old
        with trio.fail_after(10):
            assert await echo_roundtrip(new, b"moved") == b"moved"
    finally:
        squatter.close()
