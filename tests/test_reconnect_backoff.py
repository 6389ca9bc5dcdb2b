"""muxtunnel.client.reconnect: backoff when the relay answered, short waits when nothing did."""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from muxtunnel.client import PATH_RETRY_CAP, PEER_SILENT, _dial_relay, reconnect
from muxtunnel.errors import SessionClosedError

if TYPE_CHECKING:
    from collections.abc import Callable


async def _delays(outcome: Callable[[int], object], attempts: int = 12) -> list[float]:
    """The waits ``reconnect`` chooses while every session ends with ``outcome(attempt)``."""
    delays: list[float] = []
    calls = 0

    async def run_session(shutdown: trio.Event, on_up: Callable[[object], None]) -> object:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        result = outcome(calls)
        if isinstance(result, BaseException):
            raise result
        on_up(None)
        await trio.sleep(60)  # a stable session, then it ends
        return result

    with pytest.raises(SessionClosedError):
        await reconnect(
            run_session,
            server_key="relay.example:7835",
            max_retries=attempts,
            backoff_cap=30.0,
            shutdown=trio.Event(),
            task_status=trio.TASK_STATUS_IGNORED,
            on_retry=delays.append,
        )
    return delays


async def test_refused_attempts_back_off_to_the_cap(autojump_clock: trio.testing.MockClock) -> None:
    delays = await _delays(lambda _: ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert max(delays) > 10.0
    assert all(d <= 30.0 for d in delays)


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(errno.ETIMEDOUT, "no answer"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        OSError(errno.ENETUNREACH, "Network is unreachable"),
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
    ],
    ids=["timeout", "host-unreachable", "net-unreachable", "dns-again"],
)
async def test_unanswered_attempts_wait_at_most_the_path_cap(
    autojump_clock: trio.testing.MockClock, error: OSError
) -> None:
    delays = await _delays(lambda _: error)
    assert len(delays) == 12
    assert all(d <= PATH_RETRY_CAP for d in delays)


async def test_a_session_whose_relay_fell_silent_is_retried_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Sessions that end by the keepalive, then attempts that find no route: never a long wait.
    delays = await _delays(
        lambda n: PEER_SILENT if n == 1 else OSError(errno.EHOSTUNREACH, "No route to host")
    )
    assert delays[0] <= 0.5
    assert all(d <= PATH_RETRY_CAP for d in delays)


async def test_dial_gives_up_on_a_silent_address_and_says_so(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Silent:
        def __init__(self, *args: object) -> None:
            self.closed = False

        def setsockopt(self, *args: object) -> None:
            pass

        async def connect(self, address: object) -> None:
            await trio.sleep_forever()

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(trio.socket, "socket", Silent)
    start = trio.current_time()
    with pytest.raises(TimeoutError) as info:
        await _dial_relay("192.0.2.1", 7835)
    assert info.value.errno == errno.ETIMEDOUT
    assert trio.current_time() - start == pytest.approx(2.5)
