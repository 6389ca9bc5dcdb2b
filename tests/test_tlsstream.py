"""TLSStream: real TLS over loopback TCP (and over memory streams), interop with trio.SSLStream."""

from __future__ import annotations

import array
import hashlib
import os
import ssl
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from muxtunnel.protocol.constants import ALPN
from muxtunnel.tls import (
    KnownHosts,
    ServerIdentity,
    client_ssl_context,
    fingerprint_of_der,
    identity_error_from_exception,
    load_or_create_identity,
    server_ssl_context,
    verify_server,
)
from muxtunnel.tlsstream import TLSStream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings("error")

MiB = 1024 * 1024
AnyTLS = TLSStream | trio.SSLStream[trio.abc.Stream]


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> ServerIdentity:
    return load_or_create_identity(tmp_path_factory.mktemp("relay"))


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected loopback TCP pair: (client end, server end)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    return client, server


def wrap(
    kind: str,
    transport: trio.abc.Stream,
    ctx: ssl.SSLContext,
    *,
    server: bool,
    offload: int | None = None,
) -> AnyTLS:
    hostname = None if server else "localhost"
    if kind == "trio":
        return trio.SSLStream(transport, ctx, server_side=server, server_hostname=hostname)
    return TLSStream(
        transport, ctx, server_side=server, server_hostname=hostname, offload_threshold=offload
    )


async def handshake_both(a: AnyTLS, b: AnyTLS) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.do_handshake)
            nursery.start_soon(b.do_handshake)


async def tls_pair(
    identity: ServerIdentity,
    client_kind: str = "ours",
    server_kind: str = "ours",
    *,
    offload: int | None = None,
    server_ctx: ssl.SSLContext | None = None,
    handshake: bool = True,
) -> tuple[AnyTLS, AnyTLS]:
    """(client, server) TLS streams over loopback TCP, handshaken unless told otherwise."""
    c_tcp, s_tcp = await tcp_pair()
    client = wrap(client_kind, c_tcp, client_ssl_context(), server=False, offload=offload)
    server = wrap(
        server_kind,
        s_tcp,
        server_ctx or server_ssl_context(identity),
        server=True,
        offload=offload,
    )
    if handshake:
        await handshake_both(client, server)
    return client, server


def pattern(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (fast: a repeated urandom block, rotated by seed)."""
    block = os.urandom(MiB + 7)
    return (block[seed:] + block[:seed]) * (size // len(block)) + block[: size % len(block)]


async def pump(sender: AnyTLS, receiver: AnyTLS, data: bytes, chunk: int) -> str:
    """Send ``data`` in ``chunk`` pieces on one side, receive all of it on the other; sha256."""
    digest = hashlib.sha256()
    got = 0

    async def send() -> None:
        view = memoryview(data)
        for start in range(0, len(data), chunk):
            await sender.send_all(view[start : start + chunk])

    async def receive() -> None:
        nonlocal got
        while got < len(data):
            piece = await receiver.receive_some(256 * 1024)
            assert piece, "unexpected EOF"
            digest.update(piece)
            got += len(piece)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    assert got == len(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Generic stream conformance


@pytest.mark.parametrize("offload", [None, 0], ids=["inline", "thread"])
async def test_check_two_way_stream_over_tcp(identity: ServerIdentity, offload: int | None) -> None:
    async def maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        # No explicit handshake: the first send/receive must run it.
        client, server = await tls_pair(identity, offload=offload, handshake=False)
        return client, server

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(maker, None)


async def test_check_two_way_stream_over_memory_streams(identity: ServerIdentity) -> None:
    async def maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.memory_stream_pair()
        client = TLSStream(a, client_ssl_context(), server_hostname="localhost")
        server = TLSStream(b, server_ssl_context(identity), server_side=True)
        return client, server

    async def clogged_maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.lockstep_stream_pair()
        client = TLSStream(a, client_ssl_context(), server_hostname="localhost")
        server = TLSStream(b, server_ssl_context(identity), server_side=True)
        await handshake_both(client, server)
        return client, server

    with trio.fail_after(30):
        await trio.testing.check_two_way_stream(maker, clogged_maker)


# --------------------------------------------------------------------------------------------
# Interop and bulk integrity


@pytest.mark.parametrize(
    ("client_kind", "server_kind"),
    [("ours", "trio"), ("trio", "ours")],
)
async def test_interop_with_trio_sslstream_64mib(
    identity: ServerIdentity, tmp_path: Path, client_kind: str, server_kind: str
) -> None:
    # Tickets on: the client must digest TLS 1.3 post-handshake messages (NewSessionTicket).
    server_ctx = server_ssl_context(identity)
    server_ctx.num_tickets = 2
    client, server = await tls_pair(identity, client_kind, server_kind, server_ctx=server_ctx)
    async with client, server:
        for stream in (client, server):
            assert stream.selected_alpn_protocol() == ALPN
            cipher = stream.cipher()
            assert cipher is not None
            assert cipher[1] == "TLSv1.3"
        der = client.getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        assert fingerprint_of_der(der) == identity.fingerprint
        assert server.getpeercert() is None  # no client certificates
        fp = verify_server(client, "localhost:1", None, None, KnownHosts(tmp_path / "kh"), print)
        assert fp == identity.fingerprint

        up, down = pattern(64 * MiB, 1), pattern(8 * MiB, 2)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                results: dict[str, str] = {}

                async def run(name: str, coro: Callable[[], Awaitable[str]]) -> None:
                    results[name] = await coro()

                nursery.start_soon(run, "up", lambda: pump(client, server, up, 256 * 1024))
                nursery.start_soon(run, "down", lambda: pump(server, client, down, 64 * 1024))
        assert results["up"] == hashlib.sha256(up).hexdigest()
        assert results["down"] == hashlib.sha256(down).hexdigest()


@pytest.mark.parametrize("offload", [None, 0, 128 * 1024], ids=["inline", "thread", "big-only"])
async def test_bulk_both_ways_ours(identity: ServerIdentity, offload: int | None) -> None:
    client, server = await tls_pair(identity, offload=offload)
    async with client, server:
        up, down = pattern(8 * MiB + 3, 3), pattern(MiB + 5, 4)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server, up, 300 * 1024)
                nursery.start_soon(pump, server, client, down, 1000)
            # one send_all bigger than SEND_CHUNK, read back in odd small pieces
            big = pattern(3 * MiB + 1, 5)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, big)
                got = bytearray()
                while len(got) < len(big):
                    got += await server.receive_some(7777)
            assert bytes(got) == big


async def test_receive_returns_many_records_per_call(identity: ServerIdentity) -> None:
    client, server = await tls_pair(identity, "trio", "ours")
    payload = pattern(200 * 1024, 9)  # 13 records
    async with client, server, trio.open_nursery() as nursery:
        with trio.fail_after(10):
            nursery.start_soon(client.send_all, payload)
            # Once the sender is done or waits for room, the records are all in the socket.
            await trio.testing.wait_all_tasks_blocked()
            got = await server.receive_some()
            assert len(got) > 16384  # trio.SSLStream would return one record
            while len(got) < len(payload):
                got += await server.receive_some()
            assert got == payload


async def test_a_record_split_across_socket_reads_comes_whole(identity: ServerIdentity) -> None:
    """The server's socket gets the client's record in two parts, 50 ms apart: the first read
    decrypts nothing, and ``receive_some`` waits for the rest instead of returning."""
    to_client, from_server = await tcp_pair()  # the server's TCP connection, fed by hand
    client_end, wire = trio.testing.memory_stream_pair()
    client = wrap("ours", client_end, client_ssl_context(), server=False)
    server = wrap("ours", from_server, server_ssl_context(identity), server=True)
    split: list[int] = []

    async def upstream() -> None:  # client -> server socket: the first record comes in two
        while data := await wire.receive_some():
            if not split and len(data) > 40 and data[0] == 0x17:  # application data
                split.append(len(data))
                await to_client.send_all(data[:20])
                await trio.sleep(0.05)
                data = data[20:]
            await to_client.send_all(data)

    async def downstream() -> None:
        while data := await to_client.receive_some():
            await wire.send_all(data)

    async with to_client, from_server, trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        nursery.start_soon(downstream)
        with trio.fail_after(10):
            await handshake_both(client, server)
            await client.send_all(b"one record, two reads")
            assert await server.receive_some() == b"one record, two reads"
        assert split
        nursery.cancel_scope.cancel()


async def test_bytes_before_a_corrupt_record_are_delivered_then_the_error(
    identity: ServerIdentity,
) -> None:
    """Two records in one socket read, the second forged: the first record's bytes come out,
    and the next ``receive_some`` raises."""
    to_client, from_server = await tcp_pair()
    client_end, wire = trio.testing.memory_stream_pair()
    client = wrap("ours", client_end, client_ssl_context(), server=False)
    server = wrap("ours", from_server, server_ssl_context(identity), server=True)

    async def upstream(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while data := await wire.receive_some():
                await to_client.send_all(data)

    async def downstream() -> None:
        while data := await to_client.receive_some():
            await wire.send_all(data)

    async with to_client, from_server, trio.open_nursery() as nursery:
        passing = await nursery.start(upstream)
        nursery.start_soon(downstream)
        with trio.fail_after(10):
            await handshake_both(client, server)
            passing.cancel()
            await client.send_all(b"good")
            first = await wire.receive_some()
            await client.send_all(b"forged")
            second = bytearray(await wire.receive_some())
            second[-1] ^= 0xFF  # the record's tag no longer matches
            await to_client.send_all(first + second)
            assert await server.receive_some() == b"good"
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# Close and failure semantics


@pytest.mark.parametrize(
    ("closer_kind", "reader_kind"),
    [("ours", "trio"), ("trio", "ours"), ("ours", "ours")],
)
async def test_close_notify_gives_clean_eof(
    identity: ServerIdentity, closer_kind: str, reader_kind: str
) -> None:
    closer, reader = await tls_pair(identity, closer_kind, reader_kind)
    with trio.fail_after(10):
        await closer.send_all(b"last words")
        await closer.aclose()
        got = b""
        while True:
            piece = await reader.receive_some()
            if not piece:
                break
            got += piece
        assert got == b"last words"
        assert await reader.receive_some() == b""  # EOF is sticky
        await reader.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await closer.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await closer.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await reader.receive_some()
    await closer.aclose()  # idempotent


@pytest.mark.parametrize("peer_kind", ["ours", "trio"])
async def test_eof_without_close_notify_is_broken(identity: ServerIdentity, peer_kind: str) -> None:
    ours, peer = await tls_pair(identity, "ours", peer_kind)
    with trio.fail_after(10):
        await peer.send_all(b"data")
        # Close the TCP connection under the peer's TLS: no close_notify.
        await peer.transport_stream.aclose()
        assert await ours.receive_some() == b"data"
        with pytest.raises(trio.BrokenResourceError) as info:
            await ours.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLError)
        with pytest.raises(trio.BrokenResourceError):
            await ours.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await ours.send_all(b"x")
        await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some()


async def test_aclose_is_bounded_when_peer_does_not_read(identity: ServerIdentity) -> None:
    client, server = await tls_pair(identity)
    client_tls = client
    assert isinstance(client_tls, TLSStream)
    client_tls._close_timeout = 0.5
    # Fill the pipe: the server never reads, so send_all eventually blocks.
    with trio.move_on_after(1.0):
        while True:
            await client.send_all(b"z" * 65536)
    # The cancelled send broke the stream: aclose closes at once without close_notify.
    with trio.fail_after(2):
        await client.aclose()
    await server.aclose()


class StallingStream(trio.abc.Stream):
    """A transport whose sends can be made to hang forever (a peer that stopped reading)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.stall = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stall:
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_aclose_gives_up_after_close_timeout(identity: ServerIdentity) -> None:
    a, b = trio.testing.memory_stream_pair()
    transport = StallingStream(a)
    client = TLSStream(
        transport, client_ssl_context(), server_hostname="localhost", close_timeout=0.3
    )
    server = TLSStream(b, server_ssl_context(identity), server_side=True)
    await handshake_both(client, server)
    transport.stall = True
    start = trio.current_time()
    with trio.fail_after(3):
        await client.aclose()
    assert 0.25 <= trio.current_time() - start < 2
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    # The close_notify never went out: the server sees EOF without it.
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await server.aclose()


async def test_concurrent_misuse_is_busy(identity: ServerIdentity) -> None:
    client, server = await tls_pair(identity)
    async with client, server:
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive_some, 10)
                nursery.start_soon(server.receive_some, 10)
        await client.send_all(b"ok")
        assert await server.receive_some() == b"ok"
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(client.send_all, b"y" * (8 * MiB))


async def test_cancelled_receive_loses_nothing(identity: ServerIdentity) -> None:
    client, server = await tls_pair(identity)
    async with client, server:
        with trio.move_on_after(0.05):
            await server.receive_some()
        await client.send_all(b"after cancel")
        assert await server.receive_some() == b"after cancel"


async def test_introspection_needs_handshake(identity: ServerIdentity) -> None:
    client, server = await tls_pair(identity, handshake=False)
    assert isinstance(client, TLSStream)
    with pytest.raises(trio.NeedHandshakeError):
        client.getpeercert()
    with pytest.raises(trio.NeedHandshakeError):
        client.selected_alpn_protocol()
    done_before = client.handshake_done
    await handshake_both(client, server)
    assert (done_before, client.handshake_done) == (False, True)
    assert client.version() == "TLSv1.3"
    assert client.server_hostname == "localhost"
    assert not client.server_side
    await client.do_handshake()  # a no-op now
    await client.aclose()
    await server.aclose()


async def test_sni_reaches_the_server(identity: ServerIdentity) -> None:
    seen: list[str | None] = []
    ctx = server_ssl_context(identity)

    def sni(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    ctx.sni_callback = sni
    client, server = await tls_pair(identity, server_ctx=ctx)
    assert seen == ["localhost"]
    await client.aclose()
    await server.aclose()


async def test_certificate_verification_failure(identity: ServerIdentity, tmp_path: Path) -> None:
    other = load_or_create_identity(tmp_path / "other")  # a CA that did not sign the relay
    c_tcp, s_tcp = await tcp_pair()
    client = TLSStream(c_tcp, client_ssl_context(other.cert_path), server_hostname="localhost")
    server = TLSStream(s_tcp, server_ssl_context(identity), server_side=True)
    errors: dict[str, BaseException] = {}

    async def shake(name: str, stream: TLSStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            errors[name] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shake, "client", client)
            nursery.start_soon(shake, "server", server)
    assert identity_error_from_exception(errors["client"], "localhost:1", other.cert_path)
    assert "server" in errors  # the client's alert reached the server
    assert isinstance(errors["server"].__cause__, ssl.SSLError)
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    await client.aclose()
    await server.aclose()


async def test_wait_send_all_might_not_block(identity: ServerIdentity) -> None:
    client, server = await tls_pair(identity)
    async with client, server:
        with trio.fail_after(5):
            await client.wait_send_all_might_not_block()
        await client.send_all(b"x")
        assert await server.receive_some() == b"x"


async def test_send_all_takes_any_buffer(identity: ServerIdentity) -> None:
    client, server = await tls_pair(identity)
    async with client, server:
        words = memoryview(array.array("I", range(1000)))
        with trio.fail_after(5):
            await client.send_all(words)
            await client.send_all(bytearray(b"tail"))
            got = b""
            while len(got) < 4004:
                got += await server.receive_some()
        assert got == words.tobytes() + b"tail"
