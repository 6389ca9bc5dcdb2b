"""Private tunnels: a relay, a publishing client and ``muxtunnel visit`` in one process.

Real TLS and real loopback sockets. The publisher's tunnel has no public port; the visitor
listens locally and every connection is carried relay-side from one mux stream to another.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import TYPE_CHECKING

import pytest
import trio

import muxtunnel.registry
from muxtunnel.access import AddressRule, TokenPolicy, parse_cidr
from muxtunnel.config import (
    TunnelSpec,
    VisitConfig,
    build_client_config,
    build_visit_config,
    load_toml,
)
from muxtunnel.errors import ConfigError, TunnelError
from muxtunnel.tokens import plaintext_entry
from muxtunnel.visitor import VisitInfo, run_visitor

from .conftest import (
    TOKEN,
    Relay,
    _start_entry_point,
    connect,
    dead_port,
    echo_roundtrip,
    random_bytes,
    sha,
    start_client,
    start_echo,
    start_relay,
    start_service,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .conftest import Client


class LogWatch(logging.Handler):
    """Keeps the messages of the ``muxtunnel`` loggers; lets a test await one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._changed.set()

    async def wait_for(self, text: str) -> str:
        """Return the first message containing ``text``, once there is one."""
        while True:
            for message in self.messages:
                if text in message:
                    return message
            self._changed = trio.Event()
            await self._changed.wait()


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("muxtunnel")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


HOME = "home-token-0123456789abcdef"
GUEST = "guest-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"


def _entries(guest_visit: tuple[str, ...] = ()) -> tuple[object, ...]:
    """Named tokens: ``home`` publishes, ``guest`` may visit ``guest_visit``, ``other`` nothing."""
    return (
        dataclasses.replace(plaintext_entry(HOME), name="home"),
        dataclasses.replace(
            plaintext_entry(GUEST), name="guest", policy=TokenPolicy(visit=guest_visit)
        ),
        dataclasses.replace(plaintext_entry(OTHER), name="other"),
    )


async def start_visitor(
    nursery: trio.Nursery,
    tmp_path: Path,
    relay: Relay,
    name: str,
    *,
    token: str = TOKEN,
    state: str = "visitor",
) -> tuple[VisitInfo, trio.Event, list[str]]:
    """Start ``run_visitor`` for private tunnel ``name`` on 127.0.0.1 (free port)."""
    config = VisitConfig(
        server_host="127.0.0.1",
        server_port=relay.info.port,
        token=token,
        fingerprint=relay.info.fingerprint,
        state_dir=tmp_path / state,
        name=name,
        listen_port=0,
        backoff_cap=1.0,
    )
    info, shutdown, _scope, _done, lines = await _start_entry_point(nursery, run_visitor, config)
    assert isinstance(info, VisitInfo)
    return info, shutdown, lines


async def publish(
    nursery: trio.Nursery,
    tmp_path: Path,
    relay: Relay,
    local_port: int,
    name: str,
    *,
    token: str = TOKEN,
    state: str = "publisher",
    rule: AddressRule | None = None,
) -> Client:
    spec = TunnelSpec(local_port=local_port, private=name, visitors=rule or AddressRule())
    return await start_client(nursery, tmp_path, relay, [spec], name=state, token=token)


def public_listeners(relay: Relay) -> list[int]:
    """Ports of the relay's public range that accept a connection now."""
    lo, hi = relay.config.port_range
    found = []
    for port in range(lo, hi + 1):
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                found.append(port)
    return found


async def _reply_after_eof(stream: trio.SocketStream) -> None:
    """Read until the visitor half-closes, then answer with the byte count and a hash."""
    data = bytearray()
    async with stream:
        while chunk := await stream.receive_some(65536):
            data += chunk
        await stream.send_all(f"{len(data)} {sha(bytes(data))}\n".encode())
        await stream.send_eof()


async def _read_all(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


async def test_bytes_both_ways_half_close_and_no_public_port(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = await start_relay(nursery, tmp_path)
    service = await start_service(nursery, _reply_after_eof)
    client = await publish(nursery, tmp_path, relay, service, "svc")
    assert client.lines == [f"private tunnel svc -> 127.0.0.1:{service}"]
    assert client.info.tunnels[0].remote_port == 0
    visit, _, lines = await start_visitor(nursery, tmp_path, relay, "svc")
    assert lines == [f"visiting private tunnel svc on 127.0.0.1:{visit.port}"]

    with trio.fail_after(20):
        payload = random_bytes(300_000, seed=1)
        stream = await connect(visit.port)
        async with stream:
            await stream.send_all(payload)
            # Half-close: the service answers only after our FIN reached it.
            await stream.send_eof()
            answer = await _read_all(stream)
        assert answer == f"{len(payload)} {sha(payload)}\n".encode()
        # Several connections at once, echoed both ways.
        echo = await start_echo(nursery)
        await publish(nursery, tmp_path, relay, echo, "echo", state="publisher2")
        visit2, _, _ = await start_visitor(nursery, tmp_path, relay, "echo", state="v2")
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = await echo_roundtrip(visit2.port, random_bytes(50_000 + i, seed=i))

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(one, i)
        assert all(results[i] == random_bytes(50_000 + i, seed=i) for i in range(8))
    # Nothing on the relay's public side: no port of its range accepts a connection.
    assert await trio.to_thread.run_sync(public_listeners, relay) == []


async def test_big_transfer_hash(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path)
    echo = await start_echo(nursery)
    await publish(nursery, tmp_path, relay, echo, "bulk")
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "bulk")
    payload = random_bytes(24 * 1024 * 1024, seed=7)
    with trio.fail_after(120):
        got = await echo_roundtrip(visit.port, payload)
    assert len(got) == len(payload)
    assert sha(got) == sha(payload)


async def test_publisher_absent_closes_local_connection(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path)
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "nobody")
    with trio.fail_after(20):
        stream = await connect(visit.port)
        local_port = stream.socket.getsockname()[1]
        async with stream:
            await stream.send_all(b"SSH-2.0-early-data\r\n")
            with pytest.raises(trio.BrokenResourceError):
                await _read_all(stream)  # reset: not a clean EOF
        wanted = (
            f"connection from 127.0.0.1:{local_port} to private tunnel "
            "nobody refused by the relay: UNREACHABLE: no private tunnel nobody is up"
        )
        await logs.wait_for(wanted)
    # The listener stays up: the next connection is refused the same way.
    with trio.fail_after(20):
        stream = await connect(visit.port)
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await _read_all(stream)


async def test_policy_denies_visit_of_another_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path, token_entries=_entries(guest_visit=("ssh-*",)))
    echo = await start_echo(nursery)
    await publish(nursery, tmp_path, relay, echo, "db", token=HOME)
    await publish(nursery, tmp_path, relay, echo, "ssh-home", token=HOME, state="pub2")
    # "other" may visit nothing of "home": the BIND is denied and the command ends.
    with (
        trio.fail_after(20),
        pytest.raises(TunnelError, match=r"DENIED: token other may not visit db"),
    ):
        await start_visitor(nursery, tmp_path, relay, "db", token=OTHER, state="v-other")
    # "guest" may visit ssh-* only.
    with (
        trio.fail_after(20),
        pytest.raises(TunnelError, match=r"DENIED: token guest may not visit db"),
    ):
        await start_visitor(nursery, tmp_path, relay, "db", token=GUEST, state="v-guest")
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "ssh-home", token=GUEST)
    with trio.fail_after(20):
        assert await echo_roundtrip(visit.port, b"hello") == b"hello"
    # The publisher's own token visits without any grant.
    own, _, _ = await start_visitor(nursery, tmp_path, relay, "db", token=HOME, state="v-home")
    with trio.fail_after(20):
        assert await echo_roundtrip(own.port, b"mine") == b"mine"


async def test_name_held_by_another_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path, token_entries=_entries())
    echo = await start_echo(nursery)
    await publish(nursery, tmp_path, relay, echo, "svc", token=HOME)
    # ADDRESS_IN_USE can pass (the holder may leave): the client stays up, retrying it.
    with trio.fail_after(20):
        other = await publish(nursery, tmp_path, relay, echo, "svc", token=OTHER, state="pub-other")
    assert other.info.tunnels == ()


async def test_publisher_allow_list_applies_to_visiting_client(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path)
    echo = await start_echo(nursery)
    rule = AddressRule(allow=(parse_cidr("10.0.0.0/8"),))
    await publish(nursery, tmp_path, relay, echo, "lan", rule=rule)
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "lan")
    with trio.fail_after(20):
        stream = await connect(visit.port)
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await _read_all(stream)
        await logs.wait_for(
            "refused by the relay: REFUSED: visitor 127.0.0.1: not in the allow list"
        )


async def test_publisher_going_away_resets_visit_streams(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    # A publisher gone without CLOSE may come back: its session is kept for the resume window
    # (protocol-spec.md §10.6), then ends like any other.
    relay = await start_relay(nursery, tmp_path, resume_window=1.0)
    echo = await start_echo(nursery)
    client = await publish(nursery, tmp_path, relay, echo, "gone")
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "gone")
    with trio.fail_after(20):
        stream = await connect(visit.port)
        async with stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"
            client.scope.cancel()  # the publisher's process goes away
            await client.done.wait()
            with pytest.raises(trio.BrokenResourceError):
                await _read_all(stream)  # reset, not a clean EOF
        await logs.wait_for("private tunnel gone (tunnel 1, token")
        # Gone from the directory: a new connection is refused as unreachable.
        stream = await connect(visit.port)
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await _read_all(stream)
        await logs.wait_for("refused by the relay: UNREACHABLE: no private tunnel gone is up")


def test_private_flag_config(tmp_path: Path) -> None:
    base = {"server": "relay.example", "token": [TOKEN]}
    cfg = build_client_config({}, {**base, "tunnel": ["db.lan:5432"], "private": "pg"})
    assert cfg.tunnels == (TunnelSpec(local_port=5432, local_host="db.lan", private="pg"),)
    with pytest.raises(ConfigError, match="exactly one SPEC"):
        build_client_config({}, {**base, "tunnel": ["22", "80"], "private": "pg"})
    with pytest.raises(ConfigError, match="without a REMOTE_PORT"):
        build_client_config({}, {**base, "tunnel": ["2222:22"], "private": "pg"})
    with pytest.raises(ConfigError, match="invalid private tunnel name"):
        build_client_config({}, {**base, "tunnel": ["22"], "private": "Bad Name"})
    path = tmp_path / "both.toml"
    path.write_text(
        'server = "relay.example:7000"\n'
        f'token = "{TOKEN}"\n'
        '[[tunnel]]\nlocal_port = 22\nprivate = "ssh-home"\n'
        '[visit]\nname = "ssh-home"\nlisten = "127.0.0.2:2222"\n'
    )
    client = build_client_config(load_toml(path, "client"), {}, config_path=path)
    assert client.tunnels[0].private == "ssh-home"
    visit = build_visit_config(load_toml(path, "visit"), {}, config_path=path)
    assert (visit.name, visit.listen_host, visit.listen_port) == ("ssh-home", "127.0.0.2", 2222)
    assert (visit.server_host, visit.server_port) == ("relay.example", 7000)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tunnel]]\nlocal_port = 22\nremote_port = 2222\nprivate = "x"\n')
    with pytest.raises(ConfigError, match="has no public port"):
        build_client_config(load_toml(bad, "client"), base, config_path=bad)
    flags = {**base, "name": "svc", "listen": "2222"}
    assert build_visit_config({}, flags).listen_host == "127.0.0.1"


async def test_name_held_by_live_session_of_same_token(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A live client answers the probe in milliseconds; a loaded machine must not make it
    # look silent.
    monkeypatch.setattr(muxtunnel.registry, "TAKEOVER_PROBE_TIMEOUT", 30.0)
    relay = await start_relay(nursery, tmp_path)
    echo = await start_echo(nursery)
    await publish(nursery, tmp_path, relay, echo, "svc")
    # The holder answers the liveness probe: it keeps the name.
    with trio.fail_after(20):
        second = await publish(nursery, tmp_path, relay, echo, "svc", state="pub-2")
    assert second.info.tunnels == ()  # pending: retried in the background
    await logs.wait_for(
        "private tunnel svc (tunnel 1) refused: ADDRESS_IN_USE: "
        "private tunnel svc is published by another client"
    )


async def test_relay_without_visits_is_refused_clearly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = await start_relay(nursery, tmp_path, max_visit_streams=0)
    with trio.fail_after(20), pytest.raises(TunnelError, match="does not carry visits"):
        await start_visitor(nursery, tmp_path, relay, "svc")


async def test_relay_drain_lets_visit_streams_finish(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    relay = await start_relay(nursery, tmp_path, drain_timeout=30.0)
    echo = await start_echo(nursery)
    await publish(nursery, tmp_path, relay, echo, "svc")
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "svc")
    with trio.fail_after(25):
        stream = await connect(visit.port)
        async with stream:
            await stream.send_all(b"before")
            assert await stream.receive_some(6) == b"before"
            relay.shutdown.set()
            await logs.wait_for("shutting down: draining")
            await stream.send_all(b"during")
            assert await stream.receive_some(6) == b"during"
            assert not relay.done.is_set()
            await stream.send_eof()
            assert await _read_all(stream) == b""
        await relay.done.wait()


async def test_flow_control_end_to_end(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A service that never reads stops the visitor's writes: no hop buffers without bound."""
    release = trio.Event()
    accepted = trio.Event()

    async def never_reads(stream: trio.SocketStream) -> None:
        accepted.set()
        async with stream:
            await release.wait()

    relay = await start_relay(nursery, tmp_path)
    service = await start_service(nursery, never_reads)
    await publish(nursery, tmp_path, relay, service, "sink")
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "sink")
    chunk = bytes(1024 * 1024)
    limit = 160  # MiB the test offers at most
    sent = 0
    with trio.fail_after(120):
        stream = await connect(visit.port)
        async with stream:
            await accepted.wait()
            for _ in range(limit):
                with trio.move_on_after(3) as blocked:
                    await stream.send_all(chunk)
                if blocked.cancelled_caught:
                    break
                sent += 1
            release.set()
    # Kernel buffers on four loopback sockets plus the two hops' stream windows (each at most
    # 16 MiB once auto-tuned) hold it; without flow control the relay would take all 160 MiB.
    assert sent < 64, f"{sent} MiB went in although nothing reads them"


async def test_publisher_open_fail_reaches_visitor(
    nursery: trio.Nursery, tmp_path: Path, logs: LogWatch
) -> None:
    """The publisher cannot reach its service: its OPEN_FAIL (reason, text) comes through."""
    relay = await start_relay(nursery, tmp_path)
    down = dead_port()
    await publish(nursery, tmp_path, relay, down, "down")
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "down")
    with trio.fail_after(20):
        stream = await connect(visit.port)
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await _read_all(stream)
        line = await logs.wait_for("to private tunnel down refused by the relay: CONNECT_FAILED: ")
    assert f"private tunnel down: connect to 127.0.0.1:{down} failed" in line
