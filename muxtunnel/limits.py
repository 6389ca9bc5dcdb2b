"""Relay resource limits: the descriptor budget and fair sharing of a session's pending opens.

Descriptors. At start the relay raises its ``RLIMIT_NOFILE`` soft limit to the hard limit
(:func:`raise_descriptor_limit`) and keeps a reserve of :func:`descriptor_reserve` descriptors
for its control listener and new sessions. A :class:`DescriptorBudget` answers "may a BIND or a
visitor take more descriptors?": public listeners may not eat into the reserve at all; visitors
and the first tunnel of a token that holds none may use its upper half. So a full descriptor
table never stops new sessions, the live tunnels of other users, or a new user's first tunnel.

Pending opens. The client allows a session at most ``MAX_PENDING_OPENS`` unanswered OPENs
(protocol-spec.md §12). :class:`OpenShares` divides them between the session's tunnels: a
tunnel waits while it holds its share (``max(4, limit / tunnels with demand)``), and a tunnel
that already holds opens may not take the last ``reserve`` slots, which stay free for the first
visitor of a tunnel that holds none. A tunnel whose local service is slow to answer therefore
cannot delay the other tunnels of the session.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

    from muxtunnel.connection import MuxConnection, MuxStream

__all__ = [
    "DescriptorBudget",
    "OpenShares",
    "RefusalSummary",
    "count_open_descriptors",
    "descriptor_reserve",
    "raise_descriptor_limit",
    "reset_connection",
]

logger = logging.getLogger(__name__)

#: Descriptors kept free at least (control listener, new sessions, log files, DNS ...).
MIN_DESCRIPTOR_RESERVE = 64
#: ... or this fraction of the limit, whichever is larger.
DESCRIPTOR_RESERVE_FRACTION = 0.05
#: The budget counts the process's descriptors again this often while above half its
#: ceiling, and at least every ten times this long (seconds).
RECOUNT_INTERVAL = 1.0
#: ... and, while the estimate says "full", at most this often (counting costs O(descriptors)).
RECOUNT_MIN_GAP = 0.05
#: Used when the hard limit is unlimited.
_UNLIMITED_TARGET = 1 << 20

#: The smallest share of pending opens a tunnel with demand always gets.
MIN_OPEN_SHARE = 4


def raise_descriptor_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit now in force.

    Returns None where the limit cannot be read (no ``resource`` module) or is unlimited.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.info("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
        else:
            logger.debug("descriptor limit raised from %d to %d", soft, target)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return int(soft)


def descriptor_reserve(limit: int) -> int:
    """Descriptors kept free for the control listener and new sessions."""
    return max(MIN_DESCRIPTOR_RESERVE, int(limit * DESCRIPTOR_RESERVE_FRACTION))


def count_open_descriptors() -> int | None:
    """The number of descriptors this process has open, or None if it cannot be counted."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            # The listing itself opens one descriptor, which it counts; it is closed again.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return None


class DescriptorBudget:
    """Whether the relay may open more descriptors for tunnels and visitors.

    The count of open descriptors (O(n) to take) is refreshed every :data:`RECOUNT_INTERVAL`
    while the estimate is above half the ceiling (every ten intervals below); in between, every
    descriptor the relay opens for a tunnel or visitor is added to it (:meth:`opened`) and
    closed ones are ignored, so the estimate errs high, not low. When the estimate reaches the
    ceiling it is counted again, at most every :data:`RECOUNT_MIN_GAP`.

    Args:
        limit: The soft descriptor limit (None: no budget, everything is allowed).
        reserve: Descriptors that must stay free (default :func:`descriptor_reserve`).
    """

    def __init__(
        self,
        limit: int | None,
        reserve: int | None = None,
        *,
        counter: Callable[[], int | None] = count_open_descriptors,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        if limit is None:
            reserve = 0
        elif reserve is None:
            reserve = descriptor_reserve(limit)
        self.reserve = reserve
        self._counter = counter
        self._clock = clock
        self._counted = 0
        self._since = 0
        self._at = -float("inf")

    @property
    def ceiling(self) -> int | None:
        """The most descriptors tunnels and visitors may bring the process to."""
        return None if self.limit is None else self.limit - self.reserve

    def opened(self, n: int = 1) -> None:
        """``n`` descriptors were just opened for a tunnel or a visitor."""
        self._since += n

    def room(self, need: int = 0, *, priority: bool = False) -> bool:
        """True if ``need`` more descriptors keep the process at or below the ceiling.

        ``priority`` (visitors, a token's first tunnel) raises the ceiling by half the reserve.
        """
        ceiling = self.ceiling
        if ceiling is None:
            return True
        if priority:
            ceiling += self.reserve // 2
        now = self._clock()
        age = now - self._at
        estimate = self._counted + self._since + need
        if (
            age >= 10 * RECOUNT_INTERVAL
            or (age >= RECOUNT_INTERVAL and 2 * estimate > ceiling)
            or (age >= RECOUNT_MIN_GAP and estimate > ceiling)
        ):
            counted = self._counter()
            if counted is None:
                self.limit = None
                return True
            self._counted, self._since, self._at = counted, 0, now
        return self._counted + self._since + need <= ceiling


class RefusalSummary:
    """One log line per refusal reason and interval instead of one per refused visitor.

    The first refusal of a reason is logged at once; later ones are counted and reported with
    the next refusal after ``interval`` seconds.
    """

    def __init__(self, log: logging.Logger, interval: float = 10.0) -> None:
        self._log = log
        self._interval = interval
        self._counts: dict[str, int] = {}
        self._next: dict[str, float] = {}

    def note(self, reason: str) -> None:
        """Count one refusal; log a summary if the interval for ``reason`` has passed."""
        now = trio.current_time()
        count = self._counts.get(reason, 0) + 1
        if now < self._next.get(reason, -float("inf")):
            self._counts[reason] = count
            return
        self._counts[reason] = 0
        self._next[reason] = now + self._interval
        self._log.info(
            "%s (%d visitor%s refused)",
            reason,
            count,
            "" if count == 1 else "s",
            extra={"ratelimit_key": reason},
        )


class OpenShares:
    """Shares one session's pending-open slots fairly between its tunnels (see module docs)."""

    def __init__(self, conn: MuxConnection) -> None:
        self._conn = conn
        #: Relay-opened streams per tunnel that may still be waiting for OPEN_ACK/OPEN_FAIL.
        self._held: dict[int, set[MuxStream]] = {}
        self._total = 0

    def _limit(self) -> int:
        peer = self._conn.peer_settings
        return peer.max_pending_opens if peer is not None else 128

    def held(self, tunnel_id: int) -> int:
        """Opens of ``tunnel_id`` not yet known to be answered."""
        return len(self._held.get(tunnel_id, ()))

    def _allowed(self, tunnel_id: int) -> bool:
        limit = self._limit()
        held = self.held(tunnel_id)
        demand = len(self._held) + (0 if held else 1)
        share = max(MIN_OPEN_SHARE, limit // demand)
        if held >= share:
            return False
        reserve = min(limit // 2, max(MIN_OPEN_SHARE, limit // 16))
        return not (held and self._total >= limit - reserve)

    def _prune(self) -> None:
        """Forget streams that were answered (the only change that has no event here)."""
        for tunnel_id, streams in list(self._held.items()):
            answered = [s for s in streams if not s.pending]
            for stream in answered:
                streams.discard(stream)
            self._total -= len(answered)
            if not streams:
                del self._held[tunnel_id]

    async def wait_turn(self, tunnel_id: int) -> None:
        """Wait until ``tunnel_id`` may open a stream; an ``open_stream`` right after succeeds.

        Raises:
            MuxSessionClosedError: The connection ended (or a GOAWAY forbids new streams).
        """
        conn = self._conn
        while True:
            allowed = self._allowed(tunnel_id)
            if not allowed:
                self._prune()
                allowed = self._allowed(tunnel_id)
            if allowed:
                if conn.open_slot_available():
                    return
                await conn.wait_open_slot()
                if self._allowed(tunnel_id):
                    return  # no checkpoint since wait_open_slot's last check
                continue
            if not conn.usable or conn.goaway is not None:
                await conn.wait_open_slot()  # raises MuxSessionClosedError
            # Every answer (OPEN_ACK, OPEN_FAIL, RESET) and every stream end wakes this.
            await conn.wait_open_change()

    def opened(self, tunnel_id: int, stream: MuxStream) -> None:
        """``stream`` was opened for ``tunnel_id`` and waits for the client's answer."""
        self._held.setdefault(tunnel_id, set()).add(stream)
        self._total += 1

    def finished(self, tunnel_id: int, stream: MuxStream) -> None:
        """The stream of ``tunnel_id`` is over (its slot, if it still held one, is free)."""
        streams = self._held.get(tunnel_id)
        if streams is not None and stream in streams:
            streams.discard(stream)
            self._total -= 1
            if not streams:
                del self._held[tunnel_id]
            self._conn.notify_open_change()


_LINGER_RST = struct.pack("ii", 1, 0)


def reset_connection(tcp: trio.SocketStream) -> None:
    """Close a just-accepted connection at once so its peer sees an RST (no task, no wait)."""
    try:
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    tcp.socket.close()
