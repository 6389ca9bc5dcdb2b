"""Fixtures of the hostile-input suite."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest

from .procs import ProcessGroup, children_of

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """Processes started by one test; all stopped at teardown, and none may be left behind."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()
    mine = {p.pid for p in group.processes}
    deadline = time.monotonic() + 5
    while (left := mine & set(children_of(os.getpid()))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes left behind: {sorted(left)}"
