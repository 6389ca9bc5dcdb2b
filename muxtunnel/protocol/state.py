"""The stream state machine: ONE table of ``(state, input) -> state`` (protocol-spec.md §9.3).

Every rule about which frame may be sent or received in which stream state lives in
:data:`TRANSITIONS`, and every state change goes through :func:`advance`. A pair
that is not in the table is an error; the session decides which one (a peer fault becomes a
``ProtocolError`` subclass, a local misuse a ``LocalProtocolError`` raised without any CLOSE),
because the wire code depends on context (spec §13.2):

* ``RECV_DATA``/``RECV_FIN`` after the peer's FIN is a *stream* error (RESET STREAM_STATE_ERROR)
  once we answered the OPEN, and a *connection* STREAM_STATE_ERROR before that (the acceptor
  cannot RESET before its answer);
* any frame but OPEN_ACK/OPEN_FAIL from the acceptor before its answer, a second OPEN_ACK, or an
  OPEN_FAIL after OPEN_ACK is a *connection* PROTOCOL_ERROR.

``SEND_FIN`` fires when the FIN is framed by the scheduler (after every queued byte), not when
the application asks for it, so "both FINs exchanged" always means "on the wire". The ``CLOSED``
row describes late frames on a known-closed stream: they are accepted and ignored (DATA is
discarded but credited by the session).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol

__all__ = [
    "RECV_DATA_STATES",
    "SEND_DATA_STATES",
    "SEND_WINDOW_STATES",
    "TRANSITIONS",
    "Stateful",
    "StreamInput",
    "StreamState",
    "advance",
    "allows",
]


class StreamState(IntEnum):
    """Where a stream is in its life (§9.3)."""

    #: Not opened yet (the state before OPEN is sent or received).
    IDLE = 0
    #: We sent OPEN; no answer yet. We may pipeline DATA.
    OPENING_OUT = 1
    #: We sent OPEN and our FIN; no answer yet.
    OPENING_OUT_LOCAL_DONE = 2
    #: The peer sent OPEN; we have not answered. Its early DATA is held.
    OPENING_IN = 3
    #: The peer sent OPEN and its FIN; we have not answered.
    OPENING_IN_REMOTE_DONE = 4
    #: Both directions open.
    OPEN = 5
    #: Our FIN is on the wire; the peer's direction is still open.
    LOCAL_DONE = 6
    #: The peer's FIN arrived; our direction is still open.
    REMOTE_DONE = 7
    #: Both FINs exchanged, a RESET sent or received, or an OPEN_FAIL sent or received.
    CLOSED = 8


class StreamInput(IntEnum):
    """Things that happen to a stream: frames we send (SEND_*) or receive (RECV_*)."""

    SEND_OPEN = 0
    RECV_OPEN = 1
    SEND_ACK = 2
    RECV_ACK = 3
    SEND_FAIL = 4
    RECV_FAIL = 5
    SEND_DATA = 6
    RECV_DATA = 7
    SEND_FIN = 8
    RECV_FIN = 9
    SEND_WINDOW = 10
    RECV_WINDOW = 11
    SEND_RESET = 12
    RECV_RESET = 13
    #: The peer's GOAWAY names a lower ``last_stream_id``: our stream was not processed (§10.2).
    RECV_GOAWAY = 14


_S = StreamState
_I = StreamInput

#: The whole stream state machine. Absent pair = not allowed.
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    # Opening.
    (_S.IDLE, _I.SEND_OPEN): _S.OPENING_OUT,
    (_S.IDLE, _I.RECV_OPEN): _S.OPENING_IN,
    # We opened; the acceptor's first frame must be OPEN_ACK or OPEN_FAIL.
    (_S.OPENING_OUT, _I.SEND_DATA): _S.OPENING_OUT,
    (_S.OPENING_OUT, _I.SEND_FIN): _S.OPENING_OUT_LOCAL_DONE,
    (_S.OPENING_OUT, _I.SEND_WINDOW): _S.OPENING_OUT,
    (_S.OPENING_OUT, _I.SEND_RESET): _S.CLOSED,
    (_S.OPENING_OUT, _I.RECV_ACK): _S.OPEN,
    (_S.OPENING_OUT, _I.RECV_FAIL): _S.CLOSED,
    (_S.OPENING_OUT, _I.RECV_GOAWAY): _S.CLOSED,
    (_S.OPENING_OUT_LOCAL_DONE, _I.SEND_WINDOW): _S.OPENING_OUT_LOCAL_DONE,
    (_S.OPENING_OUT_LOCAL_DONE, _I.SEND_RESET): _S.CLOSED,
    (_S.OPENING_OUT_LOCAL_DONE, _I.RECV_ACK): _S.LOCAL_DONE,
    (_S.OPENING_OUT_LOCAL_DONE, _I.RECV_FAIL): _S.CLOSED,
    (_S.OPENING_OUT_LOCAL_DONE, _I.RECV_GOAWAY): _S.CLOSED,
    # The peer opened; our first frame must be OPEN_ACK or OPEN_FAIL.
    (_S.OPENING_IN, _I.RECV_DATA): _S.OPENING_IN,
    (_S.OPENING_IN, _I.RECV_FIN): _S.OPENING_IN_REMOTE_DONE,
    (_S.OPENING_IN, _I.RECV_WINDOW): _S.OPENING_IN,
    (_S.OPENING_IN, _I.RECV_RESET): _S.CLOSED,
    (_S.OPENING_IN, _I.SEND_ACK): _S.OPEN,
    (_S.OPENING_IN, _I.SEND_FAIL): _S.CLOSED,
    (_S.OPENING_IN_REMOTE_DONE, _I.RECV_WINDOW): _S.OPENING_IN_REMOTE_DONE,
    (_S.OPENING_IN_REMOTE_DONE, _I.RECV_RESET): _S.CLOSED,
    (_S.OPENING_IN_REMOTE_DONE, _I.SEND_ACK): _S.REMOTE_DONE,
    (_S.OPENING_IN_REMOTE_DONE, _I.SEND_FAIL): _S.CLOSED,
    # Both directions open.
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_WINDOW): _S.OPEN,
    (_S.OPEN, _I.RECV_WINDOW): _S.OPEN,
    (_S.OPEN, _I.SEND_FIN): _S.LOCAL_DONE,
    (_S.OPEN, _I.RECV_FIN): _S.REMOTE_DONE,
    (_S.OPEN, _I.SEND_RESET): _S.CLOSED,
    (_S.OPEN, _I.RECV_RESET): _S.CLOSED,
    (_S.OPEN, _I.RECV_GOAWAY): _S.CLOSED,
    # Our direction finished.
    (_S.LOCAL_DONE, _I.RECV_DATA): _S.LOCAL_DONE,
    (_S.LOCAL_DONE, _I.SEND_WINDOW): _S.LOCAL_DONE,
    (_S.LOCAL_DONE, _I.RECV_WINDOW): _S.LOCAL_DONE,
    (_S.LOCAL_DONE, _I.RECV_FIN): _S.CLOSED,
    (_S.LOCAL_DONE, _I.SEND_RESET): _S.CLOSED,
    (_S.LOCAL_DONE, _I.RECV_RESET): _S.CLOSED,
    (_S.LOCAL_DONE, _I.RECV_GOAWAY): _S.CLOSED,
    # The peer's direction finished: no more DATA may come, so we send no stream WINDOW.
    (_S.REMOTE_DONE, _I.SEND_DATA): _S.REMOTE_DONE,
    (_S.REMOTE_DONE, _I.RECV_WINDOW): _S.REMOTE_DONE,
    (_S.REMOTE_DONE, _I.SEND_FIN): _S.CLOSED,
    (_S.REMOTE_DONE, _I.SEND_RESET): _S.CLOSED,
    (_S.REMOTE_DONE, _I.RECV_RESET): _S.CLOSED,
    (_S.REMOTE_DONE, _I.RECV_GOAWAY): _S.CLOSED,
    # Late frames on a known-closed stream: minimally processed, then ignored.
    (_S.CLOSED, _I.RECV_DATA): _S.CLOSED,
    (_S.CLOSED, _I.RECV_FIN): _S.CLOSED,
    (_S.CLOSED, _I.RECV_WINDOW): _S.CLOSED,
    (_S.CLOSED, _I.RECV_RESET): _S.CLOSED,
    (_S.CLOSED, _I.RECV_ACK): _S.CLOSED,
    (_S.CLOSED, _I.RECV_FAIL): _S.CLOSED,
}


def _states_allowing(inp: StreamInput) -> frozenset[StreamState]:
    return frozenset(s for (s, i), nxt in TRANSITIONS.items() if i is inp and nxt is s)


#: Live states in which DATA (without FIN) may arrive and leaves the state unchanged (hot path).
RECV_DATA_STATES = _states_allowing(_I.RECV_DATA) - {_S.CLOSED}
#: States in which the application may queue DATA.
SEND_DATA_STATES = _states_allowing(_I.SEND_DATA)
#: States in which we may send a stream WINDOW.
SEND_WINDOW_STATES = _states_allowing(_I.SEND_WINDOW)


class Stateful(Protocol):
    """Anything that carries a stream state (the session's stream objects)."""

    state: StreamState


def allows(stream: Stateful, inp: StreamInput) -> bool:
    """True if ``inp`` may happen in the stream's current state."""
    return (stream.state, inp) in TRANSITIONS


def advance(stream: Stateful, inp: StreamInput) -> StreamState | None:
    """Apply ``inp`` to ``stream``: the new state, or None (unchanged) if the table forbids it.

    The only place where a stream's state changes.
    """
    nxt = TRANSITIONS.get((stream.state, inp))
    if nxt is not None:
        stream.state = nxt
    return nxt
