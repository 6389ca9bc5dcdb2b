"""Fixtures of the fault tests: a network lab (tests/faults/netlab.py) per test.

The lab needs root, iproute2, nftables and gcc. Without them the tests skip with the reason,
except under ``CI=true``, where a missing tool fails the test (CI installs every dependency
and runs as root: .ci/install-system-deps.sh).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from .netlab import Lab, unavailable_reason

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def require_lab(*, need_delay: bool = True) -> None:
    """Skip (or fail under CI=true) when the lab cannot run here."""
    reason = unavailable_reason(need_delay=need_delay)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"fault tests cannot run: {reason}")
    pytest.skip(f"fault tests: {reason}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A :class:`~tests.faults.netlab.Lab`; every namespace and process is gone afterwards."""
    require_lab()
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
