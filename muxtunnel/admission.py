"""Admission of connections before authentication: per-source limits, early drop, bans.

Plain synchronous bookkeeping (the caller passes the clock); the relay's trio glue lives in
:mod:`muxtunnel.server`. A *source* is an IPv4 address or an IPv6 /64 (:func:`source_of`).

* At most ``max_startups`` connections are in the TLS + authentication phase at once, and at
  most ``per_source`` of them from one source: a source at its limit is refused at once.
* When the total is full, a newcomer whose source has fewer pending handshakes than the
  heaviest source evicts that source's oldest pending handshake (like OpenSSH's MaxStartups
  early drop, but deterministic), so one source cannot lock everyone else out.
* ``auth_failures`` failed authentications of a source within ``failure_window`` seconds ban
  it for ``ban`` seconds, doubled for each further ban (at most ``max_ban``); connections from
  a banned source are closed right after accept. A source forgets its ban history once it has
  stayed clean for ``max_ban`` seconds after its last ban.
* At most ``max_sources`` sources are remembered (least recently active are forgotten first;
  sources with a pending handshake are always kept).
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "MAX_BAN",
    "Admission",
    "Ban",
    "Decision",
    "Ticket",
    "Verdict",
    "source_of",
]

#: Longest ban in seconds, and how long a source's ban history is kept after its last ban.
MAX_BAN = 3600.0
#: Window in seconds in which ``auth_failures`` failures lead to a ban.
FAILURE_WINDOW = 60.0
#: Sources remembered at most (a record costs a few hundred bytes).
MAX_SOURCES = 16384


def source_of(host: str) -> str:
    """The source key of a peer address: the IPv4 address, or the IPv6 /64 network.

    IPv4-mapped IPv6 addresses count as their IPv4 address; anything that is not an IP
    literal is its own source.
    """
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(eq=False, slots=True)
class Ticket:
    """One admitted connection in the pre-authentication phase."""

    source: str
    started: float
    seq: int
    #: False once released (authenticated, failed, gone) or evicted.
    active: bool = True


class Verdict(Enum):
    """What :meth:`Admission.admit` decided."""

    ADMITTED = "admitted"
    BANNED = "source is banned"
    SOURCE_FULL = "too many handshakes from this source"
    FULL = "too many handshakes in total"


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict, the new ticket if admitted and the pending handshake it evicted, if any."""

    verdict: Verdict
    ticket: Ticket | None = None
    evicted: Ticket | None = None


@dataclass(frozen=True, slots=True)
class Ban:
    """A ban that just started: its length, the failures that caused it and what to cut."""

    source: str
    seconds: float
    failures: int
    #: The source's pending handshakes (now released): close them.
    evicted: tuple[Ticket, ...]


@dataclass(slots=True)
class _Source:
    pending: dict[Ticket, None] = field(default_factory=dict)  # insertion order = age
    failures: deque[float] = field(default_factory=deque)
    bans: int = 0
    banned_until: float = -math.inf
    last_ban_end: float = -math.inf


class Admission:
    """Pre-authentication limits and bans for the relay (see the module docstring)."""

    def __init__(
        self,
        *,
        max_startups: int = 256,
        per_source: int = 10,
        auth_failures: int = 5,
        ban: float = 60.0,
        max_ban: float = MAX_BAN,
        failure_window: float = FAILURE_WINDOW,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        if min(max_startups, per_source, auth_failures, max_sources) < 1:
            raise ValueError("limits must be at least 1")
        self.max_startups = max_startups
        self.per_source = per_source
        self.auth_failures = auth_failures
        self.ban = ban
        self.max_ban = max(max_ban, ban)
        self.failure_window = failure_window
        self.max_sources = max_sources
        #: Connections in the pre-authentication phase now.
        self.total = 0
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        #: Sources with at least one pending handshake.
        self._busy: dict[str, _Source] = {}
        self._seq = 0

    # -- queries ---------------------------------------------------------------------------

    def pending(self, source: str) -> int:
        """Handshakes of ``source`` in progress."""
        record = self._sources.get(source)
        return 0 if record is None else len(record.pending)

    def banned_for(self, source: str, now: float) -> float:
        """Seconds left of ``source``'s ban (0.0 if it is not banned)."""
        record = self._sources.get(source)
        if record is None or record.banned_until <= now:
            return 0.0
        return record.banned_until - now

    def __len__(self) -> int:
        """Sources remembered."""
        return len(self._sources)

    # -- admission -------------------------------------------------------------------------

    def admit(self, source: str, now: float) -> Decision:
        """Decide on a new connection from ``source`` (call right after accept)."""
        record = self._sources.get(source)
        if record is not None and record.banned_until > now:
            return Decision(Verdict.BANNED)
        count = 0 if record is None else len(record.pending)
        if count >= self.per_source:
            return Decision(Verdict.SOURCE_FULL)
        evicted: Ticket | None = None
        if self.total >= self.max_startups:
            victim = self._heaviest()
            if victim is None or len(victim.pending) <= count:
                return Decision(Verdict.FULL)
            evicted = next(iter(victim.pending))
            self.release(evicted)
        if record is None:
            record = self._record(source, now)
        else:
            self._sources.move_to_end(source)
        self._seq += 1
        ticket = Ticket(source, now, self._seq)
        record.pending[ticket] = None
        self._busy[source] = record
        self.total += 1
        return Decision(Verdict.ADMITTED, ticket, evicted)

    def _heaviest(self) -> _Source | None:
        """The source with the most pending handshakes; ties: the one with the oldest."""
        best: _Source | None = None
        best_key: tuple[int, int] = (0, 0)
        for record in self._busy.values():
            key = (len(record.pending), -next(iter(record.pending)).seq)
            if best is None or key > best_key:
                best, best_key = record, key
        return best

    def release(self, ticket: Ticket) -> None:
        """The connection left the pre-authentication phase (idempotent)."""
        if not ticket.active:
            return
        ticket.active = False
        self.total -= 1
        record = self._sources[ticket.source]  # records with pending tickets are never dropped
        record.pending.pop(ticket, None)
        if not record.pending:
            self._busy.pop(ticket.source, None)

    # -- authentication failures -----------------------------------------------------------

    def auth_failed(self, source: str, now: float) -> Ban | None:
        """Count a failed authentication; return the ban it triggers, if any."""
        record = self._sources.get(source)
        if record is None:
            record = self._record(source, now)
        else:
            self._sources.move_to_end(source)
        if record.banned_until > now:
            return None  # already banned: the connection raced the ban
        failures = record.failures
        failures.append(now)
        while failures and failures[0] <= now - self.failure_window:
            failures.popleft()
        if len(failures) < self.auth_failures:
            return None
        count = len(failures)
        failures.clear()
        if now - record.last_ban_end >= self.max_ban:
            record.bans = 0
        record.bans += 1
        seconds = min(self.ban * 2 ** min(record.bans - 1, 62), self.max_ban)
        record.banned_until = now + seconds
        record.last_ban_end = record.banned_until
        evicted = tuple(record.pending)
        for ticket in evicted:
            self.release(ticket)
        return Ban(source, seconds, count, evicted)

    # -- memory ----------------------------------------------------------------------------

    def _forgettable(self, record: _Source, now: float) -> bool:
        return (
            not record.pending
            and (not record.failures or record.failures[-1] <= now - self.failure_window)
            and now - record.last_ban_end >= self.max_ban
        )

    def _record(self, source: str, now: float) -> _Source:
        """Create the record of a new source, forgetting old ones to stay within bounds."""
        sources = self._sources
        # Drop idle records at the old end; stop at the first one still needed.
        while sources:
            oldest = next(iter(sources.values()))
            if not self._forgettable(oldest, now):
                break
            sources.popitem(last=False)
        if len(sources) >= self.max_sources:
            # Full of records still needed: forget the least recently active without a
            # pending handshake (at most max_startups records have one).
            for key, record in sources.items():
                if not record.pending:
                    del sources[key]
                    break
        record = _Source()
        sources[source] = record
        return record
