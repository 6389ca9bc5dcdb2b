"""Soak run: random connection churn through several tunnels of one client, every byte checked.

Run (as root, for the network-namespace mode): ``python benchmarks/soak.py [--seconds 600]
[--tunnels 3] [--concurrency 12] [--flap-every 20] [--flap-seconds 8] [--keepalive-timeout 5]
[--resume-window SECONDS] [--seed N] [--loopback] [--json FILE]``

A relay, a client exposing ``--tunnels`` ports (several SPECs of one client), a local service and
the visitors run as separate processes: in network namespaces (relay, client, service and
visitors each on their own host, ``tests/faults/netlab.py``) unless ``--loopback`` puts them all
on 127.0.0.1 (no link flaps then). For ``--seconds`` the visitors open connections at random
(bounded concurrency, bounded count): random sizes in each direction (mostly small, sometimes
MiBs), random half-close order, and some connections aborted on purpose by either end. Every
``--flap-every`` seconds a link is cut, in turn the client's (tunnel and local service), the
relay's (tunnel and every visitor) and a visitor host's: alternately for half the keepalive
timeout (sessions survive) and for ``--flap-seconds`` (longer than ``--keepalive-timeout``: both
ends declare the session dead and the client reconnects).

Every byte is checked: both directions carry a deterministic pattern chosen by the connection's
ID, and each receiver compares what arrives with what must arrive, position by position, and
hashes it (the service sends the SHA-256 of what it received back when the visitor half-closed
first). Connections are counted by how they ended:

* ``completed``: every byte arrived intact at both ends, and the close was clean;
* ``cut``: the connection ended early with a clean error (reset, or EOF before the announced
  length) - expected while a flap kills the session, and a failure in a run without flaps;
* ``aborted``: one end aborted it on purpose (the other end saw a clean early end);
* ``refused``: the visitor's connect failed (the tunnel was down);
* ``corrupt``: wrong, extra or reordered bytes, or a bad digest - always a failure;
* ``hang``: no end within the stream deadline - always a failure.

Visitors and the service use TCP keepalive (5 s idle, 3 probes 2 s apart), as careful TCP
applications do: an RST sent while a link is cut is lost and never repeated, so an end that only
waits to receive learns that its peer aborted the connection only from a keepalive probe.

At the start (tunnels bound and idle, after a few seconds of warm-up load) and at the end (after a settle period) the script
reads the relay's and the client's open file descriptors, trio tasks and resident memory from
their admin endpoint (``muxtunnel status --json``, key ``process``) and prints a before/after
table; it exits 1 if a failure was counted or a figure did not come back within the tolerances
(:data:`FD_SLACK`, :data:`TASK_SLACK`, :data:`RSS_SLACK_BYTES` / :data:`RSS_SLACK_RATIO`).

The worker modes (``--worker service`` / ``--worker visitors``) are how the script runs its own
processes; they are not meant to be called by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KiB: Final = 1024
MiB: Final = 1024 * KiB

# --------------------------------------------------------------------------------------------
# the byte pattern and the wire header of a soak connection

#: Length of the repeating pattern: a prime, so a shifted (reordered) run of bytes never matches.
PATTERN_LEN: Final = 1_048_573
#: Largest piece sent or compared at once.
CHUNK: Final = 64 * KiB
_PATTERN: Final = random.Random(0x50A4).randbytes(PATTERN_LEN)
_DOUBLE: Final = memoryview(_PATTERN + _PATTERN[:CHUNK])

MAGIC: Final = b"SOAK"
#: magic, mode, connection ID, bytes visitor -> service, bytes service -> visitor.
HEADER: Final = struct.Struct("!4sB3xQQQ")
DIGEST_LEN: Final = 32

#: The visitor half-closes first; the service answers its EOF with the digest, then closes.
MODE_VISITOR_FIRST: Final = 0
#: The service sends everything and half-closes at once, then reads until the visitor's EOF.
MODE_SERVICE_FIRST: Final = 1
#: The visitor sends part of its bytes and aborts (RST).
MODE_VISITOR_ABORT: Final = 2
#: The service sends part of its bytes and aborts (RST).
MODE_SERVICE_ABORT: Final = 3
MODES: Final = (MODE_VISITOR_FIRST, MODE_SERVICE_FIRST, MODE_VISITOR_ABORT, MODE_SERVICE_ABORT)

#: How a connection ended (see the module docstring).
OUTCOMES: Final = ("completed", "cut", "aborted", "refused", "corrupt", "hang")

#: How long the service lets open connections finish when it is told to stop.
DRAIN_SECONDS: Final = 5.0
#: Cut connections described in each report.
MAX_DETAILS: Final = 20

#: Tolerances of the end-of-run check against the start-of-run figures: descriptors and tasks
#: must come back exactly (the check polls for up to ``--settle-seconds``); resident memory may
#: stay up by the larger of RSS_SLACK_BYTES and RSS_SLACK_RATIO of its start, because glibc keeps
#: freed heap pages (after a 10-minute run about 17 MiB, which ``malloc_trim(0)`` returns).
FD_SLACK: Final = 0
TASK_SLACK: Final = 0
RSS_SLACK_BYTES: Final = 24 * MiB
RSS_SLACK_RATIO: Final = 0.25


def offsets(conn_id: int) -> tuple[int, int]:
    """Pattern offsets of the two directions (visitor -> service, service -> visitor)."""
    up = (conn_id * 2_654_435_761 + 17) % PATTERN_LEN
    down = (conn_id * 40_503 + 7_919 * (conn_id >> 20) + 524_287) % PATTERN_LEN
    return up, down


def pattern(offset: int, pos: int, n: int) -> memoryview:
    """``n <= CHUNK`` pattern bytes of the stream starting at ``offset``, from position ``pos``."""
    start = (offset + pos) % PATTERN_LEN
    return _DOUBLE[start : start + n]


class Checker:
    """Compares received bytes with the expected stream, position by position, and hashes them."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.pos = 0
        self.wrong = False
        self.sha = hashlib.sha256()

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Check ``data`` (the next bytes); False (and ``wrong`` set) on any mismatch or excess."""
        view = memoryview(data)
        self.sha.update(view)
        if self.pos + len(view) > self.length:
            self.wrong = True
        at = 0
        while not self.wrong and at < len(view):
            n = min(CHUNK, len(view) - at)
            if view[at : at + n] != pattern(self.offset, self.pos, n):
                self.wrong = True
            self.pos += n
            at += n
        return not self.wrong

    @property
    def complete(self) -> bool:
        """Every announced byte arrived (and nothing wrong)."""
        return not self.wrong and self.pos == self.length


def expected_digest(offset: int, length: int) -> bytes:
    """SHA-256 of the first ``length`` bytes of the stream starting at ``offset``."""
    sha = hashlib.sha256()
    pos = 0
    while pos < length:
        n = min(CHUNK, length - pos)
        sha.update(pattern(offset, pos, n))
        pos += n
    return sha.digest()


async def send_pattern(stream: trio.SocketStream, offset: int, length: int) -> None:
    """Send ``length`` pattern bytes in random-sized pieces."""
    pos = 0
    rng = random.Random(offset ^ length)
    while pos < length:
        n = min(length - pos, rng.choice((512, 4 * KiB, 16 * KiB, CHUNK)))
        await stream.send_all(pattern(offset, pos, n))
        pos += n


def keepalive(stream: trio.SocketStream) -> None:
    """TCP keepalive after 5 s idle (3 probes 2 s apart), as a careful TCP application has.

    An RST sent while a link is cut is lost and never repeated: an end that only waits to
    receive learns that its peer aborted the connection only by sending, so a keepalive
    probe is what tells it (the peer's kernel answers with RST)."""
    sock = stream.socket
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def abort(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --------------------------------------------------------------------------------------------
# the local service


@dataclass
class ServiceReport:
    """What the service saw, per connection ID: ``completed``, ``cut``, ``aborted``, ``corrupt``."""

    verdicts: dict[int, str] = field(default_factory=dict)
    bytes_checked: int = 0
    bad_headers: int = 0
    open: int = 0
    #: A line for each of the first :data:`MAX_DETAILS` connections that were cut.
    details: list[str] = field(default_factory=list)
    #: Set when the last open connection ends (while the service drains).
    drained: trio.Event | None = None


async def _read_exact(stream: trio.SocketStream, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


async def serve_connection(stream: trio.SocketStream, report: ServiceReport) -> None:
    """One soak connection on the service side."""
    report.open += 1
    keepalive(stream)
    conn_id = -1
    verdict = "cut"
    try:
        try:
            head = await _read_exact(stream, HEADER.size)
        except (trio.BrokenResourceError, OSError):
            head = None
        if head is None:
            return
        magic, mode, conn_id, up_len, down_len = HEADER.unpack(head)
        if magic != MAGIC or mode not in MODES:
            report.bad_headers += 1
            verdict = "corrupt"
            return
        up_off, down_off = offsets(conn_id)
        checker = Checker(up_off, up_len)
        state = {"eof": False, "error": False}

        async def receive_all() -> None:
            try:
                while True:
                    data = await stream.receive_some(CHUNK)
                    if not data:
                        state["eof"] = True
                        return
                    report.bytes_checked += len(data)
                    if not checker.feed(data):
                        return
            except (trio.BrokenResourceError, OSError):
                state["error"] = True

        async def send_all() -> None:
            try:
                await send_pattern(stream, down_off, down_len)
                if mode == MODE_SERVICE_FIRST:
                    await stream.send_eof()
            except (trio.BrokenResourceError, OSError):
                state["error"] = True

        if mode == MODE_SERVICE_ABORT:
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await send_pattern(stream, down_off, down_len // 2)
            abort(stream)
            verdict = "aborted"
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_all)
            nursery.start_soon(send_all)
        if checker.wrong:
            verdict = "corrupt"
        elif mode == MODE_VISITOR_ABORT:
            verdict = "aborted"
        elif state["error"] or not state["eof"] or not checker.complete:
            verdict = "cut"
            if len(report.details) < MAX_DETAILS:
                report.details.append(
                    f"service cut {conn_id:#x} mode {mode} up {up_len} down {down_len}: "
                    f"received {checker.pos}, eof {state['eof']}, error {state['error']}"
                )
        else:
            verdict = "completed"
            if mode == MODE_VISITOR_FIRST:
                try:
                    await stream.send_all(checker.sha.digest())
                except (trio.BrokenResourceError, OSError):
                    verdict = "cut"
    finally:
        report.open -= 1
        if not report.open and report.drained is not None:
            report.drained.set()
        if conn_id >= 0:
            report.verdicts[conn_id] = verdict
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def run_service(host: str, ports: Sequence[int], report_path: Path) -> None:
    """Serve soak connections on ``host:port`` for each port until SIGTERM; then write the report.

    On SIGTERM the service stops accepting and gives the open connections up to
    :data:`DRAIN_SECONDS` to finish (what is already in their sockets), then cuts them."""
    report = ServiceReport()
    listeners: list[trio.SocketListener] = []
    for port in ports:
        listeners += await trio.open_tcp_listeners(port, host=host)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def handler(stream: trio.SocketStream) -> None:
                await serve_connection(stream, report)

            accepting = trio.CancelScope()

            async def accept() -> None:
                with accepting:
                    await trio.serve_listeners(handler, listeners, handler_nursery=nursery)

            nursery.start_soon(accept)
            print("service ready", flush=True)
            async for _ in signals:
                accepting.cancel()
                with trio.move_on_after(DRAIN_SECONDS):
                    if report.open:
                        report.drained = trio.Event()
                        await report.drained.wait()
                nursery.cancel_scope.cancel()
                break
    _write_json(
        report_path,
        {
            "verdicts": {str(k): v for k, v in report.verdicts.items()},
            "bytes_checked": report.bytes_checked,
            "bad_headers": report.bad_headers,
            "open": report.open,
            "details": report.details,
        },
    )


# --------------------------------------------------------------------------------------------
# the visitors


def random_size(rng: random.Random) -> int:
    """Mostly small, sometimes up to a few MiB."""
    r = rng.random()
    if r < 0.25:
        return 0
    if r < 0.65:
        return rng.randint(1, 4 * KiB)
    if r < 0.95:
        return rng.randint(4 * KiB, 256 * KiB)
    return rng.randint(256 * KiB, 3 * MiB)


@dataclass
class VisitorReport:
    """Per connection ID: (mode, outcome), plus the bytes checked on the visitor side."""

    outcomes: dict[int, tuple[int, str]] = field(default_factory=dict)
    bytes_checked: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: A line for each of the first :data:`MAX_DETAILS` connections that were cut.
    details: list[str] = field(default_factory=list)


async def visit_once(
    host: str,
    port: int,
    conn_id: int,
    mode: int,
    up_len: int,
    down_len: int,
    *,
    deadline: float,
    report: VisitorReport,
) -> str:
    """One soak connection on the visitor side; returns its outcome."""
    up_off, down_off = offsets(conn_id)
    expected = down_len // 2 if mode == MODE_SERVICE_ABORT else down_len
    tail = DIGEST_LEN if mode == MODE_VISITOR_FIRST else 0
    checker = Checker(down_off, expected)
    trailer = bytearray()
    errors: list[str] = []
    eof = False

    async def receive_all(stream: trio.SocketStream) -> None:
        nonlocal eof
        try:
            while True:
                data = await stream.receive_some(CHUNK)
                if not data:
                    eof = True
                    return
                report.bytes_checked += len(data)
                view = memoryview(data)
                room = expected - checker.pos
                if room > 0:
                    checker.feed(view[:room])
                    view = view[room:]
                if len(view):
                    trailer.extend(view)
                    if len(trailer) > tail:
                        checker.wrong = True
                if checker.wrong:
                    return
        except (trio.BrokenResourceError, OSError) as exc:
            errors.append(type(exc).__name__)

    async def send_all(stream: trio.SocketStream, cancel: trio.CancelScope) -> None:
        try:
            if mode == MODE_VISITOR_ABORT:
                await send_pattern(stream, up_off, up_len // 2)
                abort(stream)
                cancel.cancel()
            else:
                await send_pattern(stream, up_off, up_len)
                await stream.send_eof()
        except (trio.BrokenResourceError, OSError) as exc:
            errors.append(type(exc).__name__)

    with trio.move_on_after(deadline) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            _count(report.errors, f"connect:{type(exc).__name__}")
            return "refused"
        keepalive(stream)
        try:
            await stream.send_all(HEADER.pack(MAGIC, mode, conn_id, up_len, down_len))
        except (trio.BrokenResourceError, OSError) as exc:
            errors.append(type(exc).__name__)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_all, stream)
                nursery.start_soon(send_all, stream, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
    for name in errors:
        _count(report.errors, f"stream:{name}")
    if checker.wrong:
        return "corrupt"
    if scope.cancelled_caught:
        return "hang"
    if mode == MODE_VISITOR_ABORT:
        return "aborted"
    if mode == MODE_SERVICE_ABORT:
        return "aborted" if not trailer else "corrupt"
    if errors or not eof or not checker.complete or len(trailer) < tail:
        if len(report.details) < MAX_DETAILS:
            report.details.append(
                f"cut {conn_id:#x} mode {mode} up {up_len} down {down_len}: received "
                f"{checker.pos}+{len(trailer)}, eof {eof}, errors {errors}"
            )
        return "cut"
    if tail and bytes(trailer) != expected_digest(up_off, up_len):
        return "corrupt"
    return "completed"


def _count(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


async def run_visitors(
    host: str,
    ports: Sequence[int],
    *,
    seconds: float,
    concurrency: int,
    seed: int,
    worker: int,
    deadline: float,
    max_connections: int,
    report_path: Path,
) -> None:
    """Churn connections over ``ports`` for ``seconds`` (at most ``max_connections``)."""
    report = VisitorReport()
    stop_at = trio.current_time() + seconds
    counter = iter(range(max_connections))

    async def churner(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + worker * 1009 + index)
        while trio.current_time() < stop_at:
            n = next(counter, None)
            if n is None:
                return
            conn_id = (worker << 40) | (seed & 0xFFFF) << 24 | n
            mode = rng.choices(MODES, weights=(45, 45, 5, 5))[0]
            outcome = await visit_once(
                host,
                rng.choice(list(ports)),
                conn_id,
                mode,
                random_size(rng),
                random_size(rng),
                deadline=deadline,
                report=report,
            )
            report.outcomes[conn_id] = (mode, outcome)
            await trio.sleep(rng.random() * 0.05)

    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(churner, index)
    _write_json(
        report_path,
        {
            "outcomes": {str(k): list(v) for k, v in report.outcomes.items()},
            "bytes_checked": report.bytes_checked,
            "errors": report.errors,
            "details": report.details,
        },
    )


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def merge(visitors: Sequence[dict[str, Any]], service: dict[str, Any]) -> dict[str, Any]:
    """Combine both ends' verdicts: a connection is completed only if both ends say so."""
    counts = dict.fromkeys(OUTCOMES, 0)
    verdicts: dict[str, str] = service.get("verdicts", {})
    mismatched: list[str] = []
    details: list[str] = [line for r in visitors for line in r.get("details", [])]
    details += service.get("details", [])
    for report in visitors:
        for key, (mode, outcome) in report["outcomes"].items():
            theirs = verdicts.get(key)
            final = outcome
            if theirs == "corrupt" or outcome == "corrupt":
                final = "corrupt"
            elif outcome == "completed" and theirs != "completed":
                details.append(f"{key}: mode {mode}, the visitor completed, the service: {theirs}")
                # The visitor got everything, but its own bytes did not all reach the service.
                final = "cut" if theirs == "cut" or theirs is None else "corrupt"
                if theirs is None and mode != MODE_SERVICE_FIRST:
                    mismatched.append(key)
            counts[final] += 1
    return {
        "streams": counts,
        "bytes_checked": sum(r["bytes_checked"] for r in visitors)
        + service.get("bytes_checked", 0),
        "service_bad_headers": service.get("bad_headers", 0),
        "errors": _sum_dicts(r.get("errors", {}) for r in visitors),
        "unexplained": mismatched[:10],
        "details": details[:40],
    }


def _sum_dicts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


# --------------------------------------------------------------------------------------------
# the orchestrator


@dataclass
class SoakConfig:
    """One soak run's parameters (the command-line options)."""

    seconds: float = 600.0
    tunnels: int = 3
    concurrency: int = 12
    visitor_hosts: int = 2
    flap_every: float = 20.0
    flap_seconds: float = 8.0
    keepalive_timeout: float = 5.0
    #: ``--resume-window`` of relay and client (protocol-spec.md §10.6); None: their default.
    resume_window: float | None = None
    warmup_seconds: float = 4.0
    settle_seconds: float = 45.0
    max_connections: int = 200_000
    seed: int = 1
    loopback: bool = False
    workdir: Path | None = None

    @property
    def stream_deadline(self) -> float:
        """How long one connection may take before it counts as a hang."""
        return max(60.0, 3 * (self.flap_seconds + self.keepalive_timeout))


@dataclass
class Endpoint:
    """A relay or client process and where its admin endpoint is."""

    name: str
    pid: int
    admin: Path


def process_figures(endpoint: Endpoint) -> dict[str, int]:
    """Open fds, trio tasks and RSS of a relay or client, from its admin endpoint.

    A muxtunnel without the ``process`` key in its status gets fds and RSS from ``/proc`` and
    ``tasks`` -1 (not compared)."""
    from muxtunnel.admin import AdminAddress, query_status

    snapshot = trio.run(query_status, AdminAddress(path=endpoint.admin))
    figures = snapshot.get("process") or {
        "fds": len(os.listdir(f"/proc/{endpoint.pid}/fd")),
        "tasks": -1,
        "rss": _proc_rss(endpoint.pid),
    }
    return {
        "fds": int(figures["fds"]),
        "tasks": int(figures["tasks"]),
        "rss": int(figures["rss"]),
        "sessions": int(snapshot["totals"]["sessions"]),
        "tunnels": int(snapshot["totals"]["tunnels"]),
        "streams_open": int(snapshot["totals"]["streams_open"]),
    }


def _proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def within(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """What is not back at its starting level (empty if everything is)."""
    problems = []
    if after["fds"] > before["fds"] + FD_SLACK:
        problems.append(f"fds {before['fds']} -> {after['fds']} (slack {FD_SLACK})")
    if after["tasks"] > before["tasks"] + TASK_SLACK:
        problems.append(f"tasks {before['tasks']} -> {after['tasks']} (slack {TASK_SLACK})")
    limit = before["rss"] + max(RSS_SLACK_BYTES, int(RSS_SLACK_RATIO * before["rss"]))
    if after["rss"] > limit:
        problems.append(f"rss {before['rss'] / MiB:.1f} -> {after['rss'] / MiB:.1f} MiB")
    if after["streams_open"] != 0:
        problems.append(f"{after['streams_open']} streams still open")
    return problems


def _worker_argv(mode: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", mode, *args]


def _session_args(cfg: SoakConfig) -> list[str]:
    """The options relay and client both get: keepalive timeout, and the resume window if set."""
    args = ["--keepalive-timeout", f"{cfg.keepalive_timeout:g}"]
    if cfg.resume_window is not None:
        args += ["--resume-window", f"{cfg.resume_window:g}"]
    return args


def run_soak(cfg: SoakConfig, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Run one soak and return its results (see :func:`report_lines`)."""
    import tempfile

    owned = cfg.workdir is None
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="muxtunnel-soak-"))
    try:
        if cfg.loopback:
            return _run_loopback(cfg, workdir, log)
        return _run_netns(cfg, workdir, log)
    finally:
        if owned:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def _service_ports(n: int) -> list[int]:
    from tests.system.harness import random_port_range

    lo, _ = random_port_range(n, lo=24000, hi=30000)
    return list(range(lo, lo + n))


def _run_loopback(cfg: SoakConfig, workdir: Path, log: Callable[[str], object]) -> dict[str, Any]:
    import secrets

    from tests.system.harness import ProcessGroup, start_client, start_relay

    group = ProcessGroup()
    try:
        ports = _service_ports(cfg.tunnels)
        service = group.start(
            "service",
            _worker_argv(
                "service",
                [
                    "--host",
                    "127.0.0.1",
                    "--ports",
                    _csv(ports),
                    "--report",
                    str(workdir / "service.json"),
                ],
            ),
        )
        service.wait_for_line(_READY, what="'service ready'")
        keepalive = _session_args(cfg)
        relay = start_relay(
            group,
            workdir,
            token=secrets.token_urlsafe(24),
            extra_args=keepalive,
            port_range=None,
        )
        client = start_client(
            group, workdir, relay, [f"127.0.0.1:{p}" for p in ports], extra_args=keepalive
        )
        public = [f.port for f in client.forwards]
        endpoints = [
            Endpoint("relay", relay.proc.pid, relay.state_dir / "admin" / "relay.sock"),
            Endpoint(
                "client",
                client.proc.pid,
                client.state_dir / "admin" / f"client-{client.proc.pid}.sock",
            ),
        ]

        def start_visitors(name: str, seconds: float, index: int) -> Any:
            return group.start(
                name,
                _worker_argv(
                    "visitors",
                    _visitor_args(
                        cfg, "127.0.0.1", public, seconds, index, workdir / f"{name}.json"
                    ),
                ),
            )

        return _drive(
            cfg,
            workdir,
            log,
            endpoints,
            start_visitors,
            flap=None,
            service=service,
            describe=group.describe,
        )
    finally:
        group.close()


def _run_netns(cfg: SoakConfig, workdir: Path, log: Callable[[str], object]) -> dict[str, Any]:
    import secrets

    from tests.faults.netlab import Lab

    with Lab(workdir, max_seconds=cfg.seconds + 600) as lab:
        relay_host = lab.host("relay")
        client_host = lab.host("client")
        service_host = lab.host("service")
        visitor_hosts = [lab.host(f"visitor{i}") for i in range(max(1, cfg.visitor_hosts))]
        ports = list(range(9001, 9001 + cfg.tunnels))
        service = service_host.start(
            "service",
            _worker_argv(
                "service",
                [
                    "--host",
                    service_host.addr,
                    "--ports",
                    _csv(ports),
                    "--report",
                    str(workdir / "service.json"),
                ],
            ),
        )
        service.wait_for_line(_READY, what="'service ready'")
        keepalive = _session_args(cfg)
        relay = lab.start_relay(
            relay_host,
            token=secrets.token_urlsafe(24),
            port_range=(20000, 20000 + cfg.tunnels + 7),
            extra_args=keepalive,
        )
        client = lab.start_client(
            client_host, relay, [f"{service_host.addr}:{p}" for p in ports], extra_args=keepalive
        )
        public = [f.port for f in client.forwards]
        endpoints = [
            Endpoint("relay", relay.proc.pid, relay.state_dir / "admin" / "relay.sock"),
            Endpoint(
                "client",
                client.proc.pid,
                workdir / "client-state" / "admin" / f"client-{client.proc.pid}.sock",
            ),
        ]

        def start_visitors(name: str, seconds: float, index: int) -> Any:
            host = visitor_hosts[index % len(visitor_hosts)]
            return host.start(
                name,
                _worker_argv(
                    "visitors",
                    _visitor_args(
                        cfg, relay_host.addr, public, seconds, index, workdir / f"{name}.json"
                    ),
                ),
            )

        return _drive(
            cfg,
            workdir,
            log,
            endpoints,
            start_visitors,
            flap=[
                ("client", client_host.link),
                ("relay", relay_host.link),
                ("visitor0", visitor_hosts[0].link),
            ],
            service=service,
            describe=lab.describe,
        )


_READY: Final = re.compile(r"^service ready")


def _csv(ports: Sequence[int]) -> str:
    return ",".join(str(p) for p in ports)


def _visitor_args(
    cfg: SoakConfig, host: str, ports: Sequence[int], seconds: float, index: int, report: Path
) -> list[str]:
    return [
        "--host",
        host,
        "--ports",
        _csv(ports),
        "--seconds",
        f"{seconds:g}",
        "--concurrency",
        str(max(1, cfg.concurrency // max(1, cfg.visitor_hosts))),
        "--seed",
        str(cfg.seed),
        "--index",
        str(index),
        "--deadline",
        f"{cfg.stream_deadline:g}",
        "--max-connections",
        str(cfg.max_connections),
        "--report",
        str(report),
    ]


def _wait_settled(
    endpoints: Sequence[Endpoint],
    before: dict[str, dict[str, int]],
    *,
    tunnels: int,
    timeout: float,
) -> tuple[dict[str, dict[str, int]], float]:
    """Poll until every figure is back within tolerance (or ``timeout``); last figures + time."""
    start = time.monotonic()
    while True:
        after = {}
        ok = True
        for ep in endpoints:
            try:
                after[ep.name] = process_figures(ep)
            except Exception:
                ok = False
                continue
            ok = ok and not within(before[ep.name], after[ep.name])
            ok = ok and after[ep.name]["tunnels"] == tunnels
        elapsed = time.monotonic() - start
        if (ok and len(after) == len(endpoints)) or elapsed >= timeout:
            return after, elapsed
        time.sleep(1.0)


def _drive(
    cfg: SoakConfig,
    workdir: Path,
    log: Callable[[str], object],
    endpoints: Sequence[Endpoint],
    start_visitors: Callable[[str, float, int], Any],
    *,
    flap: Sequence[tuple[str, Any]] | None,
    service: Any,
    describe: Callable[[], str],
) -> dict[str, Any]:
    run_start = time.monotonic()
    # Warm-up: the first streams import modules and fill allocator pools; the starting level
    # is measured after it, with the tunnels idle.
    warm = start_visitors("warmup", cfg.warmup_seconds, 99)
    warm.wait_exit(cfg.warmup_seconds + cfg.stream_deadline + 30)
    time.sleep(2.0)
    before = {ep.name: process_figures(ep) for ep in endpoints}
    log(f"start level: {json.dumps(before)}")
    workers = [
        start_visitors(f"visitors{i}", cfg.seconds, i) for i in range(max(1, cfg.visitor_hosts))
    ]
    flaps: list[dict[str, Any]] = []
    load_start = time.monotonic()
    stop = load_start + cfg.seconds
    if flap and cfg.flap_every > 0:
        n = 0
        while n < 10_000:
            at = load_start + cfg.flap_every * (n + 1)
            # Alternate: a short flap (sessions survive) and a long one (keepalive kills them).
            # The links take turns: the client's (the tunnel and the local service), the
            # relay's (the tunnel and every visitor), a visitor host's.
            length = cfg.keepalive_timeout / 2 if n % 2 == 0 else cfg.flap_seconds
            name, link = flap[n % len(flap)]
            if at + length > stop:
                break
            time.sleep(max(0.0, at - time.monotonic()))
            t0 = link.cut()
            try:
                time.sleep(length)
            finally:
                t1 = link.restore()
            flaps.append(
                {"link": name, "at": round(t0 - load_start, 1), "seconds": round(t1 - t0, 1)}
            )
            log(f"flap {n + 1}: {name} link down {t1 - t0:.1f} s at t={t0 - load_start:.0f} s")
            n += 1
    for worker in workers:
        worker.wait_exit(max(1.0, stop - time.monotonic()) + cfg.stream_deadline + 60)
    load_seconds = time.monotonic() - load_start
    after, settle = _wait_settled(
        endpoints, before, tunnels=cfg.tunnels, timeout=cfg.settle_seconds
    )
    service.terminate()
    service_report = json.loads((workdir / "service.json").read_text())
    visitor_reports = [
        json.loads((workdir / f"visitors{i}.json").read_text()) for i in range(len(workers))
    ]
    merged = merge(visitor_reports, service_report)
    problems = {ep.name: within(before[ep.name], after[ep.name]) for ep in endpoints}
    return {
        "config": {
            "seconds": cfg.seconds,
            "tunnels": cfg.tunnels,
            "concurrency": cfg.concurrency,
            "visitor_hosts": cfg.visitor_hosts,
            "flap_every": cfg.flap_every,
            "flap_seconds": cfg.flap_seconds,
            "keepalive_timeout": cfg.keepalive_timeout,
            "resume_window": cfg.resume_window,
            "seed": cfg.seed,
            "loopback": cfg.loopback,
        },
        "load_seconds": round(load_seconds, 1),
        "settle_seconds": round(settle, 1),
        "total_seconds": round(time.monotonic() - run_start, 1),
        "flaps": flaps,
        "before": before,
        "after": after,
        "problems": problems,
        **merged,
        "processes": describe() if any(problems.values()) else "",
    }


def failures(result: dict[str, Any], *, cuts_allowed: bool) -> list[str]:
    """Why a soak result is a failure (empty when it passed)."""
    streams = result["streams"]
    out = [f"{streams[bad]} {bad} streams" for bad in ("corrupt", "hang") if streams[bad]]
    if not cuts_allowed and streams["cut"] + streams["refused"]:
        out.append(f"{streams['cut']} cut and {streams['refused']} refused streams without a flap")
    if result["service_bad_headers"]:
        out.append(
            f"{result['service_bad_headers']} connections reached the service with a bad header"
        )
    if not streams["completed"]:
        out.append("no stream completed")
    for name, problems in result["problems"].items():
        out.extend(f"{name}: {p}" for p in problems)
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable summary: streams by outcome, bytes checked, before/after table."""
    s = result["streams"]
    lines = [
        f"soak: {result['load_seconds']:.0f} s of load, {len(result['flaps'])} link flaps, "
        f"settled in {result['settle_seconds']:.0f} s",
        "streams: " + ", ".join(f"{k} {v}" for k, v in s.items()),
        f"bytes checked: {result['bytes_checked']} ({result['bytes_checked'] / MiB:.1f} MiB)",
    ]
    if result["errors"]:
        lines.append(
            "visitor errors: " + ", ".join(f"{k} {v}" for k, v in sorted(result["errors"].items()))
        )
    lines.extend(f"  {line}" for line in result.get("details", [])[:10])
    lines.append(f"{'process':<8} {'figure':<8} {'before':>10} {'after':>10}")
    for name, before in result["before"].items():
        after = result["after"].get(name, {})
        for key in ("fds", "tasks", "rss"):
            b, a = before[key], after.get(key)
            if key == "rss":
                lines.append(f"{name:<8} {'rss MiB':<8} {b / MiB:>10.1f} {(a or 0) / MiB:>10.1f}")
            else:
                lines.append(f"{name:<8} {key:<8} {b:>10} {a if a is not None else '-':>10}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: the soak run, or one of its worker processes."""

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=600.0, help="load duration (default 600)")
    p.add_argument("--tunnels", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=12, help="connections at once, all visitors")
    p.add_argument("--visitor-hosts", type=int, default=2)
    p.add_argument(
        "--flap-every", type=float, default=20.0, help="seconds between link cuts; 0: none"
    )
    p.add_argument("--flap-seconds", type=float, default=8.0, help="length of the long cuts")
    p.add_argument("--keepalive-timeout", type=float, default=5.0)
    p.add_argument(
        "--resume-window", type=float, default=None, help="relay and client; default: theirs"
    )
    p.add_argument("--settle-seconds", type=float, default=45.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loopback", action="store_true", help="all on 127.0.0.1, no flaps, no root")
    p.add_argument("--json", type=Path, help="also write the results here")
    # worker modes
    p.add_argument("--worker", choices=("service", "visitors"), help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--ports", help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--max-connections", type=int, default=200_000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "service":
        trio.run(run_service, args.host, [int(x) for x in args.ports.split(",")], args.report)
        return 0
    if args.worker == "visitors":
        trio.run(
            partial(
                run_visitors,
                args.host,
                [int(x) for x in args.ports.split(",")],
                seconds=args.seconds,
                concurrency=args.concurrency,
                seed=args.seed,
                worker=args.index,
                deadline=args.deadline,
                max_connections=args.max_connections,
                report_path=args.report,
            )
        )
        return 0
    cfg = SoakConfig(
        seconds=args.seconds,
        tunnels=args.tunnels,
        concurrency=args.concurrency,
        visitor_hosts=args.visitor_hosts,
        flap_every=0.0 if args.loopback else args.flap_every,
        flap_seconds=args.flap_seconds,
        keepalive_timeout=args.keepalive_timeout,
        resume_window=args.resume_window,
        settle_seconds=args.settle_seconds,
        seed=args.seed,
        loopback=args.loopback,
    )
    result = run_soak(cfg, log=partial(print, flush=True))
    for line in report_lines(result):
        print(line)
    if args.json:
        _write_json(args.json, result)
    bad = failures(result, cuts_allowed=bool(result["flaps"]))
    for line in bad:
        print(f"FAIL: {line}")
    if result["processes"]:
        print(result["processes"])
    print("soak passed" if not bad else "soak FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
