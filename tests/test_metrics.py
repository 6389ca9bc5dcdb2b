"""The Prometheus endpoint (muxtunnel.metrics): real relay and client, real HTTP scrapes."""

from __future__ import annotations

import contextlib
import math
import socket
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from muxtunnel import connection, metrics
from muxtunnel.client import ClientInfo, run_client
from muxtunnel.config import (
    ClientConfig,
    ServerConfig,
    TunnelSpec,
    build_client_config,
    build_server_config,
)
from muxtunnel.errors import AuthError, ConfigError
from muxtunnel.metrics import make_registry
from muxtunnel.policy import StreamInfo
from muxtunnel.preflight import ListenError
from muxtunnel.protocol.frames import Address
from muxtunnel.server import ServerInfo, serve
from muxtunnel.stats import Stats

from .conftest import (
    TOKEN,
    Client,
    Relay,
    _start_entry_point,
    dead_port,
    free_port_range,
    random_bytes,
    start_service,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from prometheus_client.metrics_core import Metric

#: Bytes each visitor sends, and bytes the service answers with (distinct, to tell the
#: directions apart).
UP = 300_001
DOWN = 123_457
VISITORS = 3
#: A second loopback address: the visitors' source, which no label may ever contain.
VISITOR_HOST = "127.0.0.2"
#: Bound of every wait for the stats to catch up (seconds).
WAIT = 20.0


# --------------------------------------------------------------------------------------------
# helpers


async def http_get(
    port: int, request: bytes, *, eof: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` to 127.0.0.1:``port`` (then EOF if asked); the status code, headers and
    body of the answer."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            if eof:
                await stream.send_eof()
            data = bytearray()
            while len(data) < 16 * 1024 * 1024:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def scrape(port: int) -> dict[str, Metric]:
    """``GET /metrics`` over a real socket, parsed with prometheus_client's own parser."""
    status, headers, body = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    """The value of the one sample named ``sample`` whose labels include ``labels``."""
    name = sample
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        name = name.removesuffix(suffix)
    family = families[name]
    hits = [
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(hits) == 1, (sample, labels, family.samples)
    return hits[0]


def label_values(families: dict[str, Metric]) -> set[str]:
    return {v for f in families.values() for s in f.samples for v in s.labels.values()}


async def answer_after_eof(stream: trio.SocketStream) -> None:
    """The local service: read everything until EOF, then send DOWN bytes and close."""
    async with stream:
        got = 0
        while chunk := await stream.receive_some(65536):
            got += len(chunk)
        assert got == UP
        await stream.send_all(random_bytes(DOWN, seed=7))


async def visit(port: int) -> str:
    """One visitor from VISITOR_HOST: UP bytes out, DOWN bytes back; returns its address."""
    sock = trio.socket.socket()
    await sock.bind((VISITOR_HOST, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    source = "{}:{}".format(*sock.getsockname())
    got = 0
    with trio.fail_after(30):
        async with stream:
            await stream.send_all(random_bytes(UP, seed=3))
            await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                got += len(chunk)
    assert got == DOWN
    return source


async def start_relay(
    nursery: trio.Nursery, tmp_path: Path, stats: Stats, **overrides: object
) -> Relay:
    """``serve`` on 127.0.0.1 with ``stats`` (as tests/conftest.py's start_relay, plus stats=)."""
    config = ServerConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        port_range=free_port_range(),
        bind_host="127.0.0.1",
        tokens=(TOKEN,),
        state_dir=tmp_path / "relay",
        lease_seconds=60.0,
        drain_timeout=5.0,
        handshake_timeout=5.0,
        # The smallest keepalive (5 s): PINGs, and so RTT samples, after 1.25 s of silence.
        keepalive_timeout=5.0,
    )
    config = replace(config, **overrides)  # type: ignore[arg-type]
    started = await _start_entry_point(nursery, partial(serve, stats=stats), config)
    info, shutdown, scope, done, lines = started
    assert isinstance(info, ServerInfo)
    return Relay(info, config, shutdown, scope, done, lines)


async def start_client(
    nursery: trio.Nursery,
    tmp_path: Path,
    relay: Relay,
    stats: Stats,
    service: int,
    **overrides: object,
) -> Client:
    """``run_client`` with ``stats``, one tunnel to 127.0.0.1:``service``, up when it returns."""
    config = ClientConfig(
        server_host="127.0.0.1",
        server_port=relay.info.port,
        token=TOKEN,
        fingerprint=relay.info.fingerprint,
        state_dir=tmp_path / "client",
        tunnels=(TunnelSpec(service),),
        max_retries=None,
        connect_timeout=2.0,
        backoff_cap=1.0,
        keepalive_timeout=5.0,
    )
    config = replace(config, **overrides)  # type: ignore[arg-type]
    started = await _start_entry_point(nursery, partial(run_client, stats=stats), config)
    info, shutdown, scope, done, lines = started
    assert isinstance(info, ClientInfo)
    return Client(info, config, shutdown, scope, done, lines)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` is true (bounded by WAIT seconds)."""
    deadline = trio.current_time() + WAIT
    while not condition():
        assert trio.current_time() < deadline, f"timed out waiting for {what}"
        await trio.sleep(0.02)


# --------------------------------------------------------------------------------------------
# end to end


async def test_scrape_after_known_transfer(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay_stats, client_stats = Stats("relay"), Stats("client")
    relay_metrics, client_metrics = dead_port(), dead_port()
    relay = await start_relay(nursery, tmp_path, relay_stats, metrics=("127.0.0.1", relay_metrics))
    service = await start_service(nursery, answer_after_eof)
    client = await start_client(
        nursery, tmp_path, relay, client_stats, service, metrics=("127.0.0.1", client_metrics)
    )
    public = client.port()
    tunnel = f"127.0.0.1:{public}"

    sources = [await visit(public) for _ in range(VISITORS)]

    # A wrong token: refused, and counted by the relay.
    bad = replace(client.config, token="wrong-token-0123456789abcdef", metrics=None)
    bad = replace(bad, state_dir=tmp_path / "bad", max_retries=0)
    with trio.fail_after(20), pytest.raises(AuthError):
        await run_client(bad, report=lambda _: None)

    # Bytes count when a splice copies them: wait for the streams to end on both sides,
    # and for an RTT sample on each (the relay's come from keepalive PINGs).
    await wait_for(lambda: relay_stats.totals()["streams_open"] == 0, "relay streams closed")
    await wait_for(lambda: client_stats.totals()["streams_open"] == 0, "client streams closed")
    await wait_for(lambda: relay_stats.rtt_count > 0, "an RTT sample on the relay")
    await wait_for(lambda: client_stats.rtt_count > 0, "an RTT sample on the client")

    for port, role in ((relay_metrics, "relay"), (client_metrics, "client")):
        families = await scrape(port)
        role_of = {"role": role}
        for direction, expected in (("from_visitor", UP), ("to_visitor", DOWN)):
            per_tunnel = value(
                families,
                "muxtunnel_tunnel_bytes_total",
                tunnel=tunnel,
                direction=direction,
                **role_of,
            )
            assert per_tunnel == VISITORS * expected, (role, direction)
            overall = value(families, "muxtunnel_bytes_total", direction=direction, **role_of)
            assert overall == VISITORS * expected, (role, direction)
        assert value(families, "muxtunnel_tunnel_streams_total", tunnel=tunnel) == VISITORS
        assert value(families, "muxtunnel_streams_total") == VISITORS
        assert value(families, "muxtunnel_tunnel_streams_open", tunnel=tunnel) == 0
        assert value(families, "muxtunnel_sessions", **role_of) == 1
        assert value(families, "muxtunnel_tunnels", state="up") == 1
        assert value(families, "muxtunnel_tunnel_state", tunnel=tunnel, state="up") == 1
        # The RTT histogram: cumulative buckets ending in +Inf, which equals the count.
        count = value(families, "muxtunnel_rtt_seconds_count")
        assert count > 0
        buckets = [
            (float(s.labels["le"]), s.value)
            for s in families["muxtunnel_rtt_seconds"].samples
            if s.name == "muxtunnel_rtt_seconds_bucket"
        ]
        assert buckets[-1] == (math.inf, count)
        assert [n for _, n in buckets] == sorted(n for _, n in buckets)
        assert value(families, "muxtunnel_rtt_seconds_sum") > 0
        # No label is a visitor's address, nor contains one.
        labels = label_values(families)
        assert not [v for v in labels if VISITOR_HOST in v or any(s in v for s in sources)]
        assert {s.labels["role"] for f in families.values() for s in f.samples} == {role}
        if role == "relay":
            assert value(families, "muxtunnel_auth_failures_total") == 1
            assert value(families, "muxtunnel_sessions_opened_total") == 1
        else:
            assert value(families, "muxtunnel_reconnects_total") == 0
            local = f"127.0.0.1:{service}"
            assert value(families, "muxtunnel_tunnel_state", local=local, state="up") == 1


async def test_tunnel_series_go_with_the_session_totals_stay(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A client that leaves takes its tunnel's series along; the aggregates keep its bytes."""
    relay_stats = Stats("relay")
    metrics_port = dead_port()
    relay = await start_relay(nursery, tmp_path, relay_stats, metrics=("127.0.0.1", metrics_port))
    service = await start_service(nursery, answer_after_eof)
    client = await start_client(nursery, tmp_path, relay, Stats("client"), service)
    await visit(client.port())
    await wait_for(lambda: relay_stats.totals()["streams_open"] == 0, "relay streams closed")
    before = await scrape(metrics_port)
    tunnel = f"127.0.0.1:{client.port()}"
    assert value(before, "muxtunnel_tunnel_bytes_total", tunnel=tunnel, direction="to_visitor")
    client.shutdown.set()
    with trio.fail_after(20):
        await client.done.wait()
    await wait_for(lambda: not relay_stats.sessions, "the session gone")
    after = await scrape(metrics_port)
    assert not after["muxtunnel_tunnel_bytes"].samples
    assert value(after, "muxtunnel_sessions") == 0
    assert value(after, "muxtunnel_tunnels", state="up") == 0
    for direction, expected in (("from_visitor", UP), ("to_visitor", DOWN)):
        assert value(after, "muxtunnel_bytes_total", direction=direction) == expected
    assert value(after, "muxtunnel_streams_total") == 1


async def test_open_failures_by_reason_on_both_sides(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A tunnel to a dead local port: the client answers OPEN_FAIL, both sides count it."""
    relay_stats, client_stats = Stats("relay"), Stats("client")
    relay_metrics, client_metrics = dead_port(), dead_port()
    relay = await start_relay(nursery, tmp_path, relay_stats, metrics=("127.0.0.1", relay_metrics))
    client = await start_client(
        nursery, tmp_path, relay, client_stats, dead_port(), metrics=("127.0.0.1", client_metrics)
    )
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", client.port())
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(1) == b""  # closed: nothing behind it
    await wait_for(lambda: relay_stats.totals()["streams_open"] == 0, "the relay's stream ended")
    relay_families, client_families = await scrape(relay_metrics), await scrape(client_metrics)
    [relay_failure] = relay_families["muxtunnel_open_failures"].samples
    [client_failure] = client_families["muxtunnel_open_failures"].samples
    assert relay_failure.labels["reason"] == client_failure.labels["reason"] == "CONNECT_FAILED"
    assert relay_failure.value == client_failure.value == 1
    assert value(client_families, "muxtunnel_visitors_refused_total", reason="dial_failed") == 1
    tunnel = f"127.0.0.1:{client.port()}"
    assert value(client_families, "muxtunnel_tunnel_refused_total", tunnel=tunnel) == 1


async def _sink(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A local service that accepts and never reads (small receive buffers)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(64)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    task_status.started(sock.getsockname()[1])
    await trio.serve_listeners(handler, [trio.SocketListener(sock)])


async def _flood(port: int) -> None:
    """A visitor that sends 4 MiB to a service that never reads."""
    with contextlib.suppress(trio.BrokenResourceError, OSError):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(bytes(4 * 1024 * 1024))
            await trio.sleep_forever()


async def test_flow_control_stalls_are_counted(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streams reset by the stall policy (protocol-spec.md §8.7) show in the client's metrics."""
    monkeypatch.setattr(connection, "CLIENT_RECEIVE_BUDGET", 512 * 1024)
    client_stats, client_metrics = Stats("client"), dead_port()
    relay = await start_relay(nursery, tmp_path, Stats("relay"))
    sink = await nursery.start(_sink)
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        client_stats,
        sink,
        stall_timeout=1.0,
        metrics=("127.0.0.1", client_metrics),
    )
    async with trio.open_nursery() as visitors:
        for _ in range(8):  # 8 x 256 KiB held by the client: four times its budget
            visitors.start_soon(_flood, client.port())
        await wait_for(lambda: client_stats.counters["stalls"] > 0, "a stalled stream reset")
        visitors.cancel_scope.cancel()
    stalls = value(await scrape(client_metrics), "muxtunnel_flow_control_stalls_total")
    assert stalls >= 1
    assert stalls <= client_stats.counters["stalls"]


async def test_metrics_port_in_use_is_one_clear_error(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Relay and client stop at once with one line naming the address (before connecting)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = pytest.RaisesGroup(
            pytest.RaisesExc(
                ListenError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(--metrics\): "
            ),
            flatten_subgroups=True,
        )
        with in_use:
            await start_relay(nursery, tmp_path, Stats("relay"), metrics=("127.0.0.1", port))
        config = ClientConfig(
            server_host="127.0.0.1",
            server_port=dead_port(),
            token=TOKEN,
            state_dir=tmp_path / "client",
            tunnels=(TunnelSpec(dead_port()),),
            metrics=("127.0.0.1", port),
        )
        with in_use, trio.fail_after(10):
            await run_client(config, report=lambda _: None)


async def test_http_errors_are_bounded(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.5)
    port = dead_port()
    await nursery.start(metrics.serve_metrics, ("127.0.0.1", port), Stats("relay"))
    assert (await http_get(port, b"GET /other HTTP/1.0\r\n\r\n"))[0] == 404
    assert (await http_get(port, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == 405
    assert (await http_get(port, b"nonsense\r\n\r\n"))[0] == 400
    big = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (metrics.MAX_REQUEST + 10)
    assert (await http_get(port, big, eof=True))[0] == 431
    assert (await http_get(port, b"GET /metrics HTTP/1.0\r\n"))[0] == 408  # never finished
    status, headers, body = await http_get(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0


# --------------------------------------------------------------------------------------------
# the collector on its own


def _info(sid: int, bytes_in: int, bytes_out: int) -> StreamInfo:
    return StreamInfo(
        stream_id=sid,
        tunnel_id=1,
        origin=Address(VISITOR_HOST, 40000 + sid),
        target=Address("127.0.0.1", 20001),
        started=0.0,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
    )


def _families(stats: Stats) -> dict[str, Metric]:
    from prometheus_client import generate_latest

    text = generate_latest(make_registry(stats)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_directions_follow_the_access_log() -> None:
    """Relay: ``out`` goes to the client, i.e. comes from the visitor; the client: the reverse."""
    for role, from_visitor, to_visitor in (("relay", 20, 10), ("client", 10, 20)):
        stats = Stats(role)
        ts = stats.add_session("127.0.0.1:1").add_tunnel(1, "127.0.0.1:20001")
        ts.stream_opened(_info(1, bytes_in=10, bytes_out=20))
        fams = _families(stats)
        assert value(fams, "muxtunnel_tunnel_bytes_total", direction="from_visitor") == (
            from_visitor
        )
        assert value(fams, "muxtunnel_bytes_total", direction="to_visitor") == to_visitor


def test_counters_by_reason_and_registries_apart() -> None:
    stats = Stats("relay")
    stats.count("open_failures:CONNECTION_REFUSED", 2)
    stats.count("refused:deny")
    stats.count("stalls", 4)
    other = Stats("relay")  # a second registry in the same process: no collision
    fams, other_fams = _families(stats), _families(other)
    assert value(fams, "muxtunnel_open_failures_total", reason="CONNECTION_REFUSED") == 2
    assert value(fams, "muxtunnel_visitors_refused_total", reason="deny") == 1
    assert value(fams, "muxtunnel_flow_control_stalls_total") == 4
    assert value(other_fams, "muxtunnel_flow_control_stalls_total") == 0
    client = Stats("client")
    client.count("dial_failures:CONNECT_TIMEOUT")
    ts = client.add_session("relay:7835").add_tunnel(1, "relay:20001", "127.0.0.1:22")
    ts.refuse("dial_timeout")
    fams = _families(client)
    assert value(fams, "muxtunnel_open_failures_total", reason="CONNECT_TIMEOUT") == 1
    assert value(fams, "muxtunnel_visitors_refused_total", reason="dial_timeout") == 1
    assert value(fams, "muxtunnel_sessions") == 1  # its one tunnel is up
    ts.set_state("down", "disconnected")
    assert value(_families(client), "muxtunnel_sessions") == 0
    assert "muxtunnel_auth_failures" not in fams


def test_one_label_one_series() -> None:
    """Two tunnels under one label (a lease moving between sessions) make one series."""
    stats = Stats("relay")
    for peer in ("127.0.0.1:1", "127.0.0.1:2"):
        ts = stats.add_session(peer).add_tunnel(1, "127.0.0.1:20001")
        ts.stream_opened(_info(1, bytes_in=5, bytes_out=7))
    fams = _families(stats)
    assert value(fams, "muxtunnel_tunnel_streams_total", tunnel="127.0.0.1:20001") == 2
    assert value(fams, "muxtunnel_tunnel_bytes_total", direction="from_visitor") == 14


# --------------------------------------------------------------------------------------------
# configuration


def test_metrics_option_and_toml_key(tmp_path: Path) -> None:
    env = {"MUXTUNNEL_TOKEN": TOKEN}
    assert build_server_config({}, {}, env=env).metrics is None
    cfg = build_server_config({"metrics": "127.0.0.1:9464"}, {}, env=env)
    assert cfg.metrics == ("127.0.0.1", 9464)
    assert (
        build_server_config({"metrics": "127.0.0.1:9464"}, {"metrics": "off"}, env=env).metrics
        is None
    )
    client_cfg = build_client_config(
        {"metrics": "[::1]:0"}, {"server": "relay.example", "tunnel": ["22"]}, env=env
    )
    assert client_cfg.metrics == ("::1", 0)
    with pytest.raises(ConfigError, match="metrics"):
        build_server_config({}, {"metrics": "127.0.0.1"}, env=env)
