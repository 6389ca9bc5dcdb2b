"""The bench's per-process CPU accounting (``muxtunnel bench`` scenario 4 reports it, and
benchmarks/cpu_per_roundtrip.py), and the environment of its ``muxtunnel-ref`` target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from muxtunnel.benchsuite import procs
from muxtunnel.benchsuite.procs import cpu_times, sched_times

if TYPE_CHECKING:
    import pytest

#: CPU seconds the child burns before it says so.
BURN = 0.3

CHILD = f"""
import sys, time
end = time.process_time() + {BURN}
while time.process_time() < end:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def test_sched_times_sums_a_process_tree() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline().strip() == "burnt"
        alone = sched_times([child.pid])
        tree = sched_times([os.getpid()])
        assert alone is not None
        assert tree is not None
        # The child's main thread ran at least BURN seconds (schedstat counts nanoseconds).
        assert alone[0] >= BURN * 0.9e9
        # Our own tree includes the child as a descendant.
        assert tree[0] >= alone[0]
        assert alone[1] >= 0
        # User and system time of the same process, in seconds (clock ticks); the busy loop
        # asks the kernel for its CPU clock, so it is both.
        user, system = cpu_times([child.pid])
        assert user > 0
        assert user + system >= BURN * 0.8
        assert sum(cpu_times([os.getpid()])) >= user + system
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    # A process that is gone has nothing to read.
    assert sched_times([child.pid]) is None
    assert cpu_times([child.pid]) == (0.0, 0.0)


def test_the_reference_target_imports_the_reference_tree_from_inside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for the other tree: its package prints where it was imported from.
    package = tmp_path / "ref" / "muxtunnel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("print(__file__)\n")
    monkeypatch.setenv("MUXTUNNEL_BENCH_REF", f"{sys.executable}:{tmp_path / 'ref'}")
    found = procs.reference_tree()
    assert found is not None
    exe, env = found
    # Started from this checkout's root, as ``muxtunnel bench`` usually is.
    out = subprocess.run(
        [exe, "-m", "muxtunnel"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(out.stdout.strip()) == package / "__main__.py"
