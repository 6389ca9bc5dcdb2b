"""Prometheus metrics of a relay or a client (``--metrics HOST:PORT``, off by default).

:class:`StatsCollector` is a custom ``prometheus_client`` collector: it reads the process's
:class:`~muxtunnel.stats.Stats` when Prometheus scrapes, so the data path makes no Prometheus
call at all. Each relay or client gets its own :class:`~prometheus_client.CollectorRegistry`
(:func:`make_registry`), never the global one, so several of them in one process do not
collide. :func:`serve_metrics` answers ``GET /metrics`` with the text exposition format over a
small HTTP/1.0 server running in the caller's trio nursery (bounded requests, a read timeout,
a bounded number of connections).

Metrics (every one has the label ``role``, ``relay`` or ``client``):

================================================ ======= =====================================
``muxtunnel_build_info{version}``                gauge   always 1
``muxtunnel_start_time_seconds``                 gauge   when the process started (Unix time)
``muxtunnel_sessions``                           gauge   relay: authenticated client sessions;
                                                         client: 1 while a tunnel is up
``muxtunnel_sessions_opened_total``              counter sessions established
``muxtunnel_tunnels{state}``                     gauge   tunnels by state (up, pending, down)
``muxtunnel_tunnel_state{tunnel,local,state}``   gauge   1 for the tunnel's state, else 0
``muxtunnel_tunnel_streams_open{tunnel}``        gauge   visitor streams open now
``muxtunnel_tunnel_streams_total{tunnel}``       counter visitor streams opened
``muxtunnel_tunnel_bytes_total{tunnel,           counter payload bytes
direction}``
``muxtunnel_tunnel_refused_total{tunnel,         counter visitors or streams refused
reason}``
``muxtunnel_streams_open``                       gauge   all tunnels
``muxtunnel_streams_total``                      counter all tunnels, including gone ones
``muxtunnel_bytes_total{direction}``             counter all tunnels, including gone ones
``muxtunnel_visitors_refused_total{reason}``     counter visitors or streams refused, by reason
``muxtunnel_open_failures_total{reason}``        counter streams whose OPEN failed, by the
                                                         OPEN_FAIL reason (relay: answered by
                                                         the client; client: answered by it,
                                                         e.g. the local service is down)
``muxtunnel_auth_failures_total``                counter failed authentications (relay only)
``muxtunnel_resumes_total``                      counter sessions resumed on a new connection
                                                         (relay only, protocol-spec.md §10.6)
``muxtunnel_resume_refusals_total``              counter RESUMEs refused (relay only)
``muxtunnel_reconnects_total``                   counter sessions after the first (client only)
``muxtunnel_flow_control_stalls_total``          counter streams reset because their data
                                                         was not read (protocol-spec.md §8.7)
``muxtunnel_rtt_seconds``                        hist.   round trips of the protocol's PINGs
================================================ ======= =====================================

``direction`` is ``from_visitor`` or ``to_visitor``, as in the access log
(:mod:`muxtunnel.accesslog`).

Label cardinality is bounded; no label ever holds a visitor's address:

* ``role``: 2 values; ``state``: 3 (:data:`muxtunnel.stats.STATES`); ``direction``: 2;
  ``version``: 1.
* ``tunnel``: the public address of a *current* tunnel (``BIND_HOST:PORT`` on the relay,
  ``RELAY_HOST:PORT`` or ``private:NAME`` on the client); bounded by the relay's port range and
  its tunnel limits (``--max-tunnels-per-token`` times the tokens) or by the client's own tunnel
  specs. ``local`` is the client's configured target (empty on the relay).
* ``reason``: names chosen by the code (OPEN_FAIL reason names, refusal kinds such as ``allow``,
  ``deny``, ``limit``), never text from a peer.

Counters stay monotonic: a tunnel's series live as long as the tunnel; when it goes away its
series are dropped (a tunnel that comes back under the same label starts a new counter, which
``rate()``/``increase()`` treat as a reset), and the aggregates without the ``tunnel`` label keep
every stream and byte of tunnels that are gone.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Final

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from muxtunnel._version import __version__
from muxtunnel.config import format_host_port
from muxtunnel.localhttp import LocalEndpoint, response, route
from muxtunnel.preflight import listen_error
from muxtunnel.stats import STATES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from muxtunnel.stats import Stats

__all__ = [
    "CONTENT_TYPE",
    "MAX_CLIENTS",
    "MAX_REQUEST",
    "READ_TIMEOUT",
    "StatsCollector",
    "answer",
    "make_registry",
    "serve_metrics",
]

logger = logging.getLogger(__name__)

#: What :func:`prometheus_client.generate_latest` writes: the classic text format (every name
#: here is a legacy-valid Prometheus name).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Largest request head accepted (bytes); more gets 431.
MAX_REQUEST: Final = 4096
#: Seconds a connection may take to send its request (then 408), and to take the answer.
READ_TIMEOUT: Final = 5.0
#: Connections served at once; more are closed at once.
MAX_CLIENTS: Final = 8
#: Prefixes of :attr:`Stats.counters <muxtunnel.stats.Stats.counters>` keys that count open
#: failures by reason: OPEN_FAILs the relay received, and those the client sent because it
#: could not reach its local target.
_OPEN_FAILURE_PREFIXES: Final = ("open_failures:", "dial_failures:")


def _directions(role: str, bytes_in: int, bytes_out: int) -> tuple[int, int]:
    """``(from_visitor, to_visitor)`` from the stats' ``(in, out)`` (see :mod:`muxtunnel.stats`).

    On the client ``in`` comes from the relay, that is from the visitor; on the relay ``in`` comes
    from the client, that is from the local service, on its way to the visitor.
    """
    return (bytes_in, bytes_out) if role == "client" else (bytes_out, bytes_in)


class StatsCollector:
    """Reads a :class:`~muxtunnel.stats.Stats` at scrape time (see the module docstring)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from the stats as they are now."""
        stats = self.stats
        role = stats.role
        base = ["role"]

        info = GaugeMetricFamily(
            "muxtunnel_build_info", "muxtunnel version", labels=[*base, "version"]
        )
        info.add_metric([role, __version__], 1)
        yield info
        started = GaugeMetricFamily(
            "muxtunnel_start_time_seconds", "When the process started (Unix time)", labels=base
        )
        started.add_metric([role], stats.started)
        yield started

        current = stats.tunnels()
        sessions = GaugeMetricFamily(
            "muxtunnel_sessions",
            "Sessions now (relay: authenticated clients; client: 1 while a tunnel is up)",
            labels=base,
        )
        if role == "client":
            up = {id(ss) for ss, ts in current if ts.state == "up"}
            sessions.add_metric([role], len(up))
        else:
            sessions.add_metric([role], len(stats.sessions))
        yield sessions
        yield _counter(
            "sessions_opened", "Sessions established", role, stats.counters, key="sessions_total"
        )

        by_state = dict.fromkeys(STATES, 0)
        per_tunnel: dict[str, _TunnelRow] = {}
        for _, ts in current:
            by_state[ts.state] = by_state.get(ts.state, 0) + 1
            # Two tunnels under one label (a lease changing sessions) are added up: the
            # exposition must not hold one series twice.
            row = per_tunnel.setdefault(ts.public, _TunnelRow(ts.local or "", ts.state))
            bin_, bout = ts.bytes()
            from_v, to_v = _directions(role, bin_, bout)
            row.open += ts.open
            row.total += ts.total
            row.from_visitor += from_v
            row.to_visitor += to_v
            for reason, n in ts.refused.items():
                row.refused[reason] = row.refused.get(reason, 0) + n
            if ts.state == "up":
                row.state = "up"
        tunnels = GaugeMetricFamily(
            "muxtunnel_tunnels", "Tunnels now, by state", labels=[*base, "state"]
        )
        for state, n in by_state.items():
            tunnels.add_metric([role, state], n)
        yield tunnels

        state_g = GaugeMetricFamily(
            "muxtunnel_tunnel_state",
            "1 for the tunnel's state (up, pending: refused for a reason that can pass, down)",
            labels=[*base, "tunnel", "local", "state"],
        )
        open_g = GaugeMetricFamily(
            "muxtunnel_tunnel_streams_open",
            "Visitor streams open now in the tunnel",
            labels=[*base, "tunnel"],
        )
        total_c = CounterMetricFamily(
            "muxtunnel_tunnel_streams",
            "Visitor streams opened in the tunnel while it exists",
            labels=[*base, "tunnel"],
        )
        bytes_c = CounterMetricFamily(
            "muxtunnel_tunnel_bytes",
            "Payload bytes carried by the tunnel while it exists",
            labels=[*base, "tunnel", "direction"],
        )
        refused_c = CounterMetricFamily(
            "muxtunnel_tunnel_refused",
            "Visitors or streams of the tunnel refused, by reason",
            labels=[*base, "tunnel", "reason"],
        )
        for public in sorted(per_tunnel):
            row = per_tunnel[public]
            for state in STATES:
                state_g.add_metric([role, public, row.local, state], int(row.state == state))
            open_g.add_metric([role, public], row.open)
            total_c.add_metric([role, public], row.total)
            bytes_c.add_metric([role, public, "from_visitor"], row.from_visitor)
            bytes_c.add_metric([role, public, "to_visitor"], row.to_visitor)
            for reason in sorted(row.refused):
                refused_c.add_metric([role, public, reason], row.refused[reason])
        yield from (state_g, open_g, total_c, bytes_c, refused_c)

        totals = stats.totals()
        streams_open = GaugeMetricFamily(
            "muxtunnel_streams_open", "Visitor streams open now (all tunnels)", labels=base
        )
        streams_open.add_metric([role], totals["streams_open"])
        yield streams_open
        streams_total = CounterMetricFamily(
            "muxtunnel_streams",
            "Visitor streams opened (all tunnels, including those that are gone)",
            labels=base,
        )
        streams_total.add_metric([role], totals["streams_total"])
        yield streams_total
        all_bytes = CounterMetricFamily(
            "muxtunnel_bytes",
            "Payload bytes (all tunnels, including those that are gone)",
            labels=[*base, "direction"],
        )
        from_v, to_v = _directions(role, totals["bytes_in"], totals["bytes_out"])
        all_bytes.add_metric([role, "from_visitor"], from_v)
        all_bytes.add_metric([role, "to_visitor"], to_v)
        yield all_bytes

        refused = _by_reason(
            "visitors_refused",
            "Visitors or streams refused, by reason (allow/deny rules, limits, dial failures ...)",
            role,
            stats.counters,
            ("refused:",),
        )
        if role == "client":
            # The client's tunnels live as long as the process: their sums never go down.
            client_refused: dict[str, int] = {}
            for _, ts in current:
                for reason, n in ts.refused.items():
                    client_refused[reason] = client_refused.get(reason, 0) + n
            for reason in sorted(client_refused):
                refused.add_metric([role, reason], client_refused[reason])
        yield refused
        yield _by_reason(
            "open_failures",
            "Streams whose OPEN failed, by OPEN_FAIL reason",
            role,
            stats.counters,
            _OPEN_FAILURE_PREFIXES,
        )
        if role == "relay":
            yield _counter("auth_failures", "Failed authentications", role, stats.counters)
            yield _counter("resumes", "Sessions resumed on a new connection", role, stats.counters)
            yield _counter("resume_refusals", "Session resumptions refused", role, stats.counters)
        else:
            yield _counter(
                "reconnects", "Sessions with the relay after the first", role, stats.counters
            )
        yield _counter(
            "flow_control_stalls",
            "Streams reset because their received data was not read (protocol-spec.md 8.7)",
            role,
            stats.counters,
            key="stalls",
        )

        rtt = HistogramMetricFamily(
            "muxtunnel_rtt_seconds",
            "Round-trip time of the protocol's PINGs",
            labels=base,
        )
        buckets = [(_le(bound), float(n)) for bound, n in stats.rtt_cumulative()]
        rtt.add_metric([role], buckets, stats.rtt_sum)
        yield rtt


class _TunnelRow:
    """One ``tunnel`` label's values in a scrape."""

    __slots__ = ("from_visitor", "local", "open", "refused", "state", "to_visitor", "total")

    def __init__(self, local: str, state: str) -> None:
        self.local = local
        self.state = state
        self.open = 0
        self.total = 0
        self.from_visitor = 0
        self.to_visitor = 0
        self.refused: dict[str, int] = {}


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf`` for the last)."""
    return "+Inf" if math.isinf(bound) else repr(bound)


def _counter(
    name: str, doc: str, role: str, counters: dict[str, int], *, key: str | None = None
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"muxtunnel_{name}", doc, labels=["role"])
    family.add_metric([role], counters.get(name if key is None else key, 0))
    return family


def _by_reason(
    name: str, doc: str, role: str, counters: dict[str, int], prefixes: tuple[str, ...]
) -> CounterMetricFamily:
    """A counter by ``reason`` from the stats counters named ``PREFIX<reason>``."""
    family = CounterMetricFamily(f"muxtunnel_{name}", doc, labels=["role", "reason"])
    reasons: dict[str, int] = {}
    for key, n in counters.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                reason = key[len(prefix) :]
                reasons[reason] = reasons.get(reason, 0) + n
    for reason in sorted(reasons):
        family.add_metric([role, reason], reasons[reason])
    return family


def make_registry(stats: Stats) -> CollectorRegistry:
    """A registry of its own holding one :class:`StatsCollector` for ``stats``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return registry


# --------------------------------------------------------------------------------------------
# HTTP


def _error(code: int, message: str) -> bytes:
    return response(code, f"{message}\n".encode(), "text/plain; charset=utf-8")


def answer(head: bytes, registry: CollectorRegistry) -> bytes:
    """The full HTTP response to the request head ``head`` (no I/O)."""
    code, text = route(head, (b"/metrics", b"/"), "GET /metrics")
    if code != 200:
        return _error(code, text)
    return response(200, generate_latest(registry), CONTENT_TYPE, head_only=text == "HEAD")


async def serve_metrics(
    address: tuple[str, int],
    stats: Stats,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` for ``stats`` on ``address`` until cancelled.

    ``task_status.started`` gets the bound ``(host, port)`` (the real port for port 0).

    Raises:
        ListenError: The address cannot be listened on (:mod:`muxtunnel.preflight`).
    """
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        raise listen_error(host, port, "--metrics", exc) from None
    sockname = listeners[0].socket.getsockname()
    bound = (str(sockname[0]), int(sockname[1]))
    endpoint = LocalEndpoint(
        name="metrics endpoint",
        answer=partial(answer, registry=make_registry(stats)),
        error=_error,
        max_request=MAX_REQUEST,
        read_timeout=READ_TIMEOUT,
        max_clients=MAX_CLIENTS,
    )
    try:
        async with trio.open_nursery() as nursery:
            endpoint.start(nursery, listeners)
            logger.info("metrics on http://%s/metrics", format_host_port(*bound))
            task_status.started(bound)
    finally:
        for listener in listeners:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(listener)
