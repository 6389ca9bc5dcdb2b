"""Fixtures shared by the system tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .harness import ProcessGroup

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def procs() -> Iterator[ProcessGroup]:
    """Processes started by one test; all stopped (SIGTERM, then SIGKILL) at teardown."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.close()
