"""The tiny request format spoken between the load generators and the bench service.

A visitor connection starts with a 9-byte header ``!cQ`` (command, amount):

``S`` sink
    The service reads exactly *amount* bytes and replies ``!QI`` (bytes received, CRC-32 of
    them, or 0 when the service runs without ``--verify``).
``G`` source
    The service sends *amount* bytes of :func:`pattern` and then half-closes.
``E`` echo
    The service echoes everything until EOF.
``C`` echo-and-close
    The service echoes exactly *amount* bytes and then closes first (so the TIME_WAIT state lands
    on the service side and short connections do not exhaust the visitors' ephemeral ports).
``D`` discard
    The service reads and drops everything until EOF.

Payload bytes are the deterministic :func:`pattern` repeated, so either end can check them with
a running CRC-32 without holding the data.
"""

from __future__ import annotations

import functools
import random
import struct
import zlib

HEADER = struct.Struct("!cQ")
SINK_REPLY = struct.Struct("!QI")
CMD_SINK = b"S"
CMD_SOURCE = b"G"
CMD_ECHO = b"E"
CMD_DISCARD = b"D"
CMD_ECHO_CLOSE = b"C"

#: A prime length, so block-sized reorderings do not line up with the pattern period.
PATTERN_LEN = 1_048_573
CHUNK = 1 << 20


@functools.cache
def pattern() -> bytes:
    """Return the deterministic pseudo-random payload block (same in every process)."""
    return random.Random(0x6D757874).randbytes(PATTERN_LEN)


def expected_crc(amount: int) -> int:
    """CRC-32 of the first *amount* bytes of the repeated pattern."""
    pat = pattern()
    crc = 0
    full, rest = divmod(amount, PATTERN_LEN)
    for _ in range(full):
        crc = zlib.crc32(pat, crc)
    return zlib.crc32(pat[:rest], crc)


def chunks(amount: int) -> list[memoryview]:
    """Split *amount* bytes of the repeated pattern into send-ready views (period-sized)."""
    view = memoryview(pattern())
    out: list[memoryview] = []
    left = amount
    while left > 0:
        n = min(left, PATTERN_LEN)
        out.append(view[:n])
        left -= n
    return out
