"""benchmarks/bench_roundtrip.py: the in-process round-trip benchmark still runs end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_benchmark_measures_real_round_trips() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_roundtrip.py"), "--rounds", "30"],
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
