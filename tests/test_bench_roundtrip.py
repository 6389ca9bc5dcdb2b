"""The round-trip benchmarks in benchmarks/ still run end to end and measure something."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_benchmark(script: str, *args: str) -> str:
    """Run ``benchmarks/<script> ARGS``; its standard output (it must exit 0)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize(
    ("args", "unit"),
    [
        # Two splices, two sessions and TLS both ways per round trip.
        (("--rounds", "40", "--concurrency", "4"), "round trip"),
        # The bare TLS relay in the tunnel's place.
        (("--ceiling", "--rounds", "40", "--concurrency", "2"), "round trip"),
        # Accept, OPEN/OPEN_ACK, dial, splice and close at both ends, and the visitor's connect.
        (("--connections", "--rounds", "20", "--concurrency", "2"), "connection"),
    ],
)
def test_round_trip_benchmark_measures_real_work(args: tuple[str, ...], unit: str) -> None:
    stdout = _run_benchmark("bench_roundtrip.py", *args)
    match = re.fullmatch(rf"CPU per {unit}: ([0-9.]+) us \(median of 5\)\n", stdout)
    assert match is not None, stdout
    assert 10.0 < float(match.group(1)) < 1_000_000.0


def test_round_trip_benchmark_counts_bytecodes_by_function() -> None:
    stdout = _run_benchmark("bench_roundtrip.py", "--rounds", "30", "--bytecodes", "5")
    lines = stdout.splitlines()
    total = re.fullmatch(r"bytecodes per round trip: ([0-9,]+)", lines[0])
    assert total is not None, stdout
    # Both tunnel ends, the splices, trio's loop: thousands of bytecodes per round trip.
    assert int(total.group(1).replace(",", "")) > 1000
    assert "muxtunnel" in lines[1]
    assert "trio" in lines[1]
    assert len(lines) == 2 + 5


@pytest.mark.parametrize(
    ("args", "unit", "least_us"),
    [
        # Two processes, TLS both ways: a round trip costs the tunnel some CPU.
        (("--clients", "2", "--count", "200"), "round trip", 1.0),
        # Accept, OPEN/OPEN_ACK, dial, splice and close on both ends: more per connection.
        (("--mode", "connrate", "--clients", "1", "--seconds", "1"), "connection", 10.0),
    ],
)
def test_cpu_per_operation_reads_the_tunnel_processes(
    args: tuple[str, ...], unit: str, least_us: float
) -> None:
    stdout = _run_benchmark("cpu_per_roundtrip.py", "--targets", "muxtunnel", "--runs", "1", *args)
    match = re.search(rf"^muxtunnel +(\d+) {unit}s/s +CPU +([0-9.]+) us per {unit}", stdout, re.M)
    assert match is not None, stdout
    assert int(match.group(1)) > 0
    assert float(match.group(2)) > least_us


def test_placement_measures_round_trips_on_one_cpu_and_free() -> None:
    stdout = _run_benchmark(
        "placement.py", "--targets", "direct,ceiling", "--count", "200", "--runs", "1"
    )
    lines = stdout.splitlines()
    assert lines[0] == "round trip p50 us, medians of 1 runs", stdout
    rows = {tuple(line.split()[:2]): float(line.split()[2]) for line in lines[1:]}
    assert set(rows) == {
        (target, placement) for target in ("direct", "ceiling") for placement in ("free", "one-cpu")
    }
    assert all(p50 > 0 for p50 in rows.values())
