"""Configuration: tunnel specs, server and client settings, TOML files and flag merging.

The command line and the TOML file use the same option names (``listen``, ``state-dir``,
``max-retries`` ...; dashes and underscores are interchangeable in the file). Values are
merged in this order, later wins: built-in defaults, the config file, ``MUXTUNNEL_TOKEN``
(tokens only), command-line flags. Every invalid key or value raises
:class:`~muxtunnel.errors.ConfigError` whose message names the key and where it came from.

This module does no network I/O; it reads the config file and token files only.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from muxtunnel.access import AddressRule, TokenEntry, parse_cidrs
from muxtunnel.errors import ConfigError
from muxtunnel.protocol.constants import MAX_CONNECTIONS, MAX_RESUME_WINDOW
from muxtunnel.tls import normalize_fingerprint
from muxtunnel.tokens import plaintext_entry, read_token_file
from muxtunnel.tokenstore import is_named_token_file, load_token_file

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_PORT",
    "MAX_RESUME_WINDOW",
    "ClientConfig",
    "ServerConfig",
    "TunnelSpec",
    "VisitConfig",
    "as_connection_count",
    "as_resume_window",
    "as_tunnel_name",
    "build_client_config",
    "build_server_config",
    "build_visit_config",
    "default_state_dir",
    "format_host_port",
    "load_toml",
    "parse_host_port",
    "parse_port_range",
]

#: Default TCP port of the relay's TLS control listener.
DEFAULT_PORT = 7835
#: Environment variable holding the token when no ``--token`` is given.
TOKEN_ENV = "MUXTUNNEL_TOKEN"

_T = TypeVar("_T")

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)
_SPEC_RE = re.compile(
    r"^(?:(?P<remote>\d+):)?(?:(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]+)):)?(?P<local>\d+)$"
)


def default_state_dir() -> Path:
    """Return ``$XDG_STATE_HOME/muxtunnel``, or ``~/.local/state/muxtunnel`` without it."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says relative paths in these variables are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "muxtunnel"
    return Path.home() / ".local" / "state" / "muxtunnel"


def _check_host(host: str, what: str) -> str:
    """Validate a host name or IP literal (IPv6 without brackets); return it normalized."""
    if not host:
        raise ConfigError(f"{what}: empty host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host.isdigit() or not _HOSTNAME_RE.match(host):
        raise ConfigError(f"{what}: invalid host {host!r}")
    return host.lower()


def _check_port(text: str, what: str, *, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ConfigError(f"{what}: invalid port {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{what}: port {port} out of range {low}-65535")
    return port


def format_host_port(host: str, port: int) -> str:
    """Return ``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(
    text: str, what: str, *, default_port: int | None = None, allow_zero: bool = False
) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` (or a bare host when ``default_port`` is given).

    Args:
        text: The text to parse.
        what: Names the key or option in error messages.
        default_port: Port used when ``text`` has none; ``None`` makes the port mandatory.
        allow_zero: Accept port 0 (listen on an ephemeral port).

    Returns:
        ``(host, port)``, the host without brackets.

    Raises:
        ConfigError: The text is not a valid address.
    """
    text = text.strip()
    if "://" in text:
        raise ConfigError(_scheme_hint(text, what))
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"{what}: missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise ConfigError(f"{what}: {host!r} in brackets is not an IPv6 address") from None
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{what}: expected ':PORT' after ']' in {text!r}")
            return _check_host(host, what), _check_port(rest[1:], what, allow_zero=allow_zero)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return _check_host(host, what), _check_port(port_text, what, allow_zero=allow_zero)
    elif ":" in text:
        # A bare IPv6 literal: only valid without a port.
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ConfigError(
                f"{what}: invalid address {text!r} (put IPv6 addresses in brackets: [::1]:7835)"
            ) from None
        host = text
    else:
        host = text
    if default_port is None:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    return _check_host(host, what), default_port


def _scheme_hint(text: str, what: str) -> str:
    """The error for an address given as a URL (``tcp://host:port``): name the form to use."""
    scheme, _, rest = text.partition("://")
    rest = rest.split("/", 1)[0] or "HOST:PORT"
    option = what.removeprefix("option ") if what.startswith("option --") else None
    try_it = f"{option} {rest}" if option is not None else repr(rest)
    return (
        f"{what}: {text!r} has a URL scheme ({scheme}://); "
        f"{option or 'it'} takes HOST[:PORT], without a scheme: try {try_it}"
    )


def parse_port_range(value: object, what: str) -> tuple[int, int]:
    """Parse ``"LO-HI"`` (or a two-item list) into an inclusive port range.

    Raises:
        ConfigError: Not a range of ports 1-65535 with LO <= HI.
    """
    if isinstance(value, str):
        parts = value.strip().split("-")
        if len(parts) == 1:
            parts = [parts[0], parts[0]]
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(
                f"{what}: expected LO-HI, e.g. 50000-50099, or one PORT, got {value!r}"
                + (f" (try {value.replace(':', '-')!r})" if value.count(":") == 1 else "")
            )
        lo, hi = (_check_port(p.strip(), what, allow_zero=False) for p in parts)
    elif isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int for v in value):
        lo, hi = (_check_port(str(v), what, allow_zero=False) for v in value)
    else:
        raise ConfigError(f'{what}: expected a port range like "20000-29999", got {value!r}')
    if lo > hi:
        raise ConfigError(f"{what}: empty range {lo}-{hi}")
    return lo, hi


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    """One tunnel: a relay port forwarded to ``local_host:local_port`` on the client side.

    ``remote_port`` 0 lets the relay pick a port from its range.
    """

    local_port: int
    remote_port: int = 0
    local_host: str = "127.0.0.1"
    #: Visitor addresses the relay lets through (``--allow``/``--deny``, TOML ``allow``/``deny``).
    visitors: AddressRule = field(default_factory=AddressRule)
    #: PROXY protocol header sent to the local service first: None, ``"v1"`` or ``"v2"``.
    proxy_protocol: str | None = None
    #: Name of a private tunnel (no public port; reached with ``muxtunnel visit``), or None.
    private: str | None = None

    @classmethod
    def parse(cls, spec: str) -> TunnelSpec:
        """Parse ``[REMOTE_PORT:][LOCAL_HOST:]LOCAL_PORT`` (an IPv6 host in brackets).

        Examples: ``22``, ``2222:22``, ``0:db.lan:5432``, ``8080:[::1]:80``.

        Raises:
            ConfigError: The spec is malformed or a port is out of range.
        """
        what = f"tunnel {spec!r}"
        m = _SPEC_RE.match(spec.strip())
        if m is None:
            hint = " (put IPv6 addresses in brackets)" if spec.count(":") > 2 else ""
            raise ConfigError(f"{what}: expected [REMOTE_PORT:][LOCAL_HOST:]LOCAL_PORT{hint}")
        remote = _check_port(m["remote"], what, allow_zero=True) if m["remote"] else 0
        local = _check_port(m["local"], what, allow_zero=False)
        if m["v6"] is not None:
            try:
                host = str(ipaddress.IPv6Address(m["v6"]))
            except ValueError:
                raise ConfigError(
                    f"{what}: {m['v6']!r} in brackets is not an IPv6 address"
                ) from None
        elif m["host"] is not None:
            host = _check_host(m["host"], what)
        else:
            host = "127.0.0.1"
        return cls(local_port=local, remote_port=remote, local_host=host)

    def __str__(self) -> str:
        return f"{self.remote_port}:{format_host_port(self.local_host, self.local_port)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Settings of ``muxtunnel server`` (the relay)."""

    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    #: Inclusive range of public ports the relay may bind for tunnels.
    port_range: tuple[int, int] = (20000, 29999)
    #: Address the public tunnel ports are bound on.
    bind_host: str = "0.0.0.0"
    #: Tokens configured in clear (``--token``, one-per-line files, ``MUXTUNNEL_TOKEN``).
    tokens: tuple[str, ...] = ()
    #: Named tokens with their policies, from a TOML token file (:mod:`muxtunnel.tokenstore`).
    token_entries: tuple[TokenEntry, ...] = ()
    state_dir: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_timeout: float = 30.0
    lease_seconds: float = 60.0
    #: Seconds a session whose connection dropped is kept for the client to resume it
    #: (protocol-spec.md §10.6); 0: never; None: the lease time (``lease_seconds``), at most
    #: :data:`MAX_RESUME_WINDOW`. See :meth:`resume_seconds`.
    resume_window: float | None = None
    drain_timeout: float = 10.0
    #: Connections one session may have, the first included (the relay's MAX_CONNECTIONS,
    #: protocol-spec.md §10.7); 1: no extra connection. Needs resumption (``resume_window``).
    max_connections_per_session: int = 8
    max_tunnels_per_client: int = 64
    handshake_timeout: float = 10.0
    #: Connections in TLS + authentication at once, in total and per source address.
    max_startups: int = 256
    max_startups_per_source: int = 10
    #: Failed authentications per source within a minute before the source is banned.
    auth_failures: int = 5
    #: First ban in seconds; doubles for a source banned again (at most an hour).
    auth_ban: float = 60.0
    #: Per-token limits across all sessions of the token (detached leases count as tunnels).
    max_sessions_per_token: int = 8
    max_tunnels_per_token: int = 64
    max_streams_per_token: int = 1024
    #: Visitors connected to one tunnel at once; more are reset at once.
    max_visitors_per_tunnel: int = 256
    #: Streams one client session may open at once to visit private tunnels (its
    #: MAX_CONCURRENT_STREAMS, protocol-spec.md §9.7); 0: the relay carries no visits.
    max_visit_streams: int = 256
    #: Seconds the client gets to answer an OPEN before the stream is reset (spec §9.2).
    open_timeout: float = 30.0
    #: Seconds a stream's received data may wait unconsumed, while the session's receive
    #: budget is full, before the stream is reset (spec §8.7).
    stall_timeout: float = 30.0
    #: Admin endpoint (:mod:`muxtunnel.admin`): ``auto`` (socket in the state dir), a socket
    #: path or ``HOST:PORT``; None: off.
    admin: str | None = None
    #: Prometheus endpoint (:mod:`muxtunnel.metrics`): ``(host, port)``; None: off.
    metrics: tuple[str, int] | None = None

    def resume_seconds(self) -> float:
        """The resume window the relay declares: ``resume_window``, or the lease time (capped)."""
        if self.resume_window is None:
            return min(self.lease_seconds, float(MAX_RESUME_WINDOW))
        return self.resume_window

    def accepted_tokens(self) -> tuple[TokenEntry, ...]:
        """Every token the relay accepts: ``tokens`` as unnamed entries, then ``token_entries``.

        A token in clear becomes an entry named by its token id, with no policy beyond the
        relay's limits, that also accepts AUTH method 1 (protocol-spec.md §7.1).

        Raises:
            ConfigError: Two tokens have the same name, or one token is configured twice.
        """
        return _accepted_tokens(self.tokens, self.token_entries)


@functools.lru_cache(maxsize=16)
def _accepted_tokens(
    tokens: tuple[str, ...], named: tuple[TokenEntry, ...]
) -> tuple[TokenEntry, ...]:
    entries = tuple(plaintext_entry(t) for t in dict.fromkeys(tokens)) + named
    names: set[str] = set()
    keys: dict[bytes, str] = {}
    for entry in entries:
        if entry.name in names:
            raise ConfigError(f"token name {entry.name!r} is used by two tokens")
        if entry.stored_key in keys:
            raise ConfigError(
                f"the same token is configured twice (as {keys[entry.stored_key]!r} and "
                f"{entry.name!r})"
            )
        names.add(entry.name)
        keys[entry.stored_key] = entry.name
    return entries


@dataclass(frozen=True, slots=True, kw_only=True)
class VisitConfig:
    """Settings of ``muxtunnel visit``: reach the private tunnel ``name`` on a local port."""

    server_host: str
    server_port: int = DEFAULT_PORT
    token: str
    #: Pinned relay fingerprint ``sha256:<hex>``; None with ``ca_file`` None means TOFU.
    fingerprint: str | None = None
    ca_file: Path | None = None
    state_dir: Path
    #: The private tunnel to visit.
    name: str
    #: Where connections are accepted (loopback unless the user names another address).
    listen_host: str = "127.0.0.1"
    listen_port: int
    keepalive_timeout: float = 30.0
    #: Reconnect attempts after a failure; None retries until stopped.
    max_retries: int | None = None
    backoff_cap: float = 30.0
    #: Seconds the relay gets to answer a new stream (it waits for the publisher itself).
    open_timeout: float = 45.0
    #: Local connections carried at once; more wait in the listen backlog.
    max_connections: int = 256
    #: See :attr:`ClientConfig.stall_timeout`.
    stall_timeout: float = 30.0

    @property
    def server_key(self) -> str:
        """``host:port`` of the relay, as used in the known-hosts file."""
        return format_host_port(self.server_host, self.server_port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Settings of ``muxtunnel client``."""

    server_host: str
    server_port: int = DEFAULT_PORT
    token: str
    #: Pinned relay fingerprint ``sha256:<hex>``; None with ``ca_file`` None means TOFU.
    fingerprint: str | None = None
    ca_file: Path | None = None
    state_dir: Path
    tunnels: tuple[TunnelSpec, ...]
    keepalive_timeout: float = 30.0
    #: Seconds a session whose connection dropped is kept while the client dials again to
    #: resume it (protocol-spec.md §10.6; the relay's window counts too: the smaller one
    #: applies); 0: never resume.
    resume_window: float = 60.0
    #: TLS connections the session runs over (protocol-spec.md §10.7); each new stream goes
    #: on the least-loaded one. More than 1 needs resumption and a relay that takes them.
    connections: int = 1
    #: Reconnect attempts after a failure; None retries until stopped.
    max_retries: int | None = None
    #: Timeout for dialing the local target of a stream.
    connect_timeout: float = 10.0
    backoff_cap: float = 30.0
    #: Local connections (dialing or open) per tunnel and in total; the relay's OPENs beyond
    #: either bound are refused with RESOURCE_SHORTAGE.
    max_streams_per_tunnel: int = 256
    max_streams: int = 512
    #: Relay OPENs taken per second (burst: twice as many); the excess is refused with
    #: RESOURCE_SHORTAGE (spec §9.2 item 3.6).
    max_open_rate: float = 5000.0
    #: Seconds a stream's received data may wait unconsumed, while the session's receive
    #: budget is full, before the stream is reset (spec §8.7).
    stall_timeout: float = 30.0
    #: Admin endpoint (:mod:`muxtunnel.admin`): ``auto``, a socket path or ``HOST:PORT``; None: off.
    admin: str | None = None
    #: Prometheus endpoint (:mod:`muxtunnel.metrics`): ``(host, port)``; None: off.
    metrics: tuple[str, int] | None = None

    @property
    def server_key(self) -> str:
        """``host:port`` of the relay, as used in the known-hosts file."""
        return format_host_port(self.server_host, self.server_port)


# --------------------------------------------------------------------------------------------
# Files and merging


#: Options common to both commands, accepted in the file and ignored by the builders.
_COMMON_KEYS = frozenset({"log-level", "log-format"})
_SERVER_KEYS = frozenset(
    {
        "listen",
        "ports",
        "bind",
        "token",
        "token-file",
        "state-dir",
        "cert",
        "key",
        "keepalive-timeout",
        "lease",
        "resume-window",
        "max-connections-per-session",
        "drain-timeout",
        "max-tunnels-per-client",
        "handshake-timeout",
        "max-startups",
        "max-startups-per-source",
        "auth-failures",
        "auth-ban",
        "max-sessions-per-token",
        "max-tunnels-per-token",
        "max-streams-per-token",
        "max-visitors-per-tunnel",
        "max-visit-streams",
        "open-timeout",
        "stall-timeout",
        "admin",
        "metrics",
    }
)
_CLIENT_KEYS = frozenset(
    {
        "server",
        "token",
        "token-file",
        "fingerprint",
        "ca",
        "state-dir",
        "tunnel",
        "keepalive-timeout",
        "resume-window",
        "connections",
        "max-retries",
        "connect-timeout",
        "backoff-cap",
        "max-streams-per-tunnel",
        "max-streams",
        "max-open-rate",
        "stall-timeout",
        "admin",
        "metrics",
    }
)
_VISIT_KEYS = frozenset(
    {
        "server",
        "token",
        "token-file",
        "fingerprint",
        "ca",
        "state-dir",
        "name",
        "listen",
        "keepalive-timeout",
        "max-retries",
        "backoff-cap",
        "open-timeout",
        "max-connections",
        "stall-timeout",
    }
)
_SECTIONS = {"server": _SERVER_KEYS, "client": _CLIENT_KEYS, "visit": _VISIT_KEYS}
#: Client flags that apply to every SPEC on the command line (TOML: keys of ``[[tunnel]]``).
_CLIENT_TUNNEL_FLAGS = frozenset({"allow", "deny", "proxy-protocol"})
#: Values of ``--proxy-protocol`` / ``proxy_protocol``.
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")


class _Source:
    """Merged option values plus where each came from, for error messages."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.origin: dict[str, str] = {}

    def set(self, key: str, value: object, origin: str) -> None:
        self.values[key] = value
        self.origin[key] = origin

    def what(self, key: str) -> str:
        return self.origin.get(key, f"option {key!r}")


_TOP_LEVEL_SERVER = re.compile(
    r"\A(?:[ \t]*(?:#[^\n]*)?\n|[ \t]*[^\[\s][^\n]*\n)*?[ \t]*server[ \t]*="
)
_SERVER_TABLE = re.compile(r"^[ \t]*(?:\[[ \t]*server[ \t]*[.\]]|server[ \t]*\.)", re.MULTILINE)


def _server_clash(path: Path) -> str | None:
    """Explain a file with a top-level ``server = ...`` key and a ``[server]`` table.

    TOML refuses the pair ("cannot overwrite a value"), which says nothing about the cause: the
    top-level key is the client's relay address, the table holds the relay's options.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if not (_TOP_LEVEL_SERVER.search(text) and _SERVER_TABLE.search(text)):
        return None
    return (
        f"config file {path}: the top-level key 'server' (the client's relay address, "
        "HOST[:PORT]) clashes with the [server] table (the relay's options); TOML cannot have "
        "both. For the client, move the key into a [client] table ([client] then "
        'server = "HOST:PORT"), or use one file for the relay and another for the client'
    )


def load_toml(path: Path, section: str) -> dict[str, object]:
    """Read the options of one command (``"server"`` or ``"client"``) from a TOML file.

    Options may sit at the top level or in a ``[server]`` / ``[client]`` table (the table wins);
    the other command's table is ignored, so one file can configure both. Keys are returned
    with dashes (``state_dir`` -> ``state-dir``), each value as TOML parsed it.

    Raises:
        ConfigError: The file is unreadable, not TOML, or has a key the command does not know.
    """
    if section not in _SECTIONS:
        raise ValueError(f"unknown section {section!r}")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            _server_clash(path) or f"config file {path}: invalid TOML: {exc}"
        ) from None
    allowed = _SECTIONS[section] | _COMMON_KEYS
    result: dict[str, object] = {}

    def take(table: Mapping[str, object], prefix: str) -> None:
        for raw_key, value in table.items():
            key = raw_key.replace("_", "-")
            if not prefix and key in _SECTIONS and isinstance(value, dict):
                continue  # a [server] / [client] / [visit] table, handled below
            if not prefix and section == "visit" and key in _CLIENT_KEYS - _VISIT_KEYS:
                continue  # a client's top-level key in a file that also configures a visit
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise ConfigError(
                    f"config file {path}: unknown key {prefix + raw_key!r} for "
                    f"`muxtunnel {section}` (known keys: {known})"
                )
            result[key] = value

    take(data, "")
    table = data.get(section)
    if isinstance(table, dict):
        take(table, f"{section}.")
    return result


def _merge(
    path: Path | None, file_values: Mapping[str, object], flags: Mapping[str, object]
) -> _Source:
    src = _Source()
    for key, value in file_values.items():
        src.set(key, value, f"config file {path}: key {key!r}" if path else f"config key {key!r}")
    for key, value in flags.items():
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        src.set(key, value, f"option --{key}")
    return src


def _get(src: _Source, key: str, default: _T, convert: Callable[[object, str], _T]) -> _T:
    if key not in src.values:
        return default
    return convert(src.values[key], src.what(key))


def _as_str(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: expected a non-empty string, got {value!r}")
    return value.strip()


def _as_path(value: object, what: str) -> Path:
    if isinstance(value, Path):
        return value.expanduser()
    return Path(_as_str(value, what)).expanduser()


def _as_seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what}: expected a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 86400 * 365:
        raise ConfigError(f"{what}: expected a positive number of seconds, got {value!r}")
    return seconds


def as_resume_window(value: object, what: str) -> float:
    """``resume-window``: seconds from 0 (never resume) to :data:`MAX_RESUME_WINDOW`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what}: expected a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_RESUME_WINDOW:
        raise ConfigError(f"{what}: expected 0 (off) to {MAX_RESUME_WINDOW} seconds, got {value!r}")
    return seconds


def as_connection_count(value: object, what: str) -> int:
    """``connections`` / ``max-connections-per-session``: 1 to :data:`MAX_CONNECTIONS`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONNECTIONS:
        raise ConfigError(f"{what}: expected 1 to {MAX_CONNECTIONS} connections, got {value!r}")
    return value


def _as_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what}: expected an integer, got {value!r}")
    if value < 0:
        raise ConfigError(f"{what}: expected an integer >= 0, got {value}")
    return value


def _as_token(value: str, what: str) -> str:
    token = value.strip()
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{what}: a token must be non-empty and contain no whitespace")
    return token


def _as_tokens(value: object, what: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list | tuple)
        or not items
        or not all(isinstance(t, str) for t in items)
    ):
        raise ConfigError(f"{what}: expected a token string or a list of them, got {value!r}")
    return tuple(_as_token(str(t), what) for t in items)


_Tokens = tuple[tuple[str, ...], tuple[TokenEntry, ...]]


def _read_tokens(path: Path, *, relay: bool) -> _Tokens:
    """A token file: either format for the relay; one-per-line only for a client."""
    if relay:
        return load_token_file(path)
    if is_named_token_file(path):
        raise ConfigError(
            f"token file {path}: is a relay's token file ([[token]] tables holding hashes); "
            "a client needs the token itself, which `muxtunnel token add` prints once"
        )
    tokens = read_token_file(path)
    if len(tokens) > 1:
        raise ConfigError(
            f"token file {path}: holds {len(tokens)} tokens, but a client uses exactly one (it "
            "would have used the first); keep only the token the relay gave you for this client"
        )
    return tokens, ()


def _tokens_from(src: _Source, token_key: str, file_key: str, *, relay: bool) -> _Tokens:
    tokens: list[str] = []
    entries: tuple[TokenEntry, ...] = ()
    if token_key in src.values:
        tokens.extend(_as_tokens(src.values[token_key], src.what(token_key)))
    if file_key in src.values:
        path = _as_path(src.values[file_key], src.what(file_key))
        plain, entries = _read_tokens(path, relay=relay)
        tokens.extend(plain)
    return tuple(dict.fromkeys(tokens)), entries


def _resolve_tokens(
    path: Path | None,
    file_values: Mapping[str, object],
    flags: Mapping[str, object],
    env: Mapping[str, str],
    *,
    relay: bool = False,
) -> _Tokens:
    """Tokens (and the relay's named entries) from flags, else ``MUXTUNNEL_TOKEN``, else the
    config file."""
    flag_src = _merge(None, {}, {k: flags.get(k) for k in ("token", "token-file")})
    tokens, entries = _tokens_from(flag_src, "token", "token-file", relay=relay)
    if tokens or entries:
        return tokens, entries
    env_token = env.get(TOKEN_ENV, "")
    if env_token.strip():
        return (_as_token(env_token, f"environment variable {TOKEN_ENV}"),), ()
    file_src = _merge(
        path, {k: v for k, v in file_values.items() if k in ("token", "token-file")}, {}
    )
    return _tokens_from(file_src, "token", "token-file", relay=relay)


def _check_flag_keys(flags: Mapping[str, object], allowed: frozenset[str]) -> None:
    unknown = set(flags) - allowed - _COMMON_KEYS
    if unknown:
        raise ValueError(f"unknown flag keys: {sorted(unknown)}")


def build_server_config(
    file_values: Mapping[str, object] | None = None,
    flags: Mapping[str, object] | None = None,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Merge file values and flags (flags win) into a validated :class:`ServerConfig`.

    Args:
        file_values: Result of :func:`load_toml` (``{}`` without a file).
        flags: Command-line values keyed like the file (``"state-dir"``); ``None`` or an empty
            list means "not given".
        config_path: The file's path, for error messages.
        env: Environment (default ``os.environ``), for ``MUXTUNNEL_TOKEN``.

    Tokens come from ``--token``/``--token-file``, else ``MUXTUNNEL_TOKEN``, else the file; a
    token file may be a TOML named token file (``token_entries``). Empty ``tokens`` and
    ``token_entries`` mean "none configured": the CLI then uses the state dir's ``tokens.toml``
    or generates a token.

    Raises:
        ConfigError: A value is invalid; the message names the key.
    """
    file_values = dict(file_values or {})
    flags = dict(flags or {})
    _check_flag_keys(flags, _SERVER_KEYS)
    src = _merge(config_path, file_values, flags)
    listen_host, listen_port = _get(
        src,
        "listen",
        ("0.0.0.0", DEFAULT_PORT),
        lambda v, w: parse_host_port(_as_str(v, w), w, allow_zero=True),
    )
    cert = _get(src, "cert", None, _as_path)
    key = _get(src, "key", None, _as_path)
    if (cert is None) != (key is None):
        missing, given = ("key", "cert") if key is None else ("cert", "key")
        raise ConfigError(f"{src.what(given)}: --{given} needs --{missing} too")
    tokens, token_entries = _resolve_tokens(
        config_path, file_values, flags, os.environ if env is None else env, relay=True
    )
    config = ServerConfig(
        listen_host=listen_host,
        listen_port=listen_port,
        port_range=_get(src, "ports", (20000, 29999), parse_port_range),
        bind_host=_get(
            src, "bind", "0.0.0.0", lambda v, w: _check_host(_unbracket(_as_str(v, w)), w)
        ),
        tokens=tokens,
        token_entries=token_entries,
        state_dir=_get(src, "state-dir", None, _as_path) or default_state_dir(),
        cert_file=cert,
        key_file=key,
        keepalive_timeout=_get(src, "keepalive-timeout", 30.0, _as_seconds),
        lease_seconds=_get(src, "lease", 60.0, _as_seconds),
        resume_window=_get(src, "resume-window", None, as_resume_window),
        max_connections_per_session=_get(
            src, "max-connections-per-session", 8, as_connection_count
        ),
        drain_timeout=_get(src, "drain-timeout", 10.0, _as_seconds),
        max_tunnels_per_client=_get(src, "max-tunnels-per-client", 64, _as_positive),
        handshake_timeout=_get(src, "handshake-timeout", 10.0, _as_seconds),
        max_startups=_get(src, "max-startups", 256, _as_positive),
        max_startups_per_source=_get(src, "max-startups-per-source", 10, _as_positive),
        auth_failures=_get(src, "auth-failures", 5, _as_positive),
        auth_ban=_get(src, "auth-ban", 60.0, _as_seconds),
        max_sessions_per_token=_get(src, "max-sessions-per-token", 8, _as_positive),
        max_tunnels_per_token=_get(src, "max-tunnels-per-token", 64, _as_positive),
        max_streams_per_token=_get(src, "max-streams-per-token", 1024, _as_positive),
        max_visitors_per_tunnel=_get(src, "max-visitors-per-tunnel", 256, _as_positive),
        max_visit_streams=_get(src, "max-visit-streams", 256, _as_count),
        open_timeout=_get(src, "open-timeout", 30.0, _as_seconds),
        stall_timeout=_get(src, "stall-timeout", 30.0, _as_seconds),
        admin=_get(src, "admin", _ADMIN_AUTO, _as_admin),
        metrics=_get(src, "metrics", None, _as_metrics),
    )
    config.accepted_tokens()  # unique names, no token twice
    return config


#: ``admin`` when not given: the socket in the state dir (:mod:`muxtunnel.admin`).
_ADMIN_AUTO: str | None = "auto"


def _as_metrics(value: object, what: str) -> tuple[str, int] | None:
    """``--metrics``: ``HOST:PORT`` (port 0 picks one), or ``off`` (None)."""
    text = _as_str(value, what)
    if text == "off":
        return None
    return parse_host_port(text, what, allow_zero=True)


def _as_admin(value: object, what: str) -> str | None:
    """``--admin``: ``off`` (None), ``auto``, a socket path, or a valid ``HOST:PORT``."""
    text = _as_str(value, what)
    if text == "off":
        return None
    if text != "auto" and "/" not in text and ":" in text:
        parse_host_port(text, what, allow_zero=True)
    return text


def _unbracket(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _as_positive(value: object, what: str) -> int:
    n = _as_count(value, what)
    if n < 1:
        raise ConfigError(f"{what}: expected an integer >= 1, got {n}")
    return n


def _as_tunnels(value: object, what: str) -> tuple[TunnelSpec, ...]:
    """Tunnels from SPEC strings (flags) or ``[[tunnel]]`` tables (file)."""
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{what}: expected a list of [[tunnel]] tables, got {value!r}")
    tunnels: list[TunnelSpec] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            tunnels.append(TunnelSpec.parse(item))
            continue
        if isinstance(item, TunnelSpec):
            tunnels.append(item)
            continue
        where = f"{what}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table with local_port, got {item!r}")
        fields = {k.replace("-", "_"): v for k, v in item.items()}
        unknown = set(fields) - _TUNNEL_TABLE_KEYS
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {sorted(unknown)[0]!r} "
                f"(known: {', '.join(sorted(_TUNNEL_TABLE_KEYS))})"
            )
        if "local_port" not in fields:
            raise ConfigError(f"{where}: missing key 'local_port'")
        ports: dict[str, int] = {}
        for name in ("local_port", "remote_port"):
            port = fields.get(name, 0)
            if isinstance(port, bool) or not isinstance(port, int):
                raise ConfigError(f"{where}: key {name!r}: expected an integer port, got {port!r}")
            ports[name] = _check_port(
                str(port), f"{where}: key {name!r}", allow_zero=name == "remote_port"
            )
        host = fields.get("local_host", "127.0.0.1")
        host = _check_host(
            _unbracket(_as_str(host, f"{where}: key 'local_host'")), f"{where}: key 'local_host'"
        )
        tunnels.append(
            TunnelSpec(
                local_port=ports["local_port"],
                remote_port=ports["remote_port"],
                local_host=host,
                visitors=_as_rule(
                    fields.get("allow"),
                    fields.get("deny"),
                    f"{where}: key 'allow'",
                    f"{where}: key 'deny'",
                ),
                proxy_protocol=(
                    None
                    if fields.get("proxy_protocol") is None
                    else _as_proxy_protocol(
                        fields["proxy_protocol"], f"{where}: key 'proxy_protocol'"
                    )
                ),
                private=_as_private(fields, where),
            )
        )
    return tuple(tunnels)


def _as_private(fields: Mapping[str, object], where: str) -> str | None:
    """The ``private`` key of a ``[[tunnel]]`` table (a private tunnel has no remote port)."""
    if fields.get("private") is None:
        return None
    name = as_tunnel_name(fields["private"], f"{where}: key 'private'")
    if fields.get("remote_port", 0) != 0:
        raise ConfigError(
            f"{where}: a private tunnel has no public port: remove 'remote_port' or 'private'"
        )
    return name


def as_tunnel_name(value: object, what: str) -> str:
    """Validate a private tunnel name: 1-63 of ``[a-z0-9][a-z0-9._-]*`` (protocol-spec.md §6.12)."""
    from muxtunnel.protocol.frames import is_tunnel_name

    if not isinstance(value, str) or not is_tunnel_name(value):
        raise ConfigError(
            f"{what}: invalid private tunnel name {value!r} (1-63 characters: lowercase "
            "letters, digits, '.', '_' and '-', starting with a letter or digit)"
        )
    return value


def _apply_private_flag(src: _Source, tunnels: tuple[TunnelSpec, ...]) -> tuple[TunnelSpec, ...]:
    """``--private NAME``: the one SPEC of the command line becomes a private tunnel."""
    if "private" not in src.values:
        return tunnels
    what = src.what("private")
    name = as_tunnel_name(src.values["private"], what)
    raw = src.values.get("tunnel")
    if not src.origin.get("tunnel", "").startswith("option ") or not isinstance(raw, list):
        raise ConfigError(
            f"{what} applies to the SPEC on the command line, and none was given; "
            "for [[tunnel]] tables in the config file use the key 'private' in the table"
        )
    if len(tunnels) != 1:
        raise ConfigError(
            f"{what}: give exactly one SPEC ([LOCAL_HOST:]LOCAL_PORT), not {len(tunnels)}"
        )
    match = _SPEC_RE.match(str(raw[0]).strip())
    if match is not None and match["remote"] is not None:
        raise ConfigError(
            f"{what}: a private tunnel has no public port: give the SPEC as "
            f"[LOCAL_HOST:]LOCAL_PORT, without a REMOTE_PORT (got {raw[0]!r})"
        )
    return (dataclasses.replace(tunnels[0], private=name),)


#: Keys of a ``[[tunnel]]`` table (dashes read as underscores).
_TUNNEL_TABLE_KEYS = frozenset(
    {"local_port", "remote_port", "local_host", "allow", "deny", "proxy_protocol", "private"}
)


def _as_rule(allow: object, deny: object, allow_what: str, deny_what: str) -> AddressRule:
    """A visitor rule from ``allow`` / ``deny`` lists (None: not given)."""
    return AddressRule(
        allow=() if allow is None else parse_cidrs(allow, allow_what),
        deny=() if deny is None else parse_cidrs(deny, deny_what),
    )


def _as_proxy_protocol(value: object, what: str) -> str:
    version = value.strip().lower() if isinstance(value, str) else value
    if version not in PROXY_PROTOCOL_VERSIONS:
        raise ConfigError(
            f'{what}: unknown PROXY protocol version {value!r} (expected "v1" or "v2")'
        )
    return str(version)


def _apply_tunnel_flags(src: _Source, tunnels: tuple[TunnelSpec, ...]) -> tuple[TunnelSpec, ...]:
    """Apply ``--allow``/``--deny``/``--proxy-protocol`` to every SPEC of the command line."""
    given = sorted(key for key in _CLIENT_TUNNEL_FLAGS if key in src.values)
    if not given:
        return tunnels
    if not src.origin.get("tunnel", "").startswith("option "):
        raise ConfigError(
            f"--{given[0]} applies to the SPECs on the command line, and none was given; "
            f"for [[tunnel]] tables in the config file use the key "
            f"{given[0].replace('-', '_')!r} in each table"
        )
    rule = _as_rule(
        src.values.get("allow"), src.values.get("deny"), src.what("allow"), src.what("deny")
    )
    version = _get(src, "proxy-protocol", None, _as_proxy_protocol)
    return tuple(
        dataclasses.replace(
            spec,
            visitors=rule if not rule.empty else spec.visitors,
            proxy_protocol=version if version is not None else spec.proxy_protocol,
        )
        for spec in tunnels
    )


def _relay_connection(
    src: _Source,
    config_path: Path | None,
    file_values: Mapping[str, object],
    flags: Mapping[str, object],
    env: Mapping[str, str] | None,
    missing_token: str,
) -> tuple[str, int, str, str | None, Path | None]:
    """What a client or visitor needs to reach the relay: host, port, token, pinned
    fingerprint and CA file (at most one of the last two).

    Raises:
        ConfigError: No ``server``, no token (``missing_token`` says how to give one), or both a
            fingerprint and a CA.
    """
    if "server" not in src.values:
        raise ConfigError("missing --server HOST[:PORT] (or 'server' in the config file)")
    host, port = parse_host_port(
        _as_str(src.values["server"], src.what("server")),
        src.what("server"),
        default_port=DEFAULT_PORT,
    )
    tokens, _ = _resolve_tokens(config_path, file_values, flags, os.environ if env is None else env)
    if not tokens:
        raise ConfigError(missing_token)
    fingerprint = _get(
        src, "fingerprint", None, lambda v, w: normalize_fingerprint(_as_str(v, w), what=w)
    )
    ca_file = _get(src, "ca", None, _as_path)
    if fingerprint is not None and ca_file is not None:
        raise ConfigError(
            f"{src.what('fingerprint')} and {src.what('ca')}: use either a pinned fingerprint or a CA, not both"
        )
    return host, port, tokens[0], fingerprint, ca_file


def build_client_config(
    file_values: Mapping[str, object] | None = None,
    flags: Mapping[str, object] | None = None,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Merge file values and flags (flags win) into a validated :class:`ClientConfig`.

    ``flags["tunnel"]`` is the list of SPEC arguments; when given it replaces the file's
    ``[[tunnel]]`` tables. The token comes from ``--token``/``--token-file``, else
    ``MUXTUNNEL_TOKEN``, else the file.

    Raises:
        ConfigError: A value is invalid or missing (server, token, tunnels, both ``fingerprint``
            and ``ca``); the message names the key.
    """
    file_values = dict(file_values or {})
    flags = dict(flags or {})
    _check_flag_keys(flags, _CLIENT_KEYS | _CLIENT_TUNNEL_FLAGS | {"private"})
    src = _merge(config_path, file_values, flags)
    host, port, token, fingerprint, ca_file = _relay_connection(
        src,
        config_path,
        file_values,
        flags,
        env,
        f"missing token: pass --token TOKEN, set {TOKEN_ENV}, or put 'token' in the config file "
        "(the relay prints its token on first start and keeps it in its state dir, file 'token')",
    )
    no_tunnels: tuple[TunnelSpec, ...] = ()
    tunnels = _apply_tunnel_flags(src, _get(src, "tunnel", no_tunnels, _as_tunnels))
    tunnels = _apply_private_flag(src, tunnels)
    if not tunnels:
        raise ConfigError(
            "no tunnels: give at least one SPEC ([REMOTE_PORT:][LOCAL_HOST:]LOCAL_PORT) or [[tunnel]] table"
        )
    max_retries: int | None = _get(src, "max-retries", None, _as_count)
    connections = _get(src, "connections", 1, as_connection_count)
    if connections > 1 and not _get(src, "resume-window", 60.0, as_resume_window):
        raise ConfigError(
            "connections: more than one connection needs session resumption "
            "(a resume-window above 0)"
        )
    return ClientConfig(
        server_host=host,
        server_port=port,
        token=token,
        fingerprint=fingerprint,
        ca_file=ca_file,
        state_dir=_get(src, "state-dir", None, _as_path) or default_state_dir(),
        tunnels=tunnels,
        keepalive_timeout=_get(src, "keepalive-timeout", 30.0, _as_seconds),
        resume_window=_get(src, "resume-window", 60.0, as_resume_window),
        connections=connections,
        max_retries=max_retries,
        connect_timeout=_get(src, "connect-timeout", 10.0, _as_seconds),
        backoff_cap=_get(src, "backoff-cap", 30.0, _as_seconds),
        max_streams_per_tunnel=_get(src, "max-streams-per-tunnel", 256, _as_positive),
        max_streams=_get(src, "max-streams", 512, _as_positive),
        max_open_rate=float(_get(src, "max-open-rate", 5000, _as_positive)),
        stall_timeout=_get(src, "stall-timeout", 30.0, _as_seconds),
        admin=_get(src, "admin", _ADMIN_AUTO, _as_admin),
        metrics=_get(src, "metrics", None, _as_metrics),
    )


def build_visit_config(
    file_values: Mapping[str, object] | None = None,
    flags: Mapping[str, object] | None = None,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> VisitConfig:
    """Merge file values and flags (flags win) into a validated :class:`VisitConfig`.

    ``flags["name"]`` is the private tunnel's name and ``flags["listen"]`` the
    ``[LOCAL_HOST:]LOCAL_PORT`` argument (host default 127.0.0.1); in the file they are the
    keys ``name`` and ``listen`` (top level or a ``[visit]`` table). The token comes from
    ``--token``/``--token-file``, else ``MUXTUNNEL_TOKEN``, else the file.

    Raises:
        ConfigError: A value is invalid or missing; the message names the key.
    """
    file_values = dict(file_values or {})
    flags = dict(flags or {})
    _check_flag_keys(flags, _VISIT_KEYS)
    src = _merge(config_path, file_values, flags)
    host, port, token, fingerprint, ca_file = _relay_connection(
        src,
        config_path,
        file_values,
        flags,
        env,
        f"missing token: pass --token-file FILE, set {TOKEN_ENV}, or put 'token' in the "
        "config file",
    )
    if "name" not in src.values:
        raise ConfigError("missing the private tunnel's NAME (or 'name' in the config file)")
    name = as_tunnel_name(src.values["name"], src.what("name"))
    if "listen" not in src.values:
        raise ConfigError(
            "missing the local port: [LOCAL_HOST:]LOCAL_PORT (or 'listen' in the config file)"
        )
    listen_host, listen_port = _as_listen(src.values["listen"], src.what("listen"))
    return VisitConfig(
        server_host=host,
        server_port=port,
        token=token,
        fingerprint=fingerprint,
        ca_file=ca_file,
        state_dir=_get(src, "state-dir", None, _as_path) or default_state_dir(),
        name=name,
        listen_host=listen_host,
        listen_port=listen_port,
        keepalive_timeout=_get(src, "keepalive-timeout", 30.0, _as_seconds),
        max_retries=_get(src, "max-retries", None, _as_count),
        backoff_cap=_get(src, "backoff-cap", 30.0, _as_seconds),
        open_timeout=_get(src, "open-timeout", 45.0, _as_seconds),
        max_connections=_get(src, "max-connections", 256, _as_positive),
        stall_timeout=_get(src, "stall-timeout", 30.0, _as_seconds),
    )


def _as_listen(value: object, what: str) -> tuple[str, int]:
    """``[LOCAL_HOST:]LOCAL_PORT`` (an integer port in the file is fine too); port 0 picks one."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _as_str(value, what)
    if text.isdigit():
        return "127.0.0.1", _check_port(text, what, allow_zero=True)
    return parse_host_port(text, what, allow_zero=True)
