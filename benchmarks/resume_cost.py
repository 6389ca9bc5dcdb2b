"""What session resumption costs on one connection (protocol-spec.md §10.6), A/B in one run.

Starts the bench's ``muxtunnel`` target (resumption on, the default window) and
``muxtunnel-noresume`` (``--resume-window 0`` at both ends) side by side and alternates them
round by round (the order flips every round): one stream up and down, and N concurrent streams
up. Besides wall-clock MB/s (noisy on a shared machine) it reports the CPU time the relay and
the client spent per MiB moved (``/proc/PID/schedstat``), which other processes disturb
less, their minor page faults per MiB, and the high-water mark of the replay log (``replay``
in the admin status of the relay and of the client) sampled during the transfers.
Ratios are of medians: the first target over each other one.

Usage: python benchmarks/resume_cost.py [--rounds 5] [--one-mib 256] [--streams 100]
[--stream-mib 2] [--poll 0.05] [--targets muxtunnel,muxtunnel-noresume] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any, Self

import trio

from muxtunnel import admin
from muxtunnel.benchsuite.runner import Bench, Outcome, Sizes, stop_targets
from muxtunnel.benchsuite.targets import Layout, Target

MiB = 1024 * 1024
KEYS = ("muxtunnel", "muxtunnel-noresume")


class ReplayWatch:
    """Samples the admin status of a target's relay and client in a thread; keeps the maxima."""

    def __init__(self, target: Target, interval: float) -> None:
        self.addresses = [
            a
            for role in ("server", "client")
            for a in admin.discover(target.workdir / f"{target.key}-{role}")
        ]
        self.interval = interval
        self.high: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        trio.run(self._poll)

    async def _poll(self) -> None:
        while not self._stop.is_set():
            snaps, _ = await admin.query_all(self.addresses)
            for snap in snaps:
                for sess in snap["sessions"]:
                    if sess.get("replay") is not None:
                        role = snap["role"]
                        self.high[role] = max(self.high.get(role, 0), int(sess["replay"]))
            self.samples += 1
            await trio.sleep(self.interval)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of one process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return None


def minor_faults(t: Target) -> int:
    """Minor page faults of the relay and the client so far (``/proc/PID/stat`` field 10)."""
    total = 0
    for child in t.children:
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        total += int(stat.rsplit(")", 1)[1].split()[7])
    return total


def cpu_ns(t: Target) -> int:
    times = t.sched_times()
    return times[0] if times else 0


def measure(bench: Bench, t: Target, args: argparse.Namespace) -> dict[str, Any]:
    """One round on *t*: put, get, multi; MB/s and tunnel CPU ms per MiB for each."""
    one = args.one_mib * MiB
    run: dict[str, Any] = {}
    for name, mode, extra, mib in (
        ("put", "put", ["--bytes", str(one)], args.one_mib),
        ("get", "get", ["--bytes", str(one)], args.one_mib),
        (
            "multi",
            "multi",
            ["--streams", str(args.streams), "--bytes", str(args.stream_mib * MiB)],
            args.streams * args.stream_mib,
        ),
    ):
        c0, f0 = cpu_ns(t), minor_faults(t)
        r = bench.load(t, mode, *extra, timeout=600)
        run[f"{name}_mbps"] = r["mbps"]
        run[f"{name}_cpu_ms_per_mib"] = (cpu_ns(t) - c0) / 1e6 / mib
        run[f"{name}_faults_per_mib"] = (minor_faults(t) - f0) / mib
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--one-mib", type=int, default=256, help="one-stream MiB each way")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--stream-mib", type=int, default=2)
    p.add_argument("--poll", type=float, default=0.05, help="replay sampling interval (s)")
    p.add_argument(
        "--targets",
        default=",".join(KEYS),
        help="the first is compared with the others (muxtunnel-ref: MUXTUNNEL_BENCH_REF tree)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    keys = tuple(args.targets.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="resume-cost-"))
    bench = Bench(Sizes(), workdir, verify=False, out=Outcome())
    svc = bench.start_service(Layout())
    sport = int(svc.wait_for(r"^listening \S+ (\d+)", 5).group(1))
    targets = bench.start_targets(list(keys), Layout(), sport, "loopback")
    by = {t.key: t for t in targets}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    high: dict[str, int] = {}
    try:
        for i in range(args.rounds):
            order = keys if i % 2 == 0 else keys[::-1]
            for key in order:
                t = by[key]
                with ReplayWatch(t, args.poll) as watch:
                    run = measure(bench, t, args)
                for role, v in watch.high.items():
                    high[role] = max(high.get(role, 0), v)
                run["replay_high"] = dict(watch.high)
                runs[key].append(run)
                bench.progress(f"round {i + 1} {key}: {json.dumps(run)}")
        summary_peak = {
            k: {
                role: peak_rss_mb(by[k].children[i].pid)
                for i, role in enumerate(("relay", "client"))
            }
            for k in keys
        }
    finally:
        stop_targets(targets)
        svc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {"args": vars(args) | {"json": str(args.json)}, "runs": runs}
    metrics = [m for m in runs[keys[0]][0] if m != "replay_high"]
    med = {k: {m: statistics.median(r[m] for r in runs[k]) for m in metrics} for k in keys}
    summary["median"] = med
    summary["ratios"] = {
        f"{keys[0]}/{k}": {m: med[keys[0]][m] / med[k][m] for m in metrics if med[k][m]}
        for k in keys[1:]
    }
    summary["replay_high_bytes"] = high
    summary["peak_rss_mb"] = summary_peak
    print(json.dumps(summary["median"], indent=1))
    for name, ratios in summary["ratios"].items():
        print(f"{name}:", json.dumps({m: round(v, 3) for m, v in ratios.items()}))
    print("replay high-water (bytes):", high)
    print("peak RSS (VmHWM, MB):", summary_peak)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
