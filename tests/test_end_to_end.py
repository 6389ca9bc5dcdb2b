"""The zero-config demo in process: relay + client + echo, self-check, clean exit."""

from __future__ import annotations

import re

import trio

from muxtunnel.demo import run_demo
from tests.conftest import start_echo


async def test_demo_once_self_check_passes() -> None:
    lines: list[str] = []
    with trio.fail_after(60):
        ok = await run_demo(
            local_port=None, once=True, report=lines.append, bulk_bytes=4 * 1024 * 1024
        )
    assert ok
    text = "\n".join(lines)
    assert re.search(r"^muxtunnel relay listening on 127\.0\.0\.1:\d+$", text, re.M)
    assert re.search(r"^forwarding tcp://127\.0\.0\.1:\d+ -> 127\.0\.0\.1:\d+$", text, re.M)
    assert re.search(r"sha256 ok, \d+ MB/s", text)
    assert re.search(r"p50 \d+ us, p99 \d+ us", text)
    assert lines[-1] == "self-check passed"


async def test_demo_with_local_port_and_shutdown(nursery: trio.Nursery) -> None:
    echo = await start_echo(nursery)
    lines: list[str] = []
    shutdown = trio.Event()
    running = trio.Event()
    result: list[bool] = []

    def report(line: str) -> None:
        lines.append(line)
        if line.startswith("demo running"):
            running.set()

    async def run() -> None:
        result.append(await run_demo(local_port=echo, once=False, report=report, shutdown=shutdown))

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(run)
            await running.wait()
            assert any(line.endswith(f"-> 127.0.0.1:{echo}") for line in lines)
            shutdown.set()
    assert result == [True]
