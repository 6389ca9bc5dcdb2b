"""Flow-control arithmetic with absolute offsets, and window auto-tuning (protocol-spec.md §8).

Each direction of each stream, and of the connection, has one side of this:

* the sender keeps a :class:`SendCredit` (``sent`` and ``limit``, the largest WINDOW offset
  received; it may send while ``sent < limit``);
* the receiver keeps a :class:`ReceiveWindow` (``received``, ``consumed``, ``advertised``,
  ``window``). Bytes count against ``advertised`` when they arrive and are credited back by
  ``consume``: for a stream when the application *consumes* them, so a slow reader can never
  make us buffer more than we advertised; for the connection the session also credits bytes
  on receipt while the bytes held stay within its receive budget (§8.5 item 2).

Update rule (§8.5 item 3; half-window, as in Chromium, h2 and OpenSSH): when ``advertised -
consumed <= window / 2``, auto-tune, then ``advertised = consumed + window``. For the
connection, bytes held beyond the receive budget keep their credit (``kept``, §8.5 item 2); the
rule then looks at the credit still open to the sender (``advertised - received``), so held
bytes never stop the updates while they pin less than half the window.

Auto-tuning (§8.6; QUICHE ``MaybeIncreaseMaxWindowSize``): if the previous update is less than
``2 * srtt`` ago, the window is below 4x the bandwidth-delay product, so double it (up to its
maximum, and only if the optional memory budget agrees). The rule is scale-free: every update
follows the consumption of half of the *current* window. When a stream window grows, the
session raises the connection window to at least 1.5x it (:func:`min_conn_window`).

The clock is passed in (``now``, seconds, any monotonic origin); nothing here reads one.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "CONN_WINDOW_FACTOR_DEN",
    "CONN_WINDOW_FACTOR_NUM",
    "ReceiveWindow",
    "SendCredit",
    "WindowBudget",
    "min_conn_window",
]

#: Called with the bytes a window wants to grow by; False refuses the growth (memory budget).
WindowBudget = Callable[[int], bool]

#: The connection window is kept >= 3/2 of the largest stream window (Chromium
#: ``kSessionFlowControlMultiplier``, quic-go ``EnsureMinimumWindowSize``).
CONN_WINDOW_FACTOR_NUM = 3
CONN_WINDOW_FACTOR_DEN = 2


def min_conn_window(stream_window: int) -> int:
    """The smallest connection window allowed next to a stream window of ``stream_window``."""
    return stream_window * CONN_WINDOW_FACTOR_NUM // CONN_WINDOW_FACTOR_DEN


class SendCredit:
    """What we may still send: ``limit - sent`` bytes."""

    __slots__ = ("limit", "sent")

    def __init__(self, limit: int) -> None:
        #: DATA payload bytes sent so far.
        self.sent = 0
        #: The largest absolute offset the peer allowed.
        self.limit = limit

    def raise_limit(self, max_offset: int) -> bool:
        """Apply a WINDOW offset; True if it raised the limit (lower ones are ignored)."""
        if max_offset > self.limit:
            self.limit = max_offset
            return True
        return False


class ReceiveWindow:
    """The receiving side of one flow-control window.

    Args:
        window: the initial window (the value we declared in HELLO).
        max_window: the most auto-tuning may grow it to.
        now: creation time; the first growth test measures from here.
    """

    __slots__ = (
        "advertised",
        "consumed",
        "last_update",
        "max_window",
        "received",
        "window",
    )

    def __init__(self, window: int, max_window: int, now: float = 0.0) -> None:
        #: Bytes received so far (absolute offset).
        self.received = 0
        #: Bytes the application consumed (or that were discarded) so far.
        self.consumed = 0
        #: The absolute offset the peer may send up to.
        self.advertised = window
        #: The current target window size.
        self.window = window
        #: Auto-tuning never grows the window above this.
        self.max_window = max(max_window, window)
        #: ``now`` at the previous update (or at creation).
        self.last_update = now

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return self.received - self.consumed

    def receive(self, n: int) -> bool:
        """Count ``n`` arriving bytes; False (nothing counted) if they exceed the window."""
        total = self.received + n
        if total > self.advertised:
            return False
        self.received = total
        return True

    def consume(self, n: int) -> None:
        """Mark ``n`` received bytes as consumed.

        Raises:
            ValueError: more than the buffered bytes, or a negative count.
        """
        if n < 0 or n > self.received - self.consumed:
            raise ValueError(f"cannot consume {n} bytes: {self.buffered} are buffered")
        self.consumed += n

    def ensure_window(self, window: int) -> bool:
        """Grow the window to at least ``window`` (capped at the maximum).

        Returns:
            True if ``advertised`` grew (a WINDOW frame should go out).
        """
        if window <= self.window:
            return False
        self.window = min(window, self.max_window)
        target = self.consumed + self.window
        if target > self.advertised:
            self.advertised = target
            return True
        return False

    def maybe_update(
        self, now: float, srtt: float | None, budget: WindowBudget | None = None, kept: int = 0
    ) -> bool:
        """Apply the half-window rule and auto-tuning (§8.5 item 3, §8.6).

        Args:
            now: the current time.
            srtt: the smoothed RTT, or None if unknown (no auto-tuning then).
            budget: optional memory budget consulted before the window grows.
            kept: connection only: received bytes whose credit is kept because they are held
                beyond the receive budget (§8.5 item 2). The rule then compares the credit
                still open to the sender, ``advertised - received``, with half the window,
                and the update grants ``window - kept`` beyond what was received.

        Returns:
            True if ``advertised`` grew (a WINDOW frame should go out).
        """
        if self.advertised - self.consumed - kept > self.window // 2:
            return False
        if self.consumed + self.window <= self.advertised:
            return False  # the kept bytes pin the whole window: wait for consumption (§8.7)
        window = self.window
        if (
            srtt is not None
            and now - self.last_update < 2 * srtt
            and window < self.max_window
            and (budget is None or budget(min(2 * window, self.max_window) - window))
        ):
            self.window = min(2 * window, self.max_window)
        self.last_update = now
        # advertised - consumed <= window // 2 < window, so this always raises the offset.
        self.advertised = self.consumed + self.window
        return True
