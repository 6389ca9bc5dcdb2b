"""The bench's targets: ``muxtunnel-noresume`` runs both ends with resumption off; the bare
ceiling relay forwards bytes."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import pytest
import trio

import muxtunnel.benchsuite as suite
from muxtunnel import admin
from muxtunnel.benchsuite import report
from muxtunnel.benchsuite.procs import BenchError
from muxtunnel.benchsuite.runner import Outcome
from muxtunnel.benchsuite.targets import CeilingTarget, Layout, MuxTarget, make_target

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def _relay_sessions(target: MuxTarget) -> list[dict[str, object]]:
    addresses = admin.discover(target.workdir / f"{target.key}-server")
    snapshots, errors = trio.run(admin.query_all, addresses)
    assert not errors
    relay = [s for s in snapshots if s["role"] == "relay"]
    assert len(relay) == 1
    sessions: list[dict[str, object]] = relay[0]["sessions"]
    return sessions


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(65536)
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


@pytest.fixture
def service() -> Iterator[socket.socket]:
    """A listening loopback socket standing in for the service behind a target."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.settimeout(10)
        yield sock


@pytest.mark.parametrize(("key", "resumable"), [("muxtunnel", True), ("muxtunnel-noresume", False)])
def test_mux_targets_choose_session_resumption(
    tmp_path: Path, service: socket.socket, key: str, resumable: bool
) -> None:
    target = make_target(key, Layout(), service.getsockname()[1], tmp_path)
    assert isinstance(target, MuxTarget)
    try:
        target.start()
        (session,) = _relay_sessions(target)
        # The relay reports a replay log size only for a session with resumption on.
        if resumable:
            assert isinstance(session["replay"], int)
        else:
            assert session["replay"] is None
        assert target.alive()
    finally:
        target.stop()


@pytest.mark.parametrize("key", ["ceiling", "ceiling-tcp"])
def test_ceiling_targets_carry_bytes_both_ways(
    tmp_path: Path, service: socket.socket, key: str
) -> None:
    """The bare relay target forwards a visitor to the service and back, byte for byte."""
    target = make_target(key, Layout(), service.getsockname()[1], tmp_path)
    assert isinstance(target, CeilingTarget)
    try:
        target.start()
        assert ("TLS 1.3" in target.note) == (key == "ceiling")
        payload = os.urandom(300_000)
        with socket.create_connection((target.host, target.port), timeout=10) as visitor:
            conn, _ = service.accept()
            with conn:
                conn.settimeout(10)
                visitor.sendall(payload)
                assert _read_exactly(conn, len(payload)) == payload
                conn.sendall(payload[::-1])
                assert _read_exactly(visitor, len(payload)) == payload[::-1]
        assert target.alive()
        assert target.relay_rss() is not None
    finally:
        target.stop()


def test_ceiling_target_is_loopback_only(tmp_path: Path) -> None:
    target = make_target("ceiling", Layout(relay_ns="r", edge_ns="e"), 1, tmp_path)
    with pytest.raises(BenchError, match="loopback only"):
        target.start()
    assert not target.children


def test_default_loopback_targets_include_the_ceiling_but_not_the_50ms_path() -> None:
    keys, wan = suite._target_keys(None)
    assert keys[-1] == "ceiling"
    assert "ceiling" not in wan


def test_report_shows_the_bare_relay_beside_each_goal_against_ssh() -> None:
    out = Outcome()
    for key, put, get, rtt, conns in (
        ("muxtunnel", 250.0, 300.0, 750.0, 600.0),
        ("ssh-aes128", 500.0, 400.0, 300.0, 2000.0),
        ("ssh", 300.0, 300.0, 320.0, 1900.0),
        ("ceiling", 350.0, 280.0, 540.0, 1600.0),
    ):
        out.add("1", key, {"put_mbps": put, "get_mbps": get})
        out.add("3", key, {"p50_us": rtt})
        out.add("5", key, {"per_second": conns})
    verdicts = {c.goal: c for c in report.checks(out)}
    one = verdicts["one stream >= 1.0x ssh -R aes128-gcm (worse of up/down)"]
    assert (one.met, one.measured) == (False, "0.5x (bare relay: 0.7x)")
    idle = verdicts["idle RTT p50 <= 1.5x ssh -R (the faster ssh)"]
    assert (idle.met, idle.measured) == (False, "2.5x (bare relay: 1.8x)")
    rate = verdicts["new tunnelled connections/s >= 1.0x ssh -R aes128-gcm"]
    assert (rate.met, rate.measured) == (False, "0.3x (bare relay: 0.8x)")
    row = next(line for line in report.table(out).splitlines() if line.startswith("3 idle"))
    assert row.split()[-1] == f"{750 / 540:.2f}x"  # mux/ceiling
    # Without the bare relay the figures stand alone.
    del out.runs["3"]["ceiling"]
    idle = {c.goal: c for c in report.checks(out)}["idle RTT p50 <= 1.5x ssh -R (the faster ssh)"]
    assert idle.measured == "2.5x"


def test_results_header_names_the_runs_of_each_scenario() -> None:
    out = Outcome()
    out.add("3", "muxtunnel", {"p50_us": 600.0})
    meta = {
        "command": "muxtunnel bench",
        "runs": 3,
        "machine": report.machine(),
        "wall_seconds": 60.0,
    }
    own = report.results_md(out, {**meta, "sizes": {"pg_runs": 5}})
    assert "median of 3 run(s) (scenario 8: 5) in one invocation" in own
    same = report.results_md(out, {**meta, "sizes": {"pg_runs": 3}})
    assert "median of 3 run(s) in one invocation" in same
    older = report.results_md(out, meta)  # a JSON file written before scenario 8 had its own
    assert "median of 3 run(s) in one invocation" in older
