"""A session pair moving > 100 MB over 50+ streams with randomly slow consumers.

Checks every byte, that no DATA frame ever goes beyond the limit the receiver announced
(tracked independently, from the WINDOW frames on the wire), and that the bytes buffered in
the receiving application never exceed the windows.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from muxtunnel.protocol.constants import MAGIC, FrameType
from muxtunnel.protocol.events import (
    DataReceived,
    StreamEnded,
    StreamOpened,
)
from muxtunnel.protocol.frames import HEADER
from muxtunnel.protocol.session import SessionConfig

from .helpers import ORIGIN, TARGET, SessionPair

if TYPE_CHECKING:
    from muxtunnel.protocol.session import Session

PERIOD = 65_521  # prime: frame boundaries never line up with the pattern
STREAMS = 52
PER_STREAM = 2_000_000  # 104 MB in total
UPSTREAM = 100_000  # client -> server bytes per stream


def pattern(seed: int) -> memoryview:
    block = random.Random(seed).randbytes(PERIOD)
    return memoryview(block * 3)


class WireModel:
    """Independent bookkeeping of limits and offsets, from the frames on the wire."""

    def __init__(self, initial_stream: int, initial_conn: int) -> None:
        self.initial_stream = initial_stream
        self.limit: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.conn_limit = initial_conn
        self.conn_sent = 0

    def frames(self, wire: bytes) -> list[tuple[int, int, int, int, int]]:
        out = []
        off = len(MAGIC) if wire.startswith(MAGIC) else 0
        while off < len(wire):
            length, ftype, flags, _res, sid = HEADER.unpack_from(wire, off)
            out.append((ftype, flags, sid, off + 16, length))
            off += 16 + length
        assert off == len(wire)
        return out

    def window_frames(self, wire: bytes) -> None:
        for ftype, _flags, sid, start, _n in self.frames(wire):
            if ftype == FrameType.WINDOW:
                offset = int.from_bytes(wire[start : start + 8], "big")
                if sid == 0:
                    self.conn_limit = max(self.conn_limit, offset)
                else:
                    self.limit[sid] = max(self.limit.get(sid, self.initial_stream), offset)

    def data_frames(self, wire: bytes) -> None:
        for ftype, _flags, sid, _start, n in self.frames(wire):
            if ftype == FrameType.DATA:
                self.sent[sid] = self.sent.get(sid, 0) + n
                self.conn_sent += n
                assert self.sent[sid] <= self.limit.get(sid, self.initial_stream)
                assert self.conn_sent <= self.conn_limit


class App:
    """The receiving application of one side: per-stream buffers drained at random speeds."""

    def __init__(self, session: Session, rng: random.Random) -> None:
        self.session = session
        self.rng = rng
        self.buffered: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.ended: set[int] = set()
        self.speed: dict[int, float] = {}

    def handle(self, events: list[object], now: float) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                sid = event.stream_id
                off = self.received.get(sid, 0)
                n = len(event.data)
                start = off % PERIOD
                assert event.data == pattern(sid)[start : start + n], f"corrupt data on {sid}"
                assert sid not in self.ended
                self.received[sid] = off + n
                self.buffered[sid] = self.buffered.get(sid, 0) + n
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, StreamOpened):
                self.session.accept_stream(event.stream_id)
        del now

    def consume(self, now: float) -> None:
        session = self.session
        for sid, n in self.buffered.items():
            if not n:
                continue
            speed = self.speed.setdefault(sid, self.rng.choice([0.02, 0.1, 0.5, 1.0, 1.0]))
            if self.rng.random() < speed:
                take = n if self.rng.random() < 0.5 else self.rng.randint(1, n)
                session.acknowledge(sid, take, now)
                self.buffered[sid] = n - take
        # The app never holds more than the windows allow; connection credit is withheld
        # exactly for the bytes held beyond the receive budget (spec §8.5).
        conn = session._conn_recv
        held = sum(self.buffered.values())
        assert held == session._unconsumed
        assert conn.received - conn.consumed == max(
            0, held - session.statistics()["conn_recv_budget"]
        )
        assert conn.received <= conn.advertised
        for sid, stream in session._streams.items():
            assert stream.recv.received <= stream.recv.advertised
            assert self.buffered.get(sid, 0) == stream.recv.received - stream.recv.consumed


def test_bulk_100mb_over_52_streams_with_slow_consumers() -> None:
    rng = random.Random(20261125)
    # A receive budget of 1 MiB: the slow consumers push both sides past it and back.
    config = SessionConfig(receive_budget=1 << 20)
    pair = SessionPair(client_config=config, server_config=config)
    server, client = pair.server, pair.client
    client.ping(0.0)
    pair.send(client)
    pair.now = 0.02
    pair.send(server)  # an RTT sample, so windows auto-tune

    down = WireModel(
        client.local_settings.initial_stream_window, client._conn_recv.advertised
    )  # server -> client DATA, limits from client -> server WINDOWs
    up = WireModel(server.local_settings.initial_stream_window, server._conn_recv.advertised)
    client_app = App(client, rng)
    server_app = App(server, rng)

    sids = [server.open_stream(1, ORIGIN, TARGET) for _ in range(STREAMS)]
    to_send = dict.fromkeys(sids, PER_STREAM)
    up_send = dict.fromkeys(sids, UPSTREAM)
    offsets = dict.fromkeys(sids, 0)
    up_offsets = dict.fromkeys(sids, 0)
    accepted: set[int] = set()

    def feed(src: Session, dst: Session, model_out: WireModel, model_in: WireModel) -> list[object]:
        wire = src.data_to_send(rng.choice([16_384, 65_536, 262_144, 1 << 20]))
        if not wire:
            return []
        model_out.data_frames(wire)
        model_in.window_frames(wire)
        events: list[object] = []
        pos = 0
        while pos < len(wire):  # random chunking, like TLS records
            step = rng.choice([1, 100, 16_384, 70_000, len(wire)])
            events += dst.receive_data(wire[pos : pos + step], pair.now)
            pos += step
        return events

    for _step in range(200_000):
        pair.now += 0.0005
        # Producers: keep up to 256 KiB queued per stream (the adapter's low-water mark).
        for sid in sids:
            left = to_send[sid]
            if left and server.pending_bytes(sid) < 262_144:
                n = min(left, rng.randint(1, 200_000))
                off = offsets[sid]
                chunks = []
                while n:
                    start = off % PERIOD
                    take = min(n, PERIOD)
                    chunks.append(bytes(pattern(sid)[start : start + take]))
                    off += take
                    n -= take
                for chunk in chunks:
                    server.send_data(sid, chunk)
                to_send[sid] -= off - offsets[sid]
                offsets[sid] = off
                if not to_send[sid]:
                    server.end_stream(sid)
            if sid in accepted and up_send[sid] and client.pending_bytes(sid) < 65_536:
                n = min(up_send[sid], rng.randint(1, 30_000))
                off = up_offsets[sid]
                start = off % PERIOD
                take = min(n, PERIOD - 1)
                client.send_data(sid, pattern(sid)[start : start + take])
                up_offsets[sid] += take
                up_send[sid] -= take
                if not up_send[sid]:
                    client.end_stream(sid)
        client_app.handle(feed(server, client, down, up), pair.now)
        for sid in list(client_app.received) + [s for s in sids if s not in accepted]:
            if client.stream_is_open(sid) and sid not in accepted:
                accepted.add(sid)
        server_app.handle(feed(client, server, up, down), pair.now)
        client_app.consume(pair.now)
        server_app.consume(pair.now)
        if (
            len(client_app.ended) == STREAMS
            and len(server_app.ended) == STREAMS
            and not any(client_app.buffered.values())
            and not any(server_app.buffered.values())
        ):
            break
    else:
        raise AssertionError("bulk transfer did not finish")

    assert all(client_app.received[sid] == PER_STREAM for sid in sids)
    assert all(server_app.received[sid] == UPSTREAM for sid in sids)
    assert sum(client_app.received.values()) >= 100_000_000
    pair.pump()
    assert not server._streams
    assert not client._streams
    assert client._conn_recv.buffered == 0
    assert server._conn_recv.buffered == 0
    # Windows grew under load, and the connection window stayed >= 1.5x any stream window.
    assert client._conn_recv.window > client.local_settings.initial_conn_window
