"""Live statistics of a relay or a client: the one source every observer reads.

Plain Python, no I/O. The relay and the client each own one :class:`Stats`; a session is a
:class:`SessionStats`, a tunnel a :class:`TunnelStats`. Stream byte counts already live on
:class:`muxtunnel.policy.StreamInfo` (updated by :func:`muxtunnel.splice.splice`): a tunnel keeps
references to the StreamInfos of its open streams and adds their bytes at snapshot time, so the
data path does no extra work per chunk.

Byte directions are those of :class:`~muxtunnel.policy.StreamInfo`, seen by the process that
reports them: ``in`` is received from the peer over the tunnel connection, ``out`` is sent to
the peer. On the relay ``in`` is what the local service sent back; on the client ``in`` is what
visitors sent.

:meth:`Stats.snapshot` returns a JSON-able dict (the admin endpoint, ``muxtunnel status``, the
metrics exporter and the console read it)::

    {"role": "relay", "started": 1.7e9, "uptime": 12.5,
     "sessions": [{"id": 1, "peer": "127.0.0.1:40000", "token": "default", "since": 1.7e9,
                   "rtt": 0.0004, "state": "up", "retry_at": null, "resumes": 0, "replay": 0,
                   "connections": 1,
                   "tunnels": [{"id": 1, "public": "127.0.0.1:20001",
                   "local": null, "state": "up", "last_error": null, "since": 1.7e9,
                   "open": 1, "total": 3, "bytes_in": 10, "bytes_out": 20,
                   "refused": {"deny": 1}, "outcomes": {"closed": 2}}]}],
     "totals": {"sessions": 1, "tunnels": 1, "streams_open": 1, "streams_total": 3,
                "bytes_in": 10, "bytes_out": 20, "refused": 1, "sessions_total": 1},
     "counters": {"auth_failures": 2},
     "rtt": {"buckets": [[0.001, 5], ..., [null, 9]], "count": 9, "sum": 0.02}}

Totals of streams, bytes and refusals are cumulative over the life of the process (tunnels and
sessions that are gone still count); ``sessions``/``tunnels``/``streams_open`` are current.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

    from muxtunnel.policy import StreamInfo
    from muxtunnel.splice import SpliceResult

__all__ = [
    "RTT_BUCKETS",
    "STATES",
    "SessionStats",
    "Stats",
    "TunnelState",
    "TunnelStats",
    "outcome_of",
]

#: A tunnel's state: bound and serving / refused for a reason that can pass (retrying) / not bound.
TunnelState = Literal["up", "pending", "down"]
#: The valid tunnel states.
STATES: Final = ("up", "pending", "down")
#: Upper bounds (seconds) of the RTT histogram buckets; a last bucket holds everything above.
RTT_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


def _no_rtt() -> float | None:
    return None


class TunnelStats:
    """One tunnel: a lease of a relay session, or one spec of a client."""

    __slots__ = (
        "_closed_in",
        "_closed_out",
        "_live",
        "last_error",
        "local",
        "open",
        "outcomes",
        "public",
        "refused",
        "since",
        "state",
        "total",
        "tunnel_id",
    )

    def __init__(
        self,
        tunnel_id: int,
        public: str,
        local: str | None = None,
        *,
        state: TunnelState = "up",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tunnel_id = tunnel_id
        #: "relay.example.com:2222", "127.0.0.1:20001", "private:NAME", "visit:NAME".
        self.public = public
        #: The local target on the client ("127.0.0.1:22"); None on the relay.
        self.local = local
        self.state: TunnelState = state
        self.last_error: str | None = None
        #: Wall-clock time the tunnel was created or last changed state.
        self.since = clock()
        #: Streams open now / opened since the tunnel was created.
        self.open = 0
        self.total = 0
        #: Visitors or streams refused, by reason ("allow", "deny", "limit", "dial_failed", ...).
        self.refused: Counter[str] = Counter()
        #: Closed streams by how they ended ("closed", "reset", ...).
        self.outcomes: Counter[str] = Counter()
        self._live: dict[int, StreamInfo] = {}
        self._closed_in = 0
        self._closed_out = 0

    def stream_opened(self, info: StreamInfo) -> None:
        """A stream of this tunnel opened; its bytes count from now on."""
        if id(info) in self._live:
            return
        self._live[id(info)] = info
        self.open += 1
        self.total += 1

    def stream_closed(self, info: StreamInfo, outcome: str = "closed") -> None:
        """The stream is over: its final byte counts move into the closed totals (idempotent)."""
        if self._live.pop(id(info), None) is None:
            return
        self.open -= 1
        self._closed_in += info.bytes_in
        self._closed_out += info.bytes_out
        self.outcomes[outcome] += 1

    def refuse(self, reason: str) -> None:
        """Count a visitor or stream refused for ``reason``."""
        self.refused[reason] += 1

    def set_state(
        self,
        state: TunnelState,
        error: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Change the state; ``error`` (why it is pending or down) replaces ``last_error``."""
        if state not in STATES:
            raise ValueError(f"unknown tunnel state {state!r}")
        if state != self.state:
            self.since = clock()
        self.state = state
        if error is not None:
            self.last_error = error

    def bytes(self) -> tuple[int, int]:
        """``(in, out)``: closed streams plus the live ones, as of now."""
        bin_, bout = self._closed_in, self._closed_out
        for info in self._live.values():
            bin_ += info.bytes_in
            bout += info.bytes_out
        return bin_, bout

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of the tunnel."""
        bin_, bout = self.bytes()
        return {
            "id": self.tunnel_id,
            "public": self.public,
            "local": self.local,
            "state": self.state,
            "last_error": self.last_error,
            "since": self.since,
            "open": self.open,
            "total": self.total,
            "bytes_in": bin_,
            "bytes_out": bout,
            "refused": dict(self.refused),
            "outcomes": dict(self.outcomes),
        }


def _one() -> int:
    return 1


class SessionStats:
    """One session: a client connection on the relay, or the relay connection of a client."""

    __slots__ = (
        "_owner",
        "connections",
        "peer",
        "replay",
        "resumes",
        "retry_at",
        "rtt",
        "session_id",
        "since",
        "state",
        "token",
        "tunnels",
    )

    def __init__(
        self,
        owner: Stats,
        session_id: int,
        peer: str,
        token: str | None = None,
        rtt: Callable[[], float | None] = _no_rtt,
        *,
        since: float,
    ) -> None:
        self._owner = owner
        self.session_id = session_id
        self.peer = peer
        #: The token's name (relay side), or None.
        self.token = token
        #: Wall-clock time the session was established.
        self.since = since
        #: Reads the session's smoothed RTT in seconds (None before the first sample).
        self.rtt = rtt
        #: "connecting" | "up" | "resuming" | "reconnecting" | "down" (a client's relay session;
        #: the relay's sessions are "up", or "suspended" while the connection is lost and the
        #: session waits for its client to resume it, protocol-spec.md §10.6), and when the next
        #: attempt is due (wall clock) if known.
        self.state = "up"
        self.retry_at: float | None = None
        #: Times the session was resumed on a new connection (protocol-spec.md §10.6).
        self.resumes = 0
        #: Reads the bytes the session holds for a replay after a resume (None: no resumption).
        self.replay: Callable[[], int] | None = None
        #: Reads the TLS connections the session runs over (protocol-spec.md §10.7).
        self.connections: Callable[[], int] = _one
        self.tunnels: dict[int, TunnelStats] = {}

    def add_tunnel(
        self,
        tunnel_id: int,
        public: str,
        local: str | None = None,
        *,
        state: TunnelState = "up",
    ) -> TunnelStats:
        """Create (or replace) the stats of tunnel ``tunnel_id`` and return them."""
        old = self.tunnels.pop(tunnel_id, None)
        if old is not None:
            self._owner._retire(old)
        ts = TunnelStats(tunnel_id, public, local, state=state, clock=self._owner.clock)
        self.tunnels[tunnel_id] = ts
        return ts

    def remove_tunnel(self, tunnel_id: int) -> None:
        """Forget tunnel ``tunnel_id``; its streams, bytes and refusals stay in the totals."""
        ts = self.tunnels.pop(tunnel_id, None)
        if ts is not None:
            self._owner._retire(ts)

    def current_rtt(self) -> float | None:
        """The RTT now (None if unknown or if reading it fails)."""
        try:
            value = self.rtt()
        except Exception:
            return None
        return None if value is None else float(value)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of the session and its tunnels (ordered by tunnel id)."""
        return {
            "id": self.session_id,
            "peer": self.peer,
            "token": self.token,
            "since": self.since,
            "rtt": self.current_rtt(),
            "state": self.state,
            "retry_at": self.retry_at,
            "resumes": self.resumes,
            "replay": None if self.replay is None else self.replay(),
            "connections": self.connections(),
            "tunnels": [self.tunnels[k].snapshot() for k in sorted(self.tunnels)],
        }


class Stats:
    """Everything a relay or a client measures; one per process role."""

    def __init__(self, role: str, *, clock: Callable[[], float] = time.time) -> None:
        #: "relay" or "client".
        self.role = role
        self.clock = clock
        self.started = clock()
        self.sessions: dict[int, SessionStats] = {}
        #: Event counters: "auth_failures", "reconnects", "stalls", "sessions_total",
        #: "open_failures:<REASON>", "dial_failures:<REASON>", "refused:<REASON>", ...
        self.counters: Counter[str] = Counter()
        #: Per-bucket (not cumulative) RTT sample counts; index len(RTT_BUCKETS) is +Inf.
        self.rtt_buckets: list[int] = [0] * (len(RTT_BUCKETS) + 1)
        self.rtt_count = 0
        self.rtt_sum = 0.0
        self._next_id = 0
        self._retired_streams = 0
        self._retired_in = 0
        self._retired_out = 0
        self._retired_refused = 0

    def add_session(
        self,
        peer: str,
        token: str | None = None,
        rtt: Callable[[], float | None] = _no_rtt,
    ) -> SessionStats:
        """Register a new session (counted in ``sessions_total``) and return its stats."""
        self._next_id += 1
        ss = SessionStats(self, self._next_id, peer, token, rtt, since=self.clock())
        self.sessions[ss.session_id] = ss
        self.counters["sessions_total"] += 1
        return ss

    def remove_session(self, session: SessionStats) -> None:
        """Forget ``session`` and its tunnels (their totals stay); idempotent."""
        if self.sessions.pop(session.session_id, None) is None:
            return
        for tunnel_id in list(session.tunnels):
            session.remove_tunnel(tunnel_id)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self.counters[name] += n

    def observe_rtt(self, seconds: float) -> None:
        """Record one RTT sample in the histogram."""
        if seconds != seconds or seconds < 0:  # NaN or negative: ignore
            return
        self.rtt_buckets[bisect_left(RTT_BUCKETS, seconds)] += 1
        self.rtt_count += 1
        self.rtt_sum += seconds

    def rtt_cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, samples <= bound)`` pairs, the last bound ``inf`` (Prometheus style)."""
        out: list[tuple[float, int]] = []
        acc = 0
        for bound, n in zip((*RTT_BUCKETS, float("inf")), self.rtt_buckets, strict=True):
            acc += n
            out.append((bound, acc))
        return out

    def tunnels(self) -> list[tuple[SessionStats, TunnelStats]]:
        """Every current tunnel with its session."""
        return [(ss, ts) for ss in self.sessions.values() for ts in ss.tunnels.values()]

    def _retire(self, ts: TunnelStats) -> None:
        bin_, bout = ts.bytes()
        self._retired_streams += ts.total
        self._retired_in += bin_
        self._retired_out += bout
        self._retired_refused += sum(ts.refused.values())

    def totals(self) -> dict[str, int]:
        """Current sessions/tunnels/open streams; cumulative streams, bytes and refusals."""
        streams_open = streams = refused = 0
        bin_, bout = self._retired_in, self._retired_out
        tunnels = self.tunnels()
        for _, ts in tunnels:
            streams_open += ts.open
            streams += ts.total
            refused += sum(ts.refused.values())
            tin, tout = ts.bytes()
            bin_ += tin
            bout += tout
        return {
            "sessions": len(self.sessions),
            "tunnels": len(tunnels),
            "streams_open": streams_open,
            "streams_total": self._retired_streams + streams,
            "bytes_in": bin_,
            "bytes_out": bout,
            "refused": self._retired_refused + refused,
            "sessions_total": self.counters["sessions_total"],
        }

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view of everything (see the module docstring)."""
        now = self.clock()
        return {
            "role": self.role,
            "started": self.started,
            "uptime": max(0.0, now - self.started),
            "sessions": [self.sessions[k].snapshot() for k in sorted(self.sessions)],
            "totals": self.totals(),
            "counters": dict(sorted(self.counters.items())),
            "rtt": {
                "buckets": [
                    [bound, n]
                    for bound, n in zip((*RTT_BUCKETS, None), self.rtt_buckets, strict=True)
                ],
                "count": self.rtt_count,
                "sum": self.rtt_sum,
            },
        }


def outcome_of(result: SpliceResult | None) -> str:
    """A short word for how a splice ended: ``closed`` (both FINs), ``rejected`` (OPEN_FAIL),
    ``reset``/``stalled``/``session`` (the stream failed), ``local_error`` (the TCP side),
    ``error``, or ``cancelled`` (no result: shutdown)."""
    if result is None:
        return "cancelled"
    if result.rejected:
        return "rejected"
    if result.error is None:
        return "closed"
    if result.failed_side == "mux":
        return result.mux_failure or "reset"
    if result.failed_side == "tcp":
        return "local_error"
    return "error"
