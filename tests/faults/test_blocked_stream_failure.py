"""A stream blocked on its peer's window fails (peer reset, session lost): one stream ends.

Found by the link-cut test: when the session ended under a visitor stream that had waited for
window longer than ``muxtunnel.splice.RESET_POLL`` (so its local socket was being watched for a
reset), the stream's error left ``splice`` inside an ExceptionGroup and ended the relay's whole
session handler with "internal error". In process, real loopback TCP on the local side.
"""

from __future__ import annotations

import socket

import trio

from muxtunnel.errors import ErrorCode
from muxtunnel.splice import RESET_POLL, SpliceResult, splice
from tests.conftest import mux_connection_pair, mux_stream_pair


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    near = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
    far_sock, _ = await listener.accept()
    listener.close()
    return near, trio.SocketStream(far_sock)


async def test_peer_reset_of_a_stream_blocked_on_window_ends_only_that_stream() -> None:
    async with trio.open_nursery() as nursery:
        server, client = await mux_connection_pair(nursery)
        relay_side, client_side = await mux_stream_pair(server, client)
        local, app = await _tcp_pair()
        results: list[SpliceResult] = []
        done = trio.Event()

        async def run_splice() -> None:
            results.append(await splice(local, relay_side))
            done.set()

        async def flood() -> None:  # the local application writes more than the windows hold
            chunk = b"x" * 65536
            with trio.move_on_after(30):
                try:
                    while True:
                        await app.send_all(chunk)
                except trio.BrokenResourceError:
                    pass  # the splice aborted its side (RST) when the stream failed

        nursery.start_soon(run_splice)
        nursery.start_soon(flood)
        with trio.fail_after(20):
            while not relay_side.send_blocked:  # noqa: ASYNC110 - a property, no event to wait on
                await trio.sleep(0.05)
        await trio.sleep(RESET_POLL * 2)  # long enough for the reset watcher to be running
        client_side.reset(ErrorCode.CANCEL, "peer gives up")
        with trio.fail_after(10):
            await done.wait()
        (result,) = results
        assert result.error is not None
        assert result.failed_side == "mux"
        assert not server.closed, "one stream's failure ended the whole session"
        # The session still carries other streams.
        s2, c2 = await mux_stream_pair(server, client)
        await s2.send_all(b"ping")
        assert await c2.receive_some(4) == b"ping"
        await app.aclose()
        server.close(ErrorCode.NO_ERROR, "done")
        client.close(ErrorCode.NO_ERROR, "done")
        nursery.cancel_scope.cancel()
