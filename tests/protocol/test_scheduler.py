"""The DATA scheduler: DRR fairness, new flows first, frame sizes, coalescing, SWS."""

from __future__ import annotations

import pytest

from muxtunnel.protocol.constants import FLAG_FIN, FrameType
from muxtunnel.protocol.events import DataReceived
from muxtunnel.protocol.frames import HEADER, Settings
from muxtunnel.protocol.scheduler import OutboundStream, Scheduler
from muxtunnel.protocol.session import SessionConfig

from .helpers import SessionPair

KiB = 1024
Q = 16 * KiB


def parse(wire: bytes) -> list[tuple[int, int, int, int, int]]:
    """(offset, type, flags, stream_id, length) of every frame in ``wire``."""
    out = []
    off = 0
    while off < len(wire):
        length, ftype, flags, _res, sid = HEADER.unpack_from(wire, off)
        out.append((off, ftype, flags, sid, length))
        off += 16 + length
    assert off == len(wire)
    return out


def data_frames(wire: bytes) -> list[tuple[int, int, int]]:
    """(stream_id, length, offset) of the DATA frames in ``wire``."""
    return [(sid, n, off) for off, t, _f, sid, n in parse(wire) if t == FrameType.DATA]


def big_pair() -> SessionPair:
    """A pair whose client grants big windows, so the server's sends are never credit-bound."""
    settings = Settings(initial_stream_window=64 << 20, initial_conn_window=1 << 30)
    return SessionPair(client_config=SessionConfig(settings=settings))


def test_single_stream_uses_64k_frames_and_two_streams_interleave_at_quantum() -> None:
    pair = big_pair()
    a = pair.open()
    pair.server.send_data(a, bytes(256 * KiB))
    frames = data_frames(pair.server.data_to_send(300 * KiB))
    assert [n for _, n, _ in frames] == [64 * KiB] * 4
    b = pair.open()
    pair.server.send_data(a, bytes(256 * KiB))
    pair.server.send_data(b, bytes(256 * KiB))
    frames = data_frames(pair.server.data_to_send(128 * KiB))
    assert all(n == Q for _, n, _ in frames)
    sids = [sid for sid, _, _ in frames]
    assert sids[:6] == [a, b, a, b, a, b]


def test_new_flow_goes_first_while_bulk_streams_saturate() -> None:
    pair = big_pair()
    bulk = [pair.open() for _ in range(3)]
    small = pair.open()
    for sid in bulk:
        pair.server.send_data(sid, bytes(8 << 20))
    # Saturate: several batches of bulk only.
    for _ in range(5):
        wire = pair.server.data_to_send(64 * KiB)
        assert {sid for sid, _, _ in data_frames(wire)} <= set(bulk)
    pair.server.send_data(small, b"k")  # a keystroke
    wire = pair.server.data_to_send(64 * KiB)
    frames = data_frames(wire)
    first_small = next(off for sid, _, off in frames if sid == small)
    assert first_small <= Q  # within one quantum of the start of the batch
    assert frames[0][0] == small
    # Mid-round: bulk streams are in the middle of their quanta when the keystroke comes.
    pair.server.data_to_send(5 * KiB)
    pair.server.send_data(small, b"j")
    frames = data_frames(pair.server.data_to_send(64 * KiB))
    assert frames[0][0] == small


def test_drr_shares_bytes_evenly() -> None:
    pair = big_pair()
    sids = [pair.open() for _ in range(8)]
    for sid in sids:
        pair.server.send_data(sid, bytes(2 << 20))
    totals = dict.fromkeys(sids, 0)
    for _ in range(40):
        for sid, n, _ in data_frames(pair.server.data_to_send(256 * KiB)):
            totals[sid] += n
    spread = max(totals.values()) - min(totals.values())
    assert spread <= Q
    assert min(totals.values()) > 1 << 20


def test_coalescing_1000_small_writes_into_few_batches() -> None:
    pair = big_pair()
    sid = pair.open()
    for _ in range(1000):
        pair.server.send_data(sid, b"0123456789")
    batches = 0
    while pair.server.wants_write():
        wire = pair.server.data_to_send(64 * KiB)
        batches += 1
        assert sum(n for _, n, _ in data_frames(wire)) > 0
    assert batches == 1
    assert not pair.server.wants_write()


def test_silly_window_avoidance_and_requeue_on_window() -> None:
    pair = SessionPair()  # default client window 256 KiB
    sid = pair.open()
    server, client = pair.server, pair.client
    server.send_data(sid, bytes(256 * KiB - 1000))
    events = pair.send(server)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 256 * KiB - 1000
    server.send_data(sid, bytes(8 * KiB))
    # 1000 bytes of credit left, 8 KiB waiting: nothing is sent.
    assert not server.wants_write()
    assert server.data_to_send() == b""
    client.acknowledge(sid, 256 * KiB - 1000, 0.0)
    pair.send(client)  # WINDOW arrives and requeues the stream
    assert server.wants_write()
    frames = data_frames(server.data_to_send())
    assert sum(n for _, n, _ in frames) == 8 * KiB


def test_connection_credit_bounds_the_batch() -> None:
    settings = Settings(initial_stream_window=1 << 20, initial_conn_window=65_536)
    pair = SessionPair(client_config=SessionConfig(settings=settings))
    client, server = pair.client, pair.server
    # The client keeps its connection window >= 1.5x the stream window.
    assert server.statistics()["conn_send_available"] == 3 << 19
    a, b = pair.open(), pair.open()
    server.send_data(a, bytes(2 << 20))
    server.send_data(b, bytes(2 << 20), end_stream=True)
    total = sum(n for _, n, _ in data_frames(server.data_to_send(8 << 20)))
    assert total == 3 << 19
    assert not server.wants_write()
    assert client.statistics()["conn_recv_buffered"] == 0


def test_bare_fin_needs_no_credit_and_overtakes_nothing() -> None:
    settings = Settings(initial_stream_window=16_384, initial_conn_window=65_536)
    pair = SessionPair(client_config=SessionConfig(settings=settings))
    server = pair.server
    a, b = pair.open(), pair.open()
    server.send_data(a, bytes(16_384))
    server.send_data(b, bytes(16_384))
    pair.send(server)
    server.end_stream(a)
    server.send_data(b, b"x", end_stream=True)  # FIN behind data that has no credit
    wire = server.data_to_send()
    frames = parse(wire)
    assert [(t, f, sid, n) for _, t, f, sid, n in frames] == [(FrameType.DATA, FLAG_FIN, a, 0)]


def test_scheduler_unit_edges() -> None:
    with pytest.raises(ValueError):
        Scheduler(0)
    sched = Scheduler(quantum=4, single_max=8)
    s = OutboundStream(1, limit=100)
    s.chunks.append(b"abcdefghij")
    s.pending = 10
    sched.activate(s)
    sched.activate(s)  # already scheduled: no duplicate
    assert len(sched) == 1
    parts: list[bytes | memoryview] = []
    _used, charged, finished = sched.fill(parts, 1000, 1000)
    payload = b"".join(bytes(p) for p in parts if len(p) != 16)
    assert payload == b"abcdefghij"
    assert (charged, finished) == (10, [])
    # A stream without credit is not scheduled; credit_raised brings it back as an old flow.
    t = OutboundStream(3, limit=0)
    t.chunks.append(b"xyz")
    t.pending = 3
    sched.activate(t)
    assert len(sched) == 0
    sched.credit_raised(t)
    sched.credit_raised(t)
    assert list(sched.old) == [t]
    t.limit = 3
    # Reset while scheduled: dropped lazily.
    t.drop_pending()
    parts = []
    assert sched.fill(parts, 1000, 1000) == (0, 0, [])
    assert len(sched) == 0
    # A frame is cut to the room left when the room exceeds a quantum.
    u = OutboundStream(5, limit=1000)
    u.chunks.append(bytes(100))
    u.pending = 100
    sched.activate(u)
    parts = []
    _used, charged, _ = sched.fill(parts, 16 + 6, 1000)
    assert charged == 6
