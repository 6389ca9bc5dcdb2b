"""The relay's per-token policy: ports, limits, visitor allow/deny lists, bandwidth (real TLS)."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from typing import TYPE_CHECKING, Any

import pytest
import trio

from muxtunnel import server
from muxtunnel.access import AddressRule, TokenEntry, TokenPolicy, clip_ports, parse_cidrs
from muxtunnel.bandwidth import MIN_BURST, DuplexMeter, TokenBucket
from muxtunnel.client import run_client
from muxtunnel.config import ClientConfig, TunnelSpec
from muxtunnel.connection import MuxConnection, make_session
from muxtunnel.errors import SessionClosedError
from muxtunnel.handshake import client_handshake
from muxtunnel.policy import DEFAULT_POLICY, Direction, StreamInfo, StreamPolicy
from muxtunnel.protocol.auth import stored_key
from muxtunnel.protocol.constants import OpenFailReason, ResultStatus, Role
from muxtunnel.protocol.events import ResultReceived
from muxtunnel.protocol.frames import Address, BindOptions
from muxtunnel.registry import BindError, PortRegistry
from muxtunnel.relaypolicy import RelayPolicy, StreamLimits
from muxtunnel.tls import client_ssl_context
from tests.conftest import (
    TOKEN,
    echo_roundtrip,
    free_port_range,
    random_bytes,
    sha,
    start_client,
    start_echo,
    start_relay,
    start_service,
)

if TYPE_CHECKING:
    from pathlib import Path

# --------------------------------------------------------------------------------------------
# Token buckets (fake clock)


def test_bucket_passes_the_burst_then_charges_debt_at_the_rate() -> None:
    bucket = TokenBucket(1000, 4000, now=0.0)
    assert bucket.delay(4000, 0.0) == 0.0
    # 1000 bytes more: 1000 bytes of debt = one second at 1000 B/s.
    assert bucket.delay(1000, 0.0) == pytest.approx(1.0)
    # Half a second later half of the debt is paid; another 500 bytes make it a second again.
    assert bucket.delay(500, 0.5) == pytest.approx(1.0)
    assert bucket.credit(1.5) == pytest.approx(0.0)
    # Idle time refills to the burst, never beyond.
    assert bucket.credit(100.0) == pytest.approx(4000)


def test_bucket_long_run_rate_matches_the_limit() -> None:
    rate = 256_000
    bucket = TokenBucket(rate, now=0.0)
    now, moved = 0.0, 0
    chunk = 65536
    while moved < 10 * rate:
        now += bucket.delay(chunk, now)  # the mover sleeps as told
        moved += chunk
    # 10 s worth of bytes, the first second's burst free: about 9 s.
    assert 8.5 <= now <= 9.5


def test_bucket_default_burst_and_rate_change() -> None:
    assert TokenBucket(1000).burst == MIN_BURST
    assert TokenBucket(1_000_000).burst == 1_000_000
    bucket = TokenBucket(1_000_000, now=0.0)
    bucket.set_rate(10_000, 0.0)
    assert bucket.burst == MIN_BURST
    assert bucket.credit(0.0) == MIN_BURST  # capped at the new burst
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)
    with pytest.raises(ValueError, match="positive"):
        bucket.set_rate(-1, 0.0)


def test_meter_keeps_one_bucket_per_direction() -> None:
    meter = DuplexMeter()
    assert meter.bucket(Direction.IN) is None
    assert meter.delay(Direction.IN, 2 * MIN_BURST, 1000, 0.0) > 0
    assert meter.delay(Direction.OUT, MIN_BURST, 1000, 0.0) == 0.0
    inbound = meter.bucket(Direction.IN)
    assert inbound is not None
    assert inbound.rate == 1000
    meter.delay(Direction.IN, 0, 2000, 0.0)
    assert inbound.rate == 2000


class _Holder:
    def __init__(self, policy: TokenPolicy) -> None:
        self.token = TokenEntry("t", bytes(32), policy)


class _Recording(StreamPolicy):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def admit(self, info: StreamInfo) -> OpenFailReason | None:
        self.calls.append("admit")
        return OpenFailReason.REFUSED

    def prologue(self, info: StreamInfo) -> bytes:
        self.calls.append("prologue")
        return b"P"

    async def throttle(self, info: StreamInfo, direction: Direction, nbytes: int) -> None:
        self.calls.append(f"throttle {direction.value} {nbytes}")

    def finished(self, info: StreamInfo, now: float, error: str | None) -> None:
        self.calls.append(f"finished {error}")


def _info() -> StreamInfo:
    return StreamInfo(
        stream_id=2, tunnel_id=1, origin=Address("127.0.0.1", 1), target=Address(None, 0), started=0
    )


async def test_relay_policy_delegates_and_waits_for_the_slower_bucket() -> None:
    clock = [0.0]
    inner = _Recording()
    policy = RelayPolicy(inner, clock=lambda: clock[0])
    info = _info()
    assert policy.admit(info) == OpenFailReason.REFUSED
    assert policy.prologue(info) == b"P"
    holder = _Holder(TokenPolicy(bandwidth=100_000, tunnel_bandwidth=200_000))
    token_meter, tunnel_meter = DuplexMeter(), DuplexMeter()
    policy.track(info, StreamLimits(holder, token_meter, tunnel_meter))
    # Bursts: one second of each rate. The token's bucket empties first...
    assert policy.delay(info, Direction.OUT, 100_000) == 0.0
    # ... then 100 000 B more are 100 000 B of debt at 100 000 B/s: one second.
    assert policy.delay(info, Direction.OUT, 100_000) == pytest.approx(1.0)
    # The other direction has buckets of its own: 300 000 B are 2 s of token debt (the
    # tunnel's, 0.5 s, is shorter).
    assert policy.delay(info, Direction.IN, 300_000) == pytest.approx(2.0)
    assert tunnel_meter.delay(Direction.IN, 0, 200_000, 0.0) == pytest.approx(0.5)
    # The tunnel's limit when it is the slower one.
    holder.token = TokenEntry("t", bytes(32), TokenPolicy(bandwidth=10**7, tunnel_bandwidth=10**5))
    other = _info()
    policy.track(other, StreamLimits(holder, DuplexMeter(), DuplexMeter()))
    assert policy.delay(other, Direction.IN, 300_000) == pytest.approx(2.0)
    policy.untrack(other)
    # The policy is read at every chunk: lifting the limits lifts the wait at once.
    holder.token = TokenEntry("t", bytes(32), TokenPolicy())
    assert policy.delay(info, Direction.OUT, 10**9) == 0.0
    with trio.fail_after(5):
        await policy.throttle(info, Direction.OUT, 10)
    assert "throttle out 10" in inner.calls
    policy.finished(info, 1.0, None)
    assert inner.calls[-1] == "finished None"
    assert policy.tracked() == 0
    # An untracked stream (or one whose token has no limit) never waits.
    assert policy.delay(info, Direction.OUT, 10**9) == 0.0


async def test_unlimited_stream_costs_no_bucket_and_no_checkpoint() -> None:
    policy = RelayPolicy(DEFAULT_POLICY)
    info = _info()
    token_meter, tunnel_meter = DuplexMeter(), DuplexMeter()
    policy.track(info, StreamLimits(_Holder(TokenPolicy()), token_meter, tunnel_meter))
    # No sleep: a cancelled scope would raise at any checkpoint.
    with trio.CancelScope() as scope:
        scope.cancel()
        for _ in range(1000):
            await policy.throttle(info, Direction.IN, 1 << 20)
    assert token_meter.bucket(Direction.IN) is None
    assert tunnel_meter.bucket(Direction.IN) is None
    policy.untrack(info)
    assert policy.tracked() == 0


def test_throttles_follows_the_limits_in_force() -> None:
    """The splice's reader shortcut is allowed only while no limit applies to the stream."""
    policy = RelayPolicy(DEFAULT_POLICY)
    info = _info()
    assert not DEFAULT_POLICY.throttles(info)
    assert not policy.throttles(info)  # untracked
    holder = _Holder(TokenPolicy())
    policy.track(info, StreamLimits(holder, DuplexMeter(), DuplexMeter()))
    assert not policy.throttles(info)
    # A reload that gives the token (or its tunnels) a rate applies to open streams at once.
    holder.token = TokenEntry("t", bytes(32), TokenPolicy(bandwidth=100_000))
    assert policy.throttles(info)
    holder.token = TokenEntry("t", bytes(32), TokenPolicy(tunnel_bandwidth=100_000))
    assert policy.throttles(info)
    holder.token = TokenEntry("t", bytes(32), TokenPolicy())
    assert not policy.throttles(info)
    # A wrapped policy that overrides ``throttle`` must see every chunk.
    assert _Recording().throttles(info)
    assert RelayPolicy(_Recording()).throttles(info)


# --------------------------------------------------------------------------------------------
# Address rules and port sets


def test_address_rules_handle_ipv6_and_mapped_ipv4() -> None:
    rule = AddressRule(
        allow=parse_cidrs(["127.0.0.2/32", "2001:db8::/32"], "allow"),
        deny=parse_cidrs(["2001:db8:dead::/48"], "deny"),
    )
    assert rule.refusal("127.0.0.2") is None
    assert rule.refusal("::ffff:127.0.0.2") is None  # an IPv4 visitor on a dual-stack listener
    assert rule.refusal("::ffff:127.0.0.3") == "not in the allow list"
    assert rule.refusal("2001:db8:1::5") is None
    assert rule.refusal("2001:db8:dead::1") == "in the deny list (2001:db8:dead::/48)"
    assert rule.refusal("::1") == "not in the allow list"
    assert rule.refusal("fe80::1%lo") == "not in the allow list"
    assert rule.refusal(None) == "not in the allow list"
    deny_only = AddressRule(deny=parse_cidrs(["::1", "10.0.0.0/8"], "deny"))
    assert deny_only.refusal("::1") == "in the deny list (::1/128)"
    assert deny_only.refusal("127.0.0.1") is None
    assert deny_only.refusal("::ffff:10.1.2.3") == "in the deny list (10.0.0.0/8)"
    assert ipaddress.ip_network("10.0.0.0/8") in deny_only.deny


def test_port_sets_clip_to_the_relay_range() -> None:
    assert clip_ports(None, 10, 20) == ((10, 20),)
    assert clip_ports(((5, 12), (15, 15), (13, 14), (30, 40)), 10, 20) == ((10, 15),)
    assert clip_ports(((30, 40),), 10, 20) == ()
    policy = TokenPolicy(ports=((2200, 2299), (3000, 3000)))
    assert policy.ports_text() == "2200-2299, 3000"
    assert TokenPolicy().ports_text() == "any"


class _Owner:
    def __init__(self, token_id: str) -> None:
        self.token_id = token_id
        self.alive = True

    async def probe(self, within: float) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    def replaced(self, reason: str) -> None:
        self.alive = False


async def test_registry_picks_port_zero_inside_the_token_ports() -> None:
    lo, hi = free_port_range(40)
    registry = PortRegistry((lo, hi), "127.0.0.1", 60.0, max_per_token=64)
    owner = _Owner("office")
    allowed = ((lo + 10, lo + 12), (hi + 1, hi + 100))  # only three of them in the relay range
    try:
        ports = {(await registry.acquire(owner, t, 0, ports=allowed)).port for t in (1, 2, 3)}
        assert ports == {lo + 10, lo + 11, lo + 12}
        with pytest.raises(BindError, match=f"no free port left in {lo + 10}-{lo + 12}") as full:
            await registry.acquire(owner, 4, 0, ports=allowed)
        assert full.value.status == ResultStatus.ADDRESS_IN_USE
        with pytest.raises(BindError, match="none of the token's ports") as outside:
            await registry.acquire(owner, 5, 0, ports=((hi + 1, hi + 9),))
        assert outside.value.status == ResultStatus.ADDRESS_IN_USE
        # The token's own tunnel limit replaces the relay's.
        with pytest.raises(BindError, match="already holds 3 tunnels") as limited:
            await registry.acquire(owner, 6, 0, max_tunnels=3)
        assert limited.value.status == ResultStatus.LIMIT_REACHED
        assert registry.held_by("office") == 3
    finally:
        registry.close_all()


# --------------------------------------------------------------------------------------------
# The relay, in process (real TLS, real sockets)

OFFICE = "office-token-0123456789abcdef"


def _entry(name: str, token: str, **policy: object) -> TokenEntry:
    return TokenEntry(name, stored_key(token), TokenPolicy(**policy))  # type: ignore[arg-type]


@pytest.fixture
def relays(monkeypatch: pytest.MonkeyPatch) -> list[server._Relay]:
    """Every relay object started by the test (to read its counters)."""
    made: list[server._Relay] = []

    class Recorded(server._Relay):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(server, "_Relay", Recorded)
    return made


async def _visit(
    port: int, payload: bytes, source: str = "127.0.0.1", host: str = "127.0.0.1"
) -> bytes:
    """Connect from ``source``, send ``payload``, half-close, read until EOF (a reset ends it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    got = bytearray()
    with sock:
        await sock.bind((source, 0))
        try:
            await sock.connect((host, port))
        except OSError:
            return b""
        stream = trio.SocketStream(sock)

        async def send() -> None:
            try:
                view = memoryview(payload)
                for i in range(0, len(view), 65536):
                    await stream.send_all(view[i : i + 65536])
                await stream.send_eof()
            except (trio.BrokenResourceError, OSError):
                pass

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                try:
                    while chunk := await stream.receive_some(262144):
                        got += chunk
                except (trio.BrokenResourceError, OSError):
                    pass
    return bytes(got)


class _Recorder:
    """An echo service that records what every connection sent it."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        self.received.append(buffer)
        try:
            while data := await stream.receive_some(65536):
                buffer += data
                await stream.send_all(data)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def saw(self, marker: bytes) -> bool:
        return any(marker in bytes(b) for b in self.received)


async def _assert_refused(
    port: int,
    source: str,
    recorder: _Recorder,
    caplog: pytest.LogCaptureFixture,
    *,
    host: str = "127.0.0.1",
) -> None:
    """The visitor gets no byte; the relay refused it at accept; the service saw nothing."""
    before, lines = len(recorder.received), len(_refusals(caplog))
    marker = b"marker-" + os.urandom(8).hex().encode()
    assert await _visit(port, marker, source, host) == b""
    # The relay resets and logs in one step, without opening a stream: the line is there.
    assert len(_refusals(caplog)) == lines + 1
    assert len(recorder.received) == before
    assert not recorder.saw(marker)


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if re.match(r"visitor \S+ port \d+ refused on", r.getMessage())
    ]


async def test_ports_policy_at_bind(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    echo = await start_echo(nursery)
    lo, hi = free_port_range(20)
    ports = ((lo + 2, lo + 4), (hi + 1, hi + 50))  # three of them in the relay's range
    relay = await start_relay(
        nursery,
        tmp_path,
        port_range=(lo, hi),
        token_entries=(_entry("office", OFFICE, ports=ports),),
    )
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [
            TunnelSpec(local_port=echo, remote_port=lo + 2),
            TunnelSpec(local_port=echo, remote_port=lo + 10),  # not the token's
            TunnelSpec(local_port=echo),
            TunnelSpec(local_port=echo),
            TunnelSpec(local_port=echo),  # nothing free left
        ],
        token=OFFICE,
    )
    bound = sorted(t.remote_port for t in client.info.tunnels)
    assert bound == [lo + 2, lo + 3, lo + 4]
    messages = [r.getMessage() for r in caplog.records]
    denied = f"DENIED: token office may bind ports {lo + 2}-{lo + 4}, {hi + 1}-{hi + 50} only"
    assert sum(denied in m for m in messages) >= 1, messages
    assert any(f"ADDRESS_IN_USE: no free port left in {lo + 2}-{lo + 4}" in m for m in messages)
    for seed, port in enumerate(bound):
        payload = random_bytes(20_000, seed)
        with trio.fail_after(15):
            assert await echo_roundtrip(port, payload) == payload


async def test_unknown_bind_option_is_malformed(nursery: trio.Nursery, tmp_path: Path) -> None:
    relay = await start_relay(nursery, tmp_path)
    tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
    stream = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
    conn = MuxConnection(stream, make_session(Role.CLIENT), name="raw")
    await nursery.start(conn.run)
    assert await client_handshake(conn, TOKEN, []) == []
    conn.send_bind(5, 1, Address(None, 0), options=BindOptions(unknown=(0x7E,)))
    with trio.fail_after(10):
        while not isinstance(event := await conn.next_control_event(), ResultReceived):
            pass
    assert event.status == ResultStatus.MALFORMED
    assert event.message == "unsupported BIND option 0x7e"
    lo, hi = relay.config.port_range
    assert not _listening(lo, hi)
    await conn.aclose()


async def test_bind_checks_follow_the_spec_order(nursery: trio.Nursery, tmp_path: Path) -> None:
    """protocol-spec.md §7.2 item 4: tunnel id 0, a duplicate id, the protocol, then the
    options; the first failing check answers, public and private binds alike."""
    relay = await start_relay(nursery, tmp_path)
    tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
    stream = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
    conn = MuxConnection(stream, make_session(Role.CLIENT), name="raw")
    await nursery.start(conn.run)
    assert await client_handshake(conn, TOKEN, [(1, 0, None)]) != []
    odd = BindOptions(unknown=(0x7E,))
    requests = [
        (10, 0, 2, odd, ResultStatus.MALFORMED, "tunnel id 0 is reserved"),
        (11, 1, 2, odd, ResultStatus.DUPLICATE_TUNNEL, "tunnel 1 is already bound"),
        (12, 2, 2, odd, ResultStatus.UNSUPPORTED_PROTO, "protocol 2 is not supported"),
        (13, 3, 1, odd, ResultStatus.MALFORMED, "unsupported BIND option 0x7e"),
        (14, 0, 1, BindOptions(name="ssh-home"), ResultStatus.MALFORMED, "tunnel id 0"),
        (15, 1, 1, BindOptions(visit="x"), ResultStatus.DUPLICATE_TUNNEL, "already bound"),
    ]
    for req_id, tunnel_id, proto, options, _, _ in requests:
        conn.send_bind(req_id, tunnel_id, Address(None, 0), proto, options=options)
    answers: dict[int, ResultReceived] = {}
    with trio.fail_after(10):
        while len(answers) < len(requests):
            event = await conn.next_control_event()
            if isinstance(event, ResultReceived):
                answers[event.req_id] = event
    for req_id, _, _, _, status, text in requests:
        assert answers[req_id].status == status, (req_id, answers[req_id])
        assert text in answers[req_id].message
    await conn.aclose()


def _listening(lo: int, hi: int) -> list[int]:
    """The ports of ``lo..hi`` that accept a TCP connection on 127.0.0.1 (a port some other
    socket merely occupies, such as another program's ephemeral port, does not count)."""
    held = []
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            s.settimeout(2.0)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                held.append(port)
    return held


async def _held_visitor(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        await stream.send_all(b"ping")
        got = b""
        while len(got) < 4:
            chunk = await stream.receive_some(4 - len(got))
            assert chunk, "visitor closed before the echo came back"
            got += chunk
    return stream


async def _is_refused(port: int) -> bool:
    return await _visit(port, b"ping") == b""


async def test_token_limits_override_the_relay_defaults(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    small = "small-token-0123456789abcdef"
    big = "big-token-0123456789abcdef"
    relay = await start_relay(
        nursery,
        tmp_path,
        max_tunnels_per_token=64,
        max_visitors_per_tunnel=1,
        max_sessions_per_token=8,
        max_streams_per_token=1024,
        token_entries=(
            _entry("small", small, max_tunnels=2, max_visitors=2, max_streams=3, max_sessions=1),
            _entry("big", big, max_visitors=3),
        ),
    )
    specs = [TunnelSpec(local_port=echo)] * 3
    first = await start_client(nursery, tmp_path, relay, specs, name="small", token=small)
    assert len(first.info.tunnels) == 2  # the token's max_tunnels, not the relay's 64
    a, b = first.port(0), first.port(1)
    held = [await _held_visitor(a), await _held_visitor(a)]
    assert await _is_refused(a)  # max_visitors 2 (the relay's default is 1)
    held.append(await _held_visitor(b))
    assert await _is_refused(b)  # max_streams 3 over the token's tunnels
    for stream in held:
        await stream.aclose()
    # A second session of the token: max_sessions 1.
    second = ClientConfig(
        server_host="127.0.0.1",
        server_port=relay.info.port,
        token=small,
        fingerprint=relay.info.fingerprint,
        state_dir=tmp_path / "second",
        tunnels=(TunnelSpec(local_port=echo),),
        max_retries=0,
    )
    with trio.fail_after(20), pytest.raises(SessionClosedError, match="too many sessions"):
        await run_client(second, report=lambda _line: None)

    # Without a policy value the relay's default holds: one visitor per tunnel for TOKEN.
    plain = await start_client(nursery, tmp_path, relay, specs[:1], name="plain")
    one = await _held_visitor(plain.port())
    assert await _is_refused(plain.port())
    await one.aclose()
    # A token may also be allowed more than the default.
    other = await start_client(nursery, tmp_path, relay, specs[:1], name="big", token=big)
    three = [await _held_visitor(other.port()) for _ in range(3)]
    assert await _is_refused(other.port())
    for stream in three:
        await stream.aclose()


async def test_token_and_tunnel_visitor_rules(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    relays: list[server._Relay],
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    recorder = _Recorder()
    service = await start_service(nursery, recorder.handle)
    visitors = AddressRule(
        allow=parse_cidrs(["127.0.0.2/32", "127.0.0.3/32"], "allow"),
        deny=parse_cidrs(["127.0.0.3"], "deny"),
    )
    relay = await start_relay(
        nursery, tmp_path, token_entries=(_entry("office", OFFICE, visitors=visitors),)
    )
    (state,) = relays
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [
            TunnelSpec(local_port=service),
            # The tunnel's own rule narrows the token's: only 127.0.0.4 (which the token refuses).
            TunnelSpec(
                local_port=service,
                visitors=AddressRule(allow=parse_cidrs(["127.0.0.3", "127.0.0.4"], "allow")),
            ),
        ],
        token=OFFICE,
    )
    open_port, narrow_port = client.port(0), client.port(1)
    payload = random_bytes(30_000, 7)
    assert await _visit(open_port, payload, "127.0.0.2") == payload
    await _assert_refused(open_port, "127.0.0.3", recorder, caplog)  # token deny beats its allow
    await _assert_refused(open_port, "127.0.0.5", recorder, caplog)  # not in the token's allow list
    await _assert_refused(narrow_port, "127.0.0.2", recorder, caplog)  # the tunnel's allow list
    await _assert_refused(
        narrow_port, "127.0.0.3", recorder, caplog
    )  # the token's deny, checked first
    lines = _refusals(caplog)
    assert re.fullmatch(
        rf"visitor 127\.0\.0\.3 port \d+ refused on port {open_port} \(token office\): "
        r"in the deny list \(127\.0\.0\.3/32\)",
        lines[0],
    )
    assert re.fullmatch(
        rf"visitor 127\.0\.0\.5 port \d+ refused on port {open_port} \(token office\): "
        "not in the allow list",
        lines[1],
    )
    assert re.fullmatch(
        rf"visitor 127\.0\.0\.2 port \d+ refused on port {narrow_port} \(token office\): "
        "not in the allow list",
        lines[2],
    )
    assert "in the deny list (127.0.0.3/32)" in lines[3]
    assert len(lines) == 4
    # Counters: per tunnel, per token, per relay.
    leases = state.registry.leases
    assert leases[open_port].refused_visitors == 2
    assert leases[narrow_port].refused_visitors == 2
    assert state.usage["office"].refused_visitors == 4
    assert state.refused_visitors == {"office": 4}
    # The refused visitors cost no stream: the tunnels still carry data.
    assert await _visit(open_port, payload, "127.0.0.2") == payload
    assert len(recorder.received) == 2


async def test_ipv6_visitor_rules(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    recorder = _Recorder()
    service = await start_service(nursery, recorder.handle)
    relay = await start_relay(nursery, tmp_path, bind_host="::1")
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [
            TunnelSpec(
                local_port=service, visitors=AddressRule(allow=parse_cidrs(["::1"], "allow"))
            ),
            TunnelSpec(
                local_port=service,
                visitors=AddressRule(deny=parse_cidrs(["::1/128"], "deny")),
            ),
            TunnelSpec(
                local_port=service,
                visitors=AddressRule(allow=parse_cidrs(["127.0.0.0/8"], "allow")),
            ),
        ],
    )
    allowed, denied, v4_only = (client.port(i) for i in range(3))
    payload = random_bytes(10_000, 3)
    assert await _visit(allowed, payload, "::1", "::1") == payload
    await _assert_refused(denied, "::1", recorder, caplog, host="::1")
    await _assert_refused(v4_only, "::1", recorder, caplog, host="::1")
    lines = _refusals(caplog)
    assert re.fullmatch(
        rf"visitor ::1 port \d+ refused on port {denied} \(token \S+\): in the deny list \(::1/128\)",
        lines[0],
    )
    assert lines[1].endswith("not in the allow list")


async def test_mapped_ipv4_visitors_on_a_dual_stack_listener(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """IPv4 visitors reaching an IPv6 dual-stack socket appear as ::ffff:a.b.c.d; rules still match."""
    caplog.set_level(logging.INFO, logger="muxtunnel")

    async def dual_stack(self: PortRegistry, port: int) -> list[trio.SocketListener]:
        sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        await sock.bind(("::ffff:127.0.0.1", port))
        sock.listen(128)
        return [trio.SocketListener(sock)]

    monkeypatch.setattr(PortRegistry, "_open", dual_stack)
    recorder = _Recorder()
    service = await start_service(nursery, recorder.handle)
    relay = await start_relay(nursery, tmp_path)
    rule = AddressRule(allow=parse_cidrs(["127.0.0.2"], "allow"))
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=service, visitors=rule)]
    )
    port = client.port()
    payload = random_bytes(10_000, 4)
    assert await _visit(port, payload, "127.0.0.2") == payload
    assert recorder.received[-1] == payload
    await _assert_refused(port, "127.0.0.3", recorder, caplog)
    assert _refusals(caplog)[0].startswith("visitor ::ffff:127.0.0.3 port ")


async def _timed_echo(port: int, size: int, seed: int) -> float:
    payload = random_bytes(size, seed)
    started = trio.current_time()
    got = await _visit(port, payload)
    assert sha(got) == sha(payload)
    return trio.current_time() - started


MIB = 1024 * 1024


async def test_token_bandwidth_limits_a_real_transfer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    slow = "slow-token-0123456789abcdef"
    rate = 256 * 1024
    relay = await start_relay(
        nursery, tmp_path, token_entries=(_entry("slow", slow, bandwidth=rate),)
    )
    limited = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=echo)], name="slow", token=slow
    )
    free = await start_client(nursery, tmp_path, relay, [TunnelSpec(local_port=echo)])
    times: dict[str, float] = {}

    async def run(name: str, port: int) -> None:
        times[name] = await _timed_echo(port, 3 * MIB // 2, 1)

    async with trio.open_nursery() as both:
        both.start_soon(run, "limited", limited.port())
        both.start_soon(run, "free", free.port())
    # 1.5 MiB each way at 256 KiB/s, one second of burst and a chunk in flight: at least 4 s.
    assert times["limited"] >= 2.5, times
    # The unlimited token on the same relay, at the same time, is not slowed down.
    assert times["free"] < 2.5, times


async def test_tunnel_bandwidth_is_per_tunnel(nursery: trio.Nursery, tmp_path: Path) -> None:
    echo = await start_echo(nursery)
    rate = 256 * 1024
    relay = await start_relay(
        nursery, tmp_path, token_entries=(_entry("office", OFFICE, tunnel_bandwidth=rate),)
    )
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [TunnelSpec(local_port=echo), TunnelSpec(local_port=echo)],
        token=OFFICE,
    )
    times: list[float] = []

    async def run(port: int, seed: int) -> None:
        times.append(await _timed_echo(port, 3 * MIB // 2, seed))

    async with trio.open_nursery() as both:
        both.start_soon(run, client.port(0), 1)
        both.start_soon(run, client.port(1), 2)
    # Each tunnel is limited on its own (neither waits for the other's bucket)...
    assert all(t >= 2.5 for t in times), times
    # ... not by one shared bucket: 3 MiB through one 256 KiB/s bucket would take over 9 s.
    assert max(times) < 8.0, times
