"""The access log: one line per visitor connection when it ends, on the relay and on the client.

Every side calls :func:`log_access` (logger ``muxtunnel.access``), so the line reads the same
everywhere. Text format (client; on the relay the tunnel is its public address only)::

    access 127.0.0.2:51234 -> 127.0.0.1:20001 -> 127.0.0.1:22: closed, 1234 B from visitor, 5678 B to visitor, 2.31 s

With ``--log-format json`` the same record carries typed keys: ``event`` ("access"), ``side``
("relay", "client", or "visit" for ``muxtunnel visit``), ``tunnel`` (relay: its public
``HOST:PORT`` or ``private:NAME``; client: ``RELAY:PORT -> LOCAL``), ``visitor`` (``HOST:PORT``),
``local`` (client: the local target, else null), ``bytes_from_visitor`` and
``bytes_to_visitor`` (payload bytes, ints), ``duration`` (seconds, float), ``end``, ``reason``
(null for a clean end), ``first_fin`` (who sent the first FIN, or null), ``stream`` (the stream
id) and, on the relay, ``token``.

``end`` is one of :data:`ENDS`. Lines of connections that carried a stream are never dropped by
the log's rate limiter (their number is bounded by the connections the relay admits); lines of
connections that never opened (``refused``, ``dial_failed``, ``dial_timeout``) go through it,
per tunnel, since a visitor can make many of them cheaply.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from muxtunnel.logsafe import peer_text
from muxtunnel.protocol.constants import OpenFailReason

if TYPE_CHECKING:
    from muxtunnel.policy import StreamInfo
    from muxtunnel.splice import SpliceResult

__all__ = ["ENDS", "NOT_OPENED", "log_access", "log_splice", "log_unopened", "splice_end"]

logger = logging.getLogger("muxtunnel.access")

#: How a visitor connection ended.
ENDS = (
    "closed",  # both directions finished with FIN
    "reset_by_visitor",  # relay, visit: the visitor reset (or its socket failed)
    "reset_by_relay",  # client: the relay reset the stream
    "reset_by_client",  # relay: the client reset the stream
    "reset_by_local",  # client: the local service's socket failed or was reset
    "refused",  # refused by a policy or a limit (``reason`` says which)
    "dial_failed",  # the client could not connect to the local service
    "dial_timeout",  # ... within its connect timeout
    "stalled",  # reset because received data was not consumed (protocol-spec §8.7)
    "session_ended",  # the tunnel's connection between client and relay ended
    "cancelled",  # ended by us: shutdown, drain deadline
)
#: Ends of connections that never carried a stream.
NOT_OPENED = frozenset({"refused", "dial_failed", "dial_timeout"})

#: Who is at the other end of the stream, and of the TCP socket, on each side ("visit": the
#: ``muxtunnel visit`` command, whose local connections are the visitors).
_PEER = {"relay": "client", "client": "relay", "visit": "relay"}
_TCP_PEER = {"relay": "visitor", "client": "local", "visit": "visitor"}
_MESSAGE = "access %s -> %s: %s, %d B from visitor, %d B to visitor, %.2f s"


def _inert(text: str, limit: int) -> str:
    """``text`` made safe for one log line: kept if printable and short (a message may quote
    peer text that is escaped already), else :func:`~muxtunnel.logsafe.peer_text`."""
    return text if text.isprintable() and len(text) <= limit else peer_text(text, limit)


def splice_end(result: SpliceResult, side: str) -> tuple[str, str | None]:
    """``(end, reason)`` of a splice seen on ``side`` ("relay", "client" or "visit")."""
    error = result.error
    if error is None:
        return "closed", None
    if result.rejected:
        if result.reject_reason == OpenFailReason.CONNECT_FAILED:
            return "dial_failed", error
        if result.reject_reason == OpenFailReason.CONNECT_TIMEOUT:
            return "dial_timeout", error
        return "refused", error
    if result.failed_side == "tcp":
        return f"reset_by_{_TCP_PEER[side]}", error
    if result.failed_side == "mux":
        if result.mux_failure == "stalled":
            return "stalled", error
        if result.mux_failure == "session":
            return "session_ended", error
        return f"reset_by_{_PEER[side]}", error
    return "cancelled", None


def first_fin(result: SpliceResult, side: str) -> str | None:
    """Who sent the first FIN ("visitor", "local", "relay", "client"), if anyone did."""
    if result.first_eof == "tcp":
        return _TCP_PEER[side]
    if result.first_eof == "mux":
        return _PEER[side]
    return None


def log_access(
    *,
    side: str,
    tunnel: str,
    visitor: str,
    local: str | None,
    bytes_from_visitor: int,
    bytes_to_visitor: int,
    duration: float,
    end: str,
    reason: str | None = None,
    level: int = logging.INFO,
    **fields: object,
) -> None:
    """Log the end of one visitor connection (see the module docstring).

    ``visitor`` and ``reason`` may quote a peer: they are escaped here. ``fields`` are added as
    further keys (``stream``, ``token``, ``first_fin``).
    """
    if not logger.isEnabledFor(level):
        return
    visitor = _inert(visitor, 100)
    if reason is not None:
        reason = _inert(reason, 300)
    extra: dict[str, object] = {
        "event": "access",
        "side": side,
        "tunnel": tunnel,
        "visitor": visitor,
        "local": local,
        "bytes_from_visitor": bytes_from_visitor,
        "bytes_to_visitor": bytes_to_visitor,
        "duration": round(duration, 3),
        "end": end,
        "reason": reason,
        **fields,
    }
    if end in NOT_OPENED:
        extra["ratelimit_key"] = ("access", tunnel)
    else:
        extra["ratelimit"] = False
    logger.log(
        level,
        _MESSAGE,
        visitor,
        tunnel,
        end if reason is None else f"{end} ({reason})",
        bytes_from_visitor,
        bytes_to_visitor,
        duration,
        extra=extra,
    )


def log_splice(
    side: str,
    info: StreamInfo,
    tunnel: str,
    result: SpliceResult | None,
    now: float,
    *,
    local: str | None = None,
    **fields: Any,
) -> None:
    """Log the end of a spliced visitor connection from its stream's ``info`` and ``result``
    (None: the splice was cancelled). ``now`` is ``trio.current_time()``."""
    if result is None:
        end, reason, fin = "cancelled", None, None
    else:
        (end, reason), fin = splice_end(result, side), first_fin(result, side)
    # The stream's "in" is what came from the peer: on the client, what the visitor sent.
    from_visitor, to_visitor = (
        (info.bytes_in, info.bytes_out) if side == "client" else (info.bytes_out, info.bytes_in)
    )
    log_access(
        side=side,
        tunnel=tunnel,
        visitor=str(info.origin),
        local=local,
        bytes_from_visitor=from_visitor,
        bytes_to_visitor=to_visitor,
        duration=info.duration(now),
        end=end,
        reason=reason,
        stream=info.stream_id,
        first_fin=fin,
        **fields,
    )


def log_unopened(
    side: str,
    tunnel: str,
    visitor: object,
    reason: str,
    *,
    end: str = "refused",
    level: int = logging.DEBUG,
    local: str | None = None,
    duration: float = 0.0,
    **fields: Any,
) -> None:
    """Log a visitor connection that ended before its stream opened (``end`` in
    :data:`NOT_OPENED`).

    Refusals are DEBUG by default: each side logs them already (rate-limited, or once per
    session with a count), so this line only completes the access log at ``--log-level debug``.
    """
    log_access(
        side=side,
        tunnel=tunnel,
        visitor=str(visitor),
        local=local,
        bytes_from_visitor=0,
        bytes_to_visitor=0,
        duration=duration,
        end=end,
        reason=reason,
        level=level,
        **fields,
    )
