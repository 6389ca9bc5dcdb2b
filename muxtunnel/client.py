"""The client: one TLS session to the relay, its tunnels, and reconnecting until stopped.

Each session: TCP connect, TLS handshake, relay identity check (pin, trust on first use or CA),
AUTH with pipelined BINDs, one ``forwarding tcp://RELAY:PORT -> LOCAL:PORT`` line per tunnel,
then one task per stream the relay opens: dial the local target (bounded by
``connect_timeout``), accept or reject with a reason, and splice.

Every frame of the relay is treated as hostile (protocol-spec.md §16.7): a stream is only
dialed for a tunnel whose BIND the relay accepted in the current session, and only to the
local address the client's own tunnel spec names (OPEN's target is ignored); any other
tunnel id gets OPEN_FAIL(UNKNOWN_TUNNEL). Local connections (dialing or spliced) are bounded
per tunnel (``max_streams_per_tunnel``) and in total (``max_streams``); an OPEN beyond
either bound gets OPEN_FAIL(RESOURCE_SHORTAGE) before any descriptor is spent. One stream's
unexpected error ends that stream only. Text from the relay is logged through
:func:`muxtunnel.logsafe.peer_text`, and repeated refusals are logged once per session
with a count at its end.

When a session ends for any reason but a refused token or a wrong relay identity, the client
reconnects with exponential backoff and jitter (capped at ``backoff_cap``) and asks for the same
public ports again, including the ones the relay picked the first time. A session that ends
within ``STABLE_SESSION`` of coming up counts like a failed attempt for the backoff, so a relay
that drops every session cannot make the client reconnect in a tight loop.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from muxtunnel import tls
from muxtunnel.config import ClientConfig, TunnelSpec, format_host_port
from muxtunnel.connection import (
    CLOSE_GRACE,
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    HandshakeError,
    IdentityMismatchError,
    MuxtunnelError,
    SessionClosedError,
    TunnelError,
)
from muxtunnel.handshake import BindOutcome, client_handshake
from muxtunnel.logsafe import peer_text
from muxtunnel.policy import DEFAULT_POLICY, StreamPolicy
from muxtunnel.protocol.constants import OpenFailReason, ResultStatus, Role
from muxtunnel.protocol.events import GoAwayReceived, ResultReceived, UnbindReceived
from muxtunnel.protocol.frames import Address
from muxtunnel.splice import splice
from muxtunnel.tokens import check_private_dir

if TYPE_CHECKING:
    from collections.abc import Callable

    from muxtunnel.tlsstream import TLSStream

__all__ = ["BoundTunnel", "ClientInfo", "run_client"]

logger = logging.getLogger(__name__)

#: First reconnect delay (seconds); doubles per failed attempt up to ``backoff_cap``.
BACKOFF_BASE = 0.5
#: Time allowed for TCP connect + TLS handshake + AUTH/BIND answers.
HANDSHAKE_TIMEOUT = 15.0
#: On shutdown, how long open streams may take to finish before the session is closed.
DRAIN_TIMEOUT = 10.0
#: A session that ends sooner than this after coming up counts towards the reconnect backoff.
STABLE_SESSION = 10.0


@dataclass(frozen=True, slots=True)
class BoundTunnel:
    """One tunnel that is up."""

    spec: TunnelSpec
    tunnel_id: int
    remote_port: int


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What ``run_client`` passes to ``task_status.started`` once the first session is up."""

    fingerprint: str
    tunnels: tuple[BoundTunnel, ...]


async def _dial(host: str, port: int) -> trio.SocketStream:
    """Connect to the local target; an IP literal skips ``open_tcp_stream``'s machinery.

    ``trio.open_tcp_stream`` (resolution, happy eyeballs: a nursery and a task per attempt)
    costs about as much CPU as the rest of a stream's setup; for an address it is not needed.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _open_fail_reason(exc: OSError) -> OpenFailReason:
    if isinstance(exc, socket.gaierror):
        return OpenFailReason.NAME_RESOLUTION_FAILED
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN):
        return OpenFailReason.UNREACHABLE
    if exc.errno == errno.ETIMEDOUT:
        return OpenFailReason.CONNECT_TIMEOUT
    return OpenFailReason.CONNECT_FAILED


class _Client:
    def __init__(
        self, config: ClientConfig, report: Callable[[str], None], policy: StreamPolicy
    ) -> None:
        self.config = config
        self.report = report
        self.policy = policy
        self.ssl_context = tls.client_ssl_context(config.ca_file)
        self.known_hosts = tls.KnownHosts(config.state_dir / tls.KNOWN_HOSTS_FILE_NAME)
        check_private_dir(config.state_dir)  # it holds the pinned relay fingerprints
        # tunnel id (1-based index) -> spec, and the port the relay gave it last time.
        self.specs: dict[int, TunnelSpec] = {i + 1: spec for i, spec in enumerate(config.tunnels)}
        self.remembered: dict[int, int] = {
            tid: spec.remote_port for tid, spec in self.specs.items()
        }
        self.conn: MuxConnection | None = None
        self.ever_up = False
        self.active_streams = 0
        self._idle = trio.Event()
        self._idle.set()
        # Tunnels the relay accepted (RESULT OK for our BIND) in the current session: the only
        # ones a stream may be dialed for.
        self.up: dict[int, TunnelSpec] = {}
        # Local connections (dialing or spliced) per tunnel id, and their total.
        self.local: dict[int, int] = {}
        self.local_total = 0
        # Streams refused in the current session, per kind: the first is logged, the rest
        # counted and summarized when the session ends.
        self.refused: dict[str, int] = {}

    async def connect(self) -> tuple[trio.SSLStream[trio.SocketStream] | TLSStream, str]:
        config = self.config
        tcp = await trio.open_tcp_stream(config.server_host, config.server_port)
        stream = wrap_tls(tcp, self.ssl_context, server_hostname=config.server_host)
        try:
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                mismatch = tls.identity_error_from_exception(exc, config.server_key, config.ca_file)
                if mismatch is not None:
                    raise mismatch from None
                raise HandshakeError(
                    f"TLS handshake with {config.server_key} failed: {exc.__cause__ or exc}"
                ) from None
            fingerprint = tls.verify_server(
                stream,
                config.server_key,
                config.fingerprint,
                config.ca_file,
                self.known_hosts,
                self.report,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream, fingerprint

    async def run_session(
        self,
        shutdown: trio.Event,
        on_up: Callable[[ClientInfo], None],
    ) -> bool:
        """One session; returns True if it got as far as authenticated."""
        config = self.config
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream, fingerprint = await self.connect()
        session = make_session(
            Role.CLIENT, idle_timeout=config.keepalive_timeout, open_rate=config.max_open_rate
        )
        conn = MuxConnection(
            stream,
            session,
            name=f"relay {config.server_key}",
            stall_timeout=config.stall_timeout,
        )
        self.conn = conn
        self.up = {}
        self.refused = {}
        authenticated = False
        body_error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                nursery.start_soon(self._watch_shutdown, conn, shutdown)
                try:
                    # Explicit ports first: a port the relay picks for an auto tunnel can then
                    # never be one that a later BIND of ours asks for by number.
                    binds = sorted(
                        ((tid, self.remembered[tid]) for tid in self.specs),
                        key=lambda bind: bind[1] == 0,
                    )
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        outcomes = await client_handshake(conn, config.token, binds)
                    authenticated = True
                    retry = [
                        o.tunnel_id
                        for o in outcomes
                        if not o.ok
                        and o.requested != 0
                        and self.specs[o.tunnel_id].remote_port == 0
                        and o.status in (ResultStatus.ADDRESS_IN_USE, ResultStatus.OUT_OF_RANGE)
                    ]
                    if retry:
                        # The port the relay picked last time is gone: let it pick again.
                        for tid in retry:
                            self.remembered[tid] = 0
                        with trio.fail_after(HANDSHAKE_TIMEOUT):
                            rebound = await self._rebind(conn, retry)
                        outcomes = [o for o in outcomes if o.tunnel_id not in retry] + rebound
                    bound: list[BoundTunnel] = []
                    for outcome in sorted(outcomes, key=lambda o: o.tunnel_id):
                        spec = self.specs[outcome.tunnel_id]
                        if outcome.ok and outcome.bound is not None:
                            self.up[outcome.tunnel_id] = spec
                            self.remembered[outcome.tunnel_id] = outcome.bound.port
                            bound.append(BoundTunnel(spec, outcome.tunnel_id, outcome.bound.port))
                            self.report(
                                f"forwarding tcp://{format_host_port(config.server_host, outcome.bound.port)}"
                                f" -> {format_host_port(spec.local_host, spec.local_port)}"
                            )
                        else:
                            logger.error(
                                "tunnel %s: the relay refused remote port %d: %s: %s",
                                spec,
                                outcome.requested,
                                outcome.status_name,
                                peer_text(outcome.message),
                            )
                    if not bound and not self.ever_up:
                        raise TunnelError(
                            f"relay {config.server_key} refused every tunnel; nothing to forward"
                        )
                    self.ever_up = True
                    logger.info(
                        "connected to relay %s: %d of %d tunnels up",
                        config.server_key,
                        len(bound),
                        len(self.specs),
                    )
                    on_up(ClientInfo(fingerprint, tuple(bound)))
                    nursery.start_soon(self._control_loop, conn)
                    while True:
                        mux = await conn.accept_stream()
                        nursery.start_soon(self._serve_stream, mux)
                except MuxSessionClosedError:
                    pass
                except Exception as exc:  # re-raised below, outside the nursery (no ExceptionGroup)
                    body_error = exc
                finally:
                    if not conn.closed:
                        conn.close(ErrorCode.NO_ERROR, "client shutting down")
                    with trio.move_on_after(CLOSE_GRACE + 1):
                        await conn.wait_closed()
                    nursery.cancel_scope.cancel()
        finally:
            self.conn = None
            self.up = {}
            self._summarize_refusals(conn)
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
                "session with relay %s ended: %s", config.server_key, _inert(conn.close_reason)
            )
        return True

    async def _rebind(self, conn: MuxConnection, tunnel_ids: list[int]) -> list[BindOutcome]:
        base = 1000
        for i, tid in enumerate(tunnel_ids):
            conn.session.send_bind(base + i, tid, Address(None, 0))
        conn.wake_writer()
        results: list[BindOutcome] = []
        while len(results) < len(tunnel_ids):
            event = await conn.next_control_event()
            if isinstance(event, ResultReceived) and base <= event.req_id < base + len(tunnel_ids):
                tid = tunnel_ids[event.req_id - base]
                results.append(BindOutcome(tid, 0, int(event.status), event.message, event.bound))
        return results

    async def _watch_shutdown(self, conn: MuxConnection, shutdown: trio.Event) -> None:
        await shutdown.wait()
        if self.active_streams and conn.usable:
            # GOAWAY: the relay sends no new visitors; open streams get DRAIN_TIMEOUT to finish.
            conn.go_away(ErrorCode.NO_ERROR, "client shutting down")
            logger.info(
                "draining %d open streams for up to %.0f s", self.active_streams, DRAIN_TIMEOUT
            )
            with trio.move_on_after(DRAIN_TIMEOUT):
                while self.active_streams:
                    await self._idle.wait()
        conn.close(ErrorCode.NO_ERROR, "client shutting down")

    async def _control_loop(self, conn: MuxConnection) -> None:
        """Log what the relay announces; anything unexpected (a RESULT nobody asked for, a
        second CHALLENGE ...) is ignored."""
        while True:
            try:
                event = await conn.next_control_event()
            except MuxSessionClosedError:
                return
            if isinstance(event, UnbindReceived):
                spec = self.up.pop(event.tunnel_id, None)
                if spec is not None:
                    logger.warning(
                        "the relay revoked tunnel %s (%s)", spec, peer_text(event.error_code.name)
                    )
            elif isinstance(event, GoAwayReceived):
                logger.info(
                    "relay is going away (%s): %s",
                    peer_text(event.error_code.name),
                    peer_text(event.message),
                )

    def _refuse(self, mux: MuxStream, reason: OpenFailReason, detail: str, first: str) -> None:
        """Answer ``mux`` with OPEN_FAIL; log ``first`` only for the first refusal of its kind
        in this session (the rest are counted and summarized when the session ends)."""
        count = self.refused.get(reason.name, 0) + 1
        self.refused[reason.name] = count
        if count == 1:
            logger.warning("%s (further ones in this session are only counted)", first)
        _reject(mux, reason, detail)

    def _summarize_refusals(self, conn: MuxConnection) -> None:
        for name, count in self.refused.items():
            if count > 1:
                logger.warning("refused %d streams with %s in this session", count, name)
        self.refused = {}
        # OPENs the session itself refused (tunnel not bound, open rate exceeded): no stream
        # was created for them, so they are only counted.
        early = conn.statistics().get("opens_refused", 0)
        if early:
            logger.warning(
                "the relay opened %d streams that were refused on arrival in this session "
                "(tunnel not bound, or too many new streams per second)",
                early,
            )

    async def _serve_stream(self, mux: MuxStream) -> None:
        """Run one stream; an unexpected error ends that stream only, never the session."""
        try:
            await self._handle_stream(mux)
        except Exception as exc:
            logger.error(
                "stream %d: internal error, stream aborted: %s",
                mux.stream_id,
                _inert(_error_text(exc)),
            )
            logger.debug("stream %d: traceback", mux.stream_id, exc_info=True)
            _abort(mux)

    async def _handle_stream(self, mux: MuxStream) -> None:
        if mux.failure is not None:
            return  # reset by the relay (or the session ended) before we got to it: no dial
        tunnel_id = mux.info.tunnel_id
        spec = self.up.get(tunnel_id)
        if spec is None:
            self._refuse(
                mux,
                OpenFailReason.UNKNOWN_TUNNEL,
                "no such tunnel",
                f"the relay opened a stream for tunnel {tunnel_id}, which it did not accept "
                "in this session: refused",
            )
            return
        config = self.config
        if self.local_total >= config.max_streams:
            self._refuse(
                mux,
                OpenFailReason.RESOURCE_SHORTAGE,
                "too many streams",
                f"{self.local_total} local connections open (max-streams {config.max_streams}): "
                "refusing new streams",
            )
            return
        if self.local.get(tunnel_id, 0) >= config.max_streams_per_tunnel:
            self._refuse(
                mux,
                OpenFailReason.RESOURCE_SHORTAGE,
                "too many streams for this tunnel",
                f"tunnel {spec}: {config.max_streams_per_tunnel} local connections open "
                "(max-streams-per-tunnel): refusing new streams",
            )
            return
        self.local[tunnel_id] = self.local.get(tunnel_id, 0) + 1
        self.local_total += 1
        try:
            await self._dial_and_splice(mux, spec)
        finally:
            self.local_total -= 1
            left = self.local[tunnel_id] - 1
            if left:
                self.local[tunnel_id] = left
            else:
                del self.local[tunnel_id]

    async def _dial_and_splice(self, mux: MuxStream, spec: TunnelSpec) -> None:
        target = format_host_port(spec.local_host, spec.local_port)
        mux.info.labels["local"] = target
        origin = peer_text(mux.info.origin)
        tcp: trio.SocketStream | None = None
        reason: OpenFailReason | None = None
        detail = ""
        try:
            with trio.move_on_after(self.config.connect_timeout) as scope:
                tcp = await _dial(spec.local_host, spec.local_port)
            if scope.cancelled_caught:
                reason, detail = OpenFailReason.CONNECT_TIMEOUT, f"connect to {target} timed out"
        except OSError as exc:
            reason, detail = (
                _open_fail_reason(exc),
                f"connect to {target} failed: {exc.strerror or exc}",
            )
        if tcp is None:
            assert reason is not None
            if mux.failure is None:  # not reset by the relay while we dialed
                logger.warning("stream from %s: %s", origin, detail)
            _reject(mux, reason, detail)
            return
        logger.debug("stream %d opened: visitor %s -> %s", mux.stream_id, origin, target)
        try:
            mux.accept()
        except trio.BrokenResourceError:  # reset by the relay (or the session ended) meanwhile
            await trio.aclose_forcefully(tcp)
            return
        self.active_streams += 1
        if self.active_streams == 1:
            self._idle = trio.Event()
        try:
            result = await splice(tcp, mux, policy=self.policy)
        finally:
            self.active_streams -= 1
            if not self.active_streams:
                self._idle.set()
        if result.error is not None:
            logger.info("stream from %s to %s failed: %s", origin, target, _inert(result.error))


def _error_text(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, or of the errors inside an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_error_text(sub) for sub in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _reject(mux: MuxStream, reason: OpenFailReason, detail: str) -> None:
    """OPEN_FAIL for ``mux``, unless it already failed (reset by the relay, session ended)."""
    if mux.failure is None:
        mux.reject(reason, detail)


def _abort(mux: MuxStream) -> None:
    """End ``mux`` after an internal error: OPEN_FAIL if still unanswered, else RESET."""
    if mux.failure is not None:
        return
    try:
        mux.reject(OpenFailReason.REFUSED, "internal error")
    except RuntimeError:  # already accepted
        mux.reset(ErrorCode.INTERNAL_ERROR, "internal error")


async def run_client(
    config: ClientConfig,
    *,
    shutdown: trio.Event | None = None,
    report: Callable[[str], None] = print,
    policy: StreamPolicy = DEFAULT_POLICY,
    task_status: trio.TaskStatus[ClientInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the client until ``shutdown`` is set, reconnecting after failures.

    ``task_status.started`` gets a :class:`ClientInfo` once the first session is up.

    Raises:
        AuthError: The relay refused the token (never retried).
        IdentityMismatchError: The relay's certificate does not match (never retried).
        SessionClosedError: ``max_retries`` consecutive attempts failed.
    """
    shutdown = trio.Event() if shutdown is None else shutdown
    client = _Client(config, report, policy)
    started = False
    failures = 0
    # Sessions in a row that ended within STABLE_SESSION of coming up: a relay that accepts
    # and then drops us at once gets the same growing backoff as one that refuses us.
    flaps = 0
    up_at: list[float] = []  # when the current attempt's session came up (set by on_up)

    def on_up(info: ClientInfo) -> None:
        nonlocal started, failures
        failures = 0
        up_at[:] = [trio.current_time()]
        if not started:
            started = True
            task_status.started(info)

    while not shutdown.is_set():
        error: BaseException | None = None
        up_at.clear()
        try:
            await client.run_session(shutdown, on_up)
        except (AuthError, IdentityMismatchError, ConfigError, TunnelError):
            raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, MuxtunnelError) as exc:
            error = exc
            logger.warning("relay %s: %s", config.server_key, _describe(exc))
        if shutdown.is_set():
            break
        if up_at:
            flaps = flaps + 1 if trio.current_time() - up_at[0] < STABLE_SESSION else 0
        failures += 1
        if config.max_retries is not None and failures > config.max_retries:
            raise SessionClosedError(
                f"giving up on relay {config.server_key} after {failures} failed attempts"
                + (f": {_describe(error)}" if error is not None else "")
            )
        delay = min(config.backoff_cap, BACKOFF_BASE * 2 ** (max(failures, flaps) - 1))
        delay *= random.uniform(0.5, 1.0)
        logger.info("reconnecting to %s in %.1f s", config.server_key, delay)
        with trio.move_on_after(delay):
            await shutdown.wait()


def _describe(exc: BaseException) -> str:
    """One line for ``exc``; it may quote the relay (CLOSE or RESULT text)."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return _inert(exc.strerror)
    return _inert(str(exc) or type(exc).__name__)


def _inert(text: str | None, limit: int = 400) -> str:
    """``text`` (our message, possibly quoting the relay) made safe for one log line.

    Text that is printable and short is kept as it is, so a message whose peer part was
    escaped already is not escaped twice; anything else goes through ``peer_text``.
    """
    text = str(text)
    return text if text.isprintable() and len(text) <= limit else peer_text(text, limit)
