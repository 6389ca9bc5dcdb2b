"""A client holding a valid token attacks the relay process (protocol-spec.md §12, §16.5).

Every test runs a real relay with two tokens: a legitimate client process exposes an echo
service and ``LegitTraffic`` keeps moving checked bytes through it while a ``HostileClient``
with the other token attacks. Each test asserts a bound on what the attack costs the relay
(RSS, descriptors, CPU, log lines) and that the legitimate tunnel never stalls for long.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from muxtunnel.errors import ErrorCode
from muxtunnel.protocol.constants import FrameType
from muxtunnel.protocol.frames import OpenFrame, PingFrame, ResetFrame, Settings

from .peers import (
    Credit,
    HostileClient,
    bind,
    close,
    cpu_seconds,
    data,
    goaway,
    open_ack,
    ping,
    reset,
    unbind,
)
from .procs import (
    EchoServer,
    LegitTraffic,
    ResourceSampler,
    Visitors,
    fd_count,
    rss_bytes,
    start_hostile_relay,
    start_legit_client,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from .procs import ProcessGroup, Relay

MIB = 1024 * 1024
#: A stall of the legitimate tunnel longer than this fails a test (noisy 2-core machine).
MAX_LEGIT_GAP = 2.5
#: Source address of the attacker's visitors (distinct from the legitimate client's).
VISITOR_SOURCE = "127.0.0.3"
#: Log lines start with an ISO timestamp and a level (muxtunnel.logsetup text format).
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ \S+: ")


@dataclass
class Arena:
    """A relay, a legitimate client with checked traffic, and the attacker's token."""

    relay: Relay
    hostile_token: str
    legit: LegitTraffic
    sampler: ResourceSampler
    #: Relay RSS and descriptors once the legitimate client was up.
    base_rss: int
    base_fds: int

    def attacker(
        self, *, source: str = "127.0.0.2", settings: Settings | None = None
    ) -> HostileClient:
        """A hostile client authenticated with the attacker's token."""
        return HostileClient(
            self.relay.host, self.relay.port, self.hostile_token, source=source, settings=settings
        )

    def assert_relay_bounded(self, *, rss_growth: int, extra_fds: int) -> None:
        """Relay RSS and descriptors (sampled every 50 ms during the test) stayed within
        ``rss_growth`` bytes and ``extra_fds`` descriptors of their values before it."""
        __tracebackhide__ = True
        self.sampler.sample()
        growth = self.sampler.max_rss - self.base_rss
        assert growth <= rss_growth, (
            f"relay RSS grew by {growth / MIB:.1f} MiB (bound {rss_growth / MIB:.0f} MiB): "
            f"{self.sampler.describe()}"
        )
        assert self.sampler.max_fds <= self.base_fds + extra_fds, (
            f"relay descriptors {self.base_fds} -> {self.sampler.max_fds} (bound +{extra_fds})"
        )

    def stderr_since(self, start: int) -> list[str]:
        """Relay stderr lines from index ``start`` on."""
        return self.relay.proc.stderr_lines[start:]

    def assert_legit_healthy(self, max_gap: float = 2.5) -> None:
        """The legitimate tunnel never stalled longer than ``max_gap`` and still works now
        (two more checked round trips, waited for up to 5 s)."""
        __tracebackhide__ = True
        want = self.legit.successes + 2
        self.legit.wait_successes(want, timeout=5)
        self.legit.assert_healthy(max_gap=max_gap, min_successes=want)

    def assert_relay_alive(self) -> None:
        """The relay process is still running."""
        assert self.relay.proc.returncode is None, self.relay.proc.describe()


@pytest.fixture
def arena_args() -> list[str]:
    """Extra relay options of a test (override with ``pytest.mark.parametrize``)."""
    return []


@pytest.fixture
def arena(procs: ProcessGroup, tmp_path: Path, arena_args: list[str]) -> Iterator[Arena]:
    """Relay + legitimate client + checked echo traffic; the attacker's token is separate."""
    hostile_token = secrets.token_urlsafe(24)
    with EchoServer() as echo:
        relay = start_hostile_relay(
            procs, tmp_path, extra_args=["--token", hostile_token, *arena_args]
        )
        client = start_legit_client(procs, tmp_path, relay, [echo.port])
        with (
            ResourceSampler(relay.proc.pid, interval=0.05) as sampler,
            LegitTraffic(client.forwards[0].port) as legit,
        ):
            # the tunnel works before any attack
            assert legit.wait_successes(3, timeout=10), legit.describe()
            pid = relay.proc.pid
            yield Arena(relay, hostile_token, legit, sampler, rss_bytes(pid), fd_count(pid))


def _accept_opens(
    hc: HostileClient, count: int, *, skip: int = 0, timeout: float = 10.0
) -> list[OpenFrame]:
    """Answer the relay's OPENs after the first ``skip`` with OPEN_ACK until ``count`` more
    streams are open; return those."""
    answered: set[int] = {o.stream_id for o in hc.opens[:skip]}
    count += len(answered)
    opens: list[OpenFrame] = []
    deadline = time.monotonic() + timeout
    while len(answered) < count:
        fresh = [o for o in hc.opens if o.stream_id not in answered]
        if fresh:
            hc.send(*(open_ack(o.stream_id) for o in fresh))
            answered.update(o.stream_id for o in fresh)
            opens.extend(fresh)
            continue
        assert time.monotonic() < deadline, f"{len(answered)} of {count} OPENs: {hc.describe()}"
        assert not hc.eof.is_set(), f"relay ended the session: {hc.describe()}"
        hc.wait_state(
            lambda: hc.eof.is_set() or any(o.stream_id not in answered for o in hc.opens),
            deadline - time.monotonic(),
        )
    return opens


def _wait_pong_or_close(hc: HostileClient, seq: int, timeout: float) -> bool:
    """Send PING ``seq``; True once answered, False if the session ended first."""
    hc.send(ping(seq))

    def answered() -> bool:
        return any(isinstance(f, PingFrame) and f.ack and f.seq >= seq for f in hc.snapshot())

    def ended() -> bool:
        return hc.eof.is_set() or hc.close_frame is not None

    if not hc.wait_state(lambda: answered() or ended(), timeout):
        raise AssertionError(f"relay neither answered PING {seq} nor closed within {timeout} s")
    return answered()


# --------------------------------------------------------------------------------------------
# memory


class DrainingVisitor:
    """A visitor connection whose thread reads and discards everything."""

    def __init__(self, port: int, source: str = VISITOR_SOURCE) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.received = 0
        self._thread = threading.Thread(target=self._run, name="drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(1 << 20):
                self.received += len(chunk)

    def close(self) -> None:
        """Close the connection and join the thread."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(timeout=5)


def _fill(hc: HostileClient, credit: Credit, sid: int, reserve: int, timeout: float = 8) -> None:
    """Send bulk DATA on ``sid`` until the relay stops granting credit (its visitor's socket
    buffers are full), leaving ``reserve`` bytes of the window unused."""
    start = last = time.monotonic()
    while time.monotonic() - last < 0.5:
        assert time.monotonic() - start < timeout, f"stream {sid} never filled up"
        if credit.update():
            last = time.monotonic()
        n = min((credit.room(sid) - reserve) // 16384, 16)
        if n > 0:
            hc.send(*(credit.data(sid, b"f" * 16384) for _ in range(n)))
        time.sleep(0.02)


def test_one_byte_data_frames_do_not_pin_read_buffers(arena: Arena) -> None:
    """A one-byte DATA frame held for a visitor that does not read costs about a byte, not the
    whole decrypted read it arrived in (flow control bounds bytes, §8; memory must follow).

    Stream B's visitor never reads (its socket buffers are filled first); stream R's visitor
    reads everything. Each write carries 250 KB of DATA for R and one byte for B.
    """
    writes = 600
    bound = 48 * MIB
    with arena.attacker() as hc:
        credit = Credit(hc)
        port = hc.bind(1)
        with Visitors(port, 1, source=VISITOR_SOURCE) as stuck:
            assert len(stuck.socks) == 1
            (blocked,) = _accept_opens(hc, 1)
            drain = DrainingVisitor(port)
            try:
                (reader,) = _accept_opens(hc, 1, skip=1)
                b_sid, r_sid = blocked.stream_id, reader.stream_id
                _fill(hc, credit, b_sid, reserve=1024)
                pid = arena.relay.proc.pid
                base_rss, base_fds = rss_bytes(pid), fd_count(pid)
                peak, done = base_rss, 0
                start = time.monotonic()
                while done < writes and time.monotonic() - start < 8 and not hc.eof.is_set():
                    credit.update()
                    chunks = min(credit.room(r_sid), 256_000) // 16_000
                    if chunks < 4:
                        time.sleep(0.002)
                        continue
                    bulk = [credit.data(r_sid, b"r" * 16_000) for _ in range(chunks)]
                    hc.send(*bulk, credit.data(b_sid, b"x"))
                    hc.flush(timeout=5)
                    done += 1
                    if done % 25 == 0:
                        peak = max(peak, rss_bytes(pid))
                        if peak - base_rss > bound:
                            break
                if not hc.eof.is_set():
                    _wait_pong_or_close(hc, 1, timeout=10)
                peak = max(peak, rss_bytes(pid))
                fds = fd_count(pid)
            finally:
                drain.close()
    arena.assert_relay_alive()
    growth = peak - base_rss
    assert done >= 100 or growth > bound, f"only {done} writes: {hc.describe()}"
    assert growth <= bound, (
        f"relay RSS grew by {growth / MIB:.0f} MiB with {done} one-byte DATA frames held for "
        f"a visitor that does not read (bound {bound / MIB:.0f} MiB)"
    )
    assert fds <= base_fds + 4, f"relay descriptors {base_fds} -> {fds}"
    arena.assert_legit_healthy(MAX_LEGIT_GAP)


def test_goaway_flood_is_bounded(arena: Arena) -> None:
    """Repeated GOAWAYs must not queue without bound (control events, §12 control limits).

    The relay either drops them or ends the session with ENHANCE_YOUR_CALM; its RSS stays
    bounded either way and the other client's tunnel keeps working.
    """
    bound = 16 * MIB
    message = "g" * 1000
    batch = goaway(2**64 - 1, ErrorCode.NO_ERROR, message) * 400
    with arena.attacker() as hc:
        hc.bind(1)
        base_rss = rss_bytes(arena.relay.proc.pid)
        base_fds = fd_count(arena.relay.proc.pid)
        peak = base_rss
        sent = 0
        start = time.monotonic()
        while sent < 64 * MIB and time.monotonic() - start < 8 and not hc.eof.is_set():
            hc.send(batch)
            try:
                hc.flush(timeout=2)
            except AssertionError:
                pass  # the relay stopped reading: its memory must still be bounded
            sent += len(batch)
            peak = max(peak, rss_bytes(arena.relay.proc.pid))
            if peak - base_rss > bound:
                break
        if not hc.eof.is_set():
            _wait_pong_or_close(hc, 1, timeout=10)
        peak = max(peak, rss_bytes(arena.relay.proc.pid), arena.sampler.max_rss)
        code = hc.closed_with()
    arena.assert_relay_alive()
    growth = peak - base_rss
    assert growth <= bound, (
        f"relay RSS grew by {growth / MIB:.0f} MiB after {sent / MIB:.1f} MiB of GOAWAY "
        f"(bound {bound / MIB:.0f} MiB); session closed with {code}"
    )
    assert code in (None, ErrorCode.ENHANCE_YOUR_CALM), f"session closed with {code}"
    fds = fd_count(arena.relay.proc.pid)
    assert fds <= base_fds + 4, f"relay descriptors {base_fds} -> {fds}"
    arena.assert_legit_healthy(MAX_LEGIT_GAP)


# --------------------------------------------------------------------------------------------
# CPU and log lines


def test_goaway_with_many_open_streams_costs_little_cpu(arena: Arena) -> None:
    """GOAWAY must not cost a scan of every open stream each time (§10.2 item 4, §12).

    500 streams are open (two tunnels of 250 visitors that never read); 2 MiB of GOAWAYs then
    must cost the relay little CPU, and another user's echo keeps its latency.
    """
    per_tunnel = 250
    flood = 2 * MIB
    max_cpu = 1.5
    with arena.attacker(settings=Settings(max_pending_opens=1024)) as hc:
        ports = [hc.bind(1), hc.bind(2)]
        visitors = [Visitors(p, per_tunnel, source=VISITOR_SOURCE) for p in ports]
        try:
            assert all(len(v.socks) == per_tunnel for v in visitors)
            _accept_opens(hc, 2 * per_tunnel, timeout=15)
            batch = goaway(2**64 - 1) * 2000
            time.sleep(0.2)  # let the relay settle after the opens
            cpu_before = cpu_seconds(arena.relay.proc.pid)
            sent = 0
            while sent < flood and not hc.eof.is_set():
                hc.send(batch)
                sent += len(batch)
            with_pong = not hc.eof.is_set() and _wait_pong_or_close(hc, 1, timeout=15)
            cpu = cpu_seconds(arena.relay.proc.pid) - cpu_before
            code = hc.closed_with()
        finally:
            for v in visitors:
                v.close()
    arena.assert_relay_alive()
    assert cpu <= max_cpu, (
        f"{sent / MIB:.1f} MiB of GOAWAY with {2 * per_tunnel} open streams cost the relay "
        f"{cpu:.2f} s of CPU (bound {max_cpu} s; answered the PING after it: {with_pong}, "
        f"closed with {code})"
    )
    assert code in (None, ErrorCode.ENHANCE_YOUR_CALM), f"session closed with {code}"
    arena.assert_relay_bounded(rss_growth=64 * MIB, extra_fds=2 * per_tunnel + 64)
    arena.assert_legit_healthy(MAX_LEGIT_GAP)


def test_bind_flood_does_not_flood_the_log(arena: Arena) -> None:
    """Refused BINDs are answered, but the relay's log stays small (rate-limited, §16.8)."""
    binds = 20_000
    max_lines = 200
    max_cpu = 6.0
    with arena.attacker() as hc:
        hc.bind(1)
        start_line = len(arena.relay.proc.stderr_lines)
        cpu_before = cpu_seconds(arena.relay.proc.pid)
        first = hc.next_req_id()
        # duplicate BINDs of tunnel 1 with fresh request ids, 500 per write
        frames = [bind(first + i, 1) for i in range(binds)]  # each: RESULT(DUPLICATE_TUNNEL)
        for i in range(0, binds, 500):
            hc.send(b"".join(frames[i : i + 500]))
        hc._req_id = first + binds
        hc.wait_state(  # RESULTs: the first BIND's too
            lambda: hc.eof.is_set() or hc.counts.get(FrameType.RESULT, 0) >= binds + 1, 12
        )
        cpu = cpu_seconds(arena.relay.proc.pid) - cpu_before
        code = hc.closed_with()
    arena.assert_relay_alive()
    lines = arena.stderr_since(start_line)
    assert len(lines) <= max_lines, (
        f"{binds} refused BINDs wrote {len(lines)} relay log lines (bound {max_lines}); "
        f"first: {lines[:3]}"
    )
    assert cpu <= max_cpu, f"{binds} BINDs cost the relay {cpu:.2f} s of CPU (bound {max_cpu})"
    assert code in (None, ErrorCode.ENHANCE_YOUR_CALM), f"session closed with {code}"
    arena.assert_relay_bounded(rss_growth=32 * MIB, extra_fds=32)
    arena.assert_legit_healthy(MAX_LEGIT_GAP)


def test_data_for_closed_streams_counts_as_non_productive(arena: Arena) -> None:
    """DATA for a stream that is already closed is non-productive (§9.6, §12: 1,000/s).

    5,000 such frames in one burst must end the session with ENHANCE_YOUR_CALM.
    """
    burst = 5_000
    with arena.attacker() as hc:
        port = hc.bind(1)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            (opened,) = _accept_opens(hc, 1)
            sid = opened.stream_id
            # the client resets the stream: it is closed on both sides from here on
            hc.send(reset(sid, ErrorCode.CANCEL, 0))
            _wait_pong_or_close(hc, 1, timeout=5)
            hc.send(data(sid, b"z") * burst)
            closed = hc.wait_closed(timeout=10)
            code = hc.closed_with()
    arena.assert_relay_alive()
    assert code == ErrorCode.ENHANCE_YOUR_CALM, (
        f"{burst} DATA frames for a closed stream: relay CLOSE {code}, connection ended: "
        f"{closed}; {hc.describe()}"
    )
    arena.assert_relay_bounded(rss_growth=32 * MIB, extra_fds=32)
    arena.assert_legit_healthy(MAX_LEGIT_GAP)


# --------------------------------------------------------------------------------------------
# log injection


def test_peer_text_cannot_forge_relay_log_lines(arena: Arena) -> None:
    """A CLOSE message with a newline stays inside one log line (§16.8); UNBIND + CLOSE in
    one write is handled without an internal error."""
    marker = "FORGED-" + secrets.token_hex(4)
    start_line = len(arena.relay.proc.stderr_lines)
    forged = f"bye\n2026-01-01T00:00:00.000Z WARNING muxtunnel.server: {marker} admin login"
    with arena.attacker() as hc:
        hc.bind(1)
        hc.send(close(ErrorCode.PROTOCOL_ERROR, forged))
        hc.wait_closed(timeout=10)
    with arena.attacker(source="127.0.0.4") as hc:
        hc.bind(1)
        req = hc.next_req_id()
        hc.send(unbind(req, 1), close(ErrorCode.NO_ERROR, f"done\r\n{marker}"))
        hc.wait_closed(timeout=10)
    arena.assert_relay_alive()
    # the relay logs the end of both sessions
    index = start_line - 1
    for _ in range(2):
        _, index = arena.relay.proc.wait_for_line(
            re.compile(r"127\.0\.0\.4"), stream="stderr", start=index + 1, timeout=5
        )
    time.sleep(0.3)  # a forged line would follow its log line at once: give it time to show
    lines = arena.stderr_since(start_line)
    bad = [line for line in lines if marker in line and not _LOG_LINE.match(line)]
    assert not bad, f"peer text forged relay log lines: {bad}"
    assert not [line for line in lines if not _LOG_LINE.match(line)], (
        f"relay stderr has lines that are not log lines: {lines}"
    )
    errors = [line for line in lines if "Traceback" in line or "internal error" in line]
    assert not errors, f"relay logged an internal error: {lines}"
    arena.assert_relay_bounded(rss_growth=32 * MIB, extra_fds=32)
    arena.assert_legit_healthy(MAX_LEGIT_GAP)


# --------------------------------------------------------------------------------------------
# unanswered OPENs


@pytest.mark.parametrize("arena_args", [["--open-timeout", "4"]])
def test_unanswered_opens_time_out_and_do_not_block_other_tunnels(arena: Arena) -> None:
    """OPENs the client never answers are reset after --open-timeout (§9.2 item 6), and while
    they wait, a visitor of the client's other tunnel is not held behind them."""
    pending = 8
    open_timeout = 4.0
    with arena.attacker(settings=Settings(max_pending_opens=pending)) as hc:
        silent, served = hc.bind(1), hc.bind(2)
        with Visitors(silent, pending + 4, source=VISITOR_SOURCE) as stuck:
            assert len(stuck.socks) == pending + 4
            first, at = hc.wait_for(
                lambda f: isinstance(f, OpenFrame) and f.tunnel_id == 1,
                timeout=5,
                what="the first OPEN of the silent tunnel",
            )
            assert isinstance(first, OpenFrame)
            opened_at = hc.arrival(at)
            time.sleep(0.3)  # the silent tunnel's visitors take every slot they can get
            held = [o.stream_id for o in hc.opens if o.tunnel_id == 1]
            with socket.create_connection(("127.0.0.1", served), timeout=5):
                connected = time.monotonic()
                other, index = hc.wait_for(
                    lambda f: isinstance(f, OpenFrame) and f.tunnel_id == 2,
                    timeout=open_timeout + 3,
                    what="the OPEN of the other tunnel's visitor",
                )
                assert isinstance(other, OpenFrame)
                other_after = hc.arrival(index) - connected
                hc.send(open_ack(other.stream_id))
                frame, index = hc.wait_for(
                    lambda f: isinstance(f, ResetFrame) and f.stream_id == first.stream_id,
                    timeout=open_timeout + 5,
                    what=f"RESET of unanswered stream {first.stream_id}",
                )
                assert isinstance(frame, ResetFrame)
                reset_after = hc.arrival(index) - opened_at
    assert frame.error_code == ErrorCode.CANCEL, f"RESET code {frame.error_code}"
    assert open_timeout - 0.5 <= reset_after <= open_timeout + 3, (
        f"unanswered OPEN reset after {reset_after:.1f} s (--open-timeout {open_timeout:.0f})"
    )
    assert other_after <= 1.5, (
        f"the other tunnel's visitor waited {other_after:.1f} s for its OPEN while "
        f"{len(held)} OPENs of the silent tunnel were unanswered"
    )
    arena.assert_relay_alive()
    arena.assert_relay_bounded(rss_growth=32 * MIB, extra_fds=pending + 4 + 32)
    arena.assert_legit_healthy(MAX_LEGIT_GAP)
