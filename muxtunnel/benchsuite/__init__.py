"""``muxtunnel bench``: muxtunnel side by side with direct TCP and OpenSSH ``ssh -N -R``.

Scenarios: 1 one-stream bulk up/down, 2 many concurrent streams, 3 idle 64-byte
round trips, 4 round trips while bulk streams saturate the tunnel, 5 new connections per second,
6 RSS with many idle streams, 7 the same bulk transfers over a 50 ms RTT path (two network
namespaces and a userspace delay line), 7loss the same path with 1% loss, 8 a real client:
pgbench against a throwaway PostgreSQL (select-only with 1 and 8 clients, TPC-B-like with 8).
Scenarios 7 and 7loss also run ``muxtunnel client --connections N`` (target ``muxtunnel-conns``)
unless ``--targets`` is given.

Every process runs separately: the service (sink/source/echo), each load generator, the relay,
the tunnel client, sshd and ssh, so none shares a GIL with another.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from muxtunnel.benchsuite import report
from muxtunnel.benchsuite.netns import DelayPath, unavailable_reason
from muxtunnel.benchsuite.procs import BenchError, Child
from muxtunnel.benchsuite.runner import Bench, Outcome, Sizes, size_text, stop_targets
from muxtunnel.benchsuite.targets import (
    ALL_TARGETS,
    CEILING,
    CEILING_FLAGS,
    CONNS,
    CONNS_SCENARIOS,
    EXTRA_TARGETS,
    Layout,
    connections_of,
    is_target,
    sshd_available,
)

__all__ = ["main"]

#: Scenario ids; 7loss is scenario 7's path with random loss.
ALL_SCENARIOS = ("1", "2", "3", "4", "5", "6", "7", "7loss", "8")
LOOPBACK_SCENARIOS = ("1", "2", "3", "4", "5", "6")
#: Failures of these targets make the exit status non-zero (ssh is only a reference).
STRICT_TARGETS = ("direct", "muxtunnel")


#: Targets scenario 6 (idle streams, memory) leaves out.
_NOT_IN_IDLE = ("direct", *CEILING_FLAGS)


def _strict(key: str) -> bool:
    """Whether a failure of target *key* fails the run (muxtunnel in any form, or direct)."""
    return key in STRICT_TARGETS or key == "bench" or connections_of(key) is not None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="muxtunnel bench",
        description="Benchmark muxtunnel against direct TCP and ssh -R (scenarios 1-8).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run (< 60 s, no network namespaces); fails on wrong bytes",
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help="comma-separated scenario ids out of 1,2,3,4,5,6,7,7loss,8, e.g. 1,3,5 or 7,7loss "
        "(7loss: the 50 ms path with 1%% loss; default: all; --quick: 1-6)",
    )
    p.add_argument(
        "--targets",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: all of them, plus "
        f"{CONNS} in scenarios 7 and 7loss and {CEILING}, the bare TLS relay of "
        "muxtunnel.benchsuite.ceiling, in scenarios 1-5 and 8); also muxtunnel-ref: another "
        "tree named by MUXTUNNEL_BENCH_REF=PYTHON:SOURCE_ROOT, muxtunnel-noresume: this tree "
        f"with --resume-window 0 at both ends, {CONNS} / {CONNS}N: the client with "
        "--connections 4 / N (2-16), for A/B runs, and ceiling-tcp: the bare relay without TLS",
    )
    p.add_argument(
        "--wan-runs",
        type=int,
        default=None,
        metavar="N",
        help="runs of scenarios 7 and 7loss, medians reported (default 3; --quick 1)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help="runs per loopback scenario, medians reported (default 3, scenario 8: 5; --quick 1)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CRC-check every byte (default: on with --quick, off otherwise)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write all results")
    p.add_argument(
        "--png", type=Path, default=None, metavar="FILE", help="write a chart (needs matplotlib)"
    )
    p.add_argument(
        "--write-results",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the markdown results file (benchmarks/RESULTS.md)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy the muxtunnel relay and client during every run (raw stacks into DIR)",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=None,
        metavar="N",
        help="scenario 2 with N concurrent streams instead of 100 (--quick: 8)",
    )
    p.add_argument(
        "--stream-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="scenario 2: bytes per stream (default 10 MiB; --quick 1 MiB)",
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: print and write outputs from an earlier --json file",
    )
    return p


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    """SIGTERM/SIGHUP (and SIGINT, even when started in the background) unwind cleanly.

    The ``finally`` blocks and atexit hooks then stop every child by PID and delete the
    network namespaces.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, _interrupt)


def _raise_nofile(want: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        if hard != resource.RLIM_INFINITY and hard < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root only
            soft, hard = want, want
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return str(soft)


def _parse_list(text: str, allowed: Any) -> list[str]:
    """The comma-separated items of *text*; *allowed*: a tuple or a predicate."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    ok = allowed if callable(allowed) else allowed.__contains__
    bad = [x for x in items if not ok(x)]
    if bad:
        shown = list(allowed) if isinstance(allowed, tuple) else "see --help"
        raise SystemExit(f"muxtunnel bench: unknown choice(s) {bad}; allowed {shown}")
    return items


def _target_keys(chosen: str | None) -> tuple[list[str], list[str]]:
    """(targets for the loopback and pgbench scenarios, targets for scenarios 7 and 7loss)."""
    if chosen is None:
        wan = [*ALL_TARGETS]
        wan.insert(wan.index("muxtunnel") + 1, CONNS)
        return [*ALL_TARGETS, CEILING], wan
    items = _parse_list(chosen, is_target)
    order = [*ALL_TARGETS, *EXTRA_TARGETS]
    keys = sorted(dict.fromkeys(items), key=lambda k: _target_rank(k, order))
    return keys, keys


def _target_rank(key: str, order: list[str]) -> tuple[int, int]:
    n = connections_of(key)
    if n is not None:  # the striped clients right after muxtunnel, by connection count
        return order.index("muxtunnel"), n
    return order.index(key), 0


def main(argv: list[str]) -> int:
    """Run the benchmark suite; returns the process exit status (0 = muxtunnel behaved)."""
    args = _parser().parse_args(argv)
    if args.render is not None:
        return _render(args)
    _install_signal_handlers()
    quick: bool = args.quick
    sizes = Sizes.quick() if quick else Sizes()
    if args.runs is not None:
        if args.runs < 1:
            raise SystemExit("muxtunnel bench: --runs must be >= 1")
        sizes = dataclasses.replace(sizes, runs=args.runs, pg_runs=args.runs)
    if args.streams is not None:
        if args.streams < 1:
            raise SystemExit("muxtunnel bench: --streams must be >= 1")
        sizes = dataclasses.replace(sizes, multi_streams=args.streams)
    if args.stream_bytes is not None:
        if args.stream_bytes < 1:
            raise SystemExit("muxtunnel bench: --stream-bytes must be >= 1")
        sizes = dataclasses.replace(sizes, multi_bytes=args.stream_bytes)
    if args.wan_runs is not None:
        if args.wan_runs < 1:
            raise SystemExit("muxtunnel bench: --wan-runs must be >= 1")
        sizes = dataclasses.replace(sizes, wan_runs=args.wan_runs)
    default_sc = ",".join(LOOPBACK_SCENARIOS if quick else ALL_SCENARIOS)
    scenarios = _parse_list(args.scenarios or default_sc, ALL_SCENARIOS)
    keys, wan_keys = _target_keys(args.targets)
    verify = quick if args.verify is None else bool(args.verify)
    out = Outcome()
    nofile = _raise_nofile(65536)
    workdir = Path(tempfile.mkdtemp(prefix="muxbench-"))
    bench = Bench(sizes, workdir, verify=verify, out=out)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        bench.profile_dir = args.profile.resolve()
    command = "muxtunnel bench " + shlex.join(argv)
    started = time.monotonic()
    s = sizes
    bench.progress(
        f"muxtunnel bench: scenarios {scenarios}, targets {keys}"
        + (f" (7/7loss: {wan_keys})" if wan_keys != keys else "")
        + f", runs {s.runs}, "
        f"verify {'on' if verify else 'off'}, logs in {workdir}"
    )
    out.notes.append(
        f"RLIMIT_NOFILE raised to {nofile} in the bench process before any child starts, so "
        "the relay, the tunnel client, sshd/ssh, the service and the load generators inherit it "
        "(scenario 6 needs about 2 descriptors per stream in each of them)."
    )
    out.notes.append(
        "Every byte checked with CRC-32 (service and load generators)."
        if verify
        else "Byte counts checked on every transfer; CRC-32 checks off (--verify)."
    )
    why_ssh = sshd_available()
    if why_ssh and any(k.startswith("ssh") for k in keys):
        out.notes.append(f"ssh -R skipped: {why_ssh}")
        bench.progress(f"NOTE: ssh -R skipped: {why_ssh}")
        keys = [k for k in keys if not k.startswith("ssh")]
        wan_keys = [k for k in wan_keys if not k.startswith("ssh")]

    titles = {
        1: f"one stream, {size_text(s.one_stream)} up (visitor->service, timed to the sink's ack) "
        f"and {size_text(s.one_stream)} down",
        2: f"{s.multi_streams} concurrent streams x {size_text(s.multi_bytes)} up "
        "(aggregate MB/s, connects included, total time, first/last finish)",
        3: f"64-byte round trips on one stream, idle tunnel: {s.rtt_count} after "
        f"{s.rtt_warmup} warm-up (TCP_NODELAY at both ends)",
        4: f"64-byte round trips while {s.bulk_streams} bulk streams saturate the same tunnel "
        f"for {s.bulk_seconds:g} s (sampled from 0.5 s after the bulk starts, up to "
        f"{s.rtt_count} samples)",
        5: f"new tunnelled connections per second (connect, 1-byte echo, the service closes first, the visitor sees EOF and closes) for "
        f"{s.connrate_seconds:g} s, {s.connrate_procs} generator process(es) x "
        f"{s.connrate_workers} threads",
        6: "relay and client RSS (VmRSS of the process tree, targets freshly restarted) before "
        f"and after opening {s.idle_streams} idle streams, each proven by a 1-byte echo",
        7: f"50 ms RTT path (two namespaces, userspace delay line 25 ms each way): one stream "
        f"{size_text(s.wan_one_stream)} up and down, {s.wan_multi_streams} streams x "
        f"{size_text(s.wan_multi_bytes)} up",
    }
    titles[8] = (
        f"pgbench against PostgreSQL (scale {s.pg_scale}, -T {s.pg_seconds:g} each): select-only "
        "(-S) with 1 client and with 8 clients (-j 2), and the TPC-B-like mix with 8 clients; "
        "tps without connection time"
    )
    loss_title = (
        f"the 50 ms RTT path of scenario 7 with {s.loss_percent:g}% random loss on each TUN "
        f"device's input (nftables): one stream {size_text(s.loss_one_stream)}, "
        f"{s.wan_multi_streams} streams x {size_text(s.loss_multi_bytes)}"
    )
    targets = []
    path: DelayPath | None = None
    try:
        local = [int(sc) for sc in scenarios if sc in LOOPBACK_SCENARIOS]
        if local:
            svc = bench.start_service(Layout())
            sport = int(svc.wait_for(r"^listening \S+ (\d+)", 5).group(1))
            targets = bench.start_targets(keys, Layout(), sport, "loopback")
            by = {t.key: t for t in targets}
            for sc in local:
                if sc == 6 and len(local) > 1:
                    # Fresh relay/client/sshd/ssh, so buffers kept from the bulk scenarios do not
                    # distort the before/after RSS.
                    stop_targets(targets)
                    targets = bench.start_targets(keys, Layout(), sport, "loopback, fresh for 6")
                    by = {t.key: t for t in targets}
                # Scenario 6 measures the tunnel's memory: nothing to learn from direct TCP or
                # the bare relay there.
                ts = [t for t in targets if not (sc == 6 and t.key in _NOT_IN_IDLE)]
                if sc == 1:
                    bench.scenario(
                        "1", titles[1], ts, bench.s_one_stream, s.one_stream, runs=s.runs
                    )
                elif sc == 2:
                    bench.scenario(
                        "2",
                        titles[2],
                        ts,
                        bench.s_multi,
                        s.multi_streams,
                        s.multi_bytes,
                        runs=s.runs,
                    )
                elif sc == 3:
                    bench.scenario("3", titles[3], ts, bench.s_rtt, runs=s.runs)
                elif sc == 4:
                    bench.scenario("4", titles[4], ts, bench.s_rtt_bulk, runs=s.runs)
                elif sc == 5:
                    bench.scenario("5", titles[5], ts, bench.s_connrate, runs=s.runs)
                elif sc == 6:
                    bench.scenario("6", titles[6], ts, bench.s_idle, runs=1)
            if "muxtunnel" in by and not by["muxtunnel"].alive():
                out.fail(
                    "setup",
                    "muxtunnel",
                    "muxtunnel exited during the loopback scenarios: "
                    + by["muxtunnel"].children[0].errors()[-400:],
                )
            stop_targets(targets)
            targets = []
            svc.stop()
        if "8" in scenarios:
            _pgbench(bench, keys, titles[8])
        wan = [sc for sc in scenarios if sc in CONNS_SCENARIOS]
        if quick and not wan:
            out.notes.append("scenario 7 (network namespaces) is not part of --quick")
        if wan:
            why = unavailable_reason()
            if why:
                out.notes.append(f"scenario 7 skipped: {why}")
                bench.progress(f"NOTE: scenario 7 skipped: {why}")
            else:
                path = DelayPath(workdir)
                bench.progress("setting up network namespaces and the 25 ms delay line")
                path.setup()
                layout = path.layout
                svc = bench.start_service(layout)
                sport = int(svc.wait_for(r"^listening \S+ (\d+)", 5).group(1))
                targets = bench.start_targets(wan_keys, layout, sport, "50ms path")
                if "7" in wan:
                    bench.scenario(
                        "7",
                        titles[7],
                        targets,
                        _wan,
                        bench,
                        path,
                        s.wan_one_stream,
                        s.wan_multi_streams,
                        s.wan_multi_bytes,
                        runs=s.wan_runs,
                    )
                if "7loss" in wan:
                    _loss_scenario(bench, path, targets, loss_title)
                out.notes.append(
                    "Scenario 7 uses smaller transfers than the loopback scenarios to stay "
                    "time-bounded (sizes in its title); slow start and window ramp-up are "
                    "included in every figure, for every target alike. Loss applies to both "
                    "directions; the same namespaces are reused."
                )
                stop_targets(targets)
                targets = []
                svc.stop()
    except KeyboardInterrupt:
        bench.progress("interrupted")
        out.notes.append("run interrupted")
    except BenchError as exc:
        bench.progress(f"ERROR: {exc}")
        out.fail("setup", "bench", str(exc))
    finally:
        stop_targets(targets)
        Child.stop_all()
        if path is not None:
            path.teardown()
    wall = time.monotonic() - started
    meta = {
        "command": command,
        "runs": s.runs,
        "quick": quick,
        "wall_seconds": wall,
        "machine": report.machine(),
        "sizes": dataclasses.asdict(s),
    }
    _emit_outputs(args, out, meta)
    bad = [
        (sid, k, e)
        for sid, per in out.errors.items()
        for k, es in per.items()
        for e in es
        if _strict(k)
    ]
    if "muxtunnel" in keys and not any("muxtunnel" in per for per in out.runs.values()):
        bad.append(("-", "muxtunnel", "no muxtunnel measurement succeeded"))
    if args.keep_logs or bad:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    for sid, k, e in bad:
        print(f"muxtunnel bench: FAILED: scenario {sid}, {k}: {e}", file=sys.stderr)
    print(f"done in {wall:.0f} s", flush=True)
    return 1 if bad else 0


def _emit_outputs(args: argparse.Namespace, out: Outcome, meta: dict[str, Any]) -> None:
    """Print the table and the verdicts; write --json, --png and --write-results."""
    print()
    print(report.table(out), flush=True)
    print()
    for c in report.checks(out):
        verdict = "n/a" if c.met is None else ("met" if c.met else "MISSED")
        print(f"  {verdict:>6}  {c.goal}: {c.measured}")
    for n in out.notes:
        print(f"  note: {n}")
    if args.json:
        report.write_json(args.json, out, meta)
        print(f"wrote {args.json}")
    if args.png:
        note = report.write_png(args.png, out)
        print(f"note: {note}" if note else f"wrote {args.png}")
    if args.write_results:
        kept = report.kept_analysis(args.write_results)
        args.write_results.write_text(report.results_md(out, meta, kept))
        print(f"wrote {args.write_results}")


def _render(args: argparse.Namespace) -> int:
    """Re-create the outputs from a saved --json file without measuring anything."""
    out, meta = report.from_json(args.render)
    _emit_outputs(args, out, meta)
    return 0


def _pgbench(bench: Bench, keys: list[str], title: str) -> None:
    """Scenario 8: every target forwards to one throwaway PostgreSQL server."""
    from muxtunnel.benchsuite import pg

    why = pg.unavailable_reason()
    if why:
        bench.out.notes.append(f"scenario 8 skipped: {why}")
        bench.progress(f"NOTE: scenario 8 skipped: {why}")
        return
    server = pg.PgServer()
    targets = []
    try:
        bench.progress(f"starting PostgreSQL and pgbench -i -s {bench.sizes.pg_scale}")
        server.start(bench.sizes.pg_scale)
        targets = bench.start_targets(keys, Layout(), server.port, "PostgreSQL")
        bench.scenario("8", title, targets, bench.s_pgbench, server, runs=bench.sizes.pg_runs)
    finally:
        stop_targets(targets)
        server.stop()


def _loss_scenario(bench: Bench, path: DelayPath, targets: list[Any], title: str) -> None:
    """Scenario 7loss: the 50 ms path with random loss on both TUN devices."""
    s = bench.sizes
    try:
        path.set_loss(s.loss_percent)
    except BenchError as exc:
        bench.out.notes.append(f"loss variant skipped: {exc}")
        return
    bench.scenario(
        "7loss",
        title,
        targets,
        _wan,
        bench,
        path,
        s.loss_one_stream,
        s.wan_multi_streams,
        s.loss_multi_bytes,
        runs=s.wan_runs,
    )
    path.clear_loss()


def _wan(t: Any, bench: Bench, path: DelayPath, one: int, streams: int, per: int) -> dict[str, Any]:
    r = bench.s_path_rtt(t)
    r.update(bench.s_one_stream(t, one))
    drops0, sched0 = path.tx_drops(), t.sched_times()
    r.update(bench.s_multi(t, streams, per))
    sched1 = t.sched_times()
    # Packets the delay line's input queues dropped (not the loss rule), and the tunnel's CPU
    # time per MB moved, both during the many-streams transfer.
    r["path_drops"] = path.tx_drops() - drops0
    if sched0 is not None and sched1 is not None:
        r["tunnel_cpu_ms_mb"] = (sched1[0] - sched0[0]) / 1e6 / (streams * per / 1e6)
    return r


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
