"""Per-stream accounting and the policy hook point.

Every mux stream carries a :class:`StreamInfo` (tunnel id, visitor address, start time, byte
counters). Everything that decides about or measures one tunnelled connection plugs in through
:class:`StreamPolicy`: the relay asks :meth:`StreamPolicy.admit` before it opens a stream for a
visitor, :func:`muxtunnel.splice.splice` writes :meth:`StreamPolicy.prologue` first to the
local side, calls :meth:`StreamPolicy.throttle` for every chunk it moves and
:meth:`StreamPolicy.finished` once at the end. The default policy admits everything, sends no
prologue, never throttles and logs one debug line per stream. Per-token rules, IP allow/deny
lists, bandwidth limits, PROXY protocol headers and metrics are later subclasses of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muxtunnel.protocol.constants import OpenFailReason
    from muxtunnel.protocol.frames import Address

__all__ = ["Direction", "StreamInfo", "StreamPolicy"]

logger = logging.getLogger(__name__)


class Direction(Enum):
    """Which way a chunk moves through :func:`muxtunnel.splice.splice`."""

    #: From the local TCP socket into the mux stream (towards the peer).
    OUT = "out"
    #: From the mux stream into the local TCP socket.
    IN = "in"


@dataclass(slots=True, kw_only=True)
class StreamInfo:
    """Accounting for one mux stream; the same object lives as long as the stream."""

    #: Stream id on the wire.
    stream_id: int
    #: Tunnel the stream belongs to (the client's tunnel id).
    tunnel_id: int
    #: The visitor's address (relay-opened streams).
    origin: Address
    #: The public address the visitor connected to.
    target: Address
    #: ``trio.current_time()`` when the stream was opened or announced.
    started: float
    #: Payload bytes received from the peer and handed to the application.
    bytes_in: int = 0
    #: Payload bytes the application gave to the stream for the peer.
    bytes_out: int = 0
    #: Short, non-secret id of the token that owns the session (relay side).
    token_id: str | None = None
    #: Free-form labels a policy may attach (e.g. the local target on the client).
    labels: dict[str, str] = field(default_factory=dict)

    def duration(self, now: float) -> float:
        """Seconds since the stream started, given ``trio.current_time()``."""
        return max(0.0, now - self.started)


class StreamPolicy:
    """Hook point for per-stream policy and accounting; subclass and override what you need."""

    def admit(self, info: StreamInfo) -> OpenFailReason | None:
        """Decide whether a new stream may open; return a reason to refuse it, or None."""
        del info
        return None

    def prologue(self, info: StreamInfo) -> bytes:
        """Bytes written to the local side before any stream data (e.g. a PROXY header)."""
        del info
        return b""

    async def throttle(self, info: StreamInfo, direction: Direction, nbytes: int) -> None:
        """Called after each chunk is moved; a bandwidth limit may sleep here."""
        del info, direction, nbytes

    def throttles(self, info: StreamInfo) -> bool:
        """Whether :meth:`throttle` must see the stream's bytes now (it may sleep or count).

        While False, ``muxtunnel.splice`` does not call :meth:`throttle`, and bytes arriving
        for the stream may be written to the local socket by the connection's reader itself.
        Asked again for every chunk, so a limit that appears later takes effect. The
        default: True if a subclass overrides :meth:`throttle`.
        """
        del info
        return type(self).throttle is not StreamPolicy.throttle

    def finished(self, info: StreamInfo, now: float, error: str | None) -> None:
        """Called once when the stream is over; ``error`` is None for a clean end."""
        logger.debug(
            "stream %d tunnel %d from %s closed: %d B in, %d B out, %.3f s%s",
            info.stream_id,
            info.tunnel_id,
            info.origin,
            info.bytes_in,
            info.bytes_out,
            info.duration(now),
            "" if error is None else f" ({error})",
        )


#: The policy used when none is given.
DEFAULT_POLICY = StreamPolicy()
