"""``muxtunnel token add/list/remove`` with a real relay and real clients (processes, loopback).

The relay reads the named token file (``--token-file``, or ``tokens.toml`` in its state dir when
no token is configured); the file holds stored keys only, and ``token list`` shows names and
policies, never a token or a hash.
"""

from __future__ import annotations

import re
import stat
import subprocess
from typing import TYPE_CHECKING

import pytest

from .harness import (
    EchoServer,
    ProcessGroup,
    Relay,
    echo_roundtrip,
    muxtunnel_command,
    muxtunnel_env,
    random_port_range,
    start_client,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

pytestmark = pytest.mark.system

EXIT_AUTH_REFUSED = 3
_LISTEN_RE = re.compile(r"muxtunnel relay listening on (?P<host>[^\s:]+):(?P<port>\d+)")
_FINGERPRINT_RE = re.compile(r"fingerprint: (?P<fp>sha256:[0-9a-f]{64})\b")
_HASH_RE = re.compile(r'hash = "sha256:([0-9a-f]{64})"')


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A local TCP echo service to expose."""
    with EchoServer() as server:
        yield server


def muxtunnel(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one ``muxtunnel`` command to completion (bounded)."""
    return subprocess.run(
        [*muxtunnel_command(), *args],
        env=muxtunnel_env(workdir),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def token_add(workdir: Path, name: str, *args: str) -> str:
    """``muxtunnel token add NAME ...``: the token it printed (alone on stdout)."""
    done = muxtunnel(workdir, "token", "add", name, *args)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    token = lines[0]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), token
    assert token not in done.stderr
    assert "MUXTUNNEL_TOKEN=" in done.stderr
    return token


def start_relay(
    procs: ProcessGroup, workdir: Path, state_dir: Path, extra: Sequence[str], name: str
) -> Relay:
    """``muxtunnel server`` with no ``--token``: tokens come from ``extra`` or the state dir."""
    port_range = random_port_range()
    argv = [
        *muxtunnel_command(),
        "server",
        "--listen",
        "127.0.0.1:0",
        "--ports",
        f"{port_range[0]}-{port_range[1]}",
        "--bind",
        "127.0.0.1",
        "--state-dir",
        str(state_dir),
        *extra,
    ]
    proc = procs.start(name, argv, env=muxtunnel_env(workdir), cwd=workdir)
    fp, _ = proc.wait_for_line(_FINGERPRINT_RE, what="'fingerprint: sha256:...'")
    listen, _ = proc.wait_for_line(_LISTEN_RE, what="'muxtunnel relay listening on ...'")
    assert not any(line.startswith("token:") for line in proc.stdout_lines)
    return Relay(
        proc=proc,
        host=listen.group("host"),
        port=int(listen.group("port")),
        fingerprint=fp.group("fp"),
        port_range=port_range,
        state_dir=state_dir,
        token="",
    )


def assert_echo(port: int) -> None:
    payload = bytes(range(256)) * 400
    assert echo_roundtrip(port, payload, timeout=15) == payload


def test_token_add_remove_with_a_running_relay(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    tokens = tmp_path / "etc" / "tokens.toml"
    office = token_add(tmp_path, "office", "--file", str(tokens), "--max-tunnels", "4")
    home = token_add(tmp_path, "home", "--file", str(tokens))
    text = tokens.read_text()
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert office not in text
    assert home not in text
    hashes = _HASH_RE.findall(text)
    assert len(hashes) == 2

    state = tmp_path / "relay-state"
    relay = start_relay(procs, tmp_path, state, ["--token-file", str(tokens)], "relay")
    client = start_client(procs, tmp_path, relay, [str(echo.port)], token=office, name="office")
    assert_echo(client.forwards[0].port)
    relay.proc.wait_for_line(
        re.compile(r"client 127\.0\.0\.1:\d+ authenticated \(token office\)"), stream="stderr"
    )
    client.proc.terminate()

    done = muxtunnel(tmp_path, "token", "remove", "office", "--file", str(tokens))
    assert done.returncode == 0, done.stderr
    assert "restart" in done.stderr
    relay.proc.terminate()
    relay = start_relay(procs, tmp_path, state, ["--token-file", str(tokens)], "relay-2")

    refused = start_client(
        procs, tmp_path, relay, [str(echo.port)], token=office, expect_forwards=0, name="gone"
    )
    assert refused.proc.wait_exit() == EXIT_AUTH_REFUSED
    relay.proc.wait_for_line(
        re.compile(r"authentication failed from 127\.0\.0\.1 port \d+: wrong token"),
        stream="stderr",
    )
    client = start_client(procs, tmp_path, relay, [str(echo.port)], token=home, name="home")
    assert_echo(client.forwards[0].port)

    listed = muxtunnel(tmp_path, "token", "list", "--file", str(tokens))
    as_json = muxtunnel(tmp_path, "token", "list", "--file", str(tokens), "--json")
    assert listed.returncode == 0, listed.stderr
    assert as_json.returncode == 0, as_json.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "home"]
    assert '"name": "home"' in as_json.stdout
    for output in (listed.stdout + listed.stderr, as_json.stdout + as_json.stderr):
        for secret in (office, home):
            assert secret not in output
        for digest in hashes:
            assert digest[:16] not in output
        assert "sha256" not in output


def test_relay_uses_tokens_toml_in_its_state_dir(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    state = tmp_path / "relay-state"
    token = token_add(tmp_path, "laptop", "--state-dir", str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    relay = start_relay(procs, tmp_path, state, [], "relay")
    client = start_client(procs, tmp_path, relay, [str(echo.port)], token=token)
    assert_echo(client.forwards[0].port)
    relay.proc.wait_for_line(re.compile(r"using the tokens in .*tokens\.toml"), stream="stderr")
    relay.proc.wait_for_line(re.compile(r"authenticated \(token laptop\)"), stream="stderr")
    assert not (state / "token").exists()  # no token generated besides the named ones
