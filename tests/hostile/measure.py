"""Figures for the hostile-input scenarios, without assertions: median of N runs.

Run from a repository root with that tree's interpreter (the processes use it too)::

    python -m tests.hostile.measure [idle-flood] [stalled-streams] [crowd] [token-share] --runs 3

Each scenario prints one line per run and the medians: relay peak RSS (MiB) and descriptors,
and how the legitimate party fared (time to authenticate, longest gap, ports); ``inf`` means
"not within the scenario's time limit".
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .procs import (
    MIB,
    EchoServer,
    IdleConnections,
    LegitTraffic,
    ProcessGroup,
    ResourceSampler,
    SinkServer,
    Visitors,
    mux_handshake,
    start_client,
    start_hostile_relay,
    start_legit_client,
)

if TYPE_CHECKING:
    from collections.abc import Callable

Figures = dict[str, float]


def idle_flood(group: ProcessGroup, workdir: Path) -> Figures:
    """300 idle TCP connections from 127.0.0.2; time until 127.0.0.1 authenticates."""
    relay = start_hostile_relay(group, workdir)
    with (
        ResourceSampler(relay.proc.pid) as sampler,
        IdleConnections(relay.host, relay.port, count=300, duration=20) as attack,
    ):
        attack.wait_open(300, timeout=5)
        start = time.monotonic()
        got_in = float("inf")
        while time.monotonic() - start < 12:
            if mux_handshake(relay.host, relay.port, relay.token, timeout=2).outcome == (
                "authenticated"
            ):
                got_in = time.monotonic() - start
                break
            time.sleep(0.2)
    return {"auth_s": got_in, "rss_mib": sampler.max_rss / MIB, "fds": sampler.max_fds}


def stalled_streams(group: ProcessGroup, workdir: Path) -> Figures:
    """8 visitors uploading to a service that never reads; the echo tunnel's longest gap."""
    with EchoServer() as echo, SinkServer() as sink:
        relay = start_hostile_relay(group, workdir)
        client = start_legit_client(group, workdir, relay, [sink.port, echo.port])
        with (
            ResourceSampler(relay.proc.pid) as sampler,
            LegitTraffic(client.forwards[1].port) as legit,
            Visitors(client.forwards[0].port, 8, source="127.0.0.6", upload=64 * MIB),
        ):
            time.sleep(6)
    return {"gap_s": legit.max_gap, "rss_mib": sampler.max_rss / MIB, "fds": sampler.max_fds}


def crowd(group: ProcessGroup, workdir: Path) -> Figures:
    """600 visitors uploading 1 MiB each to a service that never reads, for 6 s."""
    with EchoServer() as echo, SinkServer() as sink:
        relay = start_hostile_relay(group, workdir)
        client = start_legit_client(group, workdir, relay, [sink.port, echo.port])
        with (
            ResourceSampler(relay.proc.pid) as sampler,
            LegitTraffic(client.forwards[1].port) as legit,
        ):
            with Visitors(client.forwards[0].port, 600, source="127.0.0.7", upload=MIB) as v:
                time.sleep(6)
                v.close(abort=True)
            time.sleep(3)
    return {
        "gap_s": legit.max_gap,
        "rss_mib": sampler.max_rss / MIB,
        "fds": sampler.max_fds,
        "fds_after": sampler.last_fds,
    }


def token_share(group: ProcessGroup, workdir: Path) -> Figures:
    """Token A asks for 2 x 64 tunnels on 100 ports; does token B get its 2?"""
    token_a, token_b = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    with EchoServer() as echo:
        relay = start_hostile_relay(
            group, workdir, token=token_a, extra_args=["--token", token_b], ports=100
        )
        with ResourceSampler(relay.proc.pid) as sampler:
            for i in range(2):
                start_client(
                    group,
                    workdir,
                    relay,
                    [f"0:127.0.0.1:{echo.port}"] * 64,
                    token=token_a,
                    name=f"a{i}",
                    expect_forwards=0,
                )
                time.sleep(4)
            start = time.monotonic()
            b = start_client(
                group,
                workdir,
                relay,
                [f"0:127.0.0.1:{echo.port}"] * 2,
                token=token_b,
                name="b",
                expect_forwards=0,
            )
            b_in = float("inf")
            while time.monotonic() - start < 10 and b.proc.returncode is None:
                if sum(1 for ln in b.proc.stdout_lines if ln.startswith("forwarding")) >= 2:
                    b_in = time.monotonic() - start
                    break
                time.sleep(0.1)
        b_ports = {
            int(m.group(1))
            for ln in b.proc.stdout_lines
            if (m := re.match(r"forwarding tcp://[^ ]+:(\d+) ", ln))
        }
        held_by_a = len(set(relay.bound_ports()) - b_ports)
    return {
        "ports_a": held_by_a,
        "b_in_s": b_in,
        "rss_mib": sampler.max_rss / MIB,
        "fds": sampler.max_fds,
    }


SCENARIOS: dict[str, Callable[[ProcessGroup, Path], Figures]] = {
    "idle-flood": idle_flood,
    "stalled-streams": stalled_streams,
    "crowd": crowd,
    "token-share": token_share,
}


def main() -> None:
    """Run the chosen scenarios ``--runs`` times and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("scenario", nargs="*", help=f"any of {', '.join(SCENARIOS)} (all)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    unknown = set(args.scenario) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    for name in args.scenario or list(SCENARIOS):
        runs: list[Figures] = []
        for i in range(args.runs):
            group = ProcessGroup()
            try:
                with tempfile.TemporaryDirectory(prefix="muxtunnel-measure-") as tmp:
                    figures = SCENARIOS[name](group, Path(tmp))
            finally:
                group.close()
            runs.append(figures)
            print(f"{name} run {i + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items()))
        medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name} MEDIAN: " + ", ".join(f"{k}={v:.2f}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
