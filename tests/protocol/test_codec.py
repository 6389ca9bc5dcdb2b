"""Codec round trips (every frame type) and reader chunking, with Hypothesis."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from muxtunnel.errors import FrameSizeError, ProtocolError
from muxtunnel.protocol.constants import MAGIC, FrameType
from muxtunnel.protocol.frames import (
    DATA_HEADER,
    HEADER,
    Address,
    AuthFrame,
    BindFrame,
    ChallengeFrame,
    CloseFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HelloFrame,
    OpenAckFrame,
    OpenFailFrame,
    OpenFrame,
    PingFrame,
    ResetFrame,
    ResultFrame,
    UnbindFrame,
    WindowFrame,
    decode_payload,
    encode_frame,
    pack_data_header,
)
from muxtunnel.protocol.reader import FrameReader

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
SID = st.integers(1, 0xFFFF_FFFF_FFFF_FFFF)
TEXT = st.text(max_size=40)
PORT = st.integers(0, 0xFFFF)

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(lambda h: ":" not in h)


def _not_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


ADDRESS = st.one_of(
    st.just(Address(None, 0)),
    st.builds(Address, st.ip_addresses(v=4).map(str), PORT),
    st.builds(Address, st.ip_addresses(v=6).map(str), PORT),
    st.builds(Address, DOMAIN.filter(_not_ip), PORT),
)

FRAMES: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        DataFrame,
        stream_id=SID,
        data=st.binary(min_size=1, max_size=300),
        fin=st.booleans(),
    ),
    st.builds(DataFrame, stream_id=SID, data=st.just(b""), fin=st.just(True)),
    st.builds(WindowFrame, stream_id=U64, max_offset=st.integers(0, 1 << 62)),
    st.builds(OpenFrame, stream_id=SID, tunnel_id=U32, origin=ADDRESS, target=ADDRESS),
    st.builds(OpenAckFrame, stream_id=SID),
    st.builds(OpenFailFrame, stream_id=SID, reason=U32, message=TEXT),
    st.builds(ResetFrame, stream_id=SID, error_code=U32, final_offset=U64),
    st.builds(
        HelloFrame,
        major=U8,
        minor=U8,
        role=U8,
        flags=U8,
        settings=st.lists(st.tuples(U16, U32), max_size=10).map(tuple),
    ),
    st.builds(PingFrame, seq=U64, ack=st.booleans()),
    st.builds(GoAwayFrame, last_stream_id=U64, error_code=U32, message=TEXT),
    st.builds(CloseFrame, error_code=U32, message=TEXT),
    st.builds(AuthFrame, req_id=U32, method=U8, credential=st.binary(max_size=100)),
    # Flag 0x01 (OPTIONS) follows BindFrame.options: test_bind_options.py covers it.
    st.builds(
        BindFrame, req_id=U32, tunnel_id=U32, proto=U8, flags=U8.map(lambda f: f & ~1), bind=ADDRESS
    ),
    st.builds(UnbindFrame, req_id=U32, tunnel_id=U32, error_code=U32),
    st.builds(
        ResultFrame, req_id=U32, status=U16, message=TEXT, bound=st.one_of(st.none(), ADDRESS)
    ),
    st.builds(ChallengeFrame, nonce=st.binary(min_size=32, max_size=32)),
    st.builds(
        ExtensionFrame,
        frame_type=st.integers(0x80, 0xFF),
        flags=U8,
        stream_id=U64,
        payload=st.binary(max_size=100),
    ),
)


def _parse(data: bytes | memoryview, reader: FrameReader | None = None) -> list[Frame]:
    reader = reader or FrameReader(
        max_data_payload=65536, max_control_payload=65535, expect_magic=False
    )
    return [decode_payload(t, f, s, p) for t, f, s, p in reader.feed(data)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FRAMES)
def test_round_trip_every_frame_type(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert _parse(wire) == [frame]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAMES, min_size=1, max_size=12), st.data())
def test_any_chunking_yields_the_same_frames(items: list[Frame], data: st.DataObject) -> None:
    wire = MAGIC + b"".join(encode_frame(f) for f in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    reader = FrameReader(max_data_payload=65536, max_control_payload=65535)
    out: list[Frame] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        out += _parse(wire[prev:cut], reader)
        prev = cut
    assert out == items
    assert reader.buffered == 0
    # One byte at a time, from a bytearray/memoryview source.
    reader = FrameReader(max_data_payload=65536, max_control_payload=65535)
    out = []
    source = memoryview(bytearray(wire))
    for i in range(len(wire)):
        out += _parse(source[i : i + 1], reader)
    assert out == items


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_the_data_header_struct_is_a_data_frame_header(length: int, stream_id: int) -> None:
    packed = DATA_HEADER.pack(length, stream_id)
    assert packed == pack_data_header(stream_id, length, fin=False)
    assert packed == HEADER.pack(length, FrameType.DATA, 0, 0, stream_id)


def test_oversize_header_rejected_before_payload() -> None:
    reader = FrameReader(max_data_payload=65536, max_control_payload=4096)
    assert reader.feed(MAGIC) == []
    header = bytes.fromhex("00010001 00 00 0000 0000000000000002")
    with pytest.raises(FrameSizeError):
        reader.feed(header)
    reader = FrameReader(max_data_payload=65536, max_control_payload=4096, expect_magic=False)
    open_header = (4097).to_bytes(4, "big") + bytes([FrameType.OPEN, 0, 0, 0]) + bytes(8)
    assert reader.feed(open_header[:10]) == []
    with pytest.raises(FrameSizeError):
        reader.feed(open_header[10:])


@pytest.mark.parametrize(
    ("frame_type", "length"),
    [(FrameType.WINDOW, 7), (FrameType.PING, 9), (FrameType.RESET, 11), (FrameType.OPEN_ACK, 1)],
)
def test_wrong_fixed_lengths_are_frame_size_errors(frame_type: int, length: int) -> None:
    sid = 0 if frame_type == FrameType.PING else 2
    with pytest.raises(FrameSizeError):
        decode_payload(frame_type, 0, sid, bytes(length))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 0xFF), st.integers(0, 0xFF), U64)
def test_decode_payload_raises_only_protocol_errors(
    payload: bytes, frame_type: int, flags: int, sid: int
) -> None:
    try:
        decode_payload(frame_type, flags, sid, payload)
    except ProtocolError:
        pass
    except ValueError:
        # Unknown mandatory types never reach decode_payload (the reader rejects them).
        assert frame_type not in set(FrameType)
        assert frame_type < 0x80
