"""Relay tokens: generation, the state-dir token file, and ``--token-file``.

A token is a shared secret between the relay and its clients. It never crosses the wire:
the client proves it knows the token with HMAC-SHA256 over nonces from both sides
(protocol-spec.md, authentication).
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING

from muxtunnel.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "TOKEN_FILE_NAME",
    "ensure_private_dir",
    "generate_token",
    "load_or_create_token",
    "read_token_file",
    "write_private_file",
]

#: Name of the generated token's file inside the relay's state dir.
TOKEN_FILE_NAME = "token"


def generate_token() -> str:
    """Return a fresh random token (32 random bytes, URL-safe base64: 43 characters)."""
    return secrets.token_urlsafe(32)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; a directory we create gets mode 0700.

    Raises:
        ConfigError: The directory cannot be created.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state dir {path}: cannot create: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError(f"state dir {path}: not a directory")


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
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
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
        tokens.append(line)
    return tokens


def read_token_file(path: Path) -> tuple[str, ...]:
    """Read tokens from ``path``: one per line, blank lines and ``#`` comments ignored.

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
    return read_token_file(path)[0], False
