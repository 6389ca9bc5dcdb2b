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

The backoff protects the relay from clients it answered (refused the connection, failed the
TLS handshake, ended the session). When nothing answered at all, the path is what failed, and
an attempt costs the relay nothing: no SYN reached it. So a session that ended because the relay
went silent (the keepalive timeout, protocol-spec §10.1) and attempts that got no answer (TCP
connect timed out after :data:`RELAY_DIAL_TIMEOUT`, no route, host or network unreachable)
wait at most :data:`PATH_RETRY_CAP` before the next attempt. Each attempt sends a fresh SYN
instead of waiting on the kernel's doubling SYN retransmissions (1, 3, 7, 15 s ...), so a
client whose network comes back is connected again within about ``RELAY_DIAL_TIMEOUT -
1 s + PATH_RETRY_CAP`` plus the handshake (the fault suite holds it to 5 s: tests/faults).

Session resumption (protocol-spec.md §10.6): once a session with resumption on has its ticket,
losing the TLS connection (a read or write error, EOF without CLOSE, the keepalive timeout) does
not end it. The streams and their local sockets stay; the client is "resuming": it dials the relay
again at once and then every :data:`PATH_RETRY_CAP` at most (the same identity checks), and
authenticates afresh with the ticket (``MuxConnection.resume_over``). The session goes on where it
stopped, no byte lost. If the relay no longer knows the session (it restarted, the window passed
there, the offsets do not fit) or our resume window passes, the session ends as without
resumption and a new one starts at once (its durable leases give the same ports back).

A tunnel the relay refuses for a reason that can pass (:data:`RETRYABLE`: the port is held by
another client, by a live session of the same token or by another program) is "pending": it
is asked for again on the live session with backoff (:data:`RETRY_BASE` doubling to
:data:`RETRY_CAP`, jittered) and prints its ``forwarding`` line once it is up. The answers
reach it through the one reader of control events, matched by request id. Other refusals leave
the tunnel down; a client whose every tunnel is refused for such reasons stops (TunnelError).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from muxtunnel import tls
from muxtunnel.accesslog import log_splice, log_unopened
from muxtunnel.admin import ADMIN_AUTO, resolve_admin, serve_admin
from muxtunnel.config import MAX_RESUME_WINDOW, ClientConfig, TunnelSpec, format_host_port
from muxtunnel.connection import (
    CLOSE_GRACE,
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    ResumeRefusedError,
    make_session,
    wrap_tls,
)
from muxtunnel.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    HandshakeError,
    IdentityMismatchError,
    JoinRefusedError,
    MuxtunnelError,
    NotARelayError,
    SessionClosedError,
    TunnelError,
)
from muxtunnel.handshake import BindOutcome, client_credential, client_handshake
from muxtunnel.logsafe import peer_text
from muxtunnel.netopts import cap_retransmit_timeout
from muxtunnel.policy import DEFAULT_POLICY, Direction, StreamInfo, StreamPolicy
from muxtunnel.protocol.constants import CARRIER_TUNNEL, OpenFailReason, ResultStatus, Role
from muxtunnel.protocol.events import GoAwayReceived, ResultReceived, UnbindReceived
from muxtunnel.protocol.frames import Address, BindOptions
from muxtunnel.proxyproto import encode as encode_proxy_header
from muxtunnel.reload import client_signals
from muxtunnel.sdnotify import Notifier
from muxtunnel.splice import SpliceResult, splice
from muxtunnel.stats import Stats, outcome_of
from muxtunnel.tokens import check_private_dir

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Iterable
    from pathlib import Path

    from muxtunnel.protocol.session import Session
    from muxtunnel.tlsstream import TLSStream

__all__ = ["BoundTunnel", "ClientInfo", "RelayAddress", "connect_relay", "reconnect", "run_client"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: First reconnect delay (seconds); doubles per failed attempt up to ``backoff_cap``.
BACKOFF_BASE = 0.5
#: Time allowed for TCP connect + TLS handshake + AUTH/BIND answers.
HANDSHAKE_TIMEOUT = 15.0
#: One TCP connect attempt to the relay (after name resolution): long enough for the kernel's
#: first SYN retransmission (1 s) and its answer, short enough that a path that comes back is
#: tried again with a fresh SYN soon (the next retransmission would wait until 3 s).
RELAY_DIAL_TIMEOUT = 2.5
#: Longest wait before the next attempt when nothing answered (see the module docstring).
PATH_RETRY_CAP = 2.0
#: Happy eyeballs (RFC 8305): a relay name with several addresses gets a new connect attempt
#: every this many seconds until one connects.
DIAL_STAGGER = 0.25
#: ``errno`` values of an attempt that got no answer from the relay's host.
_NO_ANSWER = frozenset(
    {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
)
#: What ``_Client.run_session`` returns when its session ended because the relay fell silent.
PEER_SILENT = "peer silent"
#: What ``_Client.run_session`` returns when its session could not be resumed (the relay refused
#: the ticket or the offsets, or the resume window passed): a new session starts at once.
RESUME_ENDED = "resume ended"
#: On shutdown, how long open streams may take to finish before the session is closed.
DRAIN_TIMEOUT = 10.0
#: A session that ends sooner than this after coming up counts towards the reconnect backoff.
STABLE_SESSION = 10.0
#: A tunnel the relay refused for a reason that can pass is asked for again in the background,
#: first after RETRY_BASE seconds, doubling (with jitter) up to RETRY_CAP: ADDRESS_IN_USE (the
#: port or name is held by another client, by a live session of the same token or by another
#: program, until it leaves or its lease expires). Other refusals stay down until the next
#: session: DENIED, OUT_OF_RANGE, MALFORMED, UNSUPPORTED_PROTO are configuration errors, and
#: LIMIT_REACHED is the operator's limit (tunnels per client or per token).
RETRYABLE = frozenset({ResultStatus.ADDRESS_IN_USE})
RETRY_BASE = 1.0
RETRY_CAP = 60.0
#: Request ids of background BINDs start here (the handshake's are small numbers).
RETRY_REQ_BASE = 1 << 20


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


@functools.lru_cache(maxsize=64)
def _literal_family(host: str) -> socket.AddressFamily | None:
    """AF_INET or AF_INET6 for an IP literal, None for a name (the dial target, parsed once)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def _dial(host: str, port: int) -> trio.SocketStream:
    """Connect to the local target; an IP literal skips ``open_tcp_stream``'s machinery.

    ``trio.open_tcp_stream`` (resolution, happy eyeballs: a nursery and a task per attempt)
    costs about as much CPU as the rest of a stream's setup; for an address it is not needed.
    """
    family = _literal_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    # What trio's ``socket.connect`` does for an address, without its resolution step.
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Error connecting to {(host, port)!r}: {os.strerror(err)}")
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


class RelayAddress(Protocol):
    """Where the relay is and how its identity is checked (client and visitor configs)."""

    @property
    def server_host(self) -> str: ...
    @property
    def server_port(self) -> int: ...
    @property
    def server_key(self) -> str: ...
    @property
    def fingerprint(self) -> str | None: ...
    @property
    def ca_file(self) -> Path | None: ...


async def connect_relay(
    config: RelayAddress,
    ssl_context: ssl.SSLContext,
    known_hosts: tls.KnownHosts,
    report: Callable[[str], None],
) -> tuple[trio.SSLStream[trio.SocketStream] | TLSStream, str]:
    """TCP connect, TLS handshake and relay identity check (pin, trust on first use or CA).

    Returns the TLS stream and the relay's fingerprint.

    Raises:
        IdentityMismatchError: The relay's certificate does not match.
        HandshakeError: The TLS handshake failed.
        OSError: The TCP connection failed.
    """
    try:
        tcp = await _dial_relay(config.server_host, config.server_port)
    except OSError as exc:
        raise _connect_error(exc, config.server_key) from None
    stream = wrap_tls(tcp, ssl_context, server_hostname=config.server_host)
    try:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            mismatch = tls.identity_error_from_exception(exc, config.server_key, config.ca_file)
            if mismatch is not None:
                raise mismatch from None
            if getattr(exc.__cause__, "reason", None) in _NOT_TLS_REASONS:
                raise NotARelayError(
                    f"{config.server_key} does not speak TLS — not a muxtunnel relay? (the "
                    f"TLS handshake got: {exc.__cause__.reason.lower().replace('_', ' ')}; "  # type: ignore[union-attr]
                    "check the port: a relay listens on 7835 unless its --listen says otherwise)"
                ) from None
            raise HandshakeError(
                f"TLS handshake with {config.server_key} failed: {exc.__cause__ or exc}"
            ) from None
        fingerprint = tls.verify_server(
            stream,
            config.server_key,
            config.fingerprint,
            config.ca_file,
            known_hosts,
            report,
        )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, fingerprint


async def _dial_relay(host: str, port: int) -> trio.SocketStream:
    """TCP connect to the relay: every address of ``host`` (happy eyeballs, :data:`DIAL_STAGGER`)
    within :data:`RELAY_DIAL_TIMEOUT` after the name is resolved.

    Raises:
        TimeoutError: No address answered in time (``errno.ETIMEDOUT``).
        OSError: Resolution failed, or every address failed (the first address's error).
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    targets = list(dict.fromkeys((info[0], info[4]) for info in infos))
    winner: list[trio.SocketStream] = []
    errors: list[OSError] = []

    async def attempt(family: socket.AddressFamily, address: Any, delay: float) -> None:
        await trio.sleep(delay)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        cap_retransmit_timeout(sock)  # resume soon after an outage (muxtunnel.netopts)
        try:
            await sock.connect(address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            return
        except BaseException:
            sock.close()
            raise
        if winner:
            sock.close()
            return
        winner.append(trio.SocketStream(sock))
        nursery.cancel_scope.cancel()

    with trio.move_on_after(RELAY_DIAL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i, (family, address) in enumerate(targets):
                nursery.start_soon(attempt, family, address, i * DIAL_STAGGER)
    if winner:
        return winner[0]
    if errors and len(errors) == len(targets):  # without trio's "error connecting to" prefix
        first = errors[0]
        raise OSError(first.errno, os.strerror(first.errno) if first.errno else str(first))
    raise TimeoutError(
        errno.ETIMEDOUT, f"no answer within {RELAY_DIAL_TIMEOUT:g} s (connection timed out)"
    )


def _no_answer(exc: BaseException) -> bool:
    """True if ``exc`` says nothing answered: the path failed, not the relay."""
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    return isinstance(exc, OSError) and exc.errno in _NO_ANSWER


#: ``ssl.SSLError.reason`` values meaning the peer's first bytes are not a TLS record.
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG"})


def _connect_error(exc: OSError, server_key: str) -> OSError:
    """The TCP connection to the relay failed: one line that says what to check."""
    cause = exc.__cause__
    leaves = list(cause.exceptions) if isinstance(cause, BaseExceptionGroup) else [exc]
    if leaves and all(isinstance(e, ConnectionRefusedError) for e in leaves):
        return ConnectionRefusedError(
            errno.ECONNREFUSED,
            f"cannot connect to relay {server_key}: connection refused — is the relay running "
            f"on {server_key}?",
        )
    if isinstance(exc, socket.gaierror):
        return OSError(
            exc.errno,
            f"cannot resolve the relay's host in {server_key}: {exc.strerror or exc} — "
            "check --server",
        )
    first = next((e for e in leaves if isinstance(e, OSError) and e.strerror), None)
    reason = first.strerror if first is not None and first.strerror else str(exc)
    return OSError(
        first.errno if first is not None else exc.errno,
        f"cannot connect to relay {server_key}: {reason.lower()}",
    )


def _open_fail_reason(exc: OSError) -> OpenFailReason:
    if isinstance(exc, socket.gaierror):
        return OpenFailReason.NAME_RESOLUTION_FAILED
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN):
        return OpenFailReason.UNREACHABLE
    if exc.errno == errno.ETIMEDOUT:
        return OpenFailReason.CONNECT_TIMEOUT
    return OpenFailReason.CONNECT_FAILED


def _bind_options(spec: TunnelSpec) -> BindOptions | None:
    """The BIND options of ``spec`` (protocol-spec.md §6.12), or None when it needs none (a
    plain tunnel then binds on relays of every minor version)."""
    if spec.visitors.empty and spec.private is None:
        return None
    # A private tunnel (NAME) has no public port: the relay records the name instead.
    return BindOptions(allow=spec.visitors.allow, deny=spec.visitors.deny, name=spec.private)


def _option_features(specs: Iterable[TunnelSpec]) -> str:
    """What the BIND options of ``specs`` ask the relay for, for an error message."""
    features = []
    if any(not spec.visitors.empty for spec in specs):
        features.append("visitor allow/deny lists")
    if any(spec.private is not None for spec in specs):
        features.append("private tunnels")
    return " or ".join(features) or "BIND options"


def _describe_tunnel(spec: TunnelSpec) -> str:
    """`` (allow ...; deny ...; PROXY v2)`` for the forwarding line, or ``""``."""
    notes = []
    if spec.visitors.allow:
        notes.append("allow " + ", ".join(map(str, spec.visitors.allow)))
    if spec.visitors.deny:
        notes.append("deny " + ", ".join(map(str, spec.visitors.deny)))
    if spec.proxy_protocol is not None:
        notes.append(f"PROXY protocol {spec.proxy_protocol}")
    return f" ({'; '.join(notes)})" if notes else ""


class _ProxyHeaderPolicy(StreamPolicy):
    """Wraps the user's policy; adds a PROXY protocol header to the prologue of the streams
    of tunnels that ask for one (``proxy_protocol``).

    :func:`muxtunnel.splice.splice` writes the prologue to the local service before it waits
    for the visitor's first byte, so services that speak first (SSH, SMTP, PostgreSQL's
    server side of the handshake) get the header too.
    """

    def __init__(self, inner: StreamPolicy, tunnel: Callable[[int], TunnelSpec | None]) -> None:
        self.inner = inner
        #: The spec of a tunnel that is up in the current session, by tunnel id.
        self.tunnel = tunnel

    def admit(self, info: StreamInfo) -> OpenFailReason | None:
        return self.inner.admit(info)

    def prologue(self, info: StreamInfo) -> bytes:
        prologue = self.inner.prologue(info)
        spec = self.tunnel(info.tunnel_id)
        if spec is None or spec.proxy_protocol is None:
            return prologue
        return encode_proxy_header(spec.proxy_protocol, info.origin, info.target) + prologue

    async def throttle(self, info: StreamInfo, direction: Direction, nbytes: int) -> None:
        await self.inner.throttle(info, direction, nbytes)

    def throttles(self, info: StreamInfo) -> bool:
        return self.inner.throttles(info)

    def finished(self, info: StreamInfo, now: float, error: str | None) -> None:
        self.inner.finished(info, now, error)


def _public_name(config: ClientConfig, spec: TunnelSpec, port: int) -> str:
    """How the stats name a tunnel: ``private:NAME`` or ``RELAY_HOST:PORT`` (``:auto`` for 0)."""
    if spec.private is not None:
        return f"private:{spec.private}"
    if not port:
        return f"{format_host_port(config.server_host, 1)[:-1]}auto"
    return format_host_port(config.server_host, port)


class _Client:
    def __init__(
        self,
        config: ClientConfig,
        report: Callable[[str], None],
        policy: StreamPolicy,
        stats: Stats | None = None,
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
        #: The session's extra connections that joined (protocol-spec.md §10.7).
        self.lanes: list[MuxConnection] = []
        self.ever_up = False
        #: The service manager (muxtunnel.sdnotify) and the status line it gets.
        self.notify = Notifier()
        self.status_line = f"connecting to relay {config.server_key}"
        #: What the admin endpoint and the console read (:mod:`muxtunnel.stats`): one session
        #: (the relay) and one tunnel per spec, kept across reconnects.
        self.stats = Stats("client") if stats is None else stats
        self.relay_stats = self.stats.add_session(
            config.server_key, rtt=lambda: None if self.conn is None else self.conn.rtt
        )
        self.relay_stats.state = "connecting"
        # Bytes the session holds for a replay after a resume (protocol-spec.md §10.6).
        self.relay_stats.replay = lambda: 0 if self.conn is None else self.conn.replay_size
        self.relay_stats.connections = lambda: (self.conn is not None) + len(self.lanes)
        # Background BINDs waiting for their RESULT, by req_id: _control_loop (the only reader
        # of control events once the session is up) hands each RESULT to its waiter.
        self.waiting: dict[int, tuple[trio.Event, list[ResultReceived]]] = {}
        self.next_req_id = RETRY_REQ_BASE
        for tid, spec in self.specs.items():
            self.relay_stats.add_tunnel(
                tid,
                _public_name(config, spec, spec.remote_port),
                format_host_port(spec.local_host, spec.local_port),
                state="down",
            )
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
        # The policy splice uses: the user's, plus PROXY headers only if some tunnel wants them.
        self.splice_policy = policy
        if any(spec.proxy_protocol is not None for spec in self.specs.values()):
            self.splice_policy = _ProxyHeaderPolicy(policy, lambda tid: self.up.get(tid))
        # Session resumption, per session: whether the session is being resumed now, why it
        # could not be (it then ends), and an error that ends the client (token revoked, wrong
        # relay identity) met while resuming.
        self.resuming = False
        self.resume_end: str | None = None
        self.resume_fatal: Exception | None = None
        self._resume_scope: trio.CancelScope | None = None

    async def connect(self) -> tuple[trio.SSLStream[trio.SocketStream] | TLSStream, str]:
        return await connect_relay(self.config, self.ssl_context, self.known_hosts, self.report)

    async def run_session(
        self,
        shutdown: trio.Event,
        on_up: Callable[[ClientInfo], None],
    ) -> bool | str:
        """One session; returns :data:`PEER_SILENT` if it ended because the relay fell silent
        (the keepalive timeout), else True (it got as far as authenticated)."""
        config = self.config
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream, fingerprint = await self.connect()
        session = self._new_session()
        conn = MuxConnection(
            stream,
            session,
            name=f"relay {config.server_key}",
            stall_timeout=config.stall_timeout,
        )
        conn.on_rtt = self.stats.observe_rtt
        conn.on_stall = partial(self.stats.count, "stalls")
        self.conn = conn
        self.up = {}
        self.refused = {}
        self.waiting = {}
        self.relay_stats.state = "connecting"
        self.relay_stats.retry_at = None
        self.resuming = False
        self.resume_end = None
        self.resume_fatal = None
        authenticated = False
        body_error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                nursery.start_soon(self._watch_shutdown, conn, shutdown)
                # From the start: the ticket comes right after RESULT(OK) for the AUTH, so a
                # loss while the BIND answers are still on their way is resumed too.
                nursery.start_soon(self._keep_session, conn, shutdown)
                try:
                    # Explicit ports first: a port the relay picks for an auto tunnel can then
                    # never be one that a later BIND of ours asks for by number.
                    binds = sorted(
                        (
                            (tid, self.remembered[tid], _bind_options(spec))
                            for tid, spec in self.specs.items()
                        ),
                        key=lambda bind: bind[1] == 0,
                    )
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        try:
                            outcomes = await client_handshake(conn, config.token, binds)
                        except ValueError:
                            # Session.send_bind refuses options a minor-0 relay would not
                            # understand: never bind those tunnels without their restriction.
                            if conn.minor >= 1 or all(b[2] is None for b in binds):
                                raise
                            raise TunnelError(
                                f"the relay at {config.server_key} does not support "
                                f"{_option_features(self.specs.values())} "
                                f"(protocol 1.{conn.minor}); upgrade it"
                            ) from None
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
                    pending: list[int] = []
                    for outcome in sorted(outcomes, key=lambda o: o.tunnel_id):
                        spec = self.specs[outcome.tunnel_id]
                        if outcome.ok and outcome.bound is not None:
                            self.up[outcome.tunnel_id] = spec
                            self.remembered[outcome.tunnel_id] = outcome.bound.port
                            bound.append(BoundTunnel(spec, outcome.tunnel_id, outcome.bound.port))
                            self._report_up(spec, outcome.bound.port)
                        elif outcome.status in RETRYABLE:
                            pending.append(outcome.tunnel_id)
                            logger.warning(
                                "%s: %s: %s; retrying in the background",
                                self._refused(outcome.tunnel_id, outcome.requested),
                                outcome.status_name,
                                peer_text(outcome.message),
                            )
                        elif spec.private is not None:
                            logger.error(
                                "private tunnel %s: the relay refused it: %s: %s",
                                spec.private,
                                outcome.status_name,
                                peer_text(outcome.message),
                            )
                        else:
                            logger.error(
                                "tunnel %s: the relay refused remote port %d: %s: %s",
                                spec,
                                outcome.requested,
                                outcome.status_name,
                                peer_text(outcome.message),
                            )
                    self._record_binds(outcomes)
                    if not bound and not pending and not self.ever_up:
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
                    self.status_line = (
                        f"connected to relay {config.server_key}: "
                        f"{len(bound)} of {len(self.specs)} tunnels up"
                        + (f", {len(pending)} pending" if pending else "")
                    )
                    self.notify.ready(self.status_line)
                    on_up(ClientInfo(fingerprint, tuple(bound)))
                    nursery.start_soon(self._control_loop, conn)
                    if config.connections > 1:
                        nursery.start_soon(self._extra_connections, conn, shutdown)
                    self.relay_stats.state = "up"
                    for tid in pending:
                        nursery.start_soon(self._retry_bind, conn, tid)
                    while True:
                        mux = await conn.accept_stream()
                        nursery.start_soon(self._serve_stream, mux)
                except MuxSessionClosedError:
                    pass
                except Exception as exc:  # re-raised below, outside the nursery (no ExceptionGroup)
                    body_error = exc
                finally:
                    await _close_within_grace(conn)
                    nursery.cancel_scope.cancel()
        finally:
            self.conn = None
            self.up = {}
            self._resume_scope = None
            self._tunnels_down(f"disconnected: {_inert(conn.close_reason or 'closed')}")
            self._summarize_refusals(conn)
            self.status_line = f"reconnecting to relay {config.server_key}"
        if body_error is not None:
            raise body_error
        if self.resume_fatal is not None:
            raise self.resume_fatal
        if not authenticated:
            raise HandshakeError(
                f"relay {config.server_key} ended the session: {conn.close_reason}"
            )
        if conn.close_code == ErrorCode.AUTH_FAILED and not shutdown.is_set():
            # The relay's reload removed our token (muxtunnel.reload): retrying cannot help.
            raise AuthError(
                f"relay {config.server_key} revoked the token: {_inert(conn.close_reason)}"
            )
        if shutdown.is_set():
            logger.info("disconnected from relay %s", config.server_key)
            return True
        if self.resuming and self.resume_end is None:  # our resume window passed
            self.resume_end = _inert(conn.close_reason or "the resume window passed")
        logger.warning(
            "session with relay %s ended: %s",
            config.server_key,
            self.resume_end or _inert(conn.close_reason),
        )
        if self.resume_end is not None:
            return RESUME_ENDED
        # Our keepalive's verdict (nothing received for the idle timeout), not a relay's
        # CLOSE(TIMEOUT): a relay that ends sessions itself keeps the full backoff.
        idle = conn.idle_timeout
        silent = idle is not None and trio.current_time() - conn.last_receive >= idle
        return PEER_SILENT if conn.close_code == ErrorCode.TIMEOUT and silent else True

    def _record_binds(self, outcomes: Iterable[BindOutcome], *, counted: bool = True) -> None:
        """Stats: each tunnel up (with its public address), pending (refused for a reason that
        can pass: retried) or down with the relay's reason."""
        if counted:  # a new session's BINDs (not a background retry)
            if self.ever_up:
                self.stats.count("reconnects")
            self.relay_stats.since = self.stats.clock()
        for outcome in outcomes:
            ts = self.relay_stats.tunnels.get(outcome.tunnel_id)
            if ts is None:
                continue
            if outcome.ok and outcome.bound is not None:
                spec = self.specs[outcome.tunnel_id]
                ts.public = _public_name(self.config, spec, outcome.bound.port)
                ts.set_state("up")
                ts.last_error = None
            else:
                ts.set_state(
                    "pending" if outcome.status in RETRYABLE else "down",
                    f"{outcome.status_name}: {peer_text(outcome.message)}",
                )

    def _tunnels_down(self, why: str, tunnel_id: int | None = None) -> None:
        """Stats: tunnels that were up (all, or ``tunnel_id``) are down now, for ``why``."""
        for tid, ts in self.relay_stats.tunnels.items():
            if (tunnel_id is None or tid == tunnel_id) and ts.state != "down":
                ts.set_state("down", why)

    def _count_refusal(self, tunnel_id: int, reason: str) -> None:
        ts = self.relay_stats.tunnels.get(tunnel_id)
        if ts is not None:
            ts.refuse(reason)

    async def _rebind(self, conn: MuxConnection, tunnel_ids: list[int]) -> list[BindOutcome]:
        base = 1000
        for i, tid in enumerate(tunnel_ids):
            options = _bind_options(self.specs[tid])
            if options is None:
                conn.send_bind(base + i, tid, Address(None, 0))
            else:
                conn.send_bind(base + i, tid, Address(None, 0), options=options)
        results: list[BindOutcome] = []
        while len(results) < len(tunnel_ids):
            event = await conn.next_control_event()
            if isinstance(event, ResultReceived) and base <= event.req_id < base + len(tunnel_ids):
                tid = tunnel_ids[event.req_id - base]
                results.append(BindOutcome(tid, 0, int(event.status), event.message, event.bound))
        return results

    def retrying(self, delay: float) -> None:
        """Stats: the session is down and the next attempt is ``delay`` seconds away."""
        self.relay_stats.state = "reconnecting"
        self.relay_stats.retry_at = self.stats.clock() + delay

    def _spec_name(self, tunnel_id: int, port: int) -> str:
        """``tunnel SPEC (remote port N)`` or ``private tunnel NAME`` for a log line."""
        spec = self.specs[tunnel_id]
        if spec.private is not None:
            return f"private tunnel {spec.private}"
        return f"tunnel {spec} (remote port {port})"

    def _refused(self, tunnel_id: int, port: int) -> str:
        """The start of a refusal's log line, as for the refusals of the handshake."""
        spec = self.specs[tunnel_id]
        if spec.private is not None:
            return f"private tunnel {spec.private}: the relay refused it"
        return f"tunnel {spec}: the relay refused remote port {port}"

    def _report_up(self, spec: TunnelSpec, port: int) -> None:
        """The ``forwarding ...`` (or ``private tunnel ...``) line for a tunnel that is up."""
        local = format_host_port(spec.local_host, spec.local_port)
        if spec.private is not None:
            self.report(f"private tunnel {spec.private} -> {local}" + _describe_tunnel(spec))
        else:
            self.report(
                f"forwarding tcp://{format_host_port(self.config.server_host, port)} -> {local}"
                + _describe_tunnel(spec)
            )

    async def _retry_bind(self, conn: MuxConnection, tunnel_id: int) -> None:
        """BIND tunnel ``tunnel_id`` again and again (backoff RETRY_BASE..RETRY_CAP, jittered)
        until the relay accepts it, refuses it for a reason that cannot pass, or the session
        ends. Its RESULT comes through :meth:`_control_loop`, matched by req_id."""
        spec = self.specs[tunnel_id]
        ts = self.relay_stats.tunnels.get(tunnel_id)
        attempt = 0
        while True:
            delay = min(RETRY_CAP, RETRY_BASE * 2**attempt) * random.uniform(0.75, 1.0)
            attempt += 1
            await trio.sleep(delay)
            if not conn.usable:
                return
            port = self.remembered[tunnel_id]
            req_id = self.next_req_id
            self.next_req_id += 1
            done = trio.Event()
            answer: list[ResultReceived] = []
            self.waiting[req_id] = (done, answer)
            options = _bind_options(spec)
            # As in the handshake (muxtunnel.handshake): port 0 has no host.
            bind = Address(None, 0) if port == 0 else Address("0.0.0.0", port)
            try:
                if options is None:
                    conn.send_bind(req_id, tunnel_id, bind)
                else:
                    conn.send_bind(req_id, tunnel_id, bind, options=options)
            except (SessionClosedError, ValueError) as exc:
                # The session is closing (the next one binds again), or the BIND cannot be
                # sent at all (the handshake sent the same one): stop retrying.
                self.waiting.pop(req_id, None)
                if ts is not None and not isinstance(exc, SessionClosedError):
                    ts.set_state("down", _inert(str(exc)))
                return
            # No timeout of our own: a BIND asked again before its RESULT could meet our own
            # lease (DUPLICATE_TUNNEL); a silent relay is the keepalive's business, and the
            # end of the session cancels this task.
            await done.wait()
            event = answer[0]
            outcome = BindOutcome(tunnel_id, port, int(event.status), event.message, event.bound)
            if outcome.ok and outcome.bound is not None:
                self.up[tunnel_id] = spec
                self.remembered[tunnel_id] = outcome.bound.port
                self._record_binds([outcome], counted=False)
                logger.info("%s is up after %d retries", self._spec_name(tunnel_id, port), attempt)
                self._report_up(spec, outcome.bound.port)
                self.status_line = (
                    f"connected to relay {self.config.server_key}: "
                    f"{len(self.up)} of {len(self.specs)} tunnels up"
                )
                self.notify.status(self.status_line)
                return
            reason = f"{outcome.status_name}: {peer_text(outcome.message)}"
            if outcome.status not in RETRYABLE:
                logger.error("%s: %s", self._refused(tunnel_id, port), reason)
                if ts is not None:
                    ts.set_state("down", reason)
                return
            logger.debug("%s: still refused: %s", self._spec_name(tunnel_id, port), reason)
            if ts is not None:
                ts.set_state("pending", reason)

    async def _watch_shutdown(self, conn: MuxConnection, shutdown: trio.Event) -> None:
        await shutdown.wait()
        if self.active_streams and conn.usable and not conn.suspended:
            # GOAWAY: the relay sends no new visitors; open streams get DRAIN_TIMEOUT to finish.
            conn.go_away(ErrorCode.NO_ERROR, "client shutting down")
            logger.info(
                "draining %d open streams for up to %.0f s", self.active_streams, DRAIN_TIMEOUT
            )
            with trio.move_on_after(DRAIN_TIMEOUT):
                # A loss now ends the session (_keep_session: no resume after shutdown).
                while self.active_streams:
                    await self._idle.wait()
        # Not while resuming: there is no relay to drain to, and no new connection is wanted.
        if self._resume_scope is not None:
            self._resume_scope.cancel()
        conn.close(ErrorCode.NO_ERROR, "client shutting down")

    async def _keep_session(self, conn: MuxConnection, shutdown: trio.Event) -> None:
        """Resume the session each time its connection is lost (protocol-spec.md §10.6).

        The connection suspends the session itself when its transport fails while it holds a
        ticket, and ends it when the resume window passes; without resumption this task only
        waits.
        """
        while not conn.closed:
            await conn.wait_suspended()
            if conn.closed or not conn.suspended:
                await trio.lowlevel.checkpoint()
                continue
            if shutdown.is_set():
                conn.close(ErrorCode.NO_ERROR, "client shutting down")
                return
            await self._resume(conn)
            await self._move_back(conn)

    async def _resume(self, conn: MuxConnection) -> None:
        """Dial the relay again and again (at once, then every PATH_RETRY_CAP at most) and resume
        the suspended session over the first connection that works; give up on a refusal."""
        key = self.config.server_key
        lost_at = trio.current_time()
        deadline = conn.resume_deadline
        reason = conn.lost_reason
        logger.warning(
            "connection to relay %s lost%s; resuming the session (for up to %.0f s)",
            key,
            f" ({_inert(reason)})" if reason else "",
            max(0.0, (deadline if deadline is not None else lost_at) - lost_at),
        )
        self.resuming = True
        state = self.relay_stats.state  # "up", or "connecting" during the handshake
        self.relay_stats.state = "resuming"
        self.relay_stats.retry_at = None
        up_line = self.status_line
        self.status_line = f"resuming the session with relay {key}"
        self.notify.status(self.status_line)
        self.stats.count("suspensions")
        attempts = 0
        last_text: str | None = None
        with trio.CancelScope() as scope:
            self._resume_scope = scope
            while _waiting(conn):
                attempts += 1
                started = trio.current_time()
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        # The same identity checks as a new session; the connection owns the
                        # stream from resume_over() on (it aborts it on failure).
                        # Every other attempt, the first included, goes over another
                        # connection of the session if one is up (protocol-spec.md §10.7).
                        conn.carried = False
                        stream = await self._dial_for_resume(conn, attempts % 2 == 1)
                        await conn.resume_over(
                            stream, partial(client_credential, self.config.token)
                        )
                except ResumeRefusedError as exc:
                    # The relay answered: the session is gone there (restart, window, offsets).
                    self.resume_end = _describe(exc)
                    self.stats.count("resume_refusals")
                    return
                except (AuthError, IdentityMismatchError) as exc:
                    # The token was revoked, or this is not our relay any more: never retried.
                    self.resume_fatal = (
                        AuthError(f"relay {key} revoked the token: {_describe(exc)}")
                        if isinstance(exc, AuthError)
                        else exc
                    )
                    conn.close(ErrorCode.NO_ERROR, "cannot resume: " + _describe(exc))
                    return
                except (
                    OSError,
                    trio.BrokenResourceError,
                    trio.TooSlowError,
                    MuxtunnelError,
                ) as exc:
                    if not conn.suspended and not conn.closed:
                        # Our timeout struck just after RESUMED: the session is resumed.
                        self._resumed(conn, key, lost_at, up_line, state)
                        return
                    text = _describe(exc)
                    logger.log(
                        logging.INFO if text != last_text else logging.DEBUG,
                        "resuming the session with relay %s: attempt %d failed: %s",
                        key,
                        attempts,
                        text,
                    )
                    last_text = text
                else:
                    self._resumed(conn, key, lost_at, up_line, state)
                    return
                # At once, then every PATH_RETRY_CAP at most (jittered) from the previous start:
                # like a lost path (PEER_SILENT), an attempt costs the relay little.
                await trio.sleep_until(started + PATH_RETRY_CAP * random.uniform(0.5, 1.0))

    def _resumed(
        self, conn: MuxConnection, key: str, lost_at: float, up_line: str, state: str
    ) -> None:
        """The session lost at ``lost_at`` is resumed: count, log, and show the status line and
        state it had before the loss again."""
        self.resuming = False
        self.stats.count("resumes")
        self.relay_stats.resumes += 1
        continuing = conn.statistics().get("adapter_streams", 0)
        logger.info(
            "session with relay %s resumed%s after %.1f s: %d streams continued",
            key,
            " over another connection of the session" if conn.carried else "",
            trio.current_time() - lost_at,
            continuing,
        )
        self.relay_stats.state = state
        self.status_line = up_line
        self.notify.status(self.status_line)

    # -- extra connections of the session (protocol-spec.md §10.7) ---------------------------

    async def _extra_connections(self, primary: MuxConnection, shutdown: trio.Event) -> None:
        """Run the session's extra connections (``--connections``) until the session ends."""
        key = self.config.server_key
        wanted = self.config.connections
        if not primary.resumable or primary.max_connections < 2:
            logger.warning(
                "relay %s takes one connection per session%s: running on one, not %d",
                key,
                "" if primary.resumable else " without resumption",
                wanted,
            )
            return
        count = min(wanted, primary.max_connections)
        if count < wanted:
            logger.warning(
                "relay %s takes at most %d connections per session: running on %d, not %d",
                key,
                primary.max_connections,
                count,
                wanted,
            )
        async with trio.open_nursery() as nursery:
            for number in range(2, count + 1):
                nursery.start_soon(self._lane_loop, primary, number, shutdown)

    async def _lane_loop(self, primary: MuxConnection, number: int, shutdown: trio.Event) -> None:
        """Keep extra connection ``number`` of the session: join, serve its streams, resume it
        when it drops, join afresh when its resume is refused; give up on a refused JOIN."""
        key = self.config.server_key
        failures = 0
        while not primary.closed and not shutdown.is_set():
            if failures:
                await trio.sleep(min(self.config.backoff_cap, PATH_RETRY_CAP * failures))
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    stream, _fingerprint = await self.connect()
            except (OSError, trio.TooSlowError, MuxtunnelError) as exc:
                failures += 1
                logger.info("connection %d to relay %s failed: %s", number, key, _describe(exc))
                continue
            lane = MuxConnection(
                stream,
                self._new_session(),
                name=f"relay {key} connection {number}",
                stall_timeout=self.config.stall_timeout,
            )
            lane.on_rtt = self.stats.observe_rtt
            lane.on_stall = partial(self.stats.count, "stalls")
            lane.share_binds(primary)
            outcome = await self._run_lane(primary, lane, number, shutdown)
            if outcome == "refused" or lane.close_code == ErrorCode.AUTH_FAILED:
                return  # the relay answered: no retry can change its mind
            failures = 0 if outcome == "joined" else failures + 1

    def _new_session(self) -> Session:
        config = self.config
        return make_session(
            Role.CLIENT,
            idle_timeout=config.keepalive_timeout,
            open_rate=config.max_open_rate,
            settings_overrides=_resume_settings(config.resume_window),
        )

    async def _run_lane(
        self, primary: MuxConnection, lane: MuxConnection, number: int, shutdown: trio.Event
    ) -> str:
        """Join ``lane`` to the session and serve it until it ends: ``"joined"``, ``"refused"``
        (the relay refused the JOIN or the token) or ``"failed"``."""
        key = self.config.server_key
        joined = False
        refused = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(lane.run)
                try:
                    ticket = primary.ticket
                    if ticket is None:
                        raise HandshakeError("the session has no ticket")
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        await client_handshake(lane, self.config.token, [], join=ticket)
                    joined = True
                    self.lanes.append(lane)
                    logger.info("connection %d to relay %s joined the session", number, key)
                    nursery.start_soon(self._keep_lane, primary, lane, shutdown)
                    while True:
                        mux = await lane.accept_stream()
                        nursery.start_soon(self._serve_stream, mux)
                except MuxSessionClosedError:
                    pass
                except JoinRefusedError as exc:
                    if exc.status == ResultStatus.TICKET_UNKNOWN:
                        # The ticket may have been rotated by a resume meanwhile: try again.
                        logger.info("connection %d to relay %s: %s", number, key, exc)
                    else:
                        # The relay takes no more connections for this session.
                        logger.warning("connection %d to relay %s: %s", number, key, exc)
                        refused = True
                except (HandshakeError, trio.TooSlowError) as exc:
                    logger.info(
                        "connection %d to relay %s: handshake failed: %s",
                        number,
                        key,
                        _describe(exc),
                    )
                finally:
                    if lane in self.lanes:
                        self.lanes.remove(lane)
                    await _close_within_grace(lane)
                    nursery.cancel_scope.cancel()
        finally:
            if joined:
                logger.info(
                    "connection %d to relay %s ended: %s",
                    number,
                    key,
                    _inert(lane.close_reason or "closed"),
                )
        return "refused" if refused else "joined" if joined else "failed"

    async def _keep_lane(
        self, primary: MuxConnection, lane: MuxConnection, shutdown: trio.Event
    ) -> None:
        """Resume ``lane`` each time its connection is lost, while the session lives."""
        while not lane.closed:
            await lane.wait_suspended()
            if lane.closed or not lane.suspended:
                await trio.lowlevel.checkpoint()
                continue
            if shutdown.is_set() or primary.closed:
                lane.close(ErrorCode.NO_ERROR, "client shutting down")
                return
            await self._resume_lane(lane)
            await self._move_back(lane)

    def _carrier_for(self, lost: MuxConnection) -> MuxConnection | None:
        """A connection of the session, other than ``lost``, that is up on a transport of its
        own and can open a stream: the one a lost connection resumes over first (§10.7)."""
        for conn in (self.conn, *self.lanes):
            if conn is None or conn is lost:
                continue
            if not conn.suspended and not conn.carried and conn.open_slot_available():
                return conn
        return None

    async def _dial_for_resume(self, lost: MuxConnection, carry: bool) -> trio.abc.Stream:
        """The transport to resume ``lost`` over: a carrier stream on another connection of
        the session (``carry`` and one is up), else a new TLS connection to the relay."""
        carrier = self._carrier_for(lost) if carry else None
        if carrier is None:
            stream, _fingerprint = await self.connect()
            return stream
        mux = carrier.open_stream(CARRIER_TUNNEL, _NO_ADDRESS, _NO_ADDRESS)
        try:
            await mux.wait_opened()
        except BaseException:
            _abort(mux)
            raise
        lost.carried = True
        return mux

    async def _move_back(self, conn: MuxConnection) -> None:
        """``conn`` runs carried on another connection: give it a TLS connection of its own
        again (after PATH_RETRY_CAP, then every PATH_RETRY_CAP at most). Returns when it has
        one, or once it is suspended or closed (resumed as usual then)."""
        while conn.carried and _up(conn):
            await trio.sleep(PATH_RETRY_CAP * random.uniform(0.5, 1.0))
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    stream, _fingerprint = await self.connect()
                    if not _up(conn):
                        await trio.aclose_forcefully(stream)
                        return
                    conn.carried = False
                    await conn.resume_over(stream, partial(client_credential, self.config.token))
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, MuxtunnelError) as exc:
                logger.debug("%s: no connection of its own yet: %s", conn.name, _describe(exc))
                continue
            logger.info("%s runs on a connection of its own again", conn.name)

    async def _resume_lane(self, lane: MuxConnection) -> None:
        """Resume the suspended ``lane``: over another connection of the session first, else
        over a new connection (at once, then every PATH_RETRY_CAP at most); a refusal ends it
        (its streams end, a fresh one joins)."""
        key = self.config.server_key
        lost_at = trio.current_time()
        logger.info("%s lost (%s); resuming it", lane.name, _inert(lane.lost_reason or "no reason"))
        carry = True
        while _waiting(lane):
            started = trio.current_time()
            lane.carried = False
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    stream = await self._dial_for_resume(lane, carry)
                    await lane.resume_over(stream, partial(client_credential, self.config.token))
            except ResumeRefusedError as exc:
                lane.close(ErrorCode.NO_ERROR, _describe(exc))
                return
            except (AuthError, IdentityMismatchError) as exc:
                lane.close(ErrorCode.NO_ERROR, "cannot resume: " + _describe(exc))
                return
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, MuxtunnelError) as exc:
                if not lane.suspended and not lane.closed:
                    break
                logger.debug("resuming %s (relay %s) failed: %s", lane.name, key, _describe(exc))
                if lane.carried:
                    carry = False  # the carried attempt failed: a new connection at once
                    continue
            else:
                break
            carry = True
            await trio.sleep_until(started + PATH_RETRY_CAP * random.uniform(0.5, 1.0))
        if not lane.closed and not lane.suspended:
            self.stats.count("resumes")
            logger.info(
                "%s resumed%s after %.1f s: %d streams continued",
                lane.name,
                " over another connection of the session" if lane.carried else "",
                trio.current_time() - lost_at,
                lane.stream_count,
            )

    async def _control_loop(self, conn: MuxConnection) -> None:
        """Log what the relay announces; anything unexpected (a RESULT nobody asked for, a
        second CHALLENGE ...) is ignored."""
        while True:
            try:
                event = await conn.next_control_event()
            except MuxSessionClosedError:
                return
            if isinstance(event, ResultReceived):
                waiter = self.waiting.pop(event.req_id, None)
                if waiter is not None:
                    waiter[1].append(event)
                    waiter[0].set()
            elif isinstance(event, UnbindReceived):
                spec = self.up.pop(event.tunnel_id, None)
                self._tunnels_down(
                    f"revoked by the relay ({peer_text(event.error_code.name)})", event.tunnel_id
                )
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
        self.stats.count(f"open_failures:{reason.name}")
        if count == 1:
            logger.warning("%s (further ones in this session are only counted)", first)
        log_unopened(
            "client",
            self._access_tunnel(mux.info.tunnel_id),
            mux.info.origin,
            f"{reason.name}: {detail}",
            stream=mux.stream_id,
        )
        _reject(mux, reason, detail)

    def _access_tunnel(self, tunnel_id: int) -> str:
        """A tunnel in the access log: ``RELAY:PORT -> LOCAL`` (``private:NAME -> LOCAL``)."""
        spec = self.specs.get(tunnel_id)
        if spec is None:
            return f"tunnel {tunnel_id}"
        public = (
            f"private:{spec.private}"
            if spec.private is not None
            else format_host_port(self.config.server_host, self.remembered.get(tunnel_id, 0))
        )
        return f"{public} -> {format_host_port(spec.local_host, spec.local_port)}"

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
                f"connect to {target} failed: {_os_error_text(exc)}",
            )
        if tcp is None:
            assert reason is not None
            log_unopened(
                "client",
                self._access_tunnel(mux.info.tunnel_id),
                mux.info.origin,
                detail,
                end="dial_timeout" if reason == OpenFailReason.CONNECT_TIMEOUT else "dial_failed",
                level=logging.WARNING,
                local=target,
                duration=mux.info.duration(trio.current_time()),
                stream=mux.stream_id,
            )
            _reject(mux, reason, detail)
            timeout = reason == OpenFailReason.CONNECT_TIMEOUT
            self._count_refusal(mux.info.tunnel_id, "dial_timeout" if timeout else "dial_failed")
            self.stats.count(f"dial_failures:{reason.name}")
            return
        if logger.isEnabledFor(logging.DEBUG):
            origin = peer_text(mux.info.origin)
            logger.debug("stream %d opened: visitor %s -> %s", mux.stream_id, origin, target)
        try:
            mux.accept()
        except trio.BrokenResourceError:  # reset by the relay (or the session ended) meanwhile
            await trio.aclose_forcefully(tcp)
            return
        self.active_streams += 1
        if self.active_streams == 1:
            self._idle = trio.Event()
        ts = self.relay_stats.tunnels.get(mux.info.tunnel_id)
        if ts is not None:
            ts.stream_opened(mux.info)
        result: SpliceResult | None = None
        try:
            result = await splice(tcp, mux, policy=self.splice_policy)
        finally:
            if ts is not None:
                ts.stream_closed(mux.info, outcome_of(result))
            self.active_streams -= 1
            if not self.active_streams:
                self._idle.set()
            # The access log line (muxtunnel.accesslog); None: cancelled (shutdown).
            log_splice(
                "client",
                mux.info,
                self._access_tunnel(mux.info.tunnel_id),
                result,
                trio.current_time(),
                local=target,
            )


def _waiting(conn: MuxConnection) -> bool:
    """True while ``conn``'s session is suspended and waits for a resume."""
    return conn.suspended and not conn.closed


def _resume_settings(window: float) -> dict[str, int] | None:
    """The HELLO settings declaring our resume window (whole seconds; 0: resumption off)."""
    if window <= 0:
        return None
    return {"resume_window": min(MAX_RESUME_WINDOW, max(1, math.ceil(window)))}


def _os_error_text(exc: OSError) -> str:
    """``Connection refused``: the system's text for the error, without the address trio adds
    (``Error connecting to ('127.0.0.1', 22): ...``); the target is named by the caller."""
    if exc.errno is not None and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return str(exc.strerror or exc)


def _error_text(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, or of the errors inside an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_error_text(sub) for sub in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _reject(mux: MuxStream, reason: OpenFailReason, detail: str) -> None:
    """OPEN_FAIL for ``mux``, unless it already failed (reset by the relay, session ended)."""
    if mux.failure is None:
        mux.reject(reason, detail)


async def _close_within_grace(conn: MuxConnection) -> None:
    """Close ``conn`` (CLOSE(NO_ERROR) unless closed already) and wait for the end, bounded."""
    if not conn.closed:
        conn.close(ErrorCode.NO_ERROR, "client shutting down")
    with trio.move_on_after(CLOSE_GRACE + 1):
        await conn.wait_closed()


def _up(conn: MuxConnection) -> bool:
    """True while ``conn`` has a transport (not suspended) and is not closed."""
    return not conn.suspended and not conn.closed


#: Origin and target of a carrier stream's OPEN (protocol-spec.md §10.7): none.
_NO_ADDRESS = Address(None, 0)


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
    handle_signals: bool = False,
    stats: Stats | None = None,
    task_status: trio.TaskStatus[ClientInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the client until ``shutdown`` is set, reconnecting after failures.

    ``task_status.started`` gets a :class:`ClientInfo` once the first session is up. A service
    manager's ``$NOTIFY_SOCKET`` gets READY (each session up), STATUS, WATCHDOG and STOPPING
    (:mod:`muxtunnel.sdnotify`); with ``handle_signals``, SIGHUP and SIGUSR1 are logged
    (:func:`muxtunnel.reload.client_signals`). ``stats`` (default: a new one) is what the admin
    endpoint (``config.admin``, :mod:`muxtunnel.admin`) and the console read.

    Raises:
        AuthError: The relay refused the token (never retried).
        IdentityMismatchError: The relay's certificate does not match (never retried).
        SessionClosedError: ``max_retries`` consecutive attempts failed.
    """
    shutdown = trio.Event() if shutdown is None else shutdown
    client = _Client(config, report, policy, stats)
    error: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.notify.run, lambda: client.status_line, shutdown)
            if handle_signals:
                nursery.start_soon(client_signals, lambda: client.status_line)
            if config.metrics is not None:  # the Prometheus endpoint (muxtunnel.metrics)
                from muxtunnel.metrics import serve_metrics

                await nursery.start(serve_metrics, config.metrics, client.stats)
            admin = resolve_admin(config.admin, config.state_dir, "client")
            if admin is not None:  # the status endpoint (muxtunnel.admin)
                relay = {"relay": config.server_key}
                default = config.admin == ADMIN_AUTO
                await nursery.start(
                    partial(serve_admin, admin, client.stats, relay, default=default)
                )
            try:
                await reconnect(
                    client.run_session,
                    server_key=config.server_key,
                    max_retries=config.max_retries,
                    backoff_cap=config.backoff_cap,
                    shutdown=shutdown,
                    task_status=task_status,
                    on_retry=client.retrying,
                )
            except Exception as exc:  # re-raised below, outside the nursery (no ExceptionGroup)
                error = exc
            nursery.cancel_scope.cancel()
    finally:
        client.relay_stats.state = "down"
        client.relay_stats.retry_at = None
        client.notify.close()
    if error is not None:
        raise error


async def reconnect(
    run_session: Callable[[trio.Event, Callable[[_T], None]], Awaitable[object]],
    *,
    server_key: str,
    max_retries: int | None,
    backoff_cap: float,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[_T],
    on_retry: Callable[[float], None] | None = None,
) -> None:
    """Run ``run_session(shutdown, on_up)`` again and again until ``shutdown`` is set.

    A session calls ``on_up(info)`` once it is up; the first ``info`` goes to
    ``task_status.started``. Failed attempts back off exponentially with jitter (capped at
    ``backoff_cap``); so do sessions that end within ``STABLE_SESSION`` of coming up. After an
    attempt nothing answered (:func:`_no_answer`) or a session that returned
    :data:`PEER_SILENT`, the wait is capped at :data:`PATH_RETRY_CAP` instead. After a session
    that returned :data:`RESUME_ENDED` (it was lost and could not be resumed: the relay answered,
    or the resume attempts already waited out the window), the next one starts at once.

    Raises:
        AuthError, IdentityMismatchError, ConfigError, TunnelError: From a session (never
            retried).
        NotARelayError: The relay address does not speak TLS and no session was ever up.
        SessionClosedError: ``max_retries`` consecutive attempts failed.

    A failure that repeats the previous one is logged at DEBUG, with an INFO count after 10,
    100, 1000 ... attempts in a row.
    """
    started = False
    failures = 0
    # Sessions in a row that ended within STABLE_SESSION of coming up: a relay that accepts
    # and then drops us at once gets the same growing backoff as one that refuses us.
    flaps = 0
    up_at: list[float] = []  # when the current attempt's session came up (set by on_up)
    last_text: str | None = None  # the previous attempt's failure, and how often in a row
    repeats = 0

    def on_up(info: _T) -> None:
        nonlocal started, failures
        failures = 0
        up_at[:] = [trio.current_time()]
        if not started:
            started = True
            task_status.started(info)

    while not shutdown.is_set():
        error: BaseException | None = None
        up_at.clear()
        path_lost = False
        fresh = False
        try:
            result = await run_session(shutdown, on_up)
            path_lost = result == PEER_SILENT
            fresh = result == RESUME_ENDED
        except (AuthError, IdentityMismatchError, ConfigError, TunnelError):
            raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, MuxtunnelError) as exc:
            if isinstance(exc, NotARelayError) and not started:
                raise  # a wrong --server from the start: retrying cannot help
            error = exc
            path_lost = _no_answer(exc)
            text = _describe(exc)
            repeats = repeats + 1 if text == last_text and not up_at else 1
            last_text = text
            where = "" if server_key in text else f"relay {server_key}: "
            if repeats == 1:
                logger.warning("%s%s", where, text)
            else:  # the same failure again: a count now and then, not a warning each time
                logger.log(
                    logging.INFO if _is_power_of_ten(repeats) else logging.DEBUG,
                    "%s%s (%d attempts in a row)",
                    where,
                    text,
                    repeats,
                )
        else:
            last_text, repeats = None, 0
        if shutdown.is_set():
            break
        if up_at:
            flaps = flaps + 1 if trio.current_time() - up_at[0] < STABLE_SESSION else 0
        failures += 1
        if max_retries is not None and failures > max_retries:
            raise SessionClosedError(
                f"giving up on relay {server_key} after {failures} failed attempt"
                + ("s" if failures != 1 else "")
                + (f": {_describe(error)}" if error is not None else "")
            )
        if fresh:
            logger.info("starting a new session with relay %s", server_key)
            continue
        delay = min(backoff_cap, BACKOFF_BASE * 2 ** (max(failures, flaps) - 1))
        if path_lost:  # nothing reached the relay: no load to spare it, try again soon
            delay = min(delay, PATH_RETRY_CAP)
        delay *= random.uniform(0.5, 1.0)
        logger.log(
            logging.DEBUG if repeats > 1 else logging.INFO,
            "reconnecting to %s in %.1f s",
            server_key,
            delay,
        )
        if on_retry is not None:
            on_retry(delay)
        with trio.move_on_after(delay):
            await shutdown.wait()


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


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
