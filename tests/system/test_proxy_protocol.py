"""A real PROXY protocol consumer behind the tunnel: nginx's stream module.

Real ``muxtunnel server`` and ``muxtunnel client --proxy-protocol v1|v2`` processes expose an
nginx ``stream`` server that listens with ``proxy_protocol``; nginx (a throwaway process with its
own config in a temporary directory) logs the address the header carried and proxies to a
local service. Visitors connect from 127.0.0.2 and 127.0.0.3, so the addresses nginx sees can
only have come from the header.

The PostgreSQL example: nginx also binds its upstream connection to the visitor's address
(``proxy_bind $proxy_protocol_addr``), so PostgreSQL's ``pg_hba.conf``, its connection log and
``inet_client_addr()`` see the visitor, not the client. On loopback this needs no
``transparent`` mode: 127.0.0.2 is a local address.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest

from .harness import (
    EchoServer,
    HarnessError,
    ManagedProcess,
    ProcessGroup,
    free_port,
    start_client,
    start_relay,
    wait_until,
)
from .services import PostgresCluster, missing_postgres

if TYPE_CHECKING:
    from collections.abc import Iterator

STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def _find_nginx() -> str | None:
    for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("nginx")


def missing_nginx() -> str | None:
    """Why nginx with its stream module cannot run here, or None if it can."""
    if _find_nginx() is None or not STREAM_MODULE.is_file():
        return (
            "nginx with the stream module is not installed (nginx, libnginx-mod-stream; "
            ".ci/install-system-deps.sh installs them)"
        )
    return None


_MISSING = missing_nginx()

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

#: What nginx logs per session: the header's source and destination, and the bytes received.
LOG_FORMAT = (
    "$proxy_protocol_addr:$proxy_protocol_port "
    "$proxy_protocol_server_addr:$proxy_protocol_server_port $bytes_received"
)


def _listening(port: int) -> bool:
    """True if something listens on 127.0.0.1:``port`` (read from /proc, no connection made)."""
    needle = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == needle and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


class Nginx:
    """A throwaway nginx (no daemon, no master process) with one stream server."""

    def __init__(self, group: ProcessGroup, workdir: Path, server_block: str) -> None:
        self.dir = workdir / f"nginx-{secrets.token_hex(4)}"
        self.dir.mkdir()
        self.port = free_port()
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        self.config = (
            "daemon off;\n"
            "master_process off;\n"
            f"pid {self.dir}/nginx.pid;\n"
            f"error_log {self.error_log} info;\n"
            f"load_module {STREAM_MODULE};\n"
            "events { worker_connections 64; }\n"
            "stream {\n"
            f"    log_format pp '{LOG_FORMAT}';\n"
            "    server {\n"
            f"        listen 127.0.0.1:{self.port} proxy_protocol;\n"
            f"        access_log {self.access_log} pp;\n"
            f"{server_block}"
            "    }\n"
            "}\n"
        )
        conf = self.dir / "nginx.conf"
        conf.write_text(self.config)
        nginx = _find_nginx()
        assert nginx is not None
        argv = [nginx, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(conf)]
        self.proc: ManagedProcess = group.start("nginx", argv, cwd=self.dir)
        wait_until(
            lambda: _listening(self.port) or self.proc.returncode is not None,
            timeout=20,
            what=f"nginx listening on 127.0.0.1:{self.port}",
        )
        if self.proc.returncode is not None:
            raise HarnessError(f"nginx exited at start\n{self.describe()}")

    def log_lines(self) -> list[str]:
        """The access log so far."""
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def describe(self) -> str:
        """Config, process output and error log, for failure messages."""
        try:
            errors = self.error_log.read_text()
        except OSError:
            errors = "(none)"
        return f"{self.proc.describe()}\nconfig:\n{self.config}\nerror log:\n{errors}"


def visit(source: str, port: int, payload: bytes, timeout: float = 20.0) -> tuple[int, bytes]:
    """Connect from ``source`` to 127.0.0.1:``port``, send, half-close, read until EOF.

    Returns the visitor's port and what it read.
    """
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as sock:
        sock.settimeout(timeout)
        visitor_port: int = sock.getsockname()[1]
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return visitor_port, b"".join(chunks)


def _tunnel(procs: ProcessGroup, workdir: Path, local_port: int, version: str) -> tuple[str, int]:
    """Relay + ``client --proxy-protocol VERSION LOCAL_PORT``; returns the client's forwarding
    line and the public port."""
    relay = start_relay(procs, workdir, token=secrets.token_urlsafe(24))
    client = start_client(
        procs, workdir, relay, [str(local_port)], extra_args=["--proxy-protocol", version]
    )
    (forward,) = client.forwards
    line = next(line for line in client.proc.stdout_lines if line.startswith("forwarding "))
    return line, forward.port


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_sees_the_visitor(procs: ProcessGroup, tmp_path: Path, version: str) -> None:
    with EchoServer() as echo:
        nginx = Nginx(
            procs,
            tmp_path,
            f"        proxy_half_close on;\n        proxy_pass 127.0.0.1:{echo.port};\n",
        )
        line, public = _tunnel(procs, tmp_path, nginx.port, version)
        assert line == (
            f"forwarding tcp://127.0.0.1:{public} -> 127.0.0.1:{nginx.port} "
            f"(PROXY protocol {version})"
        )
        payload = secrets.token_bytes(100_000)
        for source in ("127.0.0.2", "127.0.0.3"):
            visitor_port, echoed = visit(source, public, payload)
            assert echoed == payload, (len(echoed), nginx.describe())
            expected = f"{source}:{visitor_port} 127.0.0.1:{public} {len(payload)}"
            wait_until(
                lambda expected=expected: expected in nginx.log_lines(),  # type: ignore[misc]
                timeout=20,
                what=f"nginx access log line {expected!r}",
                details=lambda: f"log: {nginx.log_lines()}\n{nginx.describe()}",
            )
        assert echo.connections == 2
        assert len(nginx.log_lines()) == 2


# --------------------------------------------------------------------------------------------
# PostgreSQL behind nginx: the database sees the visitor's address

_PG_MISSING = missing_postgres()


class SourceForwarder:
    """Listens on 127.0.0.1 and carries each connection to 127.0.0.1:``port`` from ``source``.

    psql cannot choose its source address; connecting through this makes the visitor that
    reaches the relay's public port come from ``source``.
    """

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        self.target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(
                    ("127.0.0.1", self.target), timeout=10, source_address=(self.source, 0)
                )
            except OSError:
                conn.close()
                continue
            for sock in (conn, upstream):
                sock.settimeout(60)
                self._socks.append(sock)
            for a, b in ((conn, upstream), (upstream, conn)):
                thread = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                self._threads.append(thread)
                thread.start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting, close every connection and join the threads (bounded)."""
        self._stop.set()
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._socks:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A throwaway cluster that trusts 127.0.0.2, rejects 127.0.0.3 and logs connections."""
    pg = PostgresCluster()
    try:
        pg.start()
        with (pg.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 127.0.0.2/32 trust\nhost all all 127.0.0.3/32 reject\n")
        _psql(pg, pg.port, "-c", "ALTER SYSTEM SET log_connections = on")
        _psql(pg, pg.port, "-c", "SELECT pg_reload_conf()")
        yield pg
    finally:
        pg.stop()


def _psql(pg: PostgresCluster, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pg.psql_argv(port, *args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=pg.psql_env(),
        check=False,
    )


@pytest.mark.skipif(_PG_MISSING is not None, reason=_PG_MISSING or "")
def test_postgres_sees_the_visitor_through_nginx(
    procs: ProcessGroup, tmp_path: Path, cluster: PostgresCluster
) -> None:
    nginx = Nginx(
        procs,
        tmp_path,
        f"        proxy_bind $proxy_protocol_addr;\n        proxy_pass 127.0.0.1:{cluster.port};\n",
    )
    _, public = _tunnel(procs, tmp_path, nginx.port, "v2")
    with SourceForwarder("127.0.0.2", public) as visitor:
        result = _psql(cluster, visitor.port, "-c", "SELECT inet_client_addr()")
    assert result.returncode == 0, f"{result.stderr}\n{nginx.describe()}\n{cluster.log_tail()}"
    assert result.stdout.strip() == "127.0.0.2"
    assert re.search(r"connection received: host=127\.0\.0\.2 port=\d+", cluster.log_tail(200))
    # pg_hba.conf rules apply to the visitor's own address.
    with SourceForwarder("127.0.0.3", public) as visitor:
        refused = _psql(cluster, visitor.port, "-c", "SELECT 1")
    assert refused.returncode != 0
    assert 'pg_hba.conf rejects connection for host "127.0.0.3"' in refused.stderr
    assert any(line.startswith("127.0.0.3:") for line in nginx.log_lines())
