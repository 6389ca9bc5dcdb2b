"""Secret hygiene of the real ``muxtunnel`` processes: tokens on the command line, token and
config files other users can read, state dirs other users can write.

Each run is made to stop right after start-up (the relay's listen port is taken, the client's
relay is not there and ``--max-retries 0``), so the warnings it prints on stderr are complete.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests.system.harness import muxtunnel_command, muxtunnel_env

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TOKEN = "secret-token-0123456789abcdefghij"
CMDLINE_WARNING = "--token on the command line"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port with a listener on it (a relay told to listen there fails at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run ``muxtunnel ARGS`` to its (failing) end; return its stderr lines."""
    proc = subprocess.run(
        [*muxtunnel_command(), *args],
        capture_output=True,
        text=True,
        env=env or muxtunnel_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("muxtunnel: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines


def relay_args(port: int, state: Path, *extra: str) -> list[str]:
    return ["server", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), *extra]


def client_args(port: int, state: Path, *extra: str) -> list[str]:
    return [
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(state),
        "--max-retries",
        "0",
        *extra,
        "22",
    ]


def matching(lines: list[str], *fragments: str) -> list[str]:
    return [line for line in lines if all(f in line for f in fragments)]


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def secret_file(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("command", ["server", "client"])
def test_token_on_command_line_warns_once(
    tmp_path: Path, busy_port: int, dead_port: int, command: str
) -> None:
    state = private_dir(tmp_path / "state")
    args = relay_args(busy_port, state) if command == "server" else client_args(dead_port, state)
    lines = run(tmp_path, *args, "--token", TOKEN)
    warnings = matching(lines, CMDLINE_WARNING)
    assert len(warnings) == 1, lines
    assert "--token-file" in warnings[0]
    assert "MUXTUNNEL_TOKEN" in warnings[0]
    assert not matching(lines, TOKEN)  # the warning does not repeat the secret
    # The recommended ways give no warning at all.
    env = muxtunnel_env(tmp_path)
    env["MUXTUNNEL_TOKEN"] = TOKEN
    quiet = run(tmp_path, *args, env=env)
    assert not matching(quiet, CMDLINE_WARNING), quiet
    assert not matching(quiet, "chmod"), quiet
    token_file = secret_file(tmp_path / "token", TOKEN + "\n", 0o600)
    quiet = run(tmp_path, *args, "--token-file", str(token_file))
    assert not matching(quiet, CMDLINE_WARNING), quiet
    assert not matching(quiet, "chmod"), quiet


@pytest.mark.parametrize("command", ["server", "client"])
def test_token_file_readable_by_others_warns(
    tmp_path: Path, busy_port: int, dead_port: int, command: str
) -> None:
    state = private_dir(tmp_path / "state")
    token_file = secret_file(tmp_path / "token", TOKEN + "\n", 0o644)
    port = busy_port if command == "server" else dead_port
    args = (relay_args if command == "server" else client_args)(
        port, state, "--token-file", str(token_file)
    )
    lines = run(tmp_path, *args)
    warnings = matching(lines, str(token_file), "chmod 600")
    assert len(warnings) == 1, lines
    assert "0644" in warnings[0]
    token_file.chmod(0o600)
    assert not matching(run(tmp_path, *args), "chmod")


def test_config_file_with_token_readable_by_others_warns(tmp_path: Path, dead_port: int) -> None:
    state = private_dir(tmp_path / "state")
    config = secret_file(tmp_path / "client.toml", f'token = "{TOKEN}"\n', 0o640)
    args = client_args(dead_port, state, "--config", str(config))
    lines = run(tmp_path, *args)
    warnings = matching(lines, str(config), "chmod 600")
    assert len(warnings) == 1, lines
    assert "token" in warnings[0]
    config.chmod(0o600)
    assert not matching(run(tmp_path, *args), "chmod")


@pytest.mark.parametrize("command", ["server", "client"])
def test_state_dir_writable_by_others_warns(
    tmp_path: Path, busy_port: int, dead_port: int, command: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    env = muxtunnel_env(tmp_path)
    env["MUXTUNNEL_TOKEN"] = TOKEN
    port = busy_port if command == "server" else dead_port
    args = (relay_args if command == "server" else client_args)(port, state)
    lines = run(tmp_path, *args, env=env)
    warnings = matching(lines, str(state), "chmod 700")
    assert len(warnings) == 1, lines
    assert "writable by other users" in warnings[0]
    state.chmod(0o700)
    assert not matching(run(tmp_path, *args, env=env), "chmod")
