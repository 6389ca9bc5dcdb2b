"""kill -9 of the client, of the relay and of the local service, each in the middle of transfers.

Every stream that was open ends (never hangs) after bytes that were all correct; the tunnel is
back with the same public ports once the killed process is back (the client retries the relay
with backoff; the relay's leases survive a kill -9: muxtunnel/leasestore.py); the service's
death closes its visitors' connections and leaves the session up. Session resumption is off in
the kills of client and relay (``--resume-window 0``; tests/faults/test_resume.py has them with it on).
"""

from __future__ import annotations

import re
import signal
import time
from typing import TYPE_CHECKING

import pytest

from .netlab import build_tunnel, record, visit_result

if TYPE_CHECKING:
    from tests.system.harness import ManagedProcess

    from .netlab import Lab, Tunnel

MiB = 1 << 20
NO_RESUME = ["--resume-window", "0"]
_RECEIVING = re.compile(r"^receiving$")

pytestmark = pytest.mark.netns


def _running_streams(t: Tunnel) -> list[ManagedProcess]:
    """Two paced echo streams and an endless download, all under way when this returns."""
    streams = [t.visit("echo", 64 * MiB, seed, rate=256 * 1024, timeout=60) for seed in (21, 22)]
    streams.append(t.visit("down", 1 << 36, 23, timeout=60))
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    return streams


def _ended_intact(streams: list[ManagedProcess], since: float) -> tuple[int, float]:
    """Each stream ended (reset or EOF, not a timeout) with correct bytes only; returns the
    bytes checked and the seconds from ``since`` until the last one ended."""
    results = [visit_result(s, timeout=90) for s in streams]
    ended = time.monotonic() - since
    for r in results:
        assert r["end"] in ("reset", "eof"), results
        assert r["mismatch"] is None, results
        assert r["verified"] == r["received"] > 0, results
        assert not r["ok"], results  # none of them can have finished
    return sum(r["verified"] for r in results), ended


def test_kill_client_mid_transfer(lab: Lab) -> None:
    t = build_tunnel(lab, relay_args=NO_RESUME, client_args=NO_RESUME)
    streams = _running_streams(t)
    t.client.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    checked, ended = _ended_intact(streams, killed)
    assert ended <= 10.0, f"visitors' streams took {ended:.1f} s to end"
    restart = time.monotonic()
    client = lab.start_client(
        t.client_host, t.relay, [f"{t.service_host.addr}:9000"], name="client", extra_args=NO_RESUME
    )
    recovery = time.monotonic() - restart
    assert client.forwards[0].port == t.port, "the restarted client got another port"
    fresh = visit_result(t.visit("down", MiB, 24))
    assert fresh["ok"], fresh
    t.check_logs()
    record(
        "kill-9-client",
        detection_s=round(ended, 2),
        recovery_s=round(recovery, 2),
        bytes_checked=checked + fresh["verified"],
    )


def test_kill_relay_mid_transfer(lab: Lab) -> None:
    t = build_tunnel(lab, relay_args=NO_RESUME, client_args=NO_RESUME)
    streams = _running_streams(t)
    lines = len(t.client.proc.stdout_lines)
    t.relay.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    checked, ended = _ended_intact(streams, killed)
    t.client.proc.wait_for_line(
        re.compile(r"session with relay .* ended"), stream="stderr", timeout=30
    )
    detection = time.monotonic() - killed
    time.sleep(max(0.0, killed + 3.0 - time.monotonic()))  # the relay stays down for 3 s
    relay = lab.start_relay(
        t.relay_host,
        token=t.relay.token,
        state_dir=t.relay.state_dir,
        name="relay-restarted",
        extra_args=NO_RESUME,
    )
    back = time.monotonic()
    assert relay.fingerprint == t.relay.fingerprint
    (fwd,), _ = t.client.wait_forwards(1, start=lines, timeout=60)
    recovery = time.monotonic() - back
    assert fwd.port == t.port, "the tunnel came back on another port"
    # The relay answered (refused) while it was down: backoff 0.5 s doubling per attempt,
    # jittered; it was down ~3 s plus its start, so the next attempt is a few seconds away.
    assert recovery <= 15.0, f"client back {recovery:.1f} s after the relay\n{lab.describe()}"
    fresh = visit_result(t.visit("down", MiB, 25))
    assert fresh["ok"], fresh
    t.check_logs()
    record(
        "kill-9-relay",
        detection_s=round(detection, 2),
        streams_ended_s=round(ended, 2),
        recovery_s=round(recovery, 2),
        bytes_checked=checked + fresh["verified"],
    )


def test_kill_local_service_mid_transfer(lab: Lab) -> None:
    t = build_tunnel(lab)
    streams = _running_streams(t)
    t.service.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    checked, ended = _ended_intact(streams, killed)
    assert ended <= 10.0, f"visitors' streams took {ended:.1f} s to end"
    # While the service is down a visitor is closed at once (the client's dial is refused).
    refused = visit_result(t.visit("down", MiB, 26, timeout=30))
    assert refused["received"] == 0, refused
    assert refused["end"] in ("reset", "eof"), refused
    assert refused["seconds"] < 10, refused
    t.service_host.serve(9000, name="service-restarted")
    fresh = visit_result(t.visit("down", MiB, 27))
    assert fresh["ok"], fresh
    assert len(t.client.proc.stdout_lines) == 1, "the session was lost"
    t.check_logs()
    record(
        "kill-9-service",
        detection_s=round(ended, 2),
        refused_visitor_closed_s=refused["seconds"],
        bytes_checked=checked + fresh["verified"],
    )
