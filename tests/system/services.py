"""Throwaway real services for the system tests: an OpenSSH server and a PostgreSQL cluster.

Both live entirely in temporary directories, listen on 127.0.0.1 on a free port, and never read
or change the system's configuration (no /etc/ssh, no system cluster, no service manager).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .harness import HarnessError, ManagedProcess, free_port

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "PostgresCluster",
    "SshServer",
    "find_postgres_bindir",
    "missing_postgres",
    "missing_ssh",
]

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def _find_sshd() -> str | None:
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("sshd")
    return str(Path(found).resolve()) if found else None


def missing_ssh() -> str | None:
    """Why the OpenSSH tests cannot run here, or None if they can."""
    missing = [name for name in ("ssh", "ssh-keygen") if shutil.which(name) is None]
    if _find_sshd() is None:
        missing.append("sshd")
    if missing:
        return f"OpenSSH not installed ({', '.join(missing)} missing; .ci/install-system-deps.sh installs it)"
    return None


def find_postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb, pg_ctl, postgres and psql."""
    needed = ("initdb", "pg_ctl", "postgres", "psql")

    def version_key(path: str) -> tuple[int, ...]:
        parts = Path(path).parent.name.split(".")
        return tuple(int(p) for p in parts if p.isdigit())

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True):
        if all(os.access(os.path.join(candidate, n), os.X_OK) for n in needed):
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(initdb).resolve().parent
        if all(os.access(bindir / n, os.X_OK) for n in needed):
            return bindir
    return None


def missing_postgres() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None if they can."""
    if find_postgres_bindir() is None:
        return (
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
            "(.ci/install-system-deps.sh installs them)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root but runuser is missing (needed to run postgres unprivileged)"
    return None


def _run(argv: Sequence[str], *, timeout: float, what: str, **kwargs: object) -> str:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{what} timed out after {timeout} s: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        raise HarnessError(
            f"{what} failed with exit status {proc.returncode}: {' '.join(argv)}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    out: str = proc.stdout
    return out


def _wait_banner(port: int, prefix: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
                sock.settimeout(2.0)
                if sock.recv(64).startswith(prefix):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------------------------
# OpenSSH


class SshServer:
    """A throwaway ``sshd -D -e -f CONFIG`` on 127.0.0.1 with its own host and user keys."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        sshd = _find_sshd()
        assert sshd is not None, "sshd not installed"
        self.sshd = sshd
        self.port = free_port()
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.user_key = self.dir / "id_ed25519"
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "sshd_config"
        self.pid_file = self.dir / "sshd.pid"
        self.proc: ManagedProcess | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Generate keys and config, validate it with ``sshd -t`` and start the daemon."""
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        _run(
            [*keygen, "-f", str(self.host_key), "-C", "muxtunnel-test-host"],
            timeout=30,
            what="ssh-keygen (host key)",
        )
        _run(
            [*keygen, "-f", str(self.user_key), "-C", "muxtunnel-test-user"],
            timeout=30,
            what="ssh-keygen (user key)",
        )
        shutil.copyfile(self.user_key.with_suffix(".pub"), self.authorized_keys)
        self.authorized_keys.chmod(0o600)
        self.known_hosts.touch()
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.pid_file}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "HostbasedAuthentication no",
                    "AllowAgentForwarding no",
                    "AllowTcpForwarding no",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "UseDNS no",
                    "PermitUserEnvironment no",
                    "MaxStartups 50:30:100",
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            # sshd insists on its privilege-separation directory when started as root.
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        _run([self.sshd, "-t", "-f", str(self.config)], timeout=30, what="sshd -t (config check)")
        self.proc = ManagedProcess("sshd", [self.sshd, "-D", "-e", "-f", str(self.config)])
        if not _wait_banner(self.port, b"SSH-2.0-", timeout):
            raise HarnessError(
                f"sshd did not answer with an SSH banner on 127.0.0.1:{self.port} within {timeout} s\n"
                f"{self.proc.describe()}"
            )

    def ssh_argv(self, port: int, *remote: str, extra: Sequence[str] = ()) -> list[str]:
        """An ``ssh`` command line to ``127.0.0.1:port`` that ignores every system/user config."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-T",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no",
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            "-o", "Compression=no",
            "-o", "ConnectTimeout=15",
            "-o", "LogLevel=ERROR",
            "-i", str(self.user_key),
            "-p", str(port),
            *extra,
            f"{self.user}@127.0.0.1",
            *remote,
        ]  # fmt: skip

    def describe(self) -> str:
        """sshd's output, for failure messages."""
        return self.proc.describe() if self.proc is not None else "sshd not started"

    def stop(self) -> None:
        """Stop the daemon (SIGTERM to its PID, SIGKILL after a grace period)."""
        if self.proc is not None:
            self.proc.close(grace=5.0)


# --------------------------------------------------------------------------------------------
# PostgreSQL


class PostgresCluster:
    """A throwaway cluster made by ``initdb`` and run by ``pg_ctl`` on 127.0.0.1."""

    def __init__(self) -> None:
        bindir = find_postgres_bindir()
        assert bindir is not None, "PostgreSQL not installed"
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to the invoking user, and
        # postgres must run as an unprivileged user who has to reach the data directory.
        self.root = Path(tempfile.mkdtemp(prefix="muxtunnel-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self.started = False
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.sockdir.mkdir()
        if self._as_user:
            pw = pwd.getpwnam("postgres")
            os.chown(self.sockdir, pw.pw_uid, pw.pw_gid)

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def start(self) -> None:
        """initdb + pg_ctl start (waits until the server accepts connections)."""
        _run(
            [
                *self._as_user,
                self._bin("initdb"),
                "-D", str(self.data),
                "-U", "postgres",
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=120,
            what="initdb",
            cwd=str(self.root),
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=20 -c shared_buffers=32MB"
        )
        try:
            _run(
                [
                    *self._as_user,
                    self._bin("pg_ctl"),
                    "-D", str(self.data),
                    "-l", str(self.logfile),
                    "-o", options,
                    "-w", "-t", "60",
                    "start",
                ],
                timeout=90,
                what="pg_ctl start",
                cwd=str(self.root),
            )  # fmt: skip
        except HarnessError as exc:
            raise HarnessError(f"{exc}\npostgres log:\n{self.log_tail()}") from None
        self.started = True

    def psql_argv(self, port: int, *args: str) -> list[str]:
        """``psql`` to 127.0.0.1:port as postgres, no psqlrc, stop on the first error."""
        return [
            self._bin("psql"),
            "-X",
            "-h", "127.0.0.1",
            "-p", str(port),
            "-U", "postgres",
            "-d", "postgres",
            "-v", "ON_ERROR_STOP=1",
            "-q", "-A", "-t",
            *args,
        ]  # fmt: skip

    def psql_env(self) -> dict[str, str]:
        """Environment for psql: no stray PG* settings, bounded connect timeout, no TLS."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "15"
        env["PGSSLMODE"] = "disable"
        return env

    def log_tail(self, n: int = 40) -> str:
        """The end of the server log."""
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        """``pg_ctl stop -m immediate``; SIGKILL our postmaster if that fails; remove the files."""
        try:
            if self.started:
                try:
                    _run(
                        [
                            *self._as_user,
                            self._bin("pg_ctl"),
                            "-D",
                            str(self.data),
                            "stop",
                            "-m",
                            "immediate",
                            "-w",
                            "-t",
                            "20",
                        ],
                        timeout=30,
                        what="pg_ctl stop",
                        cwd=str(self.root),
                    )
                except HarnessError:
                    pid_file = self.data / "postmaster.pid"
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        pid = int(pid_file.read_text().splitlines()[0])
                        os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
