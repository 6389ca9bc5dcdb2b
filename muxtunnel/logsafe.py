"""Safe logging of remote input: escaping peer-supplied text and rate-limiting log lines.

Anything a remote party sends (CLOSE/GOAWAY messages, RESULT text, names) may contain newlines,
terminal escape sequences or bidi overrides that would forge or hide log lines; :func:`peer_text`
renders it as one inert, bounded piece of text. A remote party can also make us log: the
:class:`RateLimitFilter` installed by :func:`muxtunnel.logsetup.configure_logging` keeps a
token bucket per message template (optionally refined per source) and drops the excess, then
reports how many lines it dropped on the next line it lets through.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

__all__ = ["RateLimitFilter", "peer_text"]

#: Characters escaped even though ``str.isprintable`` accepts them.
_ALWAYS_ESCAPE = {"\\": "\\\\"}
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    special = _ALWAYS_ESCAPE.get(ch) or _SHORT_ESCAPES.get(ch)
    if special is not None:
        return special
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def peer_text(value: object, limit: int = 200) -> str:
    """Render peer-supplied ``value`` for one log line.

    Every non-printable character (newline, CR, ESC and other C0/C1 controls, bidi overrides,
    format and unassigned characters, lone surrogates) and the backslash become backslash
    escapes as in ``repr`` (without the quotes). Bytes are decoded as UTF-8, undecodable bytes
    shown as ``\\xNN``. The result is at most ``limit`` characters plus a marker
    ``...[+N chars]`` telling how many input characters were cut.
    """
    if type(value) is str and len(value) <= limit and value.isprintable() and "\\" not in value:
        return value  # nothing to escape or cut (addresses, names): the common case
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", "surrogateescape")
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    limit = max(0, limit)
    out: list[str] = []
    used = 0
    for index, ch in enumerate(text):
        if 0xDC80 <= ord(ch) <= 0xDCFF and not isinstance(value, str):
            piece = f"\\x{ord(ch) - 0xDC00:02x}"  # an undecodable byte
        else:
            piece = _escape_char(ch)
        if used + len(piece) > limit:
            out.append(f"...[+{len(text) - index} chars]")
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0


class RateLimitFilter(logging.Filter):
    """Drop log records beyond ``burst`` lines plus ``rate`` lines/s per message template.

    The key of a record is its logger name and unformatted message (``record.msg``), so a
    flood of one kind of line cannot hide the others. ``extra={"ratelimit_key": k}`` refines
    the key (e.g. per source address); such records are also limited in total per template to
    ``aggregate`` times the per-key budget, so many sources cannot multiply the output.
    ``extra={"ratelimit": False}`` passes a record unconditionally. When a key passes again
    after drops, its record ends with ``"; N similar messages suppressed"``. At most
    ``max_keys`` buckets are kept (least recently used are forgotten).
    """

    def __init__(
        self,
        burst: int = 20,
        rate: float = 5.0,
        *,
        aggregate: int = 5,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.rate = rate
        self.aggregate = aggregate
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()
        #: Drops whose bucket was forgotten, per template; reported with its next line.
        self._orphaned: OrderedDict[Hashable, int] = OrderedDict()

    def _bucket(self, key: Hashable, burst: float, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=burst, stamp=now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                old_key, old = self._buckets.popitem(last=False)
                if old.suppressed and isinstance(old_key, tuple):
                    template = old_key[:2]
                    self._orphaned[template] = self._orphaned.get(template, 0) + old.suppressed
                    self._orphaned.move_to_end(template)
                    while len(self._orphaned) > self.max_keys:
                        self._orphaned.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            rate = self.rate * (burst / self.burst) if self.burst else self.rate
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
        return bucket

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False to drop ``record``; may append the suppression count to its message."""
        if getattr(record, "ratelimit", True) is False:
            return True
        now = self._clock()
        template = (record.name, str(record.msg))
        refine = getattr(record, "ratelimit_key", None)
        key: tuple[object, ...] = (*template, refine)
        bucket = self._bucket(key, float(self.burst), now)
        total: _Bucket | None = None
        if refine is not None:
            total = self._bucket((*template, _AGGREGATE), float(self.burst * self.aggregate), now)
        if bucket.tokens < 1 or (total is not None and total.tokens < 1):
            bucket.suppressed += 1
            return False
        bucket.tokens -= 1
        if total is not None:
            total.tokens -= 1
        dropped = bucket.suppressed + self._orphaned.pop(template, 0)
        bucket.suppressed = 0
        if dropped:
            try:
                message = record.getMessage()
            except Exception:  # the handler reports bad formats itself
                return True
            record.msg = f"{message}; {dropped} similar messages suppressed"
            record.args = None
        return True


class _Aggregate:
    """Marker for the per-template total bucket (never equal to a user's ratelimit_key)."""

    def __repr__(self) -> str:
        return "<all sources>"


_AGGREGATE = _Aggregate()
