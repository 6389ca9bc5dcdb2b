"""The client against a hostile relay: every relay frame is untrusted input.

The relay here is written on the codec alone (``muxtunnel.protocol.frames`` over a real TLS
listener with the identity helpers of ``muxtunnel.tls``), so it can send what a real relay
never would: an OPEN for a tunnel that was never bound or whose BIND it refused, an OPEN and its
RESET in one write, thousands of OPENs, and control text with newlines. The client is the real
one (``run_client`` in this process, and once as a ``muxtunnel client`` process).
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel import tls
from muxtunnel.client import run_client
from muxtunnel.config import ClientConfig, TunnelSpec
from muxtunnel.errors import ErrorCode
from muxtunnel.policy import DEFAULT_POLICY, StreamInfo, StreamPolicy
from muxtunnel.protocol.constants import (
    MAGIC,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    OpenFailReason,
    ResultStatus,
    Role,
)
from muxtunnel.protocol.frames import (
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
    Settings,
    UnbindFrame,
    decode_payload,
    encode_frame,
)
from muxtunnel.protocol.reader import FrameReader
from tests.conftest import (
    TOKEN,
    mux_connection_pair,
    random_bytes,
    sha,
    start_echo,
    start_service,
)
from tests.system import harness

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from muxtunnel.client import ClientInfo

#: Public port the hostile relay claims for tunnel N: BOUND_BASE + N (nothing listens there).
BOUND_BASE = 30000
VISITOR = Address("127.0.0.1", 40000)


# --------------------------------------------------------------------------------------------
# A relay built on the codec


@dataclass
class HostileSession:
    """One TLS session of the hostile relay with a client.

    A reader task answers PINGs, AUTH (always OK) and BINDs (``grant`` decides) and records
    what the client sends per stream; the test writes anything it likes with :meth:`send`.
    """

    stream: trio.SSLStream[trio.SocketStream]
    grant: Callable[[int], bool]
    number: int
    peer_settings: Settings | None = None
    bound: dict[int, bool] = field(default_factory=dict)
    answers: dict[int, Frame] = field(default_factory=dict)
    resets: dict[int, ResetFrame] = field(default_factory=dict)
    data: dict[int, bytearray] = field(default_factory=dict)
    fins: dict[int, trio.Event] = field(default_factory=dict)
    stream_frames: list[tuple[int, Frame]] = field(default_factory=list)
    close: CloseFrame | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)
    next_sid: int = 2
    _lock: trio.Lock = field(default_factory=trio.Lock)

    async def send(self, *frames: Frame) -> None:
        """Write ``frames`` with one ``send_all`` (so the client reads them together)."""
        raw = b"".join(encode_frame(f) for f in frames)
        async with self._lock:
            await self.stream.send_all(raw)

    def new_sid(self) -> int:
        sid = self.next_sid
        self.next_sid += 2
        return sid

    def open_frame(self, tunnel_id: int, sid: int | None = None) -> OpenFrame:
        return OpenFrame(
            stream_id=self.new_sid() if sid is None else sid,
            tunnel_id=tunnel_id,
            origin=VISITOR,
            target=Address("127.0.0.1", BOUND_BASE + tunnel_id),
        )

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (re-checked whenever the client sent something)."""
        while not predicate():
            if self.closed.is_set():
                raise AssertionError(f"session ended first (CLOSE {self.close})")
            await self.changed.wait()

    async def answer(self, sid: int) -> Frame:
        await self.wait(lambda: sid in self.answers)
        return self.answers[sid]

    def _touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        hello = HelloFrame(
            major=PROTOCOL_MAJOR,
            minor=PROTOCOL_MINOR,
            role=int(Role.SERVER),
            settings=Settings(max_concurrent_streams=0).to_pairs(),
        )
        challenge = ChallengeFrame(nonce=secrets.token_bytes(32))
        async with self._lock:
            await self.stream.send_all(MAGIC + encode_frame(hello) + encode_frame(challenge))
        task_status.started()
        reader = FrameReader(max_data_payload=1 << 20, max_control_payload=65535)
        try:
            while True:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return
                for frame_type, flags, sid, payload in reader.feed(chunk):
                    await self._on_frame(decode_payload(frame_type, flags, sid, payload))
                self._touch()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.closed.set()
            self._touch()

    async def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, HelloFrame):
            self.peer_settings = Settings.from_pairs(frame.settings, Settings())
        elif isinstance(frame, PingFrame):
            if not frame.ack:
                await self.send(PingFrame(seq=frame.seq, ack=True))
        elif isinstance(frame, AuthFrame):
            await self.send(ResultFrame(req_id=frame.req_id, status=ResultStatus.OK))
        elif isinstance(frame, BindFrame):
            ok = self.grant(frame.tunnel_id)
            self.bound[frame.tunnel_id] = ok
            if ok:
                result = ResultFrame(
                    req_id=frame.req_id,
                    status=ResultStatus.OK,
                    bound=Address("127.0.0.1", BOUND_BASE + frame.tunnel_id),
                )
            else:
                result = ResultFrame(
                    req_id=frame.req_id, status=ResultStatus.DENIED, message="not for you"
                )
            await self.send(result)
        elif isinstance(frame, OpenAckFrame | OpenFailFrame):
            self.answers[frame.stream_id] = frame
            self.stream_frames.append((frame.stream_id, frame))
        elif isinstance(frame, ResetFrame):
            self.resets[frame.stream_id] = frame
            self.stream_frames.append((frame.stream_id, frame))
        elif isinstance(frame, DataFrame):
            self.data.setdefault(frame.stream_id, bytearray()).extend(frame.data)
            self.stream_frames.append((frame.stream_id, frame))
            if frame.fin:
                self.fins.setdefault(frame.stream_id, trio.Event()).set()
        elif isinstance(frame, CloseFrame):
            self.close = frame

    async def echo_check(self, tunnel_id: int, size: int = 100_000, seed: int = 1) -> None:
        """Open a stream on ``tunnel_id`` (an echo service), send ``size`` bytes, check them."""
        payload = random_bytes(size, seed)
        sid = self.new_sid()
        await self.send(self.open_frame(tunnel_id, sid))
        answer = await self.answer(sid)
        assert isinstance(answer, OpenAckFrame), answer
        for i in range(0, size, 16384):
            await self.send(DataFrame(stream_id=sid, data=payload[i : i + 16384]))
        await self.send(DataFrame(stream_id=sid, fin=True))
        await self.wait(lambda: sid in self.fins or sid in self.resets)
        got = bytes(self.data.get(sid, b""))
        assert len(got) == size, (len(got), self.resets.get(sid))
        assert sha(got) == sha(payload)


class HostileRelay:
    """A TLS listener on 127.0.0.1 whose sessions are :class:`HostileSession`."""

    def __init__(self, tmp_path: Path, grant: Callable[[int], bool] = lambda tid: True) -> None:
        self.identity = tls.load_or_create_identity(tmp_path / "hostile-relay")
        self.context = tls.server_ssl_context(self.identity)
        self.grant = grant
        self.port = 0
        self.sessions: list[HostileSession] = []
        self._send, self._recv = trio.open_memory_channel[HostileSession](math.inf)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(
                partial(self._handle, nursery), listeners, handler_nursery=nursery
            )

    async def _handle(self, nursery: trio.Nursery, tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            return
        session = HostileSession(stream, self.grant, len(self.sessions) + 1)
        self.sessions.append(session)
        await nursery.start(session.run)
        self._send.send_nowait(session)
        await session.closed.wait()
        await trio.aclose_forcefully(stream)

    async def next_session(self, *, binds: int) -> HostileSession:
        """The next client session, once it has sent ``binds`` BINDs (all answered)."""
        session = await self._recv.receive()
        await session.wait(lambda: len(session.bound) >= binds)
        return session


async def start_hostile_relay(
    nursery: trio.Nursery, tmp_path: Path, grant: Callable[[int], bool] = lambda tid: True
) -> HostileRelay:
    relay = HostileRelay(tmp_path, grant)
    await nursery.start(relay.serve)
    return relay


@dataclass
class RunningClient:
    info: ClientInfo
    done: trio.Event
    lines: list[str]
    errors: list[BaseException] = field(default_factory=list)


async def start_client(
    nursery: trio.Nursery,
    tmp_path: Path,
    relay: HostileRelay,
    tunnels: list[TunnelSpec],
    *,
    policy: StreamPolicy = DEFAULT_POLICY,
    **overrides: object,
) -> RunningClient:
    """``run_client`` against ``relay`` in ``nursery``; an error it raises is kept, not raised."""
    config = ClientConfig(
        server_host="127.0.0.1",
        server_port=relay.port,
        token=TOKEN,
        fingerprint=relay.identity.fingerprint,
        state_dir=tmp_path / "client-state",
        tunnels=tuple(tunnels),
        connect_timeout=2.0,
        backoff_cap=1.0,
    )
    config = replace(config, **overrides)  # type: ignore[arg-type]
    done = trio.Event()
    lines: list[str] = []
    errors: list[BaseException] = []

    async def run(task_status: trio.TaskStatus[ClientInfo]) -> None:
        try:
            await run_client(config, report=lines.append, policy=policy, task_status=task_status)
        except BaseException as exc:  # kept for the assertions (the client must not end)
            errors.append(exc)
            if not isinstance(exc, trio.Cancelled):
                return
            raise
        finally:
            done.set()

    info = await nursery.start(run)
    return RunningClient(info, done, lines, errors)


def client_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("muxtunnel")]


# --------------------------------------------------------------------------------------------
# Streams the client must not dial, and frame orderings it must survive


@pytest.mark.parametrize("ender", ["reset", "close"])
async def test_open_unknown_tunnel_then_end_in_one_write(
    nursery: trio.Nursery, tmp_path: Path, ender: str
) -> None:
    """OPEN for an unknown tunnel and its RESET (or a CLOSE) in one write: the client stays up."""
    echo = await start_echo(nursery)
    relay = await start_hostile_relay(nursery, tmp_path)
    with trio.fail_after(30):
        client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)])
        session = await relay.next_session(binds=1)
        unknown = session.open_frame(99)
        if ender == "reset":
            good = session.open_frame(1)  # reset before the dial can finish
            await session.send(
                unknown,
                ResetFrame(
                    stream_id=unknown.stream_id, error_code=int(ErrorCode.CANCEL), final_offset=0
                ),
                good,
                ResetFrame(
                    stream_id=good.stream_id, error_code=int(ErrorCode.CANCEL), final_offset=0
                ),
            )
            await session.echo_check(1)
            # Nothing but a refusal (which may cross the RESET) is sent on either stream.
            for sid in (unknown.stream_id, good.stream_id):
                for frame in [f for s, f in session.stream_frames if s == sid]:
                    assert isinstance(frame, OpenFailFrame), frame
            assert session.close is None
            assert not session.closed.is_set()
        else:
            await session.send(
                unknown, CloseFrame(error_code=int(ErrorCode.NO_ERROR), message="bye")
            )
            session = await relay.next_session(binds=1)  # the client reconnects
            await session.echo_check(1)
    assert not client.done.is_set(), client.errors


async def test_answering_a_stream_the_peer_already_reset(nursery: trio.Nursery) -> None:
    """``reject()`` of a stream reset before it was answered is a no-op; ``accept()`` raises
    the stream's error (never a ``RuntimeError``)."""
    relay_side, client_side = await mux_connection_pair(nursery)
    with trio.fail_after(10):
        for answer in ("reject", "accept"):
            await relay_side.wait_open_slot()
            opened = relay_side.open_stream(1, VISITOR, Address("127.0.0.1", BOUND_BASE + 1))
            opened.reset()
            incoming = await client_side.accept_stream()
            with pytest.raises(trio.BrokenResourceError):  # the RESET follows the OPEN
                await incoming.wait_opened()
            assert incoming.failure is not None
            if answer == "reject":
                incoming.reject(OpenFailReason.CONNECT_FAILED, "too late")
                incoming.reject(OpenFailReason.CONNECT_FAILED, "twice")
            else:
                with pytest.raises(trio.BrokenResourceError):
                    incoming.accept()
    assert client_side.usable


async def test_open_for_refused_or_unknown_tunnel_is_never_dialed(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client dials only tunnels the relay accepted in this session."""
    caplog.set_level(logging.INFO, logger="muxtunnel")
    echo = await start_echo(nursery)
    tripped: list[int] = []

    async def tripwire(stream: trio.SocketStream) -> None:
        tripped.append(1)
        await stream.aclose()

    wire = await start_service(nursery, tripwire)
    relay = await start_hostile_relay(nursery, tmp_path, grant=lambda tid: tid != 2)
    with trio.fail_after(30):
        client = await start_client(
            nursery, tmp_path, relay, [TunnelSpec(local_port=echo), TunnelSpec(local_port=wire)]
        )
        assert [t.tunnel_id for t in client.info.tunnels] == [1]
        session = await relay.next_session(binds=2)
        assert session.bound == {1: True, 2: False}
        opens = [session.open_frame(2) for _ in range(20)] + [session.open_frame(7)]
        await session.send(*opens)
        for frame in opens:
            answer = await session.answer(frame.stream_id)
            assert isinstance(answer, OpenFailFrame), answer
            assert answer.reason == OpenFailReason.UNKNOWN_TUNNEL
        await session.echo_check(1)
        await session.send(CloseFrame(error_code=int(ErrorCode.NO_ERROR)))
        await relay.next_session(binds=2)  # the first session's summary is logged by now
    assert tripped == []
    refusals = [
        r
        for r in client_records(caplog)
        if "refused on arrival" in r.getMessage() or "did not accept" in r.getMessage()
    ]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    assert "21 streams" in refusals[0].getMessage()
    assert not client.done.is_set(), client.errors


async def test_open_burst_is_bounded_per_tunnel(nursery: trio.Nursery, tmp_path: Path) -> None:
    """5,000 OPENs on one tunnel: the local service never sees more than the per-tunnel bound,
    the excess is refused with RESOURCE_SHORTAGE, and the other tunnel keeps working."""
    bound = 256  # the default of --max-streams-per-tunnel
    held = 0
    most = 0
    release = trio.Event()

    async def holder(stream: trio.SocketStream) -> None:
        nonlocal held, most
        held += 1
        most = max(most, held)
        try:
            await release.wait()
        finally:
            held -= 1
            await trio.aclose_forcefully(stream)

    hold_port = await start_service(nursery, holder)
    echo = await start_echo(nursery)
    relay = await start_hostile_relay(nursery, tmp_path)
    total = 5000
    with trio.fail_after(120):
        client = await start_client(
            nursery,
            tmp_path,
            relay,
            [TunnelSpec(local_port=hold_port), TunnelSpec(local_port=echo)],
        )
        session = await relay.next_session(binds=2)
        assert session.peer_settings is not None
        window = session.peer_settings.max_pending_opens
        sids: list[int] = []

        def unanswered() -> int:
            return len(sids) - len(session.answers)

        while len(sids) < total:
            # Keep as many OPENs unanswered as the client allows (its MAX_PENDING_OPENS).
            await session.wait(lambda: unanswered() < window)
            batch = min(total - len(sids), window - unanswered())
            frames = [session.open_frame(1) for _ in range(batch)]
            sids += [f.stream_id for f in frames]
            await session.send(*frames)
        await session.wait(lambda: all(sid in session.answers for sid in sids))
        acked = [s for s in sids if isinstance(session.answers[s], OpenAckFrame)]
        refused = [session.answers[s] for s in sids if s not in acked]
        assert len(acked) == bound
        assert all(
            isinstance(f, OpenFailFrame) and f.reason == OpenFailReason.RESOURCE_SHORTAGE
            for f in refused
        )
        await session.echo_check(2)
        release.set()
    assert 0 < most <= bound, most
    assert not client.done.is_set(), client.errors


async def test_total_stream_bound(nursery: trio.Nursery, tmp_path: Path) -> None:
    """``max_streams`` bounds local connections across tunnels; a freed slot is reused."""
    release = trio.Event()

    async def holder(stream: trio.SocketStream) -> None:
        with trio.move_on_after(60):
            await release.wait()
        await trio.aclose_forcefully(stream)

    ports = [await start_service(nursery, holder) for _ in range(2)]
    relay = await start_hostile_relay(nursery, tmp_path)
    with trio.fail_after(30):
        client = await start_client(
            nursery,
            tmp_path,
            relay,
            [TunnelSpec(local_port=p) for p in ports],
            max_streams=6,
            max_streams_per_tunnel=4,
        )
        session = await relay.next_session(binds=2)
        first = [session.open_frame(1) for _ in range(5)]
        await session.send(*first)
        answers = [await session.answer(f.stream_id) for f in first]
        assert [type(a) for a in answers] == [OpenAckFrame] * 4 + [OpenFailFrame]
        second = [session.open_frame(2) for _ in range(3)]
        await session.send(*second)
        answers = [await session.answer(f.stream_id) for f in second]
        assert [type(a) for a in answers] == [OpenAckFrame] * 2 + [OpenFailFrame]
        for answer in answers[2:]:
            assert isinstance(answer, OpenFailFrame)
            assert answer.reason == OpenFailReason.RESOURCE_SHORTAGE
        # The relay resets one held stream: its local connection is closed and the slot is free.
        await session.send(
            ResetFrame(
                stream_id=first[0].stream_id, error_code=int(ErrorCode.CANCEL), final_offset=0
            )
        )
        again = session.open_frame(2)
        for _ in range(100):  # the reset is processed before the OPEN that follows it
            await session.send(again)
            answer = await session.answer(again.stream_id)
            if isinstance(answer, OpenAckFrame):
                break
            again = session.open_frame(2)
        assert isinstance(answer, OpenAckFrame), answer
        release.set()
    assert not client.done.is_set(), client.errors


class _BrokenOnce(StreamPolicy):
    """A policy whose first ``prologue`` raises: an unexpected error inside one stream."""

    def __init__(self) -> None:
        self.raised = False

    def prologue(self, info: StreamInfo) -> bytes:
        if not self.raised:
            self.raised = True
            raise ValueError("policy bug")
        return b""


async def test_stream_error_ends_only_that_stream(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    echo = await start_echo(nursery)
    relay = await start_hostile_relay(nursery, tmp_path)
    policy = _BrokenOnce()
    with trio.fail_after(30):
        client = await start_client(
            nursery, tmp_path, relay, [TunnelSpec(local_port=echo)], policy=policy
        )
        session = await relay.next_session(binds=1)
        broken = session.open_frame(1)
        await session.send(broken, DataFrame(stream_id=broken.stream_id, data=b"x", fin=True))
        await session.wait(lambda: broken.stream_id in session.resets)
        assert policy.raised
        await session.echo_check(1)
        assert not session.closed.is_set()
    assert not client.done.is_set(), client.errors
    errors = [r for r in client_records(caplog) if "policy bug" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]


# --------------------------------------------------------------------------------------------
# Text and control frames from the relay


async def test_peer_text_is_logged_escaped(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Newlines and escape sequences in BIND refusals, GOAWAY and CLOSE: one escaped line each."""
    caplog.set_level(logging.DEBUG, logger="muxtunnel")
    echo = await start_echo(nursery)
    relay = await start_hostile_relay(nursery, tmp_path, grant=lambda tid: tid != 2)
    with trio.fail_after(30):
        client = await start_client(
            nursery, tmp_path, relay, [TunnelSpec(local_port=echo), TunnelSpec(local_port=echo)]
        )
        session = await relay.next_session(binds=2)
        await session.send(
            GoAwayFrame(
                last_stream_id=0,
                error_code=int(ErrorCode.NO_ERROR),
                message="soon\nFORGED-GOAWAY ERROR muxtunnel.client: \x1b[2Jgone",
            ),
            CloseFrame(
                error_code=int(ErrorCode.NO_ERROR),
                message="bye\nFORGED-CLOSE ERROR muxtunnel.client: owned",
            ),
        )
        await relay.next_session(binds=2)  # the client reconnects
    assert not client.done.is_set(), client.errors
    records = client_records(caplog)
    for record in records:
        message = record.getMessage()
        assert "\n" not in message, message
        assert "\x1b" not in message, message
    for marker in ("FORGED-GOAWAY", "FORGED-CLOSE"):
        assert len([r for r in records if marker in r.getMessage()]) == 1, marker


@pytest.mark.parametrize(
    ("frames", "ends_session"),
    [
        pytest.param(
            [ResultFrame(req_id=77, status=250, message="\n" * 1000)],
            True,
            id="result-unknown-req",
        ),
        pytest.param([ChallengeFrame(nonce=b"\x00" * 32)], True, id="second-challenge"),
        pytest.param(
            [GoAwayFrame(last_stream_id=0, error_code=0xDEAD, message="\x1b[31m" * 200)],
            False,
            id="goaway-huge-unknown-code",
        ),
        pytest.param(
            [UnbindFrame(req_id=0, tunnel_id=12345, error_code=0xBEEF)], False, id="unbind-unknown"
        ),
        pytest.param([ExtensionFrame(frame_type=0xF0, payload=b"?" * 3000)], False, id="extension"),
        pytest.param(
            [CloseFrame(error_code=0xFFFF_FFFF, message="\u202e\x00" * 400)],
            True,
            id="close-absurd",
        ),
    ],
)
async def test_absurd_control_frames_never_raise(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    frames: list[Frame],
    ends_session: bool,
) -> None:
    """Odd control frames end the session cleanly (the client reconnects) or are ignored."""
    caplog.set_level(logging.DEBUG, logger="muxtunnel")
    echo = await start_echo(nursery)
    relay = await start_hostile_relay(nursery, tmp_path)
    with trio.fail_after(30):
        client = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)])
        session = await relay.next_session(binds=1)
        await session.send(*frames)
        if isinstance(frames[0], GoAwayFrame):
            # No new stream may follow a GOAWAY: end this session, check the next one.
            await session.send(CloseFrame(error_code=int(ErrorCode.NO_ERROR)))
            ends_session = True
        if ends_session:
            await session.closed.wait()
            session = await relay.next_session(binds=1)  # the client reconnected
        # Frames are processed in order: the stream is answered after the odd frames were.
        await session.echo_check(1)
    assert not client.done.is_set(), client.errors
    for record in client_records(caplog):
        assert record.exc_info is None, record.getMessage()
        assert record.levelno < logging.ERROR, record.getMessage()
        message = record.getMessage()
        for bad in ("\n", "\x1b", "\u202e", "\x00"):
            assert bad not in message, message


async def test_relay_that_drops_every_session_gets_growing_backoff(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A relay that accepts and closes at once cannot make the client reconnect in a loop."""
    echo = await start_echo(nursery)
    relay = await start_hostile_relay(nursery, tmp_path)
    with trio.fail_after(60):
        client = await start_client(
            nursery, tmp_path, relay, [TunnelSpec(local_port=echo)], backoff_cap=30.0
        )
        starts: list[float] = []
        for _ in range(5):
            session = await relay.next_session(binds=1)
            starts.append(trio.current_time())
            await session.send(CloseFrame(error_code=int(ErrorCode.NO_ERROR), message="go away"))
    # Backoff of 0.5 s doubling per flap, jitter 0.5-1.0: at least 0.25 + 0.5 + 1 + 2 s.
    assert starts[-1] - starts[0] >= 3.5, starts
    assert not client.done.is_set(), client.errors


# --------------------------------------------------------------------------------------------
# A real client process


class _InProcessRelay:
    """Stands in for the relay process in the harness's failure reports."""

    def describe(self) -> str:
        return "--- hostile relay (in the test process)"


async def test_client_process_survives_hostile_relay(nursery: trio.Nursery, tmp_path: Path) -> None:
    """``muxtunnel client``: OPEN+RESET for an unknown tunnel, then a CLOSE with a newline."""
    echo = await start_echo(nursery)
    relay = await start_hostile_relay(nursery, tmp_path)
    stand_in = harness.Relay(
        proc=_InProcessRelay(),  # type: ignore[arg-type]
        host="127.0.0.1",
        port=relay.port,
        fingerprint=relay.identity.fingerprint,
        port_range=(BOUND_BASE, BOUND_BASE + 10),
        state_dir=tmp_path / "hostile-relay",
        token=TOKEN,
    )
    group = harness.ProcessGroup()
    try:
        with trio.fail_after(60):
            client = await trio.to_thread.run_sync(
                partial(harness.start_client, group, tmp_path, stand_in, [str(echo)])
            )
            assert client.forwards[0].port == BOUND_BASE + 1
            session = await relay.next_session(binds=1)
            unknown = session.open_frame(99)
            await session.send(
                unknown,
                ResetFrame(
                    stream_id=unknown.stream_id, error_code=int(ErrorCode.CANCEL), final_offset=0
                ),
            )
            await session.echo_check(1, seed=2)
            await session.send(
                CloseFrame(
                    error_code=int(ErrorCode.NO_ERROR),
                    message="bye\nFORGED-LINE muxtunnel.client ERROR owned",
                )
            )
            session = await relay.next_session(binds=1)
            await session.echo_check(1, seed=3)
            assert client.proc.returncode is None
            rc = await trio.to_thread.run_sync(client.proc.terminate)
        assert rc == 0, client.proc.describe()
        stderr = client.proc.stderr_lines
        assert not [line for line in stderr if line.startswith("FORGED")], stderr
        assert len([line for line in stderr if "FORGED-LINE" in line]) == 1, stderr
        assert not [line for line in stderr if "Traceback" in line], stderr
    finally:
        await trio.to_thread.run_sync(group.close)
