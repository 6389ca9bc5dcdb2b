"""``muxtunnel demo``: a relay and a client in one process on loopback, with a self-check.

Everything is generated in a temporary directory (token, certificate, known-hosts file) and
removed at the end. The client exposes a built-in echo service (or the given local port), the
forwarding line is printed, and a self-check pushes data through the public port: with the
echo service, 64 MiB checked with SHA-256 and 1,000 small round trips (throughput in MB/s,
latency p50/p99 in microseconds); with ``--local``, one connection is opened through the tunnel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from muxtunnel.client import ClientInfo, run_client
from muxtunnel.config import ClientConfig, ServerConfig, TunnelSpec
from muxtunnel.server import ServerInfo, serve
from muxtunnel.tokens import generate_token

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)

#: Bulk self-check size and chunking.
BULK_BYTES = 64 * 1024 * 1024
_CHUNK = 256 * 1024
#: Small round trips in the latency self-check, and their size.
ROUND_TRIPS = 1000
_PING_SIZE = 64


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(262144):
            await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _serve_echo(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = int(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        task_status.started(port)
        await trio.serve_listeners(_echo, listeners, handler_nursery=nursery)


async def _bulk_check(port: int, total: int) -> tuple[bool, float]:
    """Send ``total`` bytes through the echo tunnel, check the SHA-256; return (ok, MB/s)."""
    block = os.urandom(1024 * 1024)
    sent_hash = hashlib.sha256()
    recv_hash = hashlib.sha256()
    received = 0
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    async with stream:

        async def sender() -> None:
            remaining = total
            i = 0
            while remaining:
                # Vary the data per megabyte so that reordering would be caught.
                chunk = (i.to_bytes(8, "big") + block[8:])[: min(len(block), remaining)]
                sent_hash.update(chunk)
                view = memoryview(chunk)
                for off in range(0, len(view), _CHUNK):
                    await stream.send_all(view[off : off + _CHUNK])
                remaining -= len(chunk)
                i += 1
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while data := await stream.receive_some(262144):
                recv_hash.update(data)
                received += len(data)
    elapsed = trio.current_time() - start
    ok = received == total and recv_hash.digest() == sent_hash.digest()
    return ok, total / elapsed / 1e6


async def _latency_check(port: int) -> tuple[bool, float, float]:
    """ROUND_TRIPS small echoes on one connection; return (ok, p50 µs, p99 µs)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    samples: list[float] = []
    ok = True
    async with stream:
        for i in range(ROUND_TRIPS):
            msg = i.to_bytes(4, "big") * (_PING_SIZE // 4)
            start = trio.current_time()
            await stream.send_all(msg)
            got = b""
            while len(got) < len(msg):
                data = await stream.receive_some(len(msg) - len(got))
                if not data:
                    break
                got += data
            samples.append(trio.current_time() - start)
            if got != msg:
                ok = False
                break
        # Close cleanly: FIN, then wait for the echo service's FIN through the tunnel.
        await stream.send_eof()
        while await stream.receive_some(4096):
            pass
    if len(samples) < 2:  # the first echo came back wrong: too few samples for percentiles
        return False, 0.0, 0.0
    cuts = statistics.quantiles(samples, n=100)
    return ok, cuts[49] * 1e6, cuts[98] * 1e6


async def _connect_check(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    async with stream:
        with trio.move_on_after(0.5):
            try:
                await stream.receive_some(1)
            except (trio.BrokenResourceError, OSError):
                return False
    return True


async def run_demo(
    *,
    local_port: int | None,
    once: bool,
    report: Callable[[str], None] = print,
    shutdown: trio.Event | None = None,
    bulk_bytes: int = BULK_BYTES,
) -> bool:
    """Run relay + client on loopback, self-check the tunnel, then wait for ``shutdown``.

    Args:
        local_port: Expose this local port instead of the built-in echo service.
        once: Return right after the self-check.
        report: Receives the user-facing lines.
        shutdown: Ends the demo when set (the CLI sets it on Ctrl-C); None waits forever.
        bulk_bytes: Size of the bulk self-check (default 64 MiB).

    Returns:
        True if the self-check passed.
    """
    with tempfile.TemporaryDirectory(prefix="muxtunnel-demo-") as tmp:
        state = Path(tmp)
        token = generate_token()
        relay_done = trio.Event()
        client_done = trio.Event()
        async with trio.open_nursery() as nursery:
            relay_stop = trio.Event()
            client_stop = trio.Event()
            server_config = ServerConfig(
                listen_host="127.0.0.1",
                listen_port=0,
                bind_host="127.0.0.1",
                tokens=(token,),
                state_dir=state / "relay",
            )

            async def relay_task(
                *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED
            ) -> None:
                try:
                    await serve(
                        server_config, shutdown=relay_stop, report=report, task_status=task_status
                    )
                finally:
                    relay_done.set()

            relay = await nursery.start(relay_task)
            report(f"relay fingerprint: {relay.fingerprint}")
            if local_port is None:
                target = await nursery.start(_serve_echo)
                report(f"built-in echo service on 127.0.0.1:{target}")
            else:
                target = local_port
            client_config = ClientConfig(
                server_host="127.0.0.1",
                server_port=relay.port,
                token=token,
                fingerprint=relay.fingerprint,
                state_dir=state / "client",
                tunnels=(TunnelSpec(local_port=target),),
                max_retries=0,
            )

            async def client_task(
                *, task_status: trio.TaskStatus[ClientInfo] = trio.TASK_STATUS_IGNORED
            ) -> None:
                try:
                    await run_client(
                        client_config, shutdown=client_stop, report=report, task_status=task_status
                    )
                finally:
                    client_done.set()

            info = await nursery.start(client_task)
            if not info.tunnels:
                report("self-check FAILED: the tunnel did not come up")
                ok = False
            else:
                port = info.tunnels[0].remote_port
                ok = await _self_check(port, bulk_bytes, echo=local_port is None, report=report)
            if not once:
                report("demo running; press Ctrl-C to stop")
                if shutdown is None:
                    await trio.sleep_forever()
                else:
                    await shutdown.wait()
            client_stop.set()
            with trio.move_on_after(5):
                await client_done.wait()
            relay_stop.set()
            with trio.move_on_after(15):
                await relay_done.wait()
            nursery.cancel_scope.cancel()
    return ok


async def _self_check(
    port: int, bulk_bytes: int, *, echo: bool, report: Callable[[str], None]
) -> bool:
    if not echo:
        ok = await _connect_check(port)
        report(
            f"self-check {'passed' if ok else 'FAILED'}: connection through tcp://127.0.0.1:{port}"
        )
        return ok
    bulk_ok, rate = await _bulk_check(port, bulk_bytes)
    report(
        f"self-check bulk: {bulk_bytes / (1024 * 1024):g} MiB echoed, sha256 {'ok' if bulk_ok else 'MISMATCH'}, "
        f"{rate:.0f} MB/s each way"
    )
    lat_ok, p50, p99 = await _latency_check(port)
    report(
        f"self-check latency: {ROUND_TRIPS} round trips of {_PING_SIZE} B, "
        f"p50 {p50:.0f} us, p99 {p99:.0f} us{'' if lat_ok else ' (MISMATCH)'}"
    )
    ok = bulk_ok and lat_ok
    report(f"self-check {'passed' if ok else 'FAILED'}")
    return ok
