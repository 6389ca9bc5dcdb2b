"""Wait for log messages and report lines in trio tests, without polling.

``LogWatch`` is a logging handler that keeps every message it sees and wakes the tasks waiting
for one (records logged from worker threads reach the trio thread via the run's token).
``ReportLines`` is the list a ``report`` callback appends to, with the same kind of wait.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self


class LogWatch(logging.Handler):
    """Collects the messages of ``logger`` (and its children) at ``level`` and above.

    Use as a context manager inside a trio run: it lowers the logger's level to ``level`` while
    it is installed and restores it afterwards.
    """

    def __init__(self, logger: str = "muxtunnel", level: int = logging.INFO) -> None:
        super().__init__(level)
        self._logger = logging.getLogger(logger)
        self._saved_level = self._logger.level
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        #: Every message seen so far, in order.
        self.messages: list[str] = []
        self._changed = trio.Event()

    def __enter__(self) -> Self:
        self._saved_level = self._logger.level
        if self._logger.getEffectiveLevel() > self.level:
            self._logger.setLevel(self.level)
        self._logger.addHandler(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved_level)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if threading.get_ident() == self._thread:
            self._add(message)
        else:
            self._token.run_sync_soon(self._add, message)

    def _add(self, message: str) -> None:
        self.messages.append(message)
        self._changed.set()
        self._changed = trio.Event()

    def matching(self, text: str) -> list[str]:
        """The messages seen so far that contain ``text``."""
        return [m for m in self.messages if text in m]

    async def wait_for(self, text: str, *, count: int = 1) -> str:
        """Wait until ``count`` messages contain ``text``; return the last of them.

        Unbounded: callers put it under ``trio.fail_after``.
        """
        while len(found := self.matching(text)) < count:
            await self._changed.wait()
        return found[count - 1]


class ReportLines(list[str]):
    """The lines given to a ``report`` callback (``report=lines.append``), awaitable.

    ``append`` must be called in the trio thread (``serve`` and ``run_client`` report there).
    """

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()

    def append(self, line: str) -> None:
        super().append(line)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        """Wait until at least ``count`` lines were reported (unbounded: use trio.fail_after)."""
        while len(self) < count:
            await self._changed.wait()
