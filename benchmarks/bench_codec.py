"""Benchmarks of the sans-IO core, with no I/O at all.

Run: ``python benchmarks/bench_codec.py [--runs N] [--quick]``

Prints three figures, each the median of several runs:

1. encode + decode of 64 KiB DATA frames (header packing, the reader, dispatch-free), GB/s;
2. decode + dispatch of 64-byte DATA frames through ``Session.receive_data``, frames/s;
3. session-pair bulk: a server Session sends to a client Session, which acknowledges
   everything it receives (64 KiB frames, one stream, default 256 KiB batches, windows
   auto-tuned after one RTT sample), MB/s.

The machine is shared, so the best run is printed next to the median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING

from muxtunnel.protocol.constants import MAGIC, AuthMethod, ResultStatus, Role
from muxtunnel.protocol.events import DataReceived
from muxtunnel.protocol.frames import Address, pack_data_header
from muxtunnel.protocol.reader import FrameReader
from muxtunnel.protocol.session import Session

if TYPE_CHECKING:
    from collections.abc import Callable

_ADDR = Address("127.0.0.1", 1)


def _connected_pair() -> tuple[Session, Session, int]:
    """An authenticated (server, client) pair with one accepted server stream."""
    server = Session(Role.SERVER)
    client = Session(Role.CLIENT)
    server.send_challenge(bytes(32))
    client.receive_data(server.data_to_send(), 0.0)
    client.send_auth(1, AuthMethod.HMAC_SHA256, bytes(64))
    client.send_bind(2, 1, _ADDR)  # the relay opens streams only for bound tunnels (§9.2)
    server.receive_data(client.data_to_send(), 0.0)
    server.send_result(1, ResultStatus.OK)
    server.receive_data(b"", 0.0)  # the BIND held behind the AUTH
    server.send_result(2, ResultStatus.OK, bound=_ADDR)
    client.receive_data(server.data_to_send(), 0.0)
    # An RTT sample (as the adapter's first PING gives), so the windows auto-tune.
    client.ping(0.0)
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.001)
    sid = server.open_stream(1, _ADDR, _ADDR)
    client.receive_data(server.data_to_send(), 0.001)
    client.accept_stream(sid)
    server.receive_data(client.data_to_send(), 0.001)
    assert client.stream_is_open(sid)
    return server, client, sid


def bench_codec_64k(total: int) -> float:
    """Encode ``total`` bytes as 64 KiB DATA frames and parse them back; GB/s."""
    payload = bytes(65536)
    count = total // len(payload)
    reader = FrameReader(max_data_payload=65536, max_control_payload=4096, expect_magic=False)
    start = time.perf_counter()
    parsed = 0
    for _ in range(count // 16):
        parts: list[bytes] = []
        for _ in range(16):
            parts.append(pack_data_header(1, 65536, False))
            parts.append(payload)
        for _type, _flags, _sid, data in reader.feed(b"".join(parts)):
            parsed += len(data)
    elapsed = time.perf_counter() - start
    assert parsed == count // 16 * 16 * 65536
    return parsed / elapsed / 1e9


def bench_small_frames(count: int) -> float:
    """Feed ``count`` 64-byte DATA frames through a client Session; frames/s."""
    server, client, sid = _connected_pair()
    del server
    frame = pack_data_header(sid, 64, False) + bytes(64)
    per_chunk = 1000  # 1000 x 80 B = 80 KB per receive_data call, like a few TLS records
    chunk = frame * per_chunk
    rounds = count // per_chunk
    start = time.perf_counter()
    n = 0
    for _ in range(rounds):
        events = client.receive_data(chunk, 0.0)
        n += len(events)
        client.acknowledge(sid, 64 * len(events), 0.0)
    elapsed = time.perf_counter() - start
    assert n == rounds * per_chunk
    return n / elapsed


def bench_pair_bulk(total: int) -> float:
    """Server -> client bulk over one stream with immediate acknowledgement; MB/s."""
    server, client, sid = _connected_pair()
    block = bytes(1 << 20)
    sent = 0
    received = 0
    start = time.perf_counter()
    while received < total:
        if sent < total and server.pending_bytes(sid) < (4 << 20):
            server.send_data(sid, block)
            sent += len(block)
        data = server.data_to_send()
        if data:
            for event in client.receive_data(data, 0.0):
                if type(event) is DataReceived:
                    n = len(event.data)
                    received += n
                    client.acknowledge(sid, n, 0.0)
        back = client.data_to_send()
        if back:
            server.receive_data(back, 0.0)
    elapsed = time.perf_counter() - start
    return received / elapsed / 1e6


def _median(fn: Callable[[], float], runs: int) -> tuple[float, float]:
    results = [fn() for _ in range(runs)]
    return statistics.median(results), max(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    args = parser.parse_args()
    scale = 1 if args.quick else 8
    assert MAGIC  # the pair exchanges the real preface
    codec = _median(lambda: bench_codec_64k(128 * scale << 20), args.runs)
    small = _median(lambda: bench_small_frames(100_000 * scale), args.runs)
    bulk = _median(lambda: bench_pair_bulk(128 * scale << 20), args.runs)
    print(f"encode+decode 64 KiB DATA frames:  {codec[0]:8.2f} GB/s  (best {codec[1]:.2f})")
    print(f"decode+dispatch 64 B DATA frames:  {small[0]:10,.0f} frames/s  (best {small[1]:,.0f})")
    print(f"session-pair bulk (64 KiB frames): {bulk[0]:8.0f} MB/s  (best {bulk[1]:.0f})")
    print(f"(median of {args.runs} runs)")


if __name__ == "__main__":
    main()
