"""The relay: a TLS listener for clients and public TCP listeners for their tunnels.

Task tree (every task lives in a nursery this module owns)::

    serve()
    ├── lease reaper                     closes listeners whose lease expired
    └── client handlers (one per TLS connection)
        └── RelaySession.run()
            ├── MuxConnection.run()      reader / writer / keepalive
            ├── control loop             BIND / UNBIND requests
            ├── accept loops             one per bound tunnel (stoppable per lease)
            └── visitor splices          one per public connection

Access control: each session holds its token's entry (``RelaySession.token``, see
:mod:`muxtunnel.access`), read afresh at every BIND (ports, tunnel limit), every visitor (the
token's allow/deny rule, then the tunnel's own from its BIND options, then the visitor, stream
and descriptor limits; a refused visitor is reset before any stream opens or byte is read) and
every chunk (bandwidth, :mod:`muxtunnel.relaypolicy`). A policy value of None means the relay's
own ``--max-*`` option.

Graceful shutdown (``shutdown`` event): stop accepting clients, GOAWAY every session and stop
its accept loops, let open streams finish for up to ``drain_timeout``, then CLOSE(NO_ERROR).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio

import muxtunnel.connection
from muxtunnel import tls
from muxtunnel.access import OPEN_POLICY, AddressRule, TokenEntry
from muxtunnel.accesslog import log_splice, log_unopened
from muxtunnel.admin import ADMIN_AUTO, resolve_admin, serve_admin
from muxtunnel.admission import Admission, Ticket, Verdict, source_of
from muxtunnel.bandwidth import DuplexMeter
from muxtunnel.config import ServerConfig, format_host_port
from muxtunnel.connection import (
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import AuthError, ConfigError, ErrorCode, HandshakeError
from muxtunnel.handshake import authenticate_client
from muxtunnel.leasestore import LEASES_FILE_NAME, LeaseStore, key_id, select
from muxtunnel.limits import (
    DescriptorBudget,
    OpenShares,
    RefusalSummary,
    raise_descriptor_limit,
    reset_connection,
)
from muxtunnel.logsafe import peer_text
from muxtunnel.netopts import cap_retransmit_timeout
from muxtunnel.policy import DEFAULT_POLICY, StreamInfo, StreamPolicy
from muxtunnel.preflight import listen_error
from muxtunnel.private import PrivateTunnels
from muxtunnel.protocol.constants import (
    ALPN,
    CARRIER_TUNNEL,
    MAX_RESUME_WINDOW,
    OpenFailReason,
    ResultStatus,
    Role,
    TunnelProto,
)
from muxtunnel.protocol.events import (
    BindRequested,
    Event,
    GoAwayReceived,
    JoinRequested,
    ResumeRequested,
    UnbindReceived,
)
from muxtunnel.protocol.frames import Address
from muxtunnel.registry import BindError, PortLease, PortRegistry
from muxtunnel.relaypolicy import RelayPolicy, StreamLimits
from muxtunnel.reload import refresh_token, relay_signals, relay_status
from muxtunnel.sdnotify import Notifier
from muxtunnel.splice import SpliceResult, splice
from muxtunnel.stats import SessionStats, Stats, TunnelStats, outcome_of
from muxtunnel.tickets import TicketBook
from muxtunnel.tlsstream import RECEIVE_SIZE as TLS_RECEIVE_SIZE, TLSStream

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from muxtunnel.leasestore import StoredLease

__all__ = ["RelaySession", "ServerInfo", "serve"]

logger = logging.getLogger(__name__)

#: Bytes read per call until the client is authenticated: a pending handshake holds small
#: buffers only (the full read size is restored once the client is authenticated).
PREAUTH_RECEIVE_SIZE = 16384
#: While connections are refused or handshakes fail, one summary line per this many seconds.
PREAUTH_SUMMARY_INTERVAL = 10.0
#: Sources counted by name in one summary period (more are counted, not named).
_SUMMARY_SOURCES = 256
#: Pause after a failed ``accept`` (EMFILE ...) so a full fd table does not spin the CPU.
ACCEPT_ERROR_PAUSE = 0.1


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What ``serve`` passes to ``task_status.started``."""

    host: str
    port: int
    fingerprint: str


def _sock_address(sockaddr: object) -> Address:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return Address(str(sockaddr[0]), int(sockaddr[1]))
    return Address(None, 0)


@dataclass(eq=False, slots=True)
class _TokenUsage:
    """What one token holds across its sessions (the per-token limits)."""

    sessions: set[RelaySession] = field(default_factory=set)
    #: Visitor streams of all its sessions.
    streams: int = 0
    #: Visitors refused by an allow/deny rule (the token's or a tunnel's) while in use.
    refused_visitors: int = 0
    #: Bandwidth buckets of the token (``TokenPolicy.bandwidth``), both directions.
    bandwidth: DuplexMeter = field(default_factory=DuplexMeter)

    def live_sessions(self) -> int:
        return sum(1 for rs in self.sessions if rs.alive)


class RelaySession:
    """One authenticated client session on the relay."""

    def __init__(
        self,
        relay: _Relay,
        conn: MuxConnection,
        token_id: str,
        peer: str,
        token: TokenEntry | None = None,
    ) -> None:
        self.relay = relay
        self.conn = conn
        self.token_id = token_id
        #: The token entry in force: its policy is read at every BIND, visitor and chunk.
        self.token = token if token is not None else TokenEntry(token_id, bytes(32), OPEN_POLICY)
        self.peer = peer
        self.tunnels: dict[int, PortLease] = {}
        self.active_streams = 0
        self.draining = False
        #: The client sent GOAWAY: its ports and names went back to its token (§10.2).
        self.client_draining = False
        #: Fair share of the client's pending-open slots between the tunnels.
        self.shares = OpenShares(conn)
        #: One log line per interval for visitors refused by a limit.
        self.refusals = RefusalSummary(logger)
        self._idle = trio.Event()
        self._idle.set()
        #: Set when the session's handler has finished.
        self.done = trio.Event()
        #: This session in the relay's :class:`~muxtunnel.stats.Stats` (set once admitted).
        self.stats: SessionStats | None = None
        #: ``trio.current_time()`` when the connection was lost (None while connected).
        self.suspended_at: float | None = None
        #: Times the client resumed this session on a new connection.
        self.resumes = 0
        #: The session's extra connections (protocol-spec.md §10.7), in joining order.
        self.lanes: list[RelayLane] = []
        #: Carrier streams of the session whose resume handshake is under way (§10.7).
        self.carriers = 0

    def placement(self) -> MuxConnection:
        """The connection a new visitor stream goes on: the least-loaded one (fewest open
        streams) that is connected and may open a stream now; the first one on a tie, and
        whenever no extra connection qualifies (protocol-spec.md §10.7)."""
        best = self.conn
        if not self.lanes:
            return best
        load = best.stream_count if not best.suspended else None
        for lane in self.lanes:
            conn = lane.conn
            if conn.suspended or not conn.open_slot_available():
                continue
            if load is None or conn.stream_count < load:
                best, load = conn, conn.stream_count
        return best

    # -- LeaseOwner ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the connection is closing."""
        return not self.conn.closed

    async def probe(self, within: float) -> bool:
        """True if the client shows life within ``within`` seconds. A session waiting for its
        client to resume it cannot answer: False (a new session of the token may take over),
        unless a resume of it is under way."""
        if self.suspended_at is not None:
            await trio.lowlevel.checkpoint()
            return self.relay.tickets.claimed(self)
        return await self.conn.probe(within)

    async def wait_idle(self) -> None:
        """Wait until no visitor stream is open."""
        while self.active_streams:
            await self._idle.wait()

    def stream_started(self) -> None:
        """A stream not spliced here (a private tunnel's visit) counts for ``wait_idle``."""
        self.active_streams += 1
        if self.active_streams == 1:
            self._idle = trio.Event()

    def stream_ended(self) -> None:
        """The stream counted by :meth:`stream_started` is over."""
        self.active_streams -= 1
        if not self.active_streams:
            self._idle.set()

    def replaced(self, reason: str) -> None:
        """A new session of the same token takes over: close this one now."""
        logger.info("client %s: %s", self.peer, reason)
        self.conn.close(ErrorCode.TIMEOUT, reason)

    # -- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve BIND/UNBIND and visitors until the connection ends."""
        try:
            async with trio.open_nursery() as nursery:
                # Streams the client opens: visits of private tunnels (muxtunnel.private).
                nursery.start_soon(self.relay.private.serve_streams, self)
                try:
                    await self._control_loop(nursery)
                finally:
                    for lease in self.tunnels.values():
                        if lease.accept_scope is not None and lease.owner is self:
                            lease.accept_scope.cancel()
        finally:
            for lease in self.tunnels.values():
                self.relay.registry.detach(lease, self)
            self.tunnels.clear()
            self.relay.private.session_ended(self)

    def begin_drain(self) -> None:
        """GOAWAY and stop accepting visitors; open streams go on."""
        if self.draining:
            return
        self.draining = True
        self.conn.go_away(ErrorCode.NO_ERROR, "relay shutting down")
        for lease in self.tunnels.values():
            if lease.accept_scope is not None and lease.owner is self:
                lease.accept_scope.cancel()

    async def _control_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                event = await self.conn.next_control_event()
            except MuxSessionClosedError:
                return
            if isinstance(event, BindRequested):
                await self._bind(event, nursery)
            elif isinstance(event, UnbindReceived):
                self._unbind(event)
            elif isinstance(event, GoAwayReceived):
                self._client_draining()

    def _client_draining(self) -> None:
        """The client sent GOAWAY (protocol-spec.md §10.2 item 9): it takes no new stream, so
        its ports and private names go back to its token at once, as if the session had
        ended (a new session of the token gets them without a liveness probe); the session's
        open streams go on."""
        if self.client_draining:
            return
        self.client_draining = True
        for lease in self.tunnels.values():
            self.relay.registry.detach(lease, self)
        self.relay.private.session_ended(self)

    def bind_precheck(self, event: BindRequested) -> tuple[ResultStatus, str] | None:
        """The checks every BIND gets first, in the order of protocol-spec.md §7.2 item 4
        (public, private and visit binds alike); the refusal, or None."""
        config = self.relay.config
        tunnel_id = event.tunnel_id
        if tunnel_id in (0, CARRIER_TUNNEL):
            return ResultStatus.MALFORMED, f"tunnel id {tunnel_id} is reserved"
        if tunnel_id in self.tunnels or self.relay.private.owns(self, tunnel_id):
            return ResultStatus.DUPLICATE_TUNNEL, f"tunnel {tunnel_id} is already bound"
        if event.proto != TunnelProto.TCP:
            return ResultStatus.UNSUPPORTED_PROTO, f"protocol {event.proto} is not supported"
        if event.options.unknown:
            # Never ignored: a dropped option could be a visitor rule (protocol-spec.md §6.12).
            return (
                ResultStatus.MALFORMED,
                f"unsupported BIND option 0x{event.options.unknown[0]:02x}",
            )
        if event.options.visit is not None and (event.options.allow or event.options.deny):
            return ResultStatus.MALFORMED, "ALLOW and DENY do not apply to a VISIT bind"
        if len(self.tunnels) + self.relay.private.count(self) >= config.max_tunnels_per_client:
            return (
                ResultStatus.LIMIT_REACHED,
                f"at most {config.max_tunnels_per_client} tunnels per client",
            )
        # Policy (DENIED) from here on; port range and port use come after (the callers).
        if self.draining:
            return ResultStatus.DENIED, "relay is shutting down"
        if self.client_draining:
            return ResultStatus.DENIED, "this session is going away (the client sent GOAWAY)"
        host = event.bind.host
        if host is not None and not _same_host(host, config.bind_host):
            # This relay binds on its configured host only (protocol-spec.md §7.2 item 3).
            return (
                ResultStatus.DENIED,
                f"this relay binds tunnels on {config.bind_host} only, not on {peer_text(host)}",
            )
        return None

    async def _bind(self, event: BindRequested, nursery: trio.Nursery) -> None:
        if event.options.private:
            # NAME / VISIT: no public listener (muxtunnel.private answers).
            await self.relay.private.bind(self, event)
            return
        config = self.relay.config
        conn = self.conn
        token = self.token
        policy = token.policy
        options = event.options
        status: ResultStatus
        lease: PortLease | None = None
        common = self.bind_precheck(event)
        if common is not None:
            status, message = common
        elif not policy.port_allowed(event.bind.port):
            status, message = (
                ResultStatus.DENIED,
                f"token {token.name} may bind ports {policy.ports_text()} only",
            )
        else:
            try:
                lease = await self.relay.registry.acquire(
                    self,
                    event.tunnel_id,
                    event.bind.port,
                    ports=policy.ports,
                    max_tunnels=policy.max_tunnels,
                )
                status, message = ResultStatus.OK, ""
            except BindError as exc:
                status, message = exc.status, str(exc)
        if self.conn.closed:
            if lease is not None:
                self.relay.registry.detach(lease, self)
            return
        if lease is None:
            # Rate-limited per token (muxtunnel.logsafe); a refusal costs no port search.
            logger.log(
                logging.INFO if status == ResultStatus.LIMIT_REACHED else logging.WARNING,
                "client %s: tunnel %d (port %d) refused: %s: %s",
                self.peer,
                event.tunnel_id,
                event.bind.port,
                status.name,
                message,
                extra={"ratelimit_key": self.token_id},
            )
            conn.send_result(event.req_id, status, message)
            return
        lease.access = AddressRule(options.allow, options.deny)
        self.tunnels[event.tunnel_id] = lease
        if self.stats is not None:
            self.stats.add_tunnel(event.tunnel_id, format_host_port(config.bind_host, lease.port))
        await nursery.start(self._accept_loop, lease, nursery)
        conn.send_result(event.req_id, ResultStatus.OK, "", Address(config.bind_host, lease.port))
        logger.info(
            "client %s: tunnel %d bound on %s",
            self.peer,
            event.tunnel_id,
            format_host_port(config.bind_host, lease.port),
        )

    def _unbind(self, event: UnbindReceived) -> None:
        if self.relay.private.unbind(self, event):
            return
        lease = self.tunnels.pop(event.tunnel_id, None)
        if self.stats is not None:
            self.stats.remove_tunnel(event.tunnel_id)
        if event.req_id == 0:
            return
        if lease is None:
            self.conn.send_result(event.req_id, ResultStatus.UNKNOWN_TUNNEL, "no such tunnel")
        else:
            self.relay.registry.release(lease, self)
            self.conn.send_result(event.req_id, ResultStatus.OK, "")
            logger.info(
                "client %s: tunnel %d on port %d released", self.peer, event.tunnel_id, lease.port
            )

    async def _accept_loop(
        self,
        lease: PortLease,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            lease.accept_scope = scope
            task_status.started()
            async with trio.open_nursery() as loops:
                for listener in lease.listeners:
                    loops.start_soon(self._accept_one, listener, lease, nursery)

    async def _accept_one(
        self, listener: trio.SocketListener, lease: PortLease, nursery: trio.Nursery
    ) -> None:
        relay = self.relay
        policy = relay.policy
        config = relay.config
        usage = relay.usage_of(self.token_id)
        tunnel_id = lease.tunnel_id
        while True:
            try:
                # Back-pressure: no accept while this tunnel holds its share of the client's
                # pending opens (visitors wait in the listen backlog, costing no descriptor).
                await self.shares.wait_turn(tunnel_id)
            except MuxSessionClosedError:
                return
            try:
                tcp = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                logger.warning("port %d: accept failed: %s", lease.port, exc)
                await trio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            relay.descriptors.opened()
            try:
                origin = _sock_address(tcp.socket.getpeername())
                target = _sock_address(tcp.socket.getsockname())
            except OSError:
                reset_connection(tcp)
                continue
            # Read at every visitor: a changed token entry applies at once.
            token = self.token
            token_policy = token.policy
            # Address rules first (token, then tunnel), before any stream or byte.
            denied = token_policy.visitors.refusal(origin.host)
            if denied is None:
                denied = lease.access.refusal(origin.host)
            if denied is not None:
                reset_connection(tcp)
                self._refused_visitor(lease, usage, origin, denied)
                log_unopened("relay", str(target), origin, denied, token=token.name)
                continue
            refusal: str | None = None
            max_visitors = token_policy.max_visitors
            max_streams = token_policy.max_streams
            if max_visitors is None:
                max_visitors, whose = config.max_visitors_per_tunnel, "the relay's"
            else:
                whose = f"token {token.name}'s"
            if lease.visitors >= max_visitors:
                refusal = (
                    f"port {lease.port}: {max_visitors} visitors connected, "
                    f"{whose} limit per tunnel"
                )
            else:
                if max_streams is None:
                    max_streams, whose = config.max_streams_per_token, "the relay's"
                else:
                    whose = "its"
                if usage.streams >= max_streams:
                    refusal = (
                        f"port {lease.port}: token {token.name} has "
                        f"{max_streams} streams open, {whose} limit per token"
                    )
                elif not relay.descriptors.room(priority=True):
                    refusal = f"port {lease.port}: the relay is short of file descriptors"
            if refusal is not None:
                reset_connection(tcp)
                log_unopened("relay", str(target), origin, refusal, token=token.name)
                self.refusals.note(refusal)
                self._count_refusal(tunnel_id, "limit")
                continue
            info = StreamInfo(
                stream_id=0,
                tunnel_id=tunnel_id,
                origin=origin,
                target=target,
                started=trio.current_time(),
                token_id=self.token_id,
            )
            refused = policy.admit(info)
            if refused is not None:
                logger.info(
                    "visitor %s on port %d refused by policy: %s", origin, lease.port, refused.name
                )
                log_unopened("relay", str(target), origin, refused.name, token=token.name)
                reset_connection(tcp)
                self._count_refusal(tunnel_id, refused.name.lower())
                continue
            try:
                await self.shares.wait_turn(tunnel_id)
            except MuxSessionClosedError:
                reset_connection(tcp)
                return
            mux = self.placement().open_stream(tunnel_id, origin, target)
            logger.debug(
                "stream %d opened: visitor %s on port %d", mux.stream_id, origin, lease.port
            )
            # Counted before the task starts: the limits above see it at once.
            self.shares.opened(tunnel_id, mux)
            lease.visitors += 1
            usage.streams += 1
            policy.track(mux.info, StreamLimits(self, usage.bandwidth, lease.bandwidth))
            ts = self._tunnel_stats(tunnel_id)
            if ts is not None:
                ts.stream_opened(mux.info)
            nursery.start_soon(self._visitor, tcp, mux, lease, usage)

    def _tunnel_stats(self, tunnel_id: int) -> TunnelStats | None:
        return None if self.stats is None else self.stats.tunnels.get(tunnel_id)

    def _count_refusal(self, tunnel_id: int, reason: str) -> None:
        """Count a refused visitor in the stats (by tunnel and relay-wide)."""
        ts = self._tunnel_stats(tunnel_id)
        if ts is not None:
            ts.refuse(reason)
        self.relay.stats.count(f"refused:{reason}")

    def _refused_visitor(
        self, lease: PortLease, usage: _TokenUsage, origin: Address, reason: str
    ) -> None:
        """Count and log a visitor refused by an allow/deny rule (it was reset already)."""
        lease.refused_visitors += 1
        usage.refused_visitors += 1
        self.relay.refused_visitors[self.token.name] += 1
        kind = "deny" if reason.startswith("in the deny") else "allow"
        self._count_refusal(lease.tunnel_id, kind)
        logger.info(
            "visitor %s port %d refused on port %d (token %s): %s",
            origin.host,
            origin.port,
            lease.port,
            self.token.name,
            reason,
            extra={"ratelimit_key": self.token.name},
        )

    async def _visitor(
        self, tcp: trio.SocketStream, mux: MuxStream, lease: PortLease, usage: _TokenUsage
    ) -> None:
        result: SpliceResult | None = None
        try:
            self.active_streams += 1
            if self.active_streams == 1:
                self._idle = trio.Event()
            try:
                result = await splice(tcp, mux, policy=self.relay.policy)
            finally:
                self.active_streams -= 1
                if not self.active_streams:
                    self._idle.set()
        finally:
            self.relay.policy.untrack(mux.info)
            self.shares.finished(mux.info.tunnel_id, mux)
            ts = self._tunnel_stats(mux.info.tunnel_id)
            if ts is not None:
                ts.stream_closed(mux.info, outcome_of(result))
            if result is not None and result.rejected:  # OPEN_FAIL from the client, by reason
                self.relay.stats.count(f"open_failures:{_open_fail_name(result.reject_reason)}")
            lease.visitors -= 1
            usage.streams -= 1
            # The access log line (muxtunnel.accesslog); None: cancelled (shutdown).
            log_splice(
                "relay",
                mux.info,
                str(mux.info.target),
                result,
                trio.current_time(),
                token=self.token.name,
            )


class RelayLane:
    """One extra connection of a client session (protocol-spec.md §10.7): it carries visitor
    streams the session places on it, resumes like a session with a ticket of its own, and
    ends with the session."""

    def __init__(self, session: RelaySession, conn: MuxConnection, peer: str) -> None:
        self.session = session
        self.conn = conn
        self.peer = peer
        #: ``trio.current_time()`` when the connection was lost (None while connected).
        self.suspended_at: float | None = None
        #: Times this connection was resumed.
        self.resumes = 0
        #: Lanes keep no stats of their own and bind no tunnels (the session does both).
        self.stats: SessionStats | None = None
        self.tunnels: dict[int, PortLease] = {}

    @property
    def token(self) -> TokenEntry:
        """The session's token entry."""
        return self.session.token

    @property
    def alive(self) -> bool:
        """False once this connection or its session is closing."""
        return not self.conn.closed and self.session.alive

    @property
    def active_streams(self) -> int:
        """Streams open on this connection."""
        return self.conn.stream_count

    async def run(self) -> None:
        """Refuse what belongs on the first connection (BIND, streams the client opens) until
        this connection ends."""
        conn = self.conn
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refuse_streams)
            while True:
                try:
                    event = await conn.next_control_event()
                except MuxSessionClosedError:
                    break
                if isinstance(event, BindRequested):
                    conn.send_result(
                        event.req_id,
                        ResultStatus.DENIED,
                        "tunnels are bound on the session's first connection",
                    )
                elif isinstance(event, UnbindReceived) and event.req_id:
                    conn.send_result(event.req_id, ResultStatus.UNKNOWN_TUNNEL, "no such tunnel")
            nursery.cancel_scope.cancel()

    async def _refuse_streams(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    mux = await self.conn.accept_stream()
                except MuxSessionClosedError:
                    return
                if mux.info.tunnel_id == CARRIER_TUNNEL:
                    nursery.start_soon(self.session.relay.carry, self.session, mux, self.conn)
                    continue
                mux.reject(
                    OpenFailReason.ADMINISTRATIVELY_PROHIBITED,
                    "streams are opened on the session's first connection",
                )


async def _run_handshake(conn: MuxConnection, body: Callable[[], Awaitable[bool]]) -> bool:
    """Run ``conn`` (a new connection in its handshake) while ``body`` decides its fate; returns
    ``body``'s answer. True: the transport went to a resumed connection, which owns it now
    (``conn`` neither closes nor writes it). Otherwise ``conn`` is closed here (within 3 s)."""
    handed_over = False
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            handed_over = await body()
        finally:
            if not handed_over:
                conn.close()
                with trio.move_on_after(3):
                    await conn.wait_closed()
            nursery.cancel_scope.cancel()
    return handed_over


def _wire_window(seconds: float) -> int:
    """A resume window as whole seconds for HELLO and TICKET (a fraction rounds up; 0: off)."""
    return min(MAX_RESUME_WINDOW, math.ceil(seconds)) if seconds > 0 else 0


def _same_host(host: str, bind_host: str) -> bool:
    """True if a BIND's ``host`` means the relay's ``bind_host``: an unspecified address
    (0.0.0.0, ::), or the same address or name (protocol-spec.md §7.2 item 3)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() == bind_host.lower()
    if address.is_unspecified:
        return True
    try:
        return address == ipaddress.ip_address(bind_host)
    except ValueError:
        return False


def _open_fail_name(reason: int | None) -> str:
    """The name of an OPEN_FAIL reason (``OTHER`` for a code this version does not know)."""
    try:
        return "OTHER" if reason is None else OpenFailReason(reason).name
    except ValueError:
        return "OTHER"


_LINGER_RST = struct.pack("ii", 1, 0)


def _drop(tcp: trio.SocketStream) -> None:
    """Close a just-accepted connection at once with an RST: no task, no TLS, no waiting."""
    try:
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    tcp.socket.close()


@dataclass(eq=False, slots=True)
class _Pending:
    """A client connection between TCP accept and authentication."""

    peer: Address
    ticket: Ticket
    #: Cancelled when the handshake is evicted or its source banned.
    scope: trio.CancelScope
    #: ``trio.current_time()`` by which the client must be authenticated.
    deadline: float
    #: The connection's read size once authenticated.
    receive_size: int = 0


class _PreauthReport:
    """Log trouble before authentication without a line per connection.

    The first event after a quiet period is logged as it happens; the following ones at DEBUG
    only, counted into one summary line per :data:`PREAUTH_SUMMARY_INTERVAL` (WARNING if
    connections were refused or evicted) until a period passes without any.
    """

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay
        self._counts: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._warn = False
        self._active = False

    def note(self, kind: str, source: str, level: int, msg: str, *args: object) -> None:
        """Record one event of ``kind`` from ``source``; ``msg % args`` describes it."""
        nursery = self._relay._clients
        if not self._active and nursery is not None:
            self._active = True
            logger.log(level, msg, *args)
            nursery.start_soon(self._summarize)
            return
        logger.debug(msg, *args)
        self._counts[kind] += 1
        self._warn |= level >= logging.WARNING
        if source in self._sources or len(self._sources) < _SUMMARY_SOURCES:
            self._sources[source] += 1

    async def _summarize(self) -> None:
        try:
            while True:
                await trio.sleep(PREAUTH_SUMMARY_INTERVAL)
                if not self._counts:
                    return
                parts = "; ".join(f"{n} {kind}" for kind, n in self._counts.most_common())
                top, top_n = self._sources.most_common(1)[0]
                logger.log(
                    logging.WARNING if self._warn else logging.INFO,
                    "before authentication, last %g s: %s; most from %s (%d)",
                    PREAUTH_SUMMARY_INTERVAL,
                    parts,
                    top,
                    top_n,
                )
                self._counts.clear()
                self._sources.clear()
                self._warn = False
        finally:
            self._active = False
            self._counts.clear()
            self._sources.clear()
            self._warn = False


class _Relay:
    def __init__(
        self, config: ServerConfig, ssl_context: ssl.SSLContext, policy: StreamPolicy
    ) -> None:
        self.config = config
        self.ssl_context = ssl_context
        #: The caller's policy, plus the token and tunnel bandwidth limits.
        self.policy = RelayPolicy(policy)
        #: Descriptors left for tunnels and visitors (the rest is kept for new sessions).
        self.descriptors = DescriptorBudget(raise_descriptor_limit())
        self.registry = PortRegistry(
            config.port_range,
            config.bind_host,
            config.lease_seconds,
            max_per_token=config.max_tunnels_per_token,
            descriptors=self.descriptors,
        )
        self.sessions: set[RelaySession] = set()
        #: Resumption tickets of the sessions (protocol-spec.md §10.6, :mod:`muxtunnel.tickets`).
        self.tickets: TicketBook[RelaySession | RelayLane] = TicketBook(trio.current_time)
        #: Sessions and streams per token (entries go when a token has neither).
        self.usage: dict[str, _TokenUsage] = {}
        #: What the admin endpoint and the metrics read (:mod:`muxtunnel.stats`).
        self.stats = Stats("relay")
        #: Visitors refused by an allow/deny rule, per token name, since the relay started.
        self.refused_visitors: Counter[str] = Counter()
        self.shutting_down = False
        #: Private tunnels by name, and the visit streams carried to them.
        self.private = PrivateTunnels(self)
        #: Pre-authentication limits and bans (max-startups, auth-failures ...).
        self.admission = Admission(
            max_startups=config.max_startups,
            per_source=config.max_startups_per_source,
            auth_failures=config.auth_failures,
            ban=config.auth_ban,
        )
        #: Cancels a pending handshake when it is evicted or its source is banned.
        self._preauth_scopes: dict[Ticket, trio.CancelScope] = {}
        self._clients: trio.Nursery | None = None
        self._report = _PreauthReport(self)
        #: The leases on disk (protocol-spec.md §10.5); written after every change once
        #: :meth:`restore_leases` has run.
        self.lease_store = LeaseStore(config.state_dir / LEASES_FILE_NAME, self._lease_records)
        self._lease_keys: tuple[object, dict[str, str]] = ((), {})

    def lease_keys(self) -> dict[str, str]:
        """Token name -> :func:`~muxtunnel.leasestore.key_id` of its stored key (cached)."""
        entries = self.config.accepted_tokens()
        if self._lease_keys[0] is not entries:
            self._lease_keys = (entries, {e.name: key_id(e.stored_key) for e in entries})
        return self._lease_keys[1]

    def _lease_records(self) -> list[StoredLease]:
        return self.registry.records(time.time(), self.lease_keys())

    async def restore_leases(self) -> None:
        """Bind the ports leased before a restart again (one log line), then keep the file
        up to date."""
        store = self.lease_store
        stored = await trio.to_thread.run_sync(store.load)
        config = self.config
        kept, dropped = select(
            stored,
            keys=self.lease_keys(),
            host=config.bind_host,
            port_range=config.port_range,
            now=time.time(),
        )
        failed = await self.registry.restore(kept, time.time())
        if stored:
            notes = [f"{n} {why}" for why, n in sorted(dropped.items())]
            if failed:
                more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
                shown = ", ".join(failed[:5]) + more
                notes.append(f"{len(failed)} not bound again ({shown})")
            logger.log(
                logging.WARNING if failed else logging.INFO,
                "restored %d port leases from %s%s",
                len(kept) - len(failed),
                store.path,
                f"; dropped: {'; '.join(notes)}" if notes else "",
            )
        self.registry.on_change = store.changed
        if stored:
            store.changed()  # without the dropped ones, and with the expiries set at load

    def usage_of(self, tid: str) -> _TokenUsage:
        """The usage record of token ``tid`` (created on first use)."""
        usage = self.usage.get(tid)
        if usage is None:
            usage = self.usage[tid] = _TokenUsage()
        return usage

    async def _admit_session(
        self, entry: TokenEntry, peer: str, conn: MuxConnection, *, evict: bool = True
    ) -> RelaySession | None:
        """Register a new session of token ``entry``, or refuse it when the token has too many.

        At the limit, the token's sessions are probed (coalesced, see the registry): stale
        ones (silent, or waiting for a resume) are closed and make room; live ones are never
        evicted by a newcomer. ``evict`` False: no probe, the limit refuses at once.
        """
        tid = entry.name
        limit = entry.policy.max_sessions
        if limit is None:
            limit = self.config.max_sessions_per_token
        usage = self.usage_of(tid)
        if evict and usage.live_sessions() >= limit:
            live = [rs for rs in usage.sessions if rs.alive]

            async def check(rs: RelaySession) -> None:
                if not await self.registry.is_alive(rs) and rs.alive:
                    rs.replaced("silent; replaced by a new session of the same token")

            async with trio.open_nursery() as nursery:
                for rs in live:
                    nursery.start_soon(check, rs)
        # No checkpoint between this check and registering the session.
        if usage.live_sessions() >= limit or conn.closed:
            if not usage.sessions and not usage.streams:
                self.usage.pop(tid, None)
            logger.info(
                "client %s refused: token %s already has %d sessions, the relay's limit",
                peer,
                tid,
                limit,
                extra={"ratelimit_key": tid},
            )
            conn.close(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"too many sessions for this token (the relay allows {limit} at once)",
            )
            return None
        rs = RelaySession(self, conn, tid, peer, entry)
        usage.sessions.add(rs)
        return rs

    def _session_gone(self, rs: RelaySession) -> None:
        usage = self.usage.get(rs.token_id)
        if usage is not None:
            usage.sessions.discard(rs)
            if not usage.sessions and not usage.streams:
                del self.usage[rs.token_id]

    async def reap_leases(self) -> None:
        while True:
            nxt = self.registry.expire()
            delay = 1.0 if nxt is None else max(0.01, min(1.0, nxt - trio.current_time()))
            await trio.sleep(delay)

    async def accept_clients(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        self._clients = nursery
        while True:
            try:
                tcp = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                logger.warning("control listener: accept failed: %s", exc)
                await trio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            self._admit(tcp, nursery)

    def _admit(self, tcp: trio.SocketStream, nursery: trio.Nursery) -> None:
        """Admission right after accept: a refused connection costs accept + close only."""
        try:
            peer = _sock_address(tcp.socket.getpeername())
        except OSError:
            _drop(tcp)
            return
        now = trio.current_time()
        source = source_of(peer.host or "")
        decision = self.admission.admit(source, now)
        ticket = decision.ticket
        if ticket is None:
            _drop(tcp)
            self._report.note(
                f"refused: {decision.verdict.value}",
                source,
                logging.WARNING,
                "client %s refused: %s",
                peer,
                decision.verdict.value,
            )
            return
        if decision.evicted is not None:
            scope = self._preauth_scopes.pop(decision.evicted, None)
            if scope is not None:
                scope.cancel()
            self._report.note(
                f"evicted: {Verdict.FULL.value}",
                decision.evicted.source,
                logging.WARNING,
                "pending handshake from %s evicted for %s: %s",
                decision.evicted.source,
                peer,
                Verdict.FULL.value,
            )
        scope = trio.CancelScope()
        self._preauth_scopes[ticket] = scope
        pending = _Pending(peer, ticket, scope, now + self.config.handshake_timeout)
        nursery.start_soon(self.handle_client, tcp, pending)

    async def handle_client(self, tcp: trio.SocketStream, pending: _Pending) -> None:
        """Serve one admitted client connection (cancelled if evicted before authentication)."""
        try:
            with pending.scope:
                await self._handle_client(tcp, pending)
        except Exception:
            # A bug in one session must not take the relay down.
            logger.exception("client %s: internal error", pending.peer)
        finally:
            self._leave_preauth(pending.ticket)

    async def _handle_client(self, tcp: trio.SocketStream, pending: _Pending) -> None:
        config = self.config
        peer = pending.peer
        handed_over = False  # the transport went to a resumed session
        cap_retransmit_timeout(tcp.socket)  # resume soon after an outage (muxtunnel.netopts)
        # Small buffers until authenticated (protocol-spec §5.3 bounds pre-AUTH input too).
        if muxtunnel.connection.FAST_TLS:
            stream: trio.SSLStream[trio.SocketStream] | TLSStream = TLSStream(
                tcp, self.ssl_context, server_side=True, receive_size=PREAUTH_RECEIVE_SIZE
            )
        else:
            stream = wrap_tls(tcp, self.ssl_context, server_side=True)
        try:
            # One deadline from TCP accept to authenticated, for TLS and AUTH together.
            with trio.move_on_at(pending.deadline) as tls_scope:
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    self._preauth_failed(pending, "TLS handshake failed", exc.__cause__ or exc)
                    return
            if tls_scope.cancelled_caught:
                self._preauth_failed(pending, "TLS handshake timed out")
                return
            if stream.selected_alpn_protocol() != ALPN:
                self._preauth_failed(pending, f"ALPN {ALPN} not negotiated")
                return
            session = make_session(
                Role.SERVER,
                idle_timeout=config.keepalive_timeout,
                settings_overrides=self._session_settings(),
            )
            conn = MuxConnection(
                stream,
                session,
                name=str(peer),
                open_timeout=config.open_timeout,
                stall_timeout=config.stall_timeout,
            )
            pending.receive_size = conn.receive_size
            conn.receive_size = PREAUTH_RECEIVE_SIZE
            handed_over = await _run_handshake(
                conn, partial(self._run_session, conn, str(peer), pending)
            )
        finally:
            # A resumed session runs on this transport now: it closes it when done.
            if not handed_over:
                await trio.aclose_forcefully(stream)

    def _leave_preauth(self, ticket: Ticket) -> None:
        """The connection left the handshake phase (authenticated, failed or gone)."""
        self.admission.release(ticket)
        self._preauth_scopes.pop(ticket, None)

    def _preauth_failed(
        self, pending: _Pending, what: str, detail: BaseException | None = None
    ) -> None:
        """A handshake that failed or timed out (logged through the summary, not per connection)."""
        self._report.note(
            what,
            pending.ticket.source,
            logging.INFO,
            "client %s: %s%s",
            pending.peer,
            what,
            "" if detail is None else f": {peer_text(detail)}",
        )

    def _auth_failed(self, pending: _Pending, reason: str) -> None:
        """Log a failed authentication (one line per failure, none once banned); maybe ban."""
        self.stats.count("auth_failures")
        self._leave_preauth(pending.ticket)
        now = trio.current_time()
        source = pending.ticket.source
        host, port = pending.peer.host, pending.peer.port
        if self.admission.banned_for(source, now):
            logger.debug("authentication failed from %s port %d (banned source)", host, port)
            return
        logger.warning(
            "authentication failed from %s port %d: %s",
            host,
            port,
            peer_text(reason),
            extra={"ratelimit_key": source},
        )
        ban = self.admission.auth_failed(source, now)
        if ban is None:
            return
        logger.warning(
            "source %s banned for %s s after %d authentication failures",
            source,
            f"{ban.seconds:g}",
            ban.failures,
            extra={"ratelimit_key": source},
        )
        for ticket in ban.evicted:
            scope = self._preauth_scopes.pop(ticket, None)
            if scope is not None and ticket is not pending.ticket:
                scope.cancel()

    async def _authenticate(
        self,
        conn: MuxConnection,
        pending: _Pending,
        resume: list[ResumeRequested | JoinRequested],
    ) -> TokenEntry | None:
        """Run the AUTH exchange within the connection's deadline; the token's entry, or None.

        A RESUME or JOIN that came before the AUTH is appended to ``resume``.
        """
        config = self.config
        logger.debug("client %s: TLS established", pending.peer)

        def before_auth(event: Event) -> None:
            if isinstance(event, ResumeRequested | JoinRequested):
                resume.append(event)

        with trio.move_on_at(pending.deadline) as scope:
            try:
                token = await authenticate_client(
                    conn, config.accepted_tokens(), before_auth=before_auth
                )
            except AuthError as exc:
                self._auth_failed(pending, str(exc))
                return None
            except HandshakeError as exc:
                self._preauth_failed(pending, "handshake failed", exc)
                return None
        if scope.cancelled_caught:
            self._preauth_failed(
                pending, f"not authenticated within {config.handshake_timeout:g} s"
            )
            conn.close(ErrorCode.TIMEOUT, "handshake timeout")
            return None
        self._leave_preauth(pending.ticket)
        if isinstance(conn.transport, TLSStream):
            conn.transport.receive_size = TLS_RECEIVE_SIZE
        conn.receive_size = pending.receive_size
        return token

    async def _run_session(self, conn: MuxConnection, peer: str, pending: _Pending) -> bool:
        """Authenticate, then resume a session or run a new one; True if the transport went to
        a resumed session (this connection must then neither close nor write it)."""
        resume: list[ResumeRequested | JoinRequested] = []
        entry = await self._authenticate(conn, pending, resume)
        if entry is None:
            return False
        tid = entry.name
        conn.token_id = tid
        if resume and isinstance(resume[0], JoinRequested):
            await self._join(conn, entry, resume[0], peer)
            return False
        if resume and isinstance(resume[0], ResumeRequested):
            outcome = await self._resume(conn, entry, resume[0], peer)
            if outcome == "resumed":
                return True
            if outcome == "ended":
                return False
            # Refused: the connection goes on as a new session (protocol-spec.md §10.6), but
            # one that ends no other session for room (its client may well just close it).
        admitted = await self._admit_session(entry, peer, conn, evict=not resume)
        if admitted is None:
            return False
        rs = admitted
        refresh_token(self, rs)  # a reload during authentication may have changed the token
        if rs.alive and conn.resume_window > 0:
            # Right after the RESULT(OK) of the AUTH: the client may resume from now on.
            conn.send_ticket(self.tickets.issue(tid, rs), _wire_window(conn.resume_window))
            conn.on_suspend = partial(self._suspended, rs)
        session_stats = rs.stats = self.stats.add_session(peer, tid, rtt=lambda: conn.rtt)
        if conn.resume_window > 0:
            session_stats.replay = lambda: conn.replay_size
        session_stats.connections = lambda: 1 + len(rs.lanes)
        conn.on_rtt = self.stats.observe_rtt
        conn.on_stall = partial(self.stats.count, "stalls")
        logger.info("client %s authenticated (token %s)", peer, tid)
        self.sessions.add(rs)
        if self.shutting_down:
            rs.begin_drain()
        try:
            await rs.run()
        finally:
            for lane in list(rs.lanes):
                lane.conn.close(ErrorCode.NO_ERROR, "session ended")
            self.tickets.revoke(rs)
            self.sessions.discard(rs)
            self.stats.remove_session(session_stats)
            self._session_gone(rs)
            rs.done.set()
            reason = peer_text(rs.conn.close_reason or "closed")
            if rs.suspended_at is not None:
                logger.info(
                    "client %s: session ended after %.1f s without a resume (%s)",
                    rs.peer,
                    trio.current_time() - rs.suspended_at,
                    reason,
                )
            else:
                logger.info("client %s gone (%s)", rs.peer, reason)
        return False

    def _session_settings(self) -> dict[str, int]:
        """The HELLO settings of a relay session (beyond the defaults)."""
        config = self.config
        resume = config.resume_seconds()
        return {
            # Clients may open streams to visit private tunnels (protocol-spec.md §9.2).
            "max_concurrent_streams": config.max_visit_streams,
            # How long a lost session is kept for the client (protocol-spec.md §10.6).
            "resume_window": _wire_window(resume),
            # Extra connections of one session (protocol-spec.md §10.7).
            "max_connections": (
                config.max_connections_per_session
                if config.max_connections_per_session > 1 and resume > 0
                else 0
            ),
        }

    async def carry(self, rs: RelaySession, mux: MuxStream, carrier: MuxConnection) -> None:
        """Serve ``mux``, a stream the client of ``rs`` opened on ``carrier`` to carry another
        connection of the same session (protocol-spec.md §10.7): a resume handshake runs
        over it, and the resumed connection keeps it as its transport."""
        config = self.config
        if not carrier.max_connections_local:
            mux.reject(OpenFailReason.ADMINISTRATIVELY_PROHIBITED, "no carried connections here")
            return
        if rs.carriers >= config.max_connections_per_session:
            # At most one resume per connection of the session can be under way.
            mux.reject(OpenFailReason.RESOURCE_SHORTAGE, "too many carried handshakes at once")
            return
        rs.carriers += 1
        try:
            await self._carry(rs, mux, carrier)
        finally:
            rs.carriers -= 1

    async def _carry(self, rs: RelaySession, mux: MuxStream, carrier: MuxConnection) -> None:
        config = self.config
        mux.accept()
        conn = MuxConnection(
            mux,
            make_session(
                Role.SERVER,
                idle_timeout=config.keepalive_timeout,
                settings_overrides=self._session_settings(),
            ),
            name=f"{rs.peer} (carried)",
            open_timeout=config.open_timeout,
            stall_timeout=config.stall_timeout,
        )
        handed_over = False
        try:
            handed_over = await _run_handshake(
                conn, partial(self._carried_resume, rs, conn, carrier)
            )
        finally:
            if not handed_over:
                await trio.aclose_forcefully(mux)

    async def _carried_resume(
        self, rs: RelaySession, conn: MuxConnection, carrier: MuxConnection
    ) -> bool:
        """Authenticate on a carried connection and resume the connection of ``rs`` its
        RESUME names; True if the transport went to it."""
        config = self.config
        requests: list[Event] = []
        with trio.move_on_after(config.handshake_timeout) as scope:
            try:
                entry = await authenticate_client(
                    conn, config.accepted_tokens(), before_auth=requests.append
                )
            except (AuthError, HandshakeError) as exc:
                logger.info("client %s: carried connection refused: %s", rs.peer, exc)
                return False
        if scope.cancelled_caught:
            logger.info("client %s: carried connection not authenticated in time", rs.peer)
            return False
        request = next((e for e in requests if isinstance(e, ResumeRequested)), None)
        if request is None or entry.stored_key != rs.token.stored_key:
            logger.info("client %s: a carried connection must resume one of its session", rs.peer)
            conn.close(
                ErrorCode.PROTOCOL_ERROR,
                "a carried connection resumes a connection of its own session only",
            )
            return False
        outcome = await self._resume(
            conn, entry, request, f"{rs.peer} (carried)", within=rs, carrier=carrier
        )
        return outcome == "resumed"

    async def _join(
        self, conn: MuxConnection, entry: TokenEntry, request: JoinRequested, peer: str
    ) -> None:
        """Run ``conn`` as one more connection of the session of ``request``'s ticket
        (protocol-spec.md §10.7) until it or the session ends; or refuse the JOIN."""
        found = None if self.shutting_down else self.tickets.lookup(request.ticket, entry.name)
        rs = found.session if isinstance(found, RelayLane) else found
        if rs is None or not rs.alive or rs.token.stored_key != entry.stored_key:
            # Unknown, expired, revoked or another token's ticket: one answer (§10.6).
            conn.send_result(request.req_id, ResultStatus.TICKET_UNKNOWN, "unknown ticket")
            logger.info("client %s: extra connection refused: unknown ticket", peer)
            return
        limit = self.config.max_connections_per_session
        if 1 + len(rs.lanes) >= limit or rs.draining or rs.client_draining:
            why = (
                "the session is going away"
                if rs.draining or rs.client_draining
                else f"at most {limit} connections per session"
            )
            conn.send_result(request.req_id, ResultStatus.LIMIT_REACHED, why)
            logger.info("client %s: extra connection refused: %s", peer, why)
            return
        lane = RelayLane(rs, conn, peer)
        conn.send_result(request.req_id, ResultStatus.OK, "")
        if conn.resume_window > 0:
            conn.send_ticket(self.tickets.issue(entry.name, lane), _wire_window(conn.resume_window))
            conn.on_suspend = partial(self._suspended, lane)
        conn.on_rtt = self.stats.observe_rtt
        conn.on_stall = partial(self.stats.count, "stalls")
        conn.open_change_peer = rs.conn
        rs.lanes.append(lane)
        logger.info(
            "client %s: connection %d of the session of %s joined", peer, len(rs.lanes) + 1, rs.peer
        )
        try:
            await lane.run()
        finally:
            rs.lanes.remove(lane)
            self.tickets.revoke(lane)
            rs.conn.notify_open_change()
            logger.info(
                "client %s: extra connection of %s gone (%s)",
                lane.peer,
                rs.peer,
                peer_text(conn.close_reason or "closed"),
            )

    def _suspended(self, rs: RelaySession | RelayLane) -> None:
        """``rs`` lost its connection: keep it (ports, streams) for the resume window."""
        conn = rs.conn
        rs.suspended_at = trio.current_time()
        self.tickets.suspended(rs, conn.resume_window)
        if rs.stats is not None:
            rs.stats.state = "suspended"
        if isinstance(rs, RelayLane):
            logger.info(
                "client %s: extra connection of the session of %s lost (%s); kept %g s for a "
                "resume (%d streams)",
                rs.peer,
                rs.session.peer,
                conn.lost_reason or "no reason",
                conn.resume_window,
                rs.active_streams,
            )
            return
        logger.info(
            "client %s: connection lost (%s); session kept %g s for a resume "
            "(%d streams, %d tunnels)",
            rs.peer,
            conn.lost_reason or "no reason",
            conn.resume_window,
            rs.active_streams,
            len(rs.tunnels),
        )

    def _refuse_resume(
        self, conn: MuxConnection, request: ResumeRequested, status: ResultStatus, why: str
    ) -> None:
        """Answer a RESUME with a refusal; the connection goes on as a new session."""
        self.stats.count("resume_refusals")
        message = "cannot resume: unknown ticket" if status == ResultStatus.TICKET_UNKNOWN else why
        conn.send_result(request.req_id, status, message)
        logger.info("client %s: resume refused: %s", conn.name, why)

    async def _resume(
        self,
        conn: MuxConnection,
        entry: TokenEntry,
        request: ResumeRequested,
        peer: str,
        *,
        within: RelaySession | None = None,
        carrier: MuxConnection | None = None,
    ) -> str:
        """Continue the session of ``request``'s ticket on ``conn``'s transport.

        Returns ``"resumed"`` (the transport now belongs to the old session), ``"refused"``
        (RESULT sent: the connection goes on as a new session) or ``"ended"`` (the connection
        is gone).
        """
        rs = None if self.shutting_down else self.tickets.claim(request.ticket, entry.name)
        if rs is not None and (not rs.alive or rs.token.stored_key != entry.stored_key):
            self.tickets.revoke(rs)
            rs = None
        if rs is not None and within is not None:
            # Carried (§10.7): only another connection of the carrier's own session.
            session = rs.session if isinstance(rs, RelayLane) else rs
            if session is not within or rs.conn is carrier:
                self.tickets.unclaim(rs)
                rs = None
        if rs is None:
            # Unknown, expired, replaced, revoked or another token's: one answer (§10.6).
            self._refuse_resume(conn, request, ResultStatus.TICKET_UNKNOWN, "unknown ticket")
            return "refused"
        old = rs.conn
        if not old.can_resume(request.received):
            self.tickets.revoke(rs)
            self._refuse_resume(
                conn,
                request,
                ResultStatus.RESUME_FAILED,
                "the session cannot continue from the client's offset; it is ended",
            )
            old.close(ErrorCode.PROTOCOL_ERROR, "resume failed: offsets do not match")
            return "refused"
        try:
            transport = await conn.release_transport()
        except (trio.BrokenResourceError, trio.ClosedResourceError, MuxSessionClosedError):
            self.tickets.unclaim(rs)
            return "ended"
        if not rs.alive:  # ended while the transport was being released
            await trio.aclose_forcefully(transport)
            return "resumed"
        streams = rs.active_streams
        lost = 0.0 if rs.suspended_at is None else trio.current_time() - rs.suspended_at
        replayed = old.sent_offset - request.received
        try:
            old.attach(transport, req_id=request.req_id, peer_received=request.received)
        except Exception:
            self.tickets.revoke(rs)
            old.close(ErrorCode.PROTOCOL_ERROR, "resume failed")
            await trio.aclose_forcefully(transport)
            raise
        ticket = self.tickets.rotate(rs)
        if ticket is not None:
            old.send_ticket(ticket, _wire_window(old.resume_window))
        rs.suspended_at = None
        rs.resumes += 1
        self.stats.count("resumes")
        if rs.stats is not None:
            rs.stats.state = "up"
            rs.stats.resumes = rs.resumes
            if within is None:
                rs.stats.peer = peer
        if within is None:  # a carried connection keeps its client's address
            rs.peer = peer
            old.name = peer
        logger.info(
            "client %s resumed after %.1f s: %d streams continued, %d bytes replayed",
            peer,
            lost,
            streams,
            replayed,
        )
        return "resumed"

    async def drain(self) -> None:
        """GOAWAY every session, wait for streams (bounded), then CLOSE them all."""
        self.shutting_down = True
        for rs in list(self.sessions):
            if rs.suspended_at is not None:
                # No resume during a shutdown: its streams end now, not at the drain deadline.
                rs.conn.close(ErrorCode.NO_ERROR, "relay shutting down")
            else:
                rs.begin_drain()
        # Visitors that connect now get a refused connection, not a hang. The leases stay:
        # each runs from the end of its session and is written to disk (§10.5).
        self.registry.close_listeners()
        with trio.move_on_after(self.config.drain_timeout):
            for rs in list(self.sessions):
                await rs.wait_idle()
        left = sum(rs.active_streams for rs in self.sessions)
        if left:
            logger.warning("drain deadline reached with %d streams still open", left)
        for rs in list(self.sessions):
            rs.conn.close(ErrorCode.NO_ERROR, "relay shutting down")
        with trio.move_on_after(3):
            for rs in list(self.sessions):
                await rs.done.wait()


async def serve(
    config: ServerConfig,
    *,
    shutdown: trio.Event | None = None,
    report: Callable[[str], None] = print,
    policy: StreamPolicy = DEFAULT_POLICY,
    reload_config: Callable[[], ServerConfig] | None = None,
    stats: Stats | None = None,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until ``shutdown`` is set (then drain and return) or until cancelled.

    With ``reload_config``, SIGHUP applies ``reload_config()`` and SIGUSR1 logs a status line
    (:mod:`muxtunnel.reload`). A service manager's ``$NOTIFY_SOCKET`` gets READY, STATUS,
    WATCHDOG and STOPPING (:mod:`muxtunnel.sdnotify`). ``stats`` (default: a new one) is what
    the admin endpoint (``config.admin``, :mod:`muxtunnel.admin`) and the metrics read.

    Raises:
        ConfigError: No token configured, or the certificate cannot be loaded.
        ListenError: The control listener cannot be bound (:mod:`muxtunnel.preflight`).
    """
    if not config.accepted_tokens():
        raise ConfigError(
            "the relay needs at least one token (--token, --token-file or MUXTUNNEL_TOKEN)"
        )
    identity = tls.load_or_create_identity(config.state_dir, config.cert_file, config.key_file)
    relay = _Relay(config, tls.server_ssl_context(identity), policy)
    if stats is not None:
        relay.stats = stats
    try:
        listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
    except OSError as exc:
        raise listen_error(config.listen_host, config.listen_port, "--listen", exc) from None
    notifier = Notifier()
    try:
        sockname = listeners[0].socket.getsockname()
        host, port = str(sockname[0]), int(sockname[1])
        async with trio.open_nursery() as nursery:
            await relay.restore_leases()
            nursery.start_soon(relay.lease_store.run)
            nursery.start_soon(relay.reap_leases)
            if config.metrics is not None:  # the Prometheus endpoint (muxtunnel.metrics)
                from muxtunnel.metrics import serve_metrics

                await nursery.start(serve_metrics, config.metrics, relay.stats)
            admin = resolve_admin(config.admin, config.state_dir, "relay")
            if admin is not None:  # the status endpoint (muxtunnel.admin)
                listen = {"listen": format_host_port(host, port)}
                default = config.admin == ADMIN_AUTO
                await nursery.start(
                    partial(serve_admin, admin, relay.stats, listen, default=default)
                )
            nursery.start_soon(notifier.run, lambda: relay_status(relay))
            if reload_config is not None:
                nursery.start_soon(relay_signals, relay, reload_config, notifier)
            async with trio.open_nursery() as clients:
                for listener in listeners:
                    clients.start_soon(relay.accept_clients, listener, clients)
                report(f"muxtunnel relay listening on {format_host_port(host, port)}")
                logger.info(
                    "relay listening on %s, public ports %d-%d on %s",
                    format_host_port(host, port),
                    config.port_range[0],
                    config.port_range[1],
                    config.bind_host,
                )
                task_status.started(ServerInfo(host, port, identity.fingerprint))
                notifier.ready(relay_status(relay))
                if shutdown is None:
                    await trio.sleep(math.inf)
                else:
                    await shutdown.wait()
                notifier.stopping(f"draining: {relay_status(relay)}")
                # Stop accepting clients: closing the listeners ends the accept loops.
                for listener in listeners:
                    await listener.aclose()
                logger.info("shutting down: draining for up to %.1f s", config.drain_timeout)
                await relay.drain()
                # The leases as the sessions left them, before they are released below.
                await relay.lease_store.write()
                relay.registry.on_change = None
                clients.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
        logger.info("relay stopped")
    finally:
        notifier.close()
        # Not written: the file keeps the leases for the next start (like a kill -9).
        relay.registry.on_change = None
        relay.registry.close_all()
        for listener in listeners:
            await trio.aclose_forcefully(listener)
