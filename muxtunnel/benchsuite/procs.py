"""Child-process bookkeeping for the bench: start, wait for a line, measure RSS, stop by PID."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import muxtunnel


class BenchError(Exception):
    """The bench could not set something up or a measurement failed."""


def package_env() -> dict[str, str]:
    """Environment for child Pythons: unbuffered, and able to import this very package."""
    env = dict(os.environ)
    root = str(Path(muxtunnel.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def reference_tree() -> tuple[str, dict[str, str]] | None:
    """(python, environment) for the ``muxtunnel-ref`` target, from MUXTUNNEL_BENCH_REF.

    The variable reads ``PYTHON:SOURCE_ROOT`` (an interpreter and the directory holding the other
    tree's ``muxtunnel`` package), e.g. to compare a change with the code before it in one run.
    """
    spec = os.environ.get("MUXTUNNEL_BENCH_REF", "")
    if ":" not in spec:
        return None
    exe, root = spec.split(":", 1)
    env = dict(os.environ)
    env["PYTHONPATH"] = root
    env["PYTHONUNBUFFERED"] = "1"
    # ``python -m muxtunnel`` puts the working directory first on sys.path: run from a checkout,
    # it would import that checkout's package instead of SOURCE_ROOT's (Python >= 3.11).
    env["PYTHONSAFEPATH"] = "1"
    return exe, env


def netns_prefix(netns: str | None) -> list[str]:
    """Command prefix that runs a program inside *netns* (``ip netns exec`` execs in place)."""
    return ["ip", "netns", "exec", netns] if netns else []


class Child:
    """One started process whose stdout/stderr go to files (so pipes never fill up)."""

    _all: list[Child] = []  # noqa: RUF012 - registry for the atexit cleanup

    def __init__(
        self,
        name: str,
        argv: list[str],
        logdir: Path,
        *,
        netns: str | None = None,
        stdin_pipe: bool = False,
        stdout_pipe: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = netns_prefix(netns) + argv
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._out,
            stderr=self._err,
            env=package_env() if env is None else env,
        )
        self.pid = self.proc.pid
        Child._all.append(self)

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def output(self) -> str:
        """Everything the process printed on stdout so far (file mode only)."""
        return self.out_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(
        self, regex: str, timeout: float, *, stderr: bool = False, watch: Child | None = None
    ) -> re.Match[str]:
        """Wait until stdout (or stderr) matches *regex*; raise BenchError on exit or timeout.

        With *watch*, also give up as soon as that other process has exited.
        """
        pat = re.compile(regex, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            text = self.errors() if stderr else self.output()
            m = pat.search(text)
            if m:
                return m
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before printing {regex!r}; "
                    f"stderr: {self.errors()[-600:].strip()}"
                )
            if watch is not None and watch.proc.poll() is not None:
                raise BenchError(
                    f"{watch.name} exited with {watch.proc.returncode} while waiting for "
                    f"{self.name}; its stderr: {watch.errors()[-600:].strip()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name}: no {regex!r} within {timeout:.0f} s; "
                    f"stderr: {self.errors()[-600:].strip()}"
                )
            time.sleep(0.02)

    def read_json_line(self, timeout: float) -> dict[str, Any]:
        """Read the next JSON line from a piped stdout (load generators)."""
        assert self.proc.stdout is not None
        stream = self.proc.stdout
        deadline = time.monotonic() + timeout
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(stream, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name}: no output within {timeout:.0f} s")
                if sel.select(min(left, 1.0)):
                    line = stream.readline()
                    if not line:
                        raise BenchError(
                            f"{self.name} exited ({self.proc.wait()}) without a "
                            f"result; stderr: {self.errors()[-800:].strip()}"
                        )
                    with contextlib.suppress(ValueError):
                        obj: dict[str, Any] = json.loads(line)
                        return obj

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        """Stop this process (and any descendants it left) by PID: SIGTERM, then SIGKILL."""
        if self in Child._all:
            Child._all.remove(self)
        kids = descendants(self.pid) if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for f in (self._out, self._err):
            f.close()
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()

    @classmethod
    def stop_all(cls) -> None:
        for child in reversed(list(cls._all)):
            with contextlib.suppress(Exception):
                child.stop(grace=2.0)


atexit.register(Child.stop_all)


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # the comm field may contain spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of *pid* (children first found, breadth-first)."""
    ppids = _ppid_map()
    kids: dict[int, list[int]] = {}
    for child, parent in ppids.items():
        kids.setdefault(parent, []).append(child)
    out: list[int] = []
    todo = [pid]
    while todo:
        cur = todo.pop()
        for k in kids.get(cur, []):
            out.append(k)
            todo.append(k)
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_rss(pid: int) -> int:
    """VmRSS of *pid* plus all its descendants, in bytes."""
    return rss_bytes(pid) + sum(rss_bytes(p) for p in descendants(pid))


def _with_descendants(pids: list[int]) -> set[int]:
    return {p for root in pids for p in (root, *descendants(root))}


def sched_times(pids: list[int]) -> tuple[int, int] | None:
    """Nanoseconds on a CPU and runnable but waiting for one, summed over *pids* and their
    descendants (main threads, ``/proc/PID/schedstat``); None without any readable process."""
    cpu = wait = 0
    found = False
    for pid in _with_descendants(pids):
        try:
            fields = Path(f"/proc/{pid}/schedstat").read_text().split()
            cpu += int(fields[0])
            wait += int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        found = True
    return (cpu, wait) if found else None


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of *pids* and their descendants, all threads
    (``/proc/PID/stat``, clock-tick resolution); processes that are gone count 0."""
    user = system = 0
    for pid in _with_descendants(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def python() -> str:
    return sys.executable
