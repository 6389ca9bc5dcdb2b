"""Bandwidth limits: token buckets with the clock passed in (sans-IO).

A :class:`TokenBucket` holds up to ``burst`` bytes of credit and refills at ``rate`` bytes per
second. Moving ``n`` bytes takes ``n`` from it; the credit may go negative (a chunk is charged
after it moved, all of it), and :meth:`TokenBucket.delay` answers how long the mover must wait
for the debt to be paid back. Waiting that long after every chunk keeps the long-run rate at
``rate`` while the first ``burst`` bytes pass at once. The relay keeps one bucket per direction
for each token and each tunnel (:class:`DuplexMeter`) and waits for the slower of the two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muxtunnel.policy import Direction

__all__ = ["MIN_BURST", "DuplexMeter", "TokenBucket", "default_burst"]

#: The smallest burst (bytes): one full DATA frame of 64 KiB passes without a wait.
MIN_BURST = 64 * 1024


def default_burst(rate: float) -> float:
    """The burst for ``rate`` bytes/s: one second of traffic, at least :data:`MIN_BURST`."""
    return max(float(rate), float(MIN_BURST))


class TokenBucket:
    """``rate`` bytes per second, ``burst`` bytes of credit at most; starts full.

    Args:
        rate: Bytes per second (> 0).
        burst: Most credit in bytes (default :func:`default_burst`).
        now: The clock's current time in seconds.
    """

    __slots__ = ("_credit", "_last", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None, *, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = float(rate)
        self.burst = default_burst(rate) if burst is None else float(burst)
        if self.burst <= 0:
            raise ValueError(f"burst must be positive, got {burst!r}")
        self._credit = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._credit = min(self.burst, self._credit + (now - self._last) * self.rate)
            self._last = now

    def credit(self, now: float) -> float:
        """Bytes of credit at ``now`` (negative while in debt)."""
        self._refill(now)
        return self._credit

    def delay(self, nbytes: int, now: float) -> float:
        """Charge ``nbytes`` moved at ``now``; return the seconds to wait until out of debt."""
        self._refill(now)
        self._credit -= nbytes
        if self._credit >= 0:
            return 0.0
        return -self._credit / self.rate

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate (a policy changed); the credit so far is kept, capped at the new burst."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self._refill(now)
        self.rate = float(rate)
        self.burst = default_burst(rate)
        self._credit = min(self._credit, self.burst)


class DuplexMeter:
    """One :class:`TokenBucket` per direction, created when first needed.

    The rate is passed with every charge, so a changed limit applies from the next chunk on.
    """

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[Direction, TokenBucket] = {}

    def delay(self, direction: Direction, nbytes: int, rate: float, now: float) -> float:
        """Charge ``nbytes`` moved in ``direction`` at ``rate`` bytes/s; seconds to wait."""
        bucket = self._buckets.get(direction)
        if bucket is None:
            bucket = self._buckets[direction] = TokenBucket(rate, now=now)
        elif bucket.rate != rate:
            bucket.set_rate(rate, now)
        return bucket.delay(nbytes, now)

    def bucket(self, direction: Direction) -> TokenBucket | None:
        """The bucket of ``direction``, if traffic was charged that way."""
        return self._buckets.get(direction)
