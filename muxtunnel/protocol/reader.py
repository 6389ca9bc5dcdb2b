"""Incremental frame reader: splits a byte stream into frames (protocol-spec.md §3-§4).

The reader checks the preface, then each header as soon as its 16 bytes are in: an unknown
mandatory type or a Length above the receiver's limit is rejected before any payload is
buffered. It never copies a payload of more than 256 bytes that lies wholly inside one
``bytes`` chunk: such payloads are handed out as ``memoryview`` slices of that immutable chunk
(a smaller DATA payload is copied by :meth:`FrameReader.read_frames`: cheaper than a view, and
it does not pin the chunk). A frame that spans chunks is assembled once, with a single join,
when its last byte arrives (no quadratic re-buffering).

:meth:`FrameReader.read_frames` returns decoded :data:`~muxtunnel.protocol.frames.Frame`
objects, checked in the order of spec §4.5 steps 1-5 (the session applies steps 6-7); DATA,
the hot path, is decoded inline. :meth:`FrameReader.feed` returns the raw
``(type, flags, stream_id, payload)`` of each frame, for tools that decode themselves.

A reader made with ``stop_after`` stops decoding right after the first frame of that (control)
type: :meth:`FrameReader.read_frames` returns the frames up to and including it and keeps every
byte after it, undecoded, in ``leftover`` (the resume boundary of spec §10.6: what follows
RESUMED belongs to another byte stream). Such a reader must not be fed again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from muxtunnel.errors import FrameSizeError, PrefaceError, ProtocolError

from .constants import EXTENSION_MIN, FLAG_FIN, HEADER_SIZE, MAGIC, FrameType
from .frames import HEADER, DataFrame, Frame, decode_payload

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FrameReader", "RawFrame"]

#: (type, flags, stream_id, payload); the payload stays valid and never changes.
RawFrame = tuple[int, int, int, bytes | memoryview]

_DATA = int(FrameType.DATA)
_FIN = FLAG_FIN
_T = TypeVar("_T")
#: DATA payloads up to this size are handed out as ``bytes`` copies, larger ones as views.
_COPY_MAX = 256
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


class FrameReader:
    """Turns received bytes into complete raw frames.

    Args:
        max_data_payload: the largest DATA payload accepted (our MAX_FRAME_PAYLOAD).
        max_control_payload: the largest payload of any other frame (our MAX_CONTROL_PAYLOAD).
        expect_magic: check the 8-byte connection preface first.
        stop_after: a control frame type after which :meth:`read_frames` stops decoding.
    """

    __slots__ = (
        "_chunks",
        "_magic_seen",
        "_max_control",
        "_max_data",
        "_need",
        "_stop",
        "buffered",
        "leftover",
    )

    def __init__(
        self,
        *,
        max_data_payload: int,
        max_control_payload: int,
        expect_magic: bool = True,
        stop_after: int | None = None,
    ) -> None:
        self._max_data = max_data_payload
        self._stop = -1 if stop_after is None else stop_after
        #: The bytes after the ``stop_after`` frame, once it was decoded; else None.
        self.leftover: bytes | None = None
        self._max_control = max_control_payload
        self._magic_seen = 0 if expect_magic else len(MAGIC)
        self._chunks: list[bytes] = []
        #: Total bytes of the incomplete frame at the head of ``_chunks``; 0 = header not known yet.
        self._need = 0
        #: Bytes held while waiting for the rest of a frame (bounded by one frame).
        self.buffered = 0

    def _check_header(self, length: int, frame_type: int) -> None:
        if frame_type == _DATA:
            if length > self._max_data:
                raise FrameSizeError(
                    f"DATA frame declares {length} bytes, limit is {self._max_data}"
                )
        elif frame_type not in _KNOWN_TYPES and frame_type < EXTENSION_MIN:
            raise ProtocolError(f"unknown frame type 0x{frame_type:02x}")
        elif length > self._max_control:
            raise FrameSizeError(
                f"frame type 0x{frame_type:02x} declares {length} bytes, "
                f"limit is {self._max_control}"
            )

    def _take_magic(self, data: bytes) -> bytes:
        want = MAGIC[self._magic_seen :]
        got = data[: len(want)]
        if got != want[: len(got)]:
            raise PrefaceError(
                "peer did not send the muxtunnel preface (wrong port, or not a muxtunnel peer)"
            )
        self._magic_seen += len(got)
        return data[len(got) :]

    def feed(self, data: bytes | bytearray | memoryview) -> list[RawFrame]:
        """Add received bytes; return every frame completed by them, raw, in order.

        Raises:
            PrefaceError: the first bytes are not the preface.
            FrameSizeError: a header declares more than the limit for its type.
            ProtocolError: a header has an unknown mandatory type (0x00-0x7F).
        """
        return self._split(self._prepare(data), self._parse)

    def read_frames(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return every frame completed by them, decoded, in order.

        Raises:
            PrefaceError: the first bytes are not the preface.
            FrameSizeError: a header declares more than the limit for its type, or a
                fixed-size payload has another length.
            FlowControlError: a WINDOW offset above 2^62.
            ProtocolError: an unknown mandatory type, or any other malformed frame
                (spec §4.5 steps 2-5).
        """
        chunk = self._prepare(data)
        if chunk and not self.buffered:  # the common case: no partial frame is waiting
            return self._decode(chunk, 0)
        return self._split(chunk, self._decode)

    def _prepare(self, data: bytes | bytearray | memoryview) -> bytes:
        """``data`` as ``bytes``, without the preface bytes it still contains."""
        chunk = data if type(data) is bytes else bytes(data)
        if self._magic_seen < len(MAGIC):
            chunk = self._take_magic(chunk)
        return chunk

    def _split(self, chunk: bytes, parse: Callable[[bytes, int], list[_T]]) -> list[_T]:
        """Complete a partial frame with ``chunk`` if one is waiting, then ``parse`` the rest."""
        if not chunk:
            return []
        if self.buffered:
            done = self._complete(chunk)
            if done is None:
                return []
            joined, rest = done
            frames = parse(joined, 0)
            if self.leftover is not None:  # the joined frame was the stop frame
                self.leftover = chunk[rest:]
                return frames
            if rest < len(chunk):
                frames += parse(chunk, rest)
            return frames
        return parse(chunk, 0)

    def _complete(self, chunk: bytes) -> tuple[bytes, int] | None:
        """Add ``chunk`` to a partial frame.

        Returns:
            None while the frame is incomplete; then the frame's bytes (joined once, and
            without the bytes after it, which stay views of ``chunk`` and so pin no larger
            buffer) and the offset in ``chunk`` where the following bytes start.
        """
        before = self.buffered
        self._chunks.append(chunk)
        self.buffered += len(chunk)
        if not self._need and self.buffered >= HEADER_SIZE:
            head = b"".join(self._chunks[:-1]) + chunk[: HEADER_SIZE - before]
            length, frame_type, _flags, _res, _sid = HEADER.unpack_from(head, 0)
            self._check_header(length, frame_type)
            self._need = HEADER_SIZE + length
        if not self._need or self.buffered < self._need:
            return None
        rest = self._need - before
        joined = b"".join([*self._chunks[:-1], memoryview(chunk)[:rest]])
        self._chunks = []
        self._need = 0
        self.buffered = 0
        return joined, rest

    def _decode(self, chunk: bytes, off: int) -> list[Frame]:
        """Like :meth:`_parse`, but decode each frame (DATA inline: its §4.5 checks here)."""
        frames: list[Frame] = []
        append = frames.append
        unpack_from = HEADER.unpack_from
        max_data = self._max_data
        data_frame = DataFrame
        data_type = _DATA
        header_size = HEADER_SIZE
        copy_max = _COPY_MAX
        stop_type = self._stop
        view = memoryview(chunk)
        end = len(chunk)
        while end - off >= header_size:
            length, frame_type, flags, _reserved, stream_id = unpack_from(chunk, off)
            start = off + header_size
            stop = start + length
            if frame_type == data_type and 0 < length <= max_data and stream_id:
                if stop > end:
                    self._need = stop - off
                    break
                # A small payload is copied: cheaper than a view, and it pins no chunk.
                payload = chunk[start:stop] if length <= copy_max else view[start:stop]
                if flags & 1:
                    append(data_frame(stream_id, payload, True))
                else:
                    append(data_frame(stream_id, payload))
                off = stop
                continue
            self._check_header(length, frame_type)
            if stop > end:
                self._need = stop - off
                break
            if frame_type == _DATA and stream_id and flags & _FIN:  # empty DATA with FIN
                append(data_frame(stream_id, b"", True))
            else:  # decode_payload raises for stream 0 and for empty DATA without FIN
                append(decode_payload(frame_type, flags, stream_id, view[start:stop]))
            off = stop
            if frame_type == stop_type:
                self.leftover = chunk[off:]
                return frames
        if off < end:
            self._chunks = [chunk[off:]]
            self.buffered = end - off
        return frames

    def _parse(self, chunk: bytes, off: int) -> list[RawFrame]:
        frames: list[RawFrame] = []
        append = frames.append
        unpack_from = HEADER.unpack_from
        check = self._check_header
        max_data = self._max_data
        view = memoryview(chunk)
        end = len(chunk)
        while end - off >= HEADER_SIZE:
            length, frame_type, flags, _reserved, stream_id = unpack_from(chunk, off)
            if frame_type != _DATA or length > max_data:
                check(length, frame_type)
            start = off + HEADER_SIZE
            stop = start + length
            if stop > end:
                self._need = stop - off
                break
            append((frame_type, flags, stream_id, view[start:stop]))
            off = stop
        if off < end:
            self._chunks = [chunk[off:]]
            self.buffered = end - off
        return frames
