"""Every (state, received input) pair, driven through a real Session.

For each stream state the client session is put in (by real API calls on a SessionPair),
the server "sends" each frame kind for that stream. Pairs in the transition table must be
accepted; pairs not in it must raise a ProtocolError (a connection error) -- except DATA/FIN
after the peer's FIN on an answered stream, which is a stream error (RESET, no raise).
Local inputs (send_data, accept_stream, reject_stream) are checked the same way.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import pytest

from muxtunnel.errors import ErrorCode, LocalProtocolError, ProtocolError
from muxtunnel.protocol.constants import OpenFailReason
from muxtunnel.protocol.events import StreamReset
from muxtunnel.protocol.frames import (
    OpenAckFrame,
    OpenFailFrame,
    OpenFrame,
    ResetFrame,
    Settings,
    WindowFrame,
)
from muxtunnel.protocol.session import SessionConfig
from muxtunnel.protocol.state import TRANSITIONS, StreamInput, StreamState

from .helpers import ORIGIN, TARGET, SessionPair, data_frame, frames

if TYPE_CHECKING:
    from collections.abc import Callable

S = StreamState
I = StreamInput  # noqa: E741


def _pair() -> SessionPair:
    # The server allows client-initiated streams, so the client can be opener or acceptor.
    return SessionPair(server_config=SessionConfig(settings=Settings(max_concurrent_streams=8)))


def _client_opens(pair: SessionPair, fin: bool = False) -> int:
    sid = pair.client.open_stream(1, ORIGIN, TARGET)
    if fin:
        pair.client.end_stream(sid)
    pair.send(pair.client)
    return sid


def _server_opens(pair: SessionPair, fin: bool = False) -> int:
    sid = pair.server.open_stream(1, ORIGIN, TARGET)
    if fin:
        pair.server.end_stream(sid)
    pair.send(pair.server)
    return sid


def _open(pair: SessionPair) -> int:
    return pair.open()


def _local_done(pair: SessionPair) -> int:
    sid = pair.open()
    pair.client.end_stream(sid)
    pair.send(pair.client)
    return sid


def _remote_done(pair: SessionPair) -> int:
    sid = pair.open()
    pair.server.end_stream(sid)
    pair.send(pair.server)
    return sid


def _closed(pair: SessionPair) -> int:
    sid = _client_opens(pair)
    pair.client.reset_stream(sid)
    return sid


def _idle(pair: SessionPair) -> int:
    return 2  # the server has opened nothing yet


SETUPS: dict[StreamState, Callable[[SessionPair], int]] = {
    S.IDLE: _idle,
    S.OPENING_OUT: _client_opens,
    S.OPENING_OUT_LOCAL_DONE: lambda p: _client_opens(p, fin=True),
    S.OPENING_IN: _server_opens,
    S.OPENING_IN_REMOTE_DONE: lambda p: _server_opens(p, fin=True),
    S.OPEN: _open,
    S.LOCAL_DONE: _local_done,
    S.REMOTE_DONE: _remote_done,
    S.CLOSED: _closed,
}

#: RECV_GOAWAY is not a frame on the stream: GOAWAY refusals are tested in test_session_streams.
RECV_INPUTS = [i for i in StreamInput if i.name.startswith("RECV_") and i is not I.RECV_GOAWAY]


def _frame(pair: SessionPair, sid: int, inp: StreamInput) -> bytes:
    stream = pair.client._streams.get(sid)
    received = stream.recv.received if stream is not None else 0
    if inp is I.RECV_DATA:
        return data_frame(sid, b"x")
    if inp is I.RECV_FIN:
        return data_frame(sid, b"", fin=True)
    if inp is I.RECV_WINDOW:
        return frames(WindowFrame(stream_id=sid, max_offset=1 << 30))
    if inp is I.RECV_RESET:
        return frames(ResetFrame(stream_id=sid, error_code=0, final_offset=received))
    if inp is I.RECV_ACK:
        return frames(OpenAckFrame(stream_id=sid))
    if inp is I.RECV_FAIL:
        return frames(OpenFailFrame(stream_id=sid, reason=1))
    return frames(OpenFrame(stream_id=sid, tunnel_id=1, origin=ORIGIN, target=TARGET))


def test_setups_reach_their_states() -> None:
    for state, setup in SETUPS.items():
        pair = _pair()
        sid = setup(pair)
        stream = pair.client._streams.get(sid)
        if state in (S.IDLE, S.CLOSED):
            assert stream is None
        else:
            assert stream is not None
            assert stream.state is state


@pytest.mark.parametrize(("state", "inp"), list(itertools.product(SETUPS, RECV_INPUTS)), ids=str)
def test_received_input_in_every_state(state: StreamState, inp: StreamInput) -> None:
    pair = _pair()
    sid = SETUPS[state](pair)
    raw = _frame(pair, sid, inp)
    if (state, inp) in TRANSITIONS:
        pair.client.receive_data(raw, 0.0)
        assert not pair.client.closed
        expected = TRANSITIONS[state, inp]
        stream = pair.client._streams.get(sid)
        if expected is S.CLOSED:
            assert stream is None
        else:
            assert stream is not None
            assert stream.state is expected
    elif state is S.REMOTE_DONE and inp in (I.RECV_DATA, I.RECV_FIN):
        events = pair.client.receive_data(raw, 0.0)
        assert events == [
            StreamReset(stream_id=sid, error_code=ErrorCode.STREAM_STATE_ERROR, remote=False)
        ]
        assert not pair.client.closed
    else:
        with pytest.raises(ProtocolError):
            pair.client.receive_data(raw, 0.0)
        assert pair.client.closed


LOCAL_INPUTS: dict[StreamInput, Callable[[SessionPair, int], None]] = {
    I.SEND_DATA: lambda p, sid: p.client.send_data(sid, b"x"),
    I.SEND_ACK: lambda p, sid: p.client.accept_stream(sid),
    I.SEND_FAIL: lambda p, sid: p.client.reject_stream(sid, OpenFailReason.REFUSED),
}


@pytest.mark.parametrize(
    ("state", "inp"),
    [(s, i) for s, i in itertools.product(SETUPS, LOCAL_INPUTS) if s not in (S.IDLE, S.CLOSED)],
    ids=lambda v: v.name,
)
def test_local_input_in_every_live_state(state: StreamState, inp: StreamInput) -> None:
    pair = _pair()
    sid = SETUPS[state](pair)
    call = LOCAL_INPUTS[inp]
    if (state, inp) in TRANSITIONS:
        call(pair, sid)
        stream = pair.client._streams.get(sid)
        expected = TRANSITIONS[state, inp]
        assert (stream.state if stream is not None else S.CLOSED) is expected
    else:
        with pytest.raises(LocalProtocolError):
            call(pair, sid)
        assert not pair.client.closed
