"""SIGHUP and SIGUSR1 on an in-process relay (muxtunnel.reload, serve(reload_config=...)).

The signals are real (sent to this process with os.kill) and only while serve() holds its
signal receiver; the relay and the clients are the real ones over TLS on loopback.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from functools import partial
from typing import TYPE_CHECKING

import trio

from muxtunnel.client import run_client
from muxtunnel.config import ClientConfig, ServerConfig, TunnelSpec
from muxtunnel.errors import AuthError, ConfigError
from muxtunnel.server import ServerInfo, serve
from muxtunnel.tokens import token_id
from tests.conftest import TOKEN, free_port_range, start_echo

if TYPE_CHECKING:
    from pathlib import Path

    from tests.waiting import LogWatch

OTHER = "another-token-for-the-reload-test-0123456789"


def _quiet(line: str) -> None:
    """A ``report`` callback that drops the client's status lines."""


async def wait_for_log(logs: LogWatch, text: str) -> str:
    """The first log message containing ``text`` (waits up to 15 s)."""
    with trio.fail_after(15):
        return await logs.wait_for(text)


async def test_sighup_revokes_applies_and_survives_a_failed_load(
    tmp_path: Path, logs: LogWatch
) -> None:
    config = ServerConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        port_range=free_port_range(),
        bind_host="127.0.0.1",
        tokens=(TOKEN, OTHER),
        state_dir=tmp_path / "relay",
        lease_seconds=300.0,
        drain_timeout=2.0,
    )
    # What the next SIGHUP reads; a changed listen port needs a restart and is ignored.
    loads: list[ServerConfig | Exception] = [
        dataclasses.replace(config, tokens=(TOKEN,), listen_port=1, max_streams_per_token=7),
        ConfigError("token file x: invalid TOML"),
    ]

    def load() -> ServerConfig:
        item = loads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        info = await nursery.start(
            partial(serve, config, shutdown=shutdown, report=lambda _: None, reload_config=load)
        )
        assert isinstance(info, ServerInfo)
        echo = await start_echo(nursery)

        def client_config(token: str, name: str) -> ClientConfig:
            return ClientConfig(
                server_host="127.0.0.1",
                server_port=info.port,
                token=token,
                fingerprint=info.fingerprint,
                state_dir=tmp_path / name,
                tunnels=(TunnelSpec(local_port=echo, remote_port=0),),
                max_retries=None,
                backoff_cap=1.0,
            )

        kept_shutdown = trio.Event()
        kept = await nursery.start(
            partial(run_client, client_config(TOKEN, "kept"), shutdown=kept_shutdown, report=_quiet)
        )
        revoked_error: list[BaseException] = []
        revoked_done = trio.Event()

        async def revoked_client(task_status: trio.TaskStatus[object]) -> None:
            try:
                await run_client(
                    client_config(OTHER, "revoked"), report=_quiet, task_status=task_status
                )
            except AuthError as exc:
                revoked_error.append(exc)
            finally:
                revoked_done.set()

        revoked = await nursery.start(revoked_client)
        revoked_port = revoked.tunnels[0].remote_port

        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(15):
            await revoked_done.wait()
        (error,) = revoked_error
        assert "revoked the token" in str(error)
        assert "token revoked" in str(error)
        with socket.socket() as probe:  # released at once, not after the 300 s lease
            probe.bind(("127.0.0.1", revoked_port))
        summary = await wait_for_log(logs, "reloaded: ")
        assert summary == f"reloaded: 1 tokens; removed {token_id(OTHER)}; 1 sessions closed"
        assert logs.matching("reload: listen changed; this takes a restart")

        os.kill(os.getpid(), signal.SIGHUP)
        failed = await wait_for_log(logs, "reload failed")
        assert failed == "reload failed, keeping the old settings: token file x: invalid TOML"

        os.kill(os.getpid(), signal.SIGUSR1)
        status = await wait_for_log(logs, "status: ")
        assert status == "status: 1 sessions, 1 tunnels, 0 open streams"

        # The kept client still forwards.
        port = kept.tunnels[0].remote_port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"still here")
            assert await stream.receive_some(100) == b"still here"
        kept_shutdown.set()
        shutdown.set()
        nursery.cancel_scope.cancel()  # the echo service runs until cancelled
