"""Clients with valid tokens: one token's share of the relay, and clients sharing a token.

Real relay and client processes on loopback; the relay's memory and descriptors are sampled.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

import pytest

from .procs import (
    MIB,
    Client,
    EchoServer,
    LegitTraffic,
    ResourceSampler,
    fd_count,
    rss_bytes,
    start_client,
    start_hostile_relay,
    wait_until,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .procs import ProcessGroup, Relay

_FORWARD_RE = re.compile(r"^forwarding tcp://")
_REFUSED_RE = re.compile(r"the relay refused remote port")
_RECONNECT_RE = re.compile(r"reconnecting to ")


def _ports(client: Client) -> list[int]:
    """Public ports from the client's forwarding lines so far."""
    return [
        int(m.group(1))
        for line in client.proc.stdout_lines
        if (m := re.match(r"forwarding tcp://\S+:(\d+) -> ", line))
    ]


def _forwards(client: Client) -> int:
    return sum(1 for line in client.proc.stdout_lines if _FORWARD_RE.search(line))


def _refusals(client: Client) -> int:
    return sum(1 for line in client.proc.stderr_lines if _REFUSED_RE.search(line))


def _reconnects(client: Client) -> int:
    return sum(1 for line in client.proc.stderr_lines if _RECONNECT_RE.search(line))


def _settled(client: Client, specs: int) -> bool:
    """The client has answered for every tunnel (bound or refused), or has exited."""
    if client.proc.returncode is not None:
        return True
    return _forwards(client) + _refusals(client) >= specs or _reconnects(client) > 0


def _start(
    procs: ProcessGroup, workdir: Path, relay: Relay, local: int, count: int, token: str, name: str
) -> Client:
    return start_client(
        procs,
        workdir,
        relay,
        [f"0:127.0.0.1:{local}"] * count,
        token=token,
        name=name,
        expect_forwards=0,
    )


def test_one_token_cannot_take_every_public_port(procs: ProcessGroup, tmp_path: Path) -> None:
    """Two sessions of token A ask for 64 tunnels each on a relay with 100 public ports.

    At the default ``--max-tunnels-per-token 64`` token A holds at most 64 ports across its
    sessions, so token B still binds its tunnels and moves bytes.
    """
    token_a, token_b = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    with EchoServer() as echo:
        relay = start_hostile_relay(
            procs, tmp_path, token=token_a, extra_args=["--token", token_b], ports=100
        )
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        with ResourceSampler(relay.proc.pid) as sampler:
            a1 = _start(procs, tmp_path, relay, echo.port, 64, token_a, "token-a-1")
            wait_until(
                lambda: _settled(a1, 64),
                timeout=20,
                what="token-a-1's tunnels",
                details=a1.proc.describe,
            )
            a2 = _start(procs, tmp_path, relay, echo.port, 64, token_a, "token-a-2")
            wait_until(
                lambda: _settled(a2, 64),
                timeout=20,
                what="token-a-2's tunnels",
                details=a2.proc.describe,
            )
            b = start_client(
                procs,
                tmp_path,
                relay,
                [f"0:127.0.0.1:{echo.port}"] * 2,
                token=token_b,
                name="token-b",
                timeout=15,
            )
            with LegitTraffic(b.forwards[0].port) as legit:
                wait_until(lambda: legit.successes >= 20, timeout=5, what="20 round trips")
            legit.assert_healthy(max_gap=3.0, min_successes=20)
        held_by_a = len(set(relay.bound_ports()) - {f.port for f in b.forwards})
        print(f"\ntoken A holds {held_by_a} ports; {sampler.describe()}")
        assert held_by_a <= 64, f"token A holds {held_by_a} public ports\n{relay.proc.describe()}"
    # 64 + 2 listeners, 3 sessions, the legitimate visitor
    assert sampler.max_fds <= base_fds + 66 + 20, sampler.describe()
    assert sampler.max_rss <= base_rss + 40 * MIB, sampler.describe()


def test_sessions_and_tunnels_per_token_are_bounded(procs: ProcessGroup, tmp_path: Path) -> None:
    """``--max-sessions-per-token 2 --max-tunnels-per-token 3``: three clients of token A with
    two tunnels each get 3 tunnels in all and the third session is refused; token B binds."""
    token_a, token_b = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    with EchoServer() as echo:
        relay = start_hostile_relay(
            procs,
            tmp_path,
            token=token_a,
            extra_args=[
                "--token",
                token_b,
                "--max-sessions-per-token",
                "2",
                "--max-tunnels-per-token",
                "3",
            ],
        )
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        with ResourceSampler(relay.proc.pid) as sampler:
            a1 = _start(procs, tmp_path, relay, echo.port, 2, token_a, "token-a-1")
            wait_until(
                lambda: _forwards(a1) == 2,
                timeout=20,
                what="token-a-1's 2 tunnels",
                details=a1.proc.describe,
            )
            a2 = _start(procs, tmp_path, relay, echo.port, 2, token_a, "token-a-2")
            wait_until(
                lambda: _settled(a2, 2),
                timeout=20,
                what="token-a-2's tunnels",
                details=a2.proc.describe,
            )
            a3 = _start(procs, tmp_path, relay, echo.port, 2, token_a, "token-a-3")
            wait_until(
                lambda: _settled(a3, 2),
                timeout=20,
                what="token-a-3's outcome",
                details=a3.proc.describe,
            )
            b = start_client(
                procs,
                tmp_path,
                relay,
                [f"0:127.0.0.1:{echo.port}"] * 2,
                token=token_b,
                name="token-b",
                timeout=15,
            )
            with (
                LegitTraffic(_ports(a1)[0]) as legit_a,
                LegitTraffic(b.forwards[1].port) as legit_b,
            ):
                wait_until(
                    lambda: min(legit_a.successes, legit_b.successes) >= 20,
                    timeout=6,
                    what="20 round trips on each",
                )
        outcome = "\n".join(c.proc.describe() for c in (a1, a2, a3)) + "\n" + relay.proc.describe()
        assert _forwards(a1) + _forwards(a2) + _forwards(a3) <= 3, outcome
        assert _forwards(a3) == 0, f"a third session of token A bound tunnels\n{outcome}"
        legit_a.assert_healthy(max_gap=3.0, min_successes=20)
        legit_b.assert_healthy(max_gap=3.0, min_successes=20)
    assert sampler.max_fds <= base_fds + 5 + 3 + 2 + 20, sampler.describe()
    assert sampler.max_rss <= base_rss + 40 * MIB, sampler.describe()


@pytest.mark.parametrize(
    ("shared_clients", "shared_tunnels", "extra"),
    [(2, 32, ()), (3, 40, ("--max-tunnels-per-token", "120"))],
    ids=["2x32-default-limits", "3x40"],
)
def test_clients_sharing_a_token_do_not_drop_each_other(
    procs: ProcessGroup,
    tmp_path: Path,
    shared_clients: int,
    shared_tunnels: int,
    extra: tuple[str, ...],
) -> None:
    """Clients with the same token and many tunnels each (within ``--max-tunnels-per-token``)
    stay connected: no reconnects while their tunnels carry traffic for about 8 s."""
    with EchoServer() as echo:
        relay = start_hostile_relay(procs, tmp_path, ports=128, extra_args=extra)
        base_rss, base_fds = rss_bytes(relay.proc.pid), fd_count(relay.proc.pid)
        with ResourceSampler(relay.proc.pid) as sampler:
            clients = [
                start_client(
                    procs,
                    tmp_path,
                    relay,
                    [f"0:127.0.0.1:{echo.port}"] * shared_tunnels,
                    name=f"shared-{i}",
                    expect_forwards=0,
                )
                for i in range(shared_clients)
            ]
            for client in clients:  # started together, like clients of one deployment
                client.forwards, _ = client.wait_forwards(shared_tunnels, timeout=20)
            with (
                LegitTraffic(clients[0].forwards[0].port, name="first") as first,
                LegitTraffic(clients[-1].forwards[-1].port, name="last") as last,
            ):
                wait_until(
                    lambda: min(first.successes, last.successes) >= 80,
                    timeout=12,
                    what="80 round trips on the first and last client's tunnels",
                    details=lambda: f"{first.describe()}\n{last.describe()}",
                )
        outcome = "\n".join(c.proc.describe() for c in clients) + "\n" + relay.proc.describe()
        drops = [_reconnects(c) for c in clients]
        assert drops == [0] * shared_clients, f"reconnects per client: {drops}\n{outcome}"
        first.assert_healthy(max_gap=3.0, min_successes=80)
        last.assert_healthy(max_gap=3.0, min_successes=80)
    tunnels = shared_clients * shared_tunnels
    assert sampler.max_fds <= base_fds + tunnels + shared_clients + 2 + 20, sampler.describe()
    assert sampler.max_rss <= base_rss + 40 * MIB, sampler.describe()
