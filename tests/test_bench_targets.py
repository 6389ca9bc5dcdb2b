"""The bench's muxtunnel targets: ``muxtunnel-noresume`` runs both ends with resumption off."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel import admin
from muxtunnel.benchsuite.targets import Layout, MuxTarget, make_target

if TYPE_CHECKING:
    from pathlib import Path


def _relay_sessions(target: MuxTarget) -> list[dict[str, object]]:
    addresses = admin.discover(target.workdir / f"{target.key}-server")
    snapshots, errors = trio.run(admin.query_all, addresses)
    assert not errors
    relay = [s for s in snapshots if s["role"] == "relay"]
    assert len(relay) == 1
    sessions: list[dict[str, object]] = relay[0]["sessions"]
    return sessions


@pytest.mark.parametrize(("key", "resumable"), [("muxtunnel", True), ("muxtunnel-noresume", False)])
def test_mux_targets_choose_session_resumption(tmp_path: Path, key: str, resumable: bool) -> None:
    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen()
        target = make_target(key, Layout(), service.getsockname()[1], tmp_path)
        assert isinstance(target, MuxTarget)
        try:
            target.start()
            (session,) = _relay_sessions(target)
            # The relay reports a replay log size only for a session with resumption on.
            if resumable:
                assert isinstance(session["replay"], int)
            else:
                assert session["replay"] is None
            assert target.alive()
        finally:
            target.stop()
