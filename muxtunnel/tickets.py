"""The relay's resumption tickets (protocol-spec.md §10.6).

A ticket is 32 random bytes the relay gives a client in TICKET: with it, the client can take
its session over on a new connection after the old one dropped (RESUME, after a full AUTH).
The relay keeps only the SHA-256 of each ticket, bound to the token name that authenticated
the session and to the session itself; the ticket itself is never stored or logged.

Rules:

- :meth:`TicketBook.issue` gives a new session its first ticket; :meth:`TicketBook.rotate`
  a fresh one after each resume. Live after a resume: the fresh ticket and the one that resume
  presented (the fresh TICKET may be lost with the new connection before the client has it);
  every older ticket is dead, so at most two live tickets per session;
- :meth:`TicketBook.claim` finds the session of a ticket presented with a given token and holds
  the session for that resume (a second RESUME meanwhile finds nothing); a ticket of another
  token, an unknown, superseded or expired one all give None (one answer, no oracle), and a
  ticket presented with the wrong token stays valid for its owner;
- while the session's connection is up its tickets do not expire; from the loss on they live
  for the resume window (:meth:`TicketBook.suspended`), again without limit once rotated;
- :meth:`TicketBook.revoke` (the session ended) and :meth:`TicketBook.revoke_token` (its token
  was removed by a reload) drop tickets for good.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from muxtunnel.protocol.constants import TICKET_SIZE

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["TicketBook"]

_S = TypeVar("_S")


def _digest(ticket: bytes) -> bytes:
    return hashlib.sha256(ticket).digest()


@dataclass(slots=True)
class _Record(Generic[_S]):
    """The tickets of one session."""

    token: str
    session: _S
    #: Digest of the newest ticket sent.
    current: bytes
    #: Digest of the ticket the last resume presented (the client may not have the newer one).
    previous: bytes | None = None
    #: Clock time after which the tickets are dead (None: not before the session ends).
    expires: float | None = None
    #: The digest a resume under way presented (None: no resume under way).
    claimed: bytes | None = None

    def digests(self) -> tuple[bytes, ...]:
        return (self.current,) if self.previous is None else (self.current, self.previous)


class TicketBook(Generic[_S]):
    """Ticket digests → (token name, session, expiry); at most two live tickets per session.

    ``clock`` is the time source of the expiries (the relay passes ``trio.current_time``).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        #: Digest -> the record holding it.
        self._digests: dict[bytes, _Record[_S]] = {}
        self._records: dict[_S, _Record[_S]] = {}

    def __len__(self) -> int:
        """Live tickets."""
        return len(self._digests)

    def issue(self, token: str, session: _S) -> bytes:
        """The first ticket of a new ``session`` of ``token`` (any earlier one dies)."""
        self.revoke(session)
        ticket, digest = _fresh()
        record = _Record(token, session, digest)
        self._records[session] = record
        self._digests[digest] = record
        return ticket

    def rotate(self, session: _S) -> bytes | None:
        """A fresh ticket for ``session`` after a resume; None if it has no tickets (revoked).

        The ticket that resume presented stays valid as well (the client may lose the new
        TICKET with its connection); every older one dies.
        """
        record = self._records.get(session)
        if record is None:
            return None
        kept = record.claimed
        for digest in record.digests():
            if digest != kept:
                del self._digests[digest]
        ticket, digest = _fresh()
        record.current, record.previous, record.claimed = digest, kept, None
        record.expires = None
        self._digests[digest] = record
        return ticket

    def suspended(self, session: _S, window: float) -> None:
        """The session lost its connection: its tickets die ``window`` seconds from now."""
        record = self._records.get(session)
        if record is not None:
            record.expires = self._clock() + window

    def lookup(self, ticket: bytes, token: str) -> _S | None:
        """The session ``ticket`` resumes when presented with ``token``, or None."""
        record = self._digests.get(_digest(ticket))
        if record is None or record.token != token or record.claimed is not None:
            return None
        if record.expires is not None and self._clock() >= record.expires:
            self.revoke(record.session)
            return None
        return record.session

    def claim(self, ticket: bytes, token: str) -> _S | None:
        """Like :meth:`lookup`, and the session is held for this resume: further lookups find
        nothing until :meth:`rotate` (success) or :meth:`unclaim` (the resume did not get as
        far as the session)."""
        session = self.lookup(ticket, token)
        if session is not None:
            self._records[session].claimed = _digest(ticket)
        return session

    def unclaim(self, session: _S) -> None:
        """The resume that claimed ``session`` failed early: its tickets are valid again."""
        record = self._records.get(session)
        if record is not None:
            record.claimed = None

    def claimed(self, session: _S) -> bool:
        """True while a resume of ``session`` is under way (claimed, not yet rotated)."""
        record = self._records.get(session)
        return record is not None and record.claimed is not None

    def holds(self, session: _S) -> bool:
        """True if ``session`` has a live ticket."""
        return session in self._records

    def revoke(self, session: _S) -> None:
        """Drop the tickets of ``session`` (ended or revoked); idempotent."""
        record = self._records.pop(session, None)
        if record is not None:
            for digest in record.digests():
                self._digests.pop(digest, None)

    def revoke_token(self, token: str) -> int:
        """Drop every ticket of ``token`` (removed by a reload); how many sessions had some."""
        sessions = [r.session for r in self._records.values() if r.token == token]
        for session in sessions:
            self.revoke(session)
        return len(sessions)


def _fresh() -> tuple[bytes, bytes]:
    ticket = secrets.token_bytes(TICKET_SIZE)
    return ticket, _digest(ticket)
