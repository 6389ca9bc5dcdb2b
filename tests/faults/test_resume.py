"""Session resumption as a user sees it (protocol-spec §10.6), in network namespaces.

The client↔relay TLS connection is lost — the client's link goes down, or the client moves to
another address — while real traffic runs: an OpenSSH session through the tunnel with an
interactive loop and a 100 MiB download, checked streams pushing both ways. Within the resume
window the client reconnects, authenticates again, presents its ticket and the session goes on
over the new connection: visitors and the local service see a pause, never a reset, and every
byte arrives once, in order. Past the window the streams end with a reset and the client
starts a fresh session on the same public port. What cannot be resumed is not: a restarted
relay refuses the ticket (the client starts afresh, same port), and a killed client's restart
takes its port over from the session that waited for it.

The client reaches its local service over a direct link (``service_lan``), so an outage of the
client's router link breaks only the client↔relay path. Both ends run with
``--keepalive-timeout 4``, so a lost connection is noticed within seconds (with the default
30 s a 10 s outage is ridden out by TCP alone and nothing needs resuming).
``MUXTUNNEL_FAULT_LONG=1`` makes the outage under load 45 s instead of 8 s and adds the silent
move.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.system.services import missing_ssh

from .netlab import build_tunnel, record, rss_bytes, status_json

if TYPE_CHECKING:
    from tests.system.harness import ManagedProcess

    from .netlab import Lab, LabClient, LabRelay, Tunnel

pytestmark = pytest.mark.netns

MiB = 1 << 20
LONG = os.environ.get("MUXTUNNEL_FAULT_LONG", "") not in ("", "0")
#: Seconds of silence after which either end declares the connection lost.
KEEPALIVE = 4.0
#: The resume window of the tests that resume (the default: the lease time).
WINDOW = 60.0
RESUMING = ["--resume-window", f"{WINDOW:g}", "--keepalive-timeout", f"{KEEPALIVE:g}"]
#: Longest time from the link's return (or the move) to the session going on. The client dials
#: at once after the loss, then every <= 2 s; a dial that met the outage is still in TCP's SYN
#: back-off (1 s, 2 s, ...) when the link returns.
RECOVERY = 10.0
_CLIENT_RESUMED = re.compile(r"session with relay \S+ resumed after (?P<s>[\d.]+) s")
_RELAY_RESUMED = re.compile(r"client \S+ resumed after (?P<s>[\d.]+) s")
_RECEIVING = re.compile(r"^receiving$")
#: Relay and client: the connection is lost, the session kept for a resume.
_SUSPENDED = re.compile(r"lost \(.*\); (session kept|resuming the session)")
_PROGRESS = re.compile(r"^progress (?P<n>\d+)$")
_JSON = re.compile(r"^\{.*\}$")


def _result(proc: ManagedProcess, timeout: float, lab: Lab | None = None) -> dict[str, Any]:
    """A traffic process's JSON outcome (on a timeout the message has every lab process's log)."""
    context = lab.describe if lab is not None else None
    match, _ = proc.wait_for_line(_JSON, timeout=timeout, what="its JSON result", context=context)
    out: dict[str, Any] = json.loads(match.group(0))
    return out


def _all_ok(results: list[dict[str, Any]], lab: Lab) -> None:
    """Every stream completed intact (the message has the results and every process's log)."""
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"{json.dumps(bad)}\n{lab.describe()}"


def _wait_progress(proc: ManagedProcess, count: int, timeout: float) -> None:
    """Wait until a ``peers.py pull`` has read ``count`` bytes."""
    deadline, index = time.monotonic() + timeout, 0
    while True:
        match, index = proc.wait_for_line(
            _PROGRESS, timeout=max(0.1, deadline - time.monotonic()), start=index
        )
        if int(match["n"]) >= count:
            return
        index += 1


def _wait_resumed(t: Tunnel, timeout: float) -> tuple[float, float]:
    """Wait for the client's and the relay's resume lines; the pauses they logged (seconds)."""
    client, _ = t.client.proc.wait_for_line(
        _CLIENT_RESUMED,
        stream="stderr",
        timeout=timeout,
        what="the client's resume line",
        context=t.lab.describe,
    )
    relay, _ = t.relay.proc.wait_for_line(
        _RELAY_RESUMED,
        stream="stderr",
        timeout=timeout,
        what="the relay's resumed line",
        context=t.lab.describe,
    )
    return float(client["s"]), float(relay["s"])


def _no_fresh_session(t: Tunnel) -> None:
    """The client printed its forwarding lines once: it resumed, it did not reconnect."""
    lines = t.client.proc.stdout_lines
    assert len(lines) == len(t.client.forwards), f"the client started a new session: {lines}"


def _session(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    (snap,) = snapshots
    (session,) = snap["sessions"]
    out: dict[str, Any] = session
    return out


def _relay_session(relay: LabRelay) -> dict[str, Any]:
    return _session(status_json(relay.state_dir))


def _client_session(client: LabClient) -> dict[str, Any]:
    assert client.state_dir is not None
    return _session(status_json(client.state_dir))


def _require_ssh() -> None:
    reason = missing_ssh()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# -- 1. an SSH session through a 10 s outage -------------------------------------------------

SSH_BULK = 100 * MiB
#: The download's pace (the reader's): it starts well before the cut and ends after it.
SSH_BULK_RATE = 16 * MiB
SSH_CUT = 10.0


def test_ssh_session_rides_out_a_10s_link_cut(lab: Lab) -> None:
    _require_ssh()
    t = build_tunnel(
        lab, service_lan=True, relay_args=RESUMING, client_args=RESUMING, extra_ports=[2222]
    )
    sshd = t.service_host.start_sshd(2222)
    port = t.public_port(2222)
    bulk_file = lab.workdir / "bulk.bin"
    data = os.urandom(SSH_BULK)
    bulk_file.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    del data
    stop = lab.workdir / "stop-lines"
    target = t.relay_host.addr
    feed = ["lines", "--interval", "0.1", "--max", "900", "--until", str(stop), "--timeout", "120"]
    interactive = t.visitor_host.peers(
        "ssh-lines", [*feed, "--", *sshd.ssh_argv(target, port, "cat")]
    )
    pull = ["pull", "--rate", str(SSH_BULK_RATE), "--timeout", "120", "--"]
    bulk = t.visitor_host.peers(
        "ssh-bulk", [*pull, *sshd.ssh_argv(target, port, f"cat {bulk_file}")]
    )
    interactive.wait_for_line(_RECEIVING, timeout=30)
    _wait_progress(bulk, 20 * MiB, timeout=30)
    cut = t.client_host.link.cut()
    time.sleep(SSH_CUT)  # the outage itself
    back = t.client_host.link.restore()
    logged_client, logged_relay = _wait_resumed(t, RECOVERY + KEEPALIVE + 10)
    time.sleep(1.0)  # a few more lines after the resume
    stop.touch()
    lines = _result(interactive, 60, lab)
    download = _result(bulk, 120, lab)
    assert lines["ok"], lines
    assert lines["mismatch"] is None, lines
    assert lines["echoed"] == lines["sent"] >= (SSH_CUT + 2) / 0.1 * 0.8, lines
    assert download["returncode"] == 0, download
    assert download["bytes"] == SSH_BULK, download
    assert download["sha256"] == want, download
    # The interactive loop's longest pause spans the outage and ends soon after the link is back.
    assert lines["gap_start"] <= cut + 0.5, (lines, cut)
    recovery = lines["gap_end"] - back
    assert 0 < recovery <= RECOVERY, (lines, back)
    assert download["max_gap"] >= SSH_CUT - 2, download  # less what the buffers held
    _no_fresh_session(t)
    t.check_logs()
    record(
        "resume-ssh-link-cut-10s",
        cut_s=round(back - cut, 1),
        pause_s=lines["max_gap"],
        recovery_s=round(recovery, 2),
        logged_client_s=logged_client,
        logged_relay_s=logged_relay,
        bulk_pause_s=download["max_gap"],
        bulk_s=download["seconds"],
        lines=lines["echoed"],
        bytes_checked=download["bytes"],
    )


# -- 2. the client moves to another address ---------------------------------------------------


#: The move the OS tells the client about always; the silent one (found by the keepalive, like
#: the cuts) with MUXTUNNEL_FAULT_LONG.
MOVES = [True, False] if LONG else [True]


@pytest.mark.parametrize("close_sockets", MOVES, ids=["os-aborts-sockets", "silent"][: len(MOVES)])
def test_client_moving_to_another_address_resumes_the_session(
    lab: Lab, close_sockets: bool
) -> None:
    # os-aborts-sockets: the client's OS aborts the old address's connections, the client
    # resumes at once, before the relay notices anything: the resume moves the session off
    # the old, still attached connection. silent: both ends notice by their keepalive.
    t = build_tunnel(lab, service_lan=True, relay_args=RESUMING, client_args=RESUMING)
    old_addr = t.client_host.addr
    assert _relay_session(t.relay)["peer"].startswith(f"{old_addr}:")
    streams = [t.visit("echo", MiB, seed, rate=256 * 1024) for seed in (11, 12)]
    streams.append(t.visit("down", 4 * MiB, 13, rate=1 * MiB))
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    moved = time.monotonic()
    t.client_host.move(close_sockets=close_sockets)
    new_addr = t.client_host.addr
    assert new_addr != old_addr
    logged_client, logged_relay = _wait_resumed(t, KEEPALIVE + RECOVERY + 10)
    resumed = time.monotonic() - moved
    if close_sockets:
        assert resumed < KEEPALIVE, f"resumed {resumed:.1f} s after the move"
    results = [_result(s, 60, lab) for s in streams]
    _all_ok(results, lab)
    peer = _relay_session(t.relay)["peer"]
    assert peer.startswith(f"{new_addr}:"), f"relay sees {peer}, the client is at {new_addr}"
    fresh = _result(t.visit("down", MiB, 14), 60, lab)
    assert fresh["ok"], fresh
    _no_fresh_session(t)
    t.check_logs()
    record(
        f"resume-client-moved-{'aborted' if close_sockets else 'silent'}",
        resumed_s=round(resumed, 2),
        logged_client_s=logged_client,
        logged_relay_s=logged_relay,
        bytes_checked=sum(r["verified"] for r in results) + fresh["verified"],
    )


# -- 3. a long outage under load: memory stays bounded ----------------------------------------

LOAD_CUT = 45.0 if LONG else 8.0


def _replay(session: dict[str, Any]) -> int:
    value = session["replay"]
    assert isinstance(value, int), session
    return value


def test_long_outage_under_load_keeps_memory_within_the_windows(lab: Lab) -> None:
    from muxtunnel.connection import RELAY_MAX_CONN_WINDOW
    from muxtunnel.protocol.constants import ACK_INTERVAL
    from muxtunnel.protocol.session import SessionConfig

    # What each end may hold unacknowledged: the peer's connection window (its maximum),
    # ACK_INTERVAL, and frame headers and control frames (protocol-spec §10.6).
    slack = 1 * MiB
    relay_log_bound = SessionConfig().max_conn_window + ACK_INTERVAL + slack  # to the client
    client_log_bound = RELAY_MAX_CONN_WINDOW + ACK_INTERVAL + slack  # to the relay
    # 20 ms each way on the client's link: windows open up and much is in flight at the cut.
    t = build_tunnel(
        lab,
        service_lan=True,
        relay_args=RESUMING,
        client_args=RESUMING,
        client_delay_ms=20,
    )
    streams = [
        t.visit("down", 24 * MiB, 21, rate=4 * MiB, timeout=LOAD_CUT + 90),
        t.visit("down", 24 * MiB, 22, rate=4 * MiB, timeout=LOAD_CUT + 90),
        t.visit("echo", 24 * MiB, 23, rate=4 * MiB, timeout=LOAD_CUT + 90),
        t.visit("echo", 24 * MiB, 24, rate=4 * MiB, timeout=LOAD_CUT + 90),
    ]
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    time.sleep(2.0)  # windows open up under the load
    rss_before = {"relay": rss_bytes(t.relay.proc.pid), "client": rss_bytes(t.client.proc.pid)}
    cut = t.client_host.link.cut()
    peak = dict(rss_before)
    replay = {"relay": 0, "client": 0}
    states: set[tuple[str, str]] = set()

    def sample_rss() -> None:
        for name, proc in (("relay", t.relay.proc), ("client", t.client.proc)):
            peak[name] = max(peak[name], rss_bytes(proc.pid))

    # Both ends notice the loss by their keepalive, then hold the session (the outage goes on).
    for proc in (t.relay.proc, t.client.proc):
        sample_rss()
        proc.wait_for_line(
            _SUSPENDED, stream="stderr", timeout=KEEPALIVE + 10, context=lab.describe
        )
    samples = 0
    while time.monotonic() < cut + LOAD_CUT or samples < 1:  # sample memory and the logs
        sample_rss()
        if samples < 1:
            samples += 1
            rs, cs = _relay_session(t.relay), _client_session(t.client)
            replay["relay"] = max(replay["relay"], _replay(rs))
            replay["client"] = max(replay["client"], _replay(cs))
            states |= {("relay", rs["state"]), ("client", cs["state"])}
        time.sleep(0.5)
    back = t.client_host.link.restore()
    logged_client, logged_relay = _wait_resumed(t, RECOVERY + 10)
    results = [_result(s, LOAD_CUT + 120, lab) for s in streams]
    _all_ok(results, lab)
    done_relay, done_client = _relay_session(t.relay), _client_session(t.client)
    assert ("relay", "suspended") in states, states
    assert ("client", "resuming") in states, states
    assert replay["client"] > 0, replay  # the downloads' bytes in flight at the cut
    assert replay["relay"] <= relay_log_bound, replay
    assert replay["client"] <= client_log_bound, replay
    # The outage adds at most one window's worth of memory on either side.
    for name, bound in (("relay", relay_log_bound), ("client", client_log_bound)):
        grew = peak[name] - rss_before[name]
        assert grew <= bound + 16 * MiB, (name, grew, rss_before, peak)
    # Idle again: the logs are down to what is not yet acknowledged.
    assert _replay(done_relay) <= ACK_INTERVAL + slack, done_relay
    assert _replay(done_client) <= ACK_INTERVAL + slack, done_client
    _no_fresh_session(t)
    t.check_logs()
    record(
        f"resume-outage-under-load-{LOAD_CUT:g}s",
        cut_s=round(back - cut, 1),
        logged_client_s=logged_client,
        logged_relay_s=logged_relay,
        replay_relay_kib=replay["relay"] // 1024,
        replay_client_kib=replay["client"] // 1024,
        rss_relay_mib=f"{rss_before['relay'] / MiB:.1f}->{peak['relay'] / MiB:.1f}",
        rss_client_mib=f"{rss_before['client'] / MiB:.1f}->{peak['client'] / MiB:.1f}",
        bytes_checked=sum(r["verified"] for r in results),
    )


# -- 4. an outage longer than the resume window -----------------------------------------------

SHORT_WINDOW = 5.0
_EXPIRED = re.compile(rf"resume window of {SHORT_WINDOW:g}(\.0)? s passed")


def test_outage_longer_than_the_resume_window_ends_streams_and_starts_afresh(lab: Lab) -> None:
    args = ["--resume-window", f"{SHORT_WINDOW:g}", "--keepalive-timeout", f"{KEEPALIVE:g}"]
    t = build_tunnel(
        lab, service_lan=True, relay_args=args, client_args=[*args, "--backoff-cap", "2"]
    )
    streams = [t.visit("echo", 64 * MiB, seed, rate=128 * 1024, timeout=60) for seed in (31, 32)]
    streams.append(t.visit("down", 1 << 36, 33, rate=4 * MiB, timeout=60))
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    cut = t.client_host.link.cut()
    bound = KEEPALIVE + SHORT_WINDOW + 10
    t.relay.proc.wait_for_line(_EXPIRED, stream="stderr", timeout=bound, what="the expiry line")
    expired_relay = time.monotonic() - cut
    t.client.proc.wait_for_line(_EXPIRED, stream="stderr", timeout=bound, what="the expiry line")
    expired_client = time.monotonic() - cut
    results = [_result(s, 30, lab) for s in streams]
    for r in results:
        # Ended for good: a reset (never a clean EOF), after bytes that were all correct.
        assert r["end"] == "reset", results
        assert r["mismatch"] is None, results
        assert r["verified"] == r["received"] > 0, results
    lines = len(t.client.proc.stdout_lines)
    back = t.client_host.link.restore()
    (fwd,), _ = t.client.wait_forwards(1, start=lines, timeout=30)
    reconnect = time.monotonic() - back
    assert fwd.port == t.port, "the fresh session got another public port"
    fresh = _result(t.visit("down", MiB, 34), 60, lab)
    assert fresh["ok"], fresh
    assert not any(_CLIENT_RESUMED.search(x) for x in t.client.proc.stderr_lines)
    for took in (expired_relay, expired_client):
        assert SHORT_WINDOW <= took <= bound, (expired_relay, expired_client)
    assert reconnect <= RECOVERY, f"fresh session {reconnect:.1f} s after the link returned"
    t.check_logs()
    record(
        "resume-window-passed",
        window_s=SHORT_WINDOW,
        expired_relay_s=round(expired_relay, 2),
        expired_client_s=round(expired_client, 2),
        reconnect_s=round(reconnect, 2),
        bytes_checked=sum(r["verified"] for r in results) + fresh["verified"],
    )


# -- 5. a relay restart cannot resume ---------------------------------------------------------


def test_relay_restart_refuses_the_resume_and_the_client_starts_afresh(lab: Lab) -> None:
    t = build_tunnel(lab, service_lan=True, relay_args=RESUMING, client_args=RESUMING)
    streams = [t.visit("echo", 64 * MiB, seed, rate=256 * 1024, timeout=60) for seed in (41, 42)]
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    lines = len(t.client.proc.stdout_lines)
    t.relay.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    results = [_result(s, 30, lab) for s in streams]
    for r in results:  # the relay's sockets died with it (the kernel sends FIN or RST)
        assert r["end"] in ("reset", "eof"), results
        assert not r["ok"], results
        assert r["mismatch"] is None, results
        assert r["verified"] == r["received"] > 0, results
    time.sleep(max(0.0, killed + 1.0 - time.monotonic()))  # the relay stays down for 1 s
    relay = lab.start_relay(
        t.relay_host,
        token=t.relay.token,
        state_dir=t.relay.state_dir,
        name="relay-restarted",
        extra_args=RESUMING,
    )
    back = time.monotonic()
    # The restarted relay does not know the ticket: the client starts a fresh session, and the
    # durable lease gives it the same public port.
    (fwd,), _ = t.client.wait_forwards(1, start=lines, timeout=30)
    recovery = time.monotonic() - back
    assert fwd.port == t.port, "the tunnel came back on another port"
    assert recovery <= RECOVERY, f"client back {recovery:.1f} s after the relay"
    fresh = _result(t.visit("down", MiB, 43), 60, lab)
    assert fresh["ok"], fresh
    assert not any(_CLIENT_RESUMED.search(x) for x in t.client.proc.stderr_lines)
    assert not any(_RELAY_RESUMED.search(x) for x in relay.proc.stderr_lines)
    t.check_logs()
    record(
        "resume-relay-restarted",
        recovery_s=round(recovery, 2),
        bytes_checked=sum(r["verified"] for r in results) + fresh["verified"],
    )


# -- 6. a killed client's restart takes its port over ----------------------------------------


def test_restarted_client_takes_over_from_its_suspended_session(lab: Lab) -> None:
    t = build_tunnel(lab, service_lan=True, relay_args=RESUMING, client_args=RESUMING)
    streams = [t.visit("echo", 64 * MiB, seed, rate=256 * 1024, timeout=60) for seed in (51, 52)]
    for s in streams:
        s.wait_for_line(_RECEIVING, timeout=30)
    t.client.proc.send_signal(signal.SIGKILL)
    # The relay cannot tell a killed client from a lost path: it keeps the session for a resume.
    t.relay.proc.wait_for_line(_SUSPENDED, stream="stderr", timeout=10, context=lab.describe)
    restart = time.monotonic()
    client = lab.start_client(
        t.client_host,
        t.relay,
        [f.local for f in t.client.forwards],
        name="client-restarted",
        extra_args=RESUMING,
    )
    recovery = time.monotonic() - restart
    assert client.forwards[0].port == t.port, "the restarted client got another port"
    # The new session took the port over: the old one is over, its visitors are not left
    # waiting for a resume that cannot come.
    results = [_result(s, 20, lab) for s in streams]
    ended = time.monotonic() - restart
    for r in results:
        assert r["end"] in ("reset", "eof"), results
        assert not r["ok"], results
        assert r["mismatch"] is None, results
    assert recovery <= RECOVERY, f"restarted client up after {recovery:.1f} s"
    fresh = _result(t.visit("down", MiB, 53), 60, lab)
    assert fresh["ok"], fresh
    t.check_logs()
    record(
        "resume-client-restarted",
        recovery_s=round(recovery, 2),
        old_streams_ended_s=round(ended, 2),
        bytes_checked=sum(r["verified"] for r in results) + fresh["verified"],
    )
