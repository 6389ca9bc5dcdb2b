"""The relay's named token file (TOML): read, add, list and remove tokens.

Format (``muxtunnel token add`` writes it; every key but ``name`` and ``hash``/``token`` is
optional)::

    [[token]]
    name = "office"
    hash = "sha256:<64 hex digits of the stored key>"
    created = "2026-11-29T16:50:00Z"
    ports = ["2200-2299", 5432]
    max_tunnels = 4
    max_streams = 100
    max_sessions = 2
    max_visitors = 50
    bandwidth = "10M"
    tunnel_bandwidth = "2M"
    allow = ["203.0.113.0/24", "2001:db8::/32"]
    deny = ["203.0.113.66"]
    publish = ["ssh-*"]
    visit = ["ssh-home"]

``hash`` is the token's stored key (protocol-spec.md §7.1, AUTH method 2): enough to check a
client, not to act as one, so the file does not hold the token. ``token = "..."`` instead of
``hash`` keeps a token in clear (then older clients using method 1 are accepted too).

A file that parses as TOML and has ``[[token]]`` tables is in this format; anything else is the
older one-token-per-line format (:func:`muxtunnel.tokens.read_token_file`). The writers keep the
rest of the file (comments included) and replace it atomically with a mode 0600 file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muxtunnel.access import AddressRule, IPNetwork, TokenEntry, TokenPolicy, parse_cidrs
from muxtunnel.errors import ConfigError
from muxtunnel.protocol.auth import stored_key
from muxtunnel.tokens import (
    check_private_file,
    ensure_private_dir,
    generate_token,
    plaintext_entry,
    read_token_file,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "KNOWN_KEYS",
    "TOKENS_FILE_NAME",
    "StoredToken",
    "add_token",
    "check_name",
    "format_rate",
    "format_stored_key",
    "is_named_token_file",
    "list_tokens",
    "load_token_file",
    "parse_ports",
    "parse_rate",
    "policy_summary",
    "read_tokens",
    "remove_token",
    "token_json",
]

#: Name of the named token file inside the relay's state dir.
TOKENS_FILE_NAME = "tokens.toml"
#: First line of a token file that ``token add`` creates.
HEADER = "# muxtunnel tokens: written by `muxtunnel token add`; policy keys are optional\n"
#: The keys a ``[[token]]`` table may have, in the order ``token add`` writes them.
KNOWN_KEYS = (
    "name",
    "hash",
    "token",
    "created",
    "ports",
    "max_tunnels",
    "max_streams",
    "max_sessions",
    "max_visitors",
    "bandwidth",
    "tunnel_bandwidth",
    "allow",
    "deny",
    "publish",
    "visit",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PATTERN = re.compile(r"[a-z0-9._*?\[\]!-]{1,63}")
_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgG]?)")
_RATE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3}
_TABLE_HEADER = re.compile(r"\s*\[\[\s*token\s*\]\]\s*(?:#.*)?")
_ANY_HEADER = re.compile(r"\s*\[")


@dataclass(frozen=True, slots=True)
class StoredToken:
    """One token of a token file, as ``token list`` shows it."""

    entry: TokenEntry
    #: When ``token add`` created it (ISO 8601, UTC), or None.
    created: str | None = None
    #: True for a token of a one-token-per-line file (no name, no policy).
    plaintext_line: bool = False


# ---------------------------------------------------------------------------------------
# Values


def format_stored_key(key: bytes) -> str:
    """``sha256:`` and 64 lowercase hex digits, as in a token file's ``hash``."""
    return "sha256:" + key.hex()


def parse_rate(value: object, what: str) -> int:
    """Bytes per second from ``10M``, ``512K``, ``1.5G`` (1000-based) or an integer.

    Raises:
        ConfigError: Not a positive rate.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        rate = value
    elif isinstance(value, str) and (m := _RATE.fullmatch(value.strip())):
        rate = int(Decimal(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    else:
        raise ConfigError(
            f"{what}: expected bytes per second like 10M, 512K, 1G (1000-based) or an integer, "
            f"got {value!r}"
        )
    if rate < 1:
        raise ConfigError(f"{what}: must be at least 1 byte per second, got {value!r}")
    return rate


def format_rate(rate: int) -> str:
    """``10000000`` -> ``10M`` (the largest exact 1000-based unit)."""
    for suffix, unit in (("G", 1000**3), ("M", 1000**2), ("K", 1000)):
        if rate % unit == 0:
            return f"{rate // unit}{suffix}"
    return str(rate)


def _port(text: str, what: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{what}: expected ports 1-65535 or ranges LO-HI, got {text!r}")
    return int(text)


def parse_ports(value: object, what: str) -> tuple[tuple[int, int], ...]:
    """Ports and ranges: ``["2200-2299", 5432]``, ``"2200-2299,5432"`` or ``5432``.

    Raises:
        ConfigError: Not ports 1-65535, an empty range, or no port at all.
    """
    items = value if isinstance(value, list | tuple) else [value]
    ranges: dict[tuple[int, int], None] = {}
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            port = _port(str(item), what)
            ranges[(port, port)] = None
            continue
        if not isinstance(item, str):
            raise ConfigError(f'{what}: expected ports or ranges like "2200-2299", got {item!r}')
        for part in item.split(","):
            lo_text, _, hi_text = part.partition("-")
            lo = _port(lo_text, what)
            hi = _port(hi_text, what) if hi_text else lo
            if lo > hi:
                raise ConfigError(f"{what}: empty range {lo}-{hi}")
            ranges[(lo, hi)] = None
    if not ranges:
        raise ConfigError(f"{what}: give at least one port or range")
    return tuple(ranges)


def _format_ports(ports: Sequence[tuple[int, int]]) -> list[str | int]:
    return [lo if lo == hi else f"{lo}-{hi}" for lo, hi in ports]


def _cidr(network: IPNetwork) -> str:
    """``203.0.113.66`` for a single address, else ``203.0.113.0/24``."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: expected a positive integer, got {value!r}")
    return value


def _patterns(value: object, what: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{what}: expected a list of name patterns, got {value!r}")
    for item in items:
        if not isinstance(item, str) or not _PATTERN.fullmatch(item):
            raise ConfigError(
                f"{what}: expected a tunnel name pattern of a-z 0-9 . _ - and the wildcards "
                f"* ? [ ] (at most 63 characters), got {item!r}"
            )
    return tuple(dict.fromkeys(items))


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a string, got {value!r}")
    return value


def check_name(name: str, what: str = "token name") -> str:
    """Check a token name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,62}``.

    Raises:
        ConfigError: Not a valid name.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r}: use 1-63 characters A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


# ---------------------------------------------------------------------------------------
# Reading


def _table_entry(table: Mapping[str, Any], where: str) -> StoredToken:
    """Validate one ``[[token]]`` table; ``where`` prefixes every error message."""
    unknown = [key for key in table if key not in KNOWN_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(KNOWN_KEYS)})"
        )

    def what(key: str) -> str:
        return f"{where}: key {key!r}"

    if "name" not in table:
        raise ConfigError(f"{where}: key 'name' is missing")
    name = _text(table["name"], what("name"))
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what('name')}: {name!r} is not a valid name "
            "(1-63 characters A-Z a-z 0-9 . _ -, starting with a letter or digit)"
        )
    secret: str | None = None
    if ("hash" in table) == ("token" in table):
        raise ConfigError(f"{where}: give exactly one of the keys 'hash' and 'token'")
    if "hash" in table:
        text = _text(table["hash"], what("hash"))
        m = _HASH.fullmatch(text.strip())
        if m is None:
            raise ConfigError(f"{what('hash')}: expected sha256: and 64 hex digits")
        key = bytes.fromhex(m.group(1))
    else:
        secret = _text(table["token"], what("token"))
        if not secret or any(c.isspace() for c in secret):
            raise ConfigError(
                f"{what('token')}: a token must be non-empty and contain no whitespace"
            )
        key = stored_key(secret)
    created = table.get("created")
    if isinstance(created, dt.date):  # an unquoted TOML date-time
        created = created.isoformat().replace("+00:00", "Z")
    if created is not None:
        created = _text(created, what("created"))
    counts = {
        key: _count(table[key], what(key)) if key in table else None
        for key in ("max_tunnels", "max_streams", "max_sessions", "max_visitors")
    }
    rates = {
        key: parse_rate(table[key], what(key)) if key in table else None
        for key in ("bandwidth", "tunnel_bandwidth")
    }
    policy = TokenPolicy(
        ports=parse_ports(table["ports"], what("ports")) if "ports" in table else None,
        max_tunnels=counts["max_tunnels"],
        max_streams=counts["max_streams"],
        max_sessions=counts["max_sessions"],
        max_visitors=counts["max_visitors"],
        bandwidth=rates["bandwidth"],
        tunnel_bandwidth=rates["tunnel_bandwidth"],
        visitors=AddressRule(
            allow=parse_cidrs(table.get("allow", []), what("allow")),
            deny=parse_cidrs(table.get("deny", []), what("deny")),
        ),
        publish=_patterns(table["publish"], what("publish")) if "publish" in table else ("*",),
        visit=_patterns(table.get("visit", []), what("visit")),
    )
    entry = TokenEntry(name=name, stored_key=key, policy=policy, secret=secret)
    return StoredToken(entry=entry, created=created)


def _load(text: str) -> dict[str, Any] | None:
    """``text`` parsed as TOML, or None if it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def _tables(data: dict[str, Any] | None) -> list[Any] | None:
    """The ``[[token]]`` tables of a parsed file, or None if it is not the named format."""
    tables = None if data is None else data.get("token")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        return None
    return tables


def _parse_named(text: str, path: Path) -> tuple[StoredToken, ...] | None:
    """The tokens of a named token file, or None if ``text`` is in another format."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # A line starting with "[" is a (possibly misspelt) table header, never a token: a
        # broken named file must not be read as a one-token-per-line file that accepts it.
        if any(_ANY_HEADER.match(line) for line in text.splitlines()):
            raise ConfigError(f"token file {path}: invalid TOML: {exc}") from None
        return None
    tables = _tables(data)
    if tables is None:
        return None
    extra = [key for key in data if key != "token"]
    if extra:
        raise ConfigError(
            f"token file {path}: unknown top-level key {extra[0]!r} "
            "(a token file holds only [[token]] tables)"
        )
    out: list[StoredToken] = []
    names: dict[str, int] = {}
    keys: dict[bytes, str] = {}
    for index, table in enumerate(tables, start=1):
        label = table.get("name")
        where = (
            f"token file {path}: [[token]] {label!r}"
            if isinstance(label, str) and _NAME.fullmatch(label)
            else f"token file {path}: [[token]] #{index}"
        )
        stored = _table_entry(table, where)
        name = stored.entry.name
        if name in names:
            raise ConfigError(
                f"token file {path}: [[token]] #{index}: key 'name': duplicate name {name!r} "
                f"(also in table #{names[name]})"
            )
        if stored.entry.stored_key in keys:
            raise ConfigError(
                f"{where}: key 'hash': same token as [[token]] {keys[stored.entry.stored_key]!r}"
            )
        names[name] = index
        keys[stored.entry.stored_key] = name
        out.append(stored)
    return tuple(out)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"token file {path}: cannot read: {reason}") from None


def _is_blank(text: str) -> bool:
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def read_tokens(path: Path) -> tuple[StoredToken, ...]:
    """Every token of ``path``, in either format (plaintext lines become unnamed entries).

    Raises:
        ConfigError: Unreadable file, invalid table or line, or no token at all.
    """
    named = _parse_named(_read(path), path)
    if named is None:
        tokens = read_token_file(path)
        return tuple(StoredToken(plaintext_entry(t), plaintext_line=True) for t in tokens)
    check_private_file(path, "token file")
    return named


def load_token_file(path: Path) -> tuple[tuple[str, ...], tuple[TokenEntry, ...]]:
    """What ``--token-file`` gives the relay: ``(plaintext tokens, named entries)``.

    One of the two is empty: a named token file gives entries, a one-per-line file tokens.

    Raises:
        ConfigError: As :func:`read_tokens`.
    """
    stored = read_tokens(path)
    if stored and stored[0].plaintext_line:
        return tuple(s.entry.secret or "" for s in stored), ()
    return (), tuple(s.entry for s in stored)


def is_named_token_file(path: Path) -> bool:
    """True if ``path`` is readable and holds ``[[token]]`` tables (for clearer client errors)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return _tables(_load(text)) is not None


def list_tokens(path: Path) -> tuple[StoredToken, ...]:
    """The tokens of ``path`` for ``token list``; an existing file without tokens gives ().

    Raises:
        ConfigError: The file is missing, unreadable or invalid.
    """
    if not path.exists():
        raise ConfigError(
            f"token file {path}: does not exist (create it with `muxtunnel token add NAME`)"
        )
    if _is_blank(_read(path)):
        return ()
    return read_tokens(path)


# ---------------------------------------------------------------------------------------
# Writing


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (validated values: ASCII, no control)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: temp file (mode 0600) in the same dir, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(text.encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"token file {path}: cannot write: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _target(path: Path) -> Path:
    """Where writes go: a symlinked token file is updated in place of its target."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _existing(path: Path) -> tuple[str, tuple[StoredToken, ...]]:
    """The current text of a token file we are about to change, and its tokens."""
    if not path.exists():
        return "", ()
    text = _read(path)
    if _is_blank(text):
        return text, ()
    named = _parse_named(text, path)
    if named is None:
        raise ConfigError(
            f"token file {path}: holds tokens one per line; `muxtunnel token` manages TOML "
            "token files only (use another file, or edit this one by hand)"
        )
    return text, named


def add_token(
    path: Path,
    name: str,
    *,
    ports: Sequence[str | int] | None = None,
    max_tunnels: int | None = None,
    max_streams: int | None = None,
    max_sessions: int | None = None,
    max_visitors: int | None = None,
    bandwidth: str | int | None = None,
    tunnel_bandwidth: str | int | None = None,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    publish: Sequence[str] | None = None,
    visit: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> str:
    """Generate a token, append its ``[[token]]`` table to ``path`` and return the token.

    The file (mode 0600) and its directory (mode 0700) are created if needed; the rest of an
    existing file is kept as it is. Policy values are checked as the relay would check them.

    Raises:
        ConfigError: Invalid name or value, a token of that name exists already, or the file
            cannot be read or written.
    """
    check_name(name)
    where = f"token {name!r}"
    token = generate_token()
    created = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    table: dict[str, object] = {
        "name": name,
        "hash": format_stored_key(stored_key(token)),
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if ports is not None:
        table["ports"] = _format_ports(parse_ports(list(ports), f"{where}: ports"))
    counts = {
        "max_tunnels": max_tunnels,
        "max_streams": max_streams,
        "max_sessions": max_sessions,
        "max_visitors": max_visitors,
    }
    table.update({key: count for key, count in counts.items() if count is not None})
    for key, rate in (("bandwidth", bandwidth), ("tunnel_bandwidth", tunnel_bandwidth)):
        if rate is not None:
            table[key] = format_rate(parse_rate(rate, f"{where}: {key}"))
    for key, cidrs in (("allow", allow), ("deny", deny)):
        if cidrs:
            table[key] = [_cidr(n) for n in parse_cidrs(list(cidrs), f"{where}: {key}")]
    if publish is not None:
        table["publish"] = list(publish)
    if visit:
        table["visit"] = list(visit)
    _table_entry(table, where)  # every value as the relay will read it

    target = _target(path)
    ensure_private_dir(target.parent)
    text, existing = _existing(target)
    if any(s.entry.name == name for s in existing):
        raise ConfigError(
            f"token file {path}: a token named {name!r} exists already "
            f"(remove it first: muxtunnel token remove {name})"
        )
    block = "[[token]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
    if not text:
        new_text = HEADER + block
    else:
        new_text = text + ("" if text.endswith("\n") else "\n") + "\n" + block
    _atomic_write(target, new_text)
    return token


def _table_lines(lines: list[str], index: int) -> tuple[int, int] | None:
    """Line span ``[start, end)`` of the ``index``-th ``[[token]]`` table, or None."""
    headers = [i for i, line in enumerate(lines) if _TABLE_HEADER.fullmatch(line.rstrip("\r\n"))]
    if index >= len(headers):
        return None
    start = headers[index]
    end = next((i for i in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines))
    # Blank lines and comments right before the next table belong to it.
    while end > start + 1 and (
        not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")
    ):
        end -= 1
    return start, end


def remove_token(path: Path, name: str) -> None:
    """Remove the table of the token ``name`` from ``path``, keeping every other line.

    Raises:
        ConfigError: No file, no token of that name, or a file whose layout cannot be edited
            safely (then it is left as it is).
    """
    target = _target(path)
    if not target.exists():
        raise ConfigError(f"token file {path}: does not exist")
    text, existing = _existing(target)
    names = [s.entry.name for s in existing]
    if name not in names:
        have = ", ".join(names) if names else "none"
        raise ConfigError(f"token file {path}: no token named {name!r} (it has: {have})")
    index = names.index(name)
    lines = text.splitlines(keepends=True)
    span = _table_lines(lines, index)
    tables = _tables(_load(text)) or []
    expected = tables[:index] + tables[index + 1 :]
    new_text = None
    if span is not None:
        start, end = span
        kept = lines[:start] + lines[end:]
        if (
            start > 0
            and not lines[start - 1].strip()
            and (start >= len(kept) or not kept[start].strip())
        ):
            del kept[start - 1]  # no double blank line where the table was
        candidate = "".join(kept)
        data = _load(candidate)
        if data is not None and (_tables(data) or []) == expected:
            new_text = candidate
    if new_text is None:
        raise ConfigError(
            f"token file {path}: cannot find the lines of token {name!r} safely; edit the file by hand"
        )
    _atomic_write(target, new_text)


# ---------------------------------------------------------------------------------------
# Display


def policy_summary(policy: TokenPolicy) -> str:
    """One line describing ``policy`` for ``token list`` (``no limits`` for the open policy)."""
    parts: list[str] = []
    if policy.ports is not None:
        parts.append("ports " + ",".join(str(p) for p in _format_ports(policy.ports)))
    for label, value in (
        ("tunnels", policy.max_tunnels),
        ("streams", policy.max_streams),
        ("sessions", policy.max_sessions),
        ("visitors/tunnel", policy.max_visitors),
    ):
        if value is not None:
            parts.append(f"{label} {value}")
    if policy.bandwidth is not None:
        parts.append(f"bandwidth {format_rate(policy.bandwidth)}B/s")
    if policy.tunnel_bandwidth is not None:
        parts.append(f"bandwidth/tunnel {format_rate(policy.tunnel_bandwidth)}B/s")
    if policy.visitors.allow:
        parts.append("allow " + ",".join(map(_cidr, policy.visitors.allow)))
    if policy.visitors.deny:
        parts.append("deny " + ",".join(map(_cidr, policy.visitors.deny)))
    if policy.publish != ("*",):
        parts.append("publish " + (",".join(policy.publish) or "none"))
    if policy.visit:
        parts.append("visit " + ",".join(policy.visit))
    return "; ".join(parts) or "no limits"


def token_json(stored: StoredToken) -> dict[str, object]:
    """``token list --json`` object of one token: name, created and policy; never a secret."""
    policy = stored.entry.policy
    return {
        "name": stored.entry.name,
        "created": stored.created,
        "plaintext": stored.entry.secret is not None,
        "ports": None if policy.ports is None else _format_ports(policy.ports),
        "max_tunnels": policy.max_tunnels,
        "max_streams": policy.max_streams,
        "max_sessions": policy.max_sessions,
        "max_visitors": policy.max_visitors,
        "bandwidth": policy.bandwidth,
        "tunnel_bandwidth": policy.tunnel_bandwidth,
        "allow": [_cidr(n) for n in policy.visitors.allow],
        "deny": [_cidr(n) for n in policy.visitors.deny],
        "publish": list(policy.publish),
        "visit": list(policy.visit),
    }
