"""Admission before authentication: per-source limits, early drop, bans, one deadline.

The bookkeeping (:mod:`muxtunnel.admission`) is tested directly with a fake clock; the relay
tests use real TCP and TLS on loopback, with 127.0.0.1 as the attacking source and
127.0.0.2 / 127.0.0.3 as other sources.
"""

from __future__ import annotations

import logging
import re
import select
from contextlib import suppress
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel.admission import Admission, Verdict, source_of
from muxtunnel.config import build_server_config, load_toml
from muxtunnel.connection import MuxConnection, MuxSessionClosedError, make_session
from muxtunnel.errors import AuthError, ConfigError, ErrorCode, HandshakeError
from muxtunnel.handshake import client_handshake
from muxtunnel.protocol.constants import Role
from muxtunnel.protocol.events import ChallengeReceived, ConnectionClosed
from muxtunnel.tls import client_ssl_context
from tests.conftest import TOKEN, Relay, start_relay

if TYPE_CHECKING:
    from pathlib import Path

    from tests.waiting import LogWatch

SERVER_LOGGER = "muxtunnel.server"


# --------------------------------------------------------------------------------------------
# Bookkeeping (no sockets)


def test_source_of_groups_ipv6_by_64_and_maps_ipv4() -> None:
    assert source_of("127.0.0.1") == "127.0.0.1"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::2")
    assert source_of("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:10.0.0.1") == "10.0.0.1"
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("not-an-ip") == "not-an-ip"


def test_per_source_limit_refuses_at_once() -> None:
    adm = Admission(max_startups=100, per_source=3)
    tickets = [adm.admit("a", 0.0).ticket for _ in range(3)]
    assert all(t is not None for t in tickets)
    assert adm.admit("a", 0.0).verdict is Verdict.SOURCE_FULL
    assert adm.admit("b", 0.0).verdict is Verdict.ADMITTED
    assert adm.pending("a") == 3
    assert adm.total == 4
    first = tickets[0]
    assert first is not None
    adm.release(first)
    adm.release(first)  # idempotent
    assert adm.total == 3
    assert adm.admit("a", 0.0).verdict is Verdict.ADMITTED


def test_full_table_evicts_oldest_of_heaviest_source() -> None:
    adm = Admission(max_startups=6, per_source=4)
    heavy = [adm.admit("heavy", float(i)).ticket for i in range(4)]
    light = [adm.admit("light", 10.0 + i).ticket for i in range(2)]
    assert adm.total == 6
    decision = adm.admit("new", 20.0)
    assert decision.verdict is Verdict.ADMITTED
    assert decision.evicted is heavy[0]
    assert heavy[0] is not None
    assert not heavy[0].active
    assert adm.pending("heavy") == 3
    assert adm.total == 6
    # "light" (2) is below "heavy" (3): it may evict too. Now light 3, heavy 2, new 1:
    # the heaviest source is refused rather than evicting anyone.
    assert adm.admit("light", 21.0).evicted is heavy[1]
    assert adm.admit("light", 22.0).verdict is Verdict.FULL
    assert all(t is not None and t.active for t in light)


def test_full_table_tie_evicts_oldest_and_equal_newcomer_is_refused() -> None:
    adm = Admission(max_startups=4, per_source=3)
    a = [adm.admit("a", 1.0).ticket, adm.admit("a", 5.0).ticket]
    b = [adm.admit("b", 2.0).ticket, adm.admit("b", 3.0).ticket]
    decision = adm.admit("c", 6.0)
    assert decision.evicted is a[0]  # both have 2; "a" holds the oldest handshake
    assert adm.admit("c", 7.0).evicted is b[0]
    # a=1, b=1, c=2: "a" is below "c" and evicts c's oldest; then "a" is the heaviest.
    assert adm.admit("a", 8.0).evicted is decision.ticket
    assert adm.admit("a", 9.0).verdict is Verdict.FULL
    assert adm.admit("b", 9.0).evicted is a[1]
    assert b[1] is not None
    assert b[1].active


def test_failures_ban_with_backoff_and_expiry() -> None:
    adm = Admission(auth_failures=3, ban=10.0, max_ban=35.0, failure_window=60.0)
    t = adm.admit("x", 0.0).ticket
    assert adm.auth_failed("x", 0.0) is None
    assert adm.auth_failed("x", 1.0) is None
    ban = adm.auth_failed("x", 2.0)
    assert ban is not None
    assert (ban.source, ban.seconds, ban.failures) == ("x", 10.0, 3)
    assert ban.evicted == (t,)  # the source's pending handshakes are cut
    assert adm.total == 0
    assert adm.admit("x", 5.0).verdict is Verdict.BANNED
    assert adm.banned_for("x", 5.0) == pytest.approx(7.0)
    assert adm.auth_failed("x", 6.0) is None  # raced the ban: not counted
    assert adm.admit("y", 5.0).verdict is Verdict.ADMITTED
    assert adm.admit("x", 12.0).verdict is Verdict.ADMITTED
    # Banned again: twice as long, then capped at max_ban.
    for now in (13.0, 13.5, 14.0):
        ban = adm.auth_failed("x", now)
    assert ban is not None
    assert ban.seconds == 20.0
    for now in (40.0, 40.5, 41.0):
        ban = adm.auth_failed("x", now)
    assert ban is not None
    assert ban.seconds == 35.0
    # Clean for max_ban after the last ban ended: the history is forgotten.
    for now in (200.0, 200.5, 201.0):
        ban = adm.auth_failed("x", now)
    assert ban is not None
    assert ban.seconds == 10.0


def test_failures_outside_the_window_do_not_count() -> None:
    adm = Admission(auth_failures=3, failure_window=60.0)
    assert adm.auth_failed("x", 0.0) is None
    assert adm.auth_failed("x", 30.0) is None
    assert adm.auth_failed("x", 61.0) is None  # the one at 0.0 has expired
    assert adm.auth_failed("x", 62.0) is not None


def test_source_memory_is_bounded() -> None:
    adm = Admission(max_startups=10, per_source=2, max_sources=50)
    held = adm.admit("held", 0.0).ticket
    for i in range(500):
        adm.auth_failed(f"s{i}", float(i) / 1000)
    assert len(adm) <= 50
    assert held is not None
    assert held.active
    assert adm.pending("held") == 1
    for i in range(500):  # long idle records are dropped without pressure too
        adm.admit(f"t{i}", 10_000.0 + i)
    assert len(adm) <= 50


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Admission(per_source=0)


def test_options_from_flags_and_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[server]\nauth_failures = 3\nmax-startups = 9\n")
    flags = {"token": ["t"], "max-startups": 50, "max-startups-per-source": 2, "auth-ban": 5}
    cfg = build_server_config(load_toml(path, "server"), flags, config_path=path, env={})
    assert (cfg.max_startups, cfg.max_startups_per_source) == (50, 2)
    assert (cfg.auth_failures, cfg.auth_ban) == (3, 5.0)
    default = build_server_config({}, {"token": ["t"]}, env={})
    assert (default.max_startups, default.max_startups_per_source) == (256, 10)
    assert (default.auth_failures, default.auth_ban, default.handshake_timeout) == (5, 60.0, 10.0)
    with pytest.raises(ConfigError, match="max-startups-per-source"):
        build_server_config({}, {"token": ["t"], "max-startups-per-source": 0}, env={})
    with pytest.raises(ConfigError, match="auth-ban"):
        build_server_config({"auth-ban": "long"}, {"token": ["t"]}, env={})


# --------------------------------------------------------------------------------------------
# Relay: real sockets, real TLS


async def authenticate_from(relay: Relay, source: str, token: str = TOKEN) -> None:
    """Connect from ``source``, authenticate, close again.

    Raises:
        AuthError, HandshakeError, OSError ...: as the real client would see them.
    """
    tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port, local_address=source)
    tls = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
    conn = MuxConnection(tls, make_session(Role.CLIENT), name=f"test {source}")
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            assert await client_handshake(conn, token, []) == []
        except (AuthError, HandshakeError, MuxSessionClosedError, trio.BrokenResourceError) as exc:
            error = exc
        finally:
            conn.close()
            with trio.move_on_after(2):
                await conn.wait_closed()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def closed_without_data(stream: trio.SocketStream) -> bool:
    """True when the peer closes (FIN or RST) without sending anything."""
    try:
        return await stream.receive_some(1) == b""
    except trio.BrokenResourceError:
        return True


async def refused_at_once(port: int, source: str = "127.0.0.1") -> bool:
    """Connect from ``source``: True if the relay closes it without sending anything.

    The relay may reset the connection before ``connect`` even returns.
    """
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    except OSError:
        return True
    async with stream:
        return await closed_without_data(stream)


def still_open(stream: trio.SocketStream) -> bool:
    """Non-blocking: the peer has neither closed nor sent anything (nothing to read)."""
    readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
    return not readable


class Attack:
    """``slots`` idle TCP connections from one source, each reopened when the relay sheds it."""

    def __init__(
        self, port: int, source: str, slots: int, pause: float, goal: int | None = None
    ) -> None:
        self.port, self.source, self.slots, self.pause = port, source, slots, pause
        self.goal = slots if goal is None else goal
        self.connects = 0
        #: Set once ``goal`` connections were made.
        self.reached = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.slots):
                nursery.start_soon(self._slot)

    async def _slot(self) -> None:
        while True:
            try:
                tcp = await trio.open_tcp_stream("127.0.0.1", self.port, local_address=self.source)
            except OSError:
                await trio.sleep(self.pause)
                continue
            self.connects += 1
            if self.connects >= self.goal:
                self.reached.set()
            try:
                with suppress(trio.BrokenResourceError, OSError):
                    while await tcp.receive_some(4096):
                        pass
            finally:
                await trio.aclose_forcefully(tcp)
            await trio.sleep(self.pause)


async def test_idle_flood_from_one_source_does_not_lock_out_another(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, logs: LogWatch
) -> None:
    """300 idle connections from 127.0.0.1, reopened as shed; 127.0.0.2 still gets in."""
    caplog.set_level(logging.INFO, logger="muxtunnel")
    relay = await start_relay(nursery, tmp_path)  # default max-startups 256, 10 per source
    # Reached once a shed connection was reopened: the flood is at full strength.
    attack = Attack(relay.info.port, "127.0.0.1", 300, pause=0.2, goal=301)
    with trio.CancelScope() as attack_scope:
        nursery.start_soon(attack.run)
        with trio.fail_after(20):
            await attack.reached.wait()
            # The relay is shedding the flood (the attack keeps going).
            await logs.wait_for("too many handshakes from this source")
            start = trio.current_time()
            await authenticate_from(relay, "127.0.0.2")
            elapsed = trio.current_time() - start
        attack_scope.cancel()
    assert elapsed < 5.0
    refused = [r for r in caplog.records if r.name == SERVER_LOGGER and "refused" in r.message]
    assert refused
    assert "too many handshakes from this source" in refused[0].message
    # Per-connection detail stays at DEBUG: a handful of lines for hundreds of refusals.
    assert attack.connects > 300
    assert len([r for r in caplog.records if r.name == SERVER_LOGGER]) < 20


async def test_connection_flood_logs_a_bounded_number_of_lines(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over 1000 refused connections: per-connection lines stay at DEBUG, plus summaries."""
    import muxtunnel.server

    monkeypatch.setattr(muxtunnel.server, "PREAUTH_SUMMARY_INTERVAL", 1.0, raising=False)
    caplog.set_level(logging.INFO, logger="muxtunnel")
    summary = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("before authentication"):
                summary.set()

    watch = Watch()
    logging.getLogger(SERVER_LOGGER).addHandler(watch)
    try:
        relay = await start_relay(nursery, tmp_path)
        attack = Attack(relay.info.port, "127.0.0.1", 300, pause=0.2, goal=1300)
        with trio.CancelScope() as attack_scope:
            nursery.start_soon(attack.run)
            with trio.fail_after(30):
                await attack.reached.wait()
            attack_scope.cancel()
        lines = [r.getMessage() for r in caplog.records if r.name == SERVER_LOGGER]
        assert len(lines) < 12, lines[:20]
        with trio.fail_after(5):
            await summary.wait()
    finally:
        logging.getLogger(SERVER_LOGGER).removeHandler(watch)
    summaries = [r for r in caplog.records if r.getMessage().startswith("before authentication")]
    assert summaries[0].levelno == logging.WARNING
    assert re.fullmatch(
        r"before authentication, last 1 s: (\d+) refused: too many handshakes from this source"
        r"(; .*)?; most from 127\.0\.0\.1 \(\d+\)",
        summaries[0].getMessage(),
    ), summaries[0].getMessage()


async def test_full_table_evicts_heaviest_source_and_refuses_source_at_limit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = await start_relay(nursery, tmp_path, max_startups=6, max_startups_per_source=3)
    port = relay.info.port
    held: list[trio.SocketStream] = []

    async def open_from(source: str) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        held.append(stream)
        return stream

    try:
        with trio.fail_after(20):
            # The relay admits in the kernel's accept-queue order: first[0] is the oldest.
            first = [await open_from("127.0.0.1") for _ in range(3)]
            other = [await open_from("127.0.0.3") for _ in range(3)]
            # A source at its limit is refused at once (before TLS).
            assert await refused_at_once(port)
            # The table is full; a new source gets in by evicting the oldest of the heaviest.
            start = trio.current_time()
            await authenticate_from(relay, "127.0.0.2")
            assert trio.current_time() - start < 5.0
            assert await closed_without_data(first[0])
            assert all(still_open(s) for s in first[1:] + other)
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)


async def _wrong_token(relay: Relay, source: str) -> None:
    with pytest.raises(AuthError, match="authentication failed"):
        await authenticate_from(relay, source, token="wrong-token")


async def test_auth_failures_ban_the_source_at_accept(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Defaults: 5 wrong tokens within 60 s ban the source; others are unaffected."""
    caplog.set_level(logging.INFO, logger="muxtunnel")
    relay = await start_relay(nursery, tmp_path, handshake_timeout=10.0)
    with trio.fail_after(30):
        for _ in range(5):
            await _wrong_token(relay, "127.0.0.1")
        # Banned: closed right at accept, long before the 10 s handshake deadline.
        with trio.fail_after(2):
            assert await refused_at_once(relay.info.port)
        with pytest.raises(
            (HandshakeError, OSError, trio.BrokenResourceError, MuxSessionClosedError)
        ):
            await authenticate_from(relay, "127.0.0.1")
        await authenticate_from(relay, "127.0.0.2")
    messages = [r.getMessage() for r in caplog.records if r.name == SERVER_LOGGER]
    failed = [m for m in messages if m.startswith("authentication failed")]
    assert len(failed) == 5
    assert all(
        re.fullmatch(r"authentication failed from 127\.0\.0\.1 port \d+: wrong token", m)
        for m in failed
    ), failed
    assert messages.count("source 127.0.0.1 banned for 60 s after 5 authentication failures") == 1
    levels = {r.levelno for r in caplog.records if r.getMessage() in failed}
    assert levels == {logging.WARNING}


async def test_ban_expires_and_doubles(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path, auth_failures=2, auth_ban=1.0)
    with trio.fail_after(30):
        for _ in range(2):
            await _wrong_token(relay, "127.0.0.1")
        banned_at = trio.current_time()
        assert await refused_at_once(relay.info.port)
        while True:  # bounded by fail_after
            try:
                await authenticate_from(relay, "127.0.0.1")
                break
            except (HandshakeError, OSError, trio.BrokenResourceError, MuxSessionClosedError):
                await trio.sleep(0.1)
        assert trio.current_time() - banned_at >= 0.9
        for _ in range(2):
            await _wrong_token(relay, "127.0.0.1")
        second = trio.current_time()
        while True:
            try:
                await authenticate_from(relay, "127.0.0.1")
                break
            except (HandshakeError, OSError, trio.BrokenResourceError, MuxSessionClosedError):
                await trio.sleep(0.1)
        assert trio.current_time() - second >= 1.9  # banned for 2 s the second time


async def test_one_deadline_from_accept_covers_tls_and_auth(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """TLS completes after 3 s, then AUTH stalls: cut at 4 s from accept, not 3 + 4."""
    relay = await start_relay(nursery, tmp_path, handshake_timeout=4.0)
    with trio.fail_after(20):
        start = trio.current_time()
        tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
        await trio.sleep(3.0)  # a slow client: nothing sent yet
        tls = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
        conn = MuxConnection(tls, make_session(Role.CLIENT), name="slow")
        closed: ConnectionClosed | None = None
        challenged = False
        async with trio.open_nursery() as inner:
            await inner.start(conn.run)
            try:
                while True:
                    event = await conn.next_control_event()  # HELLO, CHALLENGE, CLOSE
                    if isinstance(event, ChallengeReceived):
                        challenged = True
                    if isinstance(event, ConnectionClosed):
                        closed = event
                        break
            except MuxSessionClosedError:
                pass
            end = trio.current_time()
            inner.cancel_scope.cancel()
    assert challenged  # TLS was completed and the relay waited for AUTH
    assert 3.5 < end - start < 5.5
    if closed is not None:
        assert closed.error_code == ErrorCode.TIMEOUT
