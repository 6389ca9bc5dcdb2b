"""Window auto-tuning over a simulated link (protocol-spec §8.6; guards against a window that never grows).

A discrete-time model: 1 ms ticks, a link of fixed rate and one-way delay in each direction.
The server streams bulk data on one stream; the client consumes everything at once. With a
BDP well above the initial 256 KiB window, the window must grow by doubling and throughput
must approach the link rate; with a BDP below it, the window must not grow at all.
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest

from muxtunnel.protocol.events import DataReceived

from .helpers import SessionPair

KiB = 1024
MiB = 1024 * KiB


def simulate(rate_per_ms: int, one_way_ms: int, total: int) -> tuple[float, int, list[int]]:
    """Run the transfer; return (throughput in the second half / link rate, window, windows)."""
    pair = SessionPair()
    server, client = pair.server, pair.client
    # The first RTT sample, as the adapter's PING right after HELLO gives.
    client.ping(0.0)
    pair.send(client)
    pair.now = 2 * one_way_ms / 1000
    pair.send(server)
    start = pair.now
    sid = pair.open()
    downlink: deque[tuple[float, bytes]] = deque()
    uplink: deque[tuple[float, bytes]] = deque()
    queued = 0
    received = 0
    received_at_half = 0
    half_time = 0.0
    windows: list[int] = []
    tick = 0
    stream = client._streams[sid]
    while received < total:
        tick += 1
        assert tick < 100_000, "transfer stalled"
        now = start + tick / 1000
        pair.now = now
        if queued < total and server.pending_bytes(sid) < 4 * MiB:
            server.send_data(sid, bytes(1 * MiB))
            queued += 1 * MiB
        wire = server.data_to_send(rate_per_ms)  # the link takes rate_per_ms bytes per tick
        if wire:
            downlink.append((now + one_way_ms / 1000, wire))
        while downlink and downlink[0][0] <= now:
            for event in client.receive_data(downlink.popleft()[1], now):
                if isinstance(event, DataReceived):
                    received += len(event.data)
                    client.acknowledge(sid, len(event.data), now)
        back = client.data_to_send()
        if back:
            uplink.append((now + one_way_ms / 1000, back))
        while uplink and uplink[0][0] <= now:
            server.receive_data(uplink.popleft()[1], now)
        if not windows or windows[-1] != stream.recv.window:
            windows.append(stream.recv.window)
        if not half_time and received >= total // 2:
            half_time, received_at_half = now, received
    elapsed = pair.now - half_time
    throughput = (received - received_at_half) / elapsed / 1000  # bytes per ms
    return throughput / rate_per_ms, stream.recv.window, windows


def test_window_doubles_toward_the_bdp() -> None:
    # 64 MB/s, 20 ms RTT: BDP = 1.25 MiB, five times the initial window.
    ratio, window, windows = simulate(64_000, 10, 48 * MiB)
    assert ratio >= 0.8
    assert window >= 2 * MiB
    assert windows[:3] == [256 * KiB, 512 * KiB, 1 * MiB]  # doubling, no jumps
    assert all(b == 2 * a for a, b in itertools.pairwise(windows))


@pytest.mark.parametrize("one_way_ms", [1])
def test_window_stays_put_when_the_bdp_is_small(one_way_ms: int) -> None:
    # 10 MB/s, 2 ms RTT: BDP = 20 KB, far below 256 KiB.
    ratio, window, _ = simulate(10_000, one_way_ms, 4 * MiB)
    assert ratio >= 0.9
    assert window == 256 * KiB
