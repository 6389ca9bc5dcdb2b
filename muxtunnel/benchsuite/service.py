"""The local service behind every bench target: sink, source, echo and discard (see :mod:`.wire`).

Run as its own process (``python -m muxtunnel.benchsuite.service``) so it never shares a GIL with
the tunnel or the load generators. A selector loop for the echo kinds, a blocking thread per bulk
connection (sink/source/discard). Prints ``listening HOST PORT`` once ready and exits by itself after
``--max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import selectors
import socket
import sys
import threading
import time
import zlib

from muxtunnel.benchsuite import wire


def _bulk(sock: socket.socket, cmd: bytes, amount: int, rest: bytes, verify: bool) -> None:
    """Sink, source or discard on a blocking socket in its own thread (GIL-free syscalls)."""
    try:
        sock.setblocking(True)
        if cmd == wire.CMD_SINK:
            buf = bytearray(wire.CHUNK)
            view = memoryview(buf)
            got = len(rest)
            crc = zlib.crc32(rest) if verify else 0
            while got < amount:
                n = sock.recv_into(view, min(wire.CHUNK, amount - got))
                if n == 0:
                    break
                if verify:
                    crc = zlib.crc32(view[:n], crc)
                got += n
            sock.sendall(wire.SINK_REPLY.pack(got, crc))
        elif cmd == wire.CMD_SOURCE:
            for part in wire.chunks(amount):
                sock.sendall(part)
            sock.shutdown(socket.SHUT_WR)
            # Wait for the visitor to close so the last bytes are not cut by an RST.
            while sock.recv(65536):
                pass
        else:  # discard
            buf = bytearray(wire.CHUNK)
            while sock.recv_into(buf):
                pass
    except OSError:
        pass
    finally:
        sock.close()


class _Conn:
    """A connection handled by the event loop (header, echo, echo-and-close)."""

    __slots__ = ("head", "left", "mode", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b""
        self.mode = b""
        self.left = 0


def _send_all_nb(sock: socket.socket, data: bytes) -> None:
    n = sock.send(data)
    if n < len(data):  # rare: small echoes nearly always fit the send buffer
        sock.settimeout(10.0)
        try:
            sock.sendall(data[n:])
        finally:
            sock.setblocking(False)


def serve(host: str, port: int, *, verify: bool, max_seconds: float) -> None:
    """Serve until *max_seconds* have passed.

    One selector loop accepts, reads headers and does the echo kinds (cheap per connection, so
    scenario 5 measures the tunnel, not thread start-up; 10,000 idle streams cost no threads);
    bulk kinds get a blocking thread each.
    """
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(256 * 1024)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    bound = lsock.getsockname()
    print(f"listening {bound[0]} {bound[1]}", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    deadline = time.monotonic() + max_seconds

    def drop(c: _Conn) -> None:
        sel.unregister(c.sock)
        c.sock.close()

    while time.monotonic() < deadline:
        for key, _ev in sel.select(1.0):
            if key.data is None:
                for _ in range(64):
                    try:
                        conn, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # e.g. EMFILE: leave it in the backlog for now
                        time.sleep(0.01)
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(conn, selectors.EVENT_READ, _Conn(conn))
                continue
            c: _Conn = key.data
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                drop(c)
                continue
            if not data:
                drop(c)
                continue
            try:
                if not c.mode:
                    c.head += data
                    if len(c.head) < wire.HEADER.size:
                        continue
                    cmd, amount = wire.HEADER.unpack_from(c.head)
                    data = c.head[wire.HEADER.size :]
                    c.head = b""
                    if cmd in (wire.CMD_SINK, wire.CMD_SOURCE, wire.CMD_DISCARD):
                        sel.unregister(c.sock)
                        threading.Thread(
                            target=_bulk, args=(c.sock, cmd, amount, data, verify), daemon=True
                        ).start()
                        continue
                    c.mode, c.left = cmd, amount
                    if not data:
                        continue
                if c.mode == wire.CMD_ECHO:
                    _send_all_nb(c.sock, data)
                elif c.mode == wire.CMD_ECHO_CLOSE:
                    part = data[: c.left]
                    _send_all_nb(c.sock, part)
                    c.left -= len(part)
                    if c.left <= 0:
                        drop(c)
                else:
                    drop(c)
            except OSError:
                drop(c)
    lsock.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the service process."""
    parser = argparse.ArgumentParser(prog="muxtunnel.benchsuite.service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--verify", action="store_true", help="CRC-32 what the sink receives")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, verify=args.verify, max_seconds=args.max_seconds)
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()
    os._exit(0)  # daemon threads may hold sockets; leave at once


if __name__ == "__main__":
    sys.exit(main())
