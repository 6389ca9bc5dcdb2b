"""Tools for the hostile-input suite: real relay/client processes under attack from this process.

Everything is synchronous (threads + blocking sockets), bounded in count and time, and uses
loopback only. Distinct loopback addresses (127.0.0.2, 127.0.0.3, ...) act as distinct sources:
the client has no option to choose its source address, so legitimate clients and visitors come
from 127.0.0.1 and attackers bind another loopback address before connecting.

Process measurements
    ``rss_bytes(pid)``, ``fd_count(pid)``: VmRSS and open descriptors of a process (Linux /proc).
    ``ResourceSampler(pid, interval=0.1)``: context manager; a thread records ``max_rss``,
    ``max_fds``, ``last_rss``, ``last_fds`` and ``samples`` until exit.

Processes (thin wrappers around tests/system/harness.py, which they re-export)
    ``start_hostile_relay(group, workdir, extra_args=..., token=..., ports=16)`` -> ``Relay``.
    ``start_legit_client(group, workdir, relay, [local_port, ...], extra_args=...)`` -> ``Client``
    with ``client.forwards[i].port`` the public port of the i-th local port.
    ``stderr_count(proc, pattern)``: stderr lines of a process matching a regex.

Legitimate traffic
    ``LegitTraffic(public_port)``: context manager; a thread does a checked 1 KiB echo round
    trip every ~50 ms (reusing a connection, a new one every ``reconnect_every`` round trips, or
    after any failure) and records ``successes``, ``failures``, ``errors`` and ``max_gap`` (the
    longest time without a successful round trip, including the time before the first and
    after the last). ``wait_successes(count, timeout)`` waits for the ``count``-th one;
    ``assert_healthy(max_gap=, min_successes=, max_failures=None)``.

Raw protocol client
    ``mux_handshake(host, port, token, source=..., timeout=...)`` -> ``HandshakeResult``:
    TCP + TLS 1.3 (ALPN muxtunnel/1, certificate not verified) + preface/HELLO + AUTH, with
    ``outcome`` one of ``"authenticated"``, ``"refused"``, ``"closed-before-tls"``,
    ``"tls-failed"``, ``"closed"``, ``"timeout"``, ``"connect-failed"``, and timings.
    ``send_auth=False`` stops after the CHALLENGE and waits for the relay to close (how long
    the relay keeps a connection that never authenticates). ``tls_delay`` sleeps between TCP
    connect and the ClientHello.

Attackers
    ``IdleConnections(host, port, count=, source="127.0.0.2", tls=False)``: context manager;
    keeps ``count`` idle TCP (or TLS-handshaken) connections open from ``source``, reopening
    those the peer closes, bounded by ``duration``, ``max_opens`` and ``max_rate`` (opens/s).
    Stats: ``opens``, ``closed_by_peer``, ``connect_errors``, ``open_now``.
    ``Visitors(port, count, source=, upload=0)``: ``count`` visitor connections that never
    read; a thread sends up to ``upload`` bytes on each without blocking. ``close(abort=False)``
    (``abort``: TCP reset).
    ``SinkServer(flood=False)``: a local service that accepts and never reads; with
    ``flood=True`` it also writes to each connection until the socket buffer is full.

    ``children_of(pid)``: PIDs whose parent is ``pid`` (to check nothing is left behind).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

from muxtunnel.connection import make_session
from muxtunnel.errors import ErrorCode
from muxtunnel.handshake import make_credential
from muxtunnel.protocol.constants import ALPN, AuthMethod, ResultStatus, Role
from muxtunnel.protocol.events import ChallengeReceived, ConnectionClosed, ResultReceived

# pytest (--import-mode=importlib) names this package "hostile", so the system-test harness is
# imported by its full name from the repository root.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.system.harness import (  # noqa: E402
    Client,
    EchoServer,
    HarnessError,
    ManagedProcess,
    ProcessGroup,
    Relay,
    muxtunnel_command,
    muxtunnel_env,
    random_port_range,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "MIB",
    "Client",
    "EchoServer",
    "HandshakeResult",
    "HarnessError",
    "IdleConnections",
    "LegitTraffic",
    "ManagedProcess",
    "ProcessGroup",
    "Relay",
    "ResourceSampler",
    "SinkServer",
    "TlsClient",
    "Visitors",
    "attacker_ssl_context",
    "children_of",
    "fd_count",
    "mux_handshake",
    "muxtunnel_command",
    "muxtunnel_env",
    "random_port_range",
    "rss_bytes",
    "start_client",
    "start_hostile_relay",
    "start_legit_client",
    "stderr_count",
    "wait_until",
]

MIB = 1024 * 1024

# --------------------------------------------------------------------------------------------
# process measurements


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS from /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise HarnessError(f"no VmRSS line for pid {pid}")


def fd_count(pid: int) -> int:
    """Number of open descriptors of ``pid`` (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def children_of(pid: int) -> list[int]:
    """PIDs of the live (not zombie) processes whose parent is ``pid``."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "PID (comm) STATE PPID ..." -- comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 2 and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


class ResourceSampler:
    """Samples a process's RSS and descriptor count every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss = 0
        self.max_fds = 0
        self.last_rss = 0
        self.last_fds = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{pid}", daemon=True)

    def sample(self) -> None:
        """Take one sample now (also done by the thread)."""
        try:
            rss, fds = rss_bytes(self.pid), fd_count(self.pid)
        except (OSError, HarnessError, ValueError):
            return
        self.last_rss, self.last_fds = rss, fds
        self.max_rss = max(self.max_rss, rss)
        self.max_fds = max(self.max_fds, fds)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> Self:
        """Start sampling (takes a first sample at once)."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (takes a last sample)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def describe(self) -> str:
        """One line with the figures."""
        return (
            f"pid {self.pid}: max RSS {self.max_rss / MIB:.1f} MiB, max fds {self.max_fds} "
            f"(last {self.last_rss / MIB:.1f} MiB, {self.last_fds} fds, {self.samples} samples)"
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# processes


def start_hostile_relay(
    group: ProcessGroup,
    workdir: Path,
    *,
    extra_args: Sequence[str] = (),
    token: str | None = None,
    ports: int = 16,
    name: str = "relay",
) -> Relay:
    """Start a relay on 127.0.0.1 with ``ports`` public ports and ``extra_args``."""
    __tracebackhide__ = True
    return start_relay(
        group,
        workdir,
        token=token or secrets.token_urlsafe(24),
        port_range=random_port_range(ports),
        extra_args=extra_args,
        name=name,
    )


def start_legit_client(
    group: ProcessGroup,
    workdir: Path,
    relay: Relay,
    local_ports: Sequence[int],
    *,
    token: str | None = None,
    extra_args: Sequence[str] = (),
    name: str = "legit-client",
    timeout: float = 20.0,
) -> Client:
    """Start a client exposing ``127.0.0.1:PORT`` for each local port; wait for its forwards."""
    __tracebackhide__ = True
    return start_client(
        group,
        workdir,
        relay,
        [f"0:127.0.0.1:{p}" for p in local_ports],
        token=token,
        extra_args=extra_args,
        name=name,
        timeout=timeout,
    )


def stderr_count(proc: ManagedProcess, pattern: str | re.Pattern[str]) -> int:
    """Number of stderr lines of ``proc`` matching ``pattern`` (a regex, searched)."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    return sum(1 for line in proc.stderr_lines if rx.search(line))


# --------------------------------------------------------------------------------------------
# legitimate traffic


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        data = sock.recv(min(65536, size - got))
        if not data:
            raise ConnectionError(f"EOF after {got} of {size} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _connect(host: str, port: int, source: str | None, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class LegitTraffic:
    """Checked echo round trips through a public port, in a thread, every ``interval`` s."""

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        source: str | None = None,
        payload_size: int = 1024,
        interval: float = 0.05,
        io_timeout: float = 3.0,
        reconnect_every: int = 10,
        name: str = "legit",
    ) -> None:
        self.port = port
        self.host = host
        self.source = source
        self.payload_size = payload_size
        self.interval = interval
        self.io_timeout = io_timeout
        self.reconnect_every = reconnect_every
        self.name = name
        self.successes = 0
        self.failures = 0
        self.connections = 0
        self.errors: list[str] = []
        self._max_gap = 0.0
        self._last_ok = 0.0
        self._stopped_at: float | None = None
        #: Guards the figures; notified on every success.
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def max_gap(self) -> float:
        """Longest time without a successful round trip (running gap included)."""
        with self._lock:
            end = self._stopped_at if self._stopped_at is not None else time.monotonic()
            return max(self._max_gap, end - self._last_ok)

    def _run(self) -> None:
        sock: socket.socket | None = None
        uses = 0
        try:
            while not self._stop.is_set():
                try:
                    if sock is None or uses >= self.reconnect_every:
                        if sock is not None:
                            sock.close()
                            sock = None
                        sock = _connect(self.host, self.port, self.source, self.io_timeout)
                        self.connections += 1
                        uses = 0
                    payload = secrets.token_bytes(self.payload_size)
                    sock.sendall(payload)
                    echoed = _recv_exact(sock, len(payload))
                    uses += 1
                    if echoed != payload:
                        raise ValueError("echo differs from the payload sent")
                except (OSError, ValueError) as exc:
                    with self._lock:
                        self.failures += 1
                        if len(self.errors) < 20:
                            self.errors.append(f"{type(exc).__name__}: {exc}")
                    if sock is not None:
                        sock.close()
                        sock = None
                else:
                    now = time.monotonic()
                    with self._lock:
                        self.successes += 1
                        self._max_gap = max(self._max_gap, now - self._last_ok)
                        self._last_ok = now
                        self._lock.notify_all()
                self._stop.wait(self.interval)
        finally:
            if sock is not None:
                sock.close()

    def start(self) -> Self:
        """Start the traffic thread."""
        self._last_ok = time.monotonic()
        self._thread.start()
        return self

    def wait_successes(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` round trips succeeded in all (at most ``timeout`` s); True if so."""
        with self._lock:
            return self._lock.wait_for(lambda: self.successes >= count, timeout)

    def stop(self) -> None:
        """Stop the thread (bounded by ``io_timeout``) and freeze ``max_gap``."""
        self._stop.set()
        self._thread.join(timeout=self.io_timeout + 5)
        with self._lock:
            self._stopped_at = time.monotonic()

    def describe(self) -> str:
        """One line with the figures (and the first errors)."""
        errs = "; ".join(self.errors[:5]) or "none"
        return (
            f"{self.name} on port {self.port}: {self.successes} checked round trips, "
            f"{self.failures} failures over {self.connections} connections, longest gap "
            f"{self.max_gap:.2f} s; first errors: {errs}"
        )

    def assert_healthy(
        self, *, max_gap: float, min_successes: int, max_failures: int | None = None
    ) -> None:
        """Fail with the figures unless the tunnel kept moving checked bytes."""
        __tracebackhide__ = True
        problems: list[str] = []
        gap = self.max_gap
        if gap > max_gap:
            problems.append(f"longest gap {gap:.2f} s > {max_gap:.2f} s")
        if self.successes < min_successes:
            problems.append(f"{self.successes} round trips < {min_successes}")
        if max_failures is not None and self.failures > max_failures:
            problems.append(f"{self.failures} failures > {max_failures}")
        if problems:
            raise AssertionError(
                f"legitimate tunnel unhealthy ({', '.join(problems)}): {self.describe()}"
            )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# raw protocol client


def attacker_ssl_context() -> ssl.SSLContext:
    """TLS 1.3 client context with ALPN muxtunnel/1 and no certificate verification."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    return ctx


class TlsClient:
    """TLS on a blocking socket through memory BIOs (no ``ssl.SSLSocket`` left half-made)."""

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext | None = None) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = (ctx or attacker_ssl_context()).wrap_bio(
            self._in, self._out, server_hostname="muxtunnel"
        )

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.sendall(data)

    def _fill(self) -> None:
        data = self.raw.recv(65536)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def handshake(self) -> None:
        """Complete the TLS handshake (raises ``ssl.SSLError`` or ``OSError``)."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            else:
                self._flush()
                return

    def sendall(self, data: bytes) -> None:
        """Encrypt and send ``data``."""
        self.tls.write(data)
        self._flush()

    def recv(self, size: int = 65536) -> bytes:
        """Decrypted bytes (b"" at EOF or TLS close)."""
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""


@dataclass
class HandshakeResult:
    """What happened to one raw handshake attempt (times in s from the TCP connect)."""

    outcome: str
    detail: str = ""
    tls_done: float | None = None
    challenge_at: float | None = None
    ended_at: float | None = None

    def __str__(self) -> str:
        times = ", ".join(
            f"{k} {v:.2f} s"
            for k, v in (
                ("TLS", self.tls_done),
                ("CHALLENGE", self.challenge_at),
                ("end", self.ended_at),
            )
            if v is not None
        )
        return f"{self.outcome} ({self.detail}; {times})"


def mux_handshake(
    host: str,
    port: int,
    token: str,
    *,
    source: str | None = None,
    timeout: float = 5.0,
    send_auth: bool = True,
    tls_delay: float = 0.0,
) -> HandshakeResult:
    """One raw client handshake against a relay; see the module docstring for outcomes."""
    start = time.monotonic()

    def since() -> float:
        return time.monotonic() - start

    deadline = start + timeout
    try:
        raw = _connect(host, port, source, timeout)
    except OSError as exc:
        return HandshakeResult("connect-failed", str(exc), ended_at=since())
    result = HandshakeResult("timeout")
    try:
        if tls_delay:
            time.sleep(tls_delay)
        raw.settimeout(max(0.01, deadline - time.monotonic()))
        sock = TlsClient(raw)
        try:
            sock.handshake()
        except TimeoutError:
            result.detail = "TLS handshake"
            return result
        except ssl.SSLError as exc:
            return HandshakeResult("tls-failed", str(exc), ended_at=since())
        except OSError as exc:
            return HandshakeResult("closed-before-tls", str(exc) or "EOF", ended_at=since())
        result.tls_done = since()
        session = make_session(Role.CLIENT)
        sock.sendall(session.data_to_send())
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                result.detail = "waiting for the relay"
                return result
            raw.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                data = b""
                result.detail = str(exc)
            if not data:
                result.outcome, result.ended_at = "closed", since()
                result.detail = result.detail or "EOF"
                return result
            for event in session.receive_data(data, time.monotonic()):
                if isinstance(event, ChallengeReceived):
                    result.challenge_at = since()
                    if send_auth:
                        session.send_auth(
                            1, AuthMethod.HMAC_SHA256, make_credential(token, event.nonce)
                        )
                elif isinstance(event, ResultReceived) and event.req_id == 1:
                    result.ended_at = since()
                    if event.status == ResultStatus.OK:
                        result.outcome = "authenticated"
                    else:
                        result.outcome, result.detail = "refused", event.message
                    return result
                elif isinstance(event, ConnectionClosed):
                    result.ended_at = since()
                    if event.error_code == ErrorCode.AUTH_FAILED:
                        result.outcome = "refused"
                    else:
                        result.outcome = "closed"
                    result.detail = f"CLOSE {event.error_code.name}: {event.message}"
                    return result
            out = session.data_to_send()
            if out:
                sock.sendall(out)
    finally:
        raw.close()


# --------------------------------------------------------------------------------------------
# attackers


class IdleConnections:
    """Keeps ``count`` idle connections from ``source`` open, reopening those the peer closes."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        count: int,
        source: str = "127.0.0.2",
        tls: bool = False,
        reopen: bool = True,
        duration: float = 30.0,
        max_opens: int = 20_000,
        max_rate: float = 300.0,
    ) -> None:
        self.host = host
        self.port = port
        self.count = count
        self.source = source
        self.tls = tls
        self.reopen = reopen
        self.duration = duration
        self.max_opens = max_opens
        self.max_rate = max_rate
        self.opens = 0
        self.closed_by_peer = 0
        self.connect_errors = 0
        self._socks: dict[int, socket.socket] = {}
        self._poll = select.poll()
        self._ctx = attacker_ssl_context() if tls else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-attack", daemon=True)

    @property
    def open_now(self) -> int:
        """Connections currently held open."""
        return len(self._socks)

    def _open_one(self) -> None:
        self.opens += 1
        try:
            sock = _connect(self.host, self.port, self.source, 1.0)
        except OSError:
            self.connect_errors += 1
            return
        if self._ctx is not None:
            sock.settimeout(2.0)
            try:
                TlsClient(sock, self._ctx).handshake()
            except OSError:
                sock.close()
                self.closed_by_peer += 1
                return
        sock.setblocking(False)
        self._socks[sock.fileno()] = sock
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)

    def _reap(self, timeout: float) -> None:
        for fd, _mask in self._poll.poll(timeout * 1000):
            sock = self._socks.get(fd)
            if sock is None:
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                continue  # the relay talked (TLS records: tickets, CHALLENGE): stay idle
            self._poll.unregister(fd)
            del self._socks[fd]
            sock.close()
            self.closed_by_peer += 1

    def _run(self) -> None:
        end = time.monotonic() + self.duration
        started = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                while (
                    len(self._socks) < self.count
                    and self.opens < self.max_opens
                    and not self._stop.is_set()
                    and (self.reopen or self.opens < self.count)
                ):
                    # rate bound: at most max_rate opens per second on average
                    ahead = self.opens / self.max_rate - (time.monotonic() - started)
                    if ahead > 0:
                        break
                    self._open_one()
                self._reap(0.02)
        finally:
            for sock in self._socks.values():
                with contextlib.suppress(OSError):
                    sock.close()
            self._socks.clear()

    def start(self) -> Self:
        """Start the attack thread."""
        self._thread.start()
        return self

    def wait_open(self, at_least: int, timeout: float = 10.0) -> None:
        """Wait until ``at_least`` connections have been opened (not necessarily kept)."""
        wait_until(
            lambda: self.opens >= at_least,
            timeout=timeout,
            what=f"{at_least} attacker connections",
            details=self.describe,
        )

    def stop(self) -> None:
        """Stop and close every connection."""
        self._stop.set()
        self._thread.join(timeout=10)

    def describe(self) -> str:
        """One line with the figures."""
        kind = "TLS" if self.tls else "TCP"
        return (
            f"{kind} idle attacker from {self.source}: {self.opens} opened, {self.open_now} open, "
            f"{self.closed_by_peer} closed by the relay, {self.connect_errors} connect errors"
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Visitors:
    """``count`` visitor connections from ``source`` to a public port that never read.

    With ``upload`` > 0 a thread keeps sending (without blocking) until each connection has sent
    ``upload`` bytes or ``close()``. ``close(abort=True)`` resets the connections (RST).
    """

    def __init__(
        self,
        port: int,
        count: int,
        *,
        source: str = "127.0.0.2",
        upload: int = 0,
        host: str = "127.0.0.1",
        rcvbuf: int | None = 4096,
        connect_timeout: float = 2.0,
    ) -> None:
        self.upload = upload
        self.socks: list[socket.socket] = []
        self.sent = 0
        self.connect_errors = 0
        self.send_errors = 0
        self._stop = threading.Event()
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            try:
                sock.settimeout(connect_timeout)
                sock.bind((source, 0))
                sock.connect((host, port))
            except OSError:
                sock.close()
                self.connect_errors += 1
                continue
            sock.setblocking(False)
            self.socks.append(sock)
        self._thread = threading.Thread(target=self._pump, name="visitors", daemon=True)
        if upload > 0:
            self._thread.start()

    def _pump(self) -> None:
        chunk = b"\x00" * 65536
        left = {sock.fileno(): self.upload for sock in self.socks}
        socks = list(self.socks)
        while socks and not self._stop.is_set():
            progress = False
            for sock in list(socks):
                try:
                    n = sock.send(chunk[: min(left[sock.fileno()], len(chunk))])
                except BlockingIOError:
                    continue
                except OSError:
                    self.send_errors += 1
                    socks.remove(sock)
                    continue
                progress = True
                self.sent += n
                left[sock.fileno()] -= n
                if left[sock.fileno()] <= 0:
                    socks.remove(sock)
            if not progress:
                self._stop.wait(0.02)

    def close(self, *, abort: bool = False) -> None:
        """Stop uploading and close every connection (``abort``: with a TCP reset)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for sock in self.socks:
            with contextlib.suppress(OSError):
                if abort:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        self.socks.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SinkServer:
    """A local service on 127.0.0.1 that accepts and never reads (``flood``: also writes)."""

    flood: bool = False
    rcvbuf: int = 4096
    port: int = 0
    connections: int = 0
    sent: int = 0
    _listener: socket.socket = field(init=False)
    _conns: list[socket.socket] = field(init=False, default_factory=list)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1024)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chunk = b"\xff" * 65536
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                conn = None
            except OSError:
                return
            if conn is not None:
                conn.setblocking(False)
                self._conns.append(conn)
                self.connections += 1
            if self.flood:
                for c in self._conns:
                    with contextlib.suppress(OSError):
                        while True:
                            self.sent += c.send(chunk)

    def close(self) -> None:
        """Stop and close every connection."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()
        self._conns.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
