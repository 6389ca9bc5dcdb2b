"""Port leases survive a relay restart, clean (SIGTERM) or kill -9 (protocol-spec.md §10.5).

Real processes: a relay accepting tokens A and B, a client of A with an auto-assigned port.
The relay stops (SIGTERM or SIGKILL) while A's client holds the port, A's client is killed too,
and a new relay starts on the same state dir. A's port is bound again at once (visitors wait in
its backlog), B asking for it is refused with ADDRESS_IN_USE "port N is reserved for another
token for N s", a new client of A asking for port 0 gets the same port at once and carries
bytes; with a short lease the port is freed when the lease runs out and B gets it. A corrupt
leases file is set aside with one log line and the relay starts.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from typing import TYPE_CHECKING

import pytest

from .harness import (
    EchoServer,
    HarnessError,
    ProcessGroup,
    Relay,
    echo_roundtrip,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.system

LEASES = "leases.json"
#: The short lease of the expiry test (seconds): long enough for the restarted relay and B's
#: client to start within it; B retries about 1, 3 and 6 s after its first refusal (jittered).
LEASE = 6


def stored_ports(relay: Relay) -> set[int]:
    """The ports in the relay's leases file (empty when it is missing or being replaced)."""
    try:
        doc = json.loads((relay.state_dir / LEASES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {int(lease["port"]) for lease in doc.get("leases", [])}


def _relay_for_tokens(
    procs: ProcessGroup,
    tmp_path: Path,
    tokens: tuple[str, str],
    state: Path,
    *,
    lease: int,
    port_range: tuple[int, int] | None = None,
    name: str = "relay",
) -> Relay:
    """A relay accepting both ``tokens`` on the state dir ``state`` with ``--lease`` seconds."""
    a, b = tokens
    return start_relay(
        procs,
        tmp_path,
        token=a,
        state_dir=state,
        port_range=port_range,
        extra_args=["--token", b, "--lease", str(lease)],
        name=name,
    )


def _stop(relay: Relay, how: str) -> None:
    if how == "sigterm":
        assert relay.proc.terminate() == 0, relay.proc.describe()
    else:
        relay.proc.kill()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_keeps_a_tokens_port_for_that_token(
    procs: ProcessGroup, tmp_path: Path, how: str
) -> None:
    a, b = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    state = tmp_path / "relay-state"
    with EchoServer() as echo:
        relay = _relay_for_tokens(procs, tmp_path, (a, b), state, lease=600, name="relay1")
        first = start_client(procs, tmp_path, relay, [str(echo.port)], name="a1")
        (fwd,) = first.forwards
        port = fwd.port
        # Written within moments of the BIND (a kill -9 must find it on disk).
        wait_until(
            lambda: port in stored_ports(relay),
            timeout=10,
            what=f"port {port} in {state / LEASES}",
            details=relay.proc.describe,
        )
        _stop(relay, how)
        first.proc.kill()  # A's client is gone too: only the stored lease keeps the port
        (stored,) = json.loads((state / LEASES).read_text(encoding="utf-8"))["leases"]
        assert stored["port"] == port
        assert a not in json.dumps(stored)
        if how == "sigterm":
            # A clean shutdown ends the sessions first: the lease runs from the shutdown.
            assert 590 <= stored["expires"] - time.time() <= 600
        else:
            assert stored["expires"] is None  # still held: a full lease from the next start

        relay = _relay_for_tokens(
            procs, tmp_path, (a, b), state, lease=600, port_range=relay.port_range, name="relay2"
        )
        relay.proc.wait_for_line(
            re.compile(r"restored 1 port leases from "), stream="stderr", timeout=5
        )
        # Bound again at once: a visitor waits in the backlog instead of being refused, and is
        # served once A's client is back.
        try:
            early = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as exc:
            raise AssertionError(f"port {port} not bound after the restart: {exc}") from None
        early.settimeout(20)
        early.sendall(b"waited in the backlog")

        # Token B asks for that port: refused, with the reason.
        other = start_client(
            procs, tmp_path, relay, [f"{port}:{echo.port}"], token=b, expect_forwards=0, name="b"
        )
        match, _ = other.proc.wait_for_line(
            re.compile(
                rf"refused remote port {port}: ADDRESS_IN_USE: "
                rf"port {port} is reserved for another token for (\d+) s"
            ),
            stream="stderr",
        )
        assert 500 <= int(match.group(1)) <= 600

        # A new client of token A asks for port 0 (tunnel 1): the same port at once.
        start = time.monotonic()
        again = start_client(procs, tmp_path, relay, [str(echo.port)], name="a2")
        assert [f.port for f in again.forwards] == [port]
        assert time.monotonic() - start < 15
        assert echo_roundtrip(port, b"same port after a restart") == b"same port after a restart"
        with early:
            got = b""
            while len(got) < len(b"waited in the backlog"):
                chunk = early.recv(100)
                assert chunk, f"early visitor closed after {got!r}"
                got += chunk
        assert got == b"waited in the backlog"
        assert other.forwards == []
        assert other.proc.returncode is None  # still retrying in the background


def test_an_expired_lease_is_freed_for_another_token(procs: ProcessGroup, tmp_path: Path) -> None:
    a, b = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    state = tmp_path / "relay-state"
    with EchoServer() as echo:
        relay = _relay_for_tokens(procs, tmp_path, (a, b), state, lease=LEASE, name="relay1")
        first = start_client(procs, tmp_path, relay, [str(echo.port)], name="a1")
        (fwd,) = first.forwards
        port = fwd.port
        wait_until(lambda: port in stored_ports(relay), timeout=10, what=f"port {port} stored")
        relay.proc.kill()
        first.proc.kill()
        relay = _relay_for_tokens(
            procs, tmp_path, (a, b), state, lease=LEASE, port_range=relay.port_range, name="relay2"
        )
        # B is refused while the lease runs (LEASE s from the load) and retries in the background
        # (muxtunnel.client.RETRY_BASE doubling, jittered): when the lease expires the port is
        # freed and B's next retry gets it.
        other = start_client(
            procs, tmp_path, relay, [f"{port}:{echo.port}"], token=b, expect_forwards=0, name="b"
        )
        other.proc.wait_for_line(
            re.compile(rf"port {port} is reserved for another token for [1-{LEASE}] s"),
            stream="stderr",
        )
        try:
            other.forwards, _ = other.wait_forwards(1, timeout=45)
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{relay.proc.describe()}") from None
        assert [f.port for f in other.forwards] == [port]
        relay.proc.wait_for_line(re.compile(rf"lease on port {port} expired"), stream="stderr")
        assert echo_roundtrip(port, b"b's now") == b"b's now"
        wait_until(
            lambda: stored_ports(relay) == {port},
            timeout=10,
            what="only B's lease in the file",
        )


def test_a_corrupt_leases_file_is_set_aside(procs: ProcessGroup, tmp_path: Path) -> None:
    state = tmp_path / "relay-state"
    state.mkdir()
    (state / LEASES).write_bytes(b'{"version": 1, "leases": [{"port": 2')  # a torn write
    with EchoServer() as echo:
        relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24), state_dir=state)
        lines = [line for line in relay.proc.stderr_lines if "leases file" in line]
        assert len(lines) == 1, relay.proc.describe()
        assert "unusable" in lines[0]
        assert "starting with no leases" in lines[0]
        asides = list(state.glob(f"{LEASES}.corrupt-*"))
        assert len(asides) == 1
        client = start_client(procs, tmp_path, relay, [str(echo.port)])
        (fwd,) = client.forwards
        assert echo_roundtrip(fwd.port, b"works") == b"works"
        wait_until(lambda: stored_ports(relay) == {fwd.port}, timeout=10, what="a fresh file")
