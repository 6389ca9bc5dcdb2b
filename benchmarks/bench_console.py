"""Does the client's live console slow the data path? Bench scenarios 1 and 3, console on vs off.

`muxtunnel bench` starts its client without a terminal, so the console never runs there. This
script runs a real relay (a process), and for each run two real clients in turn, each on its own
tmux pseudo-terminal: one with ``--console``, one with ``--no-console`` (the order alternates per
run, so load changes on a shared machine hit both alike). Through each it drives the bench's own
load generator (muxtunnel.benchsuite.load) against the bench's echo service:

- scenario 1, one stream: ``put`` and ``get`` of ``--bytes`` (MB/s);
- scenario 3, idle round trip: ``rtt`` of ``--count`` echoes (p50 and p99, µs).

It prints every run, the medians, and the ratio console / no-console of the medians. Needs tmux.

Run:  .venv/bin/python benchmarks/bench_console.py [--bytes 268435456] [--runs 3] [--count 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.system.harness import (  # noqa: E402
    ProcessGroup,
    client_argv,
    muxtunnel_env,
    port_is_listening,
    start_relay,
    wait_until,
)

MODES = ("console", "no-console")


def _load(work: Path, port: int, *args: str) -> dict[str, float]:
    """One run of the bench's load generator; its JSON result."""
    out = subprocess.run(
        [sys.executable, "-m", "muxtunnel.benchsuite.load", *args, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=900,
        env=muxtunnel_env(work),
        check=False,
    ).stdout
    for line in out.splitlines():
        record = json.loads(line)
        if "result" in record:
            return dict(record["result"])
        if "error" in record:
            raise RuntimeError(record["error"])
    raise RuntimeError(f"load generator printed no result: {out!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=256 << 20, help="bytes per put/get")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (median reported)")
    parser.add_argument("--count", type=int, default=5000, help="echoes per RTT run")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        print("tmux is needed", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    conf = work / "tmux.conf"
    conf.write_text("set -g remain-on-exit on\nset -g default-size 130x30\n")
    group = ProcessGroup()
    service = subprocess.Popen(
        [sys.executable, "-m", "muxtunnel.benchsuite.service", "--max-seconds", "3600"],
        stdout=subprocess.PIPE,
        text=True,
        env=muxtunnel_env(work),
    )
    assert service.stdout is not None
    service_port = int(service.stdout.readline().split()[2])
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        token = secrets.token_urlsafe(24)
        relay = start_relay(group, work, token=token)
        lo, _ = relay.port_range
        for run in range(args.runs):
            order = MODES if run % 2 == 0 else MODES[::-1]
            for index, mode in enumerate(order):
                port = lo + 2 * run + index
                tmux = ["tmux", "-L", f"bench-{secrets.token_hex(4)}", "-f", str(conf)]
                argv = client_argv(
                    relay.address,
                    [f"{port}:{service_port}"],
                    token=token,
                    fingerprint=relay.fingerprint,
                    state_dir=work / f"client-{mode}-{run}",
                    extra_args=[f"--{mode}"],
                )
                env = {
                    k: v
                    for k, v in muxtunnel_env(work).items()
                    if k.startswith(("PYTHON", "XDG", "PATH"))
                }
                command = shlex.join(
                    ["env", "-u", "COLUMNS", "-u", "LINES"]
                    + [f"{k}={v}" for k, v in env.items()]
                    + argv
                )
                pid = int(
                    subprocess.run(
                        [*tmux, "new-session", "-d", "-P", "-F", "#{pane_pid}", command],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
                try:
                    wait_until(lambda p=port: port_is_listening(p), timeout=30, what="tunnel")
                    time.sleep(1)
                    size = str(args.bytes)
                    put = _load(work, port, "put", "--bytes", size)
                    get = _load(work, port, "get", "--bytes", size)
                    rtt = _load(
                        work,
                        port,
                        "rtt",
                        "--count",
                        str(args.count),
                        "--warmup",
                        "200",
                        "--max-seconds",
                        "120",
                    )
                    row = {
                        "put_mbps": put["mbps"],
                        "get_mbps": get["mbps"],
                        "rtt_p50_us": rtt["p50_us"],
                        "rtt_p99_us": rtt["p99_us"],
                    }
                    results[mode].append(row)
                    print(mode, run, row, flush=True)
                finally:
                    os.kill(pid, 15)
                    time.sleep(1)
                    subprocess.run([*tmux, "kill-server"], check=False)
        medians = {
            mode: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            for mode, rows in results.items()
        }
        for mode, values in medians.items():
            print(f"median {mode}: {values}")
        for key in medians["console"]:
            ratio = medians["console"][key] / medians["no-console"][key]
            print(f"console / no-console {key}: {ratio:.3f}")
    finally:
        group.close()
        service.terminate()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
