"""A small read-only HTTP/1.0 server for local endpoints: the admin status and the metrics.

Local input is bounded like any other: a request head is read up to ``max_request`` bytes
within ``read_timeout`` (then 431 or 408), at most ``max_clients`` connections are served at
once (more are closed at once), and an error answer is followed by a bounded linger, so the
client can read it before the connection closes. Each request is answered by a pure function
of its head; one connection carries one request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Sequence

__all__ = ["REASONS", "LocalEndpoint", "response", "route"]

logger = logging.getLogger(__name__)

#: Reason phrases of the status codes these endpoints send.
REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def response(code: int, body: bytes, content_type: str, *, head_only: bool = False) -> bytes:
    """A complete HTTP/1.0 response (``head_only``: the headers of it, for a HEAD request)."""
    head = (
        f"HTTP/1.0 {code} {REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def route(head: bytes, paths: Collection[bytes], hint: str) -> tuple[int, str]:
    """Judge the request line of ``head``: ``(200, "HEAD" or "GET")`` for a GET or HEAD of one
    of ``paths`` (a query string is ignored), else ``(code, message)`` for the error answer;
    ``hint`` (``GET /status``) goes into the 404 message."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return 400, "malformed request line"
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target not in paths:
        return 404, f"unknown path; try {hint}"
    if method not in (b"GET", b"HEAD"):
        return 405, "only GET is supported"
    return 200, method.decode("ascii")


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalEndpoint:
    """One endpoint: how to answer, how to phrase errors, and its bounds."""

    #: For log lines (``admin endpoint``).
    name: str
    #: The full response to a request head (pure; an exception gives a 500).
    answer: Callable[[bytes], bytes]
    #: The full response for an error ``code`` with a message.
    error: Callable[[int, str], bytes]
    max_request: int
    read_timeout: float
    max_clients: int
    #: After an error answer, input read and dropped before closing (bytes, seconds).
    linger_bytes: int = 65536
    linger_time: float = 1.0

    def start(self, nursery: trio.Nursery, listeners: Sequence[trio.SocketListener]) -> None:
        """Serve every listener in ``nursery`` until it is cancelled."""
        limiter = trio.CapacityLimiter(self.max_clients)
        for listener in listeners:
            nursery.start_soon(self._accept_loop, listener, limiter)

    async def _accept_loop(
        self, listener: trio.SocketListener, limiter: trio.CapacityLimiter
    ) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn = await listener.accept()
                except OSError as exc:  # e.g. out of descriptors: keep serving
                    logger.warning("%s: accept failed: %s", self.name, exc.strerror or exc)
                    await trio.sleep(0.1)
                    continue
                try:
                    limiter.acquire_on_behalf_of_nowait(conn)
                except trio.WouldBlock:
                    await trio.aclose_forcefully(conn)
                    continue
                nursery.start_soon(self._serve_one, conn, limiter)

    async def _read_head(self, conn: trio.SocketStream) -> bytes | int | None:
        """The request head, an error code (400, 408, 431), or None (closed, nothing sent)."""
        data = b""
        with trio.move_on_after(self.read_timeout):
            while b"\r\n\r\n" not in data and b"\n\n" not in data:
                if len(data) > self.max_request:
                    return 431
                chunk = await conn.receive_some(self.max_request + 1)
                if not chunk:
                    return 400 if data else None
                data += chunk
            return data
        return 408

    async def _linger(self, conn: trio.SocketStream) -> None:
        """FIN, then drop what the client still sends (bounded): closing with unread input
        would reset the connection before the client has read the error answer."""
        await conn.send_eof()
        left = self.linger_bytes
        with trio.move_on_after(self.linger_time):
            while left > 0:
                chunk = await conn.receive_some(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)

    async def _serve_one(self, conn: trio.SocketStream, limiter: trio.CapacityLimiter) -> None:
        try:
            head = await self._read_head(conn)
            if head is None:
                return
            if isinstance(head, int):
                answer = self.error(head, REASONS[head])
            else:
                try:
                    answer = self.answer(head)
                except Exception:
                    logger.exception("%s: internal error", self.name)
                    answer = self.error(500, "internal error")
            with trio.move_on_after(self.read_timeout):
                await conn.send_all(answer)
                if isinstance(head, int):
                    await self._linger(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            limiter.release_on_behalf_of(conn)
            await trio.aclose_forcefully(conn)
