"""The client resumes its session after the connection to the relay drops (protocol-spec.md
§10.6): a real relay and ``run_client`` in process on loopback, real TLS, and a TCP proxy between
them that the test cuts (both sockets aborted with RST, as a path that died) or freezes."""

from __future__ import annotations

import errno
import itertools
import socket
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from muxtunnel.client import BACKOFF_BASE, RESUME_ENDED, ClientInfo, reconnect, run_client
from muxtunnel.config import ClientConfig, TunnelSpec, build_client_config
from muxtunnel.connection import MuxConnection
from muxtunnel.errors import AuthError, ConfigError, SessionClosedError
from muxtunnel.handshake import client_handshake
from muxtunnel.leasestore import LEASES_FILE_NAME
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
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from tests.waiting import LogWatch


def _resumed(client: Client) -> str:
    """The start of the client's log line for a resumed session."""
    return f"session with relay {client.config.server_key} resumed after"


async def _run_client_into(errors: list[Exception], config: ClientConfig, **kwargs: Any) -> None:
    """``run_client``, its error appended to ``errors`` instead of raised."""
    try:
        await run_client(config, **kwargs)
    except Exception as exc:
        errors.append(exc)


async def _setup(
    nursery: trio.Nursery,
    tmp_path: Path,
    errors: list[Exception] | None = None,
    relay: Mapping[str, Any] | None = None,
    **client_overrides: object,
) -> tuple[Relay, CutProxy, Client, Stats]:
    """Echo service, relay (``relay``: its config overrides), proxy, and a client through the
    proxy (with its stats); with ``errors``, the client's error is appended there instead of
    failing the test."""
    echo = await start_echo(nursery)
    started = await start_relay(nursery, tmp_path, **(relay or {}))
    proxy = CutProxy(started.info.port)
    proxy_port = await start_service(nursery, proxy.handle)
    config = client_config(
        started,
        tmp_path / "client",
        [TunnelSpec(local_port=echo)],
        port=proxy_port,
        **client_overrides,
    )
    stats = Stats("client")
    entry = run_client if errors is None else partial(_run_client_into, errors)
    info, shutdown, scope, done, lines = await _start_entry_point(
        nursery, partial(entry, stats=stats), config
    )
    assert isinstance(info, ClientInfo)
    return started, proxy, Client(info, config, shutdown, scope, done, lines), stats


def _state(stats: Stats) -> str:
    """The client's session state in its stats (connecting, up, resuming, reconnecting)."""
    (session,) = stats.sessions.values()
    return str(session.state)


async def _echo_once(stream: trio.SocketStream, data: bytes) -> None:
    """Send ``data`` on ``stream`` and read exactly as much back; it must be the same."""
    await stream.send_all(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = await stream.receive_some(65536)
        assert chunk, f"EOF after {len(got)} of {len(data)} bytes"
        got += chunk
    assert bytes(got) == data


async def test_bulk_stream_survives_two_cuts_with_every_byte(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service manager's socket (muxtunnel.sdnotify): the client's status lines queue there.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    _relay, proxy, client, stats = await _setup(nursery, tmp_path)
    size = 8 << 20
    payload = random_bytes(size, 1)
    visitor = await connect(client.port())
    got = bytearray()
    quarter, half = trio.Event(), trio.Event()

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, size, 65536):
            await visitor.send_all(view[i : i + 65536])
        await visitor.send_eof()

    async def receive() -> None:
        while chunk := await visitor.receive_some(262144):
            got.extend(chunk)
            if len(got) >= size // 4:
                quarter.set()
            if len(got) >= size // 2:
                half.set()

    async def cuts() -> None:
        # First cut: the relay is unreachable for one attempt, then comes back.
        await quarter.wait()
        proxy.cut(down=True)
        await logs.wait_for("attempt 1 failed")
        assert _state(stats) == "resuming"
        proxy.down = False
        await logs.wait_for(_resumed(client))
        # Second cut: reachable again at once.
        await half.wait()
        proxy.cut(down=False)
        await logs.wait_for(_resumed(client), count=2)

    with trio.fail_after(90):
        async with visitor, trio.open_nursery() as inner:
            inner.start_soon(send)
            inner.start_soon(cuts)
            await receive()
    assert len(got) == size
    assert sha(bytes(got)) == sha(payload)
    assert logs.matching("1 streams continued"), logs.messages
    assert len(logs.matching(_resumed(client))) == 2
    # One session all along: no new session, no second "forwarding" line.
    assert not logs.matching("starting a new session"), logs.messages
    assert len(client.lines) == 1, client.lines
    assert client.error is None
    assert stats.counters["resumes"] == 2
    assert _state(stats) == "up"
    with notify:
        notify.setblocking(False)
        statuses = []
        while True:
            try:
                datagram = notify.recv(4096).decode()
            except BlockingIOError:
                break
            statuses += [f[7:] for f in datagram.split("\n") if f.startswith("STATUS=")]
    # The client's lines (the relay in this process notifies too), repetitions folded.
    key = client.config.server_key
    mine = [line for line in statuses if f"relay {key}" in line]
    changes = [line for i, line in enumerate(mine) if i == 0 or line != mine[i - 1]]
    up = f"connected to relay {key}: 1 of 1 tunnels up"
    resuming = f"resuming the session with relay {key}"
    assert changes == [f"connecting to relay {key}", up, resuming, up, resuming, up], statuses


async def test_keepalive_silence_resumes_the_session(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    """The path goes silent (no RST, no FIN): the keepalive declares the connection lost, and
    with resumption on that is a resume, not the end of the session."""
    _relay, proxy, client, _stats = await _setup(nursery, tmp_path, keepalive_timeout=5.0)
    with trio.fail_after(60):
        async with await connect(client.port()) as visitor:
            await _echo_once(visitor, b"before the silence")
            proxy.freeze()
            start = trio.current_time()
            await logs.wait_for(_resumed(client))
            assert trio.current_time() - start >= 4.0  # the keepalive (5 s), not a cut
            assert logs.matching("lost (peer silent for "), logs.messages
            # The same visitor connection, the same stream.
            await _echo_once(visitor, b"after the silence" * 1000)
    assert not logs.matching("starting a new session"), logs.messages
    assert proxy.carried == 2  # the first connection, and the one that resumed
    assert len(client.lines) == 1


async def _lease_written(relay: Relay, port: int) -> None:
    """Wait until the relay's leases file holds ``port`` (it is written within moments)."""
    path = relay.config.state_dir / LEASES_FILE_NAME
    while True:
        try:
            if f'"port": {port}' in path.read_text() or f'"port":{port}' in path.read_text():
                return
        except OSError:
            pass
        await trio.sleep(0.05)


async def test_relay_restarted_during_the_cut_gives_a_new_session_on_the_same_port(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay, proxy, client, _stats = await _setup(nursery, tmp_path)
    port = client.port()
    with trio.fail_after(10):
        await _lease_written(relay, port)
    with trio.fail_after(60):
        async with await connect(port) as old:
            await _echo_once(old, b"old stream")
            proxy.cut(down=True)
            relay.scope.cancel()  # the relay dies: the sessions it kept die with it
            await relay.done.wait()
            await logs.wait_for("; resuming the session")
            again = await start_relay(nursery, tmp_path, port_range=relay.config.port_range)
            proxy.target_port = again.info.port
            proxy.down = False
            # The relay answers the ticket with TICKET_UNKNOWN: a new session at once.
            ended = await logs.wait_for(f"session with relay {client.config.server_key} ended")
            assert "TICKET_UNKNOWN" in ended, ended
            await logs.wait_for("starting a new session")
            await client.lines.wait_for(2)
            # The old stream failed with the reason (access log); its visitor is gone too.
            line = await logs.wait_for("session_ended")
            assert "resume" in line, line
            with pytest.raises((trio.BrokenResourceError, AssertionError)):
                await _echo_once(old, b"x")
    assert client.lines[1] == client.lines[0], client.lines  # the same public port
    with trio.fail_after(20):
        async with await connect(port) as new:
            await _echo_once(new, b"new session")
    assert client.error is None


async def test_token_refused_while_resuming_ends_the_client(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    """The relay comes back without our token: the resume's AUTH fails, and as for a token
    revoked by a reload the client stops (never retried)."""
    errors: list[Exception] = []
    relay, proxy, client, _stats = await _setup(nursery, tmp_path, errors)
    with trio.fail_after(60):
        proxy.cut(down=True)
        relay.scope.cancel()
        await relay.done.wait()
        await logs.wait_for("; resuming the session")
        again = await start_relay(
            nursery,
            tmp_path,
            port_range=relay.config.port_range,
            tokens=("another-token-0123456789abcdef",),
        )
        proxy.target_port = again.info.port
        proxy.down = False
        await client.done.wait()
    (error,) = errors
    assert isinstance(error, AuthError), repr(error)
    assert "revoked the token" in str(error)
    assert not logs.matching("starting a new session")


async def test_a_loss_during_the_handshake_after_the_ticket_is_resumed(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ticket arrives right after RESULT(OK) for the AUTH: a loss before the client has
    finished its handshake is resumed like any other, not waited out until the handshake
    times out."""
    proxies: list[CutProxy] = []
    original = client_handshake

    async def handshake_then_loss(conn: MuxConnection, *args: Any) -> Any:
        outcomes = await original(conn, *args)
        # Still inside the handshake as far as the client is concerned: the path dies here.
        assert conn.ticket is not None
        proxies[0].cut(down=False)
        await conn.wait_suspended()
        await logs.wait_for(f"session with relay {config.server_key} resumed after")
        return outcomes

    monkeypatch.setattr("muxtunnel.client.client_handshake", handshake_then_loss)
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    proxy = CutProxy(relay.info.port)
    proxies.append(proxy)
    proxy_port = await start_service(nursery, proxy.handle)
    # The default dial timeout and backoff: not the quick ones of client_config.
    config = client_config(
        relay,
        tmp_path / "client",
        [TunnelSpec(local_port=echo)],
        port=proxy_port,
        connect_timeout=10.0,
        backoff_cap=30.0,
    )
    with trio.fail_after(10):  # not the 15 s handshake timeout and a reconnect
        info = await nursery.start(partial(run_client, config, report=lambda _: None))
    assert isinstance(info, ClientInfo)
    assert logs.matching(f"session with relay {config.server_key} resumed after")
    assert proxy.carried == 2
    with trio.fail_after(10):
        async with await connect(info.tunnels[0].remote_port) as visitor:
            await _echo_once(visitor, b"up after the resume")
    assert not logs.matching("reconnecting to")


async def test_shutdown_while_resuming_is_prompt(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    _relay, proxy, client, _stats = await _setup(nursery, tmp_path)
    with trio.fail_after(30):
        async with await connect(client.port()) as visitor:
            await _echo_once(visitor, b"open stream")
            proxy.cut(down=True)
            await logs.wait_for("; resuming the session")
            await logs.wait_for("attempt 1 failed")
            start = trio.current_time()
            client.shutdown.set()
            await client.done.wait()
    # Not the 60 s window nor the 10 s drain: at once.
    assert trio.current_time() - start < 3.0
    assert client.error is None
    assert logs.matching("disconnected from relay")


async def test_resume_window_passes_then_a_new_session_starts(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    """The client's window (2 s) is the one in force; after it, a new session, same port."""
    _relay, proxy, client, _stats = await _setup(nursery, tmp_path, resume_window=2.0)
    port = client.port()
    with trio.fail_after(60):
        proxy.cut(down=True)
        await logs.wait_for("; resuming the session (for up to 2 s)")
        ended = await logs.wait_for(f"session with relay {client.config.server_key} ended")
        assert "resume window of 2 s passed" in ended, ended
        await logs.wait_for("starting a new session")
        proxy.down = False
        await client.lines.wait_for(2)
    assert client.lines[1] == client.lines[0], client.lines
    assert not logs.matching(_resumed(client))
    with trio.fail_after(20):
        async with await connect(port) as new:
            await _echo_once(new, b"new session")


@pytest.mark.parametrize("side", ["client", "relay"])
async def test_resume_window_zero_ends_the_session_as_before(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch, side: str
) -> None:
    """Either side declaring window 0 turns resumption off: a loss ends the session, its
    streams fail, and the client reconnects (with the backoff) as without resumption."""
    if side == "client":
        _relay, proxy, client, _stats = await _setup(nursery, tmp_path, resume_window=0.0)
    else:
        relay_overrides = {"resume_window": 0.0}
        _relay, proxy, client, _stats = await _setup(nursery, tmp_path, relay=relay_overrides)
    with trio.fail_after(60):
        async with await connect(client.port()) as visitor:
            await _echo_once(visitor, b"open stream")
            proxy.cut(down=False)
            await logs.wait_for("reconnecting to")
            await client.lines.wait_for(2)
            line = await logs.wait_for("session_ended")
            assert "transport" in line, line
    assert not logs.matching("resuming the session")


async def test_a_session_that_could_not_be_resumed_is_replaced_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``reconnect``: after RESUME_ENDED no backoff (the relay answered; the session is gone),
    while a session that just ended keeps the backoff."""
    starts: list[float] = []

    async def run_session(shutdown: trio.Event, on_up: Callable[[object], None]) -> object:
        starts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if len(starts) > 3:  # then the relay refuses connections
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        on_up(None)
        await trio.sleep(1.0)  # up briefly, then lost and not resumed
        return RESUME_ENDED

    delays: list[float] = []
    with pytest.raises(SessionClosedError):
        await reconnect(
            run_session,
            server_key="relay.example:7835",
            max_retries=5,
            backoff_cap=30.0,
            shutdown=trio.Event(),
            task_status=trio.TASK_STATUS_IGNORED,
            on_retry=delays.append,
        )
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[:3] == [1.0, 1.0, 1.0]  # the session's own second, no wait
    assert len(delays) == 4  # then the backoff
    assert all(d >= BACKOFF_BASE / 2 for d in delays)


def test_resume_window_option() -> None:
    base = {"server": "relay.example", "token": [TOKEN], "tunnel": ["22"]}
    assert build_client_config({}, base).resume_window == 60.0
    assert build_client_config({}, {**base, "resume-window": 0}).resume_window == 0.0
    assert build_client_config({"resume-window": 600}, base).resume_window == 600.0
    for bad in (-1, 604_801, "soon"):
        with pytest.raises(ConfigError, match="resume-window"):
            build_client_config({}, {**base, "resume-window": bad})
    assert ClientConfig.__dataclass_fields__["resume_window"].default == 60.0


async def test_a_resume_that_completes_as_the_attempt_times_out_counts_as_resumed(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt's deadline can fire after RESUMED was processed but before ``resume_over``
    returns (a channel receive checks for cancellation before taking a queued event): the
    session is resumed all the same, and the client must say so and show it as up."""
    original = MuxConnection.resume_over

    async def late(self: MuxConnection, *args: Any, **kwargs: Any) -> None:
        await original(self, *args, **kwargs)
        assert not self.suspended  # resumed ...
        raise trio.TooSlowError  # ... but the attempt's timeout struck on the way out

    monkeypatch.setattr(MuxConnection, "resume_over", late)
    _relay, proxy, client, stats = await _setup(nursery, tmp_path)
    with trio.fail_after(30):
        async with await connect(client.port()) as visitor:
            await _echo_once(visitor, b"before the cut")
            proxy.cut(down=False)
            await logs.wait_for(_resumed(client))
            await _echo_once(visitor, b"after the cut" * 1000)
    assert _state(stats) == "up"
    assert stats.counters["resumes"] == 1
    # Not reported as a failed attempt (one that really failed would be followed by another).
    assert not logs.matching("failed: timed out"), logs.messages
