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

``--instructions`` runs this script twice under ``valgrind --tool=callgrind`` (200 and 1,000
round trips) and prints the difference per round trip: unlike timings on a shared machine it
repeats within about 1%, so it can compare two trees (``--tree``: another checkout's
``muxtunnel`` package, first on ``sys.path``) change by change.
"""

from __future__ import annotations

import argparse
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

import trio

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = bytes(range(64))
TOKEN = "bench-roundtrip-token-0123456789"
WARMUP = 50


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


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
            visitors = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(concurrency)]
            await _all_round_trips(visitors, WARMUP * concurrency)
            cpu: list[float] = []
            for _ in range(repeats):
                start = time.process_time()
                await _all_round_trips(visitors, rounds)
                cpu.append((time.process_time() - start) / rounds * 1e6)
            for visitor in visitors:
                await visitor.aclose()
            nursery.cancel_scope.cancel()
    return cpu


def _free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the relay's one public port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _instructions(tree: Path | None, concurrency: int) -> int:
    """Instructions per round trip: callgrind's totals for 1,000 and 200 rounds, per round."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    env = dict(os.environ, PYTHONHASHSEED="0")
    other = ["--concurrency", str(concurrency)]
    if tree is not None:
        other += ["--tree", str(tree)]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2000, help="round trips per repeat")
    p.add_argument("--repeats", type=int, default=5, help="CPU measurements (median)")
    p.add_argument("--concurrency", type=int, default=1, help="visitors doing round trips at once")
    p.add_argument("--instructions", action="store_true", help="count instructions (valgrind)")
    p.add_argument("--tree", type=Path, help="measure another checkout's muxtunnel package")
    args = p.parse_args(argv)
    if args.instructions:
        print(f"instructions per round trip: {_instructions(args.tree, args.concurrency):,}")
        return 0
    sys.path.insert(0, str(ROOT if args.tree is None else args.tree))
    cpu = trio.run(_main, args.rounds, args.repeats, args.concurrency)
    print(f"CPU per round trip: {statistics.median(cpu):.1f} us (median of {len(cpu)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
