"""Visitor allow/deny lists and token port rules with real ``muxtunnel`` processes.

A relay reads a TOML token file giving the token "office" an allow list (127.0.0.2 only) and a
port range; a client of that token exposes a recording service. Visitors connect from distinct
loopback source addresses (127.0.0.2, 127.0.0.3): the allowed one gets its bytes echoed, the
other is closed by the relay before anything reaches the client or the local service, and the
relay logs why. A BIND outside the token's ports is refused with a readable reason. The
client-side ``--allow``/``--deny`` flags give one tunnel its own rule the same way.
"""

from __future__ import annotations

import re
import secrets
import socket
from typing import TYPE_CHECKING

import pytest

from muxtunnel.protocol.auth import stored_key

from .harness import (
    EchoServer,
    HarnessError,
    ManagedProcess,
    random_port_range,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .harness import ProcessGroup, Relay

pytestmark = pytest.mark.system

ALLOWED = "127.0.0.2"
OTHER = "127.0.0.3"


@pytest.fixture
def service() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def visit(source: str, port: int, payload: bytes, timeout: float = 15.0) -> bytes:
    """Connect from ``source`` to the public ``port``, send ``payload``, half-close, read to EOF.

    A reset counts as EOF: the bytes read before it are returned.
    """
    got = bytearray()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return bytes(got)


def assert_echoed(source: str, port: int, *procs: ManagedProcess) -> None:
    payload = secrets.token_bytes(100_000)
    got = visit(source, port, payload)
    if got != payload:
        details = "\n".join(p.describe() for p in procs)
        raise HarnessError(
            f"visitor from {source} on port {port}: {len(got)} of {len(payload)} bytes back"
            f"\n{details}"
        )


def assert_refused(source: str, port: int, service: EchoServer, relay: Relay, reason: str) -> None:
    """A visitor from ``source`` gets nothing; the service sees nothing; the relay says why."""
    before = service.connections
    marker = b"refused-visitor-" + secrets.token_hex(8).encode()
    assert visit(source, port, marker) == b""
    pattern = re.compile(
        rf"visitor {re.escape(source)} port \d+ refused on port {port} \(token \S+\): "
        + re.escape(reason)
    )
    relay.proc.wait_for_line(pattern, stream="stderr", timeout=10, what=pattern.pattern)
    assert service.connections == before
    assert not service.saw(marker)


def token_file(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------


def test_token_allow_list_and_ports_from_the_token_file(
    procs: ProcessGroup, tmp_path: Path, service: EchoServer
) -> None:
    office = secrets.token_urlsafe(24)
    relay_range = random_port_range(16)
    lo = relay_range[0]
    tokens = token_file(
        tmp_path / "tokens.toml",
        f"""# written by the test
[[token]]
name = "office"
hash = "sha256:{stored_key(office).hex()}"
allow = ["{ALLOWED}/32"]
ports = ["{lo}-{lo + 3}"]
""",
    )
    relay = start_relay(
        procs,
        tmp_path,
        token=secrets.token_urlsafe(24),
        port_range=relay_range,
        extra_args=["--token-file", str(tokens)],
    )
    client = start_client(procs, tmp_path, relay, [f"{lo + 2}:{service.port}"], token=office)
    (fwd,) = client.forwards
    assert fwd.port == lo + 2

    assert_echoed(ALLOWED, fwd.port, relay.proc, client.proc)
    assert service.connections == 1
    assert_refused(OTHER, fwd.port, service, relay, "not in the allow list")
    # The allowed source still gets through afterwards.
    assert_echoed(ALLOWED, fwd.port, relay.proc, client.proc)

    # A port outside the token's range: the client is told why.
    outside = start_client(
        procs,
        tmp_path,
        relay,
        [f"{lo + 8}:{service.port}"],
        token=office,
        expect_forwards=0,
        name="outside",
        extra_args=["--max-retries", "0"],
    )
    reason = f"token office may bind ports {lo}-{lo + 3} only"
    outside.proc.wait_for_line(re.compile(re.escape(reason)), stream="stderr", timeout=20)
    wait_until(
        lambda: outside.proc.returncode is not None,
        timeout=20,
        what="the refused client to exit",
        details=outside.proc.describe,
    )
    assert not any(p == lo + 8 for p in relay.bound_ports())


def test_client_allow_and_deny_flags(
    procs: ProcessGroup, tmp_path: Path, service: EchoServer
) -> None:
    relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24))
    allow = start_client(
        procs, tmp_path, relay, [str(service.port)], extra_args=["--allow", f"{ALLOWED}/32"]
    )
    deny = start_client(
        procs,
        tmp_path,
        relay,
        [str(service.port)],
        extra_args=["--deny", ALLOWED],
        name="deny",
    )
    (allowed_fwd,) = allow.forwards
    (denied_fwd,) = deny.forwards
    assert_echoed(ALLOWED, allowed_fwd.port, relay.proc, allow.proc)
    assert_refused(OTHER, allowed_fwd.port, service, relay, "not in the allow list")
    assert_echoed(OTHER, denied_fwd.port, relay.proc, deny.proc)
    assert_refused(ALLOWED, denied_fwd.port, service, relay, f"in the deny list ({ALLOWED}/32)")
