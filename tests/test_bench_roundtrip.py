"""The round-trip benchmarks in benchmarks/ still run end to end and measure something."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_benchmark_measures_real_round_trips() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_roundtrip.py"),
            "--rounds",
            "40",
            "--concurrency",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.fullmatch(r"CPU per round trip: ([0-9.]+) us \(median of 5\)\n", out.stdout)
    assert match is not None, out.stdout
    # A round trip through two splices, two sessions and TLS both ways is real work.
    assert 10.0 < float(match.group(1)) < 1_000_000.0


def test_cpu_per_round_trip_reads_the_tunnel_processes() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "cpu_per_roundtrip.py"),
            "--targets",
            "muxtunnel",
            "--clients",
            "2",
            "--count",
            "200",
            "--runs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(
        r"^muxtunnel +(\d+) round trips/s +CPU +([0-9.]+) us per round trip", out.stdout, re.M
    )
    assert match is not None, out.stdout
    assert int(match.group(1)) > 0
    # Two processes, TLS both ways: a round trip costs the tunnel some CPU.
    assert float(match.group(2)) > 1.0
