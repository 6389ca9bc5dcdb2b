"""A lossy, slow path between client and relay: 2 % loss each way, 100 ms RTT with jitter.

Transfers both ways complete intact (every byte checked against its seed), and the keepalive
never kills the busy but slow session: relay and client run with the shortest keepalive
timeout the options allow (5 s), so a keepalive that mistook slowness for death would show.

``MUXTUNNEL_FAULT_BYTES`` sets the size of each transfer (default 4 MiB; benchmarks/soak.py
or a manual run uses 100 MiB: ``MUXTUNNEL_FAULT_BYTES=104857600 pytest tests/faults -k loss``).
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

import pytest

from .netlab import build_tunnel, record, visit_result

if TYPE_CHECKING:
    from .netlab import Lab

_DEAD = re.compile(r"peer silent for [\d.]+ s, declaring it dead")
SIZE = int(os.environ.get("MUXTUNNEL_FAULT_BYTES", str(4 << 20)))

pytestmark = pytest.mark.netns


def test_lossy_slow_link_carries_transfers_intact(lab: Lab) -> None:
    keepalive = ["--keepalive-timeout", "5"]
    t = build_tunnel(
        lab,
        client_delay_ms=50,
        client_jitter_ms=10,
        relay_args=keepalive,
        client_args=keepalive,
    )
    t.client_host.link.set_loss(2.0)
    timeout = max(300.0, SIZE / 20_000)  # generous: 2 % loss at 100 ms RTT is slow
    start = time.monotonic()
    visitors = [
        t.visit("down", SIZE, 11, timeout=timeout),
        t.visit("up", SIZE // 2, 12, timeout=timeout),
        t.visit("echo", SIZE // 4, 13, timeout=timeout),
    ]
    results = [visit_result(v, timeout=timeout + 30) for v in visitors]
    elapsed = time.monotonic() - start
    for r in results:
        assert r["ok"], results
    checked = sum(r["verified"] for r in results)
    assert checked == SIZE + SIZE // 2 + SIZE // 4
    for proc in (t.client.proc, t.relay.proc):
        dead = [line for line in proc.stderr_lines if _DEAD.search(line)]
        assert not dead, f"the keepalive killed a busy link: {dead}\n{proc.describe()}"
    assert len(t.client.proc.stdout_lines) == 1, "the client reconnected"
    t.check_logs()
    record(
        "loss-2pct-rtt-100ms",
        detection="none (no false dead-peer verdict, keepalive 5 s)",
        transfer_s=round(elapsed, 1),
        throughput_kib_s=round(checked / elapsed / 1024),
        bytes_checked=checked,
    )
