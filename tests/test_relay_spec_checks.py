"""The relay's BIND checks and a client's drain, as protocol-spec.md §7.2 and §10.2 say (real TLS).

A bare client speaks the protocol with the sans-IO ``Session`` over a TLS connection to an
in-process relay, so each test controls exactly which frames the relay gets and when.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, TypeVar

import trio

from muxtunnel.errors import ErrorCode
from muxtunnel.protocol import auth
from muxtunnel.protocol.constants import AuthMethod, ResultStatus, Role
from muxtunnel.protocol.events import (
    ChallengeReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    ResultReceived,
    StreamOpened,
)
from muxtunnel.protocol.frames import Address, BindOptions
from muxtunnel.protocol.session import Session
from muxtunnel.tls import client_ssl_context
from tests.conftest import TOKEN, start_relay

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import Relay

E = TypeVar("E", bound=Event)

#: Generous bound for one exchange with the relay on a busy machine.
WAIT = 20.0


class BareClient:
    """A client made of a ``Session`` and a TLS stream: frames in and out, nothing else."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.session = Session(Role.CLIENT)
        self.events: list[Event] = []
        self.changed = trio.Event()
        self._send_lock = trio.Lock()

    async def flush(self) -> None:
        async with self._send_lock:
            data = self.session.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and process frames (PINGs are answered) until the relay closes."""
        task_status.started()
        try:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    return
                self.events += self.session.receive_data(data, trio.current_time())
                self.changed.set()
                self.changed = trio.Event()
                await self.flush()
        finally:
            await trio.aclose_forcefully(self.stream)

    async def wait_for(self, kind: type[E], **fields: object) -> E:
        """The first event of ``kind`` whose fields match, waiting for it if needed."""
        with trio.fail_after(WAIT):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and all(
                        getattr(event, k) == v for k, v in fields.items()
                    ):
                        return event
                await self.changed.wait()

    async def result(self, req_id: int) -> ResultReceived:
        return await self.wait_for(ResultReceived, req_id=req_id)


async def connect(nursery: trio.Nursery, relay: Relay) -> BareClient:
    """A bare client, authenticated (AUTH method 2) to ``relay``."""
    tcp = await trio.open_tcp_stream("127.0.0.1", relay.info.port)
    stream = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
    client = BareClient(stream)
    await client.flush()
    await nursery.start(client.run)
    challenge = await client.wait_for(ChallengeReceived)
    credential = auth.stored_key_credential(TOKEN, challenge.nonce, bytes(range(32)))
    client.session.send_auth(1, AuthMethod.HMAC_SHA256_STORED_KEY, credential)
    await client.flush()
    assert (await client.result(1)).status == ResultStatus.OK
    return client


async def bind(
    client: BareClient,
    req_id: int,
    tunnel_id: int,
    bind: Address,
    options: BindOptions | None = None,
) -> ResultReceived:
    client.session.send_bind(req_id, tunnel_id, bind, options=options)
    await client.flush()
    return await client.result(req_id)


def _listening(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


async def test_bind_naming_another_host_is_denied(nursery: trio.Nursery, tmp_path: Path) -> None:
    """§7.2 item 3: the relay binds on its configured host (here 127.0.0.1) or refuses."""
    relay = await start_relay(nursery, tmp_path)
    client = await connect(nursery, relay)
    lo, _ = relay.config.port_range
    refused = await bind(client, 2, 1, Address("127.0.0.2", lo))
    assert refused.status == ResultStatus.DENIED, refused
    assert "127.0.0.1 only" in refused.message
    assert not _listening("127.0.0.1", lo)
    assert not _listening("127.0.0.2", lo)
    named = await bind(client, 3, 2, Address("relay.example", 0))
    assert named.status == ResultStatus.DENIED, named
    for req_id, host in ((4, "127.0.0.1"), (5, "0.0.0.0"), (6, "::")):
        ok = await bind(client, req_id, req_id, Address(host, 0))
        assert ok.status == ResultStatus.OK, ok
        assert ok.bound is not None
        assert ok.bound.host == "127.0.0.1"
        assert _listening("127.0.0.1", ok.bound.port)


async def test_visit_with_allow_is_malformed_before_the_tunnel_limit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """§7.2 item 4: ALLOW/DENY with VISIT (MALFORMED) is judged before the tunnel limit."""
    relay = await start_relay(nursery, tmp_path, max_tunnels_per_client=1)
    client = await connect(nursery, relay)
    assert (await bind(client, 2, 1, Address(None, 0))).status == ResultStatus.OK
    options = BindOptions(allow=(ipaddress.ip_network("10.0.0.0/8"),), visit="ssh.home")
    answer = await bind(client, 3, 2, Address(None, 0), options)
    assert answer.status == ResultStatus.MALFORMED, answer
    assert (await bind(client, 4, 3, Address(None, 0))).status == ResultStatus.LIMIT_REACHED


async def test_bind_checks_keep_their_order_while_the_relay_drains(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """§7.2 item 4 and §10.2 item 7: a draining relay still answers tunnel id 0 MALFORMED
    (the first check), and DENIED where a policy check would refuse."""
    relay = await start_relay(nursery, tmp_path, drain_timeout=30.0)
    client = await connect(nursery, relay)
    bound = await bind(client, 2, 1, Address(None, 0))
    assert bound.bound is not None
    # An open stream keeps the session draining instead of closing at once.
    visitor = await trio.open_tcp_stream("127.0.0.1", bound.bound.port)
    opened = await client.wait_for(StreamOpened)
    client.session.accept_stream(opened.stream_id)
    await client.flush()
    relay.shutdown.set()
    await client.wait_for(GoAwayReceived)
    answers = [
        await bind(client, 3, 0, Address(None, 0)),
        await bind(client, 4, 1, Address(None, 0)),
        await bind(client, 5, 5, Address(None, 0)),
    ]
    assert [a.status for a in answers] == [
        ResultStatus.MALFORMED,
        ResultStatus.DUPLICATE_TUNNEL,
        ResultStatus.DENIED,
    ], answers
    assert "shutting down" in answers[2].message
    with trio.fail_after(WAIT):
        while True:  # §10.2 item 7: new visitors are refused, not left hanging
            try:
                late = await trio.open_tcp_stream("127.0.0.1", bound.bound.port)
            except OSError:
                break
            await late.aclose()
            await trio.sleep(0.05)
    await visitor.aclose()


async def test_a_draining_clients_ports_go_to_the_next_session(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """§10.2 item 9: after the client's GOAWAY its port goes to a new session of the token at
    once; a visitor who connected meanwhile is served there; the old stream goes on."""
    relay = await start_relay(nursery, tmp_path)
    old = await connect(nursery, relay)
    first = await bind(old, 2, 1, Address(None, 0))
    assert first.bound is not None
    port = first.bound.port
    visitor = await trio.open_tcp_stream("127.0.0.1", port)
    opened = await old.wait_for(StreamOpened)
    sid = opened.stream_id
    old.session.accept_stream(sid)
    await old.flush()

    old.session.go_away(ErrorCode.NO_ERROR, "restarting", last_stream_id=sid)
    await old.flush()
    # The relay takes no visitor for the draining session: this one waits in the backlog.
    waiting = await trio.open_tcp_stream("127.0.0.1", port)
    await waiting.send_all(b"hello new")
    refused = await bind(old, 3, 2, Address(None, 0))
    assert refused.status == ResultStatus.DENIED, refused

    new = await connect(nursery, relay)
    again = await bind(new, 2, 1, Address("0.0.0.0", port))
    assert again.status == ResultStatus.OK, again
    assert again.bound == Address("127.0.0.1", port)
    moved = await new.wait_for(StreamOpened)
    new.session.accept_stream(moved.stream_id)
    await new.flush()
    got = await new.wait_for(DataReceived, stream_id=moved.stream_id)
    assert bytes(got.data) == b"hello new"
    assert not [e for e in old.events if isinstance(e, StreamOpened) and e.stream_id != sid]

    # The draining session's stream still carries data both ways.
    old.session.send_data(sid, b"still here")
    await old.flush()
    with trio.fail_after(WAIT):
        received = b""
        while len(received) < len(b"still here"):
            chunk = await visitor.receive_some(100)
            assert chunk
            received += chunk
    assert received == b"still here"
    await visitor.send_all(b"pong")
    echoed = await old.wait_for(DataReceived, stream_id=sid)
    assert bytes(echoed.data) == b"pong"
    await visitor.aclose()
    await waiting.aclose()
