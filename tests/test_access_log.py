"""The access log: one line per visitor connection when it ends, on the relay and on the client.

Relay and client run in process over real TLS and loopback sockets; their logs go through the
same set-up the ``muxtunnel`` command uses (``configure_logging``), captured from stderr.
Visitors connect from 127.0.0.2, so their address is told apart from the relay's and the
client's own connections.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any

import pytest
import trio

from muxtunnel.config import TunnelSpec
from muxtunnel.logsetup import configure_logging
from tests.conftest import dead_port, random_bytes, start_client, start_relay, start_service

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.conftest import Client

VISITOR_HOST = "127.0.0.2"
FROM_VISITOR = 123_457  # bytes the visitor sends
TO_VISITOR = 654_321  # bytes the service answers
_LINGER_RST = struct.pack("ii", 1, 0)
TEXT_ACCESS = re.compile(
    r"^\S+Z (?P<level>[A-Z]+) muxtunnel\.access: access (?P<visitor>\S+) -> (?P<tunnel>.+?): "
    r"(?P<end>[a-z_]+)(?: \((?P<reason>.*)\))?, (?P<up>\d+) B from visitor, "
    r"(?P<down>\d+) B to visitor, (?P<duration>\d+\.\d\d) s$"
)


class _Stderr(io.StringIO):
    """stderr stand-in that wakes a waiting test on every write (logging writes from trio's
    thread, synchronously)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = trio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        self.changed.set()
        return n


class LogCapture:
    """The process's log output as the ``muxtunnel`` command would write it to stderr."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.stream = _Stderr()

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def access(self) -> list[dict[str, object]]:
        """The access lines so far, as JSON objects (json) or as the text fields (text)."""
        found: list[dict[str, object]] = []
        for line in self.lines():
            if self.fmt == "json":
                obj = json.loads(line)  # every line is one JSON object
                if obj.get("event") == "access":
                    found.append(obj)
            elif " muxtunnel.access: " in line:
                match = TEXT_ACCESS.match(line)
                assert match is not None, line
                found.append(match.groupdict())
        return found

    async def wait_access(
        self, count: int, where: Callable[[dict[str, object]], bool] = lambda _: True
    ) -> list[dict[str, object]]:
        """Wait (bounded) until ``count`` access lines match ``where``; return those."""
        with trio.fail_after(20):
            while True:
                found = [a for a in self.access() if where(a)]
                if len(found) >= count:
                    return found
                self.stream.changed = trio.Event()
                await self.stream.changed.wait()


@pytest.fixture
def capture_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], LogCapture]]:
    """``capture_logs(fmt, level)``: configure logging like the CLI, capture what it writes."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))

    def start(fmt: str, level: str = "info") -> LogCapture:
        capture = LogCapture(fmt)
        monkeypatch.setattr(sys, "stderr", capture.stream)
        configure_logging(level, fmt)
        return capture

    try:
        yield start
    finally:
        for handler in root.handlers[:]:
            if handler not in saved[1]:
                root.removeHandler(handler)
        root.setLevel(saved[0])


async def _visitor_connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=VISITOR_HOST)


def _side(side: str) -> Callable[[dict[str, object]], bool]:
    return lambda a: a.get("side") == side


async def _exchange_service(stream: trio.SocketStream) -> None:
    """Read until the visitor's FIN, then answer TO_VISITOR bytes and close (FIN)."""
    got = 0
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            got += len(data)
        assert got == FROM_VISITOR
        await stream.send_all(random_bytes(TO_VISITOR, 2))
        await stream.send_eof()


async def _tunnel(
    nursery: trio.Nursery, tmp_path: Path, local_port: int, **client_options: Any
) -> Client:
    """A relay and a client exposing ``local_port``; returns the client."""
    relay = await start_relay(nursery, tmp_path)
    return await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=local_port)], **client_options
    )


async def _read_to_end(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def _assert_reset(port: int) -> None:
    """A visitor on ``port`` is reset (during the connect, or at its first read)."""
    try:
        stream = await _visitor_connect(port)
    except OSError:
        return  # the reset beat the end of the handshake
    async with stream:
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some(1)


# --------------------------------------------------------------------------------------------
# A known transfer, both FINs: exact byte counts on both sides, in both formats


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_closed_connection_logs_exact_bytes_on_both_sides(
    nursery: trio.Nursery,
    tmp_path: Path,
    capture_logs: Callable[[str, str], LogCapture],
    fmt: str,
) -> None:
    logs = capture_logs(fmt, "info")  # the default level
    service = await start_service(nursery, _exchange_service)
    client = await _tunnel(nursery, tmp_path, service)
    port = client.port(0)
    with trio.fail_after(30):
        stream = await _visitor_connect(port)
        visitor = f"{VISITOR_HOST}:{stream.socket.getsockname()[1]}"
        received = 0
        async with stream:
            await stream.send_all(random_bytes(FROM_VISITOR, 1))
            await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                received += len(chunk)
        assert received == TO_VISITOR
    if fmt == "json":
        (at_relay,) = await logs.wait_access(1, _side("relay"))
        (at_client,) = await logs.wait_access(1, _side("client"))
        assert at_relay["tunnel"] == f"127.0.0.1:{port}"
        assert at_relay["local"] is None
        # The token that owns the tunnel, by the name the relay logs it with.
        assert any(f"(token {at_relay['token']})" in line for line in logs.lines())
        assert at_client["tunnel"] == f"127.0.0.1:{port} -> 127.0.0.1:{service}"
        assert at_client["local"] == f"127.0.0.1:{service}"
        assert at_client["first_fin"] == "relay"  # the visitor's FIN, carried by the relay
        assert at_relay["first_fin"] == "visitor"
        for line in (at_relay, at_client):
            assert line["level"] == "info"
            assert line["logger"] == "muxtunnel.access"
            assert line["end"] == "closed"
            assert line["reason"] is None
            assert line["visitor"] == visitor
            # Typed values: ints and a float, not strings.
            assert type(line["bytes_from_visitor"]) is int
            assert type(line["bytes_to_visitor"]) is int
            assert type(line["duration"]) is float
            assert type(line["stream"]) is int
            assert line["bytes_from_visitor"] == FROM_VISITOR
            assert line["bytes_to_visitor"] == TO_VISITOR
            assert 0.0 <= line["duration"] < 30.0
            assert isinstance(line["msg"], str)
            assert line["msg"].startswith(f"access {visitor} -> {line['tunnel']}: closed, ")
            assert "ratelimit" not in line
            assert "ratelimit_key" not in line
    else:
        found = await logs.wait_access(2)
        tunnels = sorted(str(a["tunnel"]) for a in found)
        assert tunnels == [f"127.0.0.1:{port}", f"127.0.0.1:{port} -> 127.0.0.1:{service}"]
        for line in found:
            assert line["level"] == "INFO"
            assert line["visitor"] == visitor
            assert line["end"] == "closed"
            assert line["reason"] is None
            assert int(str(line["up"])) == FROM_VISITOR
            assert int(str(line["down"])) == TO_VISITOR
    # One line per connection and side: nothing else was logged for it.
    assert len(logs.access()) == 2


# --------------------------------------------------------------------------------------------
# Resets: which side, seen from both sides


async def test_visitor_reset(
    nursery: trio.Nursery, tmp_path: Path, capture_logs: Callable[[str, str], LogCapture]
) -> None:
    logs = capture_logs("json", "info")
    arrived = trio.Event()
    sent = 10_000

    async def service(stream: trio.SocketStream) -> None:
        got = 0
        async with stream:
            try:
                while got < sent:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    got += len(data)
                arrived.set()
                await stream.receive_some(1)  # until the reset reaches us
            except trio.BrokenResourceError:
                pass

    client = await _tunnel(nursery, tmp_path, await start_service(nursery, service))
    with trio.fail_after(30):
        stream = await _visitor_connect(client.port(0))
        await stream.send_all(bytes(sent))
        await arrived.wait()
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        stream.socket.close()  # RST
    (at_relay,) = await logs.wait_access(1, _side("relay"))
    (at_client,) = await logs.wait_access(1, _side("client"))
    assert at_relay["end"] == "reset_by_visitor"
    assert at_client["end"] == "reset_by_relay"
    for line in (at_relay, at_client):
        assert line["bytes_from_visitor"] == sent
        assert line["bytes_to_visitor"] == 0
        assert isinstance(line["reason"], str)
        assert line["reason"]
        assert line["first_fin"] is None


async def test_local_service_reset(
    nursery: trio.Nursery, tmp_path: Path, capture_logs: Callable[[str, str], LogCapture]
) -> None:
    logs = capture_logs("json", "info")
    answer = 4321

    async def service(stream: trio.SocketStream) -> None:
        await stream.send_all(bytes(answer))
        await stream.receive_some(1)  # the visitor's byte: the answer went through
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        stream.socket.close()

    client = await _tunnel(nursery, tmp_path, await start_service(nursery, service))
    with trio.fail_after(30):
        stream = await _visitor_connect(client.port(0))
        async with stream:
            got = 0
            while got < answer:
                got += len(await stream.receive_some(65536))
            await stream.send_all(b"!")
            with pytest.raises(trio.BrokenResourceError):
                await _read_to_end(stream)
    (at_relay,) = await logs.wait_access(1, _side("relay"))
    (at_client,) = await logs.wait_access(1, _side("client"))
    assert at_client["end"] == "reset_by_local"
    assert at_relay["end"] == "reset_by_client"
    for line in (at_relay, at_client):
        assert line["bytes_from_visitor"] == 1
        assert line["bytes_to_visitor"] == answer


# --------------------------------------------------------------------------------------------
# Connections that never opened a stream


async def test_local_service_refused_is_dial_failed(
    nursery: trio.Nursery, tmp_path: Path, capture_logs: Callable[[str, str], LogCapture]
) -> None:
    logs = capture_logs("json", "info")
    local = dead_port()
    client = await _tunnel(nursery, tmp_path, local)
    port = client.port(0)
    with trio.fail_after(30):
        await _assert_reset(port)  # nothing behind the tunnel
    (at_relay,) = await logs.wait_access(1, _side("relay"))
    (at_client,) = await logs.wait_access(1, _side("client"))
    assert at_client["level"] == "warning"  # the local service is down: worth a warning
    assert at_client["local"] == f"127.0.0.1:{local}"
    assert at_relay["level"] == "info"
    for line in (at_relay, at_client):
        assert line["end"] == "dial_failed"
        assert f"connect to 127.0.0.1:{local} failed" in str(line["reason"])
        assert (line["bytes_from_visitor"], line["bytes_to_visitor"]) == (0, 0)
    # The client's old "stream from ..." warning is replaced, not repeated.
    assert sum("failed" in str(json.loads(x)["msg"]) for x in logs.lines()) == 2


async def test_local_service_not_answering_is_dial_timeout(
    nursery: trio.Nursery, tmp_path: Path, capture_logs: Callable[[str, str], LogCapture]
) -> None:
    logs = capture_logs("json", "info")
    # A listener whose accept queue is full: the kernel drops further SYNs, connects hang.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        local = int(listener.getsockname()[1])
        filler.settimeout(10)
        filler.connect(("127.0.0.1", local))  # the one connection the queue holds
        client = await _tunnel(nursery, tmp_path, local, connect_timeout=0.5)
        with trio.fail_after(30):
            await _assert_reset(client.port(0))
        (at_relay,) = await logs.wait_access(1, _side("relay"))
        (at_client,) = await logs.wait_access(1, _side("client"))
    assert at_client["level"] == "warning"
    assert isinstance(at_client["duration"], float)
    assert at_client["duration"] >= 0.5
    for line in (at_relay, at_client):
        assert line["end"] == "dial_timeout"
        assert f"connect to 127.0.0.1:{local} timed out" in str(line["reason"])


async def test_stream_refused_by_a_client_limit(
    nursery: trio.Nursery, tmp_path: Path, capture_logs: Callable[[str, str], LogCapture]
) -> None:
    logs = capture_logs("json", "debug")
    hold, connected = trio.Event(), trio.Event()

    async def service(stream: trio.SocketStream) -> None:
        connected.set()
        async with stream:
            await hold.wait()

    client = await _tunnel(
        nursery, tmp_path, await start_service(nursery, service), max_streams_per_tunnel=1
    )
    with trio.fail_after(30):
        async with await _visitor_connect(client.port(0)):
            await connected.wait()  # the client holds its one local connection
            await _assert_reset(client.port(0))
            hold.set()
    refused = await logs.wait_access(2, lambda a: a["end"] == "refused")
    by_side = {a["side"]: a for a in refused}
    assert by_side["client"]["level"] == "debug"  # the client's refusal warning says it already
    assert by_side["relay"]["level"] == "info"
    for line in refused:
        assert "RESOURCE_SHORTAGE" in str(line["reason"])


async def test_relay_refusal_is_a_debug_line_only(
    nursery: trio.Nursery, tmp_path: Path, capture_logs: Callable[[str, str], LogCapture]
) -> None:
    logs = capture_logs("json", "debug")
    relay = await start_relay(nursery, tmp_path, max_visitors_per_tunnel=1)
    hold, connected = trio.Event(), trio.Event()

    async def service(stream: trio.SocketStream) -> None:
        connected.set()
        async with stream:
            await hold.wait()

    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=await start_service(nursery, service))]
    )
    with trio.fail_after(30):
        async with await _visitor_connect(client.port(0)):
            await connected.wait()  # the relay holds its one visitor
            await _assert_reset(client.port(0))
            hold.set()
    (line,) = await logs.wait_access(1, lambda a: a["end"] == "refused")
    assert line["side"] == "relay"
    assert line["level"] == "debug"
    assert "visitors connected" in str(line["reason"])


# --------------------------------------------------------------------------------------------
# The session under a stream ends


async def test_client_gone_mid_stream(
    nursery: trio.Nursery, tmp_path: Path, capture_logs: Callable[[str, str], LogCapture]
) -> None:
    logs = capture_logs("json", "info")
    arrived = trio.Event()

    async def service(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(1)
            arrived.set()
            await trio.sleep_forever()

    # A client gone without CLOSE may come back: the relay keeps its session for the resume
    # window (protocol-spec.md §10.6), then its streams end with the session.
    relay = await start_relay(nursery, tmp_path, resume_window=1.0)
    local = await start_service(nursery, service)
    client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=local)])
    with trio.fail_after(30):
        stream = await _visitor_connect(client.port(0))
        await stream.send_all(b"y")
        await arrived.wait()
        client.scope.cancel()  # the client stops at once: its streams are cancelled
    (at_client,) = await logs.wait_access(1, _side("client"))
    (at_relay,) = await logs.wait_access(1, _side("relay"))
    assert at_client["end"] == "cancelled"
    assert at_relay["end"] == "session_ended"
    for line in (at_relay, at_client):
        assert line["bytes_from_visitor"] == 1
    await stream.aclose()


def test_every_end_is_documented() -> None:
    from muxtunnel.accesslog import ENDS  # here: the other tests run without the module

    assert len(set(ENDS)) == len(ENDS)
    assert {"closed", "reset_by_visitor", "refused", "dial_failed", "dial_timeout"} <= set(ENDS)


# --------------------------------------------------------------------------------------------
# The log formats themselves


def test_json_records_carry_extra_fields_with_their_types(
    capture_logs: Callable[[str, str], LogCapture],
) -> None:
    logs = capture_logs("json", "info")
    log = logging.getLogger("muxtunnel.test")
    log.info(
        "peer said %s",
        "two\nlines \u202e",
        extra={
            "count": 3,
            "ratio": 0.5,
            "flag": True,
            "nothing": None,
            "label": "x\ny",
            "pair": (1, "a"),
            "odd": float("nan"),
            "level": "clash",
            "ratelimit_key": ("peer", 1),
        },
    )
    log.warning("limited", extra={"ratelimit": False})
    lines = logs.lines()
    assert len(lines) == 2  # a newline inside a value is escaped by JSON
    assert all(line.isascii() for line in lines)  # no raw bidi override or line separator
    first = json.loads(lines[0])
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]  # fail2ban's filter relies on it
    assert first["msg"] == "peer said two\nlines \u202e"
    assert first["level"] == "info"
    assert first["extra_level"] == "clash"
    assert (first["count"], first["ratio"], first["flag"], first["nothing"]) == (3, 0.5, True, None)
    assert first["pair"] == [1, "a"]
    assert first["odd"] == "nan"  # JSON has no NaN: written as text
    assert first["label"] == "x\ny"
    assert "ratelimit_key" not in first
    assert "ratelimit" not in json.loads(lines[1])


def test_text_records_never_span_lines(capture_logs: Callable[[str, str], LogCapture]) -> None:
    logs = capture_logs("text", "info")
    logging.getLogger("muxtunnel.test").info("peer said %s", "one\r\nforged WARNING line")
    (line,) = logs.lines()
    assert line.endswith("INFO muxtunnel.test: peer said one\\r\\nforged WARNING line")


def test_refused_access_lines_stay_rate_limited(
    capture_logs: Callable[[str, str], LogCapture],
) -> None:
    from muxtunnel.accesslog import log_access  # here: the other tests run without the module

    logs = capture_logs("json", "info")
    for _ in range(200):  # a flood of visitors the client cannot serve
        log_access(
            side="client",
            tunnel="relay:1 -> 127.0.0.1:2",
            visitor="127.0.0.2:3",
            local="127.0.0.1:2",
            bytes_from_visitor=0,
            bytes_to_visitor=0,
            duration=0.0,
            end="dial_failed",
            reason="connect to 127.0.0.1:2 failed",
        )
    for _ in range(200):  # connections that carried a stream are all logged
        log_access(
            side="client",
            tunnel="relay:1 -> 127.0.0.1:2",
            visitor="127.0.0.2:3",
            local="127.0.0.1:2",
            bytes_from_visitor=1,
            bytes_to_visitor=2,
            duration=0.1,
            end="closed",
        )
    ends = [a["end"] for a in logs.access()]
    assert ends.count("closed") == 200
    assert 1 <= ends.count("dial_failed") <= 30  # the default burst (20) plus a refill
