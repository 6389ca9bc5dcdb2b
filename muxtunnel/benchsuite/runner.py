"""Scenario definitions and the loop that runs them against every target."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muxtunnel.benchsuite.procs import BenchError, Child, python
from muxtunnel.benchsuite.targets import Layout, Target, connections_of, make_target

MiB = 1 << 20
GiB = 1 << 30

Run = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each scenario is (full run or --quick smoke run)."""

    one_stream: int = GiB
    multi_streams: int = 100
    multi_bytes: int = 10 * MiB
    rtt_count: int = 5000
    rtt_warmup: int = 200
    bulk_streams: int = 4
    bulk_seconds: float = 10.0
    connrate_seconds: float = 5.0
    connrate_procs: int = 2
    connrate_workers: int = 16
    idle_streams: int = 10000
    idle_seconds: float = 150.0
    idle_seconds_reference: float = 60.0
    wan_one_stream: int = 128 * MiB
    wan_multi_streams: int = 100
    wan_multi_bytes: int = 4 * MiB
    loss_one_stream: int = 32 * MiB
    loss_multi_bytes: int = 1 * MiB
    loss_percent: float = 1.0
    runs: int = 3
    #: Runs of scenarios 7 and 7loss (the 50 ms path: one run swings by a third).
    wan_runs: int = 3
    pg_scale: int = 5
    #: Seconds of each pgbench phase: at 5 s one target's select-only rate with 1 client
    #: ranged 2.7x between the runs of one invocation on a shared 2-core machine.
    pg_seconds: float = 10.0
    #: Runs of scenario 8: a pgbench rate with one client swings about 2x between runs of one
    #: invocation (CPU placement of four processes on two cores), more than any other figure.
    pg_runs: int = 5

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            one_stream=8 * MiB,
            multi_streams=8,
            multi_bytes=1 * MiB,
            rtt_count=300,
            rtt_warmup=30,
            bulk_streams=2,
            bulk_seconds=2.0,
            connrate_seconds=1.0,
            connrate_procs=1,
            connrate_workers=8,
            idle_streams=200,
            wan_one_stream=8 * MiB,
            wan_multi_streams=10,
            wan_multi_bytes=1 * MiB,
            loss_one_stream=4 * MiB,
            loss_multi_bytes=512 * 1024,
            runs=1,
            wan_runs=1,
            pg_scale=1,
            pg_seconds=1.0,
            pg_runs=1,
        )


def size_text(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n // 1024} KiB"


@dataclass
class Outcome:
    """All runs of all scenarios: scenario id -> target key -> list of runs."""

    runs: dict[str, dict[str, list[Run]]] = field(default_factory=dict)
    errors: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    target_notes: dict[str, str] = field(default_factory=dict)

    def add(self, sid: str, key: str, run: Run) -> None:
        self.runs.setdefault(sid, {}).setdefault(key, []).append(run)

    def fail(self, sid: str, key: str, msg: str) -> None:
        self.errors.setdefault(sid, {}).setdefault(key, []).append(msg)

    def median(self, sid: str, key: str, metric: str) -> float | None:
        vals = [r[metric] for r in self.runs.get(sid, {}).get(key, []) if r.get(metric) is not None]
        return float(statistics.median(vals)) if vals else None

    def spread(self, sid: str, key: str, metric: str) -> tuple[float, float] | None:
        vals = [r[metric] for r in self.runs.get(sid, {}).get(key, []) if r.get(metric) is not None]
        return (float(min(vals)), float(max(vals))) if len(vals) > 1 else None


class Bench:
    """Runs scenarios against targets and prints progress lines."""

    def __init__(self, sizes: Sizes, workdir: Path, *, verify: bool, out: Outcome) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.verify = verify
        self.out = out
        self.t0 = time.monotonic()
        self._seq = itertools.count()
        #: With a directory, py-spy records the muxtunnel relay and client during each run.
        self.profile_dir: Path | None = None

    # -- output ---------------------------------------------------------------------------
    def progress(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    # -- processes ------------------------------------------------------------------------
    def start_service(self, layout: Layout) -> Child:
        host = "0.0.0.0" if layout.remote else "127.0.0.1"
        argv = [
            python(),
            "-m",
            "muxtunnel.benchsuite.service",
            "--host",
            host,
            "--max-seconds",
            "7200",
        ]
        if self.verify:
            argv.append("--verify")
        svc = Child(f"service{next(self._seq)}", argv, self.workdir, netns=layout.edge_ns)
        svc.wait_for(r"^listening \S+ \d+", 20)
        return svc

    def spawn_load(self, target: Target, mode: str, *args: str, stdin: bool = False) -> Child:
        argv = [
            python(),
            "-m",
            "muxtunnel.benchsuite.load",
            mode,
            "--host",
            target.host,
            "--port",
            str(target.port),
            *args,
        ]
        return Child(
            f"load{next(self._seq)}-{mode}-{target.key}",
            argv,
            self.workdir,
            netns=target.visitor_ns,
            stdout_pipe=True,
            stdin_pipe=stdin,
        )

    def load(self, target: Target, mode: str, *args: str, timeout: float) -> Run:
        child = self.spawn_load(target, mode, *args)
        try:
            return self._result(child, timeout)
        finally:
            child.stop()

    @staticmethod
    def _result(child: Child, timeout: float) -> Run:
        while True:
            obj = child.read_json_line(timeout)
            if "error" in obj:
                raise BenchError(str(obj["error"]))
            if "result" in obj:
                res: Run = obj["result"]
                return res

    def _verify_args(self) -> list[str]:
        return ["--verify"] if self.verify else []

    # -- scenarios ------------------------------------------------------------------------
    def s_one_stream(self, t: Target, amount: int) -> Run:
        timeout = 60 + amount / 5e6
        put = self.load(t, "put", "--bytes", str(amount), *self._verify_args(), timeout=timeout)
        get = self.load(t, "get", "--bytes", str(amount), *self._verify_args(), timeout=timeout)
        run: Run = {
            "put_mbps": put["mbps"],
            "get_mbps": get["mbps"],
            "put_s": put["seconds"],
            "get_s": get["seconds"],
        }
        fresh = t.fresh_relay_rss
        if fresh:
            # Buffers of the transfer should be given back once it is over.
            time.sleep(1.0)
            after = t.relay_rss()
            if after:
                run["relay_rss_after_mb"] = after / 1e6
                run["relay_rss_growth"] = after / fresh
        return run

    def s_pgbench(self, t: Target, server: Any) -> Run:
        """pgbench select-only (1 and 8 clients) and TPC-B-like through *t* (scenario 8)."""
        from muxtunnel.benchsuite.pg import CASES

        run: Run = {}
        for case in CASES:
            run.update(server.run(t.port, case, self.sizes.pg_seconds))
        return run

    def s_multi(self, t: Target, streams: int, amount: int) -> Run:
        timeout = 60 + streams * amount / 5e6
        r = self.load(
            t,
            "multi",
            "--streams",
            str(streams),
            "--bytes",
            str(amount),
            *self._verify_args(),
            timeout=timeout,
        )
        return {"mbps": r["mbps"], "seconds": r["seconds"], "fairness": r["fairness"]}

    def s_rtt(self, t: Target) -> Run:
        s = self.sizes
        r = self.load(
            t,
            "rtt",
            "--count",
            str(s.rtt_count),
            "--warmup",
            str(s.rtt_warmup),
            "--max-seconds",
            "60",
            timeout=120,
        )
        return {k: r[k] for k in ("p50_us", "p99_us", "max_us", "mean_us", "samples")}

    def s_path_rtt(self, t: Target) -> Run:
        """A few round trips, to show the delay line works (about 50 ms plus the tunnel)."""
        r = self.load(t, "rtt", "--count", "20", "--warmup", "2", "--max-seconds", "20", timeout=60)
        return {"rtt_p50_ms": r["p50_us"] / 1000.0}

    def s_rtt_bulk(self, t: Target) -> Run:
        s = self.sizes
        bulk = self.spawn_load(
            t, "bulk", "--streams", str(s.bulk_streams), "--duration", str(s.bulk_seconds)
        )
        rtt: Child | None = None
        try:
            ev = bulk.read_json_line(30)
            if "error" in ev:
                raise BenchError(str(ev["error"]))
            # How much of the tunnel's time went to waiting for a CPU while the round trips ran:
            # with every core busy, a round trip waits wherever a tunnel process is preempted.
            sched0, t0 = t.sched_times(), time.monotonic()
            rtt = self.spawn_load(
                t,
                "rtt",
                "--count",
                str(s.rtt_count),
                "--warmup",
                "20",
                "--start-delay",
                "0.5",
                "--max-seconds",
                str(max(0.5, s.bulk_seconds - 1.5)),
            )
            r = self._result(rtt, s.bulk_seconds + 60)
            sched1, t1 = t.sched_times(), time.monotonic()
            b = self._result(bulk, s.bulk_seconds + 60)
        finally:
            if rtt is not None:
                rtt.stop()
            bulk.stop()
        run: Run = {
            "p50_us": r["p50_us"],
            "p99_us": r["p99_us"],
            "max_us": r["max_us"],
            "samples": r["samples"],
            "bulk_mbps": b["mbps"],
        }
        if sched0 is not None and sched1 is not None and t1 > t0:
            # Milliseconds per second of wall time, summed over the tunnel's processes.
            run["tunnel_cpu_ms_s"] = (sched1[0] - sched0[0]) / 1e6 / (t1 - t0)
            run["tunnel_wait_ms_s"] = (sched1[1] - sched0[1]) / 1e6 / (t1 - t0)
        return run

    def s_connrate(self, t: Target) -> Run:
        s = self.sizes
        kids = [
            self.spawn_load(
                t,
                "connrate",
                "--duration",
                str(s.connrate_seconds),
                "--workers",
                str(s.connrate_workers),
                "--max",
                "30000",
                "--timeout",
                "10",
            )
            for _ in range(s.connrate_procs)
        ]
        try:
            rs = [self._result(k, s.connrate_seconds + 60) for k in kids]
        finally:
            for k in kids:
                k.stop()
        done = sum(r["connections"] for r in rs)
        secs = max(r["seconds"] for r in rs)
        errors = sum(r["errors"] for r in rs)
        run: Run = {
            "per_second": done / secs,
            "connections": done,
            "errors": errors,
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
        }
        if errors:
            first = next(r["first_error"] for r in rs if r["first_error"])
            raise BenchError(
                f"{errors} of {done + errors} connections failed ({first}); "
                f"{done / secs:.0f} conn/s otherwise"
            )
        return run

    def s_idle(self, t: Target) -> Run:
        s = self.sizes
        time.sleep(0.5)
        relay0, client0 = t.relay_rss(), t.client_rss()
        if relay0 is None or client0 is None:
            raise BenchError("no relay/client process to measure")
        # ssh -R is only the reference here and opens 10,000 channels slowly: shorter limit.
        limit = s.idle_seconds if t.key == "muxtunnel" else s.idle_seconds_reference
        kid = self.spawn_load(
            t,
            "idle",
            "--count",
            str(s.idle_streams),
            "--workers",
            "16",
            "--max-seconds",
            str(limit),
            "--timeout",
            "30",
            stdin=True,
        )
        try:
            ev = kid.read_json_line(180)
            if "error" in ev:
                raise BenchError(str(ev["error"]))
            time.sleep(1.0)
            relay1, client1 = t.relay_rss() or 0, t.client_rss() or 0
            kid.stdin.write(b"close\n")
            kid.stdin.flush()
            r = self._result(kid, 120)
        finally:
            kid.stop()
        opened = int(ev["opened"])
        run: Run = {
            "requested": s.idle_streams,
            "opened": opened,
            "failures": int(r["failures"]),
            "open_seconds": float(ev["seconds"]),
            "relay_rss_before": relay0,
            "relay_rss_after": relay1,
            "client_rss_before": client0,
            "client_rss_after": client1,
            "relay_per_stream": (relay1 - relay0) / opened if opened else None,
            "client_per_stream": (client1 - client0) / opened if opened else None,
        }
        if ev.get("time_limited"):
            run["note"] = f"stopped opening after {limit:g} s: {opened} open"
        if not r["failures"] and r["alive_checked"] < r["alive_sampled"]:
            run["error"] = (
                f"only {r['alive_checked']} of {r['alive_sampled']} sampled idle streams "
                "still echoed after the RSS reading"
            )
        if r["failures"]:
            run["error"] = f"{r['failures']} streams failed: {r['first_failure']}"
        return run

    # -- driver ---------------------------------------------------------------------------
    def start_targets(
        self, keys: list[str], layout: Layout, service_port: int, where: str
    ) -> list[Target]:
        started: list[Target] = []
        for key in keys:
            t = make_target(key, layout, service_port, self.workdir)
            self.progress(f"starting {t.label} ({where})")
            try:
                t.start()
            except (BenchError, OSError) as exc:
                t.stop()
                msg = f"{t.label} ({where}) could not start: {exc}"
                self.progress("  " + msg)
                self.out.fail("setup", key, msg)
                continue
            with contextlib.suppress(OSError):
                t.fresh_relay_rss = t.relay_rss()
            if t.note:
                self.out.target_notes[f"{key}@{where}"] = t.note
                self.progress(f"  {t.note}")
            started.append(t)
        return started

    def run_one(self, sid: str, t: Target, label: str, fn: Any, *args: Any) -> None:
        if not t.alive():
            self.out.fail(sid, t.key, f"{t.label} is no longer running")
            self.progress(f"{label:<34} {t.label:<20} SKIPPED (target died)")
            return
        spies = self._start_profilers(sid, t, label)
        try:
            run: Run = fn(t, *args)
        except (BenchError, OSError) as exc:
            self.out.fail(sid, t.key, str(exc))
            self.progress(f"{label:<34} {t.label:<20} FAILED: {exc}")
            return
        finally:
            self._stop_profilers(spies)
        if run.get("error"):
            self.out.fail(sid, t.key, str(run.pop("error")))
        if run.get("note"):
            self.out.notes.append(f"scenario {sid}, {t.label}: {run.pop('note')}")
        self.out.add(sid, t.key, run)
        shown = ", ".join(
            f"{k}={_fmt(v)}"
            for k, v in run.items()
            if k not in ("error",) and not k.endswith(("_before", "_after"))
        )
        self.progress(f"{label:<34} {t.label:<20} {shown}")

    def _start_profilers(self, sid: str, t: Target, label: str) -> list[Child]:
        profiled = t.key == "muxtunnel" or connections_of(t.key) is not None
        if self.profile_dir is None or not profiled or len(t.children) < 2:
            return []
        spy = shutil.which("py-spy") or str(Path(python()).with_name("py-spy"))
        if not Path(spy).exists():
            return []
        run_no = label.split()[2].split("/")[0] if len(label.split()) > 2 else "1"
        spies = []
        for role, child in (("relay", t.children[0]), ("client", t.children[1])):
            out = self.profile_dir / f"s{sid}-run{run_no}-{t.key}-{role}.txt"
            spies.append(
                Child(
                    f"py-spy-{sid}-{role}-{next(self._seq)}",
                    [
                        spy,
                        "record",
                        "--nonblocking",
                        "-r",
                        "100",
                        "-f",
                        "raw",
                        "-o",
                        str(out),
                        "-p",
                        str(child.pid),
                    ],
                    self.workdir,
                )
            )
        return spies

    @staticmethod
    def _stop_profilers(spies: list[Child]) -> None:
        for spy in spies:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.proc.wait(10)
            spy.stop()

    def scenario(
        self, sid: str, title: str, targets: list[Target], fn: Any, *args: Any, runs: int
    ) -> None:
        self.out.titles[sid] = title
        self.progress(f"== {sid}: {title}")
        for i in range(runs):
            for t in targets:
                self.run_one(sid, t, f"{sid} run {i + 1}/{runs}", fn, *args)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def stop_targets(targets: list[Target]) -> None:
    for t in targets:
        with contextlib.suppress(Exception):
            t.stop()
