"""The client's live console (muxtunnel.console) and the background retry of refused tunnels,
in process: rendering from real stats, rates, the error pane, and a client whose port is
held by a plain socket until the test lets it go."""

from __future__ import annotations

import io
import logging
import socket
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from rich.console import Console

from muxtunnel.client import RETRYABLE, ClientInfo, run_client
from muxtunnel.config import ClientConfig, TunnelSpec
from muxtunnel.console import (
    ClientConsole,
    LogTail,
    capture_logs,
    run_client_with_console,
    want_console,
)
from muxtunnel.errors import TunnelError
from muxtunnel.policy import StreamInfo
from muxtunnel.protocol.constants import ResultStatus
from muxtunnel.protocol.frames import Address
from muxtunnel.stats import Stats

from .conftest import TOKEN, echo_roundtrip, start_echo, start_relay

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Relay


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _text(view: ClientConsole, width: int = 140) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(view.render())
    return out.getvalue()


def _info(sid: int) -> StreamInfo:
    return StreamInfo(
        stream_id=sid,
        tunnel_id=1,
        origin=Address("127.0.0.1", 40000),
        target=Address("127.0.0.1", 20001),
        started=0.0,
    )


def test_render_shows_tunnels_counts_rates_and_reasons() -> None:
    wall, mono = Clock(1000.0), Clock(50.0)
    stats = Stats("client", clock=wall)
    session = stats.add_session("relay.example:7835", rtt=lambda: 0.0123)
    session.state = "up"
    up = session.add_tunnel(1, "relay.example:20001", "127.0.0.1:22")
    pending = session.add_tunnel(2, "relay.example:20002", "127.0.0.1:80", state="pending")
    pending.last_error = "ADDRESS_IN_USE: port 20002 is in use"
    tail = LogTail(size=2)
    view = ClientConsole(stats, "relay.example:7835", tail, clock=mono)
    view.sample()
    stream = _info(1)
    up.stream_opened(stream)
    stream.bytes_in, stream.bytes_out = 4096, 2048
    wall.now += 2
    mono.now += 2
    view.sample()
    assert view.rates(1) == (2048.0, 1024.0)
    assert view.rates(7) == (0.0, 0.0)
    text = _text(view)
    assert "relay relay.example:7835" in text
    assert "session: up for 2s   rtt: 12.3 ms" in text
    row = next(line for line in text.splitlines() if "20001 ->" in line).split()
    assert row[:8] == ["relay.example:20001", "->", "127.0.0.1:22", "up", "1", "1", "4.0", "KiB"]
    assert row[-4:] == ["2.0", "KiB/s", "1.0", "KiB/s"]
    assert "relay.example:20002 -> 127.0.0.1:80   pending (retrying)" in text
    assert "relay.example:20002: pending: ADDRESS_IN_USE: port 20002 is in use" in text
    assert "recent errors: none" in text
    session.state, session.retry_at = "reconnecting", wall.now + 7.4
    view.sample()
    assert "session: reconnecting in 7 s   rtt:" in _text(view)


def test_log_tail_keeps_the_last_lines_and_parks_terminal_handlers() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Tty(), io.StringIO()
    on_tty, on_pipe = logging.StreamHandler(terminal), logging.StreamHandler(pipe)
    root = logging.getLogger()
    root.addHandler(on_tty)
    root.addHandler(on_pipe)
    tail = LogTail(size=3)
    log = logging.getLogger("muxtunnel.test_console")
    try:
        with capture_logs(tail):
            assert on_tty not in root.handlers
            for i in range(5):
                log.warning("refused %d\nsecond line", i)
            log.info("not an error")
        assert on_tty in root.handlers
        log.warning("after")
    finally:
        root.removeHandler(on_tty)
        root.removeHandler(on_pipe)
    assert [line.split(" ", 1)[1] for line in tail.lines] == [
        f"WARNING refused {i}\\nsecond line" for i in (2, 3, 4)
    ]
    assert "refused 0" not in terminal.getvalue()
    assert "after" in terminal.getvalue()
    assert "refused 4" in pipe.getvalue()  # a file or pipe keeps every line


def test_want_console() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert want_console(None, Tty()) is True
    assert want_console(None, io.StringIO()) is False
    assert want_console(True, io.StringIO()) is True
    assert want_console(False, Tty()) is False


def test_retryable_statuses() -> None:
    assert ResultStatus.ADDRESS_IN_USE in RETRYABLE
    for status in (
        ResultStatus.DENIED,
        ResultStatus.OUT_OF_RANGE,
        ResultStatus.MALFORMED,
        ResultStatus.LIMIT_REACHED,
    ):
        assert status not in RETRYABLE


def _config(tmp_path: Path, relay: Relay, specs: list[TunnelSpec]) -> ClientConfig:
    return ClientConfig(
        server_host="127.0.0.1",
        server_port=relay.info.port,
        token=TOKEN,
        fingerprint=relay.info.fingerprint,
        state_dir=tmp_path / "client",
        tunnels=tuple(specs),
        max_retries=None,
        connect_timeout=2.0,
        backoff_cap=1.0,
    )


async def _wait_state(stats: Stats, state: str) -> dict[str, object]:
    """Poll the stats (as the console does) until the one tunnel is in ``state``."""
    with trio.fail_after(60):
        while True:
            (session,) = stats.snapshot()["sessions"]
            (tunnel,) = session["tunnels"]
            if tunnel["state"] == state:
                assert isinstance(tunnel, dict)
                return tunnel
            await trio.sleep(0.05)


async def test_port_held_elsewhere_is_pending_then_up(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    port = relay.config.port_range[0]
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    stats = Stats("client")
    lines: list[str] = []
    shutdown = trio.Event()
    config = _config(tmp_path, relay, [TunnelSpec(local_port=echo, remote_port=port)])
    try:
        info = await nursery.start(
            partial(run_client, config, shutdown=shutdown, report=lines.append, stats=stats)
        )
        # Every tunnel refused for a reason that can pass: up, nothing bound yet, retrying.
        assert isinstance(info, ClientInfo)
        assert info.tunnels == ()
        tunnel = await _wait_state(stats, "pending")
        assert str(tunnel["last_error"]).startswith("ADDRESS_IN_USE: ")
        assert lines == []
    finally:
        holder.close()
    await _wait_state(stats, "up")
    assert lines == [f"forwarding tcp://127.0.0.1:{port} -> 127.0.0.1:{echo}"]
    with trio.fail_after(20):
        assert await echo_roundtrip(port, b"after the retry") == b"after the retry"
    shutdown.set()


async def test_refusals_that_cannot_pass_still_end_the_client(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = await start_relay(nursery, tmp_path)
    lo, _hi = relay.config.port_range
    config = _config(tmp_path, relay, [TunnelSpec(local_port=9, remote_port=lo - 1)])
    with trio.fail_after(20), pytest.raises(TunnelError, match="refused every tunnel"):
        await run_client(config, report=lambda line: None)


async def test_console_runs_around_a_client(nursery: trio.Nursery, tmp_path: Path) -> None:
    echo = await start_echo(nursery)
    relay = await start_relay(nursery, tmp_path)
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=True, color_system=None)
    shutdown = trio.Event()
    lines: list[str] = []
    forwarding = trio.Event()
    config = _config(tmp_path, relay, [TunnelSpec(local_port=echo)])
    done = trio.Event()

    def report(line: str) -> None:
        lines.append(line)
        forwarding.set()

    async def run() -> None:
        await run_client_with_console(config, shutdown=shutdown, report=report, console=console)
        done.set()

    nursery.start_soon(run)
    with trio.fail_after(20):
        await forwarding.wait()
    port = int(lines[0].split()[1].rsplit(":", 1)[1])
    with trio.fail_after(20):
        assert await echo_roundtrip(port, b"x" * 3000) == b"x" * 3000
    shutdown.set()
    with trio.fail_after(20):
        await done.wait()
    text = out.getvalue()
    assert f"relay 127.0.0.1:{relay.info.port}" in text
    # The last frame (drawn as the client stops) has the final counts.
    assert f"127.0.0.1:{port} -> 127.0.0.1:{echo}" in text
    assert "2.9 KiB" in text
