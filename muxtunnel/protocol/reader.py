"""Incremental frame reader: splits a byte stream into raw frames (protocol-spec.md §3-§4).

The reader checks the preface, then each header as soon as its 16 bytes are in: an unknown
mandatory type or a Length above the receiver's limit is rejected before any payload is
buffered. It never copies a payload that lies wholly inside one ``bytes`` chunk: such payloads
are handed out as ``memoryview`` slices of that immutable chunk. A frame that spans chunks is
assembled once, with a single join, when its last byte arrives (no quadratic re-buffering).
"""

from __future__ import annotations

from muxtunnel.errors import FrameSizeError, PrefaceError, ProtocolError

from .constants import EXTENSION_MIN, HEADER_SIZE, MAGIC, FrameType
from .frames import HEADER

__all__ = ["FrameReader", "RawFrame"]

#: (type, flags, stream_id, payload); the payload stays valid and never changes.
RawFrame = tuple[int, int, int, bytes | memoryview]

_DATA = int(FrameType.DATA)
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


class FrameReader:
    """Turns received bytes into complete raw frames.

    Args:
        max_data_payload: the largest DATA payload accepted (our MAX_FRAME_PAYLOAD).
        max_control_payload: the largest payload of any other frame (our MAX_CONTROL_PAYLOAD).
        expect_magic: check the 8-byte connection preface first.
    """

    __slots__ = ("_chunks", "_magic_seen", "_max_control", "_max_data", "_need", "buffered")

    def __init__(
        self, *, max_data_payload: int, max_control_payload: int, expect_magic: bool = True
    ) -> None:
        self._max_data = max_data_payload
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
        """Add received bytes; return every frame completed by them, in order.

        Raises:
            PrefaceError: the first bytes are not the preface.
            FrameSizeError: a header declares more than the limit for its type.
            ProtocolError: a header has an unknown mandatory type (0x00-0x7F).
        """
        chunk = data if type(data) is bytes else bytes(data)
        if self._magic_seen < len(MAGIC):
            chunk = self._take_magic(chunk)
        if not chunk:
            return []
        if self.buffered:
            done = self._complete(chunk)
            if done is None:
                return []
            joined, rest = done
            frames = self._parse(joined)
            if rest < len(chunk):
                frames += self._parse(chunk, rest)
            return frames
        return self._parse(chunk)

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

    def _parse(self, chunk: bytes, off: int = 0) -> list[RawFrame]:
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
