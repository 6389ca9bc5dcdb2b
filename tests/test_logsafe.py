"""Safe logging: escaping of peer-supplied text and the rate-limiting log filter."""

from __future__ import annotations

import io
import json
import logging
import sys
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from muxtunnel import logsetup
from muxtunnel.connection import MuxConnection, make_session
from muxtunnel.errors import ErrorCode
from muxtunnel.handshake import client_handshake
from muxtunnel.logsafe import RateLimitFilter, peer_text
from muxtunnel.logsetup import configure_logging
from muxtunnel.protocol.constants import Role
from muxtunnel.tls import client_ssl_context
from tests.conftest import TOKEN, start_relay

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

# --------------------------------------------------------------------------------------------
# peer_text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("two\nlines", "two\\nlines"),
        ("cr\rlf\n", "cr\\rlf\\n"),
        ("tab\tnul\x00del\x7f", "tab\\tnul\\x00del\\x7f"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("c1 \x85 \x9b", "c1 \\x85 \\x9b"),
        (
            "bidi \u202aa\u202bb\u202cc\u202dd\u202ee",
            "bidi \\u202aa\\u202bb\\u202cc\\u202dd\\u202ee",
        ),
        ("iso \u2066a\u2067b\u2068c\u2069", "iso \\u2066a\\u2067b\\u2068c\\u2069"),
        ("line sep \u2028 para \u2029", "line sep \\u2028 para \\u2029"),
        ("back\\slash", "back\\\\slash"),
        ("unicode é 日本 ✓", "unicode é 日本 ✓"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
        (b"bytes \xff\n", "bytes \\xff\\n"),
        (bytearray(b"ok"), "ok"),
        (ValueError("bad\nvalue"), "bad\\nvalue"),
        (None, "None"),
    ],
)
def test_peer_text_escapes(raw: object, shown: str) -> None:
    assert peer_text(raw) == shown


def test_peer_text_output_is_always_one_printable_line() -> None:
    everything = "".join(chr(c) for c in range(0x110000))
    shown = peer_text(everything, limit=10_000_000)
    assert shown.isprintable()
    assert "\n" not in shown
    assert "\x1b" not in shown


def test_peer_text_truncates_with_a_marker() -> None:
    assert peer_text("x" * 300) == "x" * 200 + "...[+100 chars]"
    assert peer_text("x" * 200) == "x" * 200
    # Escapes count towards the limit; an escape is never cut in half.
    assert peer_text("\n" * 50, limit=5) == "\\n\\n...[+48 chars]"
    assert peer_text("abc", limit=0) == "...[+3 chars]"
    huge = "y" * 10_000_000
    assert len(peer_text(huge)) < 230


# --------------------------------------------------------------------------------------------
# RateLimitFilter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(
    msg: str = "connection from %s refused", *args: object, **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord(
        "muxtunnel.test", logging.WARNING, __file__, 1, msg, args or ("x",), None
    )
    rec.__dict__.update(extra)
    return rec


def test_filter_drops_beyond_the_burst_and_reports_the_count() -> None:
    clock = Clock()
    flt = RateLimitFilter(burst=20, rate=5.0, clock=clock)
    passed = [flt.filter(record()) for _ in range(1000)]
    assert sum(passed) == 20
    assert passed[:20] == [True] * 20
    clock.now += 0.2  # one line's worth of budget
    summary = record("connection from %s refused", "y")
    assert flt.filter(summary)
    assert summary.getMessage() == "connection from y refused; 980 similar messages suppressed"
    assert not flt.filter(record())
    clock.now += 10.0
    passed = [flt.filter(record()) for _ in range(100)]
    assert sum(passed) == 20  # refilled up to the burst, not beyond
    later = record()
    clock.now += 1.0
    assert flt.filter(later)
    assert later.getMessage().endswith("; 80 similar messages suppressed")


def test_filter_keys_templates_separately_and_honours_extras() -> None:
    clock = Clock()
    flt = RateLimitFilter(burst=2, rate=1.0, aggregate=3, clock=clock)
    assert [flt.filter(record("a %s")) for _ in range(3)] == [True, True, False]
    assert [flt.filter(record("b %s")) for _ in range(3)] == [True, True, False]
    assert all(flt.filter(record("a %s", ratelimit=False)) for _ in range(50))
    # A refined key has its own budget, and all keys of a template share aggregate x burst.
    by_source = [flt.filter(record("c %s", ratelimit_key=f"src{i // 2}")) for i in range(10)]
    assert by_source == [True] * 6 + [False] * 4
    assert not flt.filter(record("c %s", ratelimit_key="src0"))


def test_filter_memory_is_bounded_and_forgotten_drops_are_reported() -> None:
    clock = Clock()
    flt = RateLimitFilter(burst=1, rate=1.0, max_keys=10, clock=clock)
    for i in range(100):
        flt.filter(record("t %s", ratelimit_key=i))
        flt.filter(record("t %s", ratelimit_key=i))  # dropped
    assert len(flt._buckets) <= 10
    clock.now += 5.0
    rec = record("t %s", ratelimit_key=5)
    assert flt.filter(rec)
    assert rec.getMessage().endswith(" similar messages suppressed")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in saved[1]:
                root.removeHandler(handler)
        root.setLevel(saved[0])


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configured_logging_is_rate_limited(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    stderr_logging = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr_logging)
    clock = Clock()
    monkeypatch.setattr(logsetup, "RateLimitFilter", partial(RateLimitFilter, clock=clock))
    configure_logging("info", fmt)
    log = logging.getLogger("muxtunnel.test")
    for i in range(500):
        log.warning("connection %d refused", i)
    log.warning("other message")
    log.warning("always shown", extra={"ratelimit": False})
    log.warning("connection %d refused", 999)  # no budget left: suppressed too
    clock.now += 0.2  # the budget refills at 5 lines/s: one line
    log.warning("connection %d refused", 999)
    lines = stderr_logging.getvalue().splitlines()
    messages = [json.loads(line)["msg"] if fmt == "json" else line for line in lines]
    assert len(messages) == 23
    assert any("other message" in m for m in messages)
    assert any("always shown" in m for m in messages)
    # 480 of the flood plus the line logged before the budget refilled.
    assert messages[-1].endswith("connection 999 refused; 481 similar messages suppressed")


# --------------------------------------------------------------------------------------------
# The relay escapes what peers send


async def test_relay_escapes_the_peer_close_message(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    gone_logged = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "gone" in record.getMessage():
                gone_logged.set()

    watch = Watch()
    logging.getLogger("muxtunnel.server").addHandler(watch)
    try:
        await _evil_close(nursery, tmp_path, gone_logged)
    finally:
        logging.getLogger("muxtunnel.server").removeHandler(watch)
    gone = [r.getMessage() for r in caplog.records if "gone" in r.getMessage()]
    assert "bye\\n2026-01-01T00:00:00.000Z WARNING" in gone[0]
    assert "\\x1b[2J\\u202e" in gone[0]
    for rec in caplog.records:
        message = rec.getMessage()
        assert "\n" not in message
        assert "\x1b" not in message
        assert "\u202e" not in message


async def _evil_close(nursery: trio.Nursery, tmp_path: Path, gone_logged: trio.Event) -> None:
    relay = await start_relay(nursery, tmp_path)
    evil = "bye\n2026-01-01T00:00:00.000Z WARNING muxtunnel.server: forged\x1b[2J\u202e"
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
        tls = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
        conn = MuxConnection(tls, make_session(Role.CLIENT), name="evil")
        async with trio.open_nursery() as inner:
            await inner.start(conn.run)
            assert await client_handshake(conn, TOKEN, []) == []
            conn.close(ErrorCode.NO_ERROR, evil)
            await conn.wait_closed()
            inner.cancel_scope.cancel()
        await gone_logged.wait()
