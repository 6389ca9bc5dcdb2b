"""Visitors that stall their streams: one client's other tunnels must keep moving.

Real relay and client processes. A local service that never reads (or writes without end to
visitors that never read) stalls its streams; a second tunnel of the same client carries checked
echo traffic the whole time, and the relay's memory and descriptors are sampled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .procs import (
    MIB,
    EchoServer,
    LegitTraffic,
    ResourceSampler,
    SinkServer,
    Visitors,
    fd_count,
    rss_bytes,
    start_hostile_relay,
    start_legit_client,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .procs import ProcessGroup

#: Round trips the other tunnel must complete while the stall is in place (~50 ms apart).
ROUND_TRIPS = 60


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_stalled_streams_do_not_stop_the_other_tunnel(
    procs: ProcessGroup, tmp_path: Path, direction: str
) -> None:
    """Eight stalled streams on one tunnel; the client's echo tunnel stays responsive.

    upload: visitors send without end to a local service that never reads.
    download: the local service writes without end to visitors that never read.
    """
    upload = direction == "upload"
    with EchoServer() as echo, SinkServer(flood=not upload) as sink:
        relay = start_hostile_relay(procs, tmp_path)
        client = start_legit_client(procs, tmp_path, relay, [sink.port, echo.port])
        stalled_port, echo_port = client.forwards[0].port, client.forwards[1].port
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        with (
            ResourceSampler(relay.proc.pid) as sampler,
            LegitTraffic(echo_port) as legit,
            Visitors(stalled_port, 8, source="127.0.0.6", upload=64 * MIB if upload else 0) as v,
        ):
            wait_until(lambda: sink.connections >= 8, timeout=5, what="8 stalled streams")
            # the stall is in place once the stalled side has pushed several MiB
            wait_until(
                lambda: (v.sent if upload else sink.sent) >= 8 * MIB,
                timeout=8,
                what="8 MiB pushed into the stalled streams",
                details=lambda: f"visitors sent {v.sent}, service sent {sink.sent}",
            )
            start = legit.successes
            wait_until(
                lambda: legit.successes >= start + ROUND_TRIPS,
                timeout=8,
                what=f"{ROUND_TRIPS} round trips on the other tunnel during the stall",
                details=lambda: f"{legit.describe()}\n{sampler.describe()}",
            )
            stalled = f"visitors sent {v.sent} B, service sent {sink.sent} B"
        print(f"\nstalled {direction}: {legit.describe()}; {stalled}; {sampler.describe()}")
        legit.assert_healthy(max_gap=3.0, min_successes=ROUND_TRIPS)
    assert sampler.max_fds <= base_fds + 8 + 40, sampler.describe()
    assert sampler.max_rss <= base_rss + 100 * MIB, sampler.describe()


#: Visitors per wave against a local service that never reads.
CROWD = 600
#: ``--max-visitors-per-tunnel`` default.
MAX_VISITORS = 256
#: Seconds the relay may take to close the connections of visitors that reset them.
LET_GO = 10.0


def _crowd_wave(
    relay_pid: int, stalled_port: int, sink: SinkServer, legit: LegitTraffic, base_fds: int
) -> ResourceSampler:
    """One wave: CROWD uploading visitors, 40 round trips on the other tunnel, all reset."""
    with ResourceSampler(relay_pid) as sampler:
        seen = sink.connections
        with Visitors(stalled_port, CROWD, source="127.0.0.7", upload=MIB) as crowd:
            wait_until(
                lambda: sink.connections - seen >= 200,
                timeout=8,
                what="200 visitors' streams at the service",
                details=lambda: f"{sink.connections - seen} streams; {sampler.describe()}",
            )
            start = legit.successes
            wait_until(
                lambda: legit.successes >= start + 40,
                timeout=6,
                what="40 round trips on the other tunnel with the crowd connected",
                details=lambda: f"{legit.describe()}\n{sampler.describe()}",
            )
            crowd.close(abort=True)
        wait_until(
            lambda: fd_count(relay_pid) <= base_fds + 10,
            timeout=LET_GO,
            what="the relay to let go of the visitors' connections",
            details=sampler.describe,
        )
    return sampler


def test_crowd_against_a_service_that_never_reads(procs: ProcessGroup, tmp_path: Path) -> None:
    """600 uploading visitors on one tunnel whose service never reads, in two waves.

    At the default ``--max-visitors-per-tunnel 256`` the relay holds at most 256 of them, its
    memory stays bounded, the client's other tunnel keeps moving, the relay lets go of the
    visitors' connections once they have reset them, and a second wave costs no more than the
    first.
    """
    with EchoServer() as echo, SinkServer() as sink:
        relay = start_hostile_relay(procs, tmp_path)
        client = start_legit_client(procs, tmp_path, relay, [sink.port, echo.port])
        stalled_port, echo_port = client.forwards[0].port, client.forwards[1].port
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        with LegitTraffic(echo_port) as legit:
            first = _crowd_wave(relay.proc.pid, stalled_port, sink, legit, base_fds)
            print(f"\ncrowd wave 1: {first.describe()}; {legit.describe()}")
            second = _crowd_wave(relay.proc.pid, stalled_port, sink, legit, base_fds)
            print(f"crowd wave 2: {second.describe()}; {legit.describe()}")
        legit.assert_healthy(max_gap=3.0, min_successes=80)
    for sampler in (first, second):
        assert sampler.max_fds <= base_fds + MAX_VISITORS + 40, sampler.describe()
        assert sampler.max_rss <= base_rss + 150 * MIB, sampler.describe()
    assert second.max_rss <= first.max_rss + 32 * MIB, (
        f"the second wave cost more memory: {first.describe()} then {second.describe()}"
    )
