"""Scenario 8: a real client, ``pgbench`` against a throwaway PostgreSQL cluster.

The cluster is made by ``initdb`` and run by ``pg_ctl`` on 127.0.0.1 (as the ``postgres`` user when
the bench runs as root); ``pgbench -i`` fills it once, directly, and every target (direct TCP,
muxtunnel, ``ssh -R``) then forwards to the same server port.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from muxtunnel.benchsuite.procs import BenchError
from muxtunnel.benchsuite.targets import free_port

if TYPE_CHECKING:
    from collections.abc import Sequence

NEEDED = ("initdb", "pg_ctl", "postgres")


@dataclass(frozen=True, slots=True)
class PgbenchCase:
    """One pgbench invocation: a metric name, the extra arguments and the clients."""

    metric: str
    label: str
    args: tuple[str, ...]
    clients: int


#: select-only with 1 and 8 clients, and the default TPC-B-like mix with 8 clients.
CASES = (
    PgbenchCase("select_c1_tps", "select-only, 1 client", ("-S",), 1),
    PgbenchCase("select_c8_tps", "select-only, 8 clients", ("-S",), 8),
    PgbenchCase("tpcb_c8_tps", "TPC-B-like, 8 clients", (), 8),
)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path))


def bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding the server programs, if any."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if all((Path(cand) / n).exists() for n in NEEDED):
            return Path(cand)
    found = shutil.which("initdb")
    if found:
        d = Path(found).resolve().parent
        if all((d / n).exists() for n in NEEDED):
            return d
    return None


def unavailable_reason() -> str | None:
    """None when scenario 8 can run here, else why not."""
    found = bindir()
    if found is None:
        return "PostgreSQL server programs not found (initdb, pg_ctl, postgres)"
    if shutil.which("pgbench") is None and not (found / "pgbench").exists():
        return "pgbench not found"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root but runuser is missing"
    return None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "15"
    env["PGSSLMODE"] = "disable"
    return env


class PgServer:
    """initdb + pg_ctl start on 127.0.0.1:port; :meth:`stop` removes everything."""

    def __init__(self) -> None:
        found = bindir()
        if found is None:
            raise BenchError("PostgreSQL not installed")
        self.bindir = found
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="muxbench-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.as_user: list[str] = []
        self.started = False
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, argv: list[str], timeout: float, what: str) -> str:
        try:
            r = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                cwd=str(self.root),
                env=_env(),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"{what}: {exc}") from None
        if r.returncode != 0:
            raise BenchError(f"{what} exited {r.returncode}: {(r.stderr or r.stdout)[-400:]}")
        return r.stdout + r.stderr

    def pgbench(self) -> str:
        local = self.bindir / "pgbench"
        return str(local) if local.exists() else (shutil.which("pgbench") or "pgbench")

    def start(self, scale: int) -> None:
        """Create, start and fill (``pgbench -i -s scale``) the cluster."""
        b = self.bindir
        self._run(
            [*self.as_user, str(b / "initdb"), "-D", str(self.data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            120,
            "initdb",
        )  # fmt: skip
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40 "
            "-c shared_buffers=64MB"
        )
        self._run(
            [*self.as_user, str(b / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
             "-o", opts, "-w", "-t", "60", "start"],
            90,
            "pg_ctl start",
        )  # fmt: skip
        self.started = True
        self._run(
            [self.pgbench(), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p",
             str(self.port), "-U", "postgres", "postgres"],
            300,
            "pgbench -i",
        )  # fmt: skip

    def run(
        self, port: int, case: PgbenchCase, seconds: float, prefix: Sequence[str] = ()
    ) -> dict[str, float]:
        """One ``pgbench -T`` through 127.0.0.1:*port*; tps and mean latency.

        *prefix*: a command that runs pgbench (e.g. ``taskset -c 0``).
        """
        argv = [
            *prefix, self.pgbench(), *case.args, "-n", "-c", str(case.clients),
            "-j", str(min(case.clients, 2)), "-T", str(max(1, round(seconds))),
            "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres",
        ]  # fmt: skip
        text = self._run(argv, seconds + 60, f"pgbench {case.label}")
        m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
        if not m:
            raise BenchError(f"pgbench {case.label}: no tps in its output: {text[-300:]}")
        lat = re.search(r"latency average = ([0-9.]+) ms", text)
        failed = re.search(r"number of failed transactions: (\d+)", text)
        if failed and int(failed.group(1)):
            raise BenchError(f"pgbench {case.label}: {failed.group(1)} failed transactions")
        return {
            case.metric: float(m.group(1)),
            case.metric.replace("_tps", "_lat_ms"): float(lat.group(1)) if lat else -1.0,
        }

    def stop(self) -> None:
        """pg_ctl stop -m immediate (SIGKILL the postmaster if that fails); delete the files."""
        try:
            if self.started:
                try:
                    self._run(
                        [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data),
                         "stop", "-m", "immediate", "-w", "-t", "20"],
                        30,
                        "pg_ctl stop",
                    )  # fmt: skip
                except BenchError:
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
                        os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
