"""Real PostgreSQL through the tunnel: a throwaway cluster exposed by real muxtunnel processes.

The rows are generated here and sent with ``COPY ... FROM STDIN`` from the client side, so the
data really crosses the tunnel; they are read back with ``COPY ... TO STDOUT`` and checked byte
for byte, and an md5 over all rows is computed locally, by the server through the tunnel, and by
the server over a direct connection.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from typing import TYPE_CHECKING

import pytest

from .harness import ProcessGroup, expose
from .services import PostgresCluster, missing_postgres

if TYPE_CHECKING:
    from collections.abc import Iterator

_MISSING = missing_postgres()

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

ROWS = 100_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster on a free loopback port."""
    pg = PostgresCluster()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def public_port(
    cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """The relay's public port that leads to the cluster (relay + client processes)."""
    group = ProcessGroup()
    try:
        _, _, port = expose(group, tmp_path_factory.mktemp("pg-tunnel"), cluster.port, name="pg")
        yield port
    finally:
        group.close()


def psql(
    cluster: PostgresCluster,
    port: int,
    *args: str,
    stdin: bytes | None = None,
    timeout: float = 60.0,
) -> bytes:
    """Run psql against 127.0.0.1:port and return its stdout; fail with diagnostics otherwise."""
    argv = cluster.psql_argv(port, *args)
    try:
        result = subprocess.run(
            argv,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            timeout=timeout,
            env=cluster.psql_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"psql timed out after {timeout} s: {' '.join(argv)}\nserver log:\n{cluster.log_tail()}"
        )
    if result.returncode != 0:
        pytest.fail(
            f"psql exited {result.returncode}: {' '.join(argv)}\n"
            f"stderr: {result.stderr.decode(errors='replace')}\nserver log:\n{cluster.log_tail()}"
        )
    return result.stdout


def make_rows(count: int) -> tuple[bytes, str, int]:
    """COPY text for ``count`` rows (id, payload), the md5 of ``id:payload`` joined by commas, sum(id)."""
    salt = os.urandom(8).hex()
    copy_lines: list[str] = []
    agg_parts: list[str] = []
    for i in range(1, count + 1):
        payload = f"row {i} " + hashlib.sha256(f"{salt}/{i}".encode()).hexdigest()[: 16 + i % 48]
        copy_lines.append(f"{i}\t{payload}\n")
        agg_parts.append(f"{i}:{payload}")
    copy_text = "".join(copy_lines).encode()
    agg_md5 = hashlib.md5(",".join(agg_parts).encode()).hexdigest()
    return copy_text, agg_md5, count * (count + 1) // 2


CHECK_SQL = (
    "SELECT count(*), sum(id), md5(string_agg(id::text || ':' || payload, ',' ORDER BY id)) "
    "FROM {table}"
)


def test_postgres_reachable_directly(cluster: PostgresCluster) -> None:
    """Sanity check of the fixture itself, without the tunnel."""
    assert psql(cluster, cluster.port, "-c", "SELECT 40 + 2").strip() == b"42"


def test_100k_rows_through_tunnel(cluster: PostgresCluster, public_port: int) -> None:
    table = f"rows_{os.urandom(4).hex()}"
    copy_text, expected_md5, expected_sum = make_rows(ROWS)
    version = psql(cluster, public_port, "-c", "SHOW server_version_num").strip()
    assert version.isdigit()

    psql(
        cluster,
        public_port,
        "-c",
        f"CREATE TABLE {table} (id integer PRIMARY KEY, payload text NOT NULL)",
    )
    start = time.monotonic()
    psql(
        cluster,
        public_port,
        "-c",
        f"COPY {table} (id, payload) FROM STDIN",
        stdin=copy_text,
        timeout=120,
    )
    copy_in = time.monotonic() - start

    expected = f"{ROWS}|{expected_sum}|{expected_md5}".encode()
    through_tunnel = psql(cluster, public_port, "-c", CHECK_SQL.format(table=table)).strip()
    direct = psql(cluster, cluster.port, "-c", CHECK_SQL.format(table=table)).strip()
    assert through_tunnel == expected
    assert direct == expected

    start = time.monotonic()
    copied_out = psql(
        cluster,
        public_port,
        "-c",
        f"COPY (SELECT id, payload FROM {table} ORDER BY id) TO STDOUT",
        timeout=120,
    )
    copy_out = time.monotonic() - start
    assert len(copied_out) == len(copy_text)
    assert hashlib.sha256(copied_out).hexdigest() == hashlib.sha256(copy_text).hexdigest()
    print(
        f"\nPostgreSQL through tunnel: COPY IN {ROWS} rows ({len(copy_text) / 1e6:.1f} MB) {copy_in:.2f} s, "
        f"COPY OUT {copy_out:.2f} s"
    )
