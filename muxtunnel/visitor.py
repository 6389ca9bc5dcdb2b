"""``muxtunnel visit``: reach a private tunnel through the relay on a local port.

The visitor listens on ``LOCAL_HOST:LOCAL_PORT`` (127.0.0.1 by default) and keeps one TLS
session to the relay, set up like the client's (:func:`muxtunnel.client.connect_relay`: the
same pinning, trust on first use or CA; AUTH; reconnecting with the same backoff). In each
session it BINDs one *visit* tunnel (BIND option VISIT NAME, protocol-spec.md §6.12) and, for
every local connection, opens a stream itself (spec §9.2) with that tunnel id; the relay
carries it to the client that published NAME. Bytes may follow the OPEN at once (early data),
so a client that speaks first (SSH) loses no round trip. A stream the relay refuses (nobody
publishes NAME, policy) closes that local connection with one log line; the listener stays.
The relay refusing the visit itself (DENIED) ends the command with that reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from muxtunnel import tls
from muxtunnel.accesslog import log_splice
from muxtunnel.client import HANDSHAKE_TIMEOUT, connect_relay, reconnect
from muxtunnel.config import VisitConfig, format_host_port
from muxtunnel.connection import (
    CLOSE_GRACE,
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    make_session,
)
from muxtunnel.errors import ErrorCode, HandshakeError, TunnelError
from muxtunnel.handshake import client_handshake
from muxtunnel.logsafe import peer_text
from muxtunnel.protocol.constants import OpenFailReason, Role
from muxtunnel.protocol.events import (
    ConnectionClosed,
    GoAwayReceived,
    HelloReceived,
    UnbindReceived,
)
from muxtunnel.protocol.frames import Address, BindOptions
from muxtunnel.splice import abort_tcp, splice
from muxtunnel.tokens import check_private_dir

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["VisitInfo", "run_visitor"]

logger = logging.getLogger(__name__)

#: The visit tunnel's id in every session (the visitor binds only this one).
VISIT_TUNNEL_ID = 1


@dataclass(frozen=True, slots=True)
class VisitInfo:
    """What ``run_visitor`` passes to ``task_status.started`` once the first session is up."""

    fingerprint: str
    #: The local address connections are accepted on.
    host: str
    port: int


class _Visitor:
    def __init__(
        self,
        config: VisitConfig,
        report: Callable[[str], None],
        listeners: list[trio.SocketListener],
    ) -> None:
        self.config = config
        self.report = report
        self.listeners = listeners
        self.ssl_context = tls.client_ssl_context(config.ca_file)
        self.known_hosts = tls.KnownHosts(config.state_dir / tls.KNOWN_HOSTS_FILE_NAME)
        check_private_dir(config.state_dir)  # it holds the pinned relay fingerprints
        sockname = listeners[0].socket.getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])
        #: The session whose visit tunnel is up, or None.
        self.conn: MuxConnection | None = None
        #: Set while ``conn`` is up; replaced by a fresh event when it goes.
        self.up = trio.Event()
        self.announced = False
        #: One per local connection being carried (``max_connections``).
        self.slots = trio.Semaphore(config.max_connections)

    # -- the relay session -----------------------------------------------------------------

    async def run_session(self, shutdown: trio.Event, on_up: Callable[[VisitInfo], None]) -> bool:
        """One session; returns once it ends (True: it was authenticated)."""
        config = self.config
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream, fingerprint = await connect_relay(
                config, self.ssl_context, self.known_hosts, self.report
            )
        session = make_session(Role.CLIENT, idle_timeout=config.keepalive_timeout)
        conn = MuxConnection(
            stream,
            session,
            name=f"relay {config.server_key}",
            open_timeout=config.open_timeout,
            stall_timeout=config.stall_timeout,
        )
        authenticated = False
        body_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(conn.run)

            async def watch_shutdown() -> None:
                await shutdown.wait()
                conn.close(ErrorCode.NO_ERROR, "visitor shutting down")

            nursery.start_soon(watch_shutdown)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await self._check_relay(conn)
                    (outcome,) = await client_handshake(
                        conn, config.token, [(VISIT_TUNNEL_ID, 0, BindOptions(visit=config.name))]
                    )
                authenticated = True
                if not outcome.ok:
                    raise TunnelError(
                        f"the relay {config.server_key} refused the visit of private tunnel "
                        f"{config.name}: {outcome.status_name}: {peer_text(outcome.message)}"
                    )
                self.conn = conn
                self.up.set()
                if not self.announced:
                    self.announced = True
                    self.report(
                        f"visiting private tunnel {config.name} on "
                        f"{format_host_port(self.host, self.port)}"
                    )
                logger.info(
                    "connected to relay %s: visiting private tunnel %s",
                    config.server_key,
                    config.name,
                )
                on_up(VisitInfo(fingerprint, self.host, self.port))
                nursery.start_soon(self._refuse_streams, conn)
                await self._control_loop(conn)
            except MuxSessionClosedError:
                pass
            except Exception as exc:  # re-raised below, outside the nursery
                body_error = exc
            finally:
                self._down(conn)
                if not conn.closed:
                    conn.close(ErrorCode.NO_ERROR, "visitor shutting down")
                with trio.move_on_after(CLOSE_GRACE + 1):
                    await conn.wait_closed()
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
        if not authenticated:
            raise HandshakeError(
                f"relay {config.server_key} ended the session: {conn.close_reason}"
            )
        if shutdown.is_set():
            logger.info("disconnected from relay %s", config.server_key)
        else:
            logger.warning(
                "session with relay %s ended: %s",
                config.server_key,
                peer_text(conn.close_reason or "closed"),
            )
        return True

    async def _check_relay(self, conn: MuxConnection) -> None:
        """Wait for the relay's HELLO; refuse a relay that cannot carry visits."""
        while True:
            event = await conn.next_control_event()
            if isinstance(event, HelloReceived):
                break
            if isinstance(event, ConnectionClosed):
                raise HandshakeError(
                    f"relay closed the connection ({event.error_code.name}: "
                    f"{peer_text(event.message)})"
                )
        if event.minor < 1 or event.settings.max_concurrent_streams == 0:
            raise TunnelError(
                f"the relay at {self.config.server_key} does not carry visits of private "
                f"tunnels (protocol 1.{event.minor}, "
                f"{event.settings.max_concurrent_streams} client streams); upgrade it or "
                "enable --max-visit-streams"
            )

    async def _control_loop(self, conn: MuxConnection) -> None:
        """Until the session ends: log GOAWAY; a revoked visit tunnel ends the session."""
        while True:
            event = await conn.next_control_event()
            if isinstance(event, UnbindReceived) and event.tunnel_id == VISIT_TUNNEL_ID:
                logger.warning(
                    "the relay revoked the visit of %s (%s)",
                    self.config.name,
                    peer_text(event.error_code.name),
                )
                conn.close(ErrorCode.NO_ERROR, "visit revoked")
                return
            if isinstance(event, GoAwayReceived):
                logger.info(
                    "relay is going away (%s): %s",
                    peer_text(event.error_code.name),
                    peer_text(event.message),
                )
                self._down(conn)

    async def _refuse_streams(self, conn: MuxConnection) -> None:
        """The relay opens no stream towards a visitor: refuse any it tries."""
        while True:
            try:
                mux = await conn.accept_stream()
            except MuxSessionClosedError:
                return
            if mux.failure is None:
                mux.reject(OpenFailReason.UNKNOWN_TUNNEL, "a visitor accepts no streams")

    # -- local connections -----------------------------------------------------------------

    async def serve_local(self) -> None:
        """Accept local connections for as long as the visitor runs."""
        async with trio.open_nursery() as nursery:
            for listener in self.listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            # At the limit, new connections wait in the listen backlog.
            await self.slots.acquire()
            try:
                tcp = await listener.accept()
            except trio.ClosedResourceError:
                self.slots.release()
                return
            except OSError as exc:
                self.slots.release()
                logger.warning("local listener: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_local, tcp)

    async def _serve_local(self, tcp: trio.SocketStream) -> None:
        try:
            await self._carry(tcp)
        finally:
            self.slots.release()

    def _down(self, conn: MuxConnection) -> None:
        """``conn`` takes no new streams any more."""
        if self.conn is conn:
            self.conn = None
            self.up = trio.Event()

    async def _open(self, origin: Address) -> MuxStream | None:
        """A stream to the private tunnel; waits (bounded) for a session that is up."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            while True:
                await self.up.wait()
                conn = self.conn
                if conn is None:  # pragma: no cover - the session went down before this task ran
                    await trio.sleep(0.05)
                    continue
                try:
                    await conn.wait_open_slot()
                    return conn.open_stream(VISIT_TUNNEL_ID, origin, Address(self.config.name, 0))
                except MuxSessionClosedError:
                    self._down(conn)
        return None

    async def _carry(self, tcp: trio.SocketStream) -> None:
        name = self.config.name
        try:
            peer = tcp.socket.getpeername()
            origin = Address(str(peer[0]), int(peer[1]))
        except OSError:
            await abort_tcp(tcp)
            return
        mux = await self._open(origin)
        if mux is None:
            logger.warning(
                "connection from %s: not connected to the relay within %.0f s; closed",
                origin,
                HANDSHAKE_TIMEOUT,
            )
            await abort_tcp(tcp)
            return
        logger.debug("stream %d opened: local connection %s", mux.stream_id, origin)
        result = await splice(tcp, mux)
        if result.rejected:
            reason = (result.error or "").partition("open refused by peer: ")[2] or result.error
            logger.warning(
                "connection from %s to private tunnel %s refused by the relay: %s",
                origin,
                name,
                peer_text(reason),
            )
        else:  # the access log line (muxtunnel.accesslog)
            log_splice("visit", mux.info, f"private:{name}", result, trio.current_time())


async def run_visitor(
    config: VisitConfig,
    *,
    shutdown: trio.Event | None = None,
    report: Callable[[str], None] = print,
    task_status: trio.TaskStatus[VisitInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen locally and carry connections to the private tunnel, reconnecting as needed.

    ``task_status.started`` gets a :class:`VisitInfo` once the first session is up.

    Raises:
        OSError: The local address cannot be listened on.
        AuthError: The relay refused the token (never retried).
        IdentityMismatchError: The relay's certificate does not match (never retried).
        TunnelError: The relay refused the visit, or cannot carry visits.
        SessionClosedError: ``max_retries`` consecutive attempts failed.
    """
    shutdown = trio.Event() if shutdown is None else shutdown
    try:
        listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot listen on {format_host_port(config.listen_host, config.listen_port)}: "
            f"{exc.strerror or exc}",
        ) from None
    try:
        visitor = _Visitor(config, report, listeners)
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(visitor.serve_local)
            try:
                await reconnect(
                    visitor.run_session,
                    server_key=config.server_key,
                    max_retries=config.max_retries,
                    backoff_cap=config.backoff_cap,
                    shutdown=shutdown,
                    task_status=task_status,
                )
            except Exception as exc:  # re-raised below, outside the nursery (no ExceptionGroup)
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
