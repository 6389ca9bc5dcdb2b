"""The replay log of session resumption (protocol-spec.md §10.6).

With resumption on, every byte of an endpoint's session stream is kept from the offset the
peer last acknowledged (ACK, RESUME or RESUMED) up to what the endpoint has sent, so that it
can be sent again on a new connection from whatever offset the peer reports. The log keeps
the ``bytes`` objects that :meth:`Session.data_to_send
<muxtunnel.protocol.session.Session.data_to_send>` returned, by reference: recording costs
one append, releasing drops whole chunks (the first chunk is kept with a skip count until it is
released entirely), and :meth:`ReplayLog.tail` hands out views, never copies.
"""

from __future__ import annotations

from collections import deque

from muxtunnel.errors import LocalProtocolError

__all__ = ["ReplayLog", "ResumeOffsetError"]


class ResumeOffsetError(LocalProtocolError):
    """The peer's offset is outside what the replay log holds: the session cannot resume."""


class ReplayLog:
    """Stream bytes ``[start, end)`` kept for a replay.

    Args:
        start: the stream offset of the first byte that will be recorded.
    """

    __slots__ = ("_chunks", "_skip", "end", "start")

    def __init__(self, start: int = 0) -> None:
        self._chunks: deque[bytes] = deque()
        #: Bytes of ``_chunks[0]`` already released.
        self._skip = 0
        #: The stream offset of the first byte held.
        self.start = start
        #: The stream offset after the last byte recorded (the endpoint's ``sent``).
        self.end = start

    @property
    def size(self) -> int:
        """Bytes held."""
        return self.end - self.start

    def record(self, data: bytes) -> None:
        """Append bytes just sent (kept by reference)."""
        if data:
            self._chunks.append(data)
            self.end += len(data)

    def release(self, upto: int) -> None:
        """Drop every byte before stream offset ``upto`` (no-op at or below ``start``).

        Raises:
            ValueError: ``upto`` is above ``end``.
        """
        if upto > self.end:
            raise ValueError(f"cannot release up to {upto}: only {self.end} bytes were sent")
        drop = upto - self.start
        if drop <= 0:
            return
        self.start = upto
        chunks = self._chunks
        drop += self._skip
        while chunks and len(chunks[0]) <= drop:
            drop -= len(chunks.popleft())
        self._skip = drop

    def tail(self, offset: int) -> list[memoryview]:
        """The bytes from stream offset ``offset`` to ``end``, as views of the recorded chunks.

        Raises:
            ResumeOffsetError: ``offset`` is outside ``[start, end]``.
        """
        if not self.start <= offset <= self.end:
            raise ResumeOffsetError(
                f"offset {offset} is outside the replay log [{self.start}, {self.end}]"
            )
        skip = self._skip + offset - self.start
        out: list[memoryview] = []
        for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            out.append(memoryview(chunk)[skip:])
            skip = 0
        return out
