"""Inputs on which ``benchmarks/fuzz.py`` found a crash, kept as regression tests.

Each case is a minimised input (hex) of one fuzz target (``fuzz_targets.py``); the target
raises on any outcome other than events and ``MuxtunnelError``, and on a broken invariant.
"""

from __future__ import annotations

import pytest

from muxtunnel.protocol.frames import Settings
from muxtunnel.protocol.session import SessionConfig

from .fuzz_targets import TARGETS
from .helpers import SessionPair

CASES = [
    # Small DRR quantum (1,024 B): with one stream whose send credit is between the quantum
    # and 4,096 B, wants_write() said True while data_to_send() framed nothing (the session's
    # silly-window threshold was min(4,096, quantum), the scheduler's a flat 4,096).
    pytest.param(
        "session-client",
        "1b0901000f010600ff0202000b000304000b0003010000000100000b010303000001007f000b",
        id="wants-write-without-output-small-quantum",
    ),
    # The same with two scheduled streams, one of them already empty: wants_write() took the
    # quantum as the frame size while the scheduler, after dropping the empty stream, served
    # the other alone with a larger frame and blocked it on its 1,505 B of credit.
    pytest.param(
        "session-client",
        "ab0901000b000304030100000001000600f9000b00030100a300000901000101064646464646bab9b9b9"
        "46460bfd09010000000600474747473030304747",
        id="wants-write-without-output-empty-stream-scheduled",
    ),
]


@pytest.mark.parametrize(("target", "hex_input"), CASES)
def test_fuzz_regression(target: str, hex_input: str) -> None:
    TARGETS[target](bytes.fromhex(hex_input))


def test_wants_write_agrees_with_data_to_send_below_the_sws_threshold() -> None:
    """Send credit between a small quantum and 4,096 B: both calls give the same answer."""
    pair = SessionPair(
        server_config=SessionConfig(quantum=1_024),
        client_config=SessionConfig(settings=Settings(initial_stream_window=16_384)),
    )
    sid = pair.open()
    server = pair.server
    server.send_data(sid, b"a" * 13_000)
    pair.send(server)  # 13,000 of the 16,384 credit used: 3,384 left, no WINDOW yet
    server.send_data(sid, b"b" * 20_000)
    wanted = server.wants_write()
    out = server.data_to_send()
    assert wanted == bool(out)
    assert server.wants_write() == bool(server.data_to_send())
