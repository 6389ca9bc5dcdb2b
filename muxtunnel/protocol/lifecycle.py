"""The session's own state machine: one table per role (protocol-spec.md §3, §7.1, §10.3).

Like the stream table of :mod:`~muxtunnel.protocol.state`, every change of the session's
lifecycle state goes through :meth:`Lifecycle.advance`, and a ``(state, input)`` pair that is
not in the role's table is not allowed; the session decides what that means (a peer fault
becomes a ``ProtocolError``, our own misuse a ``LocalProtocolError``).

The preface is checked by the frame reader before any frame exists; the first frame must then
be HELLO (§3.2). The server sends CHALLENGE (before or after the client's HELLO), the client
answers with AUTH, and the server's RESULT for the AUTH opens the session or ends it (§7.1).
The client's AUTH itself is a request (:mod:`~muxtunnel.protocol.requests`), sent once; its
RESULT may only come after the CHALLENGE.
CLOSE, sent or received, or any connection error, ends it from every state (§10.3).

GOAWAY (§10.2) is not a lifecycle state: it forbids new streams and carries the
``last_stream_id`` values that the session keeps; a draining session stays OPEN.

Session resumption (§10.6): an OPEN session whose transport is lost becomes SUSPENDED. The
relay's old session goes back to OPEN when a new connection resumes it; the relay's handshake
session of that connection takes a RESUME between the client's HELLO and its AUTH. The client's
old session runs a resume handshake of its own on the new connection (RESUME_* states): the
relay's HELLO, its CHALLENGE, our RESUME and AUTH, the RESULT for the AUTH, then RESUMED
(back to OPEN) or a refusal (CLOSE). A failed handshake returns to SUSPENDED.
"""

from __future__ import annotations

from enum import IntEnum

from .constants import Role

__all__ = [
    "CLIENT_TRANSITIONS",
    "RESUME_HANDSHAKE",
    "SERVER_TRANSITIONS",
    "Lifecycle",
    "SessionInput",
    "SessionState",
]


class SessionState(IntEnum):
    """Where the session is in its life."""

    #: Waiting for the peer's preface and HELLO.
    AWAIT_HELLO = 0
    #: Server: CHALLENGE sent before the client's HELLO arrived.
    CHALLENGE_SENT = 1
    #: Server: HELLO received, CHALLENGE not sent yet. Client: waiting for CHALLENGE.
    HELLO_RECEIVED = 2
    #: Server: HELLO received and CHALLENGE sent; waiting for AUTH.
    AWAIT_AUTH = 3
    #: Client: CHALLENGE received; the RESULT of our AUTH may come.
    CHALLENGE_RECEIVED = 4
    #: Server: AUTH received; every later frame is held until the application's RESULT.
    AUTH_RECEIVED = 5
    #: Client: the AUTH was refused; the server's CLOSE follows.
    AUTH_REFUSED = 6
    #: Authenticated: streams and tunnel requests are allowed.
    OPEN = 7
    #: CLOSE sent or received, or a connection error: nothing more happens.
    CLOSED = 8
    #: Resumption on, the transport is lost: the session keeps everything and waits.
    SUSPENDED = 9
    #: Server: a RESUME arrived after the client's HELLO; CHALLENGE not sent yet.
    RESUME_HELLO_RECEIVED = 10
    #: Server: a RESUME arrived; waiting for the AUTH that follows it.
    RESUME_RECEIVED = 11
    #: Client (resume handshake): MAGIC + HELLO queued; waiting for the relay's HELLO.
    RESUME_AWAIT_HELLO = 12
    #: Client (resume handshake): the relay's HELLO arrived; waiting for CHALLENGE.
    RESUME_HELLO_RECEIVED_CLIENT = 13
    #: Client (resume handshake): CHALLENGE arrived; RESUME not sent yet.
    RESUME_CHALLENGE_RECEIVED = 14
    #: Client (resume handshake): RESUME queued; AUTH not sent yet.
    RESUME_SENT = 15
    #: Client (resume handshake): RESUME and AUTH queued; waiting for the AUTH's RESULT.
    RESUME_AUTH_SENT = 16
    #: Client (resume handshake): the AUTH succeeded; waiting for RESUMED or a refusal.
    RESUME_AUTHENTICATED = 17


class SessionInput(IntEnum):
    """Things that happen to the session."""

    RECV_HELLO = 0
    SEND_CHALLENGE = 1
    RECV_CHALLENGE = 2
    RECV_AUTH = 3
    #: RESULT(OK) for the AUTH, sent (server) or received (client).
    AUTH_OK = 4
    #: Client: any other RESULT for the AUTH (the server refuses with CLOSE, §7.1).
    AUTH_REFUSED = 5
    #: CLOSE sent or received, or a connection error.
    CLOSE = 6
    #: The transport is lost (or a resume handshake failed): keep the session.
    SUSPEND = 7
    #: Relay: continue the session on a new connection. Client: RESUMED received.
    RESUME = 8
    #: Server: RESUME received (before the AUTH).
    RECV_RESUME = 9
    #: Client: start a resume handshake on a new connection.
    BEGIN_RESUME = 10
    #: Client: RESUME queued.
    SEND_RESUME = 11
    #: Client: the AUTH of a resume handshake queued.
    SEND_AUTH = 12


_S = SessionState
_I = SessionInput


def _with_close(
    table: dict[tuple[SessionState, SessionInput], SessionState],
) -> dict[tuple[SessionState, SessionInput], SessionState]:
    live = {state for state, _inp in table} | set(table.values())
    table.update({(state, _I.CLOSE): _S.CLOSED for state in live - {_S.CLOSED}})
    return table


#: The server's lifecycle. Absent pair = not allowed.
SERVER_TRANSITIONS = _with_close(
    {
        (_S.AWAIT_HELLO, _I.RECV_HELLO): _S.HELLO_RECEIVED,
        (_S.AWAIT_HELLO, _I.SEND_CHALLENGE): _S.CHALLENGE_SENT,
        (_S.CHALLENGE_SENT, _I.RECV_HELLO): _S.AWAIT_AUTH,
        (_S.HELLO_RECEIVED, _I.SEND_CHALLENGE): _S.AWAIT_AUTH,
        (_S.AWAIT_AUTH, _I.RECV_AUTH): _S.AUTH_RECEIVED,
        (_S.AUTH_RECEIVED, _I.AUTH_OK): _S.OPEN,
        # Resumption (§10.6): a RESUME comes between the client's HELLO and its AUTH.
        (_S.HELLO_RECEIVED, _I.RECV_RESUME): _S.RESUME_HELLO_RECEIVED,
        (_S.RESUME_HELLO_RECEIVED, _I.SEND_CHALLENGE): _S.RESUME_RECEIVED,
        (_S.AWAIT_AUTH, _I.RECV_RESUME): _S.RESUME_RECEIVED,
        (_S.RESUME_RECEIVED, _I.RECV_AUTH): _S.AUTH_RECEIVED,
        (_S.OPEN, _I.SUSPEND): _S.SUSPENDED,
        (_S.SUSPENDED, _I.RESUME): _S.OPEN,
    }
)

#: The client's lifecycle. Absent pair = not allowed.
CLIENT_TRANSITIONS = _with_close(
    {
        (_S.AWAIT_HELLO, _I.RECV_HELLO): _S.HELLO_RECEIVED,
        (_S.HELLO_RECEIVED, _I.RECV_CHALLENGE): _S.CHALLENGE_RECEIVED,
        (_S.CHALLENGE_RECEIVED, _I.AUTH_OK): _S.OPEN,
        (_S.CHALLENGE_RECEIVED, _I.AUTH_REFUSED): _S.AUTH_REFUSED,
        # Resumption (§10.6).
        (_S.OPEN, _I.SUSPEND): _S.SUSPENDED,
        (_S.SUSPENDED, _I.BEGIN_RESUME): _S.RESUME_AWAIT_HELLO,
        (_S.RESUME_AWAIT_HELLO, _I.RECV_HELLO): _S.RESUME_HELLO_RECEIVED_CLIENT,
        (_S.RESUME_HELLO_RECEIVED_CLIENT, _I.RECV_CHALLENGE): _S.RESUME_CHALLENGE_RECEIVED,
        (_S.RESUME_CHALLENGE_RECEIVED, _I.SEND_RESUME): _S.RESUME_SENT,
        (_S.RESUME_SENT, _I.SEND_AUTH): _S.RESUME_AUTH_SENT,
        (_S.RESUME_AUTH_SENT, _I.AUTH_OK): _S.RESUME_AUTHENTICATED,
        (_S.RESUME_AUTH_SENT, _I.AUTH_REFUSED): _S.AUTH_REFUSED,
        (_S.RESUME_AUTHENTICATED, _I.RESUME): _S.OPEN,
        **{
            (state, _I.SUSPEND): _S.SUSPENDED
            for state in (
                _S.RESUME_AWAIT_HELLO,
                _S.RESUME_HELLO_RECEIVED_CLIENT,
                _S.RESUME_CHALLENGE_RECEIVED,
                _S.RESUME_SENT,
                _S.RESUME_AUTH_SENT,
                _S.RESUME_AUTHENTICATED,
            )
        },
    }
)

_BEFORE_HELLO = frozenset({_S.AWAIT_HELLO, _S.CHALLENGE_SENT})
#: The client's resume-handshake states (§10.6): only handshake frames go in and out.
RESUME_HANDSHAKE = frozenset(
    {
        _S.RESUME_AWAIT_HELLO,
        _S.RESUME_HELLO_RECEIVED_CLIENT,
        _S.RESUME_CHALLENGE_RECEIVED,
        _S.RESUME_SENT,
        _S.RESUME_AUTH_SENT,
        _S.RESUME_AUTHENTICATED,
    }
)


class Lifecycle:
    """The lifecycle state of one session, for one role."""

    __slots__ = ("_table", "authenticated", "closed", "state")

    def __init__(self, role: Role) -> None:
        self._table = SERVER_TRANSITIONS if role == Role.SERVER else CLIENT_TRANSITIONS
        self.state = _S.AWAIT_HELLO
        #: The AUTH succeeded (and stays so once the session is closed). Set by :meth:`advance`.
        self.authenticated = False
        #: The state is CLOSED. Set by :meth:`advance` (read on every call of the session).
        self.closed = False

    def allows(self, inp: SessionInput) -> bool:
        """True if ``inp`` may happen in the current state."""
        return (self.state, inp) in self._table

    def advance(self, inp: SessionInput) -> SessionState | None:
        """Apply ``inp``: the new state, or None (state unchanged) if the table forbids it."""
        nxt = self._table.get((self.state, inp))
        if nxt is not None:
            self.state = nxt
            if nxt is _S.OPEN:
                self.authenticated = True
            elif nxt is _S.CLOSED:
                self.closed = True
        return nxt

    @property
    def hello_received(self) -> bool:
        """The peer's HELLO has arrived (or the session is closed)."""
        return self.state not in _BEFORE_HELLO
