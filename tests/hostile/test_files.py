"""Secrets other local users can read or replace: the relay and client warn on stderr.

Real processes: a relay whose state dir is world-writable and whose ``--token-file`` is
world-readable, and a client given ``--token`` on its command line (visible in ``ps``); then the
same setup made private, which must not warn.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import TYPE_CHECKING

from .procs import (
    ManagedProcess,
    muxtunnel_command,
    muxtunnel_env,
    random_port_range,
    stderr_count,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .procs import ProcessGroup

_FINGERPRINT_RE = re.compile(r"fingerprint: (?P<fp>sha256:[0-9a-f]{64})\b")
_LISTEN_RE = re.compile(r"muxtunnel relay listening on 127\.0\.0\.1:(?P<port>\d+)")
_FORWARD_RE = re.compile(r"^forwarding tcp://")
#: The ``--token`` warning recommends both safer ways to pass the token.
_CMDLINE_TOKEN_RE = re.compile(r"WARNING.*--token\b.*--token-file.*MUXTUNNEL_TOKEN")


def _setup(workdir: Path, *, private: bool) -> tuple[Path, Path, Path, str]:
    """A relay state dir, a client state dir and a token file with private or open modes."""
    token = secrets.token_urlsafe(24)
    relay_dir, client_dir = workdir / "relay-state", workdir / "client-state"
    token_file = workdir / "tokens"
    token_file.write_text(token + "\n")
    for path in (relay_dir, client_dir):
        path.mkdir()
        path.chmod(0o700 if private else 0o777)
    token_file.chmod(0o600 if private else 0o644)
    return relay_dir, client_dir, token_file, token


def _start_relay(
    procs: ProcessGroup, workdir: Path, state_dir: Path, token_file: Path
) -> tuple[ManagedProcess, str, str]:
    lo, hi = random_port_range(4)
    argv = [
        *muxtunnel_command(),
        "server",
        "--listen",
        "127.0.0.1:0",
        "--ports",
        f"{lo}-{hi}",
        "--bind",
        "127.0.0.1",
        "--state-dir",
        str(state_dir),
        "--token-file",
        str(token_file),
    ]
    relay = procs.start("relay", argv, env=muxtunnel_env(workdir), cwd=workdir)
    fp, _ = relay.wait_for_line(_FINGERPRINT_RE)
    listen, _ = relay.wait_for_line(_LISTEN_RE)
    return relay, f"127.0.0.1:{listen.group('port')}", fp.group("fp")


def _client_argv(address: str, fingerprint: str, state_dir: Path) -> list[str]:
    return [
        *muxtunnel_command(),
        "client",
        "--server",
        address,
        "--fingerprint",
        fingerprint,
        "--state-dir",
        str(state_dir),
        "--max-retries",
        "0",
    ]


def test_exposed_secrets_are_warned_about(procs: ProcessGroup, tmp_path: Path) -> None:
    """World-writable state dirs, a world-readable token file and ``--token`` in argv warn."""
    relay_dir, client_dir, token_file, token = _setup(tmp_path, private=False)
    relay, address, fp = _start_relay(procs, tmp_path, relay_dir, token_file)
    argv = [*_client_argv(address, fp, client_dir), "--token", token, "9"]
    client = procs.start("client", argv, env=muxtunnel_env(tmp_path), cwd=tmp_path)
    client.wait_for_line(_FORWARD_RE)
    for proc, path in ((relay, relay_dir), (relay, token_file), (client, client_dir)):
        proc.wait_for_line(
            re.compile(rf"WARNING.*{re.escape(str(path))}\b"),
            stream="stderr",
            timeout=5,
            what=f"a warning about {path} (mode {path.stat().st_mode & 0o777:04o})",
        )
    client.wait_for_line(
        _CMDLINE_TOKEN_RE, stream="stderr", timeout=5, what="a warning about --token"
    )
    assert stderr_count(client, _CMDLINE_TOKEN_RE) == 1, client.describe()


def test_private_secrets_get_no_warning(procs: ProcessGroup, tmp_path: Path) -> None:
    """Mode 700 state dirs, a mode 600 token file and MUXTUNNEL_TOKEN: no warning at all."""
    relay_dir, client_dir, token_file, token = _setup(tmp_path, private=True)
    relay, address, fp = _start_relay(procs, tmp_path, relay_dir, token_file)
    env = dict(muxtunnel_env(tmp_path), MUXTUNNEL_TOKEN=token)
    argv = [*_client_argv(address, fp, client_dir), "9"]
    client = procs.start("client", argv, env=env, cwd=tmp_path)
    client.wait_for_line(_FORWARD_RE)
    assert os.stat(token_file).st_mode & 0o777 == 0o600
    for proc in (relay, client):
        assert stderr_count(proc, r"WARNING") == 0, proc.describe()
