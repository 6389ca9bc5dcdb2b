"""Strangers on the relay's control port: idle floods, token guessing, log floods, slow handshakes.

Real relay and client processes; the attacker is this process, on its own loopback source
address. Every test also keeps a legitimate tunnel busy and samples the relay's memory and
descriptors while the attack runs.
"""

from __future__ import annotations

import re
import socket
import time
from typing import TYPE_CHECKING

from .procs import (
    MIB,
    EchoServer,
    IdleConnections,
    LegitTraffic,
    ResourceSampler,
    fd_count,
    mux_handshake,
    rss_bytes,
    start_hostile_relay,
    start_legit_client,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .procs import ProcessGroup

#: Memory the relay may gain while it sheds an attack (it runs at ~70 MiB idle).
RSS_MARGIN = 40 * MIB
#: Descriptors the relay may gain beyond what a limit allows (legitimate client, visitors,
#: connections accepted and about to be closed).
FD_MARGIN = 40


def test_idle_connections_from_one_source_leave_room_for_others(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """300 idle TCP connections from one address, reopened as the relay sheds them.

    At the default limits (``--max-startups 256``, ``--max-startups-per-source 10``) the source
    holds at most 10 handshake slots, so a client from another address still authenticates
    within 2 s, and the relay holds no descriptor per attacking connection.
    """
    with EchoServer() as echo:
        relay = start_hostile_relay(procs, tmp_path)
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        with (
            ResourceSampler(relay.proc.pid) as sampler,
            IdleConnections(
                relay.host, relay.port, count=300, source="127.0.0.2", duration=14
            ) as attack,
        ):
            attack.wait_open(300, timeout=5)
            waits: list[str] = []
            for _ in range(3):
                result = mux_handshake(relay.host, relay.port, relay.token, timeout=2.0)
                waits.append(str(result))
                assert result.outcome == "authenticated", (
                    f"legitimate client refused during the attack: {result}\n"
                    f"{attack.describe()}\n{relay.proc.describe()}"
                )
            client = start_legit_client(procs, tmp_path, relay, [echo.port], timeout=10)
            with LegitTraffic(client.forwards[0].port) as legit:
                legit.wait_successes(20, timeout=5)
            legit.assert_healthy(max_gap=3.0, min_successes=20)
            attacking = attack.describe()
        print(f"\nidle flood: {attacking}; {sampler.describe()}; handshakes: {waits}")
    assert sampler.max_fds <= base_fds + 10 + FD_MARGIN, (
        f"relay descriptors grew from {base_fds} to {sampler.max_fds}: {attacking}"
    )
    assert sampler.max_rss <= base_rss + RSS_MARGIN, (
        f"relay RSS grew from {base_rss / MIB:.1f} MiB: {sampler.describe()}"
    )


_FAILED_RE = re.compile(r"authentication failed from 127\.0\.0\.3 port \d+: wrong token")
_BANNED_RE = re.compile(r"source 127\.0\.0\.3 banned for \d+ s after \d+ authentication failures")


def test_wrong_token_guessing_gets_the_source_banned(procs: ProcessGroup, tmp_path: Path) -> None:
    """40 wrong-token attempts from one address at default ``--auth-failures 5``.

    After the fifth failure the source is banned: later connections from it are closed before
    TLS completes and log nothing more; another source still authenticates and tunnels.
    """
    with EchoServer() as echo:
        relay = start_hostile_relay(procs, tmp_path)
        client = start_legit_client(procs, tmp_path, relay, [echo.port])
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        lines_before = len(relay.proc.stderr_lines)
        results = []
        with (
            ResourceSampler(relay.proc.pid) as sampler,
            LegitTraffic(client.forwards[0].port) as legit,
        ):
            deadline = time.monotonic() + 10
            for i in range(40):
                if time.monotonic() > deadline:
                    break
                results.append(
                    mux_handshake(
                        relay.host, relay.port, f"guess-{i}", source="127.0.0.3", timeout=2.0
                    )
                )
            good = mux_handshake(relay.host, relay.port, relay.token, timeout=3.0)
            legit.wait_successes(20, timeout=5)
        outcomes = [r.outcome for r in results]
        summary = f"outcomes: {outcomes}\n{relay.proc.describe()}"
        assert len(results) == 40, f"40 attempts did not finish in 10 s: {summary}"
        reached_tls = [r for r in results if r.tls_done is not None]
        assert len(reached_tls) <= 6, (
            f"{len(reached_tls)} of 40 wrong-token attempts completed TLS: {summary}"
        )
        # banned: closed (or refused with a TLS alert) before TLS completes
        before_tls = {"closed-before-tls", "connect-failed", "tls-failed"}
        assert all(o in before_tls for o in outcomes[10:]), summary
        assert good.outcome == "authenticated", f"right token from another source: {good}"
        legit.assert_healthy(max_gap=3.0, min_successes=20)
        lines = relay.proc.stderr_lines[lines_before:]
        about = [line for line in lines if "127.0.0.3" in line]
        failed = sum(1 for line in lines if _FAILED_RE.search(line))
        banned = sum(1 for line in lines if _BANNED_RE.search(line))
        assert 1 <= failed <= 5, f"{failed} 'authentication failed' lines: {summary}"
        assert banned == 1, f"{banned} 'source ... banned' lines: {summary}"
        assert len(about) <= 15, f"{len(about)} log lines about the guessing source: {summary}"
    assert sampler.max_fds <= base_fds + FD_MARGIN, sampler.describe()
    assert sampler.max_rss <= base_rss + RSS_MARGIN, sampler.describe()


def test_connection_flood_log_lines_are_bounded(procs: ProcessGroup, tmp_path: Path) -> None:
    """3,000 connections from one address that close at once or send garbage: < 100 log lines."""
    with EchoServer() as echo:
        relay = start_hostile_relay(procs, tmp_path)
        client = start_legit_client(procs, tmp_path, relay, [echo.port])
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        lines_before = len(relay.proc.stderr_lines)
        opened = 0
        with (
            ResourceSampler(relay.proc.pid) as sampler,
            LegitTraffic(client.forwards[0].port) as legit,
        ):
            deadline = time.monotonic() + 10
            for i in range(3000):
                if time.monotonic() > deadline:
                    break
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.settimeout(1.0)
                    sock.bind(("127.0.0.4", 0))
                    try:
                        sock.connect((relay.host, relay.port))
                        if i % 2:
                            sock.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
                    except OSError:
                        pass
                opened += 1
            # the flood is over once the relay has let go of its connections
            wait_until(
                lambda: fd_count(relay.proc.pid) <= base_fds + 5,
                timeout=10,
                what="the relay to close the flood's connections",
                details=sampler.describe,
            )
            legit.wait_successes(20, timeout=5)
        legit.assert_healthy(max_gap=3.0, min_successes=20)
        lines = relay.proc.stderr_lines[lines_before:]
        assert opened == 3000, f"only {opened} connections in 10 s"
        assert relay.proc.returncode is None, relay.proc.describe()
        assert len(lines) < 100, (
            f"{len(lines)} relay log lines for 3000 connections:\n" + "\n".join(lines[:20])
        )
    assert sampler.max_fds <= base_fds + 10 + FD_MARGIN, sampler.describe()
    assert sampler.max_rss <= base_rss + RSS_MARGIN, sampler.describe()


def test_handshake_deadline_counts_from_tcp_accept(procs: ProcessGroup, tmp_path: Path) -> None:
    """``--handshake-timeout 2``: TLS finished after 1.8 s, AUTH never sent -> closed by ~2.5 s."""
    with EchoServer() as echo:
        relay = start_hostile_relay(procs, tmp_path, extra_args=["--handshake-timeout", "2"])
        client = start_legit_client(procs, tmp_path, relay, [echo.port])
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        with (
            ResourceSampler(relay.proc.pid) as sampler,
            LegitTraffic(client.forwards[0].port) as legit,
        ):
            result = mux_handshake(
                relay.host,
                relay.port,
                relay.token,
                source="127.0.0.5",
                send_auth=False,
                tls_delay=1.8,
                timeout=8.0,
            )
        assert result.tls_done is not None, f"TLS did not complete: {result}"
        assert result.outcome == "closed", f"{result}\n{relay.proc.describe()}"
        assert result.ended_at is not None
        assert result.ended_at <= 2.9, (
            f"the relay kept a connection that never authenticated for {result.ended_at:.2f} s "
            f"with --handshake-timeout 2: {result}"
        )
        legit.assert_healthy(max_gap=3.0, min_successes=10)
    assert sampler.max_fds <= base_fds + FD_MARGIN, sampler.describe()
    assert sampler.max_rss <= base_rss + RSS_MARGIN, sampler.describe()
