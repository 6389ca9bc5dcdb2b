"""Hostile input to the resumption paths (protocol-spec.md §10.6.4, §10.6.7, §10.6.8).

Seeded, bounded loops feed a resuming client, a relay handshake session and an open resumable
session random sequences of frames of every type (and random bytes), cut anywhere. Whatever
arrives, the session raises nothing but ``ProtocolError`` and ends in a consistent state: a
resuming client is either suspended again (and can start another resume) or closed for good,
and its output never carries a byte of its held stream work.
"""

from __future__ import annotations

import random

import pytest

from muxtunnel.errors import LocalProtocolError, ProtocolError
from muxtunnel.protocol.constants import MAGIC, FrameType, Role
from muxtunnel.protocol.events import Event, SessionResumed
from muxtunnel.protocol.frames import (
    AckFrame,
    Address,
    AuthFrame,
    ChallengeFrame,
    CloseFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    OpenAckFrame,
    OpenFrame,
    PingFrame,
    ResetFrame,
    ResultFrame,
    ResumedFrame,
    ResumeFrame,
    TicketFrame,
    UnbindFrame,
    WindowFrame,
    encode_frame,
)
from muxtunnel.protocol.lifecycle import SessionState
from muxtunnel.protocol.session import Session

from .helpers import SERVER_NONCE, data_frame, hello_bytes, make_credential, parse_frames
from .resume_helpers import (
    CLIENT_CONFIG,
    RESUME_AUTH_REQ,
    RESUME_REQ,
    SERVER_CONFIG,
    Link,
    ticket_for,
)

_ADDR = Address("192.0.2.1", 80)
SEEDS = range(150)


def _random_frame(rng: random.Random, offsets: int) -> bytes:
    """One frame of a random type with plausible or wild fields."""
    req = rng.choice((RESUME_REQ, RESUME_AUTH_REQ, 1, 2, 77))
    sid = rng.choice((0, 1, 2, 3, 4))
    offset = rng.choice((0, 1, offsets // 2, offsets, offsets + 1, 1 << 40))
    pick = rng.randrange(19)
    frame: Frame
    if pick == 0:
        return data_frame(sid or 2, rng.randbytes(rng.randrange(1, 40)), fin=rng.random() < 0.3)
    if pick == 1:
        frame = WindowFrame(stream_id=sid, max_offset=offset)
    elif pick == 2:
        frame = OpenFrame(stream_id=sid or 2, tunnel_id=1, origin=_ADDR, target=_ADDR)
    elif pick == 3:
        frame = OpenAckFrame(stream_id=sid or 1)
    elif pick == 4:
        frame = ResetFrame(stream_id=sid or 2, error_code=8, final_offset=0)
    elif pick == 5:
        return hello_bytes(Role.SERVER, SERVER_CONFIG.settings, minor=rng.choice((0, 1, 2, 9)))
    elif pick == 6:
        frame = PingFrame(seq=rng.randrange(10), ack=rng.random() < 0.5)
    elif pick == 7:
        frame = GoAwayFrame(last_stream_id=rng.randrange(5), error_code=0)
    elif pick == 8:
        frame = CloseFrame(error_code=rng.randrange(16), message="x")
    elif pick == 9:
        frame = AuthFrame(req_id=req, method=1, credential=make_credential())
    elif pick == 10:
        frame = UnbindFrame(req_id=0, tunnel_id=1, error_code=15)
    elif pick == 11:
        frame = ResultFrame(req_id=req, status=rng.choice((0, 3, 13, 14, 99)), message="m")
    elif pick == 12:
        frame = ChallengeFrame(nonce=SERVER_NONCE)
    elif pick == 13:
        frame = AckFrame(received=offset)
    elif pick == 14:
        frame = TicketFrame(ticket=ticket_for(rng.randrange(5)), lifetime=60)
    elif pick == 15:
        frame = ResumeFrame(req_id=req, ticket=ticket_for(1), received=offset)
    elif pick == 16:
        frame = ResumedFrame(req_id=req, received=offset)
    elif pick == 17:
        frame = ExtensionFrame(frame_type=0x90, payload=b"e")
    else:
        return rng.randbytes(rng.randrange(1, 30))
    return encode_frame(frame)


def _feed(
    session: Session, rng: random.Random, wire: bytes, events: list[Event] | None = None
) -> bool:
    """Feed ``wire`` in random pieces; True if the session raised a ProtocolError."""
    pos = 0
    while pos < len(wire) and not session.closed:
        n = rng.randrange(1, 64)
        try:
            got = session.receive_data(wire[pos : pos + n], 0.0)
        except ProtocolError:
            return True
        if events is not None:
            events += got
        pos += n
    return False


@pytest.mark.parametrize("seed", SEEDS)
def test_a_resuming_client_survives_anything(seed: int) -> None:
    rng = random.Random(seed)
    link = Link()
    client = link.client
    sid = link.open()
    assert sid is not None
    link.pump()
    link.cut()
    marker = b"held-stream-work-" + bytes([seed % 256])
    client.send_data(sid, marker)
    for _attempt in range(3):
        client.begin_resume()
        out = client.data_to_send()
        events: list[Event] = []
        wire = MAGIC + hello_bytes(Role.SERVER, SERVER_CONFIG.settings, minor=2)
        wire += encode_frame(ChallengeFrame(nonce=SERVER_NONCE))
        cut = rng.randrange(len(wire) + 1)
        failed = _feed(client, rng, wire[:cut], events)
        if not failed and cut == len(wire) and rng.random() < 0.7:
            client.send_resume(RESUME_REQ, ticket_for(1))
            client.send_auth(RESUME_AUTH_REQ, 1, make_credential())
        noise = b"".join(_random_frame(rng, client.sent_offset) for _ in range(rng.randrange(1, 6)))
        failed = _feed(client, rng, noise, events) or failed
        out += client.data_to_send()
        if not any(isinstance(e, SessionResumed) for e in events):
            assert marker not in out  # held stream work never goes out before RESUMED
        if client.closed:
            return
        if failed:
            assert client.suspended  # a fault of the relay: back to SUSPENDED, CLOSE sent
        if client._life.state is SessionState.AUTH_REFUSED:
            with pytest.raises(LocalProtocolError):
                client.suspend()  # refused: the session is over, the relay's CLOSE follows
            return
        if client._life.state is not SessionState.SUSPENDED:
            client.suspend()  # the new connection is dropped
        assert client.suspended
    assert client.suspended


@pytest.mark.parametrize("seed", SEEDS)
def test_a_relay_handshake_session_survives_anything(seed: int) -> None:
    rng = random.Random(seed)
    hs = Session(Role.SERVER, SERVER_CONFIG)
    hs.send_challenge(SERVER_NONCE)
    hs.data_to_send()
    wire = MAGIC + hello_bytes(Role.CLIENT, CLIENT_CONFIG.settings, minor=2)
    wire += b"".join(_random_frame(rng, 500) for _ in range(rng.randrange(1, 8)))
    failed = _feed(hs, rng, wire)
    hs.data_to_send()
    if failed:
        assert hs.closed
        assert not hs.input_paused
    if hs.input_paused:
        assert not hs.closed
        with pytest.raises(ProtocolError):
            hs.receive_data(b"\x00", 0.0)
        assert hs.closed


@pytest.mark.parametrize("seed", SEEDS)
def test_an_open_resumable_session_survives_anything(seed: int) -> None:
    rng = random.Random(seed)
    link = Link()
    session = link.server if seed % 2 else link.client
    wire = b"".join(_random_frame(rng, session.sent_offset) for _ in range(rng.randrange(1, 8)))
    failed = _feed(session, rng, wire)
    out = session.data_to_send()
    if failed:
        assert session.closed
        assert parse_frames(out)[-1][0] == FrameType.CLOSE
    assert session.replay_size <= session.sent_offset
