"""The lab itself: hosts reach each other through the router; cut, loss and delay do what they say."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .netlab import visit_result

if TYPE_CHECKING:
    from .netlab import Lab

pytestmark = pytest.mark.netns


def test_lab_links_cut_loss_and_delay(lab: Lab) -> None:
    a = lab.host("a")
    b = lab.host("b", delay_ms=20, jitter_ms=5)
    svc = a.serve(9000)
    got = visit_result(b.visit(a.addr, 9000, "down", 1 << 20, 7))
    assert got["ok"], got
    assert got["verified"] == 1 << 20

    p = b.probe(a.addr, 9000, count=5)
    assert p["ok"] == 5, p
    assert 30 <= p["median_ms"] <= 200, p  # a connect takes one round trip: 2 x (20 +- 5) ms

    b.link.cut()
    assert b.probe(a.addr, 9000, count=1, timeout=1.0)["ok"] == 0, "a cut link carried a connect"
    b.link.restore()
    assert b.probe(a.addr, 9000, count=1, timeout=5.0)["ok"] == 1, "the restored link is dead"

    b.link.set_loss(50.0)
    p = b.probe(a.addr, 9000, count=20, timeout=0.3)  # SYN and SYN-ACK must both pass: ~25 %
    assert 0 < p["ok"] <= 14, p
    b.link.clear_loss()
    assert b.probe(a.addr, 9000, count=5, timeout=1.0)["ok"] == 5
    assert svc.returncode is None
