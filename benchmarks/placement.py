"""Round trips and pgbench with every process on one CPU, and with the kernel placing them.

Every round trip through a tunnel wakes four processes in turn (visitor, relay, client,
service; with pgbench: pgbench, relay, client, a PostgreSQL backend). On a two-CPU virtual
machine a wake-up on the other CPU costs far more than one on the same CPU, and where the
kernel puts each process changes from run to run: this tool measures how much of a round trip
that is. For each target of ``muxtunnel bench`` (``--targets``; ``direct`` is the service
itself) and each placement it runs the load once per round, ``--runs`` rounds, and prints
medians and the runs:

* ``free``: no affinity (what ``muxtunnel bench`` measures);
* ``one-cpu``: the load, the target's processes and the service all on CPU 0 (``taskset``):
  every wake-up stays on one CPU and no two processes run at once.

``--what rtt`` (default) is scenario 3's load (64-byte echo round trips, p50);
``--what pgbench`` is scenario 8's select-only with one client (``pgbench -S -c 1``, tps),
against a PostgreSQL cluster set up as scenario 8 does (``pgbench -i -s 5``)::

    python benchmarks/placement.py --targets direct,muxtunnel,ceiling,ssh-aes128
    python benchmarks/placement.py --what pgbench --targets direct,muxtunnel,ceiling,ssh-aes128

Linux only (``taskset`` from util-linux, ``/proc``); pgbench needs PostgreSQL and root as the
bench does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muxtunnel.benchsuite import pg
from muxtunnel.benchsuite.procs import Child, package_env, python
from muxtunnel.benchsuite.targets import Layout, Target, make_target

#: Placement name -> the one CPU every process runs on (None: the kernel decides).
PLACEMENTS: dict[str, int | None] = {"free": None, "one-cpu": 0}


def _pin(pid: int, cpu: int | None) -> None:
    """Set the affinity of ``pid`` and all its threads (None: every CPU)."""
    cpus = f"0-{(os.cpu_count() or 1) - 1}" if cpu is None else str(cpu)
    subprocess.run(
        ["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, check=True, timeout=10
    )


def _on(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def _rtt(port: int, count: int, cpu: int | None) -> float:
    """p50 in us of ``count`` 64-byte round trips through 127.0.0.1:``port``."""
    argv = [python(), "-m", "muxtunnel.benchsuite.load", "rtt", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--count", str(count), "--warmup", "100", "--max-seconds", "60"]
    out = subprocess.run(
        _on(cpu, argv), capture_output=True, env=package_env(), timeout=120, check=True
    )
    line = json.loads(out.stdout.decode().strip().splitlines()[-1])
    if "result" not in line:
        raise SystemExit(f"round trips through port {port}: {line.get('error', line)}")
    return float(line["result"]["p50_us"])


def _pgbench(server: pg.PgServer, port: int, seconds: int, cpu: int | None) -> float:
    """tps of pgbench select-only with one client through 127.0.0.1:``port``."""
    case = pg.CASES[0]
    return server.run(port, case, seconds, prefix=_on(cpu, []))[case.metric]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="direct,muxtunnel,ceiling,ssh-aes128")
    p.add_argument("--what", choices=("rtt", "pgbench"), default="rtt")
    p.add_argument("--runs", type=int, default=3, help="rounds over every target and placement")
    p.add_argument("--count", type=int, default=3000, help="--what rtt: round trips per run")
    p.add_argument("--seconds", type=int, default=5, help="--what pgbench: seconds per run")
    args = p.parse_args(argv)
    if shutil.which("taskset") is None:
        raise SystemExit("placement.py needs taskset (util-linux)")
    workdir = Path(tempfile.mkdtemp(prefix="muxtunnel-placement-"))
    server: pg.PgServer | None = None
    service: Child | None = None
    targets: list[Target] = []
    try:
        if args.what == "pgbench":
            server = pg.PgServer()
            server.start(5)
            port = server.port
            # Backends are forked by the postmaster and inherit its affinity.
            service_pid = int((server.data / "postmaster.pid").read_text().split()[0])
        else:
            service = Child(
                "service",
                [python(), "-m", "muxtunnel.benchsuite.service", "--host", "127.0.0.1"],
                workdir,
            )
            port = int(service.wait_for(r"^listening \S+ (\d+)", 20).group(1))
            service_pid = service.pid
        ends: dict[str, tuple[int, list[int]]] = {}
        for key in args.targets.split(","):
            if key == "direct":
                ends[key] = (port, [])
                continue
            target = make_target(key, Layout(), port, workdir)
            target.start()
            targets.append(target)
            ends[key] = (target.port, [child.pid for child in target.children])
        time.sleep(1.0)
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for key, (target_port, pids) in ends.items():
                for name, cpu in PLACEMENTS.items():
                    for pid in [service_pid, *pids]:
                        _pin(pid, cpu)
                    if server is not None:
                        value = _pgbench(server, target_port, args.seconds, cpu)
                    else:
                        value = _rtt(target_port, args.count, cpu)
                    results.setdefault((key, name), []).append(value)
        unit = "select-only 1 client tps" if server is not None else "round trip p50 us"
        print(f"{unit}, medians of {args.runs} runs")
        for (key, name), values in results.items():
            runs = ", ".join(f"{v:.0f}" for v in values)
            print(f"{key:12s} {name:8s} {statistics.median(values):8.0f}  ({runs})")
    finally:
        for target in targets:
            target.stop()
        if service is not None:
            service.stop()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
