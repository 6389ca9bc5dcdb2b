"""The link between client and relay is cut, then restored; default settings.

Two kinds of cut (tests/faults/netlab.py): the router's end of the client's link goes down
(``ip link set down``), or the router silently drops everything (a black hole mid-path).
A cut shorter than the keepalive timeout (30 s) is ridden out: the session stays, open streams
finish intact. A longer cut: both sides declare the silent peer dead within the keepalive timeout
(protocol-spec §10.1), open streams end with an error (a visitor sees a reset, never a clean EOF
of a cut-short stream) after a correct prefix, and once the link is back the client is back
within 5 s with the same public port and new visitors get through (``--resume-window 0``: with
session resumption the session would be resumed instead, tests/faults/test_resume.py).
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

import pytest

from .netlab import build_tunnel, record, visit_result

if TYPE_CHECKING:
    from tests.system.harness import ManagedProcess

    from .netlab import Lab

KEEPALIVE = 30.0  # the default keepalive timeout of relay and client
_DEAD = re.compile(r"peer silent for [\d.]+ s, declaring it dead")
_RECEIVING = re.compile(r"^receiving$")
MiB = 1 << 20
#: (silent, seconds) of the cuts the session must ride out. A link taken down makes the kernel
#: report unreachable (ICMP, carrier) and TCP keeps retrying at its base timeout; a silent black
#: hole of 20 s lets TCP's retransmission timeout grow (muxtunnel.netopts caps it).
#: ``MUXTUNNEL_FAULT_LONG=1`` adds the other combinations (benchmarks/soak.py's long run).
LONG = os.environ.get("MUXTUNNEL_FAULT_LONG", "") not in ("", "0")
SHORT_CUTS = [(False, 5.0), (True, 20.0)] + ([(True, 5.0), (False, 20.0)] if LONG else [])
#: The 60 s cut: silent in every run (reconnect attempts then meet a black hole, not an
#: immediate "no route to host"); with MUXTUNNEL_FAULT_LONG also as a link taken down.
LONG_CUTS = [True, False] if LONG else [True]

pytestmark = pytest.mark.netns


def _cut_id(cut: tuple[bool, float]) -> str:
    silent, seconds = cut
    return f"{'black-hole' if silent else 'link-down'}-{seconds:g}s"


def _wait_dead(proc: ManagedProcess, since: float, timeout: float) -> float:
    proc.wait_for_line(_DEAD, stream="stderr", timeout=timeout, what="the dead-peer line")
    return time.monotonic() - since


@pytest.mark.parametrize(("silent", "seconds"), SHORT_CUTS, ids=[_cut_id(c) for c in SHORT_CUTS])
def test_link_cut_shorter_than_keepalive_keeps_the_session(
    lab: Lab, silent: bool, seconds: float
) -> None:
    t = build_tunnel(lab)
    # Two streams that run through the cut: 2 MiB echoed at 256 KiB/s each.
    streams = [t.visit("echo", 2 * MiB, seed, rate=256 * 1024) for seed in (1, 2)]
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    cut = t.client_host.link.cut(silent=silent)
    time.sleep(seconds)  # the fault itself: the outage
    back = t.client_host.link.restore()
    fresh = visit_result(t.visit("down", MiB, 3))
    first_visitor = time.monotonic() - back
    assert fresh["ok"], fresh
    results = [visit_result(s) for s in streams]
    for r in results:
        assert r["ok"], results
    for proc in (t.client.proc, t.relay.proc):
        assert not any(_DEAD.search(line) for line in proc.stderr_lines), proc.describe()
    assert len(t.client.proc.stdout_lines) == 1, "the client reconnected"  # one forwarding line
    assert first_visitor <= 5.0, f"first visitor after the cut took {first_visitor:.1f} s"
    t.check_logs()
    record(
        f"link-cut-{_cut_id((silent, seconds))}",
        cut_s=round(back - cut, 1),
        detection="none (session kept)",
        recovery_s=round(first_visitor, 2),
        bytes_checked=sum(r["verified"] for r in results) + fresh["verified"],
    )


@pytest.mark.parametrize("silent", LONG_CUTS, ids=[_cut_id((s, 60)) for s in LONG_CUTS])
def test_link_cut_longer_than_keepalive_reconnects_within_5s(lab: Lab, silent: bool) -> None:
    # Without session resumption (tests/faults/test_resume.py has the cuts that resume).
    off = ["--resume-window", "0"]
    t = build_tunnel(lab, relay_args=off, client_args=off)
    streams = [t.visit("echo", 64 * MiB, seed, rate=128 * 1024) for seed in (1, 2)]
    streams.append(t.visit("down", 1 << 36, 4))  # "endless" download, as fast as it goes
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    cut = t.client_host.link.cut(silent=silent)
    det_relay = _wait_dead(t.relay.proc, cut, KEEPALIVE + 15)
    det_client = _wait_dead(t.client.proc, cut, KEEPALIVE + 15)
    results = [visit_result(s, timeout=30) for s in streams]
    for r in results:
        # Cut short: a reset (never a clean EOF), after bytes that were all correct.
        assert r["end"] == "reset", results
        assert r["mismatch"] is None, results
        assert r["verified"] == r["received"] > 0, results
    time.sleep(max(0.0, cut + 60.0 - time.monotonic()))  # the rest of the 60 s outage
    lines = len(t.client.proc.stdout_lines)
    back = t.client_host.link.restore()
    (fwd,), _ = t.client.wait_forwards(1, start=lines, timeout=60)
    reconnect = time.monotonic() - back
    fresh = visit_result(t.visit("down", MiB, 5))
    first_visitor = time.monotonic() - back
    assert fresh["ok"], fresh
    assert fwd.port == t.port, "the tunnel came back on another port"
    assert det_relay <= KEEPALIVE + 3, f"relay took {det_relay:.1f} s to declare the client dead"
    assert det_client <= KEEPALIVE + 3, f"client took {det_client:.1f} s to declare the relay dead"
    assert reconnect <= 5.0, (
        f"client back {reconnect:.1f} s after the link returned\n{lab.describe()}"
    )
    assert first_visitor <= 8.0, f"first visitor after the cut took {first_visitor:.1f} s"
    t.check_logs()
    record(
        f"link-cut-{_cut_id((silent, 60))}",
        cut_s=round(back - cut, 1),
        detection_relay_s=round(det_relay, 2),
        detection_client_s=round(det_client, 2),
        recovery_s=round(reconnect, 2),
        first_visitor_s=round(first_visitor, 2),
        bytes_checked=sum(r["verified"] for r in results) + fresh["verified"],
    )
