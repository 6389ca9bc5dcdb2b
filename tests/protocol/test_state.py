"""The stream transition table: every (state, input) pair."""

from __future__ import annotations

import itertools

import pytest

from muxtunnel.errors import StreamStateError
from muxtunnel.protocol.state import (
    RECV_DATA_STATES,
    SEND_DATA_STATES,
    SEND_WINDOW_STATES,
    TRANSITIONS,
    StreamInput,
    StreamState,
    transition,
)

S = StreamState
I = StreamInput  # noqa: E741

#: The table written out independently, as the spec's prose states it.
ALLOWED: dict[tuple[StreamState, StreamInput], StreamState] = {
    (S.IDLE, I.SEND_OPEN): S.OPENING_OUT,
    (S.IDLE, I.RECV_OPEN): S.OPENING_IN,
    **{(S.OPENING_OUT, i): S.OPENING_OUT for i in (I.SEND_DATA, I.SEND_WINDOW)},
    (S.OPENING_OUT, I.SEND_FIN): S.OPENING_OUT_LOCAL_DONE,
    (S.OPENING_OUT, I.SEND_RESET): S.CLOSED,
    (S.OPENING_OUT, I.RECV_ACK): S.OPEN,
    (S.OPENING_OUT, I.RECV_FAIL): S.CLOSED,
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
    **{(S.LOCAL_DONE, i): S.LOCAL_DONE for i in (I.RECV_DATA, I.SEND_WINDOW, I.RECV_WINDOW)},
    (S.LOCAL_DONE, I.RECV_FIN): S.CLOSED,
    (S.LOCAL_DONE, I.SEND_RESET): S.CLOSED,
    (S.LOCAL_DONE, I.RECV_RESET): S.CLOSED,
    **{(S.REMOTE_DONE, i): S.REMOTE_DONE for i in (I.SEND_DATA, I.RECV_WINDOW)},
    (S.REMOTE_DONE, I.SEND_FIN): S.CLOSED,
    (S.REMOTE_DONE, I.SEND_RESET): S.CLOSED,
    (S.REMOTE_DONE, I.RECV_RESET): S.CLOSED,
    **{
        (S.CLOSED, i): S.CLOSED
        for i in (I.RECV_DATA, I.RECV_FIN, I.RECV_WINDOW, I.RECV_RESET, I.RECV_ACK, I.RECV_FAIL)
    },
}


@pytest.mark.parametrize(
    ("state", "inp"), list(itertools.product(StreamState, StreamInput)), ids=str
)
def test_every_state_input_pair(state: StreamState, inp: StreamInput) -> None:
    expected = ALLOWED.get((state, inp))
    if expected is None:
        assert (state, inp) not in TRANSITIONS
        with pytest.raises(StreamStateError):
            transition(state, inp)
    else:
        assert transition(state, inp) is expected


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
