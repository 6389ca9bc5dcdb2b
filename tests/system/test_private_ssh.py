"""Real OpenSSH through a private tunnel: relay, publishing client and ``muxtunnel visit``
as real processes, and a real ``ssh`` session through the visitor's local port.

The sshd is published with ``muxtunnel client --private ssh-home``; nothing listens for it on
the relay's public side; ``muxtunnel visit ssh-home 127.0.0.1:0 --token-file F`` carries each
local connection through the relay to it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
from typing import TYPE_CHECKING

import pytest

from .harness import ProcessGroup, muxtunnel_command, muxtunnel_env, start_client, start_relay
from .services import SshServer, missing_ssh

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

_MISSING = missing_ssh()

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]

_PRIVATE_RE = re.compile(r"^private tunnel (?P<name>\S+) -> (?P<local>\S+)$")
_VISIT_RE = re.compile(r"^visiting private tunnel (?P<name>\S+) on 127\.0\.0\.1:(?P<port>\d+)$")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A throwaway sshd on a free loopback port."""
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _run(argv: list[str], *, stdin: int | None = None, timeout: float = 60.0) -> bytes:
    result = subprocess.run(
        argv,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"ssh exited {result.returncode}: {' '.join(argv)}\n"
        f"stderr: {result.stderr.decode(errors='replace')}"
    )
    return result.stdout


def test_ssh_through_private_tunnel(sshd: SshServer, procs: ProcessGroup, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    relay = start_relay(procs, tmp_path, token=token)
    client = start_client(
        procs,
        tmp_path,
        relay,
        [str(sshd.port)],
        extra_args=["--private", "ssh-home"],
        expect_forwards=0,
        name="publisher",
    )
    match, _ = client.proc.wait_for_line(_PRIVATE_RE, what="'private tunnel ssh-home -> ...'")
    assert (match["name"], match["local"]) == ("ssh-home", f"127.0.0.1:{sshd.port}")

    token_file = tmp_path / "visit-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    state = tmp_path / "visitor-state"
    state.mkdir()
    visitor = procs.start(
        "visitor",
        [
            *muxtunnel_command(),
            "visit",
            "ssh-home",
            "127.0.0.1:0",
            "--server",
            relay.address,
            "--token-file",
            str(token_file),
            "--fingerprint",
            relay.fingerprint,
            "--state-dir",
            str(state),
        ],
        env=muxtunnel_env(tmp_path),
        cwd=tmp_path,
    )
    match, _ = visitor.wait_for_line(
        _VISIT_RE, what="'visiting private tunnel ssh-home on 127.0.0.1:PORT'"
    )
    assert match["name"] == "ssh-home"
    port = int(match["port"])

    marker = os.urandom(8).hex()
    out = _run(sshd.ssh_argv(port, f"echo private-{marker}; uname -s"))
    assert out.decode().splitlines() == [f"private-{marker}", os.uname().sysname]

    # Bulk through both hops, checked by hash on the far side.
    source = tmp_path / "upload.bin"
    data = os.urandom(8 * 1024 * 1024)
    source.write_bytes(data)
    with source.open("rb") as fh:
        out = _run(sshd.ssh_argv(port, "sha256sum"), stdin=fh.fileno(), timeout=120)
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()

    # The relay opened no public listener for the private tunnel.
    assert relay.bound_ports() == []
    assert any("published as private tunnel ssh-home" in line for line in relay.proc.stderr_lines)


def test_visit_denied_exits_with_one_line(procs: ProcessGroup, tmp_path: Path) -> None:
    """A token the relay's policy does not let visit NAME: exit 1 with the reason, one line."""
    owner, stranger = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    relay = start_relay(procs, tmp_path, token=owner, extra_args=["--token", stranger])
    client = start_client(
        procs,
        tmp_path,
        relay,
        ["9"],
        extra_args=["--private", "discard"],
        expect_forwards=0,
        name="publisher",
    )
    client.proc.wait_for_line(_PRIVATE_RE, what="'private tunnel discard -> ...'")
    token_file = tmp_path / "stranger-token"
    token_file.write_text(stranger + "\n")
    token_file.chmod(0o600)
    state = tmp_path / "visitor-state"
    state.mkdir()
    visitor = procs.start(
        "visitor",
        [
            *muxtunnel_command(),
            "visit",
            "discard",
            "0",
            "--server",
            relay.address,
            "--token-file",
            str(token_file),
            "--fingerprint",
            relay.fingerprint,
            "--state-dir",
            str(state),
        ],
        env=muxtunnel_env(tmp_path),
        cwd=tmp_path,
    )
    assert visitor.wait_exit(30) == 1, visitor.describe()
    errors = [line for line in visitor.stderr_lines if line.startswith("muxtunnel: error:")]
    assert len(errors) == 1, visitor.describe()
    assert "refused the visit of private tunnel discard: DENIED: token" in errors[0]
    assert "may not visit discard" in errors[0]
