"""CPU and instructions per 64-byte round trip through the whole tunnel, in one process.

The real relay (``muxtunnel.server.serve``) and client (``muxtunnel.client.run_client``) run in
one trio run with an echo service; a visitor sends 64 bytes to the public port and reads them
back, ``--rounds`` times in all (``--concurrency`` visitors at once share them). Every layer of the path is there: the public socket, the relay's
splice, stream, session, TLS over loopback TCP, and the same at the client, to the service and
back. One process and one core, so the figure is the tunnel's own work per round trip, without
the wake-ups and cache misses of four processes (``muxtunnel bench`` scenario 3 measures those).

Usage::

    python benchmarks/bench_roundtrip.py                  # CPU us per round trip, median of 5
    python benchmarks/bench_roundtrip.py --instructions   # instructions per round trip (valgrind)
    python benchmarks/bench_roundtrip.py --instructions --tree /path/to/other/checkout
    python benchmarks/bench_roundtrip.py --concurrency 8      # 8 visitors at once
    python benchmarks/bench_roundtrip.py --ceiling --instructions   # the bare TLS relay
    python benchmarks/bench_roundtrip.py --rounds 300 --bytecodes 20   # where the bytecodes go
    python benchmarks/bench_roundtrip.py --connections --concurrency 8 --rounds 1000   # per connection

``--instructions`` runs this script twice under ``valgrind --tool=callgrind`` (200 and 1,000
round trips) and prints the difference per round trip: unlike timings on a shared machine it
repeats within about 1%, so it can compare two trees (``--tree``: another checkout's
``muxtunnel`` package, first on ``sys.path``) change by change. ``--ceiling`` runs the bare TLS
relay and client of ``muxtunnel.benchsuite.ceiling`` (9-byte frames, nothing else; the
``ceiling`` target of ``muxtunnel bench``) in their place: the least a Python + trio + TLS
tunnel can do per round trip. ``--bytecodes TOP`` counts the bytecodes run per round trip
instead (by package, and the TOP functions): where the interpreter's work goes, exactly.
``--connections`` makes each round a new tunnelled connection instead (connect, one byte there
and back, the service closes first, as in scenario 5; ``--concurrency`` connections at a time),
with every other option as above: the tunnel's work per stream opened and closed.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

if TYPE_CHECKING:
    import types
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = bytes(range(64))
TOKEN = "bench-roundtrip-token-0123456789"
WARMUP = 50


async def _echo(stream: trio.SocketStream) -> None:
    """The service: echo until EOF; in ``--connections`` mode echo one read, then close first
    (scenario 5's service)."""
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
            if _connections:
                break  # trio.serve_listeners closes the stream when this returns
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _connection(port: int) -> None:
    """One tunnelled connection: connect, one byte there and back, the service's close."""
    visitor = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await visitor.send_all(b"x")
        if await visitor.receive_some(1) != b"x" or await visitor.receive_some(1) != b"":
            raise SystemExit("no echo and close through the tunnel")
    finally:
        await visitor.aclose()


async def _all_connections(port: int, count: int, concurrency: int) -> None:
    """``count`` connections in all, ``concurrency`` at a time."""

    async def worker(share: int) -> None:
        for _ in range(share):
            await _connection(port)

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, count // concurrency + (1 if i < count % concurrency else 0))


async def _round_trips(visitor: trio.SocketStream, rounds: int) -> None:
    for _ in range(rounds):
        await visitor.send_all(MESSAGE)
        got = 0
        while got < len(MESSAGE):
            chunk = await visitor.receive_some(65536)
            if not chunk:
                raise SystemExit("the tunnel closed the visitor connection")
            got += len(chunk)


async def _all_round_trips(visitors: list[trio.SocketStream], rounds: int) -> None:
    """``rounds`` round trips in all, spread over the visitors, all of them at once."""
    async with trio.open_nursery() as nursery:
        for i, visitor in enumerate(visitors):
            share = rounds // len(visitors) + (1 if i < rounds % len(visitors) else 0)
            nursery.start_soon(_round_trips, visitor, share)


def _no_phase(measuring: bool) -> None:
    del measuring


#: ``--connections``: a round is a new tunnelled connection instead of a round trip.
_connections = False

#: Told True when the measured round trips start and False when they end (``--bytecodes``).
_phase: Callable[[bool], None] = _no_phase


async def _measure(port: int, rounds: int, repeats: int, concurrency: int) -> list[float]:
    """Warm up, then CPU us per round trip (or per connection, ``--connections``) of
    ``repeats`` batches of ``rounds``."""
    if _connections:
        await _all_connections(port, WARMUP * concurrency, concurrency)
        await _settle()
        visitors: list[trio.SocketStream] = []
    else:
        visitors = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(concurrency)]
        await _all_round_trips(visitors, WARMUP * len(visitors))
    cpu: list[float] = []
    _phase(True)
    for _ in range(repeats):
        start = time.process_time()
        if _connections:
            await _all_connections(port, rounds, concurrency)
            await _settle()  # both tunnel ends finish closing the last streams
        else:
            await _all_round_trips(visitors, rounds)
        cpu.append((time.process_time() - start) / rounds * 1e6)
    _phase(False)
    for visitor in visitors:
        await visitor.aclose()
    return cpu


async def _settle() -> None:
    """Let every task run until all wait (streams closing after the visitors are done)."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)


async def _main_ceiling(rounds: int, repeats: int, concurrency: int) -> list[float]:
    """The same round trips through the bare TLS relay of ``muxtunnel.benchsuite.ceiling``."""
    from muxtunnel.benchsuite import ceiling
    from muxtunnel.tls import generate_self_signed

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = generate_self_signed("ceiling")
        (Path(tmp) / "cert.pem").write_bytes(cert)
        (Path(tmp) / "key.pem").write_bytes(key)
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            service_port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, _echo, listeners)
            args = argparse.Namespace(
                tls=True,
                raw=True,
                fast=False,
                cert=str(Path(tmp) / "cert.pem"),
                key=str(Path(tmp) / "key.pem"),
                service_port=service_port,
                tunnel_port=0,
            )
            lines: list[str] = []
            listening = trio.Event()

            def report(line: str) -> None:
                lines.append(line)
                listening.set()

            nursery.start_soon(ceiling.relay, args, report)
            await listening.wait()
            match = re.match(r"tunnel (\d+) public (\d+)", lines[0])
            if match is None:
                raise SystemExit(f"unexpected line from the bare relay: {lines[0]!r}")
            args.tunnel_port = int(match.group(1))
            nursery.start_soon(ceiling.client, args)
            public = int(match.group(2))
            cpu = await _measure(public, rounds, repeats, concurrency)
            nursery.cancel_scope.cancel()
    return cpu


async def _main(rounds: int, repeats: int, concurrency: int) -> list[float]:
    from muxtunnel.client import run_client
    from muxtunnel.config import ClientConfig, ServerConfig, TunnelSpec
    from muxtunnel.server import serve

    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            service_port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, _echo, listeners)
            public = _free_port()
            relay = await nursery.start(
                lambda task_status: serve(
                    ServerConfig(
                        listen_host="127.0.0.1",
                        listen_port=0,
                        port_range=(public, public),
                        bind_host="127.0.0.1",
                        tokens=(TOKEN,),
                        state_dir=Path(tmp) / "relay",
                    ),
                    report=lambda _line: None,
                    task_status=task_status,
                )
            )
            client = await nursery.start(
                lambda task_status: run_client(
                    ClientConfig(
                        server_host="127.0.0.1",
                        server_port=relay.port,
                        token=TOKEN,
                        fingerprint=relay.fingerprint,
                        state_dir=Path(tmp) / "client",
                        tunnels=(TunnelSpec(local_port=service_port),),
                    ),
                    report=lambda _line: None,
                    task_status=task_status,
                )
            )
            port = client.tunnels[0].remote_port
            cpu = await _measure(port, rounds, repeats, concurrency)
            nursery.cancel_scope.cancel()
    return cpu


def _free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the relay's one public port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _instructions(tree: Path | None, concurrency: int, ceiling: bool) -> int:
    """Instructions per round trip (or connection): callgrind's totals for 1,000 and 200
    rounds, per round."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    env = dict(os.environ, PYTHONHASHSEED="0")
    other = ["--concurrency", str(concurrency)]
    if tree is not None:
        other += ["--tree", str(tree)]
    if ceiling:
        other.append("--ceiling")
    if _connections:
        other.append("--connections")
    totals = []
    for rounds in (200, 1000):
        out = subprocess.run(
            [
                valgrind,
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                __file__,
                "--rounds",
                str(rounds),
                "--repeats",
                "1",
                *other,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        match = re.search(r"Collected : (\d+)", out.stderr)
        if match is None:
            raise SystemExit(f"no instruction count from valgrind:\n{out.stderr[-2000:]}")
        totals.append(int(match.group(1)))
    return (totals[1] - totals[0]) // 800


def _bytecodes(main_fn: Callable[..., Any], rounds: int, concurrency: int, top: int) -> None:
    """Print the bytecodes run per round trip (a ``sys.settrace`` hook with opcode events):
    in all, by package, and the ``top`` functions. Slow, but exact and repeatable."""
    global _phase
    counts: collections.Counter[types.CodeType] = collections.Counter()
    measuring = False

    def local(frame: types.FrameType, event: str, _arg: object) -> Any:
        if measuring and event == "opcode":
            counts[frame.f_code] += 1
        return local

    def new_frame(frame: types.FrameType, _event: str, _arg: object) -> Any:
        frame.f_trace_opcodes = True
        return local

    def phase(on: bool) -> None:
        nonlocal measuring
        measuring = on

    _phase = phase
    sys.settrace(new_frame)
    try:
        trio.run(main_fn, rounds, 1, concurrency)
    finally:
        sys.settrace(None)
    by_package: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    for code, n in counts.items():
        path = code.co_filename
        package = next((p for p in ("muxtunnel", "trio", "outcome") if f"/{p}/" in path), "other")
        by_package[package] += n
        by_function[f"{Path(path).name}:{code.co_firstlineno} {code.co_qualname}"] += n
    total = sum(counts.values())
    print(f"bytecodes per {_unit()}: {total / rounds:,.0f}")
    print("  " + ", ".join(f"{p} {n / rounds:,.0f}" for p, n in by_package.most_common()))
    for name, n in by_function.most_common(top):
        print(f"  {n / rounds:8,.1f}  {name}")


def _unit() -> str:
    return "connection" if _connections else "round trip"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2000, help="round trips per repeat")
    p.add_argument("--repeats", type=int, default=5, help="CPU measurements (median)")
    p.add_argument("--concurrency", type=int, default=1, help="visitors doing round trips at once")
    p.add_argument("--instructions", action="store_true", help="count instructions (valgrind)")
    p.add_argument("--tree", type=Path, help="measure another checkout's muxtunnel package")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="the bare TLS relay of muxtunnel.benchsuite.ceiling instead of muxtunnel",
    )
    p.add_argument(
        "--bytecodes",
        type=int,
        metavar="TOP",
        help="count the bytecodes run per round trip; print the TOP functions",
    )
    p.add_argument(
        "--connections",
        action="store_true",
        help="a round is a new tunnelled connection (connect, 1-byte echo, the service closes)",
    )
    args = p.parse_args(argv)
    global _connections
    _connections = args.connections
    if args.instructions:
        count = _instructions(args.tree, args.concurrency, args.ceiling)
        print(f"instructions per {_unit()}: {count:,}")
        return 0
    sys.path.insert(0, str(ROOT if args.tree is None else args.tree))
    main_fn = _main_ceiling if args.ceiling else _main
    if args.bytecodes is not None:
        _bytecodes(main_fn, args.rounds, args.concurrency, args.bytecodes)
        return 0
    cpu = trio.run(main_fn, args.rounds, args.repeats, args.concurrency)
    print(f"CPU per {_unit()}: {statistics.median(cpu):.1f} us (median of {len(cpu)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
