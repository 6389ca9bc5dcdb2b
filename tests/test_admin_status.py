"""The admin endpoint and ``muxtunnel status`` data, in process: a relay and a client sharing one
state dir, a known transfer, and hostile requests to the endpoint (real sockets, loopback)."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path as PurePath
from typing import TYPE_CHECKING, Any

import pytest
import trio

from muxtunnel import admin
from muxtunnel.access import AddressRule, parse_cidrs
from muxtunnel.admin import AdminAddress, AdminError, query_all, query_status, serve_admin
from muxtunnel.config import TunnelSpec, build_client_config, build_server_config, load_toml
from muxtunnel.errors import ConfigError
from muxtunnel.stats import Stats
from tests.conftest import connect, echo_roundtrip, start_client, start_echo, start_relay

if TYPE_CHECKING:
    from pathlib import Path

N = 300_000
#: Bound of every wait for the stats to catch up (seconds).
WAIT = 10.0


async def _wait_for(address: AdminAddress, check: Any) -> dict[str, Any]:
    """Query ``address`` until ``check(snapshot)`` holds (bounded); the snapshot."""
    snapshot: dict[str, Any] = {}
    with trio.move_on_after(WAIT):
        while True:
            snapshot = await query_status(address)
            if check(snapshot):
                return snapshot
            await trio.sleep(0.02)
    raise AssertionError(f"condition not met within {WAIT} s: {json.dumps(snapshot)[:2000]}")


def _only_tunnel(snapshot: dict[str, Any]) -> dict[str, Any]:
    [session] = snapshot["sessions"]
    [tunnel] = session["tunnels"]
    assert isinstance(tunnel, dict)
    return tunnel


async def _send_and_echo(stream: trio.SocketStream, payload: bytes) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        got = 0
        while got < len(payload):
            chunk = await stream.receive_some(65536)
            assert chunk, "echo ended early"
            got += len(chunk)
    assert got == len(payload)


async def test_status_lists_tunnel_open_stream_and_exact_bytes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    state = tmp_path / "s"
    relay = await start_relay(nursery, tmp_path, name="s", admin="auto")
    echo = await start_echo(nursery)
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=echo)], state_dir=state, admin="auto"
    )
    port = client.port()
    # One state dir, two endpoints that do not collide: the relay's first, then the client's.
    addresses = admin.discover(state)
    assert [a.path.name for a in addresses if a.path] == [
        "relay.sock",
        f"client-{os.getpid()}.sock",
    ]
    relay_addr, client_addr = addresses
    for address in addresses:
        assert address.path is not None
        assert stat.S_IMODE(address.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "admin").stat().st_mode) == 0o700

    stream = await connect(port)
    await _send_and_echo(stream, b"x" * N)
    # The visitor's connection is still open: one open stream on each side.
    snap = await _wait_for(relay_addr, lambda s: s["totals"]["streams_open"] == 1)
    assert snap["role"] == "relay"
    assert snap["listen"] == f"127.0.0.1:{relay.info.port}"
    [session] = snap["sessions"]
    assert session["peer"].startswith("127.0.0.1:")
    assert session["token"]  # the token's name
    tunnel = _only_tunnel(snap)
    assert tunnel["public"] == f"127.0.0.1:{port}"
    assert (tunnel["open"], tunnel["total"], tunnel["state"]) == (1, 1, "up")
    # Live bytes count before the stream ends (the echo came back in full).
    assert (tunnel["bytes_in"], tunnel["bytes_out"]) == (N, N)
    csnap = await _wait_for(client_addr, lambda s: s["totals"]["streams_open"] == 1)
    assert csnap["role"] == "client"
    ctunnel = _only_tunnel(csnap)
    assert ctunnel["public"] == f"127.0.0.1:{port}"
    assert ctunnel["local"] == f"127.0.0.1:{echo}"
    assert ctunnel["state"] == "up"

    await stream.send_eof()
    assert await stream.receive_some(100) == b""
    await stream.aclose()
    snap = await _wait_for(relay_addr, lambda s: s["totals"]["streams_open"] == 0)
    tunnel = _only_tunnel(snap)
    assert (tunnel["open"], tunnel["total"]) == (0, 1)
    assert (tunnel["bytes_in"], tunnel["bytes_out"]) == (N, N)
    assert tunnel["outcomes"] == {"closed": 1}
    assert snap["totals"]["bytes_in"] == N
    assert snap["totals"]["streams_total"] == 1
    csnap = await _wait_for(client_addr, lambda s: s["totals"]["streams_open"] == 0)
    ctunnel = _only_tunnel(csnap)
    assert (ctunnel["total"], ctunnel["bytes_in"], ctunnel["bytes_out"]) == (1, N, N)
    json.dumps([snap, csnap])  # JSON-able as `muxtunnel status --json` prints it

    # Clean shutdown removes both sockets.
    client.shutdown.set()
    await client.done.wait()
    relay.shutdown.set()
    await relay.done.wait()
    assert admin.discover(state) == []


async def test_status_counts_refused_bind_and_denied_visitors(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = await start_relay(nursery, tmp_path, name="r", admin="auto")
    echo = await start_echo(nursery)
    lo, hi = relay.config.port_range
    deny = AddressRule((), parse_cidrs(["127.0.0.2/32"], "deny"))
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [
            TunnelSpec(local_port=echo, visitors=deny),
            TunnelSpec(local_port=echo, remote_port=hi + 1),  # outside the relay's range
        ],
        admin="auto",
    )
    port = client.port()
    # A visitor from 127.0.0.2 is refused by the deny rule.
    with socket.socket() as visitor:
        visitor.bind(("127.0.0.2", 0))
        visitor.settimeout(WAIT)
        visitor.connect(("127.0.0.1", port))
    relay_addr = admin.default_address(relay.config.state_dir, "relay")
    snap = await _wait_for(relay_addr, lambda s: _only_tunnel(s)["refused"].get("deny") == 1)
    assert snap["counters"]["refused:deny"] == 1
    assert snap["totals"]["refused"] == 1
    # The client shows the refused BIND as down, with the relay's reason.
    [caddr] = [a for a in admin.discover(client.config.state_dir) if a.path is not None]
    csnap = await query_status(caddr)
    tunnels = {t["id"]: t for t in csnap["sessions"][0]["tunnels"]}
    assert tunnels[1]["state"] == "up"
    assert tunnels[2]["state"] == "down"
    assert tunnels[2]["last_error"].startswith("OUT_OF_RANGE")
    assert tunnels[2]["public"] == f"127.0.0.1:{hi + 1}"
    assert lo <= port <= hi


async def _raw(address: AdminAddress, request: bytes, *, eof: bool = True) -> bytes:
    assert address.path is not None
    stream = await trio.open_unix_socket(str(address.path))
    async with stream:
        if request:
            await stream.send_all(request)
        if eof:
            await stream.send_eof()
        data = b""
        with trio.fail_after(WAIT):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_admin_endpoint_survives_hostile_requests(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "READ_TIMEOUT", 0.3)
    stats = Stats("relay")
    stats.add_session("127.0.0.1:1", "alice").add_tunnel(1, "127.0.0.1:20001")
    address = AdminAddress(path=tmp_path / "a.sock")
    bound = await nursery.start(serve_admin, address, stats)
    assert bound == address
    assert stat.S_IMODE((tmp_path / "a.sock").stat().st_mode) == 0o600

    assert (await _raw(address, b"HELLO\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
    assert (await _raw(address, b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404 ")
    assert (await _raw(address, b"POST /status HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405 ")
    oversized = b"GET /status HTTP/1.0\r\nX: " + b"a" * (2 * admin.MAX_REQUEST)
    assert (await _raw(address, oversized, eof=False)).startswith(b"HTTP/1.0 431 ")
    # A silent connection gets 408 after the read timeout instead of holding a slot forever.
    assert (await _raw(address, b"", eof=False)).startswith(b"HTTP/1.0 408 ")
    assert (await _raw(address, b"\xff\x00\xfe\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
    # More connections than MAX_CLIENTS: the extra ones are closed, the endpoint goes on.
    held = [await trio.open_unix_socket(str(address.path)) for _ in range(admin.MAX_CLIENTS + 4)]
    for s in held:
        await s.aclose()
    answer = await _raw(address, b"GET /status HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"Content-Type: application/json" in head
    snapshot = json.loads(body)
    assert snapshot["sessions"][0]["token"] == "alice"
    assert snapshot["admin"] == str(address.path)
    # A second endpoint on a socket that is alive is refused with a clear error.
    with pytest.raises(AdminError, match="in use by another running muxtunnel"):
        await nursery.start(serve_admin, address, stats)


async def test_admin_tcp_when_asked_and_stale_socket_replaced(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    stats = Stats("client")
    bound = await nursery.start(serve_admin, AdminAddress(host="127.0.0.1", port=0), stats)
    assert isinstance(bound, AdminAddress)
    assert bound.path is None
    assert bound.port != 0
    snapshot = await query_status(bound)
    assert snapshot["role"] == "client"
    # A stale socket (its process died without removing it) is replaced.
    path = tmp_path / "state" / "admin" / "relay.sock"
    path.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    snaps, errors = await query_all([AdminAddress(path=path)])
    assert snaps == []
    assert isinstance(errors[0], admin.StaleEndpointError)
    relay_addr = admin.default_address(tmp_path / "state", "relay")
    assert relay_addr.path == path
    await nursery.start(partial_serve(relay_addr, Stats("relay")))
    assert (await query_status(relay_addr))["role"] == "relay"


def partial_serve(address: AdminAddress, stats: Stats) -> Any:
    """``serve_admin`` for the state dir's default socket, for ``nursery.start``."""

    async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_admin(address, stats, default=True, task_status=task_status)

    return run


def test_parse_admin_address() -> None:
    assert admin.parse_admin("/run/m.sock").path is not None
    assert admin.parse_admin("m.sock").path is not None
    tcp = admin.parse_admin("127.0.0.1:9000")
    assert (tcp.host, tcp.port, tcp.path) == ("127.0.0.1", 9000, None)
    assert admin.parse_admin("[::1]:9000").host == "::1"
    tmp = PurePath("/x")
    assert admin.resolve_admin("off", tmp, "relay") is None
    assert admin.resolve_admin(None, tmp, "relay") is None
    auto = admin.resolve_admin("auto", tmp, "client")
    assert auto is not None
    assert auto.path is not None
    assert auto.path.parent == tmp / "admin"
    assert auto.path.name.startswith("client-")
    assert admin.format_bytes(512) == "512 B"
    assert admin.format_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert admin.format_age(3725) == "1h02m"


def test_admin_option_in_configs(tmp_path: Path) -> None:
    base = {"server": "127.0.0.1:7835", "token": "t" * 24, "tunnel": ["22"]}
    assert build_server_config({}, {}, env={}).admin == "auto"
    assert build_server_config({}, {"admin": "off"}, env={}).admin is None
    assert build_server_config({}, {"admin": "127.0.0.1:0"}, env={}).admin == "127.0.0.1:0"
    assert build_client_config({}, {**base, "admin": "/run/c.sock"}, env={}).admin == "/run/c.sock"
    with pytest.raises(ConfigError, match="--admin"):
        build_client_config({}, {**base, "admin": "127.0.0.1:99999"}, env={})
    toml = tmp_path / "c.toml"
    toml.write_text('[server]\nadmin = "off"\n[client]\nadmin = "/run/muxtunnel/x.sock"\n')
    assert build_server_config(load_toml(toml, "server"), {}, env={}).admin is None
    client_values = load_toml(toml, "client")
    assert build_client_config(client_values, base, env={}).admin == "/run/muxtunnel/x.sock"


async def test_status_of_private_tunnel_and_its_visits(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from tests.test_private_tunnels import publish, start_visitor

    relay = await start_relay(nursery, tmp_path, name="p", admin="auto")
    echo = await start_echo(nursery)
    await publish(nursery, tmp_path, relay, echo, "svc")
    visit, _, _ = await start_visitor(nursery, tmp_path, relay, "svc")
    payload = b"v" * N
    assert await echo_roundtrip(visit.port, payload) == payload
    relay_addr = admin.default_address(relay.config.state_dir, "relay")

    def both_closed(snapshot: dict[str, Any]) -> bool:
        tunnels = [t for s in snapshot["sessions"] for t in s["tunnels"]]
        return len(tunnels) == 2 and all(t["total"] == 1 and t["open"] == 0 for t in tunnels)

    snap = await _wait_for(relay_addr, both_closed)
    tunnels = {t["public"]: t for s in snap["sessions"] for t in s["tunnels"]}
    assert set(tunnels) == {"private:svc", "visit:svc"}
    for tunnel in tunnels.values():
        assert (tunnel["bytes_in"], tunnel["bytes_out"]) == (N, N)
        assert tunnel["outcomes"] == {"closed": 1}


def test_status_table_render_without_terminal() -> None:
    from rich.console import Console

    now = 1_000_000.0
    snapshot = {
        "role": "client",
        "relay": "relay.example:7835",
        "pid": 42,
        "uptime": 65,
        "admin": "/s/admin/client-42.sock",
        "sessions": [
            {
                "peer": "relay.example:7835",
                "token": None,
                "since": now - 5,
                "rtt": 0.0123,
                "state": "reconnecting",
                "retry_at": now + 3,
                "tunnels": [
                    {
                        "public": "relay.example:2222",
                        "local": "127.0.0.1:22",
                        "state": "pending",
                        "last_error": "ADDRESS_IN_USE: port 2222 is in use",
                        "open": 0,
                        "total": 7,
                        "bytes_in": 1536,
                        "bytes_out": 10,
                    }
                ],
            }
        ],
        "totals": {"sessions": 1, "tunnels": 1, "streams_open": 0, "streams_total": 7},
        "counters": {"reconnects": 2, "dial_failures:CONNECT_FAILED": 1, "sessions_total": 3},
    }
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    for renderable in admin.status_tables(snapshot, boxed=False, now=now):
        console.print(renderable)
    text = console.export_text()
    console.file.close()
    assert "client relay.example:7835  (pid 42, up 1m05s, admin /s/admin/client-42.sock)" in text
    assert "reconnecting (retry in 3s)" in text
    assert "pending (ADDRESS_IN_USE: port 2222 is in use)" in text
    assert "12.3 ms" in text
    assert "1.5 KiB" in text
    assert "reconnects: 2, dial failures CONNECT_FAILED: 1" in text
    assert not set("─│┌┐└┘├┤┬┴┼━") & set(text)


async def test_admin_socket_path_too_long_and_dead_client_sockets(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    address = admin.default_address(deep, "relay")
    # The state dir's default socket: the process goes on without it, with a warning.
    assert await nursery.start(partial_serve(address, Stats("relay"))) is None
    assert "longer than 107 bytes" in caplog.text
    # A path that was asked for: a clear error.
    with pytest.raises(AdminError, match="longer than 107 bytes"):
        await nursery.start(serve_admin, address, Stats("relay"))
    # Sockets of clients whose process is gone are removed when another endpoint starts there.
    state = tmp_path / "s"
    (state / "admin").mkdir(parents=True)
    dead_pid = 2**22 + 12345  # above the kernel's pid_max: no such process
    stale = state / "admin" / f"client-{dead_pid}.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    await nursery.start(partial_serve(admin.default_address(state, "client"), Stats("client")))
    assert not stale.exists()
    assert [a.path.name for a in admin.discover(state) if a.path] == [f"client-{os.getpid()}.sock"]
