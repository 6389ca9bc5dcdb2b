"""A cuttable TCP forwarder between a client and its relay, for the tests of lost connections.

Each connection it carries is numbered in order of arrival (0 = the first) and counts the bytes
it moved both ways. ``cut()`` aborts (RST, both sockets) one connection or every one, as a path
that died; while ``down`` is set new connections are aborted at once (the relay is unreachable);
``freeze()`` stops moving bytes on the connections carried now but keeps their sockets open (the
path went silent).
"""

from __future__ import annotations

import socket
import struct

import trio

__all__ = ["CutProxy", "abort"]


def abort(stream: trio.SocketStream) -> None:
    """Close ``stream``'s socket with RST (SO_LINGER 0); tasks blocked on it wake up."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.socket.close()


class CutProxy:
    """Forwards every connection it accepts (``handle``) to ``target_port`` on 127.0.0.1."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = False
        #: Bytes each connection moved so far, both ways, by number.
        self.bytes_moved: list[int] = []
        self._pairs: dict[int, tuple[trio.SocketStream, trio.SocketStream]] = {}
        self._frozen: set[int] = set()

    @property
    def carried(self) -> int:
        """Connections carried to the relay so far."""
        return len(self.bytes_moved)

    def live(self) -> list[int]:
        """Numbers of the connections open now."""
        return sorted(self._pairs)

    def cut(self, *, down: bool, number: int | None = None) -> None:
        """Abort connection ``number`` (None: every one); then new ones pass unless ``down``."""
        self.down = down
        for key in list(self._pairs) if number is None else [number]:
            for stream in self._pairs.pop(key, ()):
                abort(stream)

    def freeze(self) -> None:
        """Stop moving bytes on every connection carried now (their sockets stay open)."""
        self._frozen.update(self._pairs)

    async def _pump(self, number: int, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                if number in self._frozen:
                    await trio.sleep_forever()
                self.bytes_moved[number] += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def handle(self, down: trio.SocketStream) -> None:
        """Serve one connection (pass it to ``start_service``)."""
        if self.down:
            abort(down)
            return
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            abort(down)
            return
        number = len(self.bytes_moved)
        self.bytes_moved.append(0)
        self._pairs[number] = (down, up)
        try:
            async with trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    await self._pump(number, src, dst)
                    nursery.cancel_scope.cancel()  # one way ended: the connection is over

                nursery.start_soon(pump, down, up)
                nursery.start_soon(pump, up, down)
        finally:
            self._pairs.pop(number, None)
            self._frozen.discard(number)
            abort(down)
            abort(up)
