"""The relay's stream policy: the caller's policy plus per-token and per-tunnel bandwidth limits.

:class:`RelayPolicy` wraps the :class:`~muxtunnel.policy.StreamPolicy` given to
:func:`muxtunnel.server.serve` (its ``admit``, ``prologue``, ``throttle`` and ``finished`` all
still run) and adds bandwidth limits. The relay registers each visitor stream with
:meth:`RelayPolicy.track` before splicing it: the token's and the tunnel's
:class:`~muxtunnel.bandwidth.DuplexMeter` and the session, whose *current* token entry gives
the rates (``TokenPolicy.bandwidth`` and ``tunnel_bandwidth``) at every chunk, so a changed
policy applies without restarting anything. :meth:`RelayPolicy.throttle`, called by
:func:`muxtunnel.splice.splice` after each chunk, sleeps until both buckets are out of debt;
while it sleeps the splice reads nothing more, so flow control holds the sender back. Without
a limit a chunk costs one dictionary lookup and two attribute reads: no bucket, no sleep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from muxtunnel.policy import DEFAULT_POLICY, StreamPolicy

if TYPE_CHECKING:
    from collections.abc import Callable

    from muxtunnel.access import TokenEntry
    from muxtunnel.bandwidth import DuplexMeter
    from muxtunnel.policy import Direction, StreamInfo
    from muxtunnel.protocol.constants import OpenFailReason

__all__ = ["RelayPolicy", "StreamLimits", "TokenHolder"]


class TokenHolder(Protocol):
    """Whatever knows the token entry in force for a stream (a relay session)."""

    @property
    def token(self) -> TokenEntry:
        """The session's current token entry."""


@dataclass(eq=False, slots=True)
class StreamLimits:
    """Where one stream's bandwidth limits come from."""

    #: Gives the rates: ``holder.token.policy``, read at every chunk.
    holder: TokenHolder
    #: Buckets shared by all streams of the token.
    token_meter: DuplexMeter
    #: Buckets shared by all streams of the tunnel.
    tunnel_meter: DuplexMeter


class RelayPolicy(StreamPolicy):
    """``inner`` plus bandwidth limits for the streams registered with :meth:`track`."""

    def __init__(
        self,
        inner: StreamPolicy = DEFAULT_POLICY,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.inner = inner
        self._clock = clock
        #: Limits of the streams being spliced, by ``id(info)`` (removed in :meth:`finished`).
        self._streams: dict[int, StreamLimits] = {}

    def track(self, info: StreamInfo, limits: StreamLimits) -> None:
        """Apply ``limits`` to the stream of ``info`` until :meth:`finished` is called for it."""
        self._streams[id(info)] = limits

    def untrack(self, info: StreamInfo) -> None:
        """Forget the limits of ``info``'s stream (also done by :meth:`finished`)."""
        self._streams.pop(id(info), None)

    def tracked(self) -> int:
        """Streams registered now."""
        return len(self._streams)

    def _limits(self, info: StreamInfo) -> tuple[StreamLimits, int | None, int | None] | None:
        """The stream's buckets and the token and tunnel rates in force; None without a rate."""
        limits = self._streams.get(id(info))
        if limits is None:
            return None
        policy = limits.holder.token.policy
        token_rate, tunnel_rate = policy.bandwidth, policy.tunnel_bandwidth
        if token_rate is None and tunnel_rate is None:
            return None
        return limits, token_rate, tunnel_rate

    def delay(self, info: StreamInfo, direction: Direction, nbytes: int) -> float:
        """Charge ``nbytes`` to the stream's buckets; the seconds until both allow more."""
        found = self._limits(info)
        if found is None:
            return 0.0
        limits, token_rate, tunnel_rate = found
        now = self._clock()
        wait = 0.0
        if token_rate is not None:
            wait = limits.token_meter.delay(direction, nbytes, token_rate, now)
        if tunnel_rate is not None:
            wait = max(wait, limits.tunnel_meter.delay(direction, nbytes, tunnel_rate, now))
        return wait

    # -- StreamPolicy ----------------------------------------------------------------------

    def admit(self, info: StreamInfo) -> OpenFailReason | None:
        """The wrapped policy's decision."""
        return self.inner.admit(info)

    def prologue(self, info: StreamInfo) -> bytes:
        """The wrapped policy's prologue."""
        return self.inner.prologue(info)

    async def throttle(self, info: StreamInfo, direction: Direction, nbytes: int) -> None:
        """The wrapped policy's throttle, then wait until the token and tunnel buckets allow."""
        await self.inner.throttle(info, direction, nbytes)
        wait = self.delay(info, direction, nbytes)
        if wait > 0:
            await trio.sleep(wait)

    def throttles(self, info: StreamInfo) -> bool:
        """True while the wrapped policy throttles or the token or tunnel has a rate limit."""
        limits = self._streams.get(id(info))  # ``_limits``, inline: asked on every copy
        if limits is not None:
            policy = limits.holder.token.policy
            if policy.bandwidth is not None or policy.tunnel_bandwidth is not None:
                return True
        return self.inner.throttles(info)

    def finished(self, info: StreamInfo, now: float, error: str | None) -> None:
        """Forget the stream's limits; then the wrapped policy's ``finished``."""
        self._streams.pop(id(info), None)
        self.inner.finished(info, now, error)
