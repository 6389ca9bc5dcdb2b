"""Fuzz targets for the frame codec and the session (run by ``benchmarks/fuzz.py``).

Each target takes one ``bytes`` input. The only acceptable outcomes are events and
:class:`~muxtunnel.errors.MuxtunnelError` subclasses (``ProtocolError`` from the wire,
``LocalProtocolError``/``SessionClosedError`` from local calls); any other
exception -- including the ``AssertionError`` of a broken invariant checked here -- is a crash.

``codec``
    ``MAGIC`` + arbitrary bytes through :class:`FrameReader`, fed whole and in small chunks
    (both must give the same frames and the same error, protocol-spec.md Appendix A.1 item 5);
    every frame is decoded, and every decoded frame must re-encode and decode to itself.

``session-client`` / ``session-server``
    A :class:`Session` past its handshake (preface, HELLO, CHALLENGE, AUTH, RESULT(OK); the
    server role authenticates through ``send_result``), then the input read as a small program:
    raw bytes, frames with fuzzed headers, well-formed frames that follow the session's state
    (OPEN, DATA, WINDOW, RESET ... on live stream ids), Appendix A vectors, and local API calls
    (``acknowledge``, ``send_data``, ``end_stream``, ``reset_stream``, ``open_stream``,
    ``accept_stream``, ``reject_stream``, ``send_result``, ``ping``, ``go_away``, ``close``,
    ``data_to_send``) made the way a correct application makes them. Everything the session
    sends is parsed and decoded as the peer would, and its accounting is checked after each step.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from muxtunnel.errors import ErrorCode, MuxtunnelError, ProtocolError
from muxtunnel.protocol.constants import (
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_MINOR,
    AuthMethod,
    FrameType,
    OpenFailReason,
    ResultStatus,
    Role,
)
from muxtunnel.protocol.events import (
    AuthRequested,
    BindRequested,
    ChallengeReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    ResultReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    UnbindReceived,
    WindowUpdated,
)
from muxtunnel.protocol.frames import (
    HEADER,
    Address,
    AuthFrame,
    BindFrame,
    BindOptions,
    ChallengeFrame,
    CloseFrame,
    Frame,
    GoAwayFrame,
    HelloFrame,
    OpenAckFrame,
    OpenFailFrame,
    OpenFrame,
    PingFrame,
    ResetFrame,
    ResultFrame,
    Settings,
    UnbindFrame,
    WindowFrame,
    decode_payload,
    encode_frame,
    pack_data_header,
)
from muxtunnel.protocol.reader import FrameReader
from muxtunnel.protocol.session import Session, SessionConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "FRAGMENTS",
    "TARGETS",
    "VECTORS",
    "codec_seeds",
    "load_vectors",
    "run_codec",
    "run_session_client",
    "run_session_server",
    "session_seeds",
]

SPEC = Path(__file__).resolve().parents[2] / "protocol-spec.md"
NONCE = bytes(range(32))
CREDENTIAL = bytes(range(64))
MAX_U64 = (1 << 64) - 1
_T = TypeVar("_T")

_EVENT_TYPES = (
    AuthRequested,
    BindRequested,
    ChallengeReceived,
    ConnectionClosed,
    DataReceived,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    ResultReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    UnbindReceived,
    WindowUpdated,
)


def load_vectors() -> list[bytes]:
    """The frames of protocol-spec.md Appendix A.3 (valid and invalid), as bytes."""
    text = SPEC.read_text(encoding="utf-8")
    match = re.search(r"```json muxtunnel-vectors\n(.*?)\n```", text, re.DOTALL)
    assert match is not None, "no vector block in protocol-spec.md"
    return [bytes.fromhex(v["hex"]) for v in json.loads(match.group(1))]


VECTORS = load_vectors()

# ---------------------------------------------------------------------------------------------
# The codec target


def _read_all(data: bytes, step: int) -> tuple[list[tuple[int, int, int, bytes]], str]:
    """Feed MAGIC + data in ``step``-byte chunks (0 = whole); return frames and error class."""
    reader = FrameReader(max_data_payload=65_536, max_control_payload=4_096)
    out: list[tuple[int, int, int, bytes]] = []
    stream = MAGIC + data
    chunks = [stream] if step == 0 else [stream[i : i + step] for i in range(0, len(stream), step)]
    try:
        for chunk in chunks:
            for ftype, flags, sid, payload in reader.feed(chunk):
                out.append((ftype, flags, sid, bytes(payload)))
                assert reader.buffered <= HEADER_SIZE + 65_536
    except ProtocolError as exc:
        return out, type(exc).__name__
    assert reader.buffered == len(stream) - sum(HEADER_SIZE + len(f[3]) for f in out) - len(
        MAGIC
    ), "reader lost or invented bytes"
    return out, ""


def _check_roundtrip(ftype: int, flags: int, sid: int, payload: bytes) -> None:
    try:
        frame = decode_payload(ftype, flags, sid, payload)
    except ProtocolError:
        return
    wire = encode_frame(frame)
    length, ftype2, flags2, _res, sid2 = HEADER.unpack_from(wire, 0)
    assert length == len(wire) - HEADER_SIZE
    again = decode_payload(ftype2, flags2, sid2, wire[HEADER_SIZE:])
    assert again == frame, f"re-encoded frame decodes differently: {frame!r} -> {again!r}"
    assert encode_frame(again) == wire, "encoding is not canonical"


#: Chunk sizes of the second pass: byte by byte, around the 8-byte preface and the 16-byte
#: header, and larger.
_STEPS = (1, 2, 3, 5, 7, 8, 15, 16, 17, 24, 100, 1000)


def run_codec(data: bytes) -> None:
    """MAGIC + ``data[1:]`` through the reader (whole and chunked) and the payload decoder."""
    if not data:
        return
    step = _STEPS[data[0] % len(_STEPS)]
    body = data[1:]
    whole, whole_error = _read_all(body, 0)
    chunked, chunked_error = _read_all(body, step)
    assert whole_error == chunked_error, f"chunking by {step} changes the error"
    if whole_error:
        # A header error drops the frames completed earlier in the same chunk: the connection
        # ends with that error either way.
        assert chunked[: len(whole)] == whole, f"chunking by {step} changes the frames"
    else:
        assert whole == chunked, f"chunking by {step} changes the frames"
    for raw in chunked:
        _check_roundtrip(*raw)


# ---------------------------------------------------------------------------------------------
# The session targets

#: Session configurations (chosen by the first input byte): defaults, and small ones that
#: make windows, batches and stream limits bite after a few frames.
_SMALL = Settings(
    initial_stream_window=16_384,
    initial_conn_window=65_536,
    max_frame_payload=16_384,
    max_concurrent_streams=3,
    max_pending_opens=2,
    max_control_payload=1_024,
)
_CONFIGS = (
    None,
    SessionConfig(
        settings=_SMALL,
        max_stream_window=32_768,
        max_conn_window=131_072,
        quantum=1_024,
        max_batch=4_096,
        preauth_limit=1_024,
    ),
)
#: The peer's HELLO settings (second choice): defaults, or small limits on what we may send.
_PEER_SETTINGS = (
    None,
    Settings(
        initial_stream_window=16_384,
        initial_conn_window=65_536,
        max_frame_payload=16_384,
        max_concurrent_streams=2,
        max_pending_opens=1,
        max_control_payload=1_024,
    ),
)
_ADDRESSES = (
    Address(None, 0),
    Address("198.51.100.23", 51514),
    Address("2001:db8::17", 60000),
    Address("db.internal.example", 5432),
)
_OPTIONS = (
    BindOptions(),
    BindOptions(allow=(IPv4Network("198.51.100.0/24"),), deny=(IPv6Network("2001:db8::/32"),)),
    BindOptions(name="ssh.home"),
    BindOptions(visit="ssh.home"),
    BindOptions(unknown=(0x42,)),
)
NONE = _ADDRESSES[0]
_CODES = tuple(ErrorCode)
_FRAME_TYPES = (
    0x00,
    0x01,
    0x02,
    0x03,
    0x04,
    0x05,
    0x08,
    0x09,
    0x0A,
    0x0B,
    0x10,
    0x11,
    0x12,
    0x13,
    0x14,
    0x80,
    0xFF,
    0x06,
    0x7F,
)


def _hello(role: Role, settings: Settings | None) -> bytes:
    if settings is None:
        settings = Settings(max_concurrent_streams=0) if role == Role.SERVER else Settings()
    return encode_frame(
        HelloFrame(major=1, minor=PROTOCOL_MINOR, role=role, flags=0, settings=settings.to_pairs())
    )


@functools.cache
def _setup_wire(peer_role: Role, peer_settings: Settings | None) -> tuple[bytes, bytes, bytes]:
    """The peer's preface + HELLO, its AUTH (client peer), its RESULTs for AUTH and two BINDs."""
    hello = MAGIC + _hello(peer_role, peer_settings)
    auth = encode_frame(AuthFrame(req_id=1, method=AuthMethod.HMAC_SHA256, credential=CREDENTIAL))
    results = b"".join(
        [
            encode_frame(ResultFrame(req_id=1, status=ResultStatus.OK)),
            encode_frame(ResultFrame(req_id=2, status=0, bound=_ADDRESSES[1])),
            encode_frame(ResultFrame(req_id=3, status=0, bound=_ADDRESSES[1])),
        ]
    )
    return hello, auth, results


class _Program:
    """Reads the input as a sequence of operations (each byte string is a valid program)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def int(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "big")

    def pick(self, options: Sequence[_T]) -> _T:
        return options[self.byte() % len(options)]


class SessionHarness:
    """A session under test plus a model of a well-behaved application and of the peer."""

    def __init__(self, role: Role, setup: int) -> None:
        self.role = role
        self.now = 0.0
        peer_role = Role.CLIENT if role == Role.SERVER else Role.SERVER
        self.peer_settings = _PEER_SETTINGS[(setup >> 1) & 1]
        if self.peer_settings is None and peer_role == Role.SERVER and setup & 4:
            # A relay that allows client-opened streams, so the client's open_stream runs too.
            self.peer_settings = Settings(max_concurrent_streams=8)
        effective_peer = self.peer_settings or (
            Settings(max_concurrent_streams=0) if peer_role == Role.SERVER else Settings()
        )
        self.session = Session(role, _CONFIGS[setup & 1])
        # The peer parses our output with our settings as its receive limits.
        self.out_reader = FrameReader(
            max_data_payload=effective_peer.max_frame_payload,
            max_control_payload=effective_peer.max_control_payload,
        )
        # The peer's view of flow control: what it allowed (its HELLO, then the largest WINDOW
        # offset it sent per stream id, 0 = the connection) against the DATA we sent it.
        self.in_reader: FrameReader | None = FrameReader(
            max_data_payload=16_777_215, max_control_payload=65_535
        )
        self.initial_send = (
            effective_peer.initial_stream_window,
            effective_peer.initial_conn_window,
        )
        self.granted: dict[int, int] = {}
        self.data_sent: dict[int, int] = {}
        self.data_sent_total = 0
        #: Bytes received on each stream and not acknowledged yet (the application's view).
        self.unacked: dict[int, int] = {}
        #: Bytes the peer sent on each stream (its final offset for RESET).
        self.peer_sent: dict[int, int] = {}
        #: Stream ids this test has seen (both parities), for local calls and frames.
        self.sids: list[int] = []
        self.incoming: list[int] = []  # peer-opened streams not answered yet
        self.requests: list[tuple[int, bool]] = []  # server: (req_id, is_bind) to answer
        self.client_reqs: list[tuple[int, FrameType]] = []  # client: requests in flight
        self.next_req = 2
        self.peer_next_sid = 1 if peer_role == Role.CLIENT else 2
        self.peer_ping = 0
        self.preauth = bool(setup & 8) and role == Role.SERVER
        s = self.session
        hello, auth, results = _setup_wire(peer_role, self.peer_settings)
        if role == Role.SERVER:
            s.send_challenge(NONCE)
            if self.preauth:
                self.feed(hello)
            else:
                self.feed(hello + auth)
                assert not s.closed
                s.send_result(1, ResultStatus.OK)
                self.requests.clear()
                self.feed(b"")
                assert s.authenticated
        else:
            self.feed(hello + encode_frame(ChallengeFrame(nonce=NONCE)))
            s.send_auth(1, AuthMethod.HMAC_SHA256, CREDENTIAL)
            # Tunnels 1 and 2 are bound, so the relay may open streams for them (spec §9.2).
            s.send_bind(2, 1, _ADDRESSES[0])
            s.send_bind(3, 2, _ADDRESSES[0])
            self.next_req = 4
            self.feed(results)
            assert s.authenticated
        self.flush()

    # --- plumbing ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        s = self.session
        if self.in_reader is not None and not s.closed:
            try:
                for ftype, _flags, sid, payload in self.in_reader.feed(data):
                    if ftype == FrameType.WINDOW and len(payload) == 8:
                        offset = int.from_bytes(payload, "big")
                        if offset > self.granted.get(sid, 0):
                            self.granted[sid] = offset
            except ProtocolError:
                self.in_reader = None  # the session rejects this input too
        try:
            events = s.receive_data(data, self.now)
        except ProtocolError:
            assert s.closed, "ProtocolError left the session open"
            return
        for event in events:
            self.on_event(event)

    def on_event(self, event: Event) -> None:
        assert isinstance(event, _EVENT_TYPES), f"unknown event {event!r}"
        if isinstance(event, DataReceived):
            n = len(event.data)
            assert n > 0
            self.unacked[event.stream_id] = self.unacked.get(event.stream_id, 0) + n
        elif isinstance(event, StreamOpened):
            self.incoming.append(event.stream_id)
            self.sids.append(event.stream_id)
        elif isinstance(event, (StreamReset, StreamRejected)):
            # The application drops a reset stream's unread bytes (they were credited).
            self.unacked.pop(event.stream_id, None)
            if event.stream_id in self.incoming:
                self.incoming.remove(event.stream_id)
        elif isinstance(event, (BindRequested, AuthRequested)):
            self.requests.append((event.req_id, isinstance(event, BindRequested)))
        elif isinstance(event, UnbindReceived) and self.role == Role.SERVER:
            self.requests.append((event.req_id, False))

    def flush(self, max_bytes: int | None = None) -> None:
        """Take the session's output and parse it as the peer would: it must be well formed."""
        s = self.session
        wanted = s.wants_write()
        out = s.data_to_send(max_bytes)
        if not s.closed:
            # wants_write() is what the adapter's writer waits on: a False with output ready
            # stalls the connection, a True without output wakes the writer for nothing.
            assert wanted == bool(out), f"wants_write() is {wanted}, data_to_send() {out[:32]!r}"
        if not out:
            return
        stream_init, conn_init = self.initial_send
        for ftype, flags, sid, payload in self.out_reader.feed(out):
            decode_payload(ftype, flags, sid, payload)
            if ftype == FrameType.DATA and payload:
                sent = self.data_sent[sid] = self.data_sent.get(sid, 0) + len(payload)
                self.data_sent_total += len(payload)
                allowed = max(stream_init, self.granted.get(sid, 0))
                assert sent <= allowed, f"stream {sid}: sent {sent} bytes, peer allowed {allowed}"
                allowed = max(conn_init, self.granted.get(0, 0))
                assert self.data_sent_total <= allowed, (
                    f"sent {self.data_sent_total} bytes, the peer's connection window is {allowed}"
                )

    def check(self) -> None:
        s = self.session
        stats = s.statistics()
        for key in (
            "local_open",
            "local_pending",
            "remote_open",
            "remote_pending",
            "streams",
            "conn_recv_buffered",
            "conn_send_available",
            "control_queued",
        ):
            assert stats[key] >= 0, f"{key} = {stats[key]}"
        assert stats["local_pending"] <= stats["local_open"]
        assert stats["remote_pending"] <= stats["remote_open"]
        if s.closed:
            assert stats["streams"] == 0
            return
        assert stats["local_open"] + stats["remote_open"] == stats["streams"]
        if s.peer_settings is not None:
            assert stats["local_open"] <= s.peer_settings.max_concurrent_streams
            assert stats["local_pending"] <= s.peer_settings.max_pending_opens
        assert stats["remote_open"] <= s.local_settings.max_concurrent_streams
        assert stats["remote_pending"] <= s.local_settings.max_pending_opens
        # Every byte the application holds is one the session counts as held unconsumed, and
        # nothing else: connection credit is neither lost nor returned twice.
        held = stats.get("conn_recv_held", stats["conn_recv_buffered"])
        assert sum(self.unacked.values()) == held, (
            f"application holds {sum(self.unacked.values())} bytes, session counts {held}"
        )

    def local(self, call: Callable[[], object]) -> None:
        """A local API call: MuxtunnelError subclasses are acceptable answers."""
        try:
            call()
        except MuxtunnelError:
            pass

    def any_sid(self, p: _Program) -> int:
        choice = p.byte()
        if self.sids and choice < 200:
            return self.sids[choice % len(self.sids)]
        if choice < 220:
            return self.peer_next_sid
        if choice < 235:
            return min(self.session._next_id, MAX_U64)
        if choice < 245:
            return 0
        return min(p.int(8), MAX_U64)

    # --- operations ---------------------------------------------------------------------------

    def step(self, p: _Program) -> None:
        op = p.byte() % 20
        s = self.session
        if op == 0:  # raw bytes
            self.feed(p.take(p.byte()))
        elif op == 1:  # a frame with a fuzzed header and payload
            ftype = p.pick(_FRAME_TYPES)
            flags = p.byte() if p.byte() & 1 else 0
            sid = self.any_sid(p)
            payload = p.take(p.byte() % 48)
            self.feed(HEADER.pack(len(payload), ftype, flags, 0, sid) + payload)
        elif op == 2:  # an Appendix A vector, maybe moved to a live stream id
            raw = bytearray(p.pick(VECTORS))
            if p.byte() & 1 and raw[4] in (0, 1, 2, 3, 4, 5):
                raw[8:16] = self.any_sid(p).to_bytes(8, "big")
            self.feed(bytes(raw))
        elif op in (3, 4):
            self.peer_frame(p)
        elif op == 5 and self.unacked:  # the application consumed bytes
            sid = p.pick(list(self.unacked))
            n = min(self.unacked[sid], 1 + p.int(3))
            self.unacked[sid] -= n
            if not self.unacked[sid]:
                del self.unacked[sid]
            s.acknowledge(sid, n, self.now)
        elif op == 6:
            sid = self.any_sid(p)
            n = p.byte() * p.pick((1, 16, 257))
            kind = p.byte() % 3
            data: bytes | bytearray | memoryview = b"x" * n
            if kind == 1:
                data = bytearray(data)
            elif kind == 2:
                data = memoryview(b"y" * (n + 3))[3:]
            self.local(lambda: s.send_data(sid, data, end_stream=bool(p.byte() & 1)))
        elif op == 7:
            sid = self.any_sid(p)
            self.local(lambda: s.end_stream(sid))
        elif op == 8:
            sid = self.any_sid(p)
            code = p.pick(_CODES)
            live = s.stream_is_open(sid)
            self.local(lambda: s.reset_stream(sid, code))
            if live:  # the application drops a stream it reset (its bytes were credited)
                self.unacked.pop(sid, None)
        elif op == 9:
            tunnel = p.byte()
            origin, target = p.pick(_ADDRESSES), p.pick(_ADDRESSES)
            force = p.byte() & 1  # also try when the limits say no: LocalProtocolError
            if s.can_open_stream() or force:
                try:
                    sid = s.open_stream(tunnel, origin, target)
                except MuxtunnelError:
                    pass
                else:
                    self.sids.append(sid)
        elif op == 10 and self.incoming:
            sid = self.incoming.pop(p.byte() % len(self.incoming))
            if p.byte() & 3:
                self.local(lambda: s.accept_stream(sid))
            else:
                reason = p.pick(tuple(OpenFailReason))
                self.local(lambda: s.reject_stream(sid, reason, "no"))
                self.unacked.pop(sid, None)
        elif op == 11:
            self.flush(p.pick((None, 1, 100, 16_384, 1 << 20)))
        elif op == 12:
            self.local(lambda: s.ping(self.now))
        elif op == 13:
            last = p.pick((None, 0, MAX_U64, self.any_sid(p)))
            self.local(lambda: s.go_away(p.pick(_CODES), "bye", last))
        elif op == 14:
            self.now += p.pick((0.0, 0.001, 0.1, 1.0, 30.0, 1e6))
        elif op == 15:
            self.request(p)
        elif op == 16 and p.byte() == 0:
            s.close(p.pick(_CODES), "done")
        elif op == 17:
            s.receive_data(b"", self.now)
        elif op == 18:
            # Interleave: a burst of valid frames in one chunk.
            chunk = b"".join(self.build_frame(p) for _ in range(p.byte() % 8))
            self.feed(chunk)
        elif op == 19:
            self.feed(self.build_frame(p) * (1 + p.byte() % 4))

    def request(self, p: _Program) -> None:
        s = self.session
        if self.role == Role.SERVER:
            if self.requests:
                req_id, is_bind = self.requests.pop(p.byte() % len(self.requests))
                status = p.pick((ResultStatus.OK, ResultStatus.DENIED, ResultStatus.AUTH_FAILED))
                bound = _ADDRESSES[1] if is_bind and status == ResultStatus.OK else None
                self.local(lambda: s.send_result(req_id, status, "m", bound))
            elif p.byte() & 1:
                self.local(lambda: s.send_unbind(0, p.byte(), p.pick(_CODES)))
        else:
            req_id = self.next_req
            self.next_req += 1
            if p.byte() & 1:
                self.local(lambda: s.send_bind(req_id, p.byte(), p.pick(_ADDRESSES)))
                self.client_reqs.append((req_id, FrameType.BIND))
            else:
                self.local(lambda: s.send_unbind(req_id, p.byte()))
                self.client_reqs.append((req_id, FrameType.UNBIND))

    def peer_frame(self, p: _Program) -> None:
        self.feed(self.build_frame(p))

    def build_frame(self, p: _Program) -> bytes:
        """A well-formed frame that a peer could send now (fields from the input)."""
        kind = p.byte() % 14
        frame: Frame
        if kind == 0:  # OPEN on the next peer id
            sid = self.peer_next_sid if p.byte() else self.any_sid(p)
            self.peer_next_sid = min(max(self.peer_next_sid, sid) + 2, MAX_U64)
            frame = OpenFrame(
                stream_id=sid,
                tunnel_id=p.byte() % 4,
                origin=p.pick(_ADDRESSES),
                target=p.pick(_ADDRESSES),
            )
        elif kind in (1, 2):  # DATA
            sid = self.any_sid(p) or 1
            n = p.byte() * p.pick((1, 1, 64, 1024))
            fin = p.byte() & 3 == 0
            if not n and not fin:
                n = 1
            self.peer_sent[sid] = self.peer_sent.get(sid, 0) + n
            return pack_data_header(sid, n, fin) + b"d" * n
        elif kind == 3:  # WINDOW
            sid = self.any_sid(p) if p.byte() & 1 else 0
            frame = WindowFrame(
                stream_id=sid, max_offset=min(p.int(4) * p.pick((1, 256, 65_536)), 1 << 62)
            )
        elif kind == 4:
            frame = OpenAckFrame(stream_id=self.any_sid(p) or 1)
        elif kind == 5:
            frame = OpenFailFrame(
                stream_id=self.any_sid(p) or 1, reason=p.pick(tuple(OpenFailReason)), message="x"
            )
        elif kind == 6:  # RESET with the right final offset (or sometimes not)
            sid = self.any_sid(p) or 1
            final = self.peer_sent.get(sid, 0) + (p.byte() == 0)
            frame = ResetFrame(stream_id=sid, error_code=p.pick(_CODES), final_offset=final)
        elif kind == 7:  # PING, or PONG for one of ours
            if p.byte() & 1:
                self.peer_ping += 1 + (p.byte() == 0)
                frame = PingFrame(seq=self.peer_ping, ack=False)
            else:
                frame = PingFrame(seq=p.byte() % 6, ack=True)
        elif kind == 8:
            frame = GoAwayFrame(
                last_stream_id=p.pick((MAX_U64, 0, self.any_sid(p))),
                error_code=p.pick(_CODES),
                message="g",
            )
        elif kind == 9 and p.byte() == 0:
            frame = CloseFrame(error_code=p.pick(_CODES), message="c")
        elif kind == 10 and self.role == Role.SERVER:
            which = p.byte() % 4
            req_id = p.byte()
            if which == 0:
                frame = BindFrame(
                    req_id=req_id, tunnel_id=p.byte(), proto=1, flags=0, bind=p.pick(_ADDRESSES)
                )
            elif which == 3:  # BIND with options (minor version 1, §6.12)
                frame = BindFrame(
                    req_id=req_id, tunnel_id=p.byte(), proto=1, bind=NONE, options=p.pick(_OPTIONS)
                )
            elif which == 1:
                frame = UnbindFrame(req_id=req_id, tunnel_id=p.byte(), error_code=0)
            else:
                frame = AuthFrame(
                    req_id=req_id or 1,
                    method=p.pick((1, 1, 2)),
                    credential=CREDENTIAL[: p.pick((64, 64, 3))],
                )
        elif kind == 10:  # client: RESULT for a request in flight, or UNBIND notice
            if self.client_reqs and p.byte() & 3:
                req_id, rkind = self.client_reqs.pop(p.byte() % len(self.client_reqs))
                status = p.pick((0, 0, 5, 99))
                bound = _ADDRESSES[1] if rkind == FrameType.BIND and status == 0 else None
                frame = ResultFrame(req_id=req_id, status=status, message="", bound=bound)
            else:
                frame = UnbindFrame(req_id=0, tunnel_id=p.byte(), error_code=15)
        elif kind == 11:
            frame = HelloFrame(major=1, minor=0, role=p.pick((1, 2)), flags=0, settings=())
        elif kind == 12:
            frame = ChallengeFrame(nonce=NONCE)
        else:  # an extension frame
            return HEADER.pack(3, 0x80 | p.byte(), p.byte(), 0, self.any_sid(p)) + b"ext"
        return encode_frame(frame)

    def run(self, p: _Program) -> None:
        s = self.session
        steps = 0
        while p.more() and not s.closed and steps < 200:
            self.step(p)
            self.check()
            steps += 1
        self.flush()
        self.check()
        if s.closed:
            assert s.receive_data(b"after close", self.now) == []
            assert not s.wants_write()
            assert s.data_to_send() == b""


#: Pickled harnesses right after the handshake, per (role, setup): unpickling one is several
#: times faster than running the handshake again, and gives the same state.
_SNAPSHOTS: dict[tuple[Role, int], bytes] = {}


def _harness(role: Role, setup: int) -> SessionHarness:
    key = (role, setup & 0x0F)  # the setup bits SessionHarness reads
    blob = _SNAPSHOTS.get(key)
    if blob is None:
        blob = _SNAPSHOTS[key] = pickle.dumps(SessionHarness(role, setup), pickle.HIGHEST_PROTOCOL)
    harness: SessionHarness = pickle.loads(blob)
    return harness


def _run_session(data: bytes, role: Role) -> None:
    if not data:
        return
    harness = _harness(role, data[0])
    harness.run(_Program(data[1:]))


def run_session_client(data: bytes) -> None:
    """The client role: a handshake with a scripted relay, then the input as a program."""
    _run_session(data, Role.CLIENT)


def run_session_server(data: bytes) -> None:
    """The server (relay) role: authenticated via ``send_result``, then the input as a program."""
    _run_session(data, Role.SERVER)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "codec": run_codec,
    "session-client": run_session_client,
    "session-server": run_session_server,
}


# ---------------------------------------------------------------------------------------------
# Seeds: Appendix A vectors for the codec; scripted sessions built from program fragments

#: Program fragments (see ``SessionHarness.step`` and ``build_frame`` for the encoding).
FRAGMENTS: dict[str, bytes] = {
    "peer_open": bytes([3, 0, 1, 1, 1, 3]),  # OPEN on the peer's next id, tunnel 1
    "accept": bytes([10, 0, 1]),
    "reject": bytes([10, 0, 0, 3]),
    "data": bytes([3, 1, 0, 50, 0, 1]),  # DATA, 50 bytes, no FIN, on the first stream seen
    "big_data": bytes([3, 1, 0, 200, 3, 1]),  # 200 KiB: beyond the initial windows
    "ack": bytes([5, 0, 0, 0, 10]),
    "ack_all": bytes([5, 0, 0, 1, 0]),
    "send": bytes([6, 0, 10, 0, 0, 0]),
    "send_big": bytes([6, 0, 255, 2, 2, 0]),
    "flush": bytes([11, 0]),
    "flush_small": bytes([11, 1]),
    "window": bytes([3, 3, 1, 0, 0, 1, 0, 0, 0]),
    "conn_window": bytes([3, 3, 0, 0, 1, 0, 0, 0]),
    "fin": bytes([3, 1, 0, 5, 0, 0]),
    "end": bytes([7, 0]),
    "reset_local": bytes([8, 0, 8]),
    "reset_peer": bytes([3, 6, 0, 10, 1]),
    "open_local": bytes([9, 1, 0, 1, 1]),
    "open_ack": bytes([3, 4, 0]),
    "open_fail": bytes([3, 5, 0, 2]),
    "ping": bytes([12]),
    "pong": bytes([3, 7, 0, 1]),
    "peer_ping": bytes([3, 7, 1, 1]),
    "goaway": bytes([3, 8, 0, 0, 0]),
    "go_away_local": bytes([13, 3, 0, 0]),
    "request": bytes([15, 1, 1, 1]),
    "result": bytes([3, 10, 1, 0, 0]),
    "peer_request": bytes([3, 10, 0, 5, 1, 0]),
    "time": bytes([14, 2]),
    "time_long": bytes([14, 4]),
    "burst": bytes([18, 5, 1, 0, 20, 0, 1, 1, 0, 20, 0, 1, 3, 0, 0, 0, 1, 0, 0, 7, 1, 1]),
    "repeat_window": bytes([19, 3, 3, 1, 0, 0, 1, 0, 0, 0]),
}

_SCRIPTS = (
    "peer_open accept data ack send flush window fin end flush ack_all",
    "peer_open data accept data reset_peer ack flush",
    "peer_open accept data fin send end flush ack_all ack_all",
    "peer_open accept data reset_local flush data ack",
    "peer_open accept big_data big_data ack_all flush big_data",
    "open_local send flush open_ack window conn_window send flush data fin ack_all end flush",
    "open_local send_big flush open_ack flush window flush_small conn_window flush",
    "open_local open_fail flush open_local open_ack reset_peer flush",
    "ping flush pong peer_ping flush time peer_ping goaway flush",
    "peer_open accept burst flush ack_all request flush result",
    "peer_open peer_open peer_open accept accept go_away_local data flush",
    "peer_request request flush peer_request request time_long repeat_window",
)


def codec_seeds() -> list[bytes]:
    """Every Appendix A vector alone, in pairs, and all at once (first byte: chunk size)."""
    out = [b"\x00" + v for v in VECTORS]
    out += [
        bytes([i % 12]) + VECTORS[i] + VECTORS[(i * 7 + 3) % len(VECTORS)]
        for i in range(len(VECTORS))
    ]
    out.append(b"\x05" + b"".join(VECTORS))
    return out


def session_seeds() -> list[bytes]:
    """Scripted sessions under several setups (first byte), for both session targets."""
    scripts = [b"".join(FRAGMENTS[name] for name in line.split()) for line in _SCRIPTS]
    return [bytes([setup]) + script for setup in (0, 1, 2, 4, 6, 8, 9) for script in scripts]
