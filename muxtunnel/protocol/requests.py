"""Bookkeeping of AUTH/BIND/UNBIND requests and their RESULTs (protocol-spec.md §7.2-§7.6).

The server keeps the client's unanswered requests (:class:`IncomingRequests`); the client
keeps its own requests, holds back those beyond the outstanding limit or the pipelining
budget, and tracks which tunnels are bound (:class:`OutgoingRequests`). Neither encodes
frames nor touches the session: the session asks, and queues what they hand back.
"""

from __future__ import annotations

from typing import Final

from muxtunnel.errors import ErrorCode, ProtocolError

from .constants import FrameType

__all__ = [
    "MAX_OUTSTANDING_REQUESTS",
    "PIPELINE_BUDGET",
    "IncomingRequests",
    "OutgoingRequests",
]

#: AUTH/BIND/UNBIND requests a client may have without RESULT (spec §7.5). The server treats
#: one more as ENHANCE_YOUR_CALM; a client session holds further requests back until a
#: RESULT arrives, so it never exceeds the limit whatever the application asks for.
MAX_OUTSTANDING_REQUESTS: Final = 16
#: Bytes of BIND/UNBIND requests a client pipelines behind its AUTH before the AUTH's RESULT
#: (spec §7.6 item 2): half the relay's default pre-authentication limit, so BINDs with long
#: allow/deny lists (§6.12) cannot push a relay past it. Later requests wait for the RESULT.
PIPELINE_BUDGET: Final = 8192


class IncomingRequests:
    """Server: the client's requests that have no RESULT yet."""

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[int, FrameType] = {}

    def take(self, req_id: int, kind: FrameType) -> None:
        """Record a request from the peer.

        Raises:
            ProtocolError: id 0 or an outstanding id; ENHANCE_YOUR_CALM beyond the limit.
        """
        if req_id == 0:
            raise ProtocolError("request id 0 is reserved for notices")
        if req_id in self._open:
            raise ProtocolError(f"request id {req_id} is already outstanding")
        if len(self._open) >= MAX_OUTSTANDING_REQUESTS:
            raise ProtocolError(
                f"more than {MAX_OUTSTANDING_REQUESTS} requests without RESULT",
                ErrorCode.ENHANCE_YOUR_CALM,
            )
        self._open[req_id] = kind

    def kind(self, req_id: int) -> FrameType | None:
        """The kind of an unanswered request, or None."""
        return self._open.get(req_id)

    def answer(self, req_id: int) -> None:
        """The RESULT for ``req_id`` is queued."""
        del self._open[req_id]


class OutgoingRequests:
    """Client: our requests on the wire, those held back, and the tunnels bound."""

    __slots__ = ("_auth_out", "_bound", "_out", "_pipelined", "_unbound", "_waiting", "auth_sent")

    def __init__(self) -> None:
        self._out: dict[int, tuple[FrameType, int]] = {}  # id -> (kind, tunnel)
        self._waiting: dict[int, tuple[FrameType, int, bytes]] = {}  # held back, oldest first
        self._auth_out = False  # our AUTH is on the wire without its RESULT
        self._pipelined = 0  # request bytes sent behind the AUTH before its RESULT (§7.6)
        self._bound: set[int] = set()  # tunnels with an OK RESULT for their BIND
        self._unbound: set[int] = set()  # tunnels whose UNBIND completed or was notified
        #: The AUTH was added (a session sends one).
        self.auth_sent = False

    def outstanding(self, req_id: int) -> bool:
        """True if ``req_id`` is on the wire or held back."""
        return req_id in self._out or req_id in self._waiting

    def add(self, req_id: int, kind: FrameType, tunnel_id: int, raw: bytes) -> list[bytes]:
        """Add an encoded request; return the requests that may go on the wire now."""
        self._waiting[req_id] = (kind, tunnel_id, raw)
        if kind == FrameType.AUTH:
            self.auth_sent = True
        return self._release()

    def _release(self) -> list[bytes]:
        """Held-back requests, oldest first, while the limits allow."""
        waiting = self._waiting
        released: list[bytes] = []
        while waiting and len(self._out) < MAX_OUTSTANDING_REQUESTS:
            req_id = next(iter(waiting))
            kind, tunnel_id, raw = waiting[req_id]
            if self._auth_out and kind != FrameType.AUTH:
                if self._pipelined + len(raw) > PIPELINE_BUDGET:
                    break  # the rest waits for the AUTH's RESULT
                self._pipelined += len(raw)
            elif kind == FrameType.AUTH:
                self._auth_out = True
            del waiting[req_id]
            self._out[req_id] = (kind, tunnel_id)
            released.append(raw)
        return released

    def complete(self, req_id: int, ok: bool, has_bound: bool) -> tuple[FrameType, list[bytes]]:
        """A RESULT arrived: its request's kind, and the held-back requests now released.

        Raises:
            ProtocolError: no such request, or a bound address on a RESULT other than the OK
                answer to a BIND (or none on that answer).
        """
        request = self._out.pop(req_id, None)
        if request is None:
            raise ProtocolError(f"RESULT for unknown request id {req_id}")
        kind, tunnel_id = request
        if has_bound != (kind == FrameType.BIND and ok):
            raise ProtocolError(
                f"a bound address comes with exactly the OK RESULT of a BIND (request {req_id})"
            )
        if kind == FrameType.AUTH:
            self._auth_out = False
        elif ok and kind == FrameType.BIND:
            self._unbound.discard(tunnel_id)
            self._bound.add(tunnel_id)
        elif ok:
            self._bound.discard(tunnel_id)
            self._unbound.add(tunnel_id)
        # One request left the wire (and the AUTH's RESULT ends the pipelining budget).
        return kind, self._release()

    def revoke(self, tunnel_id: int) -> bool:
        """The relay's UNBIND notice: False if the tunnel is not bound (nothing to revoke)."""
        if tunnel_id not in self._bound:
            return False
        self._bound.discard(tunnel_id)
        self._unbound.add(tunnel_id)  # no OPEN may follow for it
        return True

    def share(self, first: OutgoingRequests) -> None:
        """Use the bound tunnels of ``first`` from now on (an extra connection of a session
        takes OPENs for the tunnels its first connection bound, spec §10.7)."""
        self._bound = first._bound
        self._unbound = first._unbound

    def is_bound(self, tunnel_id: int) -> bool:
        """True while the tunnel has an OK RESULT for its BIND and no UNBIND since."""
        return tunnel_id in self._bound

    def was_unbound(self, tunnel_id: int) -> bool:
        """True once the tunnel's UNBIND completed (until it is bound again)."""
        return tunnel_id in self._unbound
