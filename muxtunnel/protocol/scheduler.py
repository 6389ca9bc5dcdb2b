"""The DATA writer: deficit round robin over streams, new flows first (protocol-spec.md §14, §14.2-§14.5).

Control frames are not scheduled here: the session writes them first, in FIFO order, into
the same batch. This module frames DATA:

* **Deficit round robin** with a quantum of 16 KiB (one TLS record). Each stream that has
  bytes queued and send credit sits in one of two lists. At its turn, a stream with a
  positive deficit sends one frame of ``min(pending, stream credit, connection credit,
  frame_max)`` and the frame's size is charged to its deficit; a stream whose deficit is used
  up gets another quantum and moves to the tail of the *old* list.
* ``frame_max`` is the quantum while two or more streams are ready, and ``single_max``
  (``min(64 KiB, peer MAX_FRAME_PAYLOAD)``) while only one is: a lone bulk stream uses big
  frames, and competing streams interleave at 16 KiB granularity.
* **New flows first** (RFC 8290 FQ-CoDel): a stream that becomes ready after having nothing
  queued joins the *new* list, which is served before the old list, so an interactive
  stream's first frame goes out at the front of the next batch even while bulk streams
  saturate the link. A stream that empties leaves the lists (and its deficit is reset).
* **Silly-window avoidance**: with at least 4 KiB waiting, a stream does not send into less
  than 4 KiB of credit. A stream blocked by its own credit leaves the lists until a WINDOW
  re-queues it; when the *connection* credit is short, the batch ends.
* A FIN rides on the stream's last DATA frame, after every queued byte. A FIN with nothing
  left to send goes into a separate FIFO served before DATA, since it needs no credit.

Payload chunks are appended to the caller's ``parts`` list without copying; the session
joins header and payload parts once per batch.
"""

from __future__ import annotations

from collections import deque

from .constants import FLAG_FIN, FrameType
from .frames import HEADER

__all__ = ["DEFAULT_QUANTUM", "SWS_THRESHOLD", "OutboundStream", "Scheduler"]

#: Bytes a stream may send per round (one TLS record).
DEFAULT_QUANTUM = 16_384
#: Silly-window avoidance: do not send into credit below this while more is waiting.
SWS_THRESHOLD = 4_096

_HEADER_SIZE = HEADER.size
_DATA = int(FrameType.DATA)


class OutboundStream:
    """The sending half of a stream, as the scheduler sees it.

    Args:
        stream_id: the stream id.
        limit: the initial send limit (the peer's INITIAL_STREAM_WINDOW).
    """

    __slots__ = (
        "chunks",
        "deficit",
        "fin_queued",
        "limit",
        "pending",
        "scheduled",
        "sent",
        "stream_id",
    )

    def __init__(self, stream_id: int, limit: int) -> None:
        self.stream_id = stream_id
        #: Queued payload, oldest first.
        self.chunks: deque[bytes | memoryview] = deque()
        #: Bytes in ``chunks``.
        self.pending = 0
        #: The application ended its direction; FIN goes out after ``chunks``.
        self.fin_queued = False
        #: DATA payload bytes framed so far (absolute offset).
        self.sent = 0
        #: The peer's current absolute limit for this stream.
        self.limit = limit
        #: DRR deficit, in bytes.
        self.deficit = 0
        #: True while the stream is in the new or old list.
        self.scheduled = False

    def drop_pending(self) -> None:
        """Forget every queued byte and the queued FIN (the stream was reset)."""
        self.chunks.clear()
        self.pending = 0
        self.fin_queued = False


class Scheduler:
    """Deficit round robin over :class:`OutboundStream` objects, new flows first.

    Args:
        quantum: bytes per round, and the frame size while two or more streams are ready.
        single_max: the frame size while only one stream is ready.
    """

    __slots__ = ("fins", "new", "old", "quantum", "single_max", "sws")

    def __init__(self, quantum: int = DEFAULT_QUANTUM, single_max: int = 65_536) -> None:
        if quantum < 1:
            raise ValueError("quantum must be positive")
        self.quantum = quantum
        self.single_max = max(single_max, 1)
        #: A stream whose credit (or the connection's) is below both what it has pending and
        #: this many bytes waits for more credit instead of sending a runt frame (spec §8.2).
        self.sws = min(SWS_THRESHOLD, quantum)
        #: Streams that became ready after being idle; served first.
        self.new: deque[OutboundStream] = deque()
        #: Streams that used a quantum and still have data.
        self.old: deque[OutboundStream] = deque()
        #: Streams whose only remaining output is a bare FIN.
        self.fins: deque[OutboundStream] = deque()

    def __len__(self) -> int:
        return len(self.new) + len(self.old) + len(self.fins)

    def activate(self, stream: OutboundStream) -> None:
        """``stream`` got data or a FIN after having nothing queued: schedule it as a new flow."""
        if stream.pending:
            if not stream.scheduled and stream.sent < stream.limit:
                stream.scheduled = True
                stream.deficit = self.quantum
                self.new.append(stream)
        elif stream.fin_queued and not stream.scheduled:
            self.fins.append(stream)

    def credit_raised(self, stream: OutboundStream) -> None:
        """``stream``'s limit grew: requeue it (as an old flow) if it has data waiting."""
        if stream.pending and not stream.scheduled:
            stream.scheduled = True
            if stream.deficit <= 0:
                stream.deficit = self.quantum
            self.old.append(stream)

    def fill(
        self, parts: list[bytes | memoryview], room: int, conn_available: int
    ) -> tuple[int, int, list[OutboundStream]]:
        """Frame DATA into ``parts`` until ``room`` bytes are used or nothing can be sent.

        Args:
            parts: output list; headers and payload slices are appended.
            room: bytes the batch may still take (soft: a frame is never cut below a quantum).
            conn_available: the connection's send credit.

        Returns:
            (bytes appended, payload bytes charged to the connection, streams whose FIN
            was framed in this batch).
        """
        pack = HEADER.pack
        append = parts.append
        finished: list[OutboundStream] = []
        used = 0
        charged = 0
        fins = self.fins
        while fins and used < room:
            stream = fins.popleft()
            if stream.fin_queued and not stream.pending:
                append(pack(0, _DATA, FLAG_FIN, 0, stream.stream_id))
                used += _HEADER_SIZE
                stream.fin_queued = False
                finished.append(stream)
        new = self.new
        old = self.old
        quantum = self.quantum
        single_max = self.single_max
        while used < room:
            if new:
                lst = new
            elif old:
                lst = old
            else:
                break
            stream = lst[0]
            pending = stream.pending
            if not pending:  # reset while scheduled: drop lazily
                lst.popleft()
                stream.scheduled = False
                continue
            if stream.deficit <= 0:
                stream.deficit += quantum
                lst.popleft()
                old.append(stream)
                continue
            want = quantum if len(new) + len(old) >= 2 else single_max
            if pending < want:
                want = pending
            credit = stream.limit - stream.sent
            if credit < want and credit < self.sws:
                lst.popleft()  # blocked by its own window until a WINDOW requeues it
                stream.scheduled = False
                continue
            if conn_available < want and conn_available < self.sws:
                break  # blocked by the connection window
            n = want
            if credit < n:
                n = credit
            if conn_available < n:
                n = conn_available
            budget = room - used - _HEADER_SIZE
            if n > budget:
                n = budget if budget > quantum else min(n, quantum)
            fin = stream.fin_queued and n == pending
            append(pack(n, _DATA, FLAG_FIN if fin else 0, 0, stream.stream_id))
            chunks = stream.chunks
            need = n
            while need:
                chunk = chunks[0]
                size = len(chunk)
                if size <= need:
                    append(chunk)
                    chunks.popleft()
                    need -= size
                else:
                    view = chunk if type(chunk) is memoryview else memoryview(chunk)
                    append(view[:need])
                    chunks[0] = view[need:]
                    need = 0
            stream.pending = pending - n
            stream.sent += n
            stream.deficit -= n
            conn_available -= n
            charged += n
            used += _HEADER_SIZE + n
            if n == pending:
                lst.popleft()
                stream.scheduled = False
                stream.deficit = 0
                if fin:
                    stream.fin_queued = False
                    finished.append(stream)
        return used, charged, finished
