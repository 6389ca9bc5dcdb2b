"""Turning an :class:`~muxtunnel.benchsuite.runner.Outcome` into a table, JSON, PNG, RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muxtunnel.benchsuite.targets import (
    CEILING,
    CEILING_FLAGS,
    CONNS,
    DEFAULT_CONNECTIONS,
    connections_of,
    label,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from muxtunnel.benchsuite.runner import Outcome

MUX = "muxtunnel"
SSH = "ssh"
SSH_AES = "ssh-aes128"
DIRECT = "direct"


@dataclass(frozen=True, slots=True)
class Row:
    sid: str
    metric: str
    label: str
    unit: str
    higher_is_better: bool


ROWS: tuple[Row, ...] = (
    Row("1", "put_mbps", "1 one stream up (put)", "MB/s", True),
    Row("1", "get_mbps", "1 one stream down (get)", "MB/s", True),
    Row("1", "relay_rss_growth", "1 relay RSS after the transfers / fresh", "ratio", False),
    Row("2", "mbps", "2 many streams aggregate", "MB/s", True),
    Row("2", "seconds", "2 many streams total time", "s", False),
    Row("2", "fairness", "2 first/last finish", "ratio", True),
    Row("3", "p50_us", "3 idle RTT p50", "us", False),
    Row("3", "p99_us", "3 idle RTT p99", "us", False),
    Row("4", "p50_us", "4 RTT under bulk p50", "us", False),
    Row("4", "p99_us", "4 RTT under bulk p99", "us", False),
    Row("4", "bulk_mbps", "4 bulk rate meanwhile", "MB/s", True),
    Row("4", "tunnel_cpu_ms_s", "4 tunnel processes on a CPU", "ms/s", False),
    Row("4", "tunnel_wait_ms_s", "4 tunnel processes waiting for a CPU", "ms/s", False),
    Row("5", "per_second", "5 new connections", "conn/s", True),
    Row("6", "relay_per_stream", "6 relay RSS per idle stream", "B", False),
    Row("6", "client_per_stream", "6 client RSS per idle stream", "B", False),
    Row("6", "opened", "6 idle streams open", "streams", True),
    Row("7", "rtt_p50_ms", "7 50ms path RTT p50 (20 samples)", "ms", False),
    Row("7", "put_mbps", "7 50ms RTT one stream up", "MB/s", True),
    Row("7", "get_mbps", "7 50ms RTT one stream down", "MB/s", True),
    Row("7", "mbps", "7 50ms RTT many streams", "MB/s", True),
    Row("7", "tunnel_cpu_ms_mb", "7 tunnel CPU per MB, many streams", "ms/MB", False),
    Row("7", "path_drops", "7 delay-line queue drops, many streams", "packets", False),
    Row("7loss", "put_mbps", "7 +loss one stream up", "MB/s", True),
    Row("7loss", "get_mbps", "7 +loss one stream down", "MB/s", True),
    Row("7loss", "mbps", "7 +loss many streams", "MB/s", True),
    Row("7loss", "tunnel_cpu_ms_mb", "7 +loss tunnel CPU per MB, many streams", "ms/MB", False),
    Row("8", "select_c1_tps", "8 pgbench select-only 1 client", "tps", True),
    Row("8", "select_c8_tps", "8 pgbench select-only 8 clients", "tps", True),
    Row("8", "tpcb_c8_tps", "8 pgbench TPC-B-like 8 clients", "tps", True),
)

TARGET_ORDER = (
    "direct",
    "muxtunnel",
    "muxtunnel-ref",
    "muxtunnel-noresume",
    "ssh",
    "ssh-aes128",
    *CEILING_FLAGS,
)
REF = "muxtunnel-ref"
NORESUME = "muxtunnel-noresume"


def present_keys(out: Outcome) -> list[str]:
    """Targets with runs, in table order; ``muxtunnel --connections N`` right after muxtunnel."""
    seen = {k for d in out.runs.values() for k in d}
    conns = sorted(
        (k for k in seen if connections_of(k) is not None),
        key=lambda k: (connections_of(k) or 0, k != CONNS),
    )
    keys = [k for k in TARGET_ORDER if k in seen]
    at = keys.index(MUX) + 1 if MUX in keys else min(1, len(keys))
    return keys[:at] + conns + keys[at:]


def conns_key(out: Outcome) -> str | None:
    """The several-connections target the goals use: muxtunnel-conns, else muxtunnel-conns<4>."""
    seen = {k for d in out.runs.values() for k in d}
    for key in (CONNS, f"{CONNS}{DEFAULT_CONNECTIONS}"):
        if key in seen:
            return key
    return None


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rows_present(out: Outcome) -> list[Row]:
    return [
        r
        for r in ROWS
        if any(out.median(r.sid, k, r.metric) is not None for k in present_keys(out))
    ]


def table(out: Outcome, *, markdown: bool = False) -> str:
    """Medians per target plus muxtunnel's ratios to direct and to both ssh ciphers."""
    keys = present_keys(out)
    others = (DIRECT, SSH, SSH_AES, *(k for k in (REF, NORESUME, CEILING) if k in keys))
    head = ["scenario", "unit", *[label(k) for k in keys], "mux/direct", "mux/ssh", "mux/ssh-aes"]
    if REF in keys:
        head.append("mux/ref")
    if NORESUME in keys:
        head.append("mux/noresume")
    if CEILING in keys:
        head.append("mux/ceiling")
    striped = [k for k in keys if connections_of(k) is not None]
    for k in striped:
        head += [f"conns{connections_of(k)}/direct", f"conns{connections_of(k)}/mux"]
    body: list[list[str]] = []
    for r in rows_present(out):
        vals = {k: out.median(r.sid, k, r.metric) for k in keys}
        cells = [r.label, r.unit]
        for k in keys:
            cell = fmt(vals[k])
            if vals[k] is None and out.errors.get(r.sid, {}).get(k):
                cell = "FAIL"
            cells.append(cell)
        m = vals.get(MUX)
        pairs = [(m, vals.get(other)) for other in others]
        pairs += [(vals[k], vals.get(b)) for k in striped for b in (DIRECT, MUX)]
        for a, b in pairs:
            q = ratio(a, b)
            cells.append(f"{q:.2f}x" if q is not None else "-")
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    out_lines = [
        "  ".join(h.ljust(widths[i]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head))
    ]
    out_lines.append("  ".join("-" * w for w in widths))
    out_lines.extend(
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))
        for row in body
    )
    return "\n".join(out_lines)


@dataclass(frozen=True, slots=True)
class Check:
    goal: str
    measured: str
    value: float | None
    met: bool | None


def checks(out: Outcome) -> list[Check]:
    """Evaluate the performance targets (ratios from this same run)."""
    med = out.median
    res: list[Check] = []

    def add(goal: str, value: float | None, ok: bool | None, measured: str) -> None:
        res.append(Check(goal, measured, value, ok))

    def q(sid: str, metric: str, other: str, who: str = MUX) -> float | None:
        return ratio(med(sid, who, metric), med(sid, other, metric))

    def worst(*vals: float | None, low: bool = True) -> float | None:
        got = [v for v in vals if v is not None]
        if not got:
            return None
        return min(got) if low else max(got)

    def vs_ssh(goal: str, bound: float, at_least: bool, of: Callable[[str], float | None]) -> None:
        """A goal against ssh; the bare relay's figure (same run) is shown beside ours."""
        v, bare = of(MUX), of(CEILING)
        shown = fmt_ratio(v)
        if bare is not None:
            shown += f" (bare relay: {fmt_ratio(bare)})"
        add(goal, v, None if v is None else (v >= bound if at_least else v <= bound), shown)

    def rtt(sid: str, metric: str) -> Callable[[str], float | None]:
        def of(who: str) -> float | None:
            best_ssh = worst(med(sid, SSH, metric), med(sid, SSH_AES, metric))
            return ratio(med(sid, who, metric), best_ssh)

        return of

    vs_ssh(
        "one stream >= 1.0x ssh -R aes128-gcm (worse of up/down)",
        1.0,
        True,
        lambda w: worst(q("1", "put_mbps", SSH_AES, w), q("1", "get_mbps", SSH_AES, w)),
    )
    vs_ssh(
        "one stream >= 1.6x ssh -R default cipher (worse of up/down)",
        1.6,
        True,
        lambda w: worst(q("1", "put_mbps", SSH, w), q("1", "get_mbps", SSH, w)),
    )
    vs_ssh(
        "100 streams aggregate >= 1.5x ssh -R aes128-gcm",
        1.5,
        True,
        lambda w: q("2", "mbps", SSH_AES, w),
    )

    def pg_ratio(metric: str) -> Callable[[str], float | None]:
        return lambda who: q("8", metric, SSH_AES, who)

    vs_ssh("idle RTT p50 <= 1.5x ssh -R (the faster ssh)", 1.5, False, rtt("3", "p50_us"))
    vs_ssh("RTT p99 under bulk <= 0.3x ssh -R (the better ssh)", 0.3, False, rtt("4", "p99_us"))
    vs_ssh("RTT p50 under bulk <= 1.0x ssh -R (the better ssh)", 1.0, False, rtt("4", "p50_us"))
    v = worst(q("7", "put_mbps", DIRECT), q("7", "get_mbps", DIRECT))
    add(
        "50 ms RTT one stream >= 0.95x direct (worse of up/down)",
        v,
        None if v is None else v >= 0.95,
        fmt_ratio(v),
    )
    v = q("7", "mbps", DIRECT)
    add(
        "50 ms RTT 100 streams, one connection >= 0.9x direct",
        v,
        None if v is None else v >= 0.9,
        fmt_ratio(v),
    )
    striped = conns_key(out)
    for sid, what, goal in (
        ("7", "50 ms RTT 100 streams", 0.95),
        ("7loss", "50 ms RTT + 1% loss 100 streams", 0.8),
    ):
        v = None if striped is None else ratio(med(sid, striped, "mbps"), med(sid, DIRECT, "mbps"))
        shown = fmt_ratio(v)
        if v is not None and striped is not None:
            shown += f" (--connections {connections_of(striped)})"
        add(
            f"{what}, several connections >= {goal}x direct",
            v,
            None if v is None else v >= goal,
            shown,
        )
    v = med("6", MUX, "relay_per_stream")
    add(
        "relay RSS <= 16 KiB per idle stream",
        v,
        None if v is None else v <= 16384,
        "-" if v is None else f"{v / 1024:.1f} KiB",
    )
    opened = med("6", MUX, "opened")
    requested = med("6", MUX, "requested")
    failed = bool(out.errors.get("6", {}).get(MUX))
    if opened is not None and requested is not None and requested < 10000 and not failed:
        add(
            "10,000 idle streams open at once without error",
            opened,
            None,
            f"only {requested:.0f} requested in this run",
        )
    else:
        add(
            "10,000 idle streams open at once without error",
            opened,
            None if opened is None else (opened >= 10000 and not failed),
            "-" if opened is None else f"{opened:.0f} open" + (", errors" if failed else ""),
        )
    vs_ssh(
        "new tunnelled connections/s >= 1.0x ssh -R aes128-gcm",
        1.0,
        True,
        lambda w: q("5", "per_second", SSH_AES, w),
    )
    v = med("1", MUX, "relay_rss_growth")
    add(
        "relay RSS after the one-stream transfers within 25% of a fresh relay's",
        v,
        None if v is None else v <= 1.25,
        "-" if v is None else f"{v:.2f}x fresh",
    )
    for metric, what in (
        ("select_c1_tps", "select-only 1 client"),
        ("select_c8_tps", "select-only 8 clients"),
        ("tpcb_c8_tps", "TPC-B-like 8 clients"),
    ):
        vs_ssh(f"pgbench {what} >= 0.7x ssh -R aes128-gcm", 0.7, True, pg_ratio(metric))
    return res


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}x"


def checks_table(out: Outcome) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for c in checks(out):
        verdict = "not measured" if c.met is None else ("**met**" if c.met else "**missed**")
        lines.append(f"| {c.goal} | {c.measured} | {verdict} |")
    return "\n".join(lines)


def _cmd(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (r.stdout + r.stderr).strip()


def machine() -> dict[str, str]:
    """nproc, CPU model, kernel, Python/trio/OpenSSL/OpenSSH versions, TCP settings."""
    import trio

    import muxtunnel

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def sysctl(name: str) -> str:
        try:
            return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
        except OSError:
            return "?"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "openssh": _cmd(["ssh", "-V"]) if shutil.which("ssh") else "absent",
        "muxtunnel": muxtunnel.__version__,
        "tcp_congestion_control": sysctl("net.ipv4.tcp_congestion_control"),
        "tcp_wmem": sysctl("net.ipv4.tcp_wmem"),
        "tcp_rmem": sysctl("net.ipv4.tcp_rmem"),
        "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def to_json(out: Outcome, meta: dict[str, Any]) -> dict[str, Any]:
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for sid, per in out.runs.items():
        for key, runs in per.items():
            metrics = sorted({m for r in runs for m, v in r.items() if isinstance(v, int | float)})
            medians.setdefault(sid, {})[key] = {m: out.median(sid, key, m) for m in metrics}
    return {
        "meta": meta,
        "titles": out.titles,
        "runs": out.runs,
        "medians": medians,
        "errors": out.errors,
        "notes": out.notes,
        "target_notes": out.target_notes,
        "checks": [{"goal": c.goal, "value": c.value, "met": c.met} for c in checks(out)],
    }


def from_json(path: Path) -> tuple[Outcome, dict[str, Any]]:
    """Load what :func:`write_json` wrote."""
    from muxtunnel.benchsuite.runner import Outcome

    data = json.loads(path.read_text())
    out = Outcome(
        runs=data["runs"],
        errors=data["errors"],
        titles=data["titles"],
        notes=data["notes"],
        target_notes=data["target_notes"],
    )
    meta: dict[str, Any] = data["meta"]
    return out, meta


def write_json(path: Path, out: Outcome, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(to_json(out, meta), indent=2, sort_keys=True) + "\n")


def write_png(path: Path, out: Outcome) -> str | None:
    """Bar charts, one panel per table row; returns a note instead when matplotlib is absent."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'muxtunnel[bench]')"
    rows = rows_present(out)
    keys = present_keys(out)
    cols = 4
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    colors = {
        "direct": "#888888",
        "muxtunnel": "#1f77b4",
        "ssh": "#d62728",
        "ssh-aes128": "#ff7f0e",
        "muxtunnel-ref": "#17becf",
        "muxtunnel-noresume": "#9467bd",
        "ceiling": "#bcbd22",
        "ceiling-tcp": "#e377c2",
    }
    for ax, r in zip(axes.flat, rows, strict=False):
        vals = [out.median(r.sid, k, r.metric) or 0.0 for k in keys]
        ax.bar(
            [label(k).replace("ssh -R ", "ssh\n").replace(" --", "\n--") for k in keys],
            vals,
            color=[colors.get(k, "#2ca02c") for k in keys],
        )
        ax.set_title(
            f"{r.label}\n({r.unit or 'ratio'}, {'higher' if r.higher_is_better else 'lower'}"
            " is better)",
            fontsize=8,
        )
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


ANALYSIS_BEGIN = "<!-- analysis:begin (kept when the bench rewrites this file) -->"
ANALYSIS_END = "<!-- analysis:end -->"

REFERENCE = (
    "For scale, a reference run on this machine kind, on a quiet host, measured: direct "
    "4,430 MB/s one stream, RTT p50 70 us; `ssh -R` 554 MB/s (default) / 899 MB/s (aes128-gcm), "
    "100 streams 187 / 277 MB/s, RTT p50 130-145 us, RTT p99 under one bulk stream 3.2-4.6 ms; "
    "50 ms path: direct 57.6 MB/s one stream, 225 MB/s for 100 streams. This machine is shared "
    "with other jobs, so compare only the ratios taken in the same run (the load average at "
    "start is given above)."
)


def kept_analysis(path: Path) -> str:
    """The hand-written analysis block of an existing results file ("" if none)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    a, b = text.find(ANALYSIS_BEGIN), text.find(ANALYSIS_END)
    if a < 0 or b < a:
        return ""
    return text[a : b + len(ANALYSIS_END)]


def _runs_text(meta: dict[str, Any]) -> str:
    """``3 run(s)``, or ``3 run(s) (scenario 8: 5)`` when pgbench had its own count."""
    runs = meta["runs"]
    pg_runs = meta.get("sizes", {}).get("pg_runs", runs)
    return f"{runs} run(s)" + (f" (scenario 8: {pg_runs})" if pg_runs != runs else "")


def results_md(out: Outcome, meta: dict[str, Any], analysis: str = "") -> str:
    """The text of benchmarks/RESULTS.md (*analysis*: a kept hand-written block)."""
    m = meta["machine"]
    lines = [
        "# muxtunnel benchmark results",
        "",
        "Written by `muxtunnel bench --write-results` (muxtunnel/benchsuite). Every figure is the",
        f"median of {_runs_text(meta)} in one invocation, taken side by side with direct loopback",
        "TCP and OpenSSH `ssh -N -R` (default cipher and aes128-gcm@openssh.com) against the same",
        "service; ratios are muxtunnel / other from the same invocation. MB/s = 10^6 bytes/s.",
        "",
        "## Command",
        "",
        "```",
        meta["command"],
        "```",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPUs: {m['cpu']}; kernel {m['kernel']}",
        f"- Python {m['python']}, trio {m['trio']}, {m['openssl']}, {m['openssh']}",
        f"- muxtunnel {m['muxtunnel']}; TCP congestion control {m['tcp_congestion_control']}, "
        f"tcp_wmem `{m['tcp_wmem']}`, tcp_rmem `{m['tcp_rmem']}`",
        f"- load average at start {m['loadavg_at_start']}; taken {m['date']}; "
        f"wall time {meta['wall_seconds']:.0f} s",
        "",
        "## Targets",
        "",
        checks_table(out),
        "",
        "## Why targets are missed, and what would fix them",
        "",
        analysis
        or (
            f"{ANALYSIS_BEGIN}\n(Not written yet: profile evidence goes here; "
            f"see benchmarks/FINDINGS.md.)\n{ANALYSIS_END}"
        ),
        "",
        REFERENCE,
        "",
        "## All figures (medians)",
        "",
        table(out, markdown=True),
        "",
        "## Scenarios",
        "",
    ]
    for sid, title in out.titles.items():
        lines.append(f"- **{sid}**: {title}")
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in out.notes]
    for key, note in out.target_notes.items():
        lines.append(f"- {key}: {note}")
    errs = [(sid, k, e) for sid, per in out.errors.items() for k, es in per.items() for e in es]
    if errs:
        lines += ["", "## Failures in this run", ""]
        lines += [f"- scenario {sid}, {label(k)}: {e}" for sid, k, e in errs]
    spreads = []
    for r in rows_present(out):
        for k in present_keys(out):
            sp = out.spread(r.sid, k, r.metric)
            if sp:
                spreads.append(f"{r.label} / {label(k)}: {fmt(sp[0])}-{fmt(sp[1])}")
    if spreads:
        lines += ["", "## Spread (min-max over the runs)", ""]
        lines += [f"- {s}" for s in spreads]
    return "\n".join(lines) + "\n"
