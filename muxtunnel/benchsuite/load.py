"""Load generators, run as their own process (``python -m muxtunnel.benchsuite.load MODE ...``).

Blocking sockets and threads (the C socket calls release the GIL). Every mode prints JSON lines
on stdout: optional ``{"event": ...}`` progress lines, then one ``{"result": {...}}`` or
``{"error": "..."}`` line; the exit status is 0 only with a result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import socket
import statistics
import sys
import threading
import time
import zlib
from typing import Any

from muxtunnel.benchsuite import wire

Result = dict[str, Any]


class LoadError(Exception):
    """A visitor saw something wrong (short transfer, bad bytes, refused connection)."""


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise LoadError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _put(host: str, port: int, amount: int, timeout: float, verify: bool) -> tuple[float, float]:
    """Send *amount* bytes into the sink and wait for its ack; return (start, end)."""
    start = time.perf_counter()
    with _connect(host, port, timeout) as sock:
        sock.sendall(wire.HEADER.pack(wire.CMD_SINK, amount))
        for part in wire.chunks(amount):
            sock.sendall(part)
        got, crc = wire.SINK_REPLY.unpack(_recv_exact(sock, wire.SINK_REPLY.size))
        end = time.perf_counter()
    if got != amount:
        raise LoadError(f"sink received {got} bytes, {amount} were sent")
    if verify and crc != wire.expected_crc(amount):
        raise LoadError(f"sink CRC-32 {crc:#010x} does not match the bytes sent")
    return start, end


def _get(host: str, port: int, amount: int, timeout: float, verify: bool) -> tuple[float, float]:
    """Receive *amount* bytes from the source; return (start, end)."""
    buf = bytearray(wire.CHUNK)
    view = memoryview(buf)
    got = 0
    crc = 0
    start = time.perf_counter()
    with _connect(host, port, timeout) as sock:
        sock.sendall(wire.HEADER.pack(wire.CMD_SOURCE, amount))
        while True:
            n = sock.recv_into(view)
            if n == 0:
                break
            if verify:
                crc = zlib.crc32(view[:n], crc)
            got += n
            if got > amount:
                raise LoadError(f"source sent more than the {amount} bytes requested")
        end = time.perf_counter()
    if got != amount:
        raise LoadError(f"received {got} of {amount} bytes")
    if verify and crc != wire.expected_crc(amount):
        raise LoadError("received bytes differ from the bytes the source sent")
    return start, end


def mode_put(args: argparse.Namespace) -> Result:
    start, end = _put(args.host, args.port, args.bytes, args.timeout, args.verify)
    secs = end - start
    return {"bytes": args.bytes, "seconds": secs, "mbps": args.bytes / secs / 1e6}


def mode_get(args: argparse.Namespace) -> Result:
    start, end = _get(args.host, args.port, args.bytes, args.timeout, args.verify)
    secs = end - start
    return {"bytes": args.bytes, "seconds": secs, "mbps": args.bytes / secs / 1e6}


def _run_threads(n: int, target: Any) -> list[BaseException]:
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrapper(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def mode_multi(args: argparse.Namespace) -> Result:
    spans: list[tuple[float, float]] = []
    barrier = threading.Barrier(args.streams)
    direction = args.direction

    def one(_i: int) -> None:
        barrier.wait()
        fn = _put if direction == "put" else _get
        spans.append(fn(args.host, args.port, args.bytes, args.timeout, args.verify))

    errors = _run_threads(args.streams, one)
    if errors:
        raise LoadError(f"{len(errors)} of {args.streams} streams failed; first: {errors[0]!r}")
    t0 = min(s for s, _ in spans)
    t1 = max(e for _, e in spans)
    first = min(e for _, e in spans) - t0
    total = args.streams * args.bytes
    return {
        "bytes": total,
        "seconds": t1 - t0,
        "mbps": total / (t1 - t0) / 1e6,
        "fairness": first / (t1 - t0),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def mode_rtt(args: argparse.Namespace) -> Result:
    msg = bytes(range(64))
    samples: list[float] = []
    if args.start_delay > 0:
        time.sleep(args.start_delay)
    with _connect(args.host, args.port, args.timeout) as sock:
        sock.sendall(wire.HEADER.pack(wire.CMD_ECHO, 0))
        for _ in range(args.warmup):
            sock.sendall(msg)
            if _recv_exact(sock, len(msg)) != msg:
                raise LoadError("echo returned different bytes")
        stop_at = time.perf_counter() + args.max_seconds
        clock = time.perf_counter_ns
        for _ in range(args.count):
            t = clock()
            sock.sendall(msg)
            back = _recv_exact(sock, len(msg))
            samples.append((clock() - t) / 1000.0)
            if back != msg:
                raise LoadError("echo returned different bytes")
            if time.perf_counter() > stop_at:
                break
    if not samples:
        raise LoadError("no round trips measured")
    samples.sort()
    return {
        "samples": len(samples),
        "p50_us": _percentile(samples, 0.50),
        "p99_us": _percentile(samples, 0.99),
        "max_us": samples[-1],
        "mean_us": statistics.fmean(samples),
    }


def mode_bulk(args: argparse.Namespace) -> Result:
    """Saturate the path with *streams* discard streams for *duration* seconds."""
    totals = [0] * args.streams
    socks: list[socket.socket] = []
    for _ in range(args.streams):
        sock = _connect(args.host, args.port, args.timeout)
        sock.sendall(wire.HEADER.pack(wire.CMD_DISCARD, 0))
        socks.append(sock)
    _emit({"event": "started"})
    start = time.perf_counter()
    stop_at = start + args.duration
    chunk = memoryview(wire.pattern())[: 256 * 1024]

    def one(i: int) -> None:
        sock = socks[i]
        sent = 0
        while time.perf_counter() < stop_at:
            sock.sendall(chunk)
            sent += len(chunk)
        totals[i] = sent

    errors = _run_threads(args.streams, one)
    end = time.perf_counter()
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
    if errors:
        raise LoadError(f"bulk stream failed: {errors[0]!r}")
    return {"bytes": sum(totals), "seconds": end - start, "mbps": sum(totals) / (end - start) / 1e6}


def mode_connrate(args: argparse.Namespace) -> Result:
    counts = [0] * args.workers
    errors = [0] * args.workers
    first_error: list[str] = []
    lat: list[list[float]] = [[] for _ in range(args.workers)]
    per_worker = max(1, args.max // args.workers)
    req = wire.HEADER.pack(wire.CMD_ECHO_CLOSE, 1) + b"x"
    start = time.perf_counter()
    stop_at = start + args.duration

    def one(i: int) -> None:
        mine = lat[i]
        while time.perf_counter() < stop_at and counts[i] + errors[i] < per_worker:
            t = time.perf_counter()
            try:
                with _connect(args.host, args.port, args.timeout) as sock:
                    sock.sendall(req)
                    if sock.recv(1) != b"x":
                        raise LoadError("no echo")
                    if sock.recv(1) != b"":
                        raise LoadError("no EOF after the echo")
            except (OSError, LoadError) as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(repr(exc))
                continue
            mine.append(time.perf_counter() - t)
            counts[i] += 1

    _run_threads(args.workers, one)
    end = time.perf_counter()
    allat = sorted(x for ls in lat for x in ls)
    done = sum(counts)
    return {
        "connections": done,
        "errors": sum(errors),
        "first_error": first_error[0] if first_error else "",
        "seconds": end - start,
        "per_second": done / (end - start),
        "p50_ms": _percentile(allat, 0.5) * 1e3 if allat else 0.0,
        "p99_ms": _percentile(allat, 0.99) * 1e3 if allat else 0.0,
    }


def mode_idle(args: argparse.Namespace) -> Result:
    """Open *count* echo streams (each proven end to end), report, wait for a stdin line, close."""
    socks: list[socket.socket] = []
    lock = threading.Lock()
    failures: list[str] = []
    req = wire.HEADER.pack(wire.CMD_ECHO, 0) + b"i"
    per = [
        args.count // args.workers + (1 if i < args.count % args.workers else 0)
        for i in range(args.workers)
    ]
    start = time.perf_counter()
    deadline = start + args.max_seconds

    limited: list[bool] = []

    def one(i: int) -> None:
        mine: list[socket.socket] = []
        try:
            for _ in range(per[i]):
                if time.perf_counter() > deadline:
                    limited.append(True)
                    break
                sock = _connect(args.host, args.port, args.timeout)
                mine.append(sock)
                sock.sendall(req)
                if sock.recv(1) != b"i":
                    raise LoadError("stream did not echo")
        except (OSError, LoadError) as exc:
            with lock:
                failures.append(repr(exc))
        with lock:
            socks.extend(mine)

    _run_threads(args.workers, one)
    opened_in = time.perf_counter() - start
    _emit(
        {
            "event": "ready",
            "opened": len(socks) - len(failures),
            "failures": len(failures),
            "seconds": opened_in,
            "time_limited": bool(limited),
        }
    )
    sys.stdin.readline()
    # Prove the streams still work after sitting idle: one echo on a sample of them.
    alive = 0
    sample = socks[:: max(1, len(socks) // 50)]
    for sock in sample:
        try:
            sock.sendall(b"k")
            if sock.recv(1) == b"k":
                alive += 1
        except OSError:
            pass
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
    return {
        "requested": args.count,
        "opened": len(socks) - len(failures),
        "failures": len(failures),
        "first_failure": failures[0] if failures else "",
        "open_seconds": opened_in,
        "time_limited": bool(limited),
        "alive_checked": alive,
        "alive_sampled": len(sample),
    }


MODES = {
    "put": mode_put,
    "get": mode_get,
    "multi": mode_multi,
    "rtt": mode_rtt,
    "bulk": mode_bulk,
    "connrate": mode_connrate,
    "idle": mode_idle,
}


def main(argv: list[str] | None = None) -> int:
    """Run one load mode and print its JSON result."""
    p = argparse.ArgumentParser(prog="muxtunnel.benchsuite.load")
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--direction", choices=["put", "get"], default="put")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--start-delay", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--max", type=int, default=20000)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--verify", action="store_true")
    args = p.parse_args(argv)
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(256 * 1024)
    try:
        result = MODES[args.mode](args)
    except (OSError, LoadError) as exc:
        _emit({"error": f"{args.mode}: {exc!r}"})
        return 1
    _emit({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
