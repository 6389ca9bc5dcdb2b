"""The client's live console (muxtunnel.console) and the background retry of refused tunnels.

The console test runs a real ``muxtunnel client`` on a pseudo-terminal (a private tmux server)
and reads the screen with ``tmux capture-pane``; the other tests read its plain output through
pipes, and the relay's answers through ``muxtunnel status --json``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

from .harness import (
    EchoServer,
    HarnessError,
    ProcessGroup,
    Relay,
    client_argv,
    echo_roundtrip,
    muxtunnel_command,
    muxtunnel_env,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.system

#: A tunnel refused with ADDRESS_IN_USE is retried after about 1, 2, 4, 8 ... s: once the port
#: is free it comes up within the current backoff (plus a slow start-up on a busy machine).
RETRY_LIMIT = 60.0
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BOX_CHARS = set("─│┌┐└┘├┤┬┴┼╭╮╰╯━┃")


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A local TCP echo service to expose."""
    with EchoServer() as server:
        yield server


@contextmanager
def held_port(port: int) -> Iterator[socket.socket]:
    """A plain listening socket on 127.0.0.1:``port`` (the relay cannot bind it meanwhile)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        yield sock
    finally:
        sock.close()


class Terminal:
    """A command on the pseudo-terminal of a private tmux server (``tmux -L NAME``)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.tmux = shutil.which("tmux")
        if self.tmux is None:
            raise HarnessError("tmux is not installed (.ci/install-system-deps.sh installs it)")
        self.socket = f"muxtunnel-test-{secrets.token_hex(6)}"
        # The screen stays readable after the command exits (its last frame, or its error).
        self.conf = cwd / f"{self.socket}.conf"
        self.conf.write_text("set -g remain-on-exit on\nset -g default-size 130x30\n")
        # COLUMNS/LINES of the test runner would override the terminal's own size.
        env_argv = ["env", "-u", "COLUMNS", "-u", "LINES", *(f"{k}={v}" for k, v in env.items())]
        command = shlex.join([*env_argv, *argv])
        out = self._tmux(
            "new-session",
            "-d",
            "-x",
            "130",
            "-y",
            "30",
            "-P",
            "-F",
            "#{pane_pid}",
            command,
            cwd=cwd,
        )
        self.pid = int(out.strip())

    def _tmux(self, *args: str, cwd: Path | None = None) -> str:
        assert self.tmux is not None
        done = subprocess.run(
            [self.tmux, "-L", self.socket, "-f", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=cwd,
            check=True,
        )
        return done.stdout

    def screen(self) -> str:
        """The visible screen as plain text."""
        return self._tmux("capture-pane", "-p")

    def wait_screen(self, pattern: str, *, timeout: float = 30.0) -> re.Match[str]:
        """Wait until the screen matches ``pattern`` (a regex); return the match."""
        found: list[re.Match[str]] = []

        def check() -> bool:
            match = re.search(pattern, self.screen(), re.MULTILINE)
            if match:
                found.append(match)
            return match is not None

        wait_until(
            check,
            timeout=timeout,
            interval=0.25,
            what=f"the console to show {pattern!r}",
            details=lambda: "screen:\n" + self.screen(),
        )
        return found[0]

    def close(self) -> None:
        """SIGTERM the command (the pane's process, which we started), then end our tmux server."""
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self._tmux("kill-server")
        except subprocess.CalledProcessError:
            pass


def _client_on_terminal(
    relay: Relay, workdir: Path, specs: list[str], extra: list[str] | None = None
) -> Terminal:
    state = workdir / "console-client"
    state.mkdir(exist_ok=True)
    argv = client_argv(
        relay.address,
        specs,
        token=relay.token,
        fingerprint=relay.fingerprint,
        state_dir=state,
        extra_args=extra or [],
    )
    env = {
        k: v
        for k, v in muxtunnel_env(workdir).items()
        if k.startswith(("PYTHON", "XDG", "PATH", "COVERAGE"))
    }
    return Terminal(argv, {**env, "TERM": "xterm-256color"}, workdir)


def _status(state_dir: Path, workdir: Path) -> list[dict[str, object]]:
    done = subprocess.run(
        [*muxtunnel_command(), "status", "--state-dir", str(state_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=muxtunnel_env(workdir),
        check=True,
    )
    snapshots = json.loads(done.stdout)
    assert isinstance(snapshots, list)
    return snapshots


def _tunnels(state_dir: Path, workdir: Path) -> list[dict[str, object]]:
    (snapshot,) = [s for s in _status(state_dir, workdir) if s.get("role") == "client"]
    sessions = snapshot["sessions"]
    assert isinstance(sessions, list)
    return [t for s in sessions for t in s["tunnels"]]


def test_console_shows_session_tunnels_traffic_and_pending(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24))
    lo, _hi = relay.port_range
    free, held = lo, lo + 1
    local = f"127.0.0.1:{echo.port}"
    with held_port(held) as holder:
        term = _client_on_terminal(relay, tmp_path, [f"{free}:{echo.port}", f"{held}:{echo.port}"])
        try:
            term.wait_screen(rf"forwarding tcp://127\.0\.0\.1:{free} -> {re.escape(local)}")
            # The held port: refused with ADDRESS_IN_USE, shown pending and retried.
            term.wait_screen(rf"127\.0\.0\.1:{held} -> {re.escape(local)}\s+pending \(retrying\)\s")
            term.wait_screen(rf"^\s+127\.0\.0\.1:{held}: pending: ADDRESS_IN_USE: ")
            payload = secrets.token_bytes(100_000)
            for _ in range(3):
                assert echo_roundtrip(free, payload) == payload
            size = f"{3 * len(payload) / 1024:.1f} KiB"  # as muxtunnel.admin.format_bytes
            row = term.wait_screen(
                rf"127\.0\.0\.1:{free} -> {re.escape(local)}\s+up\s+0\s+3\s+"
                rf"{re.escape(size)}\s+{re.escape(size)}\s"
            )
            screen = term.screen()
            assert f"relay {relay.address}" in screen
            assert re.search(r"session: up for \d+s\s+rtt: [\d.]+ ms", screen), screen
            assert "recent errors:" in screen
            # The refusal was logged as a warning: it went to the error pane, not over the view.
            assert re.search(rf"WARNING tunnel .*: the relay refused remote port {held}: ", screen)
            print(f"console frame (row {row.group(0)!r}):\n{screen}")
            # The port comes free: the pending tunnel comes up within the backoff and carries bytes.
            holder.close()
            term.wait_screen(
                rf"forwarding tcp://127\.0\.0\.1:{held} -> {re.escape(local)}",
                timeout=RETRY_LIMIT,
            )
            assert echo_roundtrip(held, b"retried") == b"retried"
            term.wait_screen(rf"127\.0\.0\.1:{held} -> {re.escape(local)}\s+up\s+0\s+1\s")
        finally:
            term.close()


def test_plain_output_when_stdout_is_not_a_terminal(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24))
    client = start_client(procs, tmp_path, relay, [str(echo.port)])
    (fwd,) = client.forwards
    assert echo_roundtrip(fwd.port, b"plain") == b"plain"
    client.proc.wait_for_line(
        re.compile(r"INFO muxtunnel\.client: connected to relay"), stream="stderr", timeout=10
    )
    client.proc.terminate()
    text = "\n".join(client.proc.stdout_lines + client.proc.stderr_lines)
    assert client.proc.stdout_lines[0].startswith("forwarding tcp://127.0.0.1:")
    assert not _ANSI_RE.search(text), text
    assert not _BOX_CHARS & set(text), text
    assert "recent errors:" not in text


def test_refused_tunnel_is_pending_then_comes_up(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    """Every tunnel refused with ADDRESS_IN_USE: the client keeps running and retrying."""
    relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24))
    lo, _hi = relay.port_range
    with held_port(lo) as holder:
        client = start_client(
            procs, tmp_path, relay, [f"{lo}:{echo.port}"], expect_forwards=0, name="retry"
        )
        client.proc.wait_for_line(
            re.compile(r"the relay refused remote port \d+: ADDRESS_IN_USE: .*retrying"),
            stream="stderr",
            timeout=30,
        )
        (tunnel,) = _tunnels(client.state_dir, tmp_path)
        assert tunnel["state"] == "pending"
        assert str(tunnel["last_error"]).startswith("ADDRESS_IN_USE: ")
        assert client.proc.returncode is None
        holder.close()
        client.wait_forwards(1, timeout=RETRY_LIMIT)
    assert echo_roundtrip(lo, b"x" * 5000) == b"x" * 5000
    (tunnel,) = _tunnels(client.state_dir, tmp_path)
    assert tunnel["state"] == "up"
    assert tunnel["bytes_in"] == tunnel["bytes_out"] == 5000


def test_refusal_that_cannot_pass_is_not_retried(procs: ProcessGroup, tmp_path: Path) -> None:
    """OUT_OF_RANGE cannot pass: a client with nothing else to forward exits, as before."""
    relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24))
    lo, _hi = relay.port_range
    client = start_client(
        procs, tmp_path, relay, [f"{lo - 1}:9"], expect_forwards=0, name="hopeless"
    )
    assert client.proc.wait_exit(timeout=30) != 0
    text = "\n".join(client.proc.stderr_lines)
    assert "refused every tunnel" in text
    assert "retrying" not in text
