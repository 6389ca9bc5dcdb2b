"""The access log of real ``muxtunnel server`` and ``client`` processes, in both log formats.

A known transfer (different byte counts each way, both sides closing with FIN) through a relay
and a client started with ``--log-format text|json`` at the default log level: each process
writes exactly one access line for the connection, with the exact counts, on stderr.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
from typing import TYPE_CHECKING

import pytest

from .harness import start_client, start_relay

if TYPE_CHECKING:
    from pathlib import Path

    from .harness import ManagedProcess, ProcessGroup

pytestmark = pytest.mark.system

VISITOR_HOST = "127.0.0.2"
FROM_VISITOR = 200_003
TO_VISITOR = 1_000_037
TIMEOUT = 30.0


class _AnswerService:
    """A one-connection TCP service: reads until EOF, answers ``TO_VISITOR`` bytes, closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = int(self.listener.getsockname()[1])
        self.received = -1
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            got = 0
            while data := conn.recv(65536):
                got += len(data)
            self.received = got
            conn.sendall(os.urandom(TO_VISITOR))
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(TIMEOUT)


def _visit(port: int) -> tuple[str, int]:
    """Send ``FROM_VISITOR`` bytes from 127.0.0.2, half-close, read to EOF; (address, read)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=TIMEOUT, source_address=(VISITOR_HOST, 0)
    ) as sock:
        address = f"{VISITOR_HOST}:{sock.getsockname()[1]}"
        sock.sendall(os.urandom(FROM_VISITOR))
        sock.shutdown(socket.SHUT_WR)
        got = 0
        while data := sock.recv(65536):
            got += len(data)
    return address, got


def _access_lines(proc: ManagedProcess) -> list[str]:
    return [line for line in proc.stderr_lines if "muxtunnel.access" in line]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_access_line_on_relay_and_client(
    procs: ProcessGroup, tmp_path: Path, log_format: str
) -> None:
    service = _AnswerService()
    try:
        args = ["--log-format", log_format]
        relay = start_relay(
            procs, tmp_path, token=secrets.token_urlsafe(24), extra_args=args, name="relay"
        )
        client = start_client(procs, tmp_path, relay, [str(service.port)], extra_args=args)
        (forward,) = client.forwards
        visitor, received = _visit(forward.port)
    finally:
        service.close()
    assert (service.received, received) == (FROM_VISITOR, TO_VISITOR)
    pattern = re.compile(re.escape(f"access {visitor} -> "))
    for proc in (relay.proc, client.proc):
        proc.wait_for_line(pattern, stream="stderr", timeout=TIMEOUT, what="the access line")
    public = f"127.0.0.1:{forward.port}"
    tunnels = {
        "relay": public,
        "client": f"{public} -> 127.0.0.1:{service.port}",
    }
    for side, proc in (("relay", relay.proc), ("client", client.proc)):
        (line,) = _access_lines(proc)
        print(f"{side} ({log_format}): {line}")  # shown with -s: the access log as users see it
        if log_format == "json":
            obj = json.loads(line)
            assert obj["event"] == "access"
            assert obj["side"] == side
            assert obj["level"] == "info"
            assert obj["tunnel"] == tunnels[side]
            assert obj["visitor"] == visitor
            assert obj["local"] == (None if side == "relay" else f"127.0.0.1:{service.port}")
            assert obj["end"] == "closed"
            assert obj["bytes_from_visitor"] == FROM_VISITOR
            assert obj["bytes_to_visitor"] == TO_VISITOR
            assert type(obj["bytes_from_visitor"]) is int
            assert type(obj["duration"]) is float
        else:
            expected = (
                f" INFO muxtunnel.access: access {visitor} -> {tunnels[side]}: closed, "
                f"{FROM_VISITOR} B from visitor, {TO_VISITOR} B to visitor, "
            )
            assert expected in line
            assert re.search(r", \d+\.\d\d s$", line), line
