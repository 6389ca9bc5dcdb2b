"""A relay process with few file descriptors keeps a reserve for new sessions (real processes)."""

from __future__ import annotations

import re
import sys
from functools import partial
from typing import TYPE_CHECKING

import trio

from muxtunnel.client import ClientInfo, run_client
from muxtunnel.config import ClientConfig, TunnelSpec
from tests.conftest import echo_roundtrip, random_bytes, sha, start_echo
from tests.system.harness import ProcessGroup, muxtunnel_env, random_port_range

if TYPE_CHECKING:
    from pathlib import Path

#: Runs ``python -m muxtunnel ARGS...`` with RLIMIT_NOFILE (soft and hard) set to ``sys.argv[1]``.
_LIMITED = (
    "import resource, runpy, sys; n = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "runpy.run_module('muxtunnel', run_name='__main__', alter_sys=True)"
)
_LISTEN_RE = re.compile(r"muxtunnel relay listening on 127\.0\.0\.1:(\d+)")
_FINGERPRINT_RE = re.compile(r"fingerprint: (sha256:[0-9a-f]{64})")
TOKENS = ("token-a-0123456789abcdef", "token-b-0123456789abcdef", "token-c-0123456789abcdef")


async def _client(nursery: trio.Nursery, config: ClientConfig, lines: list[str]) -> ClientInfo:
    with trio.fail_after(30):
        info = await nursery.start(partial(run_client, config, report=lines.append))
    assert isinstance(info, ClientInfo)
    return info


async def test_full_descriptor_table_still_admits_a_new_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    echo = await start_echo(nursery)
    token_file = tmp_path / "tokens"
    token_file.write_text("\n".join(TOKENS) + "\n")
    token_file.chmod(0o600)
    lo, hi = random_port_range(200)
    group = ProcessGroup()
    try:
        relay = group.start(
            "relay",
            [
                sys.executable,
                "-c",
                _LIMITED,
                "128",
                "server",
                "--listen",
                "127.0.0.1:0",
                "--ports",
                f"{lo}-{hi}",
                "--bind",
                "127.0.0.1",
                "--state-dir",
                str(tmp_path / "relay"),
                "--token-file",
                str(token_file),
                "--log-level",
                "debug",
            ],
            env=muxtunnel_env(tmp_path),
            cwd=tmp_path,
        )
        fingerprint = relay.wait_for_line(_FINGERPRINT_RE)[0].group(1)
        port = int(relay.wait_for_line(_LISTEN_RE)[0].group(1))

        def config(token: str, name: str, tunnels: int) -> ClientConfig:
            return ClientConfig(
                server_host="127.0.0.1",
                server_port=port,
                token=token,
                fingerprint=fingerprint,
                state_dir=tmp_path / name,
                tunnels=(TunnelSpec(local_port=echo),) * tunnels,
                max_retries=None,
                backoff_cap=1.0,
            )

        # Two tokens bind 128 tunnels: more than the relay has descriptors for.
        lines_a: list[str] = []
        lines_b: list[str] = []
        info_a = await _client(nursery, config(TOKENS[0], "a", 64), lines_a)
        info_b = await _client(nursery, config(TOKENS[1], "b", 64), lines_b)
        assert len(info_a.tunnels) + len(info_b.tunnels) < 128
        # A third token still gets in, binds and moves checked bytes.
        lines_c: list[str] = []
        info_c = await _client(nursery, config(TOKENS[2], "c", 1), lines_c)
        for seed, tunnel in enumerate((info_c.tunnels[0], info_a.tunnels[0], info_b.tunnels[0])):
            payload = random_bytes(100_000, seed)
            with trio.fail_after(15):
                assert sha(await echo_roundtrip(tunnel.remote_port, payload)) == sha(payload)
        assert relay.returncode is None, relay.describe()
        assert any("short of file descriptors" in line for line in relay.stderr_lines), (
            relay.describe()
        )
        nursery.cancel_scope.cancel()
    finally:
        group.close()
