"""Access rules: visitor address lists and the relay's per-token policy.

Pure data and checks, no I/O. An :class:`AddressRule` decides which visitor addresses may
reach a tunnel (a deny list, then an allow list); a :class:`TokenPolicy` holds what one named
token may do on the relay (ports, limits, bandwidth, visitor rules, private tunnels); a
:class:`TokenEntry` is one token the relay accepts: its name, its stored key (the token itself
is not needed, protocol-spec.md §7.1) and its policy.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass, field
from typing import TypeAlias

from muxtunnel.errors import ConfigError

__all__ = [
    "AddressRule",
    "IPNetwork",
    "TokenEntry",
    "TokenPolicy",
    "clip_ports",
    "format_ports",
    "parse_cidr",
    "parse_cidrs",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: At most this many entries in one allow or deny list (a BIND carries them, protocol-spec.md §6.12).
MAX_RULES = 64


def parse_cidr(text: str, what: str = "address") -> IPNetwork:
    """Parse ``10.0.0.0/8``, ``2001:db8::/32`` or a single address (``192.0.2.7``, ``::1``).

    Raises:
        ConfigError: Not an address or network; host bits set (``10.0.0.1/8``).
    """
    value = text.strip()
    if value.startswith("[") and "]" in value:  # [::1] or [2001:db8::]/32
        value = value[1:].replace("]", "", 1)
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            network = ipaddress.ip_network(value, strict=False)
            raise ConfigError(f"{what} {text!r}: host bits set; did you mean {network}?") from None
        raise ConfigError(
            f"{what} {text!r}: expected an IPv4 or IPv6 address or network in CIDR form "
            "(203.0.113.0/24, 2001:db8::/32, 192.0.2.7)"
        ) from None


def parse_cidrs(values: object, what: str) -> tuple[IPNetwork, ...]:
    """Parse a list of CIDR strings (a single string is one entry); duplicates are dropped."""
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{what}: expected a list of addresses or networks, got {values!r}")
    out: dict[IPNetwork, None] = {}
    for value in values:
        if not isinstance(value, str):
            raise ConfigError(f"{what}: expected an address or network string, got {value!r}")
        out[parse_cidr(value, what)] = None
    if len(out) > MAX_RULES:
        raise ConfigError(f"{what}: at most {MAX_RULES} entries, got {len(out)}")
    return tuple(out)


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if host is None:
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener reports IPv4 visitors as ::ffff:a.b.c.d
    return ip


@dataclass(frozen=True, slots=True)
class AddressRule:
    """Which visitor addresses may connect: not in ``deny``, and in ``allow`` if it is not empty."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()

    @property
    def empty(self) -> bool:
        """True if the rule lets every address through."""
        return not self.allow and not self.deny

    def refusal(self, host: str | None) -> str | None:
        """Why a visitor from ``host`` is refused (``in the deny list 10.0.0.0/8``), or None.

        An address that is unknown or not an IP literal matches no network: it is refused when
        there is an allow list.
        """
        if not self.deny and not self.allow:
            return None  # no rules (the usual case): nothing to parse
        ip = _ip(host)
        if ip is not None:
            for net in self.deny:
                if ip.version == net.version and ip in net:
                    return f"in the deny list ({net})"
        if self.allow and (
            ip is None or not any(ip.version == n.version and ip in n for n in self.allow)
        ):
            return "not in the allow list"
        return None


def format_ports(ranges: tuple[tuple[int, int], ...]) -> str:
    """``2200-2299, 3000`` for ``((2200, 2299), (3000, 3000))``."""
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def clip_ports(
    ranges: tuple[tuple[int, int], ...] | None, lo: int, hi: int
) -> tuple[tuple[int, int], ...]:
    """The parts of ``ranges`` inside ``lo``-``hi``, sorted and merged (None: all of it)."""
    if ranges is None:
        return ((lo, hi),) if lo <= hi else ()
    out: list[tuple[int, int]] = []
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in ranges):
        if a > b:
            continue
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What one token may do on the relay; None means "the relay's default"."""

    #: Inclusive port ranges the token may bind; None: the relay's whole range.
    ports: tuple[tuple[int, int], ...] | None = None
    #: Tunnels over all the token's sessions (``--max-tunnels-per-token``).
    max_tunnels: int | None = None
    #: Concurrent streams over all its sessions (``--max-streams-per-token``).
    max_streams: int | None = None
    #: Concurrent sessions (``--max-sessions-per-token``).
    max_sessions: int | None = None
    #: Concurrent visitors per tunnel (``--max-visitors-per-tunnel``).
    max_visitors: int | None = None
    #: Bytes per second over all the token's streams, each direction; None: unlimited.
    bandwidth: int | None = None
    #: Bytes per second per tunnel, each direction; None: unlimited.
    tunnel_bandwidth: int | None = None
    #: Visitor addresses the relay lets through to every tunnel of the token.
    visitors: AddressRule = field(default_factory=AddressRule)
    #: Names (glob patterns) under which the token may publish private tunnels.
    publish: tuple[str, ...] = ("*",)
    #: Names (glob patterns) of other tokens' private tunnels the token may visit; a token may
    #: always visit the private tunnels published with the same token.
    visit: tuple[str, ...] = ()

    def port_allowed(self, port: int) -> bool:
        """True if the token may bind ``port`` (0, "relay picks", is always allowed)."""
        if port == 0 or self.ports is None:
            return True
        return any(lo <= port <= hi for lo, hi in self.ports)

    def ports_text(self) -> str:
        """The ports the token may bind, for messages (``2200-2299, 3000``; ``any``)."""
        return "any" if self.ports is None else format_ports(self.ports)

    def may_publish(self, name: str) -> bool:
        """True if the token may publish a private tunnel called ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.publish)

    def may_visit(self, name: str) -> bool:
        """True if the token may visit another token's private tunnel called ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.visit)


#: A policy with no restriction beyond the relay's own limits.
OPEN_POLICY = TokenPolicy()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One token the relay accepts."""

    #: Unique name, used in logs, status and metrics.
    name: str
    #: The stored key of protocol-spec.md §7.1 (32 bytes); enough to check a client, not to
    #: act as one.
    stored_key: bytes
    policy: TokenPolicy = OPEN_POLICY
    #: The token itself when it is configured in clear (``--token``, a one-per-line file):
    #: clients using the older HMAC method (protocol-spec.md §7.1, method 1) are then accepted too.
    secret: str | None = field(default=None, repr=False)
