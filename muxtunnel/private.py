"""Private tunnels on the relay: published under a name, reached only through ``muxtunnel visit``.

A client publishes a tunnel with BIND option NAME (protocol-spec.md §6.12): the relay opens no
public listener, it records ``NAME -> (session, tunnel id, token)`` in its
:class:`PrivateTunnels` directory. Another client BINDs a *visit* tunnel (option VISIT NAME)
and opens streams itself (odd ids, spec §9.2) with that tunnel id. For each such stream the
relay checks the visit tunnel, finds the publisher, applies the policy (the publisher's token
rights, its visitor rules and those of the published tunnel's BIND, against the visiting
client's address), opens a stream on the publisher's session, relays its answer (OPEN_ACK or
OPEN_FAIL with the same reason) and then copies both ways between the two mux streams
(:func:`splice_streams`): each hop is bounded by its own window, so flow control holds end to
end, and FIN and RESET cross over.

Names are kept while the publishing session lives. A second session of the same token
publishing a name takes it over only from a silent holder (the registry's liveness probe, as
for public ports); a live holder, or one of another token, keeps it (ADDRESS_IN_USE). When a
session ends, its names and visit tunnels go; the streams it carried fail, and the stream on
the other hop of each is reset.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from muxtunnel.access import AddressRule
from muxtunnel.accesslog import log_access
from muxtunnel.bandwidth import DuplexMeter
from muxtunnel.connection import (
    MuxConnection,
    MuxSessionClosedError,
    MuxStream,
    MuxStreamResetError,
    OpenRejectedError,
)
from muxtunnel.errors import ErrorCode
from muxtunnel.logsafe import peer_text
from muxtunnel.policy import DEFAULT_POLICY, Direction, StreamPolicy
from muxtunnel.protocol.constants import CARRIER_TUNNEL, OpenFailReason, ResultStatus
from muxtunnel.protocol.frames import Address
from muxtunnel.relaypolicy import StreamLimits

if TYPE_CHECKING:
    from muxtunnel.access import TokenEntry
    from muxtunnel.protocol.events import BindRequested, UnbindReceived
    from muxtunnel.server import RelaySession, _Relay

__all__ = ["COPY_CHUNK", "PrivateTunnels", "splice_streams"]

logger = logging.getLogger(__name__)

#: Most bytes moved from one mux stream to the other per step.
COPY_CHUNK = 256 * 1024
#: Longest OPEN_FAIL message relayed from the publisher to the visiting client (characters).
MESSAGE_LIMIT = 200


def _tls_addresses(conn: MuxConnection) -> tuple[Address, Address]:
    """(peer, local) address of the TCP connection under ``conn``'s TLS."""
    tcp = getattr(conn.transport, "transport_stream", None)
    sock = getattr(tcp, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
        local = sock.getsockname() if sock is not None else None
    except OSError:
        return Address(None, 0), Address(None, 0)
    return _address(peer), _address(local)


def _address(sockaddr: object) -> Address:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return Address(str(sockaddr[0]), int(sockaddr[1]))
    return Address(None, 0)


@dataclass(eq=False, slots=True)
class _Publication:
    """One private tunnel that is up."""

    name: str
    session: RelaySession
    tunnel_id: int
    token: TokenEntry
    #: The published tunnel's own visitor rule (its BIND's ALLOW/DENY).
    rule: AddressRule
    #: Visit streams carried to it now.
    visitors: int = 0
    #: Bandwidth buckets of the tunnel (``TokenPolicy.tunnel_bandwidth`` of its token).
    bandwidth: DuplexMeter = field(default_factory=DuplexMeter)


@dataclass(eq=False, slots=True)
class _SessionState:
    """What one relay session holds here."""

    #: tunnel id -> publication
    published: dict[int, _Publication] = field(default_factory=dict)
    #: tunnel id -> name of the private tunnel it visits
    visits: dict[int, str] = field(default_factory=dict)
    #: tunnel id -> bandwidth buckets of that visit tunnel
    meters: dict[int, DuplexMeter] = field(default_factory=dict)
    #: The session's TLS peer and local address (known once it binds a visit tunnel).
    peer: Address = field(default_factory=lambda: Address(None, 0))
    local: Address = field(default_factory=lambda: Address(None, 0))


class PrivateTunnels:
    """The relay's directory of private tunnels and the visit streams carried to them."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        #: name -> the publication holding it
        self.published: dict[str, _Publication] = {}
        self._sessions: dict[RelaySession, _SessionState] = {}

    # -- queries -------------------------------------------------------------------------

    def owns(self, rs: RelaySession, tunnel_id: int) -> bool:
        """True if ``tunnel_id`` is a private or visit tunnel of ``rs``."""
        state = self._sessions.get(rs)
        return state is not None and (tunnel_id in state.published or tunnel_id in state.visits)

    def count(self, rs: RelaySession) -> int:
        """Private and visit tunnels ``rs`` holds."""
        state = self._sessions.get(rs)
        return 0 if state is None else len(state.published) + len(state.visits)

    # -- BIND / UNBIND -------------------------------------------------------------------

    async def bind(self, rs: RelaySession, event: BindRequested) -> None:
        """Answer a BIND with option NAME or VISIT (RESULT queued here)."""
        status, message = await self._bind(rs, event)
        conn = rs.conn
        if conn.closed:
            if status == ResultStatus.OK:
                self._drop_tunnel(rs, event.tunnel_id, "session closed")
            return
        name = event.options.name or event.options.visit or ""
        if status == ResultStatus.OK:
            conn.send_result(event.req_id, status, "", Address(name, 0))
        else:
            logger.log(
                logging.INFO if status == ResultStatus.LIMIT_REACHED else logging.WARNING,
                "client %s: %s %s (tunnel %d) refused: %s: %s",
                rs.peer,
                "private tunnel" if event.options.name is not None else "visit of",
                name,
                event.tunnel_id,
                status.name,
                message,
                extra={"ratelimit_key": rs.token.name},
            )
            conn.send_result(event.req_id, status, message)

    async def _bind(self, rs: RelaySession, event: BindRequested) -> tuple[ResultStatus, str]:
        options = event.options
        config = self.relay.config
        common = rs.bind_precheck(event)
        if common is not None:
            return common
        if options.visit is not None and (options.allow or options.deny):
            return ResultStatus.MALFORMED, "ALLOW and DENY do not apply to a VISIT bind"
        token = rs.token
        limit = token.policy.max_tunnels
        if limit is None:
            limit = config.max_tunnels_per_token
        # Port leases of the token plus its private and visit tunnels in every session.
        held = self.relay.registry.held_by(token.name) + sum(
            len(st.published) + len(st.visits)
            for session, st in self._sessions.items()
            if session.token.name == token.name
        )
        if held >= limit:
            return (
                ResultStatus.LIMIT_REACHED,
                f"token {token.name} holds {limit} tunnels, its limit",
            )
        if options.name is not None:
            return await self._publish(rs, event, options.name, token)
        name = options.visit
        assert name is not None
        if config.max_visit_streams == 0:
            return ResultStatus.DENIED, "this relay carries no visits of private tunnels"
        holder = self.published.get(name)
        if (
            holder is not None
            and holder.token.name != token.name
            and not token.policy.may_visit(name)
        ):
            return ResultStatus.DENIED, f"token {token.name} may not visit {name}"
        state = self._state(rs)
        state.visits[event.tunnel_id] = name
        state.meters[event.tunnel_id] = DuplexMeter()
        if rs.stats is not None:
            rs.stats.add_tunnel(event.tunnel_id, f"visit:{name}")
        state.peer, state.local = _tls_addresses(rs.conn)
        logger.info(
            "client %s: tunnel %d visits private tunnel %s (token %s)",
            rs.peer,
            event.tunnel_id,
            name,
            token.name,
        )
        return ResultStatus.OK, ""

    async def _publish(
        self, rs: RelaySession, event: BindRequested, name: str, token: TokenEntry
    ) -> tuple[ResultStatus, str]:
        if not token.policy.may_publish(name):
            return ResultStatus.DENIED, f"token {token.name} may not publish {name}"
        in_use = f"private tunnel {name} is published by another client"
        holder = self.published.get(name)
        while holder is not None and holder.session.alive:
            if holder.token.name != token.name or holder.session is rs:
                return ResultStatus.ADDRESS_IN_USE, in_use
            if await self.relay.registry.is_alive(holder.session):
                return ResultStatus.ADDRESS_IN_USE, in_use
            if self.published.get(name) is holder and holder.session.alive:
                holder.session.replaced(
                    f"silent; private tunnel {name} taken over by a new session of the same token"
                )
            holder = self.published.get(name)
        if rs.conn.closed or self.owns(rs, event.tunnel_id):
            return ResultStatus.DENIED, "session closed"
        if holder is not None:
            self._unpublish(holder, "its session is gone")
        publication = _Publication(
            name=name,
            session=rs,
            tunnel_id=event.tunnel_id,
            token=token,
            rule=AddressRule(event.options.allow, event.options.deny),
        )
        self.published[name] = publication
        self._state(rs).published[event.tunnel_id] = publication
        if rs.stats is not None:
            rs.stats.add_tunnel(event.tunnel_id, f"private:{name}")
        logger.info(
            "client %s: tunnel %d published as private tunnel %s (token %s)",
            rs.peer,
            event.tunnel_id,
            name,
            token.name,
        )
        return ResultStatus.OK, ""

    def unbind(self, rs: RelaySession, event: UnbindReceived) -> bool:
        """Handle an UNBIND if it names a private or visit tunnel of ``rs``; True if it did."""
        if not self.owns(rs, event.tunnel_id):
            return False
        self._drop_tunnel(rs, event.tunnel_id, "unbound by the client")
        if event.req_id != 0:
            rs.conn.send_result(event.req_id, ResultStatus.OK, "")
        return True

    def session_ended(self, rs: RelaySession) -> None:
        """Forget every private and visit tunnel of ``rs`` (its streams fail with the session)."""
        state = self._sessions.pop(rs, None)
        if state is None:
            return
        for publication in state.published.values():
            if self.published.get(publication.name) is publication:
                self._unpublish(publication, "client gone")

    def _state(self, rs: RelaySession) -> _SessionState:
        state = self._sessions.get(rs)
        if state is None:
            state = self._sessions[rs] = _SessionState()
        return state

    def _drop_tunnel(self, rs: RelaySession, tunnel_id: int, why: str) -> None:
        if rs.stats is not None:
            rs.stats.remove_tunnel(tunnel_id)
        state = self._sessions.get(rs)
        if state is None:
            return
        publication = state.published.pop(tunnel_id, None)
        if publication is not None and self.published.get(publication.name) is publication:
            self._unpublish(publication, why)
        name = state.visits.pop(tunnel_id, None)
        state.meters.pop(tunnel_id, None)
        if name is not None:
            logger.info(
                "client %s: tunnel %d no longer visits %s (%s)", rs.peer, tunnel_id, name, why
            )
        if not state.published and not state.visits:
            self._sessions.pop(rs, None)

    def _unpublish(self, publication: _Publication, why: str) -> None:
        del self.published[publication.name]
        logger.info(
            "client %s: private tunnel %s (tunnel %d, token %s) unpublished: %s",
            publication.session.peer,
            publication.name,
            publication.tunnel_id,
            publication.token.name,
            why,
        )

    # -- visit streams -------------------------------------------------------------------

    async def serve_streams(self, rs: RelaySession) -> None:
        """Take the streams ``rs``'s client opens until its connection ends."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    mux = await rs.conn.accept_stream()
                except MuxSessionClosedError:
                    return
                if mux.info.tunnel_id == CARRIER_TUNNEL:
                    # Another connection of the session, carried (protocol-spec.md §10.7).
                    nursery.start_soon(self.relay.carry, rs, mux, rs.conn)
                    continue
                nursery.start_soon(self._serve_stream, rs, mux)

    async def _serve_stream(self, rs: RelaySession, mux: MuxStream) -> None:
        try:
            await self._visit(rs, mux)
        except Exception:
            logger.exception("client %s: stream %d: internal error", rs.peer, mux.stream_id)
            if mux.failure is None:
                if mux.pending:
                    mux.reject(OpenFailReason.REFUSED, "internal error")
                else:
                    mux.reset(ErrorCode.INTERNAL_ERROR, "internal error")

    def _refuse(
        self, rs: RelaySession, mux: MuxStream, reason: OpenFailReason, message: str
    ) -> None:
        logger.info(
            "client %s: visit stream %d refused: %s: %s",
            rs.peer,
            mux.stream_id,
            reason.name,
            message,
            extra={"ratelimit_key": ("visit", rs.token.name)},
        )
        if mux.failure is None:
            mux.reject(reason, message)

    async def _visit(self, rs: RelaySession, mux: MuxStream) -> None:
        if mux.failure is not None:
            return
        relay = self.relay
        config = relay.config
        state = self._sessions.get(rs)
        name = None if state is None else state.visits.get(mux.info.tunnel_id)
        if state is None or name is None:
            self._refuse(
                rs,
                mux,
                OpenFailReason.UNKNOWN_TUNNEL,
                f"tunnel {mux.info.tunnel_id} is not a visit tunnel",
            )
            return
        pub = self.published.get(name)
        if pub is None or not pub.session.alive:
            self._refuse(rs, mux, OpenFailReason.UNREACHABLE, f"no private tunnel {name} is up")
            return
        token = rs.token
        host = state.peer.host
        refusal: str | None = None
        if pub.token.name != token.name and not token.policy.may_visit(name):
            refusal = f"token {token.name} may not visit {name}"
        else:
            why = pub.token.policy.visitors.refusal(host) or pub.rule.refusal(host)
            if why is not None:
                refusal = f"visitor {host}: {why}"
                # Counted with the publisher's token, like visitors refused on a public port.
                relay.usage_of(pub.token.name).refused_visitors += 1
                relay.refused_visitors[pub.token.name] += 1
        if refusal is not None:
            self._refuse(rs, mux, OpenFailReason.REFUSED, refusal)
            return
        pub_policy = pub.token.policy
        max_visitors = (
            pub_policy.max_visitors
            if pub_policy.max_visitors is not None
            else config.max_visitors_per_tunnel
        )
        if pub.visitors >= max_visitors:
            self._refuse(
                rs,
                mux,
                OpenFailReason.RESOURCE_SHORTAGE,
                f"private tunnel {name} has {max_visitors} visitors, its limit",
            )
            return
        usages = [relay.usage_of(token.name), relay.usage_of(pub.token.name)]
        for entry, usage in ((token, usages[0]), (pub.token, usages[1])):
            limit = (
                entry.policy.max_streams
                if entry.policy.max_streams is not None
                else config.max_streams_per_token
            )
            if usage.streams >= limit:
                self._refuse(
                    rs,
                    mux,
                    OpenFailReason.RESOURCE_SHORTAGE,
                    f"token {entry.name} has {limit} streams open, its limit",
                )
                return
        refused = relay.policy.admit(mux.info)
        if refused is not None:
            self._refuse(rs, mux, refused, "refused by the relay's policy")
            return
        pub.visitors += 1
        for usage in usages:
            usage.streams += 1
        # A draining relay waits for these streams like for its public visitors.
        sessions = {rs, pub.session}
        for session in sessions:
            session.stream_started()
        policy = relay.policy
        policy.track(
            mux.info,
            StreamLimits(
                rs, usages[0].bandwidth, state.meters.get(mux.info.tunnel_id, DuplexMeter())
            ),
        )
        try:
            await self._carry(rs, state, mux, pub)
        finally:
            policy.untrack(mux.info)
            for session in sessions:
                session.stream_ended()
            pub.visitors -= 1
            for usage in usages:
                usage.streams -= 1

    async def _carry(
        self, rs: RelaySession, state: _SessionState, mux: MuxStream, pub: _Publication
    ) -> None:
        """Open the publisher's stream, relay its answer, then copy both ways."""
        name = pub.name
        shares = pub.session.shares
        opened: MuxStream | None = None
        failed: tuple[OpenFailReason, str] | OpenRejectedError | None = None
        async with trio.open_nursery() as nursery:

            async def watch_visitor() -> None:
                # Returns only once the visiting client reset the stream (not accepted yet).
                with contextlib.suppress(trio.BrokenResourceError):
                    await mux.wait_opened()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_visitor)
            try:
                await shares.wait_turn(pub.tunnel_id)
                opened = pub.session.conn.open_stream(pub.tunnel_id, state.peer, state.local)
                shares.opened(pub.tunnel_id, opened)
                self.relay.policy.track(
                    opened.info,
                    StreamLimits(
                        pub.session, self.relay.usage_of(pub.token.name).bandwidth, pub.bandwidth
                    ),
                )
                await opened.wait_opened()
            except OpenRejectedError as exc:
                failed = exc
            except trio.BrokenResourceError as exc:
                if (
                    opened is not None
                    and isinstance(exc, MuxStreamResetError)
                    and pub.session.alive
                ):
                    failed = (
                        OpenFailReason.CONNECT_TIMEOUT,
                        f"private tunnel {name} did not open the stream in time",
                    )
                else:
                    failed = (OpenFailReason.UNREACHABLE, f"no private tunnel {name} is up")
            nursery.cancel_scope.cancel()
        try:
            if mux.failure is not None:
                if opened is not None:
                    opened.reset(ErrorCode.CANCEL, "visitor left")
                self._log_end(rs, mux, pub, "visitor left before the stream opened")
                return
            if isinstance(failed, OpenRejectedError):
                self._relay_rejection(rs, mux, failed, name)
                return
            if failed is not None:
                self._refuse(rs, mux, *failed)
                return
            assert opened is not None
            try:
                mux.accept()
            except trio.BrokenResourceError:
                opened.reset(ErrorCode.CANCEL, "visitor left")
                self._log_end(rs, mux, pub, "visitor left before the stream opened")
                return
            # Stats: the visit on the visitor's session, the stream on the publisher's.
            counted = [
                (ts, info)
                for session, info in ((rs, mux.info), (pub.session, opened.info))
                if session.stats is not None
                and (ts := session.stats.tunnels.get(info.tunnel_id)) is not None
            ]
            for ts, info in counted:
                ts.stream_opened(info)
            error: str | None = "cancelled"
            try:
                error = await splice_streams(mux, opened, policy=self.relay.policy)
            finally:
                for ts, info in counted:
                    ts.stream_closed(info, "closed" if error is None else "error")
            self._log_end(rs, mux, pub, error)
        finally:
            if opened is not None:
                shares.finished(pub.tunnel_id, opened)
                self.relay.policy.untrack(opened.info)

    def _relay_rejection(
        self, rs: RelaySession, mux: MuxStream, exc: OpenRejectedError, name: str
    ) -> None:
        try:
            reason = OpenFailReason(exc.reason)
        except ValueError:
            reason = OpenFailReason.REFUSED
        text = exc.detail or reason.name
        message = f"private tunnel {name}: {peer_text(text, MESSAGE_LIMIT)}"
        logger.info(
            "client %s: visit stream %d to %s refused by the publisher: %s",
            rs.peer,
            mux.stream_id,
            name,
            message,
            extra={"ratelimit_key": ("visit", rs.token.name)},
        )
        if mux.failure is None:
            mux.reject(reason, message)

    def _log_end(
        self, rs: RelaySession, mux: MuxStream, pub: _Publication, error: str | None
    ) -> None:
        info = mux.info
        state = self._sessions.get(rs)
        peer = state.peer if state is not None else Address(None, 0)
        if error is None or error == "cancelled":
            end = error or "closed"
        elif error.startswith(("visiting client's", "visitor left")):
            end = "reset_by_visitor"
        else:  # the publisher's stream failed
            end = "reset_by_client"
        # The access log line (muxtunnel.accesslog); the visitor is the visiting client.
        log_access(
            side="relay",
            tunnel=f"private:{pub.name}",
            visitor=str(peer),
            local=None,
            bytes_from_visitor=info.bytes_in,
            bytes_to_visitor=info.bytes_out,
            duration=info.duration(trio.current_time()),
            end=end,
            reason=None if end in ("closed", "cancelled") else error,
            stream=info.stream_id,
            token=rs.token.name,
            publisher_token=pub.token.name,
        )


# --------------------------------------------------------------------------------------------
# mux <-> mux copy


class _StreamSplice:
    def __init__(self, a: MuxStream, b: MuxStream, policy: StreamPolicy) -> None:
        self.a = a
        self.b = b
        self.policy = policy
        self.error: str | None = None
        self.scope: trio.CancelScope | None = None

    def _fail(self, error: str, broken: MuxStream, code: ErrorCode) -> None:
        """``broken`` failed (or its peer reset it): reset the other stream with ``code``."""
        if self.error is None:
            self.error = error
            other = self.b if broken is self.a else self.a
            other.reset(code, error)
            broken.reset(code)
        if self.scope is not None:
            self.scope.cancel()

    async def copy(self, src: MuxStream, dst: MuxStream) -> None:
        """Move ``src``'s bytes to ``dst``; FIN follows FIN; credit returns once handed on."""
        policy = self.policy
        while True:
            try:
                chunk = await src.receive_batch(COPY_CHUNK, acknowledge=False)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"{_side(src)} stream failed: {exc}", src, _code(exc))
                return
            try:
                if not chunk:
                    await dst.send_eof()
                    return
                await dst.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"{_side(dst)} stream failed: {exc}", dst, _code(exc))
                return
            src.acknowledge(len(chunk))
            await policy.throttle(src.info, Direction.IN, len(chunk))
            await policy.throttle(dst.info, Direction.OUT, len(chunk))


def _side(mux: MuxStream) -> str:
    return "visiting client's" if mux.incoming else "publisher's"


def _code(exc: BaseException) -> ErrorCode:
    """The code to pass on for a failed stream: its peer's reset code, else CANCEL."""
    if isinstance(exc, MuxStreamResetError) and not isinstance(exc, OpenRejectedError):
        code = exc.error_code
        if code != ErrorCode.NO_ERROR:
            return code
    return ErrorCode.CANCEL


async def splice_streams(
    a: MuxStream, b: MuxStream, *, policy: StreamPolicy = DEFAULT_POLICY
) -> str | None:
    """Copy both ways between two open mux streams until both directions end or one fails.

    FIN on one becomes FIN on the other (half-close kept); a failure or RESET of either resets
    both (the peer's reset code is passed on). Each direction holds at most one chunk that it
    has not acknowledged, so what ``b``'s peer does not read stops ``a``'s peer at ``a``'s
    window (and the other way round). Returns None for a clean end, else what went wrong;
    never raises for stream errors. Cancellation resets both.
    """
    state = _StreamSplice(a, b, policy)
    try:
        async with trio.open_nursery() as nursery:
            state.scope = nursery.cancel_scope
            nursery.start_soon(state.copy, b, a)
            await state.copy(a, b)
    finally:
        if state.error is None and not (a.receive_finished and b.receive_finished):
            state.error = "cancelled"
        if state.error is not None:
            a.reset(ErrorCode.CANCEL)
            b.reset(ErrorCode.CANCEL)
        now = trio.current_time()
        policy.finished(a.info, now, state.error)
        policy.finished(b.info, now, state.error)
    if state.error is None:
        await a.aclose()
        await b.aclose()
    return state.error
