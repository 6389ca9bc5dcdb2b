"""Socket options of a session's TCP connection (client to relay), set on both ends.

A session carries every stream of a tunnel on one TCP connection, so how fast that one
connection resumes after an outage is how fast the whole tunnel resumes. TCP doubles its
retransmission timeout on every unanswered retransmission (RFC 6298: 0.2, 0.4 ... 120 s on
Linux), so after a silent outage of 20 s the next retransmission may come 10 s after the path
is back. :func:`cap_retransmit_timeout` caps the timeout at :data:`RTO_MAX_MS` where the kernel
supports it (Linux >= 6.15: ``TCP_RTO_MAX_MS``; elsewhere nothing changes): a path that comes
back carries the session again within about 2 s, at the price of one retransmitted segment
every 2 s while the path is down. The session's own keepalive (protocol-spec §10.1) declares a
silent peer dead after 30 s by default, so a longer timeout could only delay the recovery of a
session that is still alive. Paths whose round trip alone approaches 2 s would see spurious
retransmissions (undone by F-RTO); such paths are rare for a tunnel.

The kernel gives up on a connection after ``tcp_retries2`` (15) unanswered retransmissions,
which it turns into a time assuming the doubling timeout: about 15 minutes normally, but only
about 25 s once the timeout is capped, less than the keepalive timeout. So the same call sets
``TCP_USER_TIMEOUT`` to :data:`USER_TIMEOUT_MS` (15 minutes, the usual limit): the session's
keepalive stays the one that declares a silent peer dead, with its own log line.
"""

from __future__ import annotations

import socket
from typing import Protocol

__all__ = ["RTO_MAX_MS", "USER_TIMEOUT_MS", "cap_retransmit_timeout"]

#: Longest TCP retransmission timeout of a session's connection (milliseconds; the kernel
#: accepts 1000..120000).
RTO_MAX_MS = 2000
#: How long sent data may stay unacknowledged before the kernel ends the connection (ms).
USER_TIMEOUT_MS = 900_000
#: ``TCP_RTO_MAX_MS`` (Linux include/uapi/linux/tcp.h); Python's socket module may lack it.
_TCP_RTO_MAX_MS: int = getattr(socket, "TCP_RTO_MAX_MS", 44)


class _SetSockOpt(Protocol):
    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...


def cap_retransmit_timeout(sock: _SetSockOpt) -> bool:
    """Cap ``sock``'s retransmission timeout at :data:`RTO_MAX_MS` and set its user timeout to
    :data:`USER_TIMEOUT_MS`; False (and nothing changed) where the kernel cannot cap it."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_RTO_MAX_MS, RTO_MAX_MS)
    except (OSError, ValueError):  # an older kernel (ENOPROTOOPT / EINVAL) or not TCP
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    except (OSError, ValueError, AttributeError):  # pragma: no cover - Linux has it since 2.6.37
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_RTO_MAX_MS, 120_000)  # undo: never without it
        return False
    return True
