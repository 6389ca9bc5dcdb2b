"""Malicious peers built on the codec: a hostile client and a hostile relay (real TLS, loopback).

Both speak just enough of the protocol (protocol-spec.md §3, §7) to get past the handshake, then
let a test write arbitrary frames or raw bytes and read what the real process answers.

Frame encoders
    Module functions return the wire bytes of one frame with any field value: ``data``,
    ``window``, ``open_frame``, ``open_ack``, ``open_fail``, ``reset``, ``hello``, ``ping``,
    ``goaway``, ``close``, ``auth``, ``bind``, ``unbind``, ``result``, ``challenge`` and
    ``raw_frame`` (any type, flags, stream id and payload). Concatenate them (or multiply one)
    and hand the result to ``FramePeer.send`` to put many frames in one write.

``FramePeer``
    One TLS connection owned by an I/O thread (non-blocking socket, so reads and writes never
    wait on each other). ``send(*chunks)`` queues bytes as one write; ``flush()`` waits until
    they are in the kernel; ``frames`` lists every decoded frame received; ``wait_for(pred)``
    waits for one (``arrival(index)`` tells when it was read), ``wait_state(pred)`` for any
    condition on them; ``close_frame`` is the peer's CLOSE; ``eof`` is set when the connection
    ended. PINGs are answered (``auto_pong``).

``Credit(peer)``
    The peer's flow-control limits (HELLO windows + WINDOW frames, §8) against what we sent:
    ``update()``, ``room(stream_id)``, ``data(stream_id, payload)`` (counts what it encodes).

``HostileClient(host, port, token, source=...)``
    TCP + TLS 1.3 (ALPN ``muxtunnel/1``; certificate not verified unless ``fingerprint``) to a
    relay process, MAGIC + HELLO + AUTH with a valid credential; ``bind(tunnel_id)`` returns the
    public port; ``opens`` are the relay's OPENs; ``next_req_id()`` for hand-made requests.

``HostileRelay(workdir)``
    A TLS server with a self-signed identity a client process can pin (``fingerprint``);
    ``accept()`` returns a ``RelayPeer`` whose ``handshake(...)`` sends MAGIC, HELLO and
    CHALLENGE, checks (or ignores) AUTH, answers it and the client's BINDs as the test wants;
    ``open(tunnel_id)`` sends an OPEN with the next relay stream id.

``cpu_seconds(pid)``: user + system CPU time a process has used (Linux /proc).
``client_specs(local_ports)``: tunnel specs for a client process (one auto-port tunnel each).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import ssl
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Self

from muxtunnel import tls
from muxtunnel.errors import ErrorCode, ProtocolError
from muxtunnel.handshake import make_credential, match_entry
from muxtunnel.protocol.constants import (
    ALPN,
    MAGIC,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    AuthMethod,
    FrameType,
    ResultStatus,
    Role,
    TunnelProto,
)
from muxtunnel.protocol.frames import (
    HEADER,
    Address,
    AuthFrame,
    BindFrame,
    ChallengeFrame,
    CloseFrame,
    DataFrame,
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
)
from muxtunnel.protocol.reader import FrameReader
from muxtunnel.tokens import plaintext_entry

from .procs import HarnessError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

__all__ = [
    "Credit",
    "FramePeer",
    "HostileClient",
    "HostileRelay",
    "RelayPeer",
    "auth",
    "bind",
    "challenge",
    "close",
    "cpu_seconds",
    "data",
    "goaway",
    "hello",
    "open_ack",
    "open_fail",
    "open_frame",
    "ping",
    "raw_frame",
    "reset",
    "result",
    "unbind",
    "window",
]

#: Bytes handed to one ``SSLSocket.send`` (the rest of a big write follows in the next call).
_WRITE_CHUNK = 256 * 1024
#: Decoded frames kept per connection; beyond it only ``counts`` grows.
_MAX_KEPT_FRAMES = 200_000
#: An origin address for hand-made OPENs.
VISITOR = Address("127.0.0.9", 40000)


# --------------------------------------------------------------------------------------------
# frame encoders (any field value; the codec checks only what it must to produce bytes)


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame with any header fields and payload (the length is the payload's)."""
    return HEADER.pack(len(payload), frame_type, flags, 0, stream_id) + payload


def data(stream_id: int, payload: bytes = b"", *, fin: bool = False) -> bytes:
    """DATA (§6.1)."""
    return encode_frame(DataFrame(stream_id=stream_id, data=payload, fin=fin))


def window(stream_id: int, max_offset: int) -> bytes:
    """WINDOW (§6.2); stream 0 is the connection."""
    return encode_frame(WindowFrame(stream_id=stream_id, max_offset=max_offset))


def open_frame(
    stream_id: int, tunnel_id: int, *, origin: Address = VISITOR, target: Address | None = None
) -> bytes:
    """OPEN (§6.3)."""
    target = target or Address("127.0.0.1", 1)
    return encode_frame(
        OpenFrame(stream_id=stream_id, tunnel_id=tunnel_id, origin=origin, target=target)
    )


def open_ack(stream_id: int) -> bytes:
    """OPEN_ACK (§6.4)."""
    return encode_frame(OpenAckFrame(stream_id=stream_id))


def open_fail(stream_id: int, reason: int, message: str = "") -> bytes:
    """OPEN_FAIL (§6.5)."""
    return encode_frame(OpenFailFrame(stream_id=stream_id, reason=reason, message=message))


def reset(stream_id: int, code: int = ErrorCode.CANCEL, final_offset: int = 0) -> bytes:
    """RESET (§6.6)."""
    return encode_frame(
        ResetFrame(stream_id=stream_id, error_code=int(code), final_offset=final_offset)
    )


def hello(role: int, settings: Settings | None = None, *, major: int = PROTOCOL_MAJOR) -> bytes:
    """HELLO (§6.7) with ``settings`` (default: the role's defaults)."""
    if settings is None:
        settings = Settings(max_concurrent_streams=0) if role == Role.SERVER else Settings()
    return encode_frame(
        HelloFrame(major=major, minor=PROTOCOL_MINOR, role=role, settings=settings.to_pairs())
    )


def ping(seq: int, *, ack: bool = False) -> bytes:
    """PING (§6.8)."""
    return encode_frame(PingFrame(seq=seq, ack=ack))


def goaway(last_stream_id: int, code: int = ErrorCode.NO_ERROR, message: str = "") -> bytes:
    """GOAWAY (§6.9)."""
    return encode_frame(
        GoAwayFrame(last_stream_id=last_stream_id, error_code=int(code), message=message)
    )


def close(code: int = ErrorCode.NO_ERROR, message: str = "") -> bytes:
    """CLOSE (§6.10)."""
    return encode_frame(CloseFrame(error_code=int(code), message=message))


def auth(req_id: int, credential: bytes, method: int = AuthMethod.HMAC_SHA256) -> bytes:
    """AUTH (§6.11)."""
    return encode_frame(AuthFrame(req_id=req_id, method=method, credential=credential))


def bind(req_id: int, tunnel_id: int, port: int = 0, proto: int = TunnelProto.TCP) -> bytes:
    """BIND (§6.12) for ``port`` (0: the relay picks)."""
    address = Address(None, 0) if port == 0 else Address("0.0.0.0", port)
    return encode_frame(BindFrame(req_id=req_id, tunnel_id=tunnel_id, proto=proto, bind=address))


def unbind(req_id: int, tunnel_id: int, code: int = ErrorCode.NO_ERROR) -> bytes:
    """UNBIND (§6.13)."""
    return encode_frame(UnbindFrame(req_id=req_id, tunnel_id=tunnel_id, error_code=int(code)))


def result(req_id: int, status: int, message: str = "", bound: Address | None = None) -> bytes:
    """RESULT (§6.14)."""
    return encode_frame(ResultFrame(req_id=req_id, status=status, message=message, bound=bound))


def challenge(nonce: bytes) -> bytes:
    """CHALLENGE (§6.15)."""
    return encode_frame(ChallengeFrame(nonce=nonce))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by ``pid`` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
        stat = fh.read()
    fields = stat[stat.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# one connection


class FramePeer:
    """A TLS connection whose I/O thread writes queued bytes and decodes received frames."""

    def __init__(self, sock: ssl.SSLSocket, name: str, *, auto_pong: bool = True) -> None:
        self.sock = sock
        self.name = name
        self.auto_pong = auto_pong
        #: Every decoded frame received (up to a bound), in order.
        self.frames: list[Frame] = []
        #: ``time.monotonic()`` when each frame of ``frames`` was read.
        self.arrivals: list[float] = []
        #: Received frames per type.
        self.counts: Counter[int] = Counter()
        #: DATA payload bytes received per stream.
        self.data_bytes: Counter[int] = Counter()
        #: The peer's CLOSE, once received.
        self.close_frame: CloseFrame | None = None
        #: Set when the connection ended (EOF, reset or local close).
        self.eof = threading.Event()
        #: How the connection ended, or what could not be decoded.
        self.errors: list[str] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self._reader = FrameReader(
            max_data_payload=16_777_215, max_control_payload=65_535, expect_magic=True
        )
        self._out = bytearray()
        self._stop = False
        self._cond = threading.Condition()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"peer-{name}", daemon=True)
        self._thread.start()

    # -- writing ------------------------------------------------------------------------------

    def send(self, *chunks: bytes) -> None:
        """Queue ``chunks`` as one write (frames, raw bytes, anything)."""
        with self._cond:
            for chunk in chunks:
                self._out += chunk
        self._wake()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued has been handed to the kernel."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._out and not self.eof.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(
                        f"{self.name}: {len(self._out)} bytes still unsent after {timeout:.1f} s"
                    )
                self._cond.wait(min(remaining, 0.1))

    @property
    def unsent(self) -> int:
        """Bytes queued but not yet written to the socket."""
        with self._cond:
            return len(self._out)

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self) -> list[Frame]:
        """A copy of the frames received so far."""
        with self._cond:
            return list(self.frames)

    def wait_for(
        self,
        predicate: Callable[[Frame], bool],
        *,
        timeout: float = 10.0,
        start: int = 0,
        what: str = "a frame",
    ) -> tuple[Frame, int]:
        """Wait for a received frame at index >= ``start`` matching ``predicate``.

        Returns the frame and its index; raises HarnessError (with what arrived) on timeout or
        when the connection ends first.
        """
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.frames):
                    frame = self.frames[index]
                    if predicate(frame):
                        return frame, index
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof.is_set():
                    break
                self._cond.wait(min(remaining, 0.1))
        reason = "connection ended" if self.eof.is_set() else f"timed out after {timeout:.1f} s"
        raise HarnessError(f"{self.name}: {reason} waiting for {what}; {self.describe()}")

    def wait_state(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, checked whenever frames arrive or the connection
        ends (at most ``timeout`` s); True if it held."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
        return True

    def arrival(self, index: int) -> float:
        """``time.monotonic()`` when frame ``index`` of ``frames`` was read."""
        with self._cond:
            return self.arrivals[index]

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Wait until the connection ends; True if it did within ``timeout``."""
        return self.eof.wait(timeout)

    def describe(self) -> str:
        """One line: counts of received frames, the CLOSE, errors."""
        kinds = ", ".join(
            f"{_type_name(t)} x{n}" for t, n in sorted(self.counts.items(), key=lambda kv: kv[0])
        )
        closed = "none"
        if self.close_frame is not None:
            closed = f"{ErrorCode.from_wire(self.close_frame.error_code).name} {self.close_frame.message!r}"
        return (
            f"received [{kinds or 'nothing'}], CLOSE: {closed}, ended: {self.eof.is_set()}, "
            f"sent {self.bytes_sent} B, received {self.bytes_received} B, "
            f"errors: {self.errors[:3]}"
        )

    def closed_with(self) -> ErrorCode | None:
        """The error code of the peer's CLOSE, if one arrived."""
        if self.close_frame is None:
            return None
        return ErrorCode.from_wire(self.close_frame.error_code)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the I/O thread and close the socket (abruptly)."""
        self._stop = True
        self._wake()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._wake_r.close()
        self._wake_w.close()
        self.eof.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the I/O thread ----------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _ended(self, why: str) -> None:
        with self._cond:
            self.errors.append(why)
            self.eof.set()
            self._cond.notify_all()

    def _write_some(self) -> bool:
        """Write from the queue; False if the connection failed."""
        with self._cond:
            chunk = bytes(self._out[:_WRITE_CHUNK])
        if not chunk:
            return True
        try:
            n = self.sock.send(chunk)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return True
        except OSError as exc:
            self._ended(f"write failed: {exc!r}")
            return False
        with self._cond:
            del self._out[:n]
            self.bytes_sent += n
            self._cond.notify_all()
        return True

    def _read_some(self) -> bool:
        """Read what is available; False if the connection ended."""
        for _ in range(64):
            try:
                chunk = self.sock.recv(262_144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return True
            except OSError as exc:
                self._ended(f"read failed: {exc!r}")
                return False
            if not chunk:
                self._ended("EOF")
                return False
            self.bytes_received += len(chunk)
            self._feed(chunk)
        return True

    def _feed(self, chunk: bytes) -> None:
        try:
            raws = self._reader.feed(chunk)
        except ProtocolError as exc:
            self._ended(f"unparsable input: {exc}")
            return
        pongs: list[bytes] = []
        decoded: list[Frame] = []
        for frame_type, flags, sid, payload in raws:
            self.counts[frame_type] += 1
            if frame_type == FrameType.DATA:
                self.data_bytes[sid] += len(payload)
            try:
                frame = decode_payload(frame_type, flags, sid, bytes(payload))
            except ProtocolError as exc:
                self.errors.append(f"undecodable {_type_name(frame_type)}: {exc}")
                continue
            decoded.append(frame)
            if self.auto_pong and isinstance(frame, PingFrame) and not frame.ack:
                pongs.append(ping(frame.seq, ack=True))
            if isinstance(frame, CloseFrame) and self.close_frame is None:
                self.close_frame = frame
        now = time.monotonic()
        with self._cond:
            kept = decoded[: max(0, _MAX_KEPT_FRAMES - len(self.frames))]
            self.frames.extend(kept)
            self.arrivals.extend([now] * len(kept))
            if pongs:
                self._out += b"".join(pongs)
            self._cond.notify_all()

    def _run(self) -> None:
        sock = self.sock
        try:
            while not self._stop:
                if not self._write_some():
                    return
                if not self._read_some():
                    return
                readers: list[socket.socket] = [self._wake_r, sock]
                writers = [sock] if self.unsent else []
                if sock.pending():
                    continue
                try:
                    ready, _, _ = select.select(readers, writers, [], 0.05)
                except (OSError, ValueError):
                    self._ended("socket closed")
                    return
                if self._wake_r in ready:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
        except Exception as exc:  # a bug here must show up in the test's failure message
            self._ended(f"I/O thread failed: {exc!r}")


def _type_name(frame_type: int) -> str:
    try:
        return FrameType(frame_type).name
    except ValueError:
        return f"0x{frame_type:02x}"


def _is(kind: type[Frame], **fields: object) -> Callable[[Frame], bool]:
    def pred(frame: Frame) -> bool:
        return isinstance(frame, kind) and all(getattr(frame, k) == v for k, v in fields.items())

    return pred


class Credit:
    """What the peer lets us send: its HELLO's initial windows plus every WINDOW since (§8)."""

    def __init__(self, peer: FramePeer, *, timeout: float = 10.0) -> None:
        found, _ = peer.wait_for(_is(HelloFrame), timeout=timeout, what="HELLO")
        assert isinstance(found, HelloFrame)
        role_defaults = Settings(max_concurrent_streams=0) if found.role == Role.SERVER else None
        settings = Settings.from_pairs(found.settings, role_defaults)
        self._peer = peer
        self._initial = settings.initial_stream_window
        #: Highest offset allowed per stream id (0: the connection).
        self.limit: dict[int, int] = {0: settings.initial_conn_window}
        #: DATA payload bytes sent per stream id (0: all streams).
        self.sent: Counter[int] = Counter()
        self._index = 0

    def update(self) -> bool:
        """Apply WINDOW frames received since the last call; True if any limit grew."""
        frames = self._peer.snapshot()
        grew = False
        for frame in frames[self._index :]:
            if isinstance(frame, WindowFrame):
                old = self.limit.get(frame.stream_id, self._initial)
                if frame.max_offset > old:
                    self.limit[frame.stream_id] = frame.max_offset
                    grew = True
        self._index = len(frames)
        return grew

    def room(self, stream_id: int) -> int:
        """Bytes that may be sent on ``stream_id`` now."""
        stream_room = self.limit.get(stream_id, self._initial) - self.sent[stream_id]
        return max(0, min(stream_room, self.limit[0] - self.sent[0]))

    def data(self, stream_id: int, payload: bytes) -> bytes:
        """A DATA frame, counted as sent (the caller must send it)."""
        self.sent[stream_id] += len(payload)
        self.sent[0] += len(payload)
        return data(stream_id, payload)


# --------------------------------------------------------------------------------------------
# hostile client


def _attacker_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    return ctx


class HostileClient(FramePeer):
    """A client that authenticates with a valid token, then sends whatever the test wants."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        *,
        source: str = "127.0.0.2",
        settings: Settings | None = None,
        fingerprint: str | None = None,
        timeout: float = 10.0,
        name: str = "hostile-client",
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.settimeout(timeout)
            raw.bind((source, 0))
            raw.connect((host, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = _attacker_context().wrap_socket(raw, server_hostname="muxtunnel")
        except BaseException:
            raw.close()
            raise
        if sock.selected_alpn_protocol() != ALPN:
            sock.close()
            raise HarnessError(f"relay {host}:{port} did not select ALPN {ALPN}")
        if fingerprint is not None:
            der = sock.getpeercert(binary_form=True) or b""
            if tls.fingerprint_of_der(der) != fingerprint:
                sock.close()
                raise HarnessError(f"relay {host}:{port} presented another certificate")
        super().__init__(sock, name)
        self._req_id = 1
        self.settings = settings or Settings()
        self.send(MAGIC, hello(Role.CLIENT, self.settings))
        try:
            found, _ = self.wait_for(_is(ChallengeFrame), timeout=timeout, what="CHALLENGE")
            assert isinstance(found, ChallengeFrame)
            self.send(auth(1, make_credential(token, found.nonce)))
            answer, _ = self.wait_for(
                _is(ResultFrame, req_id=1), timeout=timeout, what="RESULT of AUTH"
            )
            assert isinstance(answer, ResultFrame)
        except BaseException:
            self.close()
            raise
        if answer.status != ResultStatus.OK:
            self.close()
            raise HarnessError(f"relay refused the token: {answer.status} {answer.message!r}")

    def next_req_id(self) -> int:
        """A fresh request id (2, 3, ...)."""
        self._req_id += 1
        return self._req_id

    def bind(self, tunnel_id: int, port: int = 0, *, timeout: float = 10.0) -> int:
        """BIND ``tunnel_id`` and return the public port (HarnessError if refused)."""
        __tracebackhide__ = True
        req = self.next_req_id()
        self.send(bind(req, tunnel_id, port))
        answer, _ = self.wait_for(
            _is(ResultFrame, req_id=req), timeout=timeout, what=f"RESULT of BIND {tunnel_id}"
        )
        assert isinstance(answer, ResultFrame)
        if answer.status != ResultStatus.OK or answer.bound is None:
            raise HarnessError(f"BIND {tunnel_id} refused: {answer.status} {answer.message!r}")
        return answer.bound.port

    @property
    def opens(self) -> list[OpenFrame]:
        """The relay's OPENs so far."""
        return [f for f in self.snapshot() if isinstance(f, OpenFrame)]


# --------------------------------------------------------------------------------------------
# hostile relay


class RelayPeer(FramePeer):
    """The relay end of one connection from a client process."""

    def __init__(self, sock: ssl.SSLSocket, name: str) -> None:
        super().__init__(sock, name)
        self._next_sid = 2
        #: The client's BINDs, in order.
        self.binds: list[BindFrame] = []

    def handshake(
        self,
        *,
        token: str | None = None,
        binds: int = 1,
        answer: Callable[[BindFrame], tuple[int, str]] | None = None,
        port_for: Callable[[BindFrame], int] | None = None,
        timeout: float = 10.0,
    ) -> list[BindFrame]:
        """MAGIC, HELLO, CHALLENGE; check AUTH (against ``token`` if given) and answer it.

        Then answer ``binds`` BINDs: ``answer(bind)`` gives ``(status, message)`` (default OK);
        a successful one is bound on ``127.0.0.1:port_for(bind)`` (default 40000 + tunnel id).
        Returns the BINDs.
        """
        __tracebackhide__ = True
        nonce = secrets.token_bytes(32)
        self.send(MAGIC, hello(Role.SERVER), challenge(nonce))
        found, _ = self.wait_for(_is(AuthFrame), timeout=timeout, what="AUTH")
        assert isinstance(found, AuthFrame)
        ok = token is None or (
            match_entry([plaintext_entry(token)], found.method, nonce, found.credential) is not None
        )
        if not ok:
            self.send(
                result(found.req_id, ResultStatus.AUTH_FAILED, "authentication failed"),
                close(ErrorCode.AUTH_FAILED, "authentication failed"),
            )
            raise HarnessError(f"{self.name}: the client's AUTH does not match the token")
        self.send(result(found.req_id, ResultStatus.OK))
        index = 0
        while len(self.binds) < binds:
            frame, at = self.wait_for(
                _is(BindFrame), timeout=timeout, start=index, what=f"{binds} BINDs"
            )
            assert isinstance(frame, BindFrame)
            index = at + 1
            self.binds.append(frame)
            status, message = answer(frame) if answer is not None else (ResultStatus.OK, "")
            bound = None
            if status == ResultStatus.OK:
                port = port_for(frame) if port_for is not None else 40000 + frame.tunnel_id
                bound = Address("127.0.0.1", port)
            self.send(result(frame.req_id, status, message, bound))
        return list(self.binds)

    def next_stream_id(self) -> int:
        """The next relay stream id (2, 4, 6, ...); it counts as used."""
        sid = self._next_sid
        self._next_sid += 2
        return sid

    def open(self, tunnel_id: int, *, then: bytes = b"") -> int:
        """Send OPEN for ``tunnel_id`` (followed by ``then`` in the same write); return its id."""
        sid = self.next_stream_id()
        self.send(open_frame(sid, tunnel_id), then)
        return sid

    def answer_to(self, stream_id: int, *, timeout: float = 10.0) -> Frame:
        """Wait for the client's OPEN_ACK or OPEN_FAIL on ``stream_id``."""
        __tracebackhide__ = True
        frame, _ = self.wait_for(
            lambda f: isinstance(f, OpenAckFrame | OpenFailFrame) and f.stream_id == stream_id,
            timeout=timeout,
            what=f"OPEN_ACK/OPEN_FAIL for stream {stream_id}",
        )
        return frame


class HostileRelay:
    """A TLS listener on 127.0.0.1 that client processes can pin (``--fingerprint``)."""

    def __init__(self, workdir: Path, *, handshake_timeout: float = 5.0) -> None:
        cert_pem, key_pem = tls.generate_self_signed("hostile-relay")
        workdir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = workdir / "hostile-cert.pem", workdir / "hostile-key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        self.fingerprint = tls.fingerprint_of_pem(cert_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols([ALPN])
        ctx.num_tickets = 0
        ctx.load_cert_chain(cert_path, key_path)
        self._ctx = ctx
        self._handshake_timeout = handshake_timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        #: Every connection that completed TLS, in order.
        self.peers: list[RelayPeer] = []
        self._handed = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="hostile-relay", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``HOST:PORT`` for the client's ``--server``."""
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections accepted so far (TLS done)."""
        with self._cond:
            return len(self.peers)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                raw.settimeout(self._handshake_timeout)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self._ctx.wrap_socket(raw, server_side=True)
            except OSError:
                raw.close()
                continue
            with self._cond:
                peer = RelayPeer(sock, f"hostile-relay#{len(self.peers) + 1}")
                self.peers.append(peer)
                self._cond.notify_all()

    def accept(self, timeout: float = 15.0) -> RelayPeer:
        """The next connection not handed out yet (HarnessError after ``timeout``)."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._handed >= len(self.peers):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(
                        f"no client connected to the hostile relay within {timeout:.1f} s"
                    )
                self._cond.wait(min(remaining, 0.1))
            peer = self.peers[self._handed]
            self._handed += 1
            return peer

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)
        for peer in list(self.peers):
            peer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client_specs(local_ports: Sequence[int]) -> list[str]:
    """Tunnel specs for a client process: one auto-port tunnel per local port."""
    return [f"0:127.0.0.1:{p}" for p in local_ports]
