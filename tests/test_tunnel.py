"""Relay + client in one process over real TLS on loopback: the tunnel end to end."""

from __future__ import annotations

import errno
import random
import socket
import struct
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel.client import run_client
from muxtunnel.config import ClientConfig, TunnelSpec
from muxtunnel.connection import MuxConnection
from muxtunnel.errors import AuthError, IdentityMismatchError, SessionClosedError
from muxtunnel.handshake import client_handshake
from muxtunnel.protocol.constants import ResultStatus
from muxtunnel.protocol.events import ResultReceived
from muxtunnel.protocol.frames import Address
from tests.conftest import (
    TOKEN,
    Relay,
    connect,
    dead_port,
    echo_roundtrip,
    free_port_range,
    random_bytes,
    sha,
    start_client,
    start_echo,
    start_relay,
    start_service,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.waiting import LogWatch


async def test_echo_through_tunnel(nursery: trio.Nursery, tmp_path: Path) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)])
    port = client.port()
    lo, hi = relay.config.port_range
    assert lo <= port <= hi
    assert client.lines == [f"forwarding tcp://127.0.0.1:{port} -> 127.0.0.1:{echo}"]
    assert relay.lines == [f"muxtunnel relay listening on 127.0.0.1:{relay.info.port}"]
    with trio.fail_after(10):
        assert await echo_roundtrip(port, b"hello") == b"hello"
        assert await echo_roundtrip(port, b"") == b""


async def test_many_concurrent_streams_both_directions(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """>= 32 concurrent streams, random sizes 0-4 MiB, sha256-checked both ways."""
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)])
    port = client.port()
    rng = random.Random(1234)
    sizes = [0, 1, 4 * 1024 * 1024] + [rng.randrange(0, 4 * 1024 * 1024) for _ in range(33)]
    results: dict[int, bool] = {}

    async def one(i: int, size: int) -> None:
        payload = random_bytes(size, i)
        got = await echo_roundtrip(port, payload)
        results[i] = len(got) == size and sha(got) == sha(payload)

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for i, size in enumerate(sizes):
                n.start_soon(one, i, size)
    assert len(results) == len(sizes) >= 32
    assert all(results.values()), [i for i, ok in results.items() if not ok]


async def _request_response_handler(stream: trio.SocketStream) -> None:
    """Reads the whole request until EOF, then answers with its sha256 and a tail, then FIN."""
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.send_all(sha(bytes(data)).encode() + b"\nbye\n")
    await stream.send_eof()


async def test_half_close_request_response(nursery: trio.Nursery, tmp_path: Path) -> None:
    local = await start_service(nursery, _request_response_handler)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=local)])
    request = random_bytes(3 * 1024 * 1024 + 17, 5)
    with trio.fail_after(20):
        stream = await connect(client.port())
        async with stream:
            await stream.send_all(request)
            await stream.send_eof()  # shutdown(SHUT_WR): the reply must still arrive
            reply = bytearray()
            while chunk := await stream.receive_some(65536):
                reply += chunk
    assert bytes(reply) == sha(request).encode() + b"\nbye\n"


async def test_dead_local_port_resets_visitor_fast_others_flow(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=dead_port()), TunnelSpec(local_port=echo)]
    )
    dead_public, live_public = client.port(0), client.port(1)
    assert dead_public != live_public

    async def keep_flowing() -> None:
        for i in range(20):
            payload = random_bytes(100_000, i)
            assert await echo_roundtrip(live_public, payload) == payload

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(keep_flowing)
            for _ in range(3):
                start = trio.current_time()
                stream = await connect(dead_public)
                async with stream:
                    await stream.send_all(b"anyone there?")
                    try:
                        data = await stream.receive_some(100)
                    except trio.BrokenResourceError as exc:
                        # The relay aborted the visitor socket: an RST, not a clean close.
                        cause = exc.__cause__
                        assert isinstance(cause, OSError)
                        assert cause.errno == errno.ECONNRESET
                    else:
                        raise AssertionError(f"expected a reset, got {data!r}")
                assert trio.current_time() - start < 1.0


async def test_reset_maps_to_rst(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The local service aborts its socket (RST): the visitor sees a reset, not an EOF."""

    async def aborting(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(stream)

    local = await start_service(nursery, aborting)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=local)])
    with trio.fail_after(10):
        stream = await connect(client.port())
        async with stream:
            await stream.send_all(b"x")

            async def read_all() -> None:
                while await stream.receive_some(100):
                    pass

            with pytest.raises(trio.BrokenResourceError):
                await read_all()


async def test_wrong_token_is_final_and_binds_nothing(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path)
    config_client = await _client_config(
        tmp_path, relay, token="wrong-token", tunnels=[TunnelSpec(local_port=22)]
    )
    with trio.fail_after(10), pytest.raises(AuthError, match="authentication failed"):
        await run_client(config_client, report=lambda _line: None)
    assert relay.scope is not None
    with trio.fail_after(10):
        refused = await logs.wait_for("wrong token")  # the relay's side of it is over
    assert "127.0.0.1" in refused
    assert not relay_leases(relay)


async def test_wrong_fingerprint_is_final(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path)
    config = await _client_config(
        tmp_path, relay, fingerprint="sha256:" + "00" * 32, tunnels=[TunnelSpec(local_port=22)]
    )
    with trio.fail_after(10), pytest.raises(IdentityMismatchError):
        await run_client(config, report=lambda _line: None)
    assert not relay_leases(relay)


async def test_tofu_pins_then_refuses_changed_certificate(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    config = await _client_config(
        tmp_path, relay, fingerprint=None, tunnels=[TunnelSpec(local_port=echo)]
    )
    lines: list[str] = []
    shutdown = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(
            lambda task_status: run_client(
                config, shutdown=shutdown, report=lines.append, task_status=task_status
            )
        )
        shutdown.set()
    assert any("pinned relay" in line for line in lines)
    # A relay with another identity on the same address: refused.
    relay.shutdown.set()
    await relay.done.wait()
    other = await start_relay(nursery, tmp_path, name="other-relay", listen_port=relay.info.port)
    assert other.info.fingerprint != relay.info.fingerprint
    with trio.fail_after(10), pytest.raises(IdentityMismatchError, match="pinned"):
        await run_client(config, report=lambda _line: None)


async def test_port_out_of_range_or_in_use_fails_only_that_tunnel(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    lo, hi = relay.config.port_range
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", lo + 3))
    squatter.listen()
    try:
        client = await start_client(
            nursery,
            tmp_path,
            relay,
            [
                TunnelSpec(local_port=echo, remote_port=hi + 1),  # out of range
                TunnelSpec(local_port=echo, remote_port=lo + 3),  # in use
                TunnelSpec(local_port=echo, remote_port=lo + 5),  # fine
                TunnelSpec(local_port=echo),  # auto
            ],
        )
        ports = [t.remote_port for t in client.info.tunnels]
        assert lo + 5 in ports
        assert len(ports) == 2
        assert len(client.lines) == 2
        with trio.fail_after(10):
            for port in ports:
                assert await echo_roundtrip(port, b"ping") == b"ping"
    finally:
        squatter.close()


async def test_max_retries_gives_up(tmp_path: Path) -> None:
    config = ClientConfig(
        server_host="127.0.0.1",
        server_port=dead_port(),
        token=TOKEN,
        fingerprint="sha256:" + "11" * 32,
        state_dir=tmp_path / "c",
        tunnels=(TunnelSpec(local_port=22),),
        max_retries=2,
        backoff_cap=0.05,
    )
    with trio.fail_after(10), pytest.raises(SessionClosedError, match="giving up"):
        await run_client(config, report=lambda _line: None)


def relay_leases(relay: Relay) -> list[int]:
    """Ports the relay process holds right now (probe by binding)."""
    lo, hi = relay.config.port_range
    held = []
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                held.append(port)
    return held


async def _client_config(tmp_path: Path, relay: Relay, **overrides: object) -> ClientConfig:
    config = ClientConfig(
        server_host="127.0.0.1",
        server_port=relay.info.port,
        token=TOKEN,
        fingerprint=relay.info.fingerprint,
        state_dir=tmp_path / "client-x",
        tunnels=(),
        max_retries=0,
        backoff_cap=0.1,
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


async def test_ca_verification_mode(nursery: trio.Nursery, tmp_path: Path) -> None:
    """With --ca the chain and host name are checked by TLS (no pin, no known-hosts file)."""
    from muxtunnel.tls import load_or_create_identity

    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    cert = relay.config.state_dir / "cert.pem"
    config = await _client_config(
        tmp_path, relay, fingerprint=None, ca_file=cert, tunnels=[TunnelSpec(local_port=echo)]
    )
    lines: list[str] = []
    shutdown = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            info = await n.start(
                lambda task_status: run_client(
                    config, shutdown=shutdown, report=lines.append, task_status=task_status
                )
            )
            assert await echo_roundtrip(info.tunnels[0].remote_port, b"ca") == b"ca"
            shutdown.set()
    assert not any("pinned" in line for line in lines)
    other = load_or_create_identity(tmp_path / "other-ca")
    wrong = replace(config, ca_file=other.cert_path)
    with trio.fail_after(10), pytest.raises(IdentityMismatchError, match="verification"):
        await run_client(wrong, report=lambda _line: None)


async def test_handshake_flood_is_bounded(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path, max_startups=2)
    with trio.fail_after(10):
        # Stuck before TLS. The relay accepts (and admits) in the kernel's accept-queue order,
        # so these two hold both handshake slots before the next connection is looked at.
        idle = [await connect(relay.info.port) for _ in range(2)]
        try:
            extra = await connect(relay.info.port)
        except OSError:
            pass  # reset at once, even before connect() returned
        else:
            async with extra:
                with pytest.raises(trio.BrokenResourceError):
                    await extra.receive_some(10)  # reset at once
        for stream in idle:
            await stream.aclose()
        # Once the idle ones are gone, real clients get in again.
        echo = await start_echo(nursery)
        client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)])
        assert await echo_roundtrip(client.port(), b"in") == b"in"


async def _raw_client(nursery: trio.Nursery, relay: Relay) -> MuxConnection:
    """A bare MuxConnection (real TLS) to the relay, authenticated, no tunnels yet."""
    from muxtunnel.connection import make_session
    from muxtunnel.protocol.constants import Role
    from muxtunnel.tls import client_ssl_context

    tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
    tls = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
    conn = MuxConnection(tls, make_session(Role.CLIENT), name="raw")
    await nursery.start(conn.run)
    assert await client_handshake(conn, TOKEN, []) == []
    return conn


async def _request(conn: MuxConnection, send: Callable[[], None]) -> ResultReceived:
    send()
    while True:
        event = await conn.next_control_event()
        if isinstance(event, ResultReceived):
            return event


async def test_relay_control_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    """BIND errors that the real client never provokes, and UNBIND releasing the port."""
    relay = await start_relay(nursery, tmp_path, max_tunnels_per_client=2)
    lo, hi = relay.config.port_range
    conn = await _raw_client(nursery, relay)
    any_port = Address(None, 0)
    with trio.fail_after(10):
        ok = await _request(conn, lambda: conn.send_bind(10, 1, Address("0.0.0.0", lo + 1)))
        assert ok.status == ResultStatus.OK
        assert ok.bound == Address("127.0.0.1", lo + 1)
        dup = await _request(conn, lambda: conn.send_bind(11, 1, any_port))
        assert dup.status == ResultStatus.DUPLICATE_TUNNEL
        proto = await _request(conn, lambda: conn.send_bind(12, 2, any_port, proto=9))
        assert proto.status == ResultStatus.UNSUPPORTED_PROTO
        second = await _request(conn, lambda: conn.send_bind(13, 2, any_port))
        assert second.status == ResultStatus.OK
        assert second.bound is not None
        assert lo <= second.bound.port <= hi
        third = await _request(conn, lambda: conn.send_bind(14, 3, any_port))
        assert third.status == ResultStatus.LIMIT_REACHED
        gone = await _request(conn, lambda: conn.send_unbind(15, 1))
        assert gone.status == ResultStatus.OK
        unknown = await _request(conn, lambda: conn.send_unbind(16, 42))
        assert unknown.status == ResultStatus.UNKNOWN_TUNNEL
        # Released at once by UNBIND (no lease): the port can be bound by anyone now.
        with socket.socket() as s:
            s.bind(("127.0.0.1", lo + 1))
        await conn.aclose()


async def test_auto_port_never_takes_an_explicit_port_of_the_same_client(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A 3-port range: auto tunnels listed first must not grab the explicitly requested ports."""
    echo = await start_echo(nursery)
    lo, _hi = free_port_range(3)
    relay = await start_relay(nursery, tmp_path, port_range=(lo, lo + 2))
    specs = [
        TunnelSpec(local_port=echo),
        TunnelSpec(local_port=echo),
        TunnelSpec(local_port=echo, remote_port=lo + 1),
    ]
    client = await start_client(nursery, tmp_path, relay, specs)
    ports = [t.remote_port for t in client.info.tunnels]
    assert ports[2] == lo + 1
    assert sorted(ports) == [lo, lo + 1, lo + 2]
