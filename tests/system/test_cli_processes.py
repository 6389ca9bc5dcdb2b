"""Process-level behaviour of ``python -m muxtunnel server`` / ``client``.

Real processes, real sockets on 127.0.0.1, signals sent to the PIDs the tests started.
The local service behind the tunnel is a threaded echo server in this process.
"""

from __future__ import annotations

import re
import secrets
import signal
import socket
import time
from typing import TYPE_CHECKING

import pytest

from .harness import (
    EchoServer,
    HarnessError,
    ManagedProcess,
    ProcessGroup,
    Relay,
    echo_roundtrip,
    free_port,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.system

EXIT_AUTH_REFUSED = 3
EXIT_IDENTITY_MISMATCH = 4
#: "At once" for a port takeover: far below the keepalive timeout (30 s) and the lease (60 s),
#: with room for a Python start-up on a busy 2-core machine.
TAKEOVER_LIMIT = 15.0

#: A log line about a refused authentication: mentions "auth" and a failure word.
_AUTH_FAILED_RE = re.compile(r"(?=.*auth)(?=.*(fail|refus|reject|denied|invalid))", re.IGNORECASE)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A local TCP echo service to expose."""
    with EchoServer() as server:
        yield server


def new_token() -> str:
    return secrets.token_urlsafe(24)


def output_of(proc: ManagedProcess) -> str:
    return "\n".join(proc.stdout_lines + proc.stderr_lines)


def assert_echo(port: int, what: str, *procs: ManagedProcess, size: int = 100_000) -> None:
    """Push ``size`` random bytes through ``port`` and expect them back."""
    payload = secrets.token_bytes(size)
    try:
        got = echo_roundtrip(port, payload, timeout=15)
    except OSError as exc:
        details = "\n".join(p.describe() for p in procs)
        raise HarnessError(
            f"echo through {what} (port {port}) failed: {exc!r}\n{details}"
        ) from None
    if got != payload:
        details = "\n".join(p.describe() for p in procs)
        raise HarnessError(
            f"echo through {what} (port {port}) returned {len(got)} of {len(payload)} bytes"
            f"{' (content differs)' if len(got) == len(payload) else ''}\n{details}"
        )


def visitor_refused(port: int, timeout: float = 3.0) -> bool:
    """True if a new visitor on ``port`` gets no service: refused, reset, or EOF without an echo."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"x")
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(16) == b""
    except OSError:
        return True


def assert_nothing_bound(relay: Relay) -> None:
    bound = relay.bound_ports()
    assert bound == [], f"ports {bound} of the relay's range are listening\n{relay.proc.describe()}"


def fingerprint_hex(fp: str) -> str:
    return fp.split(":", 1)[1].lower()


# --------------------------------------------------------------------------------------------


def test_forwarding_end_to_end(procs: ProcessGroup, tmp_path: Path, echo: EchoServer) -> None:
    """Baseline: two tunnels (one explicit remote port, one auto-assigned) both carry data."""
    relay = start_relay(procs, tmp_path, token=new_token())
    lo, hi = relay.port_range
    explicit = lo + 3
    client = start_client(
        procs, tmp_path, relay, [f"{explicit}:{echo.port}", f"127.0.0.1:{echo.port}"]
    )
    ports = sorted(f.port for f in client.forwards)
    assert explicit in ports
    assert all(lo <= p <= hi for p in ports)
    assert len(set(ports)) == 2
    for fwd in client.forwards:
        assert fwd.host == "127.0.0.1"
        assert fwd.local == f"127.0.0.1:{echo.port}"
        assert_echo(fwd.port, "tunnel", relay.proc, client.proc)


def test_dead_local_port_closes_visitor_within_1s(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    """A tunnel whose local service is down turns visitors away at once; the others keep flowing."""
    dead = free_port()  # nothing listens there
    relay = start_relay(procs, tmp_path, token=new_token())
    client = start_client(procs, tmp_path, relay, [str(dead), str(echo.port)])
    dead_fwd, live_fwd = client.forwards
    assert dead_fwd.local == f"127.0.0.1:{dead}"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", dead_fwd.port), timeout=5) as sock:
            sock.settimeout(5)
            started = time.monotonic()
            try:
                data = sock.recv(16)
            except ConnectionResetError:
                data = b""
            took = time.monotonic() - started
        assert data == b"", f"got {data!r} from a tunnel to a dead port"
        assert took < 1.0, (
            f"visitor to a dead local port kept waiting {took:.2f} s\n{client.proc.describe()}"
        )
        assert_echo(live_fwd.port, "the live tunnel", relay.proc, client.proc)
    assert client.proc.returncode is None


@pytest.fixture(scope="module")
def idle_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One relay shared by the tests whose clients must never get a tunnel (nothing binds on it)."""
    group = ProcessGroup()
    try:
        yield start_relay(group, tmp_path_factory.mktemp("idle-relay"), token=new_token())
    finally:
        group.close()


def test_wrong_token_exits_3_and_binds_nothing(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer, idle_relay: Relay
) -> None:
    relay = idle_relay
    mark = len(relay.proc.stderr_lines)
    client = start_client(
        procs, tmp_path, relay, [str(echo.port)], token=new_token(), expect_forwards=0
    )
    rc = client.proc.wait_exit(20)
    out = output_of(client.proc)
    assert rc == EXIT_AUTH_REFUSED, client.proc.describe()
    assert re.search(r"authentication failed", out, re.IGNORECASE), client.proc.describe()
    assert "Traceback" not in out, client.proc.describe()
    assert not any("forwarding tcp://" in line for line in client.proc.stdout_lines)

    # The relay logs exactly one line about it, with the source address, and keeps running.
    relay.proc.wait_for_line(
        _AUTH_FAILED_RE,
        stream="stderr",
        start=mark,
        timeout=10,
        what="an authentication-failure log line",
    )
    time.sleep(0.5)
    auth_lines = [line for line in relay.proc.stderr_lines[mark:] if _AUTH_FAILED_RE.search(line)]
    assert len(auth_lines) == 1, relay.proc.describe()
    assert "127.0.0.1" in auth_lines[0], relay.proc.describe()
    assert relay.proc.returncode is None, relay.proc.describe()
    assert_nothing_bound(relay)


def test_wrong_fingerprint_exits_4_and_binds_nothing(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer, idle_relay: Relay
) -> None:
    relay = idle_relay
    mark = len(relay.proc.stderr_lines)
    wrong = "sha256:" + ("0f" * 32)
    assert wrong != relay.fingerprint
    client = start_client(
        procs, tmp_path, relay, [str(echo.port)], fingerprint=wrong, expect_forwards=0
    )
    rc = client.proc.wait_exit(20)
    out = output_of(client.proc)
    assert rc == EXIT_IDENTITY_MISMATCH, client.proc.describe()
    assert re.search(r"fingerprint|identity|certificate", out, re.IGNORECASE), (
        client.proc.describe()
    )
    assert "Traceback" not in out, client.proc.describe()
    assert relay.proc.returncode is None, relay.proc.describe()
    assert_nothing_bound(relay)
    # The client hung up before authenticating: an impostor never even sees an AUTH attempt.
    relay.proc.wait_for_line(
        re.compile(r"handshake failed: connection ended before authentication"),
        stream="stderr",
        start=mark,
        timeout=10,
        what="the relay's line about the client hanging up",
    )
    attempts = [
        line
        for line in relay.proc.stderr_lines[mark:]
        if re.search(r"\bauthenticated\b|authentication failed|wrong token", line, re.IGNORECASE)
    ]
    assert attempts == [], relay.proc.describe()


def test_kill9_client_then_new_client_gets_same_ports_at_once(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    token = new_token()
    relay = start_relay(procs, tmp_path, token=token)
    lo, _ = relay.port_range
    first = start_client(
        procs, tmp_path, relay, [f"{lo + 5}:{echo.port}", str(echo.port)], name="client-1"
    )
    ports = [f.port for f in first.forwards]
    for port in ports:
        assert_echo(port, "first client", relay.proc, first.proc)

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait_exit(10)

    started = time.monotonic()
    second = start_client(
        procs, tmp_path, relay, [f"{p}:{echo.port}" for p in ports], name="client-2", timeout=20
    )
    took = time.monotonic() - started
    assert sorted(f.port for f in second.forwards) == sorted(ports), second.proc.describe()
    # "At once": well below the keepalive timeout (30 s) and the lease (60 s); the rest is
    # Python start-up on a busy machine.
    assert took < TAKEOVER_LIMIT, (
        f"the new client needed {took:.1f} s to get the ports back\n{relay.proc.describe()}"
    )
    for port in ports:
        assert_echo(port, "second client", relay.proc, second.proc)


def test_new_client_takes_over_stale_session_at_once(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    """A frozen client (SIGSTOP: its TCP connection stays open, it just stops answering) must not
    keep its ports: a new session with the same token takes them over without waiting for the
    keepalive timeout (30 s) or the lease (60 s)."""
    token = new_token()
    relay = start_relay(procs, tmp_path, token=token)
    lo, _ = relay.port_range
    stale = start_client(
        procs, tmp_path, relay, [f"{lo + 2}:{echo.port}", str(echo.port)], name="client-1"
    )
    ports = [f.port for f in stale.forwards]
    assert_echo(ports[0], "first client", relay.proc, stale.proc)

    stale.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        fresh = start_client(
            procs, tmp_path, relay, [f"{p}:{echo.port}" for p in ports], name="client-2", timeout=20
        )
        took = time.monotonic() - started
        assert sorted(f.port for f in fresh.forwards) == sorted(ports), fresh.proc.describe()
        assert took < TAKEOVER_LIMIT, (
            f"took {took:.1f} s to take over the stale session\n{relay.proc.describe()}"
        )
        for port in ports:
            assert_echo(port, "new client while the old one is frozen", relay.proc, fresh.proc)
    finally:
        stale.proc.kill()


def test_relay_restart_client_comes_back_with_same_ports(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    token = new_token()
    relay = start_relay(procs, tmp_path, token=token, name="relay-1")
    lo, _ = relay.port_range
    # The explicit port first: the relay binds in order, and an auto-assigned port picked
    # first could be the very port asked for explicitly afterwards.
    client = start_client(procs, tmp_path, relay, [f"{lo + 7}:{echo.port}", str(echo.port)])
    ports = sorted(f.port for f in client.forwards)
    for port in ports:
        assert_echo(port, "tunnel before restart", relay.proc, client.proc)
    next_line = len(client.proc.stdout_lines)

    relay.proc.send_signal(signal.SIGKILL)
    relay.proc.wait_exit(10)
    restarted = start_relay(
        procs,
        tmp_path,
        token=token,
        port_range=relay.port_range,
        listen_port=relay.port,
        state_dir=relay.state_dir,
        name="relay-2",
    )
    assert restarted.port == relay.port
    assert restarted.fingerprint == relay.fingerprint, (
        "same state dir must give the same certificate"
    )

    try:
        again, _ = client.wait_forwards(2, start=next_line, timeout=40)
    except HarnessError as exc:
        raise HarnessError(f"{exc}\n{restarted.proc.describe()}") from None
    assert sorted(f.port for f in again) == ports, client.proc.describe()
    for port in ports:
        assert_echo(port, "tunnel after restart", restarted.proc, client.proc)
    assert client.proc.returncode is None


def test_sigterm_drains_in_flight_transfer_and_exits_0(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    relay = start_relay(procs, tmp_path, token=new_token())
    client = start_client(procs, tmp_path, relay, [str(echo.port)])
    port = client.forwards[0].port

    chunks = [secrets.token_bytes(8192) for _ in range(20)]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.settimeout(15)
        # Make sure the stream is established end to end before the signal.
        sock.sendall(chunks[0])
        received = bytearray()
        while len(received) < len(chunks[0]):
            data = sock.recv(65536)
            assert data, f"tunnel closed early\n{relay.proc.describe()}\n{client.proc.describe()}"
            received += data

        relay.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # New visitors are turned away while the in-flight stream keeps flowing.
        wait_until(
            lambda: visitor_refused(port),
            timeout=5,
            what="the draining relay to stop accepting visitors",
            details=relay.proc.describe,
        )
        for chunk in chunks[1:]:
            sock.sendall(chunk)
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    expected = b"".join(chunks)
    assert len(received) == len(expected), (
        f"got {len(received)} of {len(expected)} bytes back during the drain\n{relay.proc.describe()}"
    )
    assert bytes(received) == expected
    rc = relay.proc.wait_exit(15)
    assert rc == 0, relay.proc.describe()
    print(f"\nrelay drained and exited {time.monotonic() - signalled:.2f} s after SIGTERM")


def test_trust_on_first_use_pins_then_refuses_changed_certificate(
    procs: ProcessGroup, tmp_path: Path, echo: EchoServer
) -> None:
    token = new_token()
    relay = start_relay(procs, tmp_path, token=token, name="relay-1")
    client_state = tmp_path / "tofu-client-state"
    first = start_client(
        procs,
        tmp_path,
        relay,
        [str(echo.port)],
        fingerprint=None,
        state_dir=client_state,
        name="client-1",
    )
    assert_echo(first.forwards[0].port, "TOFU tunnel", relay.proc, first.proc)
    out = output_of(first.proc)
    assert re.search(r"trust|pinn", out, re.IGNORECASE), (
        f"TOFU was not announced\n{first.proc.describe()}"
    )
    pinned = [
        path
        for path in client_state.rglob("*")
        if path.is_file()
        and fingerprint_hex(relay.fingerprint)
        in path.read_text(errors="replace").lower().replace(":", "")
    ]
    assert pinned, f"no file under {client_state} holds the relay fingerprint"

    assert first.proc.terminate() == 0, first.proc.describe()
    assert relay.proc.terminate() == 0, relay.proc.describe()

    # Same address, new identity (fresh state dir -> fresh certificate).
    impostor = start_relay(
        procs,
        tmp_path,
        token=token,
        listen_port=relay.port,
        port_range=relay.port_range,
        state_dir=tmp_path / "impostor-state",
        name="relay-2",
    )
    assert impostor.fingerprint != relay.fingerprint
    second = start_client(
        procs, tmp_path, impostor, [str(echo.port)], fingerprint=None, state_dir=client_state,
        expect_forwards=0, name="client-2",
    )  # fmt: skip
    rc = second.proc.wait_exit(20)
    out = output_of(second.proc)
    assert rc == EXIT_IDENTITY_MISMATCH, second.proc.describe()
    assert re.search(r"fingerprint|identity|certificate", out, re.IGNORECASE), (
        second.proc.describe()
    )
    assert "Traceback" not in out
    assert_nothing_bound(impostor)
