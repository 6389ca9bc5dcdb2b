"""CPU the tunnel's processes spend per 64-byte round trip (or per new connection), N loads at once.

Starts the service and each target of ``muxtunnel bench`` (``--targets``, e.g. ``muxtunnel``,
``muxtunnel-ref``, ``ceiling``, ``ssh-aes128``), then, per run and per target in turn, starts
``--clients`` load processes (``python -m muxtunnel.benchsuite.load rtt``) at once, each doing
``--count`` round trips, and reads the user and system CPU of the target's processes from
``/proc/PID/stat`` before and after. Prints, per target, the medians over ``--runs`` of round
trips per second, CPU per round trip (user + system) and the load processes' median p50.

    python benchmarks/cpu_per_roundtrip.py --targets muxtunnel,ceiling --clients 8 --runs 5

With 8 clients the figure is what decides pgbench with 8 clients on a 2-core machine: the
tunnel's CPU per round trip is CPU that PostgreSQL and pgbench do not get.

``--mode connrate`` measures new connections instead (scenario 5's load: each of ``--clients``
processes runs 16 threads that connect, send, read the echo and the close, for ``--seconds``)
and prints the CPU per tunnelled connection:

    python benchmarks/cpu_per_roundtrip.py --mode connrate --targets muxtunnel,muxtunnel-ref --clients 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muxtunnel.benchsuite.procs import Child, cpu_times, package_env, python
from muxtunnel.benchsuite.targets import Layout, Target, make_target


def _load_argv(target: Target, args: argparse.Namespace) -> list[str]:
    where = ["--host", target.host, "--port", str(target.port)]
    if args.mode == "connrate":
        return [
            *("connrate", *where, "--duration", str(args.seconds), "--workers", "16"),
            *("--max", "30000", "--timeout", "10"),
        ]
    return ["rtt", *where, "--count", str(args.count), "--warmup", "20", "--max-seconds", "60"]


def _run(target: Target, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """One run: (operations/s, user us and system us per operation, median p50 us).

    An operation is a round trip (``--mode rtt``) or a tunnelled connection (``connrate``)."""
    pids = [child.pid for child in target.children]
    user0, sys0 = cpu_times(pids)
    start = time.perf_counter()
    argv = [python(), "-m", "muxtunnel.benchsuite.load", *_load_argv(target, args)]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, env=package_env())
        for _ in range(args.clients)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        line = json.loads(out.decode().strip().splitlines()[-1])
        if "result" not in line:
            raise SystemExit(f"{target.key}: {line.get('error', line)}")
        results.append(line["result"])
    elapsed = time.perf_counter() - start
    user1, sys1 = cpu_times(pids)
    if args.mode == "connrate":
        ops = sum(r["connections"] for r in results)
        p50 = statistics.median(r["p50_ms"] * 1e3 for r in results)
    else:
        ops = sum(r["samples"] for r in results)
        p50 = statistics.median(r["p50_us"] for r in results)
    return ops / elapsed, (user1 - user0) / ops * 1e6, (sys1 - sys0) / ops * 1e6, p50


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="muxtunnel,ceiling")
    p.add_argument("--clients", type=int, default=8, help="echo loops at once")
    p.add_argument("--count", type=int, default=2500, help="round trips per loop and run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--mode",
        choices=("rtt", "connrate"),
        default="rtt",
        help="echo round trips (default) or new connections (scenario 5's load)",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="--mode connrate: seconds per run")
    args = p.parse_args(argv)
    unit = "connection" if args.mode == "connrate" else "round trip"
    workdir = Path(tempfile.mkdtemp(prefix="muxtunnel-cpu-rt-"))
    service = Child(
        "service",
        [python(), "-m", "muxtunnel.benchsuite.service", "--host", "127.0.0.1"],
        workdir,
    )
    targets: list[Target] = []
    try:
        port = int(service.wait_for(r"^listening \S+ (\d+)", 20).group(1))
        for key in args.targets.split(","):
            target = make_target(key, Layout(), port, workdir)
            target.start()
            targets.append(target)
        time.sleep(1.0)
        rows: dict[str, list[tuple[float, float, float, float]]] = {t.key: [] for t in targets}
        for _ in range(args.runs):
            for target in targets:
                rows[target.key].append(_run(target, args))
        what = "connecting processes" if args.mode == "connrate" else "echo loops"
        print(f"{args.clients} {what} at once, medians of {args.runs} runs")
        for key, runs in rows.items():
            user = statistics.median(r[1] for r in runs)
            system = statistics.median(r[2] for r in runs)
            total = statistics.median(r[1] + r[2] for r in runs)
            print(
                f"{key:20s} {statistics.median(r[0] for r in runs):8.0f} {unit}s/s"
                f"  CPU {total:6.1f} us per {unit} (user {user:.0f}, system {system:.0f})"
                f"  p50 {statistics.median(r[3] for r in runs):6.0f} us"
            )
    finally:
        for target in targets:
            target.stop()
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
