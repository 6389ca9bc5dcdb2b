"""Relay tokens: generation, the state-dir token file, and ``--token-file``.

A token is a shared secret between the relay and its clients. It never crosses the wire:
the client proves it knows the token with HMAC-SHA256 over nonces from both sides
(protocol-spec.md, authentication).

Secrets on disk are checked, never silently trusted: a token file (or a config file holding a
token) that other users can read, and a state dir that other users can write (they could
replace the relay's key and token or the client's pinned fingerprints), each get one warning
naming the path and the ``chmod`` that fixes it (protocol-spec.md §16.3).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import stat
from typing import TYPE_CHECKING

from muxtunnel.access import OPEN_POLICY, TokenEntry
from muxtunnel.errors import ConfigError, state_file_error
from muxtunnel.protocol.auth import stored_key

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "TOKEN_FILE_NAME",
    "check_private_dir",
    "check_private_file",
    "ensure_private_dir",
    "generate_token",
    "load_or_create_token",
    "plaintext_entry",
    "read_token_file",
    "token_id",
    "write_private_file",
]

logger = logging.getLogger(__name__)

#: Name of the generated token's file inside the relay's state dir.
TOKEN_FILE_NAME = "token"


def generate_token() -> str:
    """Return a fresh random token (32 random bytes, URL-safe base64: 43 characters)."""
    return secrets.token_urlsafe(32)


def token_id(token: str) -> str:
    """A short, non-secret id for a token (for logs and lease ownership)."""
    return hashlib.sha256(b"muxtunnel token id\x00" + token.encode("utf-8")).hexdigest()[:12]


def plaintext_entry(token: str) -> TokenEntry:
    """The relay's entry for a token configured in clear: named by :func:`token_id`, no policy.

    The entry keeps the token (``secret``), so clients using AUTH method 1 are accepted too.
    """
    return TokenEntry(
        name=token_id(token), stored_key=stored_key(token), policy=OPEN_POLICY, secret=token
    )


#: (kind, path) pairs already warned about in this process: one warning each.
_warned: set[tuple[str, str]] = set()


def _warn_once(kind: str, path: Path, message: str, *args: object) -> None:
    key = (kind, os.path.abspath(path))
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def check_private_file(path: Path, what: str, note: str = "") -> bool:
    """Warn once if ``path`` (a file holding a secret) is accessible to group or others.

    ``what`` names the kind of file (``"token file"``), ``note`` is added after the mode
    (``" and holds a token"``). Returns True if the mode is private (or cannot be read).
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return True
    if not mode & 0o077:
        return True
    _warn_once(
        "file",
        path,
        "%s %s is accessible to other users (mode %04o)%s; run: chmod 600 %s",
        what,
        path,
        mode,
        note,
        path,
    )
    return False


def check_private_dir(path: Path) -> bool:
    """Warn once if the state dir ``path`` is writable by group or others.

    Whoever can write there can replace the relay's key and token or the client's pinned
    fingerprints. Returns True if the mode is safe (or the directory cannot be inspected).
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return True
    if not mode & 0o022:
        return True
    _warn_once(
        "dir",
        path,
        "state dir %s is writable by other users (mode %04o), who could replace its keys, "
        "tokens or pinned fingerprints; run: chmod 700 %s",
        path,
        mode,
        path,
    )
    return False


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; a directory we create gets mode 0700.

    An existing directory writable by group or others gets a warning (:func:`check_private_dir`).

    Raises:
        ConfigError: The directory cannot be created.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file in the way: said below
    except OSError as exc:
        raise state_file_error("create the directory", path, exc) from None
    if not path.is_dir():
        raise state_file_error("use", path, NotADirectoryError(errno.ENOTDIR, "Not a directory"))
    check_private_dir(path)


def write_private_file(path: Path, data: bytes) -> bool:
    """Create ``path`` with mode 0600 holding ``data``, unless it already exists.

    The file is written under a temporary name and linked into place, so a reader never
    sees a partial file and two processes racing to create it agree on one content.

    Returns:
        True if this call created the file, False if it existed already.

    Raises:
        ConfigError: The file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise state_file_error("write", path, exc) from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def _tokens_in(text: str) -> list[str]:
    tokens = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise ValueError("a token must not contain whitespace")
        if line.startswith("["):
            raise ValueError(f"{line[:20]!r} looks like a TOML table header, not a token")
        tokens.append(line)
    return tokens


def read_token_file(path: Path) -> tuple[str, ...]:
    """Read tokens from ``path``: one per line, blank lines and ``#`` comments ignored.

    A file accessible to group or others gets a warning (:func:`check_private_file`).

    Raises:
        ConfigError: The file is unreadable, has a malformed line, or holds no token.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"token file {path}: cannot read: {reason}") from None
    try:
        tokens = _tokens_in(text)
    except ValueError as exc:
        raise ConfigError(f"token file {path}: {exc}") from None
    if not tokens:
        raise ConfigError(f"token file {path}: contains no token")
    check_private_file(path, "token file")
    return tuple(dict.fromkeys(tokens))


def load_or_create_token(state_dir: Path) -> tuple[str, bool]:
    """Return the relay's stored token, generating and storing one (mode 0600) if none exists.

    Returns:
        ``(token, created)``; ``created`` is True when this call generated it, so the caller
        prints it once.

    Raises:
        ConfigError: The state dir or the token file cannot be used.
    """
    ensure_private_dir(state_dir)
    path = state_dir / TOKEN_FILE_NAME
    if not path.exists():
        token = generate_token()
        if write_private_file(path, f"{token}\n".encode()):
            return token, True
    try:
        path.open("rb").close()
    except OSError as exc:
        raise state_file_error("read", path, exc) from None
    return read_token_file(path)[0], False
