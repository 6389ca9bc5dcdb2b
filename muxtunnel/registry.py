"""The relay's public ports: which token holds which port, and for how long.

A :class:`PortLease` is a bound public listener that belongs to one token. While a session of
that token has it bound, the session accepts visitors on it. When the session goes away the
listener stays bound (visitors wait in the kernel's backlog) and the lease is kept for
``lease_seconds``: a reconnecting client of the same token re-binds the same port at once,
auto-assigned ports included (matched by tunnel id when the client asks for port 0). Only when
the lease expires is the listener closed. So a client never sees "port already in use" after a
drop or a ``kill -9``.

If a BIND asks for a port still held by *another live-looking session of the same token*, the
old session is probed (PING, wait for any byte); if it stays silent it is stale (half-open TCP,
killed client): it is closed and the new session takes the port over. If it answers, both
clients are alive and the new one gets ADDRESS_IN_USE for that port, or a fresh port when it
asked for port 0 (taking it would make the two flap). Probes are coalesced per session: all
BINDs of a burst share one PING, and a session that answered is taken as alive for
:data:`PROBE_CACHE_SECONDS` (so clients sharing a token never PING-flood each other).

A token holds at most ``max_per_token`` leases (or its own limit, passed to :meth:`acquire`),
attached and detached alike; a BIND beyond that is refused (LIMIT_REACHED) before any port is
searched. A new listener also needs room in the relay's
:class:`~muxtunnel.limits.DescriptorBudget`. A token restricted to some ports (its policy's
``ports``) gets a port among those when it asks for port 0.

A lease also keeps what belongs to the tunnel rather than to one session: the visitor rule of
its BIND (ALLOW/DENY options, protocol-spec.md §6.12), the count of visitors refused, and the
tunnel's bandwidth buckets.

Leases outlive the relay process (protocol-spec.md §10.5): every change calls ``on_change``
(the relay writes :meth:`PortRegistry.records` to its state dir, :mod:`muxtunnel.leasestore`)
and a starting relay binds the stored ports again with :meth:`PortRegistry.restore`, as
detached leases. Another token asking for a port held for a token is refused with
ADDRESS_IN_USE ``port N is reserved for another token for N s``; port 0 never picks it.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from muxtunnel.access import AddressRule, clip_ports, format_ports
from muxtunnel.bandwidth import DuplexMeter
from muxtunnel.leasestore import StoredLease
from muxtunnel.protocol.constants import ResultStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from muxtunnel.limits import DescriptorBudget

__all__ = ["BindError", "PortLease", "PortRegistry"]

logger = logging.getLogger(__name__)

#: How long a live-looking session of the same token gets to show it is alive (seconds).
TAKEOVER_PROBE_TIMEOUT = 1.5
#: How long a session that answered a probe is taken as alive without another PING (seconds).
PROBE_CACHE_SECONDS = 1.0
#: Random ports tried before a linear scan of the range when the relay picks a port.
_RANDOM_TRIES = 32


class LeaseOwner(Protocol):
    """What the registry needs from a relay session."""

    token_id: str

    @property
    def alive(self) -> bool:
        """False once the session's connection is closing."""

    async def probe(self, within: float) -> bool:
        """True if the peer shows life within ``within`` seconds."""

    def replaced(self, reason: str) -> None:
        """Close the session: a new session of the same token took over."""


@dataclass(eq=False, slots=True)
class PortLease:
    """One public port held by a token."""

    port: int
    token_id: str
    tunnel_id: int
    listeners: list[trio.SocketListener]
    owner: LeaseOwner | None = None
    #: ``trio.current_time()`` when the lease expires (only while detached).
    expires_at: float | None = None
    #: Cancels the current owner's accept loop.
    accept_scope: trio.CancelScope | None = None
    #: Set whenever the owner changes; accept loops watch it.
    changed: trio.Event = field(default_factory=trio.Event)
    #: Visitors connected through this port now (bounded by max-visitors-per-tunnel).
    visitors: int = 0
    #: The tunnel's own visitor rule (the ALLOW/DENY options of its latest BIND).
    access: AddressRule = field(default_factory=AddressRule)
    #: Visitors refused by an allow/deny rule since the port was bound.
    refused_visitors: int = 0
    #: Bandwidth buckets of the tunnel (``TokenPolicy.tunnel_bandwidth``), both directions.
    bandwidth: DuplexMeter = field(default_factory=DuplexMeter)

    def close(self) -> None:
        """Close the listening sockets (synchronous: trio socket close needs no await)."""
        for listener in self.listeners:
            listener.socket.close()


@dataclass(eq=False, slots=True)
class _Probe:
    """The liveness probe of one session: in flight (``result`` None) or its answer."""

    done: trio.Event = field(default_factory=trio.Event)
    result: bool | None = None
    at: float = 0.0

    def answer(self) -> bool | None:
        """The result (None while in flight or after a cancelled probe)."""
        return self.result


class BindError(Exception):
    """A BIND cannot be granted; ``status`` goes into the RESULT."""

    def __init__(self, status: ResultStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class PortRegistry:
    """All leases of one relay process."""

    def __init__(
        self,
        port_range: tuple[int, int],
        bind_host: str,
        lease_seconds: float,
        *,
        max_per_token: int | None = None,
        descriptors: DescriptorBudget | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.port_range = port_range
        self.bind_host = bind_host
        self.lease_seconds = lease_seconds
        self.max_per_token = max_per_token
        self.descriptors = descriptors
        self._clock = clock
        self.leases: dict[int, PortLease] = {}
        #: The same leases by token (port -> lease), attached and detached.
        self._by_token: dict[str, dict[int, PortLease]] = {}
        self._probes: weakref.WeakKeyDictionary[LeaseOwner, _Probe] = weakref.WeakKeyDictionary()
        #: Called after every change of a lease (owner, tunnel id, expiry, added, released).
        self.on_change: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def held_by(self, token_id: str) -> int:
        """How many ports ``token_id`` holds (bound or kept for a gone session)."""
        return len(self._by_token.get(token_id, ()))

    # -- liveness ------------------------------------------------------------------------

    async def is_alive(self, owner: LeaseOwner) -> bool:
        """True if ``owner`` answers a probe; one probe in flight per owner, answers cached."""
        while True:
            if not owner.alive:
                await trio.lowlevel.checkpoint()
                return False
            probe = self._probes.get(owner)
            if probe is not None and probe.result is None:
                await probe.done.wait()
                answer = probe.answer()
                if answer is None:
                    continue  # the prober was cancelled: probe again
                return answer and owner.alive
            if (
                probe is not None
                and probe.result
                and self._clock() - probe.at < PROBE_CACHE_SECONDS
            ):
                await trio.lowlevel.checkpoint()
                return True
            probe = _Probe()
            self._probes[owner] = probe
            try:
                probe.result = await owner.probe(TAKEOVER_PROBE_TIMEOUT)
                probe.at = self._clock()
            finally:
                if probe.result is None and self._probes.get(owner) is probe:
                    del self._probes[owner]
                probe.done.set()
            return probe.result and owner.alive

    # -- acquiring -----------------------------------------------------------------------

    async def acquire(
        self,
        owner: LeaseOwner,
        tunnel_id: int,
        port: int,
        *,
        ports: tuple[tuple[int, int], ...] | None = None,
        max_tunnels: int | None = None,
    ) -> PortLease:
        """Give ``owner`` a public port for ``tunnel_id``: ``port``, or any in range if 0.

        ``ports`` (inclusive ranges) narrows where port 0 is picked; ``max_tunnels`` replaces
        ``max_per_token`` for this token. The caller checks an explicit ``port`` against the
        token's ports first.

        Raises:
            BindError: OUT_OF_RANGE, ADDRESS_IN_USE, LIMIT_REACHED, DENIED or INTERNAL.
        """
        lo, hi = self.port_range
        limit = self.max_per_token if max_tunnels is None else max_tunnels
        if port:
            if not lo <= port <= hi:
                raise BindError(
                    ResultStatus.OUT_OF_RANGE, f"port {port} is outside the relay's range {lo}-{hi}"
                )
            lease = self.leases.get(port)
            if lease is not None:
                if await self._can_take(lease, owner):
                    return self._attach(lease, owner, tunnel_id)
                if lease.token_id != owner.token_id and (
                    lease.owner is None or not lease.owner.alive
                ):
                    raise BindError(
                        ResultStatus.ADDRESS_IN_USE,
                        f"port {port} is reserved for another token for {self._left(lease)} s",
                    )
                raise BindError(
                    ResultStatus.ADDRESS_IN_USE, f"port {port} is in use by another client"
                )
            self._check_new(owner, limit)
            lease = await self._bind_new(port, owner, tunnel_id, limit)
            return self._attach(lease, owner, tunnel_id)
        # Port 0: the same tunnel of the same token gets its old port back, unless a live
        # session of the token holds it (then this session gets a fresh port).
        mine = self._by_token.get(owner.token_id, {})
        for lease in list(mine.values()):
            if (
                lease.tunnel_id == tunnel_id
                and (ports is None or any(a <= lease.port <= b for a, b in ports))
                and lease.owner is not owner
                and self.leases.get(lease.port) is lease
                and await self._can_take(lease, owner)
            ):
                return self._attach(lease, owner, tunnel_id)
        self._check_new(owner, limit)
        return self._attach(await self._bind_any(owner, tunnel_id, ports, limit), owner, tunnel_id)

    def _left(self, lease: PortLease) -> int:
        """Whole seconds until a detached lease expires (at least 1)."""
        if lease.expires_at is None:
            return max(1, math.ceil(self.lease_seconds))
        return max(1, math.ceil(lease.expires_at - self._clock()))

    def _check_token_limit(self, owner: LeaseOwner, limit: int | None) -> None:
        if limit is not None and self.held_by(owner.token_id) >= limit:
            raise BindError(
                ResultStatus.LIMIT_REACHED,
                f"this token already holds {limit} tunnels, the relay's limit per token "
                "(ports of a disconnected client stay reserved for its lease time)",
            )

    def _check_new(self, owner: LeaseOwner, limit: int | None) -> None:
        """Refuse a new listener beyond the token's limit or the descriptor budget (O(1))."""
        self._check_token_limit(owner, limit)
        first = self.held_by(owner.token_id) == 0
        if self.descriptors is not None and not self.descriptors.room(2, priority=first):
            raise BindError(
                ResultStatus.LIMIT_REACHED,
                "the relay is short of file descriptors; try again later",
            )

    async def _can_take(self, lease: PortLease, owner: LeaseOwner) -> bool:
        if lease.token_id != owner.token_id:
            return False
        current = lease.owner
        if current is None or not current.alive:
            return True
        if current is owner:
            return False
        # Another session of the same token holds it: stale (half-open, killed) or a twin?
        if await self.is_alive(current):
            return False
        if current.alive:
            logger.info(
                "session holding port %d is unresponsive; closing it and handing the port over",
                lease.port,
            )
            current.replaced("replaced by a new session of the same token")
        if self.leases.get(lease.port) is not lease:
            return False  # released meanwhile
        return lease.owner is current or lease.owner is None

    def _attach(self, lease: PortLease, owner: LeaseOwner, tunnel_id: int) -> PortLease:
        if lease.accept_scope is not None:
            lease.accept_scope.cancel()
            lease.accept_scope = None
        lease.owner = owner
        lease.tunnel_id = tunnel_id
        lease.expires_at = None
        lease.changed.set()
        lease.changed = trio.Event()
        self._changed()
        return lease

    async def _open(self, port: int) -> list[trio.SocketListener]:
        return await trio.open_tcp_listeners(port, host=self.bind_host)

    async def _bind_new(
        self, port: int, owner: LeaseOwner, tunnel_id: int, limit: int | None
    ) -> PortLease:
        try:
            listeners = await self._open(port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BindError(
                    ResultStatus.ADDRESS_IN_USE, f"port {port} is in use on the relay"
                ) from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise BindError(ResultStatus.DENIED, f"port {port}: permission denied") from None
            raise BindError(ResultStatus.INTERNAL, f"port {port}: {exc.strerror or exc}") from None
        if self.descriptors is not None:
            self.descriptors.opened(len(listeners))
        try:
            # Checked again: another session of the token may have bound meanwhile.
            self._check_token_limit(owner, limit)
        except BindError:
            for listener in listeners:
                listener.socket.close()
            raise
        return self._add(PortLease(port, owner.token_id, tunnel_id, listeners))

    def _add(self, lease: PortLease) -> PortLease:
        self.leases[lease.port] = lease
        self._by_token.setdefault(lease.token_id, {})[lease.port] = lease
        self._changed()
        return lease

    async def _bind_any(
        self,
        owner: LeaseOwner,
        tunnel_id: int,
        ports: tuple[tuple[int, int], ...] | None,
        limit: int | None,
    ) -> PortLease:
        lo, hi = self.port_range
        ranges = clip_ports(ports, lo, hi)
        where = format_ports(ranges)
        if not ranges:
            raise BindError(
                ResultStatus.ADDRESS_IN_USE,
                f"none of the token's ports ({format_ports(ports or ())}) is in the relay's "
                f"range {lo}-{hi}",
            )
        size = sum(b - a + 1 for a, b in ranges)
        if ports is None:
            taken = len(self.leases)
        else:
            taken = sum(1 for p in self.leases if any(a <= p <= b for a, b in ranges))
        if taken >= size:
            raise BindError(ResultStatus.ADDRESS_IN_USE, f"no free port left in {where}")

        def nth(index: int) -> int:
            for a, b in ranges:
                if index <= b - a:
                    return a + index
                index -= b - a + 1
            raise AssertionError("index beyond the ranges")  # pragma: no cover

        tries = [nth(random.randrange(size)) for _ in range(min(_RANDOM_TRIES, size))]
        start = random.randrange(size)
        tries += [nth((start + i) % size) for i in range(size)]
        for port in tries:
            if port in self.leases:
                continue
            try:
                return await self._bind_new(port, owner, tunnel_id, limit)
            except BindError as exc:
                if exc.status != ResultStatus.ADDRESS_IN_USE:
                    raise
        raise BindError(ResultStatus.ADDRESS_IN_USE, f"no free port left in {where}")

    # -- releasing -----------------------------------------------------------------------

    def detach(self, lease: PortLease, owner: LeaseOwner) -> None:
        """The owner's session ended: keep the port for the token until the lease expires."""
        if lease.owner is not owner:
            return  # already taken over
        if lease.accept_scope is not None:
            lease.accept_scope.cancel()
            lease.accept_scope = None
        lease.owner = None
        lease.expires_at = self._clock() + self.lease_seconds
        lease.changed.set()
        lease.changed = trio.Event()
        self._changed()
        logger.info("port %d kept for its token for %.0f s", lease.port, self.lease_seconds)

    def release(self, lease: PortLease, owner: LeaseOwner | None = None) -> None:
        """Give the port up now (UNBIND, lease expiry, relay shutdown)."""
        if owner is not None and lease.owner is not owner:
            return
        if lease.accept_scope is not None:
            lease.accept_scope.cancel()
            lease.accept_scope = None
        if self.leases.get(lease.port) is lease:
            del self.leases[lease.port]
            mine = self._by_token.get(lease.token_id)
            if mine is not None and mine.get(lease.port) is lease:
                del mine[lease.port]
                if not mine:
                    del self._by_token[lease.token_id]
            self._changed()
        lease.owner = None
        lease.close()
        lease.changed.set()
        logger.info("tunnel port %d released", lease.port)

    def expire(self) -> float | None:
        """Release expired leases; return when the next one expires (or None)."""
        now = self._clock()
        nxt: float | None = None
        for lease in list(self.leases.values()):
            if lease.owner is None and lease.expires_at is not None:
                if lease.expires_at <= now:
                    logger.info("lease on port %d expired", lease.port)
                    self.release(lease)
                else:
                    nxt = lease.expires_at if nxt is None else min(nxt, lease.expires_at)
        return nxt

    def close_all(self) -> None:
        """Release every lease (relay shutdown); set ``on_change`` to None first to keep them
        on disk."""
        for lease in list(self.leases.values()):
            self.release(lease)

    def close_listeners(self) -> None:
        """Stop taking visitors on every port (shutdown drain) but keep the leases: sessions
        still detach from them, so the stored leases run from the end of each session."""
        for lease in self.leases.values():
            lease.close()

    # -- persistence ---------------------------------------------------------------------

    def records(self, wall: float, keys: Mapping[str, str]) -> list[StoredLease]:
        """Every lease as stored on disk, with ``wall`` = ``time.time()`` now and ``keys``
        the :func:`~muxtunnel.leasestore.key_id` of each token's stored key."""
        offset = wall - self._clock()
        host = self.bind_host
        return [
            StoredLease(
                lease.port,
                lease.token_id,
                keys.get(lease.token_id, "-"),
                host,
                lease.tunnel_id,
                None if lease.expires_at is None else lease.expires_at + offset,
            )
            for lease in self.leases.values()
        ]

    async def restore(self, records: Iterable[StoredLease], wall: float) -> list[str]:
        """Bind the ports of ``records`` again as detached leases (relay start).

        A lease stored while a session held it (``expires`` None) runs ``lease_seconds`` from
        now; no lease runs longer than that. Returns why ports could not be bound again
        (``"20001: address in use"``), one entry per port; the others are restored.
        """
        failed: list[str] = []
        for record in records:
            port = record.port
            if port in self.leases:
                failed.append(f"{port}: listed twice")
                continue
            if self.descriptors is not None and not self.descriptors.room(2):
                failed.append(f"{port}: short of file descriptors")
                continue
            try:
                listeners = await self._open(port)
            except OSError as exc:
                failed.append(f"{port}: {exc.strerror or exc}")
                continue
            if self.descriptors is not None:
                self.descriptors.opened(len(listeners))
            left = self.lease_seconds
            if record.expires is not None:
                left = min(left, record.expires - wall)
            lease = PortLease(port, record.token, record.tunnel_id, listeners)
            lease.expires_at = self._clock() + max(0.0, left)
            self._add(lease)
        return failed
