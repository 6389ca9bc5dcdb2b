"""``muxtunnel status`` from a separate process against a real relay and client.

Real processes sharing one state dir, an echo service in this process, a known transfer, then
``muxtunnel status --state-dir DIR`` (table) and ``--json`` run as their own processes.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import stat
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from .harness import (
    EchoServer,
    HarnessError,
    ProcessGroup,
    muxtunnel_command,
    muxtunnel_env,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.system

N = 250_000
TIMEOUT = 30.0
#: Characters of rich's box drawing: never in output that is not a terminal.
BOX_CHARS = set("─│┌┐└┘├┤┬┴┼━┃╭╮╰╯")


def status(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``muxtunnel status ARGS`` as its own process (stdout is a pipe, not a terminal)."""
    return subprocess.run(
        [*muxtunnel_command(), "status", *args],
        env=muxtunnel_env(workdir),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def status_json(workdir: Path, state: Path) -> list[dict[str, Any]]:
    result = status(workdir, "--state-dir", str(state), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


def by_role(snapshots: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["role"]: s for s in snapshots}


def test_status_table_and_json_from_another_process(procs: ProcessGroup, tmp_path: Path) -> None:
    state = tmp_path / "st"
    token = secrets.token_urlsafe(24)
    with EchoServer() as echo:
        relay = start_relay(procs, tmp_path, token=token, state_dir=state)
        # The client shares the relay's state dir: the two admin sockets must not collide.
        client = start_client(procs, tmp_path, relay, [str(echo.port)], state_dir=state)
        (fwd,) = client.forwards
        sockets = sorted(p.name for p in (state / "admin").iterdir())
        assert sockets == [f"client-{client.proc.pid}.sock", "relay.sock"], sockets
        for name in sockets:
            assert stat.S_IMODE((state / "admin" / name).stat().st_mode) == 0o600

        with socket.create_connection(("127.0.0.1", fwd.port), timeout=TIMEOUT) as visitor:
            visitor.settimeout(TIMEOUT)
            visitor.sendall(b"y" * N)
            got = 0
            while got < N:
                chunk = visitor.recv(65536)
                assert chunk, "echo ended early"
                got += len(chunk)
            # Held open: both sides report one open stream.
            snaps = by_role(status_json(tmp_path, state))
            assert set(snaps) == {"relay", "client"}
            for role in ("relay", "client"):
                [session] = snaps[role]["sessions"]
                [tunnel] = session["tunnels"]
                assert tunnel["public"] == f"127.0.0.1:{fwd.port}"
                assert tunnel["open"] == 1, (role, tunnel)
            assert snaps["client"]["sessions"][0]["tunnels"][0]["local"] == fwd.local
            assert snaps["relay"]["sessions"][0]["token"]
            visitor.shutdown(socket.SHUT_WR)
            while visitor.recv(65536):
                pass

        # After the close: exact byte counts on both sides.
        final: dict[str, dict[str, Any]] = {}

        def closed_everywhere() -> bool:
            final.update(by_role(status_json(tmp_path, state)))
            return all(s["totals"]["streams_open"] == 0 for s in final.values())

        wait_until(closed_everywhere, timeout=TIMEOUT, what="streams closed", interval=0.2)
        for role in ("relay", "client"):
            tunnel = final[role]["sessions"][0]["tunnels"][0]
            assert (tunnel["total"], tunnel["bytes_in"], tunnel["bytes_out"]) == (1, N, N), role
            assert final[role]["totals"]["bytes_in"] == N

        table = status(tmp_path, "--state-dir", str(state))
        assert table.returncode == 0, table.stderr
        text = table.stdout
        assert not BOX_CHARS & set(text), text
        for expected in (
            f"relay 127.0.0.1:{relay.port}",
            f"client {relay.address}",
            f"127.0.0.1:{fwd.port}",
            fwd.local,
            "PEER",
            "RTT",
            "total: 1 sessions",
            "244.1 KiB",
        ):
            assert expected in text, (expected, text)
        assert [line for line in text.splitlines() if " up " in f" {line} "], text

        # --admin ADDR queries one endpoint only.
        one = status(tmp_path, "--admin", str(state / "admin" / "relay.sock"), "--json")
        assert one.returncode == 0, one.stderr
        assert [s["role"] for s in json.loads(one.stdout)] == ["relay"]

        # A clean stop removes each socket; then status says nothing runs.
        client.proc.send_signal(signal.SIGTERM)
        assert client.proc.wait_exit(TIMEOUT) == 0
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait_exit(TIMEOUT) == 0
    assert list((state / "admin").iterdir()) == []
    gone = status(tmp_path, "--state-dir", str(state))
    assert gone.returncode == 1
    assert gone.stderr.strip().endswith(
        f"no muxtunnel relay or client found in {state} (is it running? --admin off?)"
    ), gone.stderr
    assert gone.stdout == ""


def test_status_admin_off_and_explicit_path(procs: ProcessGroup, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    state = tmp_path / "st"
    sock = tmp_path / "relay-admin.sock"
    relay = start_relay(
        procs, tmp_path, token=token, state_dir=state, extra_args=["--admin", str(sock)]
    )
    # The relay binds its admin socket before it says it listens.
    assert sock.exists(), relay.proc.describe()
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    result = status(tmp_path, "--admin", str(sock), "--json")
    assert result.returncode == 0, result.stderr
    [snap] = json.loads(result.stdout)
    assert snap["listen"] == relay.address
    # Nothing in the state dir: the client below runs with --admin off.
    with EchoServer() as echo:
        start_client(procs, tmp_path, relay, [str(echo.port)], extra_args=["--admin", "off"])
        assert not (tmp_path / "client-state" / "admin").exists()
    missing = status(tmp_path, "--admin", str(tmp_path / "nothing.sock"))
    assert missing.returncode == 1
    assert "nothing listens there" in missing.stderr
    if relay.proc.returncode is not None:
        raise HarnessError(relay.proc.describe())
