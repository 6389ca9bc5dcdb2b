"""The systemd notify protocol (``sd_notify(3)``) without a dependency.

A service started with ``Type=notify`` finds a Unix datagram socket in ``$NOTIFY_SOCKET`` (a
path, or ``@name`` for the abstract namespace) and sends newline-separated ``KEY=VALUE``
assignments to it: ``READY=1`` once it serves, ``STATUS=...`` a one-line summary,
``STOPPING=1`` when shutdown starts, ``RELOADING=1`` + ``MONOTONIC_USEC=...`` then ``READY=1``
around a reload, and ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` when the unit sets
``WatchdogSec=`` (and ``$WATCHDOG_PID`` is unset or this process).

Without ``$NOTIFY_SOCKET`` every method returns at once and :meth:`Notifier.run` ends at once.
A socket that is gone or refuses a datagram never fails the program: the first failure is
logged at debug level, later ones silently.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["STATUS_INTERVAL", "Notifier"]

logger = logging.getLogger("muxtunnel.sdnotify")

#: Seconds between two ``STATUS=`` refreshes (a changed line only).
STATUS_INTERVAL = 5.0
#: Seconds READY, STOPPING and RELOADING may wait for room in the manager's socket queue
#: (watchdog pings and status lines never wait: they are dropped then).
STATE_SEND_WAIT = 0.5


def _address(value: str) -> str | bytes | None:
    """The socket address of a ``$NOTIFY_SOCKET`` value (None if unusable)."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half ``$WATCHDOG_USEC``), or None."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


class Notifier:
    """Sends notifications to the service manager (a no-op when not started by one)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        #: Seconds between watchdog pings (None: the manager runs no watchdog for us).
        self.watchdog_interval = _watchdog_interval(env) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_status: str | None = None

    def send(self, *assignments: str, wait: float = 0.0) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; False if it could not be sent.

        ``wait``: seconds to wait for room when the manager's queue is full (0: drop).
        """
        if self.address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.settimeout(max(wait, 0.0))  # 0: non-blocking
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                logger.debug("cannot notify the service manager: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """``READY=1`` (with a status line): startup or a reload is complete."""
        self._send_with_status(["READY=1"], status, STATE_SEND_WAIT)

    def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``: shutdown has begun."""
        self._send_with_status(["STOPPING=1"], status, STATE_SEND_WAIT)

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC``: a reload has begun (send :meth:`ready` after)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", wait=STATE_SEND_WAIT)

    def status(self, line: str) -> None:
        """``STATUS=line`` (sent only when it differs from the last one)."""
        if self.address is None or line == self._last_status:
            return
        self._send_with_status([], line)

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the service is alive."""
        self.send("WATCHDOG=1")

    def _send_with_status(self, fields: list[str], status: str | None, wait: float = 0.0) -> None:
        if self.address is None:
            return
        if status is not None:
            status = " ".join(status.split())  # one line
            fields = [*fields, f"STATUS={status}"]
            self._last_status = status
        self.send(*fields, wait=wait)

    async def run(
        self,
        status: Callable[[], str] | None = None,
        shutdown: trio.Event | None = None,
    ) -> None:
        """Ping the watchdog and refresh ``STATUS=`` until cancelled; ``STOPPING=1`` when
        ``shutdown`` is set. Returns at once when no service manager listens."""
        if self.address is None:
            return
        async with trio.open_nursery() as nursery:
            if shutdown is not None:

                async def stop() -> None:
                    await shutdown.wait()
                    self.stopping("stopping")

                nursery.start_soon(stop)
            interval = min(STATUS_INTERVAL, self.watchdog_interval or math.inf)
            next_status = trio.current_time()
            while True:
                now = trio.current_time()
                if self.watchdog_interval is not None:
                    self.watchdog()
                if (
                    status is not None
                    and now >= next_status
                    and not (shutdown is not None and shutdown.is_set())
                ):
                    self.status(status())
                    next_status = now + STATUS_INTERVAL
                await trio.sleep(interval)

    def close(self) -> None:
        """Close the socket (a later notification opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
