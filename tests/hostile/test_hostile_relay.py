"""A malicious relay attacks a real client process (protocol-spec.md §9.2, §12, §16.8).

The ``HostileRelay`` completes a genuine handshake (the client pins its certificate) and then
sends frames a conforming relay never would. The client process must stay up (or reconnect),
never reach a local target the relay has no right to reach, bound the rate at which the relay
makes it dial, and keep peer text out of its own log structure.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from muxtunnel.errors import ErrorCode
from muxtunnel.protocol.constants import FrameType, OpenFailReason, ResultStatus
from muxtunnel.protocol.frames import BindFrame, DataFrame, OpenAckFrame, OpenFailFrame, PingFrame
from tests.system.harness import Client, client_argv, muxtunnel_env

from .peers import (
    HostileRelay,
    RelayPeer,
    client_specs,
    close,
    data,
    open_frame,
    ping,
    reset,
    unbind,
)
from .procs import EchoServer, ResourceSampler, SinkServer, fd_count, rss_bytes

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tests.system.harness import ManagedProcess

    from .procs import ProcessGroup

TOKEN = secrets.token_urlsafe(24)
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ \S+: ")


def _start_client(
    procs: ProcessGroup,
    workdir: Path,
    relay: HostileRelay,
    local_ports: Sequence[int],
    *,
    name: str = "client",
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """A client process pinned to the hostile relay, one auto-port tunnel per local port."""
    state_dir = workdir / f"{name}-state"
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = client_argv(
        relay.address,
        client_specs(local_ports),
        token=TOKEN,
        fingerprint=relay.fingerprint,
        state_dir=state_dir,
        extra_args=extra_args,
    )
    return procs.start(name, argv, env=muxtunnel_env(workdir), cwd=workdir)


def _connect(
    relay: HostileRelay,
    proc: ManagedProcess,
    *,
    binds: int = 1,
    refuse: frozenset[int] = frozenset(),
    forwards: int | None = None,
    timeout: float = 10.0,
) -> RelayPeer:
    """Accept the client's next connection and complete its handshake.

    BINDs of the tunnel ids in ``refuse`` are answered DENIED; the others OK. Waits for the
    client's ``forwarding`` lines when ``forwards`` is given.
    """
    __tracebackhide__ = True
    try:
        peer = relay.accept(timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{proc.describe()}") from None

    def answer(frame: BindFrame) -> tuple[int, str]:
        if frame.tunnel_id in refuse:
            return ResultStatus.DENIED, "not allowed"
        return ResultStatus.OK, ""

    peer.handshake(token=TOKEN, binds=binds, answer=answer, timeout=timeout)
    if forwards:
        Client(proc=proc, forwards=[], state_dir=proc_state(proc)).wait_forwards(forwards)
    return peer


def proc_state(proc: ManagedProcess) -> Path:
    """The ``--state-dir`` of a client process."""
    return Path(proc.argv[proc.argv.index("--state-dir") + 1])


def _alive(peer: RelayPeer, seq: int, timeout: float = 5.0) -> bool:
    """PING the client; True if it answers within ``timeout`` (its session is alive)."""
    peer.send(ping(seq))
    try:
        peer.wait_for(
            lambda f: isinstance(f, PingFrame) and f.ack and f.seq == seq,
            timeout=timeout,
            what=f"pong {seq}",
        )
    except AssertionError:
        return False
    return True


# --------------------------------------------------------------------------------------------


def test_open_then_reset_or_close_in_one_write_does_not_crash_client(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """OPEN for an unknown tunnel followed at once by RESET, or by CLOSE, must not take the
    client down: it answers or drops the stream, and after a CLOSE it reconnects (§10.4)."""
    with EchoServer() as echo, HostileRelay(tmp_path / "relay") as relay:
        proc = _start_client(procs, tmp_path, relay, [echo.port])
        peer = _connect(relay, proc, forwards=1)
        sid = peer.next_stream_id()
        peer.send(open_frame(sid, 99), reset(sid, ErrorCode.CANCEL, 0))
        alive = _alive(peer, 1)
        if not alive:  # the session may end, but the client must come back
            peer = _connect(relay, proc)
        assert proc.returncode is None, f"client died after OPEN+RESET\n{proc.describe()}"
        sid = peer.next_stream_id()
        peer.send(open_frame(sid, 98), close(ErrorCode.NO_ERROR, "bye"))
        peer = _connect(relay, proc)
        assert proc.returncode is None, f"client died after OPEN+CLOSE\n{proc.describe()}"
        # the new session serves visitors: OPEN the real tunnel and echo through it
        sid = peer.open(1)
        answer = peer.answer_to(sid)
        assert isinstance(answer, OpenAckFrame), f"{answer}\n{proc.describe()}"
        peer.send(data(sid, b"ping-through", fin=True))
        peer.wait_for(
            lambda f: isinstance(f, DataFrame) and f.stream_id == sid and f.fin,
            what="the echo's FIN",
        )
        assert peer.data_bytes[sid] == len(b"ping-through")
        errors = [line for line in proc.stderr_lines if "Traceback" in line]
        assert not errors, proc.describe()


def test_client_never_dials_a_tunnel_the_relay_refused(procs: ProcessGroup, tmp_path: Path) -> None:
    """An OPEN for a tunnel whose BIND the relay refused is refused with OPEN_FAIL; the
    client never connects to that tunnel's local target (§9.2 item 3)."""
    with (
        EchoServer() as echo,
        SinkServer() as target,
        HostileRelay(tmp_path / "relay") as relay,
    ):
        proc = _start_client(procs, tmp_path, relay, [echo.port, target.port])
        peer = _connect(relay, proc, binds=2, refuse=frozenset({2}), forwards=1)
        sids = [peer.open(2) for _ in range(3)]
        answers = [peer.answer_to(sid) for sid in sids]
        assert _alive(peer, 1), f"client session ended\n{proc.describe()}"
        assert target.connections == 0, (
            f"the client connected {target.connections} times to the target of a refused tunnel"
        )
        for answer in answers:
            assert isinstance(answer, OpenFailFrame), f"{answer}\n{proc.describe()}"
            assert answer.reason == OpenFailReason.UNKNOWN_TUNNEL, answer
        assert proc.returncode is None, proc.describe()


def test_relay_cannot_make_client_dial_faster_than_the_open_rate_limit(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """Stream opens are limited per session (§9.2 item 3.6, §12; here `--max-open-rate 200`,
    burst 400): a relay sending OPENs as fast as the client answers them for 5 s gets
    refusals (or the session ends with ENHANCE_YOUR_CALM), not a local connection each.

    The bound allows the rate over the attack plus half a second of timing slack, and the burst.
    """
    duration, attempts = 5.0, 10_000
    rate, burst = 200.0, 400
    with EchoServer() as echo, HostileRelay(tmp_path / "relay") as relay:
        proc = _start_client(
            procs, tmp_path, relay, [echo.port], extra_args=["--max-open-rate", str(int(rate))]
        )
        peer = _connect(relay, proc, forwards=1)
        base = echo.connections
        base_rss, base_fds = rss_bytes(proc.pid), fd_count(proc.pid)
        sampler = ResourceSampler(proc.pid, interval=0.05).start()
        sent = 0
        start = time.monotonic()
        while sent < attempts and time.monotonic() - start < duration and not peer.eof.is_set():
            answered = peer.counts[FrameType.OPEN_ACK] + peer.counts[FrameType.OPEN_FAIL]
            if sent - answered > 50:  # keep within the client's 128 pending opens
                time.sleep(0.002)
                continue
            batch = []
            for _ in range(50):
                sid = peer.next_stream_id()
                batch.append(open_frame(sid, 1) + data(sid, b"", fin=True))
            peer.send(*batch)
            sent += 50
        elapsed = time.monotonic() - start
        _alive(peer, 1)
        sampler.stop()
        made = echo.connections - base
        code = peer.closed_with()
    assert proc.returncode is None, proc.describe()
    assert sampler.max_fds <= base_fds + 300, (
        f"client descriptors: {base_fds} -> {sampler.describe()}"
    )
    assert sampler.max_rss - base_rss <= 64 * 1024 * 1024, (
        f"client RSS: {base_rss} -> {sampler.describe()}"
    )
    assert code in (None, ErrorCode.ENHANCE_YOUR_CALM), f"client closed with {code}"
    bound = rate * (elapsed + 0.5) + burst
    assert made <= bound, (
        f"{sent} OPENs in {elapsed:.1f} s made the client connect {made} times to its local "
        f"service (bound {bound:.0f}: {rate:.0f}/s and a burst of {burst})"
    )


def test_relay_text_cannot_forge_client_log_lines(procs: ProcessGroup, tmp_path: Path) -> None:
    """CLOSE messages from the relay stay inside one client log line (§16.8); a revoking
    UNBIND and a CLOSE in one write cause no internal error."""
    marker = "FORGED-" + secrets.token_hex(4)
    forged = f"bye\n2026-01-01T00:00:00.000Z ERROR muxtunnel.client: {marker} pay up"
    with EchoServer() as echo, HostileRelay(tmp_path / "relay") as relay:
        proc = _start_client(procs, tmp_path, relay, [echo.port])
        peer = _connect(relay, proc, forwards=1)
        peer.send(close(ErrorCode.PROTOCOL_ERROR, forged))
        peer = _connect(relay, proc)
        peer.send(unbind(0, 1, ErrorCode.NO_ERROR), close(ErrorCode.NO_ERROR, f"x\r\n{marker}"))
        _connect(relay, proc)  # the client reconnected: both session ends are logged
        assert proc.returncode is None, proc.describe()
        lines = proc.stderr_lines
    bad = [line for line in lines if marker in line and not _LOG_LINE.match(line)]
    assert not bad, f"relay text forged client log lines: {bad}"
    assert not [line for line in lines if "Traceback" in line], proc.describe()
