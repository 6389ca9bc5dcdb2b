"""Unit tests of muxtunnel.stats (plain Python, no I/O)."""

from __future__ import annotations

import json

import pytest

from muxtunnel.policy import StreamInfo
from muxtunnel.protocol.frames import Address
from muxtunnel.stats import RTT_BUCKETS, Stats, TunnelStats, outcome_of


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def info(sid: int, bytes_in: int = 0, bytes_out: int = 0) -> StreamInfo:
    return StreamInfo(
        stream_id=sid,
        tunnel_id=1,
        origin=Address("127.0.0.1", 40000 + sid),
        target=Address("127.0.0.1", 20001),
        started=0.0,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
    )


def test_tunnel_counts_live_and_closed_bytes() -> None:
    ts = TunnelStats(1, "127.0.0.1:20001")
    a, b = info(1), info(3)
    ts.stream_opened(a)
    ts.stream_opened(b)
    ts.stream_opened(a)  # idempotent
    assert (ts.open, ts.total) == (2, 2)
    a.bytes_in, a.bytes_out = 10, 20
    b.bytes_in = 5
    assert ts.bytes() == (15, 20)
    ts.stream_closed(a, "closed")
    a.bytes_in = 999  # a closed stream's later changes no longer count
    ts.stream_closed(a, "closed")  # idempotent
    assert (ts.open, ts.total) == (1, 2)
    assert ts.bytes() == (15, 20)
    b.bytes_out = 7
    ts.stream_closed(b, "reset")
    assert ts.bytes() == (15, 27)
    assert ts.outcomes == {"closed": 1, "reset": 1}
    ts.stream_closed(info(9))  # never opened: ignored
    assert ts.open == 0


def test_tunnel_state_and_refusals() -> None:
    clock = FakeClock()
    ts = TunnelStats(2, "relay:2222", "127.0.0.1:22", state="pending", clock=clock)
    assert ts.since == 1000.0
    ts.refuse("deny")
    ts.refuse("deny")
    ts.refuse("dial_failed")
    clock.now = 1005.0
    ts.set_state("down", "ADDRESS_IN_USE: port 2222 is in use", clock=clock)
    assert ts.state == "down"
    assert ts.since == 1005.0
    assert ts.last_error == "ADDRESS_IN_USE: port 2222 is in use"
    clock.now = 1009.0
    ts.set_state("down", clock=clock)  # same state: since unchanged, error kept
    assert ts.since == 1005.0
    assert ts.last_error is not None
    with pytest.raises(ValueError, match="unknown tunnel state"):
        ts.set_state("sideways")  # type: ignore[arg-type]
    snap = ts.snapshot()
    assert snap["refused"] == {"deny": 2, "dial_failed": 1}
    assert snap["local"] == "127.0.0.1:22"
    assert snap["public"] == "relay:2222"


def test_snapshot_is_json_and_totals_survive_removal() -> None:
    clock = FakeClock()
    stats = Stats("relay", clock=clock)
    s1 = stats.add_session("127.0.0.1:5000", "alice", rtt=lambda: 0.002)
    s2 = stats.add_session("127.0.0.1:5001", None)
    t1 = s1.add_tunnel(1, "127.0.0.1:20001")
    t2 = s2.add_tunnel(7, "private:db")
    a, b = info(1, 100, 200), info(3, 1, 2)
    t1.stream_opened(a)
    t2.stream_opened(b)
    t1.refuse("allow")
    stats.count("auth_failures")
    stats.count("auth_failures", 2)
    clock.now = 1010.0
    snap = json.loads(json.dumps(stats.snapshot()))
    assert snap["role"] == "relay"
    assert snap["uptime"] == 10.0
    assert [s["peer"] for s in snap["sessions"]] == ["127.0.0.1:5000", "127.0.0.1:5001"]
    assert snap["sessions"][0]["rtt"] == 0.002
    assert snap["sessions"][0]["token"] == "alice"
    assert snap["sessions"][1]["rtt"] is None
    assert snap["sessions"][0]["tunnels"][0]["bytes_in"] == 100
    assert snap["counters"] == {"auth_failures": 3, "sessions_total": 2}
    assert snap["totals"] == {
        "sessions": 2,
        "tunnels": 2,
        "streams_open": 2,
        "streams_total": 2,
        "bytes_in": 101,
        "bytes_out": 202,
        "refused": 1,
        "sessions_total": 2,
    }
    t1.stream_closed(a)
    s1.remove_tunnel(1)
    s1.remove_tunnel(1)  # idempotent
    stats.remove_session(s2)  # retires the open stream's bytes as of now
    stats.remove_session(s2)
    totals = stats.totals()
    assert totals["sessions"] == 1
    assert totals["tunnels"] == 0
    assert totals["streams_open"] == 0
    assert (totals["streams_total"], totals["bytes_in"], totals["bytes_out"]) == (2, 101, 202)
    assert totals["refused"] == 1


def test_add_tunnel_replaces_and_retires() -> None:
    stats = Stats("client")
    ss = stats.add_session("relay:7000")
    t = ss.add_tunnel(1, "relay:2222", "127.0.0.1:22")
    t.stream_opened(info(1, 4, 5))
    t2 = ss.add_tunnel(1, "relay:2223", "127.0.0.1:22")
    assert ss.tunnels == {1: t2}
    assert stats.totals()["bytes_in"] == 4
    assert stats.tunnels() == [(ss, t2)]


def test_rtt_that_raises_reads_as_unknown() -> None:
    stats = Stats("client")

    def broken() -> float | None:
        raise RuntimeError("gone")

    ss = stats.add_session("relay:7000", rtt=broken)
    assert ss.current_rtt() is None
    assert stats.snapshot()["sessions"][0]["rtt"] is None


def test_rtt_histogram_buckets_are_bounded() -> None:
    stats = Stats("relay")
    for sample in (0.0005, 0.0004, 0.003, 100.0, float("nan"), -1.0):
        stats.observe_rtt(sample)
    assert stats.rtt_count == 4
    assert stats.rtt_sum == pytest.approx(100.0039)
    assert len(stats.rtt_buckets) == len(RTT_BUCKETS) + 1
    cumulative = stats.rtt_cumulative()
    assert cumulative[0] == (0.0005, 2)  # le semantics: 0.0005 falls in the 0.0005 bucket
    assert dict(cumulative)[0.005] == 3
    assert cumulative[-1] == (float("inf"), 4)
    snap = stats.snapshot()["rtt"]
    assert snap["buckets"][-1] == [None, 1]
    assert snap["count"] == 4
    json.dumps(snap)


def test_outcome_of_splice_results() -> None:
    from muxtunnel.splice import SpliceResult

    assert outcome_of(None) == "cancelled"
    assert outcome_of(SpliceResult()) == "closed"
    assert outcome_of(SpliceResult(error="x", rejected=True)) == "rejected"
    assert (
        outcome_of(SpliceResult(error="x", failed_side="mux", mux_failure="stalled")) == "stalled"
    )
    assert outcome_of(SpliceResult(error="x", failed_side="mux")) == "reset"
    assert outcome_of(SpliceResult(error="x", failed_side="tcp")) == "local_error"
    assert outcome_of(SpliceResult(error="x")) == "error"
