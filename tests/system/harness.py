"""Process harness for the system tests: real ``python -m muxtunnel`` processes on loopback.

Everything here is synchronous (threads + subprocess) so it works in plain pytest tests,
whatever async plugin is active. Every wait is bounded and every failure message carries the
command line, exit status, stdout and stderr of the processes involved. Teardown signals only
the PIDs this module started (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Self

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "REPO_ROOT",
    "Client",
    "EchoServer",
    "Forward",
    "HarnessError",
    "ManagedProcess",
    "ProcessGroup",
    "Relay",
    "echo_roundtrip",
    "expose",
    "free_port",
    "muxtunnel_command",
    "muxtunnel_env",
    "port_is_listening",
    "port_window",
    "random_port_range",
    "start_client",
    "start_relay",
    "wait_until",
]

#: The repository root (``tests/system/harness.py`` -> three levels up).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Default bound for "the process should have said X by now".
DEFAULT_TIMEOUT = 20.0

_LISTEN_RE = re.compile(r"muxtunnel relay listening on (?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+)")
_FINGERPRINT_RE = re.compile(r"fingerprint: (?P<fp>sha256:[0-9a-f]{64})\b")
_FORWARD_RE = re.compile(
    r"forwarding tcp://(?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+) -> (?P<local>\S+)"
)


def muxtunnel_command() -> list[str]:
    """How to run muxtunnel: ``python -m muxtunnel`` from this checkout.

    ``MUXTUNNEL_SYSTEM_CMD`` (split on whitespace) overrides it, e.g. to test an installed
    ``muxtunnel`` entry point.
    """
    override = os.environ.get("MUXTUNNEL_SYSTEM_CMD", "").split()
    return override or [sys.executable, "-m", "muxtunnel"]


class HarnessError(AssertionError):
    """A process did not behave as the test expected (message includes its output)."""


# --------------------------------------------------------------------------------------------
# ports


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


#: ``LO-HI``: the window the public port ranges of the tests are picked from. scripts/test.sh
#: gives each of its concurrent pytest runs its own window, so they never pick the same ports.
PORT_WINDOW_ENV = "MUXTUNNEL_TEST_PORTS"


def port_window(lo: int, hi: int) -> tuple[int, int]:
    """``$MUXTUNNEL_TEST_PORTS`` (``LO-HI``) when that is set, else ``(lo, hi)``."""
    value = os.environ.get(PORT_WINDOW_ENV, "")
    if not value:
        return lo, hi
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
    if match is None or not 1024 <= int(match[1]) < int(match[2]) <= 65535:
        raise HarnessError(f"{PORT_WINDOW_ENV}={value!r}: expected LO-HI, e.g. 20000-32000")
    return int(match[1]), int(match[2])


def random_port_range(size: int = 16, *, lo: int = 20000, hi: int = 60000) -> tuple[int, int]:
    """Pick a random range of ``size`` currently free ports inside ``[lo, hi]``.

    The lower part of the window (below the usual Linux ephemeral range, 32768+) is preferred so
    outgoing connections of other processes are unlikely to grab a port of the range.
    ``$MUXTUNNEL_TEST_PORTS`` replaces ``[lo, hi]`` (:func:`port_window`).
    """
    lo, hi = port_window(lo, hi)
    if hi - lo < size:
        raise HarnessError(f"no room for {size} ports in {lo}-{hi} ({PORT_WINDOW_ENV})")
    rng = random.Random()
    upper = min(hi, 32767) if hi > 32767 + size else hi
    for _ in range(50):
        start = rng.randrange(lo, upper - size + 1)
        if all(_port_free(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise HarnessError(f"no free range of {size} ports found in {lo}-{hi} after 50 tries")


def port_is_listening(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True if a TCP connect to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    details: Callable[[], str] | None = None,
) -> float:
    """Poll ``predicate`` until it is true; return the elapsed seconds or raise HarnessError."""
    __tracebackhide__ = True
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise HarnessError(f"timed out after {timeout:.1f} s waiting for {what}{extra}")
        time.sleep(interval)


def echo_roundtrip(
    port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 10.0
) -> bytes:
    """Connect, send ``payload``, half-close, and return everything read until EOF."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# a local echo service (the thing we expose through the tunnel in the process-level tests)


class EchoServer:
    """A threaded TCP echo server on 127.0.0.1; echoes until EOF, then half-closes back."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        #: Every byte each connection sent, in accept order.
        self.received: list[bytearray] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="echo-accept", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            buffer = bytearray()
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
                self.received.append(buffer)
            thread = threading.Thread(target=self._serve, args=(conn, buffer), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, buffer: bytearray) -> None:
        conn.settimeout(60.0)
        try:
            while not self._stop.is_set():
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    break
                with self._lock:
                    buffer += data
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def saw(self, marker: bytes) -> bool:
        """True if any connection ever sent ``marker``."""
        with self._lock:
            return any(marker in bytes(buffer) for buffer in self.received)

    def close(self) -> None:
        """Stop accepting, close every connection and join the threads (bounded)."""
        self._stop.set()
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# processes


class _LineCollector:
    """Reads a text pipe in a thread and keeps every line (without the newline)."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.eof = False
        self._pipe = pipe
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in iter(self._pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self.cond:
                    self.lines.append(line)
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._pipe.close()

    def snapshot(self) -> list[str]:
        with self.cond:
            return list(self.lines)


def _tail(lines: Sequence[str], n: int = 60) -> str:
    if not lines:
        return "    (empty)"
    shown = lines[-n:]
    prefix = f"    ... ({len(lines) - n} earlier lines)\n" if len(lines) > n else ""
    return prefix + "\n".join(f"    {line}" for line in shown)


class ManagedProcess:
    """A subprocess whose stdout/stderr are collected line by line in background threads."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        self.pid = self.popen.pid
        assert self.popen.stdout is not None
        assert self.popen.stderr is not None
        self._out = _LineCollector(self.popen.stdout, f"{name}-stdout")
        self._err = _LineCollector(self.popen.stderr, f"{name}-stderr")
        self._closed = False

    # -- inspection --------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """Exit status (negative signal number if killed), or None while running."""
        return self.popen.poll()

    @property
    def stdout_lines(self) -> list[str]:
        """Every stdout line so far."""
        return self._out.snapshot()

    @property
    def stderr_lines(self) -> list[str]:
        """Every stderr line so far."""
        return self._err.snapshot()

    def describe(self) -> str:
        """A multi-line report: command, status, stdout and stderr."""
        rc = self.returncode
        status = "running" if rc is None else f"exit status {rc}"
        return (
            f"--- {self.name} (pid {self.pid}, {status})\n"
            f"  argv: {' '.join(self.argv)}\n"
            f"  stdout:\n{_tail(self.stdout_lines)}\n"
            f"  stderr:\n{_tail(self.stderr_lines)}"
        )

    # -- waiting -----------------------------------------------------------------------------

    def wait_for_line(
        self,
        pattern: re.Pattern[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        stream: str = "stdout",
        start: int = 0,
        what: str | None = None,
        context: Callable[[], str] | None = None,
    ) -> tuple[re.Match[str], int]:
        """Wait for a line matching ``pattern`` at index >= ``start``; return (match, index).

        Fails early (with the output) if the process exits without printing it.
        """
        __tracebackhide__ = True
        collector = self._out if stream == "stdout" else self._err
        deadline = time.monotonic() + timeout
        index = start
        with collector.cond:
            while True:
                while index < len(collector.lines):
                    match = pattern.search(collector.lines[index])
                    if match is not None:
                        return match, index
                    index += 1
                remaining = deadline - time.monotonic()
                if collector.eof or remaining <= 0:
                    break
                collector.cond.wait(min(remaining, 0.2))
        # give the exit status a moment to settle so the message is accurate
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(0.5)
        reason = "exited" if self.returncode is not None else f"timed out after {timeout:.1f} s"
        desc = what or f"a {stream} line matching {pattern.pattern!r}"
        extra = f"\n{context()}" if context is not None else ""
        raise HarnessError(f"{self.name} {reason} before printing {desc}\n{self.describe()}{extra}")

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to exit on its own; return its status or raise HarnessError."""
        __tracebackhide__ = True
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{self.name} did not exit within {timeout:.1f} s\n{self.describe()}"
            ) from None
        self._out.join()
        self._err.join()
        return rc

    # -- stopping ----------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to this process only (never a group), if it is still running."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> int:
        """SIGKILL and reap."""
        self.send_signal(signal.SIGKILL)
        rc = self.popen.wait(10)
        self._out.join()
        self._err.join()
        return rc

    def terminate(self, grace: float = 12.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; return the exit status."""
        self.send_signal(signal.SIGTERM)
        self.send_signal(signal.SIGCONT)  # in case a test stopped it (SIGSTOP)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        self._out.join()
        self._err.join()
        rc = self.popen.returncode
        assert rc is not None
        return rc

    def close(self, grace: float = 5.0) -> None:
        """Make sure the process is gone and its pipes are closed (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.popen.poll() is None:
            self.terminate(grace)
        else:
            self.popen.wait()
            self._out.join()
            self._err.join()


@dataclass
class ProcessGroup:
    """Tracks the processes a test started; ``close()`` stops them in reverse order."""

    processes: list[ManagedProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start and track a process."""
        proc = ManagedProcess(name, argv, env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    def describe(self) -> str:
        """Output of every tracked process."""
        return "\n".join(p.describe() for p in self.processes)

    def close(self) -> None:
        """Stop every tracked process (SIGTERM then SIGKILL), newest first."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.close()


def muxtunnel_env(home: Path) -> dict[str, str]:
    """Environment for muxtunnel subprocesses: unbuffered, no stray token, state under ``home``."""
    env = dict(os.environ)
    env.pop("MUXTUNNEL_TOKEN", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["XDG_STATE_HOME"] = str(home / "xdg-state")
    env["XDG_CONFIG_HOME"] = str(home / "xdg-config")
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    return env


# --------------------------------------------------------------------------------------------
# relay and client


@dataclass
class Relay:
    """A running ``muxtunnel server`` process."""

    proc: ManagedProcess
    host: str
    port: int
    fingerprint: str
    port_range: tuple[int, int]
    state_dir: Path
    token: str

    @property
    def address(self) -> str:
        """``HOST:PORT`` for ``--server``."""
        return f"{self.host}:{self.port}"

    def bound_ports(self) -> list[int]:
        """Ports of the public range that accept connections right now."""
        lo, hi = self.port_range
        return [p for p in range(lo, hi + 1) if port_is_listening(p, timeout=0.5)]


@dataclass(frozen=True)
class Forward:
    """One ``forwarding tcp://HOST:PORT -> LOCAL`` line."""

    host: str
    port: int
    local: str


@dataclass
class Client:
    """A running ``muxtunnel client`` process."""

    proc: ManagedProcess
    forwards: list[Forward]
    state_dir: Path

    def wait_forwards(
        self, count: int, *, start: int = 0, timeout: float = DEFAULT_TIMEOUT
    ) -> tuple[list[Forward], int]:
        """Wait for ``count`` forwarding lines at stdout index >= ``start``; return them and the next index."""
        __tracebackhide__ = True
        found: list[Forward] = []
        index = start
        for _ in range(count):
            match, at = self.proc.wait_for_line(
                _FORWARD_RE,
                timeout=timeout,
                start=index,
                what=f"{count} 'forwarding tcp://...' lines (got {len(found)})",
            )
            found.append(_forward_from(match))
            index = at + 1
        return found, index


def _forward_from(match: re.Match[str]) -> Forward:
    host = match.group("host").strip("[]")
    return Forward(host=host, port=int(match.group("port")), local=match.group("local"))


def start_relay(
    group: ProcessGroup,
    workdir: Path,
    *,
    token: str,
    port_range: tuple[int, int] | None = None,
    listen_port: int = 0,
    state_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    name: str = "relay",
    timeout: float = DEFAULT_TIMEOUT,
) -> Relay:
    """Start ``python -m muxtunnel server`` on loopback and wait until it listens."""
    __tracebackhide__ = True
    port_range = port_range or random_port_range()
    state_dir = state_dir or workdir / f"{name}-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        *muxtunnel_command(),
        "server",
        "--listen",
        f"127.0.0.1:{listen_port}",
        "--ports",
        f"{port_range[0]}-{port_range[1]}",
        "--bind",
        "127.0.0.1",
        "--state-dir",
        str(state_dir),
        "--token",
        token,
        *extra_args,
    ]
    proc = group.start(name, argv, env=muxtunnel_env(workdir), cwd=workdir)
    fp_match, _ = proc.wait_for_line(
        _FINGERPRINT_RE, timeout=timeout, what="'fingerprint: sha256:...'"
    )
    listen_match, _ = proc.wait_for_line(
        _LISTEN_RE, timeout=timeout, what="'muxtunnel relay listening on HOST:PORT'"
    )
    return Relay(
        proc=proc,
        host=listen_match.group("host").strip("[]"),
        port=int(listen_match.group("port")),
        fingerprint=fp_match.group("fp"),
        port_range=port_range,
        state_dir=state_dir,
        token=token,
    )


def client_argv(
    relay_address: str,
    specs: Sequence[str],
    *,
    token: str,
    fingerprint: str | None,
    state_dir: Path,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of a ``muxtunnel client``."""
    argv = [
        *muxtunnel_command(),
        "client",
        "--server",
        relay_address,
        "--token",
        token,
        "--state-dir",
        str(state_dir),
    ]
    if fingerprint is not None:
        argv += ["--fingerprint", fingerprint]
    return [*argv, *extra_args, *specs]


def start_client(
    group: ProcessGroup,
    workdir: Path,
    relay: Relay,
    specs: Sequence[str],
    *,
    token: str | None = None,
    fingerprint: str | None = "relay",
    state_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    expect_forwards: int | None = None,
    name: str = "client",
    timeout: float = DEFAULT_TIMEOUT,
) -> Client:
    """Start ``python -m muxtunnel client`` and wait for its forwarding lines.

    ``fingerprint="relay"`` pins the relay's printed fingerprint; ``None`` means trust on first
    use. ``expect_forwards`` defaults to ``len(specs)``; 0 returns at once.
    """
    __tracebackhide__ = True
    fp = relay.fingerprint if fingerprint == "relay" else fingerprint
    state_dir = state_dir or workdir / f"{name}-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = client_argv(
        relay.address,
        specs,
        token=token if token is not None else relay.token,
        fingerprint=fp,
        state_dir=state_dir,
        extra_args=extra_args,
    )
    proc = group.start(name, argv, env=muxtunnel_env(workdir), cwd=workdir)
    client = Client(proc=proc, forwards=[], state_dir=state_dir)
    count = len(specs) if expect_forwards is None else expect_forwards
    if count:
        try:
            client.forwards, _ = client.wait_forwards(count, timeout=timeout)
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{relay.proc.describe()}") from None
    return client


def expose(
    group: ProcessGroup, workdir: Path, local_port: int, *, name: str = "tunnel"
) -> tuple[Relay, Client, int]:
    """Start a relay and a client exposing ``127.0.0.1:local_port``; return them and the public port."""
    __tracebackhide__ = True
    token = secrets.token_urlsafe(24)
    relay = start_relay(group, workdir, token=token, name=f"{name}-relay")
    client = start_client(group, workdir, relay, [str(local_port)], name=f"{name}-client")
    (fwd,) = client.forwards
    lo, hi = relay.port_range
    if fwd.local != f"127.0.0.1:{local_port}" or not lo <= fwd.port <= hi:
        raise HarnessError(
            f"unexpected forwarding line {fwd} for local port {local_port}, range {lo}-{hi}\n"
            f"{client.proc.describe()}"
        )
    return relay, client, fwd.port
