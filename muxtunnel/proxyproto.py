"""The PROXY protocol, versions 1 and 2 (HAProxy's "The PROXY protocol, versions 1 & 2").

A tunnel with ``proxy_protocol = "v1"`` or ``"v2"`` makes the client send one header to the
local service before any byte of the visitor, so the service learns the visitor's real address
(the stream's OPEN origin) and the relay's public address (the OPEN target) instead of the
client's loopback connection. Pure functions, no I/O.

Encoding rules:

- IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``, what a dual-stack listener reports for an
  IPv4 peer) are sent as IPv4; a scope (``fe80::1%eth0``) is dropped.
- If the two addresses have different families, the IPv4 one is mapped to ``::ffff:a.b.c.d``
  and the header is TCP over IPv6.
- An origin that is not an IP address (unknown) gives ``PROXY UNKNOWN`` (v1) or a LOCAL
  command with no address block (v2): the service then uses the connection's own addresses.
  A target that is not an IP address is sent as the unspecified address of the origin's family,
  port 0, so the visitor's address still gets through.

:func:`parse_header` is a strict parser of both versions (it reads what :func:`encode`
writes, and anything else the specification allows, including v2 TLVs).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import TypeAlias

from muxtunnel.protocol.frames import Address

__all__ = [
    "MAX_V1_LENGTH",
    "V2_SIGNATURE",
    "VERSIONS",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode",
    "encode_v1",
    "encode_v2",
    "parse_header",
]

_IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The values of ``--proxy-protocol`` / ``proxy_protocol``.
VERSIONS = ("v1", "v2")
#: The 12 bytes every version 2 header starts with.
V2_SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
#: Longest version 1 header, CRLF included (the specification's worst case, TCP6).
MAX_V1_LENGTH = 107

_V1_PREFIX = b"PROXY "
_V2_VERSION = 0x20
_V2_LOCAL = 0x00
_V2_PROXY = 0x01
# Address family (high nibble) and transport (low nibble) of the v2 "fam" byte.
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_T_UNSPEC, _T_STREAM, _T_DGRAM = 0, 1, 2
_V2_TCP4 = (_AF_INET << 4) | _T_STREAM  # 0x11
_V2_TCP6 = (_AF_INET6 << 4) | _T_STREAM  # 0x21
# Length of the address block per address family.
_V2_ADDRESS_LENGTH = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_V2_HEAD = struct.Struct("!12sBBH")
_TLV_HEAD = struct.Struct("!BH")
_FAMILIES = {
    _AF_UNSPEC: socket.AF_UNSPEC,
    _AF_INET: socket.AF_INET,
    _AF_INET6: socket.AF_INET6,
    _AF_UNIX: socket.AF_UNIX,
}
_TRANSPORTS = {_T_UNSPEC: 0, _T_STREAM: socket.SOCK_STREAM, _T_DGRAM: socket.SOCK_DGRAM}


class ProxyProtocolError(ValueError):
    """Bytes that are not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY protocol header."""

    #: 1 or 2.
    version: int
    #: False for a proxied connection; True for a v2 LOCAL command (the sender's own
    #: connection, e.g. a health check): addresses are then None.
    local: bool
    #: ``socket.AF_INET`` / ``AF_INET6`` for an IP header; ``AF_UNSPEC`` for v1 UNKNOWN or a v2
    #: UNSPEC family; ``AF_UNIX`` for a v2 UNIX header (its paths are not decoded).
    family: int
    #: ``socket.SOCK_STREAM`` (v1 TCP4/TCP6, v2 STREAM), ``socket.SOCK_DGRAM`` (v2) or 0.
    transport: int
    #: The original client (the visitor); None when the header carries no IP address.
    source: Address | None
    #: The address the original client connected to; None like ``source``.
    destination: Address | None
    #: v2 type-length-value extensions after the addresses, in order.
    tlvs: tuple[tuple[int, bytes], ...]
    #: Bytes the header took: the service's data starts at this offset.
    length: int


# --------------------------------------------------------------------------------------------
# Encoding


def _ip_of(address: Address) -> _IP | None:
    if address.host is None:
        return None
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _endpoints(origin: Address, target: Address) -> tuple[_IP, _IP] | None:
    """The two addresses in one family, or None if the origin is not an IP address."""
    src = _ip_of(origin)
    if src is None:
        return None
    dst = _ip_of(target)
    if dst is None:
        dst = ipaddress.IPv4Address(0) if src.version == 4 else ipaddress.IPv6Address(0)
    if src.version != dst.version:
        if isinstance(src, ipaddress.IPv4Address):
            src = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + src.packed)
        else:
            dst = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + dst.packed)
    return src, dst


def _text(ip: _IP) -> str:
    """``ip`` as text; an IPv4-mapped IPv6 address as ``::ffff:a.b.c.d``."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _target_port(target: Address) -> int:
    return target.port if _ip_of(target) is not None else 0


def encode_v1(origin: Address, target: Address) -> bytes:
    """The version 1 (text) header for a visitor at ``origin`` connected to ``target``."""
    endpoints = _endpoints(origin, target)
    if endpoints is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = endpoints
    proto = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {proto} {_text(src)} {_text(dst)} {origin.port} {_target_port(target)}\r\n"
    return line.encode("ascii")


def encode_v2(origin: Address, target: Address) -> bytes:
    """The version 2 (binary) header for a visitor at ``origin`` connected to ``target``."""
    endpoints = _endpoints(origin, target)
    if endpoints is None:
        return _V2_HEAD.pack(V2_SIGNATURE, _V2_VERSION | _V2_LOCAL, 0, 0)
    src, dst = endpoints
    block = src.packed + dst.packed + struct.pack("!HH", origin.port, _target_port(target))
    fam = _V2_TCP4 if src.version == 4 else _V2_TCP6
    return _V2_HEAD.pack(V2_SIGNATURE, _V2_VERSION | _V2_PROXY, fam, len(block)) + block


def encode(version: str, origin: Address, target: Address) -> bytes:
    """The header of ``version`` (``"v1"`` or ``"v2"``).

    Raises:
        ValueError: Unknown version.
    """
    if version == "v1":
        return encode_v1(origin, target)
    if version == "v2":
        return encode_v2(origin, target)
    raise ValueError(f"unknown PROXY protocol version {version!r} (expected v1 or v2)")


# --------------------------------------------------------------------------------------------
# Parsing


def parse_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Parse the PROXY header at the start of ``data``.

    Returns None while ``data`` is a valid but incomplete beginning of a header (read more and
    call again); the service's own bytes start at ``header.length``.

    Raises:
        ProxyProtocolError: ``data`` does not start with a valid header.
    """
    data = bytes(data[: 16 + 65535])  # the longest possible v2 header
    if not data:
        return None
    if data[:12] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data)
    if data[:6] == _V1_PREFIX[: len(data)]:
        return _parse_v1(data)
    raise ProxyProtocolError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    line = data[:end] if end >= 0 else data[:MAX_V1_LENGTH].removesuffix(b"\r")
    if any(b < 0x20 or b > 0x7E for b in line):
        raise ProxyProtocolError("v1 header: a byte that is not printable ASCII")
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"v1 header: no CRLF within {MAX_V1_LENGTH} bytes")
        return None
    parts = line.decode("ascii").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # The rest of the line, if any, is ignored (the specification allows anything there).
        return ProxyHeader(1, False, socket.AF_UNSPEC, 0, None, None, (), end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(
            "v1 header: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT or PROXY UNKNOWN"
        )
    kind: type[_IP] = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    src, dst = (_v1_address(text, kind, parts[1]) for text in parts[2:4])
    sport, dport = (_v1_port(text) for text in parts[4:6])
    family = socket.AF_INET if parts[1] == "TCP4" else socket.AF_INET6
    return ProxyHeader(
        1,
        False,
        family,
        socket.SOCK_STREAM,
        Address(str(src), sport),
        Address(str(dst), dport),
        (),
        end + 2,
    )


def _v1_address(text: str, kind: type[_IP], proto: str) -> _IP:
    try:
        if "%" in text:
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 header: {text!r} is not a valid {proto} address") from None


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1 header: invalid port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 header: port {port} out of range")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_HEAD.size:
        return None
    _, ver_cmd, fam, length = _V2_HEAD.unpack_from(data)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header: version {ver_cmd >> 4}, expected 2")
    command = ver_cmd & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"v2 header: unknown command {command:#x}")
    total = _V2_HEAD.size + length
    if len(data) < total:
        return None
    block = data[_V2_HEAD.size : total]
    if command == _V2_LOCAL:
        # The receiver uses the connection's own addresses and ignores the block (spec §2.2).
        return ProxyHeader(2, True, socket.AF_UNSPEC, 0, None, None, (), total)
    af, transport = fam >> 4, fam & 0x0F
    if af not in _V2_ADDRESS_LENGTH or transport not in _TRANSPORTS:
        raise ProxyProtocolError(f"v2 header: unknown address family/transport {fam:#04x}")
    need = _V2_ADDRESS_LENGTH[af]
    if len(block) < need:
        raise ProxyProtocolError(
            f"v2 header: {len(block)} bytes after the header, family {fam:#04x} needs {need}"
        )
    source: Address | None = None
    destination: Address | None = None
    if af in (_AF_INET, _AF_INET6):
        size = 4 if af == _AF_INET else 16
        kind: type[_IP] = ipaddress.IPv4Address if af == _AF_INET else ipaddress.IPv6Address
        src, dst = kind(block[:size]), kind(block[size : 2 * size])
        sport, dport = struct.unpack_from("!HH", block, 2 * size)
        source, destination = Address(str(src), sport), Address(str(dst), dport)
    return ProxyHeader(
        2,
        False,
        _FAMILIES[af],
        _TRANSPORTS[transport],
        source,
        destination,
        _parse_tlvs(block[need:]),
        total,
    )


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _TLV_HEAD.size:
            raise ProxyProtocolError("v2 header: truncated TLV")
        kind, size = _TLV_HEAD.unpack_from(data, offset)
        offset += _TLV_HEAD.size
        if len(data) - offset < size:
            raise ProxyProtocolError(f"v2 header: TLV {kind:#04x} longer than the header")
        tlvs.append((kind, data[offset : offset + size]))
        offset += size
    return tuple(tlvs)
