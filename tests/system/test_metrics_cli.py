"""``--metrics HOST:PORT`` on real ``muxtunnel server`` / ``client`` processes, scraped over HTTP.

The relay takes the option as a flag, the client from its ``--config`` file (TOML key
``metrics``); a known transfer through the tunnel must show up byte for byte.
"""

from __future__ import annotations

import secrets
import socket
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import (
    EchoServer,
    ProcessGroup,
    echo_roundtrip,
    free_port,
    muxtunnel_command,
    muxtunnel_env,
    start_client,
    start_relay,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.system

#: Bytes sent through the tunnel (and echoed back).
N = 1_000_003


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``GET http://127.0.0.1:PORT/metrics``: every sample by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    hits = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(hits) == 1, (name, labels, sorted(k for k in samples if k[0] == name))
    return hits[0]


def test_scrape_relay_and_client_processes(procs: ProcessGroup, tmp_path: Path) -> None:
    relay_port, client_port = free_port(), free_port()
    relay = start_relay(
        procs,
        tmp_path,
        token=secrets.token_urlsafe(24),
        extra_args=["--metrics", f"127.0.0.1:{relay_port}"],
    )
    config = tmp_path / "client.toml"
    config.write_text(f'[client]\nmetrics = "127.0.0.1:{client_port}"\n')
    with EchoServer() as echo:
        client = start_client(
            procs, tmp_path, relay, [str(echo.port)], extra_args=["--config", str(config)]
        )
        (forward,) = client.forwards
        payload = secrets.token_bytes(N)
        assert echo_roundtrip(forward.port, payload, timeout=30) == payload
    tunnel = f"127.0.0.1:{forward.port}"

    for port, role in ((relay_port, "relay"), (client_port, "client")):
        # The splices count their last bytes as the stream ends: wait for it to be closed.
        def streams_closed(port: int = port) -> bool:
            return sample(scrape(port), "muxtunnel_streams_open") == 0

        wait_until(
            streams_closed,
            timeout=20,
            what=f"the {role}'s stream to close",
            details=procs.describe,
        )
        samples = scrape(port)
        for direction in ("from_visitor", "to_visitor"):
            got = sample(
                samples, "muxtunnel_tunnel_bytes_total", tunnel=tunnel, direction=direction
            )
            assert got == N, (role, direction)
            assert sample(samples, "muxtunnel_bytes_total", direction=direction) == N
        assert sample(samples, "muxtunnel_tunnel_streams_total", tunnel=tunnel) == 1
        assert sample(samples, "muxtunnel_sessions", role=role) == 1
        assert sample(samples, "muxtunnel_tunnels", state="up") == 1
        count = sample(samples, "muxtunnel_rtt_seconds_count")
        assert sample(samples, "muxtunnel_rtt_seconds_bucket", le="+Inf") == count
        if role == "client":  # its PING at the start of the session has been answered
            assert count > 0
    # The usual HTTP answer for other paths, and the process is still serving.
    with pytest.raises(urllib.error.HTTPError) as not_found:
        urllib.request.urlopen(f"http://127.0.0.1:{relay_port}/other", timeout=10)
    assert not_found.value.code == 404
    not_found.value.close()
    assert relay.proc.returncode is None
    assert client.proc.returncode is None


def test_metrics_port_in_use_before_any_token(procs: ProcessGroup, tmp_path: Path) -> None:
    """A taken --metrics port: one error line naming it, exit 1, no token printed or stored."""
    state = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [
            *muxtunnel_command(),
            "server",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            "--metrics",
            f"127.0.0.1:{port}",
        ]
        proc = procs.start("relay", argv, env=muxtunnel_env(tmp_path), cwd=tmp_path)
        assert proc.wait_exit() == 1
    assert proc.stdout_lines == []  # no fingerprint, no token
    assert len(proc.stderr_lines) == 1, proc.describe()
    assert f"127.0.0.1:{port}" in proc.stderr_lines[0]
    assert "--metrics" in proc.stderr_lines[0]
    assert "in use" in proc.stderr_lines[0]
    assert not state.exists() or not any(state.iterdir())
