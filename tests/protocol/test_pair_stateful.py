"""Random legal API sequences on a SessionPair never produce a protocol error.

A Hypothesis state machine drives both sessions through their public API only (open,
accept/reject, send, end, reset, acknowledge, ping, partial batches ...). Two conforming
sessions must never accuse each other of a violation, every byte that arrives must be the
next byte that was sent on its stream, and the flow-control books must balance.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from muxtunnel.errors import ErrorCode, LocalProtocolError
from muxtunnel.protocol.constants import OpenFailReason
from muxtunnel.protocol.events import (
    DataReceived,
    Event,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
)
from muxtunnel.protocol.frames import Settings
from muxtunnel.protocol.session import Session, SessionConfig

from .helpers import ORIGIN, TARGET, SessionPair


class Side:
    """One application: what it sent and received per stream."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sent: dict[int, bytearray] = {}
        self.received: dict[int, bytearray] = {}
        self.unacked: dict[int, int] = {}
        self.pending_accept: list[int] = []
        self.dead: set[int] = set()  # reset/rejected: data may be cut short


class PairMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        small = Settings(
            initial_stream_window=16_384,
            initial_conn_window=65_536,
            max_frame_payload=16_384,
            max_concurrent_streams=6,
            max_pending_opens=3,
        )
        self.pair = SessionPair(
            client_config=SessionConfig(settings=small, quantum=4096),
            server_config=SessionConfig(settings=small, quantum=4096),
        )
        self.sides = {
            "client": Side(self.pair.client),
            "server": Side(self.pair.server),
        }
        self.now = 1.0

    def other(self, name: str) -> str:
        return "server" if name == "client" else "client"

    def deliver(self, name: str, events: list[Event]) -> None:
        side = self.sides[name]
        peer = self.sides[self.other(name)]
        for event in events:
            if isinstance(event, DataReceived):
                sid = event.stream_id
                got = side.received.setdefault(sid, bytearray())
                off = len(got)
                got += event.data
                expected = peer.sent.get(sid, bytearray())
                assert got == expected[: len(got)], f"stream {sid}: bytes differ at {off}"
                side.unacked[sid] = side.unacked.get(sid, 0) + len(event.data)
            elif isinstance(event, StreamOpened):
                side.pending_accept.append(event.stream_id)
            elif isinstance(event, StreamEnded):
                sid = event.stream_id
                if sid not in peer.dead:
                    assert side.received.get(sid, bytearray()) == peer.sent.get(sid, bytearray())
            elif isinstance(event, StreamReset):
                assert event.remote or event.error_code != ErrorCode.STREAM_STATE_ERROR
                side.dead.add(event.stream_id)
                side.unacked.pop(event.stream_id, None)
            elif isinstance(event, StreamRejected):
                side.dead.add(event.stream_id)

    @rule(name=st.sampled_from(["client", "server"]), budget=st.sampled_from([1, 5000, 70_000]))
    def transfer(self, name: str, budget: int) -> None:
        src = self.sides[name].session
        data = src.data_to_send(budget)
        if data:
            dst_name = self.other(name)
            self.now += 0.001
            self.deliver(dst_name, self.sides[dst_name].session.receive_data(data, self.now))

    @rule(name=st.sampled_from(["client", "server"]))
    def open_stream(self, name: str) -> None:
        session = self.sides[name].session
        if session.can_open_stream():
            session.open_stream(1, ORIGIN, TARGET)

    @rule(name=st.sampled_from(["client", "server"]), ok=st.booleans())
    def answer(self, name: str, ok: bool) -> None:
        side = self.sides[name]
        if side.pending_accept:
            sid = side.pending_accept.pop(0)
            if ok:
                side.session.accept_stream(sid)
            else:
                side.session.reject_stream(sid, OpenFailReason.CONNECT_FAILED)
                side.dead.add(sid)
                side.unacked.pop(sid, None)

    @rule(
        name=st.sampled_from(["client", "server"]),
        index=st.integers(0, 10),
        size=st.integers(0, 40_000),
        end=st.booleans(),
    )
    def send(self, name: str, index: int, size: int, end: bool) -> None:
        side = self.sides[name]
        sids = sorted(side.session._streams)
        if not sids:
            return
        sid = sids[index % len(sids)]
        buf = side.sent.setdefault(sid, bytearray())
        payload = bytes((len(buf) + i) * 7 % 251 for i in range(size))
        try:
            side.session.send_data(sid, payload, end_stream=end)
        except LocalProtocolError:
            return  # not open for sending (not accepted yet, or FIN queued): a legal refusal
        buf += payload

    @rule(name=st.sampled_from(["client", "server"]), index=st.integers(0, 10))
    def reset(self, name: str, index: int) -> None:
        side = self.sides[name]
        sids = sorted(side.session._streams)
        if sids:
            sid = sids[index % len(sids)]
            side.session.reset_stream(sid, ErrorCode.CANCEL)
            side.dead.add(sid)
            side.unacked.pop(sid, None)

    @rule(name=st.sampled_from(["client", "server"]), fraction=st.floats(0, 1))
    def consume(self, name: str, fraction: float) -> None:
        side = self.sides[name]
        for sid, n in list(side.unacked.items()):
            take = int(n * fraction)
            if take:
                side.session.acknowledge(sid, take, self.now)
                side.unacked[sid] = n - take

    @rule(name=st.sampled_from(["client", "server"]))
    def ping(self, name: str) -> None:
        self.sides[name].session.ping(self.now)

    @rule(name=st.sampled_from(["client", "server"]), drain_first=st.booleans())
    def go_away(self, name: str, drain_first: bool) -> None:
        session = self.sides[name].session
        session.go_away(ErrorCode.NO_ERROR, "", 2**64 - 1 if drain_first else None)

    @invariant()
    def books_balance(self) -> None:
        for side in self.sides.values():
            session = side.session
            assert not session.closed
            conn = session._conn_recv
            # The session counts exactly the bytes the application holds (reset streams'
            # bytes were dropped when they died); of those, the ones beyond the receive
            # budget keep their connection credit (spec §8.5).
            live_unacked = sum(n for sid, n in side.unacked.items() if sid not in side.dead)
            assert session._unconsumed == live_unacked
            assert conn.received - conn.consumed == max(
                0, live_unacked - session.statistics()["conn_recv_budget"]
            )
            assert conn.received <= conn.advertised
            for stream in session._streams.values():
                assert stream.recv.received <= stream.recv.advertised
                assert stream.sent <= stream.limit

    def teardown(self) -> None:
        # Drain everything: both sides consume all, then the pair must settle.
        for _ in range(200):
            for name in ("client", "server"):
                self.consume(name, 1.0)
                self.transfer(name, 1 << 20)
            quiet = not (self.pair.client.wants_write() or self.pair.server.wants_write())
            if quiet and not any(any(s.unacked.values()) for s in self.sides.values()):
                break
        for name in ("client", "server"):
            side = self.sides[name]
            assert not side.session.closed
            conn = side.session._conn_recv
            assert conn.received == conn.consumed  # every byte was consumed or credited


PairMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPair = PairMachine.TestCase
