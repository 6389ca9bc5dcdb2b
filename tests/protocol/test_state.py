"""The stream transition table (every (state, input) pair) and the session lifecycle tables."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from muxtunnel.protocol.constants import Role
from muxtunnel.protocol.lifecycle import (
    CLIENT_TRANSITIONS,
    SERVER_TRANSITIONS,
    Lifecycle,
    SessionInput,
    SessionState,
)
from muxtunnel.protocol.state import (
    RECV_DATA_STATES,
    SEND_DATA_STATES,
    SEND_WINDOW_STATES,
    TRANSITIONS,
    StreamInput,
    StreamState,
    advance,
    allows,
)

S = StreamState
I = StreamInput  # noqa: E741


@dataclass
class _Stream:
    state: StreamState


#: The table written out independently, as the spec's prose states it.
ALLOWED: dict[tuple[StreamState, StreamInput], StreamState] = {
    (S.IDLE, I.SEND_OPEN): S.OPENING_OUT,
    (S.IDLE, I.RECV_OPEN): S.OPENING_IN,
    **{(S.OPENING_OUT, i): S.OPENING_OUT for i in (I.SEND_DATA, I.SEND_WINDOW)},
    (S.OPENING_OUT, I.SEND_FIN): S.OPENING_OUT_LOCAL_DONE,
    (S.OPENING_OUT, I.SEND_RESET): S.CLOSED,
    (S.OPENING_OUT, I.RECV_ACK): S.OPEN,
    (S.OPENING_OUT, I.RECV_FAIL): S.CLOSED,
    (S.OPENING_OUT, I.RECV_GOAWAY): S.CLOSED,
    (S.OPENING_OUT_LOCAL_DONE, I.RECV_GOAWAY): S.CLOSED,
    (S.OPENING_OUT_LOCAL_DONE, I.SEND_WINDOW): S.OPENING_OUT_LOCAL_DONE,
    (S.OPENING_OUT_LOCAL_DONE, I.SEND_RESET): S.CLOSED,
    (S.OPENING_OUT_LOCAL_DONE, I.RECV_ACK): S.LOCAL_DONE,
    (S.OPENING_OUT_LOCAL_DONE, I.RECV_FAIL): S.CLOSED,
    **{(S.OPENING_IN, i): S.OPENING_IN for i in (I.RECV_DATA, I.RECV_WINDOW)},
    (S.OPENING_IN, I.RECV_FIN): S.OPENING_IN_REMOTE_DONE,
    (S.OPENING_IN, I.RECV_RESET): S.CLOSED,
    (S.OPENING_IN, I.SEND_ACK): S.OPEN,
    (S.OPENING_IN, I.SEND_FAIL): S.CLOSED,
    (S.OPENING_IN_REMOTE_DONE, I.RECV_WINDOW): S.OPENING_IN_REMOTE_DONE,
    (S.OPENING_IN_REMOTE_DONE, I.RECV_RESET): S.CLOSED,
    (S.OPENING_IN_REMOTE_DONE, I.SEND_ACK): S.REMOTE_DONE,
    (S.OPENING_IN_REMOTE_DONE, I.SEND_FAIL): S.CLOSED,
    **{(S.OPEN, i): S.OPEN for i in (I.SEND_DATA, I.RECV_DATA, I.SEND_WINDOW, I.RECV_WINDOW)},
    (S.OPEN, I.SEND_FIN): S.LOCAL_DONE,
    (S.OPEN, I.RECV_FIN): S.REMOTE_DONE,
    (S.OPEN, I.SEND_RESET): S.CLOSED,
    (S.OPEN, I.RECV_RESET): S.CLOSED,
    (S.OPEN, I.RECV_GOAWAY): S.CLOSED,
    **{(S.LOCAL_DONE, i): S.LOCAL_DONE for i in (I.RECV_DATA, I.SEND_WINDOW, I.RECV_WINDOW)},
    (S.LOCAL_DONE, I.RECV_FIN): S.CLOSED,
    (S.LOCAL_DONE, I.SEND_RESET): S.CLOSED,
    (S.LOCAL_DONE, I.RECV_RESET): S.CLOSED,
    (S.LOCAL_DONE, I.RECV_GOAWAY): S.CLOSED,
    **{(S.REMOTE_DONE, i): S.REMOTE_DONE for i in (I.SEND_DATA, I.RECV_WINDOW)},
    (S.REMOTE_DONE, I.SEND_FIN): S.CLOSED,
    (S.REMOTE_DONE, I.SEND_RESET): S.CLOSED,
    (S.REMOTE_DONE, I.RECV_RESET): S.CLOSED,
    (S.REMOTE_DONE, I.RECV_GOAWAY): S.CLOSED,
    **{
        (S.CLOSED, i): S.CLOSED
        for i in (I.RECV_DATA, I.RECV_FIN, I.RECV_WINDOW, I.RECV_RESET, I.RECV_ACK, I.RECV_FAIL)
    },
}


@pytest.mark.parametrize(
    ("state", "inp"), list(itertools.product(StreamState, StreamInput)), ids=str
)
def test_every_state_input_pair(state: StreamState, inp: StreamInput) -> None:
    stream = _Stream(state)
    expected = ALLOWED.get((state, inp))
    assert allows(stream, inp) is (expected is not None)
    assert advance(stream, inp) is expected
    assert stream.state is (state if expected is None else expected)


def test_table_has_nothing_else() -> None:
    assert TRANSITIONS == ALLOWED


def test_derived_sets() -> None:
    assert {S.OPENING_IN, S.OPEN, S.LOCAL_DONE} == RECV_DATA_STATES
    assert {S.OPENING_OUT, S.OPEN, S.REMOTE_DONE} == SEND_DATA_STATES
    assert {S.OPENING_OUT, S.OPENING_OUT_LOCAL_DONE, S.OPEN, S.LOCAL_DONE} == SEND_WINDOW_STATES


def test_no_transition_leaves_closed_or_returns_to_idle() -> None:
    for (state, _inp), nxt in TRANSITIONS.items():
        if state is S.CLOSED:
            assert nxt is S.CLOSED
        assert nxt is not S.IDLE


L = SessionState
LI = SessionInput
#: The handshake as spec §3.3 and §7.1 describe it, per role; CLOSE ends every state.
SERVER_ALLOWED = {
    (L.AWAIT_HELLO, LI.RECV_HELLO): L.HELLO_RECEIVED,
    (L.AWAIT_HELLO, LI.SEND_CHALLENGE): L.CHALLENGE_SENT,
    (L.CHALLENGE_SENT, LI.RECV_HELLO): L.AWAIT_AUTH,
    (L.HELLO_RECEIVED, LI.SEND_CHALLENGE): L.AWAIT_AUTH,
    (L.AWAIT_AUTH, LI.RECV_AUTH): L.AUTH_RECEIVED,
    (L.AUTH_RECEIVED, LI.AUTH_OK): L.OPEN,
    # Session resumption (spec §10.6): RESUME between the client's HELLO and its AUTH,
    # and an old session suspended and resumed.
    (L.HELLO_RECEIVED, LI.RECV_RESUME): L.RESUME_HELLO_RECEIVED,
    (L.RESUME_HELLO_RECEIVED, LI.SEND_CHALLENGE): L.RESUME_RECEIVED,
    (L.AWAIT_AUTH, LI.RECV_RESUME): L.RESUME_RECEIVED,
    (L.RESUME_RECEIVED, LI.RECV_AUTH): L.AUTH_RECEIVED,
    (L.OPEN, LI.SUSPEND): L.SUSPENDED,
    (L.SUSPENDED, LI.RESUME): L.OPEN,
}
#: The client's resume handshake on a new connection (spec §10.6); it may fail back to SUSPENDED.
_CLIENT_RESUMING = (
    L.RESUME_AWAIT_HELLO,
    L.RESUME_HELLO_RECEIVED_CLIENT,
    L.RESUME_CHALLENGE_RECEIVED,
    L.RESUME_SENT,
    L.RESUME_AUTH_SENT,
    L.RESUME_AUTHENTICATED,
)
CLIENT_ALLOWED = {
    (L.AWAIT_HELLO, LI.RECV_HELLO): L.HELLO_RECEIVED,
    (L.HELLO_RECEIVED, LI.RECV_CHALLENGE): L.CHALLENGE_RECEIVED,
    (L.CHALLENGE_RECEIVED, LI.AUTH_OK): L.OPEN,
    (L.CHALLENGE_RECEIVED, LI.AUTH_REFUSED): L.AUTH_REFUSED,
    (L.OPEN, LI.SUSPEND): L.SUSPENDED,
    (L.SUSPENDED, LI.BEGIN_RESUME): L.RESUME_AWAIT_HELLO,
    (L.RESUME_AWAIT_HELLO, LI.RECV_HELLO): L.RESUME_HELLO_RECEIVED_CLIENT,
    (L.RESUME_HELLO_RECEIVED_CLIENT, LI.RECV_CHALLENGE): L.RESUME_CHALLENGE_RECEIVED,
    (L.RESUME_CHALLENGE_RECEIVED, LI.SEND_RESUME): L.RESUME_SENT,
    (L.RESUME_SENT, LI.SEND_AUTH): L.RESUME_AUTH_SENT,
    (L.RESUME_AUTH_SENT, LI.AUTH_OK): L.RESUME_AUTHENTICATED,
    (L.RESUME_AUTH_SENT, LI.AUTH_REFUSED): L.AUTH_REFUSED,
    (L.RESUME_AUTHENTICATED, LI.RESUME): L.OPEN,
    **{(state, LI.SUSPEND): L.SUSPENDED for state in _CLIENT_RESUMING},
}


@pytest.mark.parametrize(
    ("role", "table", "allowed"),
    [
        (Role.SERVER, SERVER_TRANSITIONS, SERVER_ALLOWED),
        (Role.CLIENT, CLIENT_TRANSITIONS, CLIENT_ALLOWED),
    ],
    ids=["server", "client"],
)
def test_lifecycle_tables(
    role: Role,
    table: dict[tuple[SessionState, SessionInput], SessionState],
    allowed: dict[tuple[SessionState, SessionInput], SessionState],
) -> None:
    states = {s for s, _ in allowed} | set(allowed.values())
    expected = dict(allowed)
    expected.update({(s, LI.CLOSE): L.CLOSED for s in states})
    assert table == expected
    for state, inp in itertools.product(SessionState, SessionInput):
        life = Lifecycle(role)
        life.state = state
        assert life.allows(inp) is ((state, inp) in expected)
        assert life.advance(inp) is expected.get((state, inp))
        assert life.state is expected.get((state, inp), state)


def test_lifecycle_flags_follow_the_state() -> None:
    life = Lifecycle(Role.SERVER)
    seen = [(life.hello_received, life.authenticated, life.closed)]
    for inp in (LI.SEND_CHALLENGE, LI.RECV_HELLO, LI.RECV_AUTH, LI.AUTH_OK, LI.CLOSE):
        assert life.advance(inp) is not None
        seen.append((life.hello_received, life.authenticated, life.closed))
    assert seen == [
        (False, False, False),
        (False, False, False),  # CHALLENGE sent before the client's HELLO
        (True, False, False),
        (True, False, False),
        (True, True, False),
        (True, True, True),  # authenticated stays true once closed, for statistics
    ]
