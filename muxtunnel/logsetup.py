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
import sys
import time
from typing import TextIO

from muxtunnel.errors import ConfigError
from muxtunnel.logsafe import RateLimitFilter

__all__ = ["LEVELS", "JsonFormatter", "configure_logging"]

#: Accepted ``--log-level`` names.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: ``ts``, ``level``, ``logger``, ``msg`` (+ ``exc``)."""

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
        return json.dumps(obj, ensure_ascii=False, default=str)


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
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
