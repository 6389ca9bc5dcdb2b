"""The bench's several-connections target (``muxtunnel-conns``) and scenario 7's selection."""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING

import pytest

import muxtunnel.benchsuite as suite
from muxtunnel.benchsuite import report
from muxtunnel.benchsuite.procs import BenchError
from muxtunnel.benchsuite.runner import Outcome
from muxtunnel.benchsuite.targets import (
    CONNS,
    DEFAULT_CONNECTIONS,
    Layout,
    MuxTarget,
    _require_client_option,
    connections_of,
    is_target,
    label,
    make_target,
)

if TYPE_CHECKING:
    from pathlib import Path


def test_conns_target_names_carry_the_connection_count() -> None:
    assert connections_of(CONNS) == DEFAULT_CONNECTIONS
    assert connections_of(f"{CONNS}8") == 8
    assert label(CONNS) == f"muxtunnel --connections {DEFAULT_CONNECTIONS}"
    assert label(f"{CONNS}2") == "muxtunnel --connections 2"
    for bad in (f"{CONNS}1", f"{CONNS}17", f"{CONNS}x", "muxtunnel-con"):
        assert connections_of(bad) is None
        assert not is_target(bad)
    assert connections_of("muxtunnel") is None


def test_default_targets_add_conns_to_the_50ms_path_only() -> None:
    keys, wan = suite._target_keys(None)
    assert CONNS not in keys
    assert wan[:3] == ["direct", "muxtunnel", CONNS]
    keys, wan = suite._target_keys(f"{CONNS}8,direct,{CONNS}2,muxtunnel")
    assert keys == wan == ["direct", "muxtunnel", f"{CONNS}2", f"{CONNS}8"]


@pytest.mark.parametrize("argv", [["--scenarios", "7,9"], ["--targets", "direct,nothing"]])
def test_unknown_scenarios_and_targets_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="unknown choice"):
        suite.main(argv)


def test_a_client_without_the_option_is_refused_in_one_line() -> None:
    with pytest.raises(BenchError, match="no --no-such-option option"):
        _require_client_option(sys.executable, None, "--no-such-option")


def _outcome(
    direct: float, one: float, several: float, loss_direct: float, loss_several: float
) -> Outcome:
    out = Outcome()
    for sid, key, mbps in (
        ("7", "direct", direct),
        ("7", "muxtunnel", one),
        ("7", CONNS, several),
        ("7loss", "direct", loss_direct),
        ("7loss", CONNS, loss_several),
    ):
        out.add(sid, key, {"mbps": mbps})
    return out


def test_report_judges_several_connections_against_direct() -> None:
    out = _outcome(direct=100.0, one=40.0, several=96.0, loss_direct=50.0, loss_several=39.0)
    verdicts = {c.goal: c for c in report.checks(out)}
    one = verdicts["50 ms RTT 100 streams, one connection >= 0.9x direct"]
    assert one.met is False
    assert one.value == pytest.approx(0.4)
    path = verdicts["50 ms RTT 100 streams, several connections >= 0.95x direct"]
    assert path.met is True
    assert path.measured == f"0.96x (--connections {DEFAULT_CONNECTIONS})"
    loss = verdicts["50 ms RTT + 1% loss 100 streams, several connections >= 0.8x direct"]
    assert loss.met is False
    assert loss.value == pytest.approx(0.78)
    text = report.table(out)
    assert f"muxtunnel --connections {DEFAULT_CONNECTIONS}" in text
    row = next(line for line in text.splitlines() if line.startswith("7 50ms RTT many streams"))
    # several/direct and several/one connection, after muxtunnel's own ratios
    assert row.split()[-2:] == ["0.96x", "2.40x"]


def test_conns_target_starts_a_client_whose_extra_connections_joined(tmp_path: Path) -> None:
    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen()
        target = make_target(f"{CONNS}2", Layout(), service.getsockname()[1], tmp_path)
        assert isinstance(target, MuxTarget)
        try:
            target.start()
            assert target.alive()
            assert "--connections 2 (2 connected)" in target.note
            assert "--connections" in target.children[1].argv
        finally:
            target.stop()
