"""What Python + trio can do on this machine: a bare two-process multiplexing relay.

``python -m muxtunnel.benchsuite.ceiling`` starts the bench service (echo), a *relay* process and
a *client* process joined by ONE connection (plain TCP or TLS), then measures idle 64-byte round
trips, new connections per second and (``--what bulk``) one-stream put/get and many concurrent
puts with the suite's own load generator, next to direct TCP.

The relay and client here do the least a multiplexing tunnel can do in trio: 9-byte frames
(stream id, kind, length), no flow control, no scheduler, no auth. The task that reads a frame
writes its payload straight into the destination socket, and the task that reads a visitor or
service socket writes the frame straight into the tunnel socket (under a lock): one task wake-up
per crossing. With ``--raw`` the hot path uses the non-blocking stdlib socket calls and waits
with ``trio.lowlevel.wait_readable``/``wait_writable`` only when a call would block (no trio
checkpoint per call); with ``--raw --tls`` the tunnel is a non-blocking ``ssl.SSLSocket`` (OpenSSL
does the socket I/O: the least Python per byte TLS can cost); ``--tls --fast`` uses muxtunnel's
own :class:`~muxtunnel.tlsstream.TLSStream` instead of ``trio.SSLStream``, and ``--tls --fast
--raw`` that with raw calls on the local sockets (muxtunnel's own combination). Variants for
``run``: direct, tcp, raw, tls, tlsfast, rawtls, tlsfastraw. ``muxtunnel bench`` runs the
``--tls --raw`` pair as its ``ceiling`` target beside muxtunnel and ssh. Figures from this tool
are the ceiling for the tunnel's idle RTT, connection rate and bulk rate, not a tunnel anyone
should use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

HDR = struct.Struct("!IBI")  # stream id, kind, payload length
OPEN, DATA, EOF = 1, 2, 3
CHUNK = 65536


class _Tunnel:
    """One end of the tunnel connection: framed writes under a lock, frames read in a loop."""

    def __init__(
        self, stream: trio.abc.Stream, raw: socket.socket | None, *, local_raw: bool = False
    ) -> None:
        self.stream = stream
        self.raw = raw
        #: Whether the local sockets use raw non-blocking calls (always with a raw tunnel).
        self.local_raw = local_raw or raw is not None
        self.lock = trio.StrictFIFOLock()
        self.socks: dict[int, Any] = {}
        self.pending: dict[int, list[bytes]] = {}

    async def send(self, sid: int, kind: int, data: bytes = b"") -> None:
        frame = HDR.pack(sid, kind, len(data)) + data
        if self.raw is not None and not self.lock.locked():
            # Uncontended: one non-blocking send, no checkpoint. Only a partial send takes the
            # lock (trio allows one writability waiter per socket; frames must not interleave).
            try:
                sent = self.raw.send(frame)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            if sent == len(frame):
                return
            self.lock.acquire_nowait()
            try:
                await _raw_send_all(self.raw, memoryview(frame)[sent:])
            finally:
                self.lock.release()
            return
        async with self.lock:
            if self.raw is not None:
                await _raw_send_all(self.raw, frame)
                return
            await self.stream.send_all(frame)

    async def read_frames(self, on_frame: Callable[[int, int, bytes], Awaitable[None]]) -> None:
        buf = bytearray()
        while True:
            data: bytes | bytearray
            if self.raw is not None:
                data = await _raw_recv(self.raw, 262144)
            else:
                data = await self.stream.receive_some(262144)
            if not data:
                return
            buf += data
            pos = 0
            while len(buf) - pos >= HDR.size:
                sid, kind, n = HDR.unpack_from(buf, pos)
                end = pos + HDR.size + n
                if len(buf) < end:
                    break
                payload = bytes(buf[pos + HDR.size : end])
                pos = end
                await on_frame(sid, kind, payload)
            del buf[:pos]


async def _raw_recv(sock: socket.socket, n: int) -> bytes:
    while True:
        try:
            return sock.recv(n)
        except (BlockingIOError, ssl.SSLWantReadError):
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(sock)


async def _raw_send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            await trio.lowlevel.wait_writable(sock)
            continue
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)
            continue
        view = view[sent:]


async def _local_send(tun: _Tunnel, s: Any, data: bytes) -> None:
    if tun.local_raw:
        await _raw_send_all(s, data)
    else:
        await s.send_all(data)


async def _pump(tun: _Tunnel, sid: int, s: Any) -> None:
    """Local socket -> tunnel frames until EOF."""
    try:
        while True:
            if tun.local_raw:
                data = await _raw_recv(s, CHUNK)
            else:
                data = await s.receive_some(CHUNK)
            if not data:
                break
            await tun.send(sid, DATA, data)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        await tun.send(sid, EOF)


async def _on_frame_common(tun: _Tunnel, sid: int, kind: int, payload: bytes) -> None:
    s = tun.socks.get(sid)
    if s is None:
        if sid in tun.pending:
            tun.pending[sid].append(payload if kind == DATA else b"")
        return
    if kind == DATA:
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await _local_send(tun, s, payload)
    elif kind == EOF:
        del tun.socks[sid]
        if tun.local_raw:
            trio.lowlevel.notify_closing(s)
            s.close()
        else:
            await trio.aclose_forcefully(s)


def _tls_stream(
    args: argparse.Namespace, stream: trio.abc.Stream, ctx: ssl.SSLContext, *, server_side: bool
) -> Any:
    """``trio.SSLStream``, or with ``--fast`` muxtunnel's own :class:`TLSStream`."""
    name = None if server_side else "ceiling"
    if args.fast:
        from muxtunnel.tlsstream import TLSStream

        return TLSStream(stream, ctx, server_side=server_side, server_hostname=name)
    return trio.SSLStream(stream, ctx, server_side=server_side, server_hostname=name)


async def _raw_tls(ctx: ssl.SSLContext, tsock: Any, *, server_side: bool) -> socket.socket:
    """A non-blocking ``ssl.SSLSocket``: OpenSSL reads and writes the socket itself (no BIOs)."""
    sock = socket.socket(fileno=tsock.detach())
    sock.setblocking(False)
    name = None if server_side else "ceiling"
    tls = ctx.wrap_socket(
        sock, server_side=server_side, server_hostname=name, do_handshake_on_connect=False
    )
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls)


def _plain(sock: socket.socket, raw: bool) -> Any:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if raw:
        sock.setblocking(False)
        return sock
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _announce(line: str) -> None:
    print(line, flush=True)


async def relay(args: argparse.Namespace, report: Callable[[str], None] = _announce) -> None:
    """Accept the tunnel, then visitors; each visitor becomes a stream over the tunnel.

    ``report`` gets the line ``tunnel PORT public PORT`` once both listen (default: stdout).
    """
    lst = trio.socket.socket()
    await lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    pub = trio.socket.socket()
    await pub.bind(("127.0.0.1", 0))
    pub.listen(4096)
    report(f"tunnel {lst.getsockname()[1]} public {pub.getsockname()[1]}")
    tsock, _ = await lst.accept()
    tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctx: ssl.SSLContext | None = None
    if args.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
    tun = await _open_tunnel(args, tsock, ctx, server_side=True)
    sids = iter(range(1, 1 << 31))

    async def on_frame(sid: int, kind: int, payload: bytes) -> None:
        await _on_frame_common(tun, sid, kind, payload)

    async def visitor(s: Any, sid: int) -> None:
        tun.socks[sid] = s
        await tun.send(sid, OPEN)
        await _pump(tun, sid, s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tun.read_frames, on_frame)
        while True:
            vs, _ = await pub.accept()
            nursery.start_soon(visitor, _plain(_detach(vs), args.raw), next(sids))


async def _open_tunnel(
    args: argparse.Namespace,
    tsock: trio.socket.SocketType,
    ctx: ssl.SSLContext | None,
    *,
    server_side: bool,
) -> _Tunnel:
    """The tunnel end over the connected ``tsock``: TLS when ``ctx`` is given, raw socket calls
    with ``--raw``, else trio's streams."""
    stream: trio.abc.Stream = trio.SocketStream(tsock)
    raw: socket.socket | None = None
    if ctx is not None:
        if args.raw and not args.fast:
            raw = await _raw_tls(ctx, tsock, server_side=server_side)
        else:
            tls_stream = _tls_stream(args, stream, ctx, server_side=server_side)
            await tls_stream.do_handshake()
            stream = tls_stream
    elif args.raw:
        raw = socket.socket(fileno=os.dup(tsock.fileno()))
        raw.setblocking(False)
    return _Tunnel(stream, raw, local_raw=args.raw)


def _detach(s: trio.socket.SocketType) -> socket.socket:
    return socket.socket(fileno=s.detach())


async def client(args: argparse.Namespace) -> None:
    """Dial the relay; every OPEN dials the service and pumps its replies back."""
    tsock = trio.socket.socket()
    await tsock.connect(("127.0.0.1", args.tunnel_port))
    tsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctx: ssl.SSLContext | None = None
    if args.tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    tun = await _open_tunnel(args, tsock, ctx, server_side=False)

    async def dial(sid: int) -> None:
        try:
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", args.service_port))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(s)
            local = _plain(s, args.raw)
        except OSError:
            tun.pending.pop(sid, None)
            await tun.send(sid, EOF)
            return
        # Frames that arrived during the dial go first, in order; frames arriving while they are
        # written keep queueing here, and the reader writes directly only once the queue is empty.
        early = tun.pending[sid]
        while early:
            chunk = early.pop(0)
            if not chunk:  # EOF before the dial finished
                del tun.pending[sid]
                if args.raw:
                    local.close()
                else:
                    await trio.aclose_forcefully(local)
                return
            await _local_send(tun, local, chunk)
        del tun.pending[sid]
        tun.socks[sid] = local
        await _pump(tun, sid, local)

    async with trio.open_nursery() as nursery:

        async def on_frame(sid: int, kind: int, payload: bytes) -> None:
            if kind == OPEN:
                tun.pending[sid] = []  # frames that arrive before the dial completes
                nursery.start_soon(dial, sid)
            else:
                await _on_frame_common(tun, sid, kind, payload)

        await tun.read_frames(on_frame)


# -- driver -----------------------------------------------------------------------------------


def _run_all(args: argparse.Namespace) -> int:
    from muxtunnel.benchsuite.procs import Child, python
    from muxtunnel.tls import generate_self_signed

    work = Path(tempfile.mkdtemp(prefix="muxceiling-"))
    cert, key = generate_self_signed("ceiling")
    (work / "cert.pem").write_bytes(cert)
    (work / "key.pem").write_bytes(key)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        svc = Child("service", [python(), "-m", "muxtunnel.benchsuite.service"], work)
        sport = int(svc.wait_for(r"^listening \S+ (\d+)", 20).group(1))
        variants = [v for v in args.variants.split(",") if v]
        for _ in range(args.runs):
            for v in variants:
                kids: list[Child] = []
                try:
                    port = sport
                    if v != "direct":
                        flags = {
                            "tcp": [],
                            "tls": ["--tls"],
                            "raw": ["--raw"],
                            "tlsfast": ["--tls", "--fast"],
                            "rawtls": ["--tls", "--raw"],
                            "tlsfastraw": ["--tls", "--fast", "--raw"],
                        }[v]
                        common = ["--cert", str(work / "cert.pem"), "--key", str(work / "key.pem")]
                        r = Child(
                            f"relay-{v}",
                            [
                                python(),
                                "-m",
                                "muxtunnel.benchsuite.ceiling",
                                "relay",
                                *flags,
                                *common,
                            ],
                            work,
                        )
                        kids.append(r)
                        m = r.wait_for(r"^tunnel (\d+) public (\d+)", 20)
                        c = Child(
                            f"client-{v}",
                            [python(), "-m", "muxtunnel.benchsuite.ceiling", "client", *flags, *common,
                             "--tunnel-port", m.group(1), "--service-port", str(sport)],
                            work,
                        )  # fmt: skip
                        kids.append(c)
                        port = int(m.group(2))
                    got = _measure(port, work, args)
                    for metric, val in got.items():
                        results.setdefault(v, {}).setdefault(metric, []).append(val)
                    print(json.dumps({"variant": v, **got}), flush=True)
                finally:
                    for k in kids:
                        k.stop()
        svc.stop()
    finally:
        Child.stop_all()
    shutil.rmtree(work, ignore_errors=True)  # kept (with the children's logs) after a failure
    print(json.dumps({"medians": {v: {k: statistics.median(x) for k, x in d.items()}
                                  for v, d in results.items()}}))  # fmt: skip
    return 0


def _measure(port: int, work: Path, args: argparse.Namespace) -> dict[str, float]:
    from muxtunnel.benchsuite.procs import Child, python

    def load(*a: str) -> dict[str, Any]:
        argv = [python(), "-m", "muxtunnel.benchsuite.load", *a, "--port", str(port)]
        kid = Child("load", argv, work, stdout_pipe=True)
        try:
            while True:
                obj = kid.read_json_line(120)
                if "result" in obj:
                    res: dict[str, Any] = obj["result"]
                    return res
                if "error" in obj:
                    raise RuntimeError(obj["error"])
        finally:
            kid.stop()

    what = set(args.what.split(","))
    got: dict[str, float] = {}
    if "rtt" in what:
        rtt = load("rtt", "--count", str(args.count), "--warmup", "200", "--max-seconds", "30")
        got.update(rtt_p50_us=rtt["p50_us"], rtt_p99_us=rtt["p99_us"])
    if "conn" in what:
        cr = load(
            "connrate", "--duration", "3", "--workers", "16", "--max", "30000", "--timeout", "10"
        )
        got["conn_per_s"] = cr["connections"] / cr["seconds"]
    if "bulk" in what:
        # Scenarios 1 and 2 of `muxtunnel bench`: one stream each way, then many at once (put).
        # The load generator's --timeout bounds each transfer (a stalled run fails, never hangs).
        one = str(args.bulk_bytes)
        limit = str(60 + args.bulk_bytes / 5e6)
        got["put_mbps"] = load("put", "--bytes", one, "--timeout", limit)["mbps"]
        got["get_mbps"] = load("get", "--bytes", one, "--timeout", limit)["mbps"]
        n, each = args.multi_streams, args.multi_bytes
        limit = str(60 + n * each / 5e6)
        multi = load("multi", "--streams", str(n), "--bytes", str(each), "--timeout", limit)
        got["multi_mbps"] = multi["mbps"]
    return got


def main(argv: list[str] | None = None) -> int:
    """``relay`` / ``client`` (the two halves) or ``run`` (start everything and measure)."""
    p = argparse.ArgumentParser(prog="python -m muxtunnel.benchsuite.ceiling")
    p.add_argument("mode", choices=["relay", "client", "run"])
    p.add_argument("--tls", action="store_true")
    p.add_argument("--raw", action="store_true")
    p.add_argument("--fast", action="store_true", help="muxtunnel's TLSStream, not trio.SSLStream")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--tunnel-port", type=int)
    p.add_argument("--service-port", type=int)
    p.add_argument("--variants", default="direct,tcp,raw,tls,tlsfast,rawtls")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=3000, help="idle round trips per run")
    p.add_argument("--what", default="rtt,conn", help="comma list of rtt, conn, bulk")
    p.add_argument("--bulk-bytes", type=int, default=256 << 20, help="one-stream put/get size")
    p.add_argument("--multi-streams", type=int, default=100, help="concurrent streams (bulk)")
    p.add_argument("--multi-bytes", type=int, default=10 << 20, help="bytes per concurrent stream")
    args = p.parse_args(argv)
    if args.mode == "run":
        return _run_all(args)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(relay if args.mode == "relay" else client, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
