"""The systemd notify protocol (muxtunnel.sdnotify) on a real AF_UNIX datagram socket: the
Notifier itself, then relay and client processes started with ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel.sdnotify import Notifier
from tests.system.harness import (
    EchoServer,
    ProcessGroup,
    port_is_listening,
    start_client,
    start_relay,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


class Listener:
    """A bound datagram socket standing in for the service manager: a thread reads every
    datagram at once (the kernel queues only a few) into ``messages``."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            with self._cond:
                self.messages.append(fields)
                self._cond.notify_all()

    def wait_count(
        self, predicate: Callable[[dict[str, str]], bool], count: int, timeout: float = 20.0
    ) -> list[dict[str, str]]:
        """Wait until ``count`` messages satisfy ``predicate``; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    assert len(found) >= count, f"{len(found)} of {count}: {self.messages}"
                    return found
                self._cond.wait(remaining)

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], timeout: float = 20.0
    ) -> dict[str, str]:
        """The first message (already received or new) for which ``predicate`` holds."""
        return self.wait_count(predicate, 1, timeout)[0]

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """Processes started by one test; stopped (SIGTERM, then SIGKILL) at teardown."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    server = Listener(str(tmp_path / "notify.sock"))
    try:
        yield server
    finally:
        server.close()


# -- the Notifier ------------------------------------------------------------------------------


async def test_without_notify_socket_nothing_happens() -> None:
    notifier = Notifier({})
    assert notifier.address is None
    assert notifier.watchdog_interval is None
    assert notifier.send("READY=1") is False
    notifier.ready("up")
    notifier.status("x")
    with trio.fail_after(1):
        await notifier.run(lambda: "never called", trio.Event())  # returns at once
    assert notifier._sock is None  # no socket was even created


def test_ready_status_stopping_reloading_on_a_path(listener: Listener) -> None:
    path = listener.sock.getsockname()
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("2 sessions,\n3 tunnels")
    ready = listener.wait_for(lambda m: True, 5)
    assert ready == {"READY": "1", "STATUS": "2 sessions, 3 tunnels"}
    notifier.status("2 sessions, 3 tunnels")  # unchanged: not sent again
    notifier.status("1 sessions")
    notifier.reloading()
    notifier.stopping()
    notifier.close()
    listener.wait_for(lambda m: "STOPPING" in m, 5)
    assert listener.messages[1] == {"STATUS": "1 sessions"}
    reloading = listener.messages[2]
    assert reloading["RELOADING"] == "1"
    assert abs(int(reloading["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 60_000_000
    assert listener.messages[3] == {"STOPPING": "1"}


def test_abstract_namespace_address() -> None:
    name = f"muxtunnel-test-{secrets.token_hex(8)}"
    server = Listener(b"\0" + name.encode())
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        notifier.close()
        assert server.wait_for(lambda m: True, 5) == {"READY": "1"}
    finally:
        server.close()


def test_gone_socket_never_fails_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone.sock"
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    caplog.set_level(logging.DEBUG, logger="muxtunnel.sdnotify")
    for _ in range(3):
        assert notifier.send("WATCHDOG=1") is False
    notifier.ready("up")
    notifier.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "muxtunnel.sdnotify"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("cannot notify the service manager: ")
    assert caplog.records[0].levelno == logging.DEBUG


def test_watchdog_interval_and_pid() -> None:
    base = {"NOTIFY_SOCKET": "/run/x"}
    assert Notifier({**base, "WATCHDOG_USEC": "200000"}).watchdog_interval == pytest.approx(0.1)
    mine = {**base, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == pytest.approx(0.1)
    other = {**base, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval is None
    assert Notifier({**base, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({**base, "WATCHDOG_USEC": "junk"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "200000"}).watchdog_interval is None  # no socket


async def test_run_pings_the_watchdog_and_says_stopping(listener: Listener) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": listener.sock.getsockname(), "WATCHDOG_USEC": "100000"})
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run, lambda: "idle", shutdown)
        # The listener's waits block: they run in a worker thread while the notifier runs.
        await trio.to_thread.run_sync(listener.wait_count, lambda m: m == {"WATCHDOG": "1"}, 3)
        shutdown.set()
        await trio.to_thread.run_sync(listener.wait_for, lambda m: "STOPPING" in m, 5)
        nursery.cancel_scope.cancel()
    notifier.close()
    pings = [m for m in listener.messages if m == {"WATCHDOG": "1"}]
    assert len(pings) >= 3, listener.messages
    assert {"STATUS": "idle"} in listener.messages
    assert {"STOPPING": "1", "STATUS": "stopping"} in listener.messages


# -- relay and client processes -------------------------------------------------------------


@pytest.mark.system
def test_relay_and_client_processes_notify(
    tmp_path: Path, procs: ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay_sock = Listener(str(tmp_path / "relay.sock"))
    client_sock = Listener(str(tmp_path / "client.sock"))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "relay.sock"))
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        relay = start_relay(procs, tmp_path, token=secrets.token_urlsafe(24))
        ready = relay_sock.wait_for(lambda m: "READY" in m)
        # READY=1 means the control listener accepts connections.
        assert port_is_listening(relay.port)
        assert ready["STATUS"] == "0 sessions, 0 tunnels, 0 open streams"
        # WATCHDOG_USEC=200000: a ping every 0.1 s.
        relay_sock.wait_count(lambda m: m == {"WATCHDOG": "1"}, 5, timeout=20)

        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "client.sock"))
        monkeypatch.delenv("WATCHDOG_USEC")
        with EchoServer() as echo:
            client = start_client(procs, tmp_path, relay, [f"0:127.0.0.1:{echo.port}"])
            (fwd,) = client.forwards
            client_ready = client_sock.wait_for(lambda m: "READY" in m)
            assert re.fullmatch(
                r"connected to relay 127\.0\.0\.1:\d+: 1 of 1 tunnels up", client_ready["STATUS"]
            ), client_ready
            assert fwd.port in relay.bound_ports() or port_is_listening(fwd.port)
            # The relay's status line follows within its refresh interval.
            relay_sock.wait_for(
                lambda m: m.get("STATUS") == "1 sessions, 1 tunnels, 0 open streams", 20
            )

            client.proc.send_signal(signal.SIGTERM)
            assert client_sock.wait_for(lambda m: "STOPPING" in m)["STOPPING"] == "1"
            assert client.proc.wait_exit() == 0
            assert not [m for m in client_sock.messages if "WATCHDOG" in m]

        # SIGHUP: RELOADING=1 (with the monotonic clock) then READY=1 again.
        relay.proc.send_signal(signal.SIGHUP)
        reloading = relay_sock.wait_for(lambda m: "RELOADING" in m)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        relay_sock.wait_count(lambda m: "READY" in m, 2)
        assert (
            relay_sock.messages.index(reloading)
            < [i for i, m in enumerate(relay_sock.messages) if "READY" in m][1]
        )

        relay.proc.send_signal(signal.SIGTERM)
        stopping = relay_sock.wait_for(lambda m: "STOPPING" in m)
        assert stopping["STATUS"].startswith("draining: ")
        assert relay.proc.wait_exit() == 0
    finally:
        relay_sock.close()
        client_sock.close()
