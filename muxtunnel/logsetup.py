"""Logging to stderr for the ``muxtunnel`` command: plain text or one JSON object per line.

Library modules only call ``logging.getLogger(__name__)``; the CLI calls
:func:`configure_logging` once. stdout stays reserved for the lines users and scripts read
(fingerprint, token, ``forwarding ...``). Every line goes through a
:class:`~muxtunnel.logsafe.RateLimitFilter`, so a remote party cannot flood the log.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from typing import TextIO

from muxtunnel.errors import ConfigError
from muxtunnel.logsafe import RateLimitFilter

__all__ = ["INTERNAL_KEYS", "LEVELS", "JsonFormatter", "configure_logging"]

#: Accepted ``--log-level`` names.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FORMATS = ("text", "json")


#: Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
#: ``extra=`` keys meant for the log machinery, not for readers (see RateLimitFilter).
INTERNAL_KEYS = frozenset({"ratelimit", "ratelimit_key"})
_CORE_KEYS = frozenset({"ts", "level", "logger", "msg", "exc"})
_NOT_EXTRA = _RECORD_ATTRS | INTERNAL_KEYS
#: Types JSON keeps as they are (float only when finite: see _json_value).
_PLAIN = frozenset({str, int, bool, type(None)})
#: ASCII only: any other character becomes a \u escape (see JsonFormatter).
_ENCODER = json.JSONEncoder(ensure_ascii=True)


def _json_value(value: object) -> object:
    """``value`` if JSON represents it as what it is, else its ``str``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: ``ts``, ``level``, ``logger``, ``msg`` (+ ``exc``),
    then every field passed with ``extra=`` as its own key with its own JSON type.

    The key order is fixed (log filters such as contrib/fail2ban match ``"logger": ..., "msg"``).
    An extra key that clashes with one of these gets an ``extra_`` prefix. Output is ASCII: any
    other character is a ``\\u`` escape, so no text can break the line or hide in it.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a single line of JSON."""
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        obj: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key in _NOT_EXTRA:
                continue
            if key in _CORE_KEYS:
                key = f"extra_{key}"
            obj[key] = value if type(value) in _PLAIN else _json_value(value)
        return _ENCODER.encode(obj)


class _TextFormatter(logging.Formatter):
    """The text format; a message never spans lines (peer text is escaped by its callers with
    :func:`~muxtunnel.logsafe.peer_text`; this is the backstop for any line break left)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Format ``record`` with CR and LF in its message shown as ``\\r`` and ``\\n``."""
        text = super().formatMessage(record)
        if "\n" in text or "\r" in text:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        return text


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at emit time (tests and redirections swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send log records of ``level`` and above to stderr in ``fmt``; replaces an earlier setup.

    Raises:
        ConfigError: Unknown level or format.
    """
    level_no = LEVELS.get(level.lower())
    if level_no is None:
        raise ConfigError(f"--log-level: unknown level {level!r} (choose from {', '.join(LEVELS)})")
    if fmt not in _FORMATS:
        raise ConfigError(f"--log-format: unknown format {fmt!r} (choose from text, json)")
    handler = _StderrHandler()
    handler.addFilter(RateLimitFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = _TextFormatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
