"""Window arithmetic and auto-tuning, with a deterministic clock."""

from __future__ import annotations

import pytest

from muxtunnel.protocol.flowcontrol import (
    ReceiveWindow,
    SendCredit,
    min_conn_window,
)

KiB = 1024
MiB = 1024 * KiB


def test_send_credit_only_raises() -> None:
    credit = SendCredit(100)
    credit.sent = 40
    assert not credit.raise_limit(100)
    assert not credit.raise_limit(50)
    assert credit.raise_limit(101)
    assert credit.limit == 101


def test_receive_counts_against_advertised() -> None:
    rw = ReceiveWindow(16 * KiB, 64 * KiB)
    assert rw.receive(16 * KiB)
    assert not rw.receive(1)
    assert rw.received == 16 * KiB
    assert rw.buffered == 16 * KiB
    with pytest.raises(ValueError):
        rw.consume(16 * KiB + 1)
    with pytest.raises(ValueError):
        rw.consume(-1)


def test_half_window_rule_without_rtt_never_grows() -> None:
    rw = ReceiveWindow(256 * KiB, 16 * MiB)
    rw.receive(128 * KiB - 1)
    rw.consume(128 * KiB - 1)
    assert not rw.maybe_update(0.0, None)  # more than half the window still open
    rw.receive(1)
    rw.consume(1)
    assert rw.maybe_update(0.0, None)
    assert rw.advertised == 128 * KiB + 256 * KiB
    assert rw.window == 256 * KiB


def test_doubling_needs_two_updates_within_two_rtts() -> None:
    """The deterministic flow-control vector: clock + consumption trace -> WINDOW offsets."""
    rw = ReceiveWindow(256 * KiB, 1 * MiB, now=0.0)
    srtt = 0.010
    offsets = []
    now = 0.0
    for _ in range(6):
        now += 0.005  # half a window consumed every 5 ms < 2 * srtt: window-limited
        n = rw.advertised - rw.consumed - rw.window // 2
        rw.receive(n)
        rw.consume(n)
        assert rw.maybe_update(now, srtt)
        offsets.append((rw.advertised, rw.window))
    assert [w for _, w in offsets] == [512 * KiB, 1 * MiB, 1 * MiB, 1 * MiB, 1 * MiB, 1 * MiB]
    # Slow consumption (updates 1 s apart) never grows the window.
    slow = ReceiveWindow(256 * KiB, 16 * MiB, now=0.0)
    for step in range(1, 4):
        slow.receive(128 * KiB)
        slow.consume(128 * KiB)
        assert slow.maybe_update(float(step), srtt)
    assert slow.window == 256 * KiB


def test_budget_can_refuse_growth() -> None:
    asked: list[int] = []

    def budget(n: int) -> bool:
        asked.append(n)
        return False

    rw = ReceiveWindow(256 * KiB, 16 * MiB)
    rw.receive(128 * KiB)
    rw.consume(128 * KiB)
    assert rw.maybe_update(0.001, 0.01, budget)
    assert rw.window == 256 * KiB
    assert asked == [256 * KiB]


def test_stream_growth_keeps_connection_at_one_and_a_half() -> None:
    assert min_conn_window(16 * MiB) == 24 * MiB
    conn = ReceiveWindow(2 * MiB, 64 * MiB)
    assert conn.ensure_window(min_conn_window(16 * MiB))
    assert conn.window == 24 * MiB


def test_kept_bytes_leave_the_rest_of_the_connection_window_open() -> None:
    """Spec §8.5: credit held by bytes beyond the budget shrinks the grant, not the updates."""
    conn = ReceiveWindow(1 * MiB, 1 * MiB)
    conn.receive(1 * MiB)
    conn.consume(1 * MiB - 256 * KiB)  # 256 KiB are kept (held beyond the budget)
    # advertised - received = 0 <= 512 KiB: update, granting window - kept beyond received.
    assert conn.maybe_update(0.0, None, kept=256 * KiB)
    assert conn.advertised - conn.received == 1 * MiB - 256 * KiB
    # Kept bytes that pin the whole window stop the updates until they are consumed.
    full = ReceiveWindow(1 * MiB, 1 * MiB)
    full.receive(1 * MiB)
    assert not full.maybe_update(0.0, None, kept=1 * MiB)
    assert full.advertised == 1 * MiB


def test_ensure_window() -> None:
    rw = ReceiveWindow(64 * KiB, 1 * MiB)
    assert not rw.ensure_window(64 * KiB)
    assert rw.ensure_window(128 * KiB)
    assert rw.advertised == 128 * KiB
    assert rw.ensure_window(4 * MiB)
    assert rw.window == 1 * MiB
    # Growth that does not move the offset (advertised already ahead).
    rw2 = ReceiveWindow(64 * KiB, 1 * MiB)
    rw2.advertised = 10 * MiB
    assert not rw2.ensure_window(128 * KiB)
    assert rw2.window == 128 * KiB
