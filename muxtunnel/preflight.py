"""Checks the relay makes before it creates or prints anything.

``muxtunnel server`` generates a certificate and a token on first start and prints the token
once. If its listener cannot be bound (the port is taken by another relay or service), it must
say so first and leave nothing new behind: :func:`check_listen` binds each address the way
:func:`trio.open_tcp_listeners` will, then lets go.
"""

from __future__ import annotations

import errno

import trio

from muxtunnel.config import format_host_port
from muxtunnel.errors import MuxtunnelError

__all__ = ["ListenError", "check_listen", "listen_error"]


class ListenError(MuxtunnelError):
    """An address the relay was told to listen on cannot be bound."""


def listen_error(host: str, port: int, option: str, exc: OSError) -> ListenError:
    """One line naming the address, the option that set it and what to do."""
    address = format_host_port(host, port)
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        hint = f"is another relay or service using it? Stop it or choose another {option} HOST:PORT"
    else:
        hint = f"choose another {option} HOST:PORT"
    return ListenError(f"cannot listen on {address} ({option}): {reason} — {hint}")


async def _probe(host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    for listener in listeners:
        await listener.aclose()


def check_listen(host: str, port: int, option: str) -> None:
    """Fail now if ``host:port`` cannot be listened on; port 0 always can.

    Raises:
        ListenError: The address is in use, not local, or not allowed.
    """
    if port == 0:
        return
    try:
        trio.run(_probe, host, port)
    except OSError as exc:
        raise listen_error(host, port, option, exc) from None
