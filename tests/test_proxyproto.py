"""PROXY protocol v1/v2 encoding and parsing (muxtunnel.proxyproto).

Expected bytes are written out by hand from HAProxy's "The PROXY protocol, versions 1 & 2"
(v1: section 2.1, v2: section 2.2), not produced by the encoder under test.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel.client import _ProxyHeaderPolicy
from muxtunnel.config import TunnelSpec
from muxtunnel.policy import Direction, StreamInfo, StreamPolicy
from muxtunnel.protocol.frames import Address
from muxtunnel.proxyproto import (
    MAX_V1_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode,
    encode_v1,
    encode_v2,
    parse_header,
)
from tests.conftest import (
    echo_roundtrip,
    random_bytes,
    sha,
    start_client,
    start_relay,
    start_service,
)

if TYPE_CHECKING:
    from pathlib import Path

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

V4_ORIGIN = Address("192.0.2.7", 56324)
V4_TARGET = Address("203.0.113.9", 443)
V6_ORIGIN = Address("2001:db8::7", 40000)
V6_TARGET = Address("2001:db8:1::9", 8443)

V1_IPV4 = b"PROXY TCP4 192.0.2.7 203.0.113.9 56324 443\r\n"
V2_IPV4 = (
    SIG
    + b"\x21"  # version 2, command PROXY
    + b"\x11"  # AF_INET, STREAM
    + b"\x00\x0c"  # 12 address bytes follow
    + b"\xc0\x00\x02\x07"  # 192.0.2.7
    + b"\xcb\x00\x71\x09"  # 203.0.113.9
    + b"\xdc\x04"  # 56324
    + b"\x01\xbb"  # 443
)
V1_IPV6 = b"PROXY TCP6 2001:db8::7 2001:db8:1::9 40000 8443\r\n"
V2_IPV6 = (
    SIG
    + b"\x21"  # version 2, command PROXY
    + b"\x21"  # AF_INET6, STREAM
    + b"\x00\x24"  # 36 address bytes follow
    + b"\x20\x01\x0d\xb8"
    + b"\x00" * 11
    + b"\x07"  # 2001:db8::7
    + b"\x20\x01\x0d\xb8\x00\x01"
    + b"\x00" * 9
    + b"\x09"  # 2001:db8:1::9
    + b"\x9c\x40"  # 40000
    + b"\x20\xfb"  # 8443
)
V2_LOCAL = SIG + b"\x20\x00\x00\x00"


def test_signature_constant() -> None:
    assert V2_SIGNATURE == SIG
    assert bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]) == SIG


@pytest.mark.parametrize(
    ("version", "origin", "target", "expected"),
    [
        ("v1", V4_ORIGIN, V4_TARGET, V1_IPV4),
        ("v2", V4_ORIGIN, V4_TARGET, V2_IPV4),
        ("v1", V6_ORIGIN, V6_TARGET, V1_IPV6),
        ("v2", V6_ORIGIN, V6_TARGET, V2_IPV6),
    ],
)
def test_encode_byte_for_byte(
    version: str, origin: Address, target: Address, expected: bytes
) -> None:
    assert encode(version, origin, target) == expected
    assert (encode_v1 if version == "v1" else encode_v2)(origin, target) == expected


def test_ipv4_mapped_addresses_are_sent_as_ipv4() -> None:
    origin = Address("::ffff:192.0.2.7", 56324)
    target = Address("::ffff:203.0.113.9", 443)
    assert encode_v1(origin, target) == V1_IPV4
    assert encode_v2(origin, target) == V2_IPV4


def test_mixed_families_map_ipv4_into_ipv6() -> None:
    origin = Address("192.0.2.7", 1)
    target = Address("2001:db8::1", 2)
    assert encode_v1(origin, target) == b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 2\r\n"
    assert encode_v2(origin, target) == (
        SIG
        + b"\x21\x21\x00\x24"
        + b"\x00" * 10
        + b"\xff\xff\xc0\x00\x02\x07"
        + b"\x20\x01\x0d\xb8"
        + b"\x00" * 11
        + b"\x01"
        + b"\x00\x01\x00\x02"
    )
    # The other way round: an IPv6 visitor reaching an IPv4 (or IPv4-mapped) public address.
    assert (
        encode_v1(Address("2001:db8::1", 2), Address("::ffff:192.0.2.7", 1))
        == b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.7 2 1\r\n"
    )


def test_scope_is_dropped() -> None:
    assert (
        encode_v1(Address("fe80::1%eth0", 10), Address("fe80::2", 20))
        == b"PROXY TCP6 fe80::1 fe80::2 10 20\r\n"
    )


@pytest.mark.parametrize("origin", [Address(None, 0), Address("visitor.example", 5)])
def test_unknown_origin(origin: Address) -> None:
    assert encode_v1(origin, V4_TARGET) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(origin, V4_TARGET) == V2_LOCAL


def test_unknown_target_keeps_the_origin() -> None:
    target = Address("relay.example", 0)
    assert encode_v1(V4_ORIGIN, target) == b"PROXY TCP4 192.0.2.7 0.0.0.0 56324 0\r\n"
    assert encode_v1(V6_ORIGIN, Address(None, 0)) == b"PROXY TCP6 2001:db8::7 :: 40000 0\r\n"
    assert encode_v2(V4_ORIGIN, Address("relay.example", 9)) == (
        SIG + b"\x21\x11\x00\x0c\xc0\x00\x02\x07\x00\x00\x00\x00\xdc\x04\x00\x00"
    )


def test_encode_unknown_version() -> None:
    with pytest.raises(ValueError, match="unknown PROXY protocol version 'v3'"):
        encode("v3", V4_ORIGIN, V4_TARGET)


def test_v1_longest_headers() -> None:
    ffff = "ffff:" * 7 + "ffff"
    header = encode_v1(Address(ffff, 65535), Address(ffff, 65535))
    assert len(header) == 104
    # The specification's worst case is exactly the limit, and one byte more is refused.
    worst = f"PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n".encode()
    assert len(worst) == MAX_V1_LENGTH
    parsed = parse_header(worst)
    assert parsed is not None
    assert parsed.length == MAX_V1_LENGTH
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107 bytes"):
        parse_header(worst[:-2] + b"5\r\n")


# --------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("data", "version", "family", "source", "destination"),
    [
        (V1_IPV4, 1, socket.AF_INET, V4_ORIGIN, V4_TARGET),
        (V2_IPV4, 2, socket.AF_INET, V4_ORIGIN, V4_TARGET),
        (V1_IPV6, 1, socket.AF_INET6, V6_ORIGIN, V6_TARGET),
        (V2_IPV6, 2, socket.AF_INET6, V6_ORIGIN, V6_TARGET),
    ],
)
def test_parse_known_headers(
    data: bytes, version: int, family: int, source: Address, destination: Address
) -> None:
    parsed = parse_header(data + b"SSH-2.0-x\r\n")
    assert parsed == ProxyHeader(
        version=version,
        local=False,
        family=family,
        transport=socket.SOCK_STREAM,
        source=source,
        destination=destination,
        tlvs=(),
        length=len(data),
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    ("origin", "target", "family", "hosts"),
    [
        (
            Address("127.0.0.2", 40001),
            Address("127.0.0.1", 20000),
            socket.AF_INET,
            ("127.0.0.2", "127.0.0.1"),
        ),
        (Address("::1", 1), Address("::1", 65535), socket.AF_INET6, ("::1", "::1")),
        (
            Address("10.1.2.3", 0),
            Address("2001:db8::5", 80),
            socket.AF_INET6,
            ("::ffff:a01:203", "2001:db8::5"),
        ),
    ],
)
def test_round_trip(
    version: str, origin: Address, target: Address, family: int, hosts: tuple[str, str]
) -> None:
    header = encode(version, origin, target)
    parsed = parse_header(header + b"payload")
    assert parsed is not None
    assert parsed.version == int(version[1])
    assert parsed.length == len(header)
    assert parsed.family == family
    assert parsed.source == Address(hosts[0], origin.port)
    assert parsed.destination == Address(hosts[1], target.port)


def test_parse_unknown_and_local() -> None:
    for data in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n"):
        parsed = parse_header(data + b"x")
        assert parsed == ProxyHeader(1, False, socket.AF_UNSPEC, 0, None, None, (), len(data))
    assert parse_header(V2_LOCAL) == ProxyHeader(2, True, socket.AF_UNSPEC, 0, None, None, (), 16)
    # LOCAL ignores whatever block it carries.
    local_with_block = SIG + b"\x20\x11\x00\x03abc"
    assert parse_header(local_with_block) == ProxyHeader(
        2, True, socket.AF_UNSPEC, 0, None, None, (), 19
    )


def test_parse_v2_tlvs_and_other_families() -> None:
    tlvs = b"\x04\x00\x00" + b"\x02\x00\x05relay"  # NOOP (empty), AUTHORITY "relay"
    data = SIG + b"\x21\x11" + (12 + len(tlvs)).to_bytes(2, "big") + V2_IPV4[16:] + tlvs
    parsed = parse_header(data)
    assert parsed is not None
    assert parsed.tlvs == ((0x04, b""), (0x02, b"relay"))
    assert parsed.source == V4_ORIGIN
    assert parsed.length == len(data)
    udp = parse_header(SIG + b"\x21\x12\x00\x0c" + V2_IPV4[16:])
    assert udp is not None
    assert udp.transport == socket.SOCK_DGRAM
    unspec = parse_header(SIG + b"\x21\x00\x00\x00")
    assert unspec == ProxyHeader(2, False, socket.AF_UNSPEC, 0, None, None, (), 16)
    unix = parse_header(SIG + b"\x21\x31\x00\xd8" + b"\x00" * 216)
    assert unix is not None
    assert (unix.family, unix.source, unix.length) == (socket.AF_UNIX, None, 232)


@pytest.mark.parametrize("data", [V1_IPV4, V2_IPV4, V1_IPV6, V2_IPV6, V2_LOCAL])
def test_incomplete_header_asks_for_more(data: bytes) -> None:
    for cut in range(len(data)):
        assert parse_header(data[:cut]) is None, cut
    assert parse_header(data) is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x00", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n", "not printable ASCII"),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "not printable ASCII"),
        (b"PROXY TCP4 " + b"1" * 100, "no CRLF within 107 bytes"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected PROXY TCP4|TCP6"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "expected PROXY TCP4|TCP6"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "expected PROXY TCP4|TCP6"),
        (b"PROXY UNKNOWNX\r\n", "expected PROXY TCP4|TCP6"),
        (b"PROXY \r\n", "expected PROXY TCP4|TCP6"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "'::1' is not a valid TCP4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "'1.2.3.4' is not a valid TCP6 address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "is not a valid TCP4 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "is not a valid TCP6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "invalid port '01'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "invalid port '-2'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port 65536 out of range"),
        (SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1, expected 2"),
        (SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12, "unknown command 0x2"),
        (SIG + b"\x21\x41\x00\x0c" + b"\x00" * 12, "unknown address family/transport 0x41"),
        (SIG + b"\x21\x13\x00\x0c" + b"\x00" * 12, "unknown address family/transport 0x13"),
        (SIG + b"\x21\x11\x00\x0b" + b"\x00" * 11, "11 bytes after the header"),
        (SIG + b"\x21\x21\x00\x0c" + b"\x00" * 12, "family 0x21 needs 36"),
        (SIG + b"\x21\x11\x00\x0e" + b"\x00" * 14, "truncated TLV"),
        (SIG + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x01\x00\x02x", "TLV 0x01 longer"),
    ],
)
def test_parse_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_header(data)


def test_parse_accepts_memoryview() -> None:
    parsed = parse_header(memoryview(V2_IPV4))
    assert parsed is not None
    assert parsed.source == V4_ORIGIN


# --------------------------------------------------------------------------------------------
# Through a real relay and client: the local service reads the header the client sent

BANNER = b"220 service ready\r\n"


async def _read_header(stream: trio.SocketStream) -> tuple[ProxyHeader, bytes]:
    """Read until a complete PROXY header; return it and the bytes after it."""
    buf = b""
    while True:
        header = parse_header(buf)
        if header is not None:
            return header, buf[header.length :]
        chunk = await stream.receive_some(4096)
        assert chunk, f"EOF before a complete PROXY header (got {buf!r})"
        buf += chunk


async def _start_proxy_service(
    nursery: trio.Nursery,
) -> tuple[int, trio.MemoryReceiveChannel[tuple[ProxyHeader, bytes]]]:
    """A service that speaks first: it reads the PROXY header, sends :data:`BANNER`, then
    echoes what it receives until EOF and reports (header, received bytes)."""
    send, receive = trio.open_memory_channel[tuple[ProxyHeader, bytes]](16)

    async def handler(stream: trio.SocketStream) -> None:
        header, data = await _read_header(stream)
        await stream.send_all(BANNER)
        received = bytearray(data)
        while chunk := await stream.receive_some(65536):
            received += chunk
        await stream.send_all(bytes(received))
        await stream.send_eof()
        await send.send((header, bytes(received)))

    return await start_service(nursery, handler), receive


async def _visit(
    source: str, host: str, port: int, payload: bytes, *, banner: bytes = BANNER
) -> tuple[int, bytes]:
    """Connect from ``source`` to ``host:port``; wait for ``banner`` before sending anything
    (a server-speaks-first protocol), send ``payload``, half-close, read to EOF.

    Returns the visitor's own port and what it read after the banner.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect((host, port))
    visitor_port = sock.getsockname()[1]
    async with trio.SocketStream(sock) as stream:
        got = b""
        while len(got) < len(banner):
            chunk = await stream.receive_some(len(banner) - len(got))
            assert chunk, f"EOF before the banner (got {got!r})"
            got += chunk
        assert got == banner
        await stream.send_all(payload)
        await stream.send_eof()
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
    return visitor_port, bytes(received)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.3"])
async def test_client_sends_the_visitors_address_first(
    nursery: trio.Nursery, tmp_path: Path, version: str, source: str
) -> None:
    port, seen = await _start_proxy_service(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=port, proxy_protocol=version)]
    )
    public = client.port()
    assert client.lines == [
        f"forwarding tcp://127.0.0.1:{public} -> 127.0.0.1:{port} (PROXY protocol {version})"
    ]
    payload = random_bytes(300_000, seed=7)
    with trio.fail_after(30):
        visitor_port, echoed = await _visit(source, "127.0.0.1", public, payload)
        header, received = await seen.receive()
    assert header.version == int(version[1])
    assert header.family == socket.AF_INET
    assert header.source == Address(source, visitor_port)
    assert header.destination == Address("127.0.0.1", public)
    assert sha(received) == sha(payload)
    assert sha(echoed) == sha(payload)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_ipv6_visitor(nursery: trio.Nursery, tmp_path: Path, version: str) -> None:
    port, seen = await _start_proxy_service(nursery)
    relay = await start_relay(nursery, tmp_path, bind_host="::1")
    client = await start_client(
        nursery, tmp_path, relay, [TunnelSpec(local_port=port, proxy_protocol=version)]
    )
    with trio.fail_after(30):
        visitor_port, echoed = await _visit("::1", "::1", client.port(), b"over IPv6")
        header, received = await seen.receive()
    assert header.family == socket.AF_INET6
    assert header.source == Address("::1", visitor_port)
    assert header.destination == Address("::1", client.port())
    assert received == echoed == b"over IPv6"


async def test_only_tunnels_that_ask_get_a_header(
    nursery: trio.Nursery, tmp_path: Path, echo_port: int
) -> None:
    port, seen = await _start_proxy_service(nursery)
    relay = await start_relay(nursery, tmp_path)
    client = await start_client(
        nursery,
        tmp_path,
        relay,
        [TunnelSpec(local_port=port, proxy_protocol="v2"), TunnelSpec(local_port=echo_port)],
    )
    assert (
        client.lines[1] == f"forwarding tcp://127.0.0.1:{client.port(1)} -> 127.0.0.1:{echo_port}"
    )
    with trio.fail_after(30):
        # The plain tunnel: the echo service gets the visitor's bytes and nothing else.
        assert await echo_roundtrip(client.port(1), b"plain bytes") == b"plain bytes"
        _, echoed = await _visit("127.0.0.2", "127.0.0.1", client.port(0), b"proxied")
        header, received = await seen.receive()
    assert header.source is not None
    assert header.source.host == "127.0.0.2"
    assert received == echoed == b"proxied"


class _LabelPolicy(StreamPolicy):
    """A user policy with its own prologue, to check that the header wraps it."""

    def __init__(self) -> None:
        self.finished_streams: list[int] = []

    def prologue(self, info: StreamInfo) -> bytes:
        return b"user-prologue;"

    def finished(self, info: StreamInfo, now: float, error: str | None) -> None:
        self.finished_streams.append(info.tunnel_id)


async def test_header_policy_delegates_to_the_users_policy() -> None:
    inner = _LabelPolicy()
    specs = {1: TunnelSpec(local_port=1, proxy_protocol="v1"), 2: TunnelSpec(local_port=2)}
    policy = _ProxyHeaderPolicy(inner, specs.get)
    info = StreamInfo(
        stream_id=2,
        tunnel_id=1,
        origin=Address("127.0.0.2", 5000),
        target=Address("127.0.0.1", 20000),
        started=0.0,
    )
    assert policy.prologue(info) == b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 20000\r\nuser-prologue;"
    info.tunnel_id = 2
    assert policy.prologue(info) == b"user-prologue;"
    info.tunnel_id = 3  # not up (any more): no header
    assert policy.prologue(info) == b"user-prologue;"
    assert policy.admit(info) is None
    await policy.throttle(info, Direction.IN, 10)
    policy.finished(info, 1.0, None)
    assert inner.finished_streams == [3]
