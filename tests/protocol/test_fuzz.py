"""Random and mutated byte streams raise nothing but ProtocolError (and close the session)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from muxtunnel.errors import ProtocolError
from muxtunnel.protocol.constants import AuthMethod, ResultStatus, Role
from muxtunnel.protocol.events import AuthRequested, DataReceived, StreamOpened
from muxtunnel.protocol.frames import Address, ResultFrame
from muxtunnel.protocol.session import Session

from .helpers import SERVER_NONCE, frames, make_credential, preface
from .test_session_handshake import TRANSCRIPT

NONE = Address(None, 0)


def client_under_test() -> Session:
    client = Session(Role.CLIENT)
    client.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
    client.send_bind(2, 7, NONE)
    return client


def feed_all(session: Session, chunks: list[bytes], now_step: float = 0.01) -> None:
    """Feed chunks, playing a cooperative application; only ProtocolError may escape."""
    now = 0.0
    try:
        for chunk in chunks:
            now += now_step
            events = session.receive_data(chunk, now)
            for event in events:
                if isinstance(event, StreamOpened):
                    session.accept_stream(event.stream_id)
                elif isinstance(event, DataReceived):
                    session.acknowledge(event.stream_id, len(event.data), now)
                elif isinstance(event, AuthRequested):
                    session.send_result(event.req_id, ResultStatus.OK)
                    session.receive_data(b"", now)
            session.data_to_send(65_536)
    except ProtocolError:
        assert session.closed
        session.data_to_send()
        assert session.receive_data(b"more", 0.0) == []


MUTATION = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate", "set"]),
    st.integers(0, len(TRANSCRIPT) - 1),
    st.integers(0, 255),
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in mutations:
        pos %= max(len(buf), 1)
        if kind == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif kind == "insert":
            buf[pos:pos] = bytes([value])
        elif kind == "delete":
            del buf[pos]
        elif kind == "truncate":
            del buf[pos:]
        else:
            buf[pos] = value
        if not buf:
            break
    return bytes(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MUTATION, min_size=1, max_size=6), st.integers(1, 4000))
def test_mutated_transcript_raises_only_protocol_errors(
    mutations: list[tuple[str, int, int]], chunk: int
) -> None:
    data = mutate(TRANSCRIPT, mutations)
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    feed_all(client_under_test(), chunks)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from([Role.CLIENT, Role.SERVER]))
def test_random_bytes_after_preface(junk: bytes, role: Role) -> None:
    session = Session(role)
    if role == Role.SERVER:
        session.send_challenge(SERVER_NONCE)
    peer = Role.SERVER if role == Role.CLIENT else Role.CLIENT
    feed_all(session, [preface(peer), junk])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_random_bytes_as_preface(junk: bytes) -> None:
    feed_all(Session(Role.CLIENT), [junk])


FRAME_HEADERS = st.builds(
    lambda length, ftype, flags, sid, payload: (
        length.to_bytes(4, "big") + bytes([ftype, flags, 0, 0]) + sid.to_bytes(8, "big") + payload
    ),
    st.integers(0, 40),
    st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 16, 17, 18, 19, 20, 0x80, 0x7F]),
    st.integers(0, 3),
    st.sampled_from([0, 1, 2, 3, 4, 6, 2**64 - 1]),
    st.binary(max_size=40),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAME_HEADERS, max_size=12), st.sampled_from([Role.CLIENT, Role.SERVER]))
def test_plausible_frames_raise_only_protocol_errors(items: list[bytes], role: Role) -> None:
    session = Session(role)
    if role == Role.SERVER:
        session.send_challenge(SERVER_NONCE)
        auth_ok = b""
    else:
        session.send_auth(1, AuthMethod.HMAC_SHA256, make_credential())
        auth_ok = frames(ResultFrame(req_id=1, status=ResultStatus.OK))
    peer = Role.SERVER if role == Role.CLIENT else Role.CLIENT
    feed_all(session, [preface(peer) + auth_ok, *items])
