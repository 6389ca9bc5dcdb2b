"""Races between a peer's requests and the end of its session, against an in-process relay."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from muxtunnel import tls
from muxtunnel.config import TunnelSpec
from muxtunnel.connection import MuxConnection, make_session, wrap_tls
from muxtunnel.errors import ErrorCode
from muxtunnel.handshake import client_handshake
from muxtunnel.protocol.constants import ResultStatus, Role
from tests.conftest import TOKEN, echo_roundtrip, free_port_range, start_client, start_relay

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


async def _raw_client(nursery: trio.Nursery, port: int) -> MuxConnection:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = wrap_tls(tcp, tls.client_ssl_context(None), server_hostname="127.0.0.1")
    await stream.do_handshake()
    conn = MuxConnection(stream, make_session(Role.CLIENT), name="raw client")
    await nursery.start(conn.run)
    return conn


async def test_unbind_and_close_in_one_write_log_no_internal_error(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="muxtunnel")
    relay = await start_relay(nursery, tmp_path)
    with trio.fail_after(30):
        conn = await _raw_client(nursery, relay.info.port)
        outcomes = await client_handshake(conn, TOKEN, [(1, 0, None)])
        assert [o.status for o in outcomes] == [ResultStatus.OK]
        bound = outcomes[0].bound
        assert bound is not None
        # UNBIND and CLOSE leave in one batch, so the relay reads them in one receive.
        conn.send_unbind(50, 1)
        conn.close(ErrorCode.NO_ERROR, "bye")
        await conn.wait_closed()  # the relay read the CLOSE and ended the connection
        relay.shutdown.set()  # every session task has ended once the relay is done
        await relay.done.wait()
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == []
    # The relay released the port (the lease is not leaked by the late answer).
    released = f"tunnel port {bound.port} released"
    assert any(r.getMessage() == released for r in caplog.records)


async def test_a_client_with_40_tunnels_binds_them_all(
    nursery: trio.Nursery, tmp_path: Path, echo_port: int
) -> None:
    # 40 BINDs are more than the 16 requests a client may have unanswered (protocol-spec
    # §7.5): the client session holds the rest back, and the relay never sees too many.
    relay = await start_relay(nursery, tmp_path, port_range=free_port_range(60))
    with trio.fail_after(60):
        client = await start_client(
            nursery, tmp_path, relay, [TunnelSpec(local_port=echo_port) for _ in range(40)]
        )
        ports = {client.port(i) for i in range(40)}
        assert len(ports) == 40
        assert await echo_roundtrip(client.port(39), b"last tunnel") == b"last tunnel"
    assert not any("ENHANCE_YOUR_CALM" in line for line in client.lines)
