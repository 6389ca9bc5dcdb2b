"""Real OpenSSH through the tunnel: a throwaway sshd exposed by real muxtunnel processes.

The ssh client never reads the system's or the user's configuration (``-F /dev/null``, own
known-hosts file, own key); sshd runs from its own config file in a temporary directory.
"""

from __future__ import annotations

import hashlib
import os
import select
import statistics
import subprocess
import time
from typing import TYPE_CHECKING

import pytest

from .harness import HarnessError, ProcessGroup, expose
from .services import SshServer, missing_ssh

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

_MISSING = missing_ssh()

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

MIB = 1024 * 1024
BULK_SIZE = 50 * MIB
ROUND_TRIPS = 200


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A throwaway sshd on a free loopback port."""
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def public_port(sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The relay's public port that leads to the sshd (relay + client processes)."""
    group = ProcessGroup()
    try:
        _, _, port = expose(group, tmp_path_factory.mktemp("ssh-tunnel"), sshd.port, name="ssh")
        yield port
    finally:
        group.close()


#: Bulk transfers also run straight to sshd (a baseline for the throughput figures) only when
#: MUXTUNNEL_SYSTEM_BASELINE=1, to keep the suite short; round trips always do both.
BULK_ROUTES = (
    ["tunnel", "direct"] if os.environ.get("MUXTUNNEL_SYSTEM_BASELINE") == "1" else ["tunnel"]
)


@pytest.fixture(params=["tunnel", "direct"])
def route(request: pytest.FixtureRequest, sshd: SshServer) -> tuple[str, int]:
    """Where bulk transfers go: through the tunnel, or straight to sshd (the baseline to compare)."""
    name: str = request.param
    if name == "direct":
        return name, sshd.port
    port: int = request.getfixturevalue("public_port")
    return name, port


def run_ssh(
    sshd: SshServer,
    port: int,
    remote: str,
    *,
    stdin: int | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run one remote command and fail with full diagnostics on a non-zero status."""
    argv = sshd.ssh_argv(port, remote)
    try:
        result = subprocess.run(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"ssh timed out after {timeout} s: {' '.join(argv)}\n{sshd.describe()}")
    if result.returncode != 0:
        pytest.fail(
            f"ssh exited {result.returncode}: {' '.join(argv)}\n"
            f"stdout: {result.stdout[-2000:]!r}\nstderr: {result.stderr.decode(errors='replace')}\n"
            f"{sshd.describe()}"
        )
    return result


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256 hex digest."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MIB))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def test_sshd_reachable_directly(sshd: SshServer) -> None:
    """Sanity check of the fixture itself, without the tunnel (tells service and tunnel faults apart)."""
    result = run_ssh(sshd, sshd.port, "echo direct-ok")
    assert result.stdout == b"direct-ok\n"


def test_remote_command(sshd: SshServer, public_port: int) -> None:
    token = os.urandom(8).hex()
    result = run_ssh(sshd, public_port, f"echo muxtunnel-{token}; uname -s")
    assert result.stdout.decode().splitlines() == [f"muxtunnel-{token}", os.uname().sysname]


@pytest.mark.parametrize("route", BULK_ROUTES, indirect=True)
def test_upload_50mib(sshd: SshServer, route: tuple[str, int], tmp_path: Path) -> None:
    where, port = route
    source = tmp_path / "upload.bin"
    expected = write_random_file(source, BULK_SIZE)
    target = tmp_path / "uploaded.bin"
    with source.open("rb") as fh:
        start = time.monotonic()
        result = run_ssh(
            sshd,
            port,
            f"cat > {target} && stat -c %s {target} && sha256sum {target}",
            stdin=fh.fileno(),
            timeout=120,
        )
        elapsed = time.monotonic() - start
    size_line, sum_line = result.stdout.decode().splitlines()
    assert int(size_line) == BULK_SIZE
    assert sum_line.split()[0] == expected
    print(
        f"\nSSH upload ({where}): {BULK_SIZE / MIB:.0f} MiB in {elapsed:.2f} s = {BULK_SIZE / MIB / elapsed:.1f} MiB/s"
    )


@pytest.mark.parametrize("route", BULK_ROUTES, indirect=True)
def test_download_50mib(sshd: SshServer, route: tuple[str, int], tmp_path: Path) -> None:
    where, port = route
    source = tmp_path / "download.bin"
    expected = write_random_file(source, BULK_SIZE)
    argv = sshd.ssh_argv(port, f"cat {source}")
    digest = hashlib.sha256()
    received = 0
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = start + 120
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    elapsed = time.monotonic() - start
    assert rc == 0, f"ssh exited {rc}: {stderr}\n{sshd.describe()}"
    assert received == BULK_SIZE, f"received {received} of {BULK_SIZE} bytes; ssh stderr: {stderr}"
    assert digest.hexdigest() == expected
    print(
        f"\nSSH download ({where}): {BULK_SIZE / MIB:.0f} MiB in {elapsed:.2f} s = {BULK_SIZE / MIB / elapsed:.1f} MiB/s"
    )


def _read_line(fd: int, buffer: bytearray, deadline: float) -> bytes:
    """Read from ``fd`` until ``buffer`` holds a full line; return it (bounded by ``deadline``)."""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HarnessError(f"no echo before the deadline; buffered {bytes(buffer)!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            raise HarnessError(f"ssh closed its stdout early; buffered {bytes(buffer)!r}")
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def test_200_small_round_trips(sshd: SshServer, route: tuple[str, int]) -> None:
    """One ssh session running a remote ``cat``: write a line, wait for its echo, 200 times."""
    where, port = route
    argv = sshd.ssh_argv(port, "cat")
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    fd_in, fd_out = proc.stdin.fileno(), proc.stdout.fileno()
    buffer = bytearray()
    samples: list[float] = []
    try:
        # The first exchange includes the SSH handshake; it is not counted.
        os.write(fd_in, b"warm-up\n")
        assert _read_line(fd_out, buffer, time.monotonic() + 30) == b"warm-up"
        deadline = time.monotonic() + 30
        for i in range(ROUND_TRIPS):
            line = f"round-trip {i} {os.urandom(6).hex()}".encode()
            sent = time.monotonic()
            os.write(fd_in, line + b"\n")
            assert _read_line(fd_out, buffer, deadline) == line
            samples.append(time.monotonic() - sent)
        proc.stdin.close()
        rc = proc.wait(timeout=15)
    except (HarnessError, AssertionError) as exc:
        proc.kill()
        proc.wait(10)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        pytest.fail(
            f"round trip {len(samples)} failed: {exc}\nssh stderr: {stderr}\n{sshd.describe()}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert rc == 0
    assert len(samples) == ROUND_TRIPS
    total = sum(samples)
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"\nSSH {ROUND_TRIPS} round trips ({where}): total {total:.2f} s, "
        f"median {statistics.median(samples) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"
    )
    assert total < 20.0, f"{ROUND_TRIPS} round trips took {total:.1f} s"
