"""Traffic for the fault tests: a checking service and visitors, run as processes on lab hosts.

Every byte is a deterministic function of (seed, offset) (:func:`expected`), so either end can
check what it received as an exact prefix of what was sent: corrupted, reordered, duplicated
or missing bytes are caught at the first wrong offset, and a stream that was cut short is told
apart from one that ended cleanly.

``peers.py serve PORT``
    Listens on 0.0.0.0:PORT. A connection starts with one line ``MODE SIZE SEED``:
    ``echo`` echoes every byte until EOF, then half-closes; ``down`` sends SIZE bytes of the
    seed's stream, then half-closes; ``up`` checks what arrives against the seed's stream and
    answers ``OK <bytes> <sha256>`` or ``BAD <offset>`` at EOF. Prints ``listening`` once ready
    and one JSON line per finished connection (``down``: ``extra`` counts bytes that arrived
    after the header, which should be none).

``peers.py probe HOST PORT [--count N] [--timeout S]``
    N TCP connects; prints ``{"probes": N, "ok": succeeded, "median_ms": connect time}``.

``peers.py lines [--interval S] [--max N] [--until FILE] [--timeout S] -- CMD...``
    Runs CMD (e.g. ``ssh HOST cat``) and feeds its stdin one numbered line every ``--interval``
    seconds until FILE exists (or N lines), then closes it; checks that CMD's stdout echoes every
    line, in order, and ends. Prints ``receiving`` at the first echo, then one JSON line: ``ok``,
    ``sent``, ``echoed``, ``mismatch`` (index of the first wrong line or None), ``max_gap`` (the
    longest wait between two echoes, seconds) with ``gap_start``/``gap_end`` (``time.monotonic()``
    of the echoes around it: one clock for every process of the machine), ``returncode``,
    ``stderr`` (its tail) and ``seconds``.

``peers.py pull [--rate B/S] [--timeout S] -- CMD...``
    Runs CMD (e.g. ``ssh HOST cat FILE``) and reads its stdout (paced to ``--rate``), hashing it.
    Prints ``progress BYTES`` every 4 MiB, then one JSON line: ``bytes``, ``sha256``, ``max_gap``
    (the longest wait for bytes) with ``gap_start``/``gap_end``, ``returncode``, ``stderr``,
    ``seconds``.

``peers.py visit HOST PORT MODE SIZE SEED [--rate B/S] [--timeout S]``
    One connection of that MODE; prints ``receiving`` when the first bytes arrive, then one
    JSON line: ``ok`` (everything arrived intact and
    ended cleanly), ``sent``, ``received``, ``verified`` (bytes checked correct: always the
    whole of what was received unless ``mismatch`` is set), ``mismatch`` (offset of the first
    wrong byte or None), ``end`` (``eof``, ``reset``, ``timeout`` or the error's name),
    ``error`` and ``seconds``. ``--rate`` paces what it sends (a long-lived stream), or in
    ``down`` mode how fast it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Any

BLOCK = 65536
_cache: dict[tuple[int, int], bytes] = {}


def _block(seed: int, index: int) -> bytes:
    key = (seed, index)
    got = _cache.get(key)
    if got is None:
        got = random.Random(seed * 1_000_003 + index).randbytes(BLOCK)
        if len(_cache) > 64:
            _cache.clear()
        _cache[key] = got
    return got


def expected(seed: int, offset: int, n: int) -> bytes:
    """The seed's stream from ``offset``, ``n`` bytes."""
    out = bytearray()
    while n > 0:
        index, start = divmod(offset, BLOCK)
        piece = _block(seed, index)[start : start + n]
        out += piece
        offset += len(piece)
        n -= len(piece)
    return bytes(out)


class Checker:
    """Checks received bytes against the seed's stream; remembers the first mismatch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.received = 0
        self.mismatch: int | None = None
        self.sha = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.sha.update(data)
        if self.mismatch is None:
            want = expected(self.seed, self.received, len(data))
            if want != data:
                bad = next(i for i, (a, b) in enumerate(zip(want, data, strict=True)) if a != b)
                self.mismatch = self.received + bad
        self.received += len(data)

    @property
    def verified(self) -> int:
        return self.received if self.mismatch is None else self.mismatch


def _end_name(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


# -- service ---------------------------------------------------------------------------------


def _serve_one(conn: socket.socket, peer: str) -> None:
    conn.settimeout(600)
    report: dict[str, Any] = {"peer": peer}
    try:
        header = b""
        while not header.endswith(b"\n") and len(header) < 200:
            ch = conn.recv(1)
            if not ch:
                break
            header += ch
        mode, size_s, seed_s = header.decode().split()
        size, seed = int(size_s), int(seed_s)
        report["mode"] = mode
        if mode == "echo":
            n = 0
            while data := conn.recv(BLOCK):
                conn.sendall(data)
                n += len(data)
            conn.shutdown(socket.SHUT_WR)
            report["echoed"] = n
        elif mode == "down":
            sent = 0
            while sent < size:
                chunk = expected(seed, sent, min(BLOCK, size - sent))
                conn.sendall(chunk)
                sent += len(chunk)
            conn.shutdown(socket.SHUT_WR)
            report["sent"] = sent
            extra = 0  # the visitor sends nothing after its header: count what comes anyway
            while data := conn.recv(BLOCK):
                extra += len(data)
            report["extra"] = extra
        elif mode == "up":
            checker = Checker(seed)
            while data := conn.recv(BLOCK):
                checker.feed(data)
            if checker.mismatch is None:
                conn.sendall(f"OK {checker.received} {checker.sha.hexdigest()}\n".encode())
            else:
                conn.sendall(f"BAD {checker.mismatch}\n".encode())
            conn.shutdown(socket.SHUT_WR)
            report.update(received=checker.received, mismatch=checker.mismatch)
        report["end"] = "eof"
    except (OSError, ValueError) as exc:
        report["end"] = _end_name(exc)
    finally:
        conn.close()
        print(json.dumps(report), flush=True)


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), backlog=512)
    print("listening", flush=True)
    while True:
        conn, addr = listener.accept()
        threading.Thread(
            target=_serve_one, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True
        ).start()


# -- visitor ---------------------------------------------------------------------------------


def visit(
    host: str, port: int, mode: str, size: int, seed: int, rate: float, timeout: float
) -> dict[str, Any]:
    start = time.monotonic()
    result: dict[str, Any] = {"mode": mode, "size": size, "sent": 0, "received": 0}
    checker = Checker(seed)
    reply = bytearray()
    end: list[str] = []
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        result.update(ok=False, end=_end_name(exc), error=str(exc), verified=0, mismatch=None)
        result["seconds"] = round(time.monotonic() - start, 3)
        return result
    sock.settimeout(timeout)

    def reader() -> None:
        first = True
        try:
            while data := sock.recv(BLOCK):
                if first:
                    first = False
                    print("receiving", flush=True)
                if mode == "up":
                    reply.extend(data)
                else:
                    checker.feed(data)
                if mode == "down" and rate > 0:  # a slow reader: the tunnel's windows fill up
                    delay = start + checker.received / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            end.append("eof")
        except OSError as exc:
            end.append(_end_name(exc))
            result["error"] = str(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        sock.sendall(f"{mode} {size} {seed}\n".encode())
        if mode in ("echo", "up"):
            sent = 0
            piece = BLOCK if rate <= 0 else max(1024, min(BLOCK, int(rate / 10)))
            while sent < size:
                chunk = expected(seed, sent, min(piece, size - sent))
                sock.sendall(chunk)
                sent += len(chunk)
                result["sent"] = sent
                if rate > 0:
                    delay = start + sent / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        end.append(_end_name(exc))
        result.setdefault("error", str(exc))
    thread.join(timeout + 5)
    sock.close()
    result["end"] = end[0] if end else "timeout"
    result["received"] = checker.received if mode != "up" else len(reply)
    result["mismatch"] = checker.mismatch
    if mode == "up":
        text = reply.decode(errors="replace").strip()
        result["reply"] = text
        want = hashlib.sha256(expected(seed, 0, size)).hexdigest() if size <= 1 << 26 else None
        good = text.startswith(f"OK {size} ") and (want is None or text.endswith(want))
        result["verified"] = size if good else 0
        result["ok"] = good and result["end"] == "eof"
    else:
        result["verified"] = checker.verified
        result["ok"] = (
            result["end"] == "eof" and checker.mismatch is None and checker.received == size
        )
        result["sha256"] = checker.sha.hexdigest()
    result["seconds"] = round(time.monotonic() - start, 3)
    return result


class _Gaps:
    """The longest pause between two events (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.max_gap = 0.0
        self.gap_start: float | None = None
        self.gap_end: float | None = None

    def tick(self) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last > self.max_gap:
            self.max_gap, self.gap_start, self.gap_end = now - self.last, self.last, now
        self.last = now

    def report(self) -> dict[str, Any]:
        return {
            "max_gap": round(self.max_gap, 3),
            "gap_start": self.gap_start,
            "gap_end": self.gap_end,
        }


def _child(cmd: list[str], timeout: float) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with pipes; it is killed (by PID) if it still runs after ``timeout``."""
    child = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watchdog = threading.Timer(timeout, child.kill)
    watchdog.daemon = True
    watchdog.start()
    return child


def _finish(child: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, str]:
    """Wait for ``child`` (bounded), kill it if it hangs; its exit status and stderr tail."""
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)
        return None, "killed: did not exit in time"
    assert child.stderr is not None
    return child.returncode, child.stderr.read()[-2000:].decode(errors="replace")


def lines(
    cmd: list[str], interval: float, count: int, until: str | None, timeout: float
) -> dict[str, Any]:
    """Feed numbered lines to ``cmd``; check the echoes (see the module docs)."""
    start = time.monotonic()
    child = _child(cmd, timeout)
    assert child.stdin is not None
    assert child.stdout is not None
    stdin, stdout = child.stdin, child.stdout
    sent = [0]

    def feed() -> None:
        try:
            for i in range(count):
                if until is not None and os.path.exists(until):
                    break
                stdin.write(f"line {i}\n".encode())
                stdin.flush()
                sent[0] = i + 1
                time.sleep(interval)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            stdin.close()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    gaps = _Gaps()
    echoed = 0
    mismatch: int | None = None
    deadline = start + timeout
    for raw in stdout:  # ends at EOF; ``timeout`` is enforced by the watchdog below
        gaps.tick()
        if echoed == 0:
            print("receiving", flush=True)
        if mismatch is None and raw != f"line {echoed}\n".encode():
            mismatch = echoed
        echoed += 1
        if time.monotonic() > deadline:
            break
    writer.join(max(0.0, deadline - time.monotonic()) + 1)
    returncode, err = _finish(child, max(1.0, deadline - time.monotonic()))
    ok = mismatch is None and echoed == sent[0] and returncode == 0
    return {
        "ok": ok,
        "sent": sent[0],
        "echoed": echoed,
        "mismatch": mismatch,
        **gaps.report(),
        "returncode": returncode,
        "stderr": err,
        "seconds": round(time.monotonic() - start, 3),
    }


def pull(cmd: list[str], rate: float, timeout: float) -> dict[str, Any]:
    """Read ``cmd``'s stdout (paced), hash it (see the module docs)."""
    start = time.monotonic()
    child = _child(cmd, timeout)
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.close()
    fd = child.stdout.fileno()
    sha = hashlib.sha256()
    total = 0
    step = 4 << 20
    gaps = _Gaps()
    gaps.tick()
    deadline = start + timeout
    while data := os.read(fd, 4 * BLOCK):
        gaps.tick()
        sha.update(data)
        before, total = total, total + len(data)
        if total // step != before // step:
            print(f"progress {total}", flush=True)
        if rate > 0:
            delay = start + total / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if time.monotonic() > deadline:
            break
    returncode, err = _finish(child, max(1.0, deadline - time.monotonic()))
    return {
        "bytes": total,
        "sha256": sha.hexdigest(),
        **gaps.report(),
        "returncode": returncode,
        "stderr": err,
        "seconds": round(time.monotonic() - start, 3),
    }


def probe(host: str, port: int, count: int, timeout: float) -> dict[str, Any]:
    """``count`` TCP connects (each bounded by ``timeout``): how many succeeded, median time."""
    times: list[float] = []
    for _ in range(count):
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=timeout):
                times.append(time.monotonic() - t0)
        except OSError:
            pass
    times.sort()
    median = times[len(times) // 2] * 1000 if times else None
    return {"probes": count, "ok": len(times), "median_ms": median}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("port", type=int)
    v = sub.add_parser("visit")
    v.add_argument("host")
    v.add_argument("port", type=int)
    v.add_argument("mode", choices=["echo", "down", "up"])
    v.add_argument("size", type=int)
    v.add_argument("seed", type=int)
    v.add_argument("--rate", type=float, default=0.0)
    v.add_argument("--timeout", type=float, default=120.0)
    pr = sub.add_parser("probe")
    pr.add_argument("host")
    pr.add_argument("port", type=int)
    pr.add_argument("--count", type=int, default=5)
    pr.add_argument("--timeout", type=float, default=2.0)
    li = sub.add_parser("lines")
    li.add_argument("--interval", type=float, default=0.1)
    li.add_argument("--max", type=int, default=1000)
    li.add_argument("--until", default=None)
    li.add_argument("--timeout", type=float, default=120.0)
    li.add_argument("cmd", nargs="+")
    pu = sub.add_parser("pull")
    pu.add_argument("--rate", type=float, default=0.0)
    pu.add_argument("--timeout", type=float, default=120.0)
    pu.add_argument("cmd", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "lines":
        result = lines(args.cmd, args.interval, args.max, args.until, args.timeout)
        print(json.dumps(result), flush=True)
        return 0
    if args.command == "pull":
        print(json.dumps(pull(args.cmd, args.rate, args.timeout)), flush=True)
        return 0
    if args.command == "probe":
        print(json.dumps(probe(args.host, args.port, args.count, args.timeout)), flush=True)
        return 0
    if args.command == "serve":
        serve(args.port)
        return 0
    out = visit(args.host, args.port, args.mode, args.size, args.seed, args.rate, args.timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
