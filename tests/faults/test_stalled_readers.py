"""A visitor or a local service that stops reading slows no other stream of the same tunnel.

Real processes on loopback (``muxtunnel server`` and ``muxtunnel client``, tests/system/harness.py):
one tunnel, one local service. Bulk transfers in both directions are timed alone, then again
while several streams of the same tunnel are stalled: visitors that asked for an endless
download and never read (their data piles up on the relay), the same after reading 24 MiB first
(so their windows grew before they stopped), or a local service that never reads what its
visitors upload (their data piles up on the client). The other streams keep their speed
(generous ratio bound: the machine is shared and noisy), and the memory of the relay and the
client grows by no more than the stalled streams' windows allow (spec §8.3, §8.5-§8.7): each
stalled stream holds at most its receive window on the receiving side and
``SEND_HIGH_WATER`` on the sending side, and a window only grows while its stream is consumed.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel.admin import AdminAddress, query_status
from tests.system.harness import (
    HarnessError,
    ProcessGroup,
    echo_roundtrip,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

KiB = 1024
MiB = 1024 * KiB

#: Streams stalled at once (all on the tunnel whose other streams are timed).
STALLED = 6
#: Bytes of one timed bulk transfer, and transfers per measurement (the median counts).
BULK = 16 * MiB
RUNS = 3
#: With the stalls in place, the other streams keep at least this share of their speed alone.
MIN_SPEED_RATIO = 0.25
#: A timed transfer that takes longer than this is a starved stream.
TRANSFER_TIMEOUT = 60.0
#: Receive buffer of the stalled sockets (keeps what the kernel absorbs small).
SMALL_BUFFER = 8 * KiB
#: What a stalled upload tries to push (it stops earlier when nothing moves for 1.5 s).
PUSH_LIMIT = 96 * MiB
#: What a visitor of the "after reading" kind reads before it stalls (its windows grow).
READ_FIRST = 24 * MiB
#: Default windows (spec §8.6, §8.7): a stream's initial and largest receive window, and the
#: most a relay session holds unconsumed (receive budget 64 MiB + connection window 32 MiB).
INITIAL_STREAM_WINDOW = 256 * KiB
MAX_STREAM_WINDOW = 16 * MiB
RELAY_SESSION_HOLD = 96 * MiB
#: A stream blocked on the sending side holds at most this much (muxtunnel.connection).
SEND_HIGH_WATER = 512 * KiB
#: RSS allowance beyond the stalled streams' windows: allocator pools, read buffers, noise.
RSS_SLACK = 24 * MiB

_COMMAND = struct.Struct("!4sQ")
_CHUNK = bytes(range(256)) * 256  # 64 KiB


class BulkService:
    """The local service: ``SINK`` (count until EOF, answer the count), ``SRCE n`` (send n bytes,
    then close), ``STAL`` (never read, never write). Threads; :meth:`close` stops everything."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        #: Bytes sent so far by each ``SRCE`` connection.
        self.sent: list[int] = []
        self.stalled = 0
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(120.0)
        try:
            head = _recv_exact(conn, _COMMAND.size)
            verb, n = _COMMAND.unpack(head)
            if verb == b"SINK":
                total = 0
                while data := conn.recv(256 * KiB):
                    total += len(data)
                conn.sendall(struct.pack("!Q", total))
            elif verb == b"SRCE":
                with self._lock:
                    index = len(self.sent)
                    self.sent.append(0)
                view = memoryview(_CHUNK)
                while self.sent[index] < n and not self._stop.is_set():
                    piece = view[: min(len(view), n - self.sent[index])]
                    conn.sendall(piece)
                    self.sent[index] += len(piece)
            elif verb == b"STAL":
                with self._lock:
                    self.stalled += 1
                self._stop.wait(300)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        """Stop accepting, shut every connection down, join the threads (bounded)."""
        self._stop.set()
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def download(port: int, n: int) -> float:
    """Ask the service for ``n`` bytes through the tunnel; seconds until all arrived."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TRANSFER_TIMEOUT) as sock:
        sock.sendall(_COMMAND.pack(b"SRCE", n))
        got = 0
        while data := sock.recv(256 * KiB):
            got += len(data)
            if time.monotonic() - start > TRANSFER_TIMEOUT:
                break
    elapsed = time.monotonic() - start
    assert got == n, f"download got {got} of {n} bytes in {elapsed:.1f} s"
    return elapsed


def upload(port: int, n: int) -> float:
    """Send ``n`` bytes to the service through the tunnel; seconds until it confirmed them."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TRANSFER_TIMEOUT) as sock:
        sock.sendall(_COMMAND.pack(b"SINK", 0))
        view = memoryview(_CHUNK)
        sent = 0
        while sent < n:
            piece = view[: min(len(view), n - sent)]
            sock.sendall(piece)
            sent += len(piece)
        sock.shutdown(socket.SHUT_WR)
        (count,) = struct.unpack("!Q", _recv_exact(sock, 8))
    elapsed = time.monotonic() - start
    assert count == n, f"the service confirmed {count} of {n} bytes"
    return elapsed


def speeds(port: int) -> dict[str, float]:
    """Median MiB/s of :data:`RUNS` downloads and uploads of :data:`BULK` bytes."""
    down = sorted(BULK / MiB / download(port, BULK) for _ in range(RUNS))
    up = sorted(BULK / MiB / upload(port, BULK) for _ in range(RUNS))
    return {"down": down[RUNS // 2], "up": up[RUNS // 2]}


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (``VmRSS``)."""
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _small_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    return sock


def stall_downloads(
    port: int, service: BulkService, count: int, *, read_first: int = 0
) -> list[socket.socket]:
    """``count`` visitors that ask for an endless download, read ``read_first`` bytes of it
    (so its windows grow) and then never read again; returns once the service can push no
    more into any of them (every buffer on the way is full)."""
    socks = []
    first = len(service.sent)
    for _ in range(count):
        sock = _small_socket() if not read_first else socket.socket()
        sock.settimeout(TRANSFER_TIMEOUT)
        sock.connect(("127.0.0.1", port))
        sock.sendall(_COMMAND.pack(b"SRCE", 1 << 40))
        socks.append(sock)
        got = 0
        while got < read_first:
            data = sock.recv(1 << 20)
            assert data, f"a stalled download ended after {got} bytes"
            got += len(data)
    wait_until(lambda: len(service.sent) >= first + count, timeout=20, what="stalled downloads")
    _wait_still(lambda: sum(service.sent[first:]), what="the stalled downloads to fill up")
    return socks


def stall_uploads(port: int, service: BulkService, count: int) -> tuple[list[socket.socket], int]:
    """``count`` visitors that upload to a service that never reads; pushes until nothing moves.

    Returns the sockets and the bytes the tunnel accepted from them."""
    socks = []
    before = service.stalled
    for _ in range(count):
        sock = _small_socket()
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(_COMMAND.pack(b"STAL", 0))
        sock.setblocking(False)
        socks.append(sock)
    wait_until(lambda: service.stalled >= before + count, timeout=20, what="stalled uploads")
    pushed = [0] * count
    view = memoryview(_CHUNK)
    deadline = time.monotonic() + 60
    idle_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - idle_since < 1.5:
        moved = False
        for i, sock in enumerate(socks):
            if pushed[i] >= PUSH_LIMIT:
                continue
            try:
                pushed[i] += sock.send(view)
                moved = True
            except BlockingIOError:
                pass
        if moved:
            idle_since = time.monotonic()
        else:
            time.sleep(0.05)
    return socks, sum(pushed)


def _wait_still(read: Callable[[], int], *, what: str) -> None:
    """Wait (bounded) until ``read()`` stops changing for a second and a half."""
    deadline = time.monotonic() + 60
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.5:
            return
    raise HarnessError(f"timed out waiting for {what}")


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """The relay and client of one test; stopped (by PID) at teardown."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()


@pytest.mark.parametrize("who", ["visitor", "visitor-after-reading", "service"])
def test_stalled_readers_slow_no_other_stream_and_memory_stays_within_the_windows(
    who: str, tmp_path: Path, procs: ProcessGroup
) -> None:
    service = BulkService()
    socks: list[socket.socket] = []
    try:
        relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24))
        client = start_client(procs, tmp_path, relay, [str(service.port)])
        port = client.forwards[0].port
        download(port, 4 * MiB)  # warm both processes up (imports, allocator pools)
        upload(port, 4 * MiB)
        alone = speeds(port)
        rss_before = {"relay": rss(relay.proc.pid), "client": rss(client.proc.pid)}

        held = 0
        if who == "service":
            socks, held = stall_uploads(port, service, STALLED)
        else:
            read_first = READ_FIRST if who == "visitor-after-reading" else 0
            socks = stall_downloads(port, service, STALLED, read_first=read_first)
            held = sum(service.sent[-STALLED:]) - STALLED * read_first
        rss_stalled = {"relay": rss(relay.proc.pid), "client": rss(client.proc.pid)}
        stalled = speeds(port)

        # What the stalled streams may hold in each process (spec §8.3, §8.7): on the
        # receiving side at most the stream's window, which does not grow while nothing is
        # consumed; on the sending side SEND_HIGH_WATER. A stream that was read before it
        # stalled keeps the window it grew to (at most MAX_STREAM_WINDOW), and all of them
        # together at most the relay's receive budget plus its connection window.
        if who == "visitor-after-reading":
            allowance = min(STALLED * MAX_STREAM_WINDOW, RELAY_SESSION_HOLD) + RSS_SLACK
        else:
            allowance = STALLED * (INITIAL_STREAM_WINDOW + SEND_HIGH_WATER) + RSS_SLACK
        report = (
            f"{who} stalls: {STALLED} streams holding {held / MiB:.1f} MiB; "
            f"speed alone {alone}, with stalls {stalled} MiB/s; "
            f"RSS before {_mib(rss_before)}, stalled {_mib(rss_stalled)} MiB; "
            f"allowance {allowance / MiB:.1f} MiB\n{procs.describe()}"
        )
        print(report.split("\n", 1)[0])
        for direction in ("down", "up"):
            assert stalled[direction] >= MIN_SPEED_RATIO * alone[direction], report
        for name in ("relay", "client"):
            assert rss_stalled[name] - rss_before[name] <= allowance, report

        # The stalled streams were not reset to make room: a stalled download still delivers.
        if who != "service":
            for sock in socks:
                sock.settimeout(10)
                assert sock.recv(4096), report
        # They go away with their visitors (no stream stays open on either side), and the
        # tunnel still serves new visitors.
        _abort_all(socks)
        admins = [
            relay.state_dir / "admin" / "relay.sock",
            client.state_dir / "admin" / f"client-{client.proc.pid}.sock",
        ]
        wait_until(
            lambda: all(_streams_open(path) == 0 for path in admins),
            timeout=30,
            what="no stream open on the relay and the client",
            details=procs.describe,
        )
        answer = echo_roundtrip(port, _COMMAND.pack(b"SINK", 0) + b"x" * 1000)
        assert answer == struct.pack("!Q", 1000)
    finally:
        _abort_all(socks)
        service.close()


def _abort_all(socks: list[socket.socket]) -> None:
    """Close every socket with RST (idempotent)."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _streams_open(admin: Path) -> int:
    """Streams open now, from a relay's or client's admin endpoint (``muxtunnel status``)."""
    snapshot = trio.run(query_status, AdminAddress(path=admin))
    return int(snapshot["totals"]["streams_open"])


def _mib(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / MiB:.1f}" for k, v in values.items())
