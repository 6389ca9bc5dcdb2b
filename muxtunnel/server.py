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

Graceful shutdown (``shutdown`` event): stop accepting clients, GOAWAY every session and stop
its accept loops, let open streams finish for up to ``drain_timeout``, then CLOSE(NO_ERROR).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from muxtunnel import tls
from muxtunnel.config import ServerConfig, format_host_port
from muxtunnel.connection import (
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import AuthError, ConfigError, ErrorCode, HandshakeError
from muxtunnel.handshake import authenticate_client, token_id
from muxtunnel.policy import DEFAULT_POLICY, StreamInfo, StreamPolicy
from muxtunnel.protocol.constants import ALPN, ResultStatus, Role, TunnelProto
from muxtunnel.protocol.events import BindRequested, UnbindReceived
from muxtunnel.protocol.frames import Address
from muxtunnel.registry import BindError, PortLease, PortRegistry
from muxtunnel.splice import abort_tcp, splice

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

__all__ = ["RelaySession", "ServerInfo", "serve"]

logger = logging.getLogger(__name__)

#: Connections allowed in the TLS + AUTH phase at once; more are reset at once (a flood of
#: idle TLS connections would otherwise cost a task and buffers each for handshake_timeout).
MAX_UNAUTHENTICATED = 256
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


class RelaySession:
    """One authenticated client session on the relay."""

    def __init__(self, relay: _Relay, conn: MuxConnection, token_id: str, peer: str) -> None:
        self.relay = relay
        self.conn = conn
        self.token_id = token_id
        self.peer = peer
        self.tunnels: dict[int, PortLease] = {}
        self.active_streams = 0
        self.draining = False
        self._idle = trio.Event()
        self._idle.set()
        #: Set when the session's handler has finished.
        self.done = trio.Event()

    # -- LeaseOwner ----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the connection is closing."""
        return not self.conn.closed

    async def probe(self, within: float) -> bool:
        """True if the client shows life within ``within`` seconds."""
        return await self.conn.probe(within)

    async def wait_idle(self) -> None:
        """Wait until no visitor stream is open."""
        while self.active_streams:
            await self._idle.wait()

    def replaced(self, reason: str) -> None:
        """A new session of the same token takes over: close this one now."""
        logger.info("client %s: %s", self.peer, reason)
        self.conn.close(ErrorCode.TIMEOUT, reason)

    # -- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve BIND/UNBIND and visitors until the connection ends."""
        try:
            async with trio.open_nursery() as nursery:
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

    async def _bind(self, event: BindRequested, nursery: trio.Nursery) -> None:
        config = self.relay.config
        session = self.conn.session
        status: ResultStatus
        lease: PortLease | None = None
        if self.draining:
            status, message = ResultStatus.DENIED, "relay is shutting down"
        elif event.proto != TunnelProto.TCP:
            status, message = (
                ResultStatus.UNSUPPORTED_PROTO,
                f"protocol {event.proto} is not supported",
            )
        elif event.tunnel_id in self.tunnels:
            status, message = (
                ResultStatus.DUPLICATE_TUNNEL,
                f"tunnel {event.tunnel_id} is already bound",
            )
        elif len(self.tunnels) >= config.max_tunnels_per_client:
            status, message = (
                ResultStatus.LIMIT_REACHED,
                f"at most {config.max_tunnels_per_client} tunnels per client",
            )
        else:
            try:
                lease = await self.relay.registry.acquire(self, event.tunnel_id, event.bind.port)
                status, message = ResultStatus.OK, ""
            except BindError as exc:
                status, message = exc.status, str(exc)
        if self.conn.closed:
            if lease is not None:
                self.relay.registry.detach(lease, self)
            return
        if lease is None:
            logger.warning(
                "client %s: tunnel %d (port %d) refused: %s: %s",
                self.peer,
                event.tunnel_id,
                event.bind.port,
                status.name,
                message,
            )
            session.send_result(event.req_id, status, message)
            self.conn.wake_writer()
            return
        self.tunnels[event.tunnel_id] = lease
        await nursery.start(self._accept_loop, lease, nursery)
        session.send_result(
            event.req_id, ResultStatus.OK, "", Address(config.bind_host, lease.port)
        )
        self.conn.wake_writer()
        logger.info(
            "client %s: tunnel %d bound on %s",
            self.peer,
            event.tunnel_id,
            format_host_port(config.bind_host, lease.port),
        )

    def _unbind(self, event: UnbindReceived) -> None:
        lease = self.tunnels.pop(event.tunnel_id, None)
        if event.req_id == 0:
            return
        if lease is None:
            self.conn.session.send_result(
                event.req_id, ResultStatus.UNKNOWN_TUNNEL, "no such tunnel"
            )
        else:
            self.relay.registry.release(lease, self)
            self.conn.session.send_result(event.req_id, ResultStatus.OK, "")
            logger.info(
                "client %s: tunnel %d on port %d released", self.peer, event.tunnel_id, lease.port
            )
        self.conn.wake_writer()

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
        conn = self.conn
        policy = self.relay.policy
        while True:
            try:
                # Back-pressure: no accept while the client's pending-open limit is reached.
                if not conn.open_slot_available():
                    await conn.wait_open_slot()
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
            try:
                origin = _sock_address(tcp.socket.getpeername())
                target = _sock_address(tcp.socket.getsockname())
            except OSError:
                nursery.start_soon(abort_tcp, tcp)
                continue
            info = StreamInfo(
                stream_id=0,
                tunnel_id=lease.tunnel_id,
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
                nursery.start_soon(abort_tcp, tcp)
                continue
            try:
                if not conn.open_slot_available():
                    await conn.wait_open_slot()
            except MuxSessionClosedError:
                nursery.start_soon(abort_tcp, tcp)
                return
            mux = conn.open_stream(lease.tunnel_id, origin, target)
            logger.debug(
                "stream %d opened: visitor %s on port %d", mux.stream_id, origin, lease.port
            )
            nursery.start_soon(self._visitor, tcp, mux, lease)

    async def _visitor(self, tcp: trio.SocketStream, mux: MuxStream, lease: PortLease) -> None:
        self.active_streams += 1
        if self.active_streams == 1:
            self._idle = trio.Event()
        try:
            result = await splice(tcp, mux, policy=self.relay.policy)
        finally:
            self.active_streams -= 1
            if not self.active_streams:
                self._idle.set()
        origin = mux.info.origin
        if result.rejected:
            logger.info(
                "visitor %s on port %d: client refused the stream: %s",
                origin,
                lease.port,
                result.error,
            )
        elif result.error is not None:
            logger.info(
                "visitor %s on port %d: stream failed: %s", origin, lease.port, result.error
            )


class _Relay:
    def __init__(
        self, config: ServerConfig, ssl_context: ssl.SSLContext, policy: StreamPolicy
    ) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self.policy = policy
        self.registry = PortRegistry(config.port_range, config.bind_host, config.lease_seconds)
        self.sessions: set[RelaySession] = set()
        self.shutting_down = False
        #: Connections still in the TLS/AUTH handshake (bounded by MAX_UNAUTHENTICATED).
        self.unauthenticated = 0
        self._pending_auth: set[trio.abc.Stream] = set()

    async def reap_leases(self) -> None:
        while True:
            nxt = self.registry.expire()
            delay = 1.0 if nxt is None else max(0.01, min(1.0, nxt - trio.current_time()))
            await trio.sleep(delay)

    async def accept_clients(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                tcp = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                logger.warning("control listener: accept failed: %s", exc)
                await trio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            nursery.start_soon(self.handle_client, tcp)

    async def handle_client(self, tcp: trio.SocketStream) -> None:
        try:
            peer = str(_sock_address(tcp.socket.getpeername()))
        except OSError:
            peer = "?"
        if self.unauthenticated >= MAX_UNAUTHENTICATED:
            logger.warning("client %s: too many connections in the handshake; refused", peer)
            await abort_tcp(tcp)
            return
        try:
            await self._handle_client(tcp, peer)
        except Exception:
            # A bug in one session must not take the relay down.
            logger.exception("client %s: internal error", peer)

    async def _handle_client(self, tcp: trio.SocketStream, peer: str) -> None:
        config = self.config
        stream = wrap_tls(tcp, self.ssl_context, server_side=True)
        self.unauthenticated += 1
        self._pending_auth.add(stream)
        try:
            with trio.move_on_after(config.handshake_timeout) as tls_scope:
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    logger.info("client %s: TLS handshake failed: %s", peer, exc.__cause__ or exc)
                    return
            if tls_scope.cancelled_caught:
                logger.info("client %s: TLS handshake timed out", peer)
                return
            if stream.selected_alpn_protocol() != ALPN:
                logger.info("client %s: did not negotiate ALPN %s; closing", peer, ALPN)
                return
            session = make_session(Role.SERVER, idle_timeout=config.keepalive_timeout)
            conn = MuxConnection(stream, session, name=peer)
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                try:
                    await self._run_session(conn, peer)
                finally:
                    conn.close()
                    with trio.move_on_after(3):
                        await conn.wait_closed()
                    nursery.cancel_scope.cancel()
        finally:
            self._authenticated(stream)
            await trio.aclose_forcefully(stream)

    def _authenticated(self, stream: trio.abc.Stream) -> None:
        """The connection left the handshake phase (authenticated, failed or gone)."""
        if stream in self._pending_auth:
            self._pending_auth.discard(stream)
            self.unauthenticated -= 1

    async def _run_session(self, conn: MuxConnection, peer: str) -> None:
        config = self.config
        logger.info("client %s connected", peer)
        with trio.move_on_after(config.handshake_timeout) as scope:
            try:
                token = await authenticate_client(conn, config.tokens)
            except AuthError as exc:
                logger.warning("client %s: %s", peer, exc)
                return
            except HandshakeError as exc:
                logger.info("client %s: handshake failed: %s", peer, exc)
                return
        if scope.cancelled_caught:
            logger.info(
                "client %s: handshake timed out after %.1f s", peer, config.handshake_timeout
            )
            conn.close(ErrorCode.TIMEOUT, "handshake timeout")
            return
        self._authenticated(conn.transport)
        tid = token_id(token)
        conn.token_id = tid
        rs = RelaySession(self, conn, tid, peer)
        logger.info("client %s authenticated (token %s)", peer, tid)
        self.sessions.add(rs)
        if self.shutting_down:
            rs.begin_drain()
        try:
            await rs.run()
        finally:
            self.sessions.discard(rs)
            rs.done.set()
            logger.info("client %s gone (%s)", peer, conn.close_reason or "closed")

    async def drain(self) -> None:
        """GOAWAY every session, wait for streams (bounded), then CLOSE them all."""
        self.shutting_down = True
        for rs in list(self.sessions):
            rs.begin_drain()
        # Visitors that connect now get a refused connection, not a hang.
        self.registry.close_all()
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
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until ``shutdown`` is set (then drain and return) or until cancelled.

    Raises:
        ConfigError: No token configured, or the certificate cannot be loaded.
        OSError: The control listener cannot be bound.
    """
    if not config.tokens:
        raise ConfigError(
            "the relay needs at least one token (--token, --token-file or MUXTUNNEL_TOKEN)"
        )
    identity = tls.load_or_create_identity(config.state_dir, config.cert_file, config.key_file)
    relay = _Relay(config, tls.server_ssl_context(identity), policy)
    listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
    try:
        sockname = listeners[0].socket.getsockname()
        host, port = str(sockname[0]), int(sockname[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.reap_leases)
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
                if shutdown is None:
                    await trio.sleep(math.inf)
                else:
                    await shutdown.wait()
                # Stop accepting clients: closing the listeners ends the accept loops.
                for listener in listeners:
                    await listener.aclose()
                logger.info("shutting down: draining for up to %.1f s", config.drain_timeout)
                await relay.drain()
                clients.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
        logger.info("relay stopped")
    finally:
        relay.registry.close_all()
        for listener in listeners:
            await trio.aclose_forcefully(listener)
