"""A fast TLS stream for trio: ``ssl.SSLObject`` + ``ssl.MemoryBIO`` driven in big batches.

:class:`TLSStream` is a drop-in replacement for ``trio.SSLStream`` on the mux connection (one
reader task, one writer task). It is faster because it does fewer Python-level operations per
byte (benchmarks/bench_tls.py measures both):

* **receive**: one transport read of up to :data:`RECEIVE_SIZE` (256 KiB) feeds the incoming
  BIO, then one tight loop decrypts every complete record into a reused buffer and returns them
  as one ``bytes``. ``trio.SSLStream`` returns one 16 KiB record per call and goes through its
  retry machinery (locks, checkpoints, BIO polls) for each.
* **send**: the whole buffer (already coalesced by the mux writer) is encrypted with one
  ``SSLObject.write`` and handed to the transport with one ``send_all``.
* **optional crypto thread**: with ``offload_threshold`` set, batches at least that big are
  encrypted/decrypted in a ``trio.to_thread`` worker (``ssl`` releases the GIL inside
  ``SSL_read``/``SSL_write``) so the trio loop can run meanwhile. Measurements decide whether it
  pays off (benchmarks/bench_tls.py); the hand-off costs tens of microseconds.

Semantics follow ``trio.SSLStream`` (``https_compatible=False``): the handshake runs on the
first ``send_all``/``receive_some`` or explicitly with :meth:`TLSStream.do_handshake`;
``aclose`` sends close_notify (bounded by ``close_timeout``) and does not wait for the peer's;
a transport EOF without close_notify, a TLS error or a transport failure raise
``trio.BrokenResourceError`` (the ``ssl`` error is the ``__cause__``); every call after
``aclose`` raises ``trio.ClosedResourceError``; two concurrent senders (or receivers) raise
``trio.BusyResourceError``. A cancelled ``send_all`` or handshake breaks the stream (the
peer's view of the TLS record sequence is unknown); a cancelled ``receive_some`` loses
nothing.

Thread safety: an ``SSL`` object must not be used by two threads at once, so every call into
the ``SSLObject`` and its BIOs holds one ``threading.Lock``. The trio thread only ever *tries*
the lock; when a worker holds it, the operation moves to a worker too, so the event loop never
blocks on it.
"""

from __future__ import annotations

import operator
import socket
import ssl
import threading
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CLOSE_TIMEOUT",
    "RECEIVE_SIZE",
    "SEND_CHUNK",
    "TLSStream",
]

#: Bytes asked of the transport per read, and the size of the reused plaintext buffer.
RECEIVE_SIZE: Final = 256 * 1024
#: Largest piece of one ``send_all`` encrypted at once (bounds the ciphertext held in memory).
SEND_CHUNK: Final = 1024 * 1024
#: How long ``aclose`` may spend sending close_notify before it closes the transport anyway.
CLOSE_TIMEOUT: Final = 2.0
#: Largest plaintext of one TLS record: one ``SSLObject.read`` returns at most this much.
_RECORD: Final = 16384

_T = TypeVar("_T")


def _stdlib_socket(transport: trio.abc.Stream) -> socket.socket | None:
    """The stdlib socket of a ``trio.SocketStream`` (trio keeps it non-blocking), else None."""
    if not isinstance(transport, trio.SocketStream):
        return None
    raw = getattr(transport.socket, "_sock", None)
    return raw if isinstance(raw, socket.socket) and not raw.getblocking() else None


class _State(Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _Conflict:
    """Raise ``trio.BusyResourceError`` when two tasks use the same half at once."""

    __slots__ = ("_held", "_msg")

    def __init__(self, msg: str) -> None:
        self._msg = msg
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class TLSStream(trio.abc.Stream):
    """TLS over any ``trio.abc.Stream``, batching records (see the module docstring).

    Args:
        transport_stream: The stream carrying the TLS records (a ``trio.SocketStream``
            normally). Its ``receive_some(max_bytes)`` should return big chunks when it can.
        ssl_context: From :func:`muxtunnel.tls.server_ssl_context` or
            :func:`muxtunnel.tls.client_ssl_context`.
        server_side: True on the relay.
        server_hostname: SNI and, when the context checks host names, the name to verify.
        offload_threshold: None (default) keeps all crypto on the trio thread; an int moves
            encrypt/decrypt batches of at least that many bytes to a worker thread.
        receive_size: Bytes asked of the transport per read (and plaintext buffer size).
        close_timeout: Bound on sending close_notify in :meth:`aclose`.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        offload_threshold: int | None = None,
        receive_size: int = RECEIVE_SIZE,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        if receive_size < _RECORD:
            raise ValueError(f"receive_size must be at least {_RECORD}")
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._offload = offload_threshold
        self._receive_size = receive_size
        self._close_timeout = close_timeout
        self._state = _State.OK
        self._handshake_done = False
        self._handshake_event: trio.Event | None = None
        self._eof_received = False
        self._deferred_error: BaseException | None = None
        self._ssl_lock = threading.Lock()
        self._send_lock = trio.StrictFIFOLock()
        self._send_conflict = _Conflict("another task is currently sending data on this TLSStream")
        self._recv_conflict = _Conflict(
            "another task is currently receiving data on this TLSStream"
        )
        self._rbuf = bytearray(receive_size)
        self._rview = memoryview(self._rbuf)
        #: The non-blocking stdlib socket under a ``trio.SocketStream`` transport, for sends
        #: tried before any waiting (None for other transports).
        self._raw_socket: socket.socket | None = _stdlib_socket(transport_stream)
        #: Ciphertext read buffer of that socket (reused; its bytes are copied into the BIO).
        self._inbuf = bytearray(receive_size if self._raw_socket is not None else 0)
        self._inview = memoryview(self._inbuf)
        self._short_read = False
        self._recv_yielded = False
        #: Ciphertext :meth:`send_nowait` could not hand to the socket; sent first by the next
        #: ``send_all``.
        self._backlog = b""

    # ----------------------------------------------------------------------------------------
    # Introspection (like trio.SSLStream; valid after the handshake)

    @property
    def server_side(self) -> bool:
        """True for the server end."""
        return self._ssl.server_side

    @property
    def server_hostname(self) -> str | None:
        """The SNI name given to the constructor (client side)."""
        return self._ssl.server_hostname

    @property
    def receive_size(self) -> int:
        """Bytes asked of the transport per read (and the size of the plaintext buffer)."""
        return self._receive_size

    @receive_size.setter
    def receive_size(self, value: int) -> None:
        # The relay reads small until the peer is authenticated, then big.
        if value < _RECORD:
            raise ValueError(f"receive_size must be at least {_RECORD}")
        if value != len(self._rbuf):
            self._rbuf = bytearray(value)
            self._rview = memoryview(self._rbuf)
            if self._raw_socket is not None:
                self._inbuf = bytearray(value)
                self._inview = memoryview(self._inbuf)
        self._receive_size = value

    @property
    def handshake_done(self) -> bool:
        """True once the TLS handshake has completed."""
        return self._handshake_done

    def _need_handshake(self, name: str) -> None:
        if not self._handshake_done:
            raise trio.NeedHandshakeError(f"call do_handshake() before calling {name!r}")

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate: a dict, or DER ``bytes`` with ``binary_form=True``."""
        self._need_handshake("getpeercert")
        return self._ssl.getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        """The ALPN protocol the handshake selected, or None."""
        self._need_handshake("selected_alpn_protocol")
        return self._ssl.selected_alpn_protocol()

    def cipher(self) -> tuple[str, str, int] | None:
        """``(name, protocol, secret_bits)`` of the negotiated cipher."""
        self._need_handshake("cipher")
        return self._ssl.cipher()

    def version(self) -> str | None:
        """The negotiated protocol version, e.g. ``"TLSv1.3"``."""
        self._need_handshake("version")
        return self._ssl.version()

    # ----------------------------------------------------------------------------------------
    # Internals

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLSStream was closed")
        raise trio.BrokenResourceError("this TLSStream is broken")

    def _transport_error(self, exc: BaseException) -> BaseException:
        """Mark the stream failed after a transport/TLS error; return what to raise."""
        if self._state is _State.CLOSED:
            return trio.ClosedResourceError("this TLSStream was closed")
        self._state = _State.BROKEN
        if isinstance(
            exc, ssl.SSLError | ssl.CertificateError | OSError | trio.BrokenResourceError
        ):
            err = trio.BrokenResourceError(f"TLS connection failed: {exc}")
        else:
            err = trio.BrokenResourceError(f"transport failed: {exc!r}")
        err.__cause__ = exc
        return err

    def _locked(self, fn: Callable[..., _T], *args: object) -> _T:
        with self._ssl_lock:
            return fn(*args)

    async def _call(self, big: bool, fn: Callable[..., _T], *args: object) -> tuple[_T, bool]:
        """Run ``fn(*args)`` under the SSL lock; return ``(result, yielded)``.

        In a worker thread if ``big`` and offloading is on, or if a worker holds the lock now;
        otherwise inline (no checkpoint).
        """
        if not (big and self._offload is not None) and self._ssl_lock.acquire(blocking=False):
            try:
                return fn(*args), False
            finally:
                self._ssl_lock.release()
        return await trio.to_thread.run_sync(self._locked, fn, *args), True

    async def _transport_send(self, data: bytes) -> None:
        sock = self._raw_socket
        if sock is not None:
            # Try the send first: a socket with room takes the whole record at once, with one
            # schedule point afterwards (as ``trio.SocketStream.send_all`` has) and no waiting.
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._transport_error(exc) from exc
            if sent == len(data):
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            rest = memoryview(data)[sent:]
            try:
                await self.transport_stream.send_all(rest)
            except trio.Cancelled:
                if self._state is _State.OK:
                    self._state = _State.BROKEN
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._transport_error(exc) from exc
            return
        try:
            await self.transport_stream.send_all(data)
        except trio.Cancelled:
            # Part of a record may be on the wire: the record stream is unrecoverable.
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._transport_error(exc) from exc

    async def _transport_receive(self) -> bytes | bytearray | memoryview:
        """Up to ``receive_size`` bytes from the transport (b"" at EOF).

        On a socket transport the bytes land in a reused buffer (valid until the next call)
        and the read waits for readability first when the previous one was small.
        Sets ``_recv_yielded``: whether this call reached a schedule point.
        """
        sock = self._raw_socket
        if sock is None:
            self._recv_yielded = True
            return await self._transport_receive_stream()
        view = self._inview
        self._recv_yielded = False
        try:
            if self._short_read:
                await self._wait_readable(sock)
            while True:
                try:
                    n = sock.recv_into(view)
                except BlockingIOError:
                    await self._wait_readable(sock)
                    continue
                break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._transport_error(exc) from exc
        # A small read (interactive traffic) likely emptied the socket: wait first next time.
        self._short_read = n < _RECORD
        return view[:n]

    async def _wait_readable(self, sock: socket.socket) -> None:
        if sock.fileno() == -1:
            raise trio.ClosedResourceError("the transport socket was closed")
        self._recv_yielded = True
        await trio.lowlevel.wait_readable(sock)

    async def _transport_receive_stream(self) -> bytes | bytearray:
        try:
            return await self.transport_stream.receive_some(self._receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._transport_error(exc) from exc

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        # The caller holds the SSL lock.
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush_locked(self) -> None:
        """Send everything in the outgoing BIO; the caller holds ``_send_lock``."""
        # ``pending`` is read without the SSL lock: at worst a stale 0 while a worker decrypts,
        # and whoever holds ``_send_lock`` next flushes what that worker added.
        if self._backlog:
            backlog, self._backlog = self._backlog, b""
            await self._transport_send(backlog)
        while self._outgoing.pending:
            out, _ = await self._call(False, self._outgoing.read)
            await self._transport_send(out)

    async def _flush_if_free(self) -> None:
        """Send what a read produced (alerts, key updates), unless a sender is busy.

        A task holding ``_send_lock`` flushes the BIO before it releases the lock, so nothing
        is left behind, and the reader never waits on a blocked writer.
        """
        if self._outgoing.pending and not self._send_lock.locked():
            async with self._send_lock:
                await self._flush_locked()

    # ----------------------------------------------------------------------------------------
    # Handshake

    async def _handshake(self) -> None:
        while True:
            want_read = False
            try:
                await self._call(False, self._ssl.do_handshake)
            except ssl.SSLWantReadError:
                want_read = True
            except (ssl.SSLError, ssl.CertificateError) as exc:
                err = self._transport_error(exc)
                # Best effort: tell the peer why (the alert is in the outgoing BIO).
                with trio.move_on_after(1.0):
                    try:
                        await self._flush_locked()
                    except trio.BrokenResourceError:
                        pass
                raise err from exc
            async with self._send_lock:
                await self._flush_locked()
            if not want_read:
                return
            await self._call(False, self._feed, await self._transport_receive())

    async def _ensure_handshake(self) -> bool:
        """Run (or wait for) the handshake; return True if this call yielded."""
        if self._handshake_done:
            return False
        if self._handshake_event is not None:
            await self._handshake_event.wait()
            if not self.handshake_done:
                self._check_status()
                raise trio.BrokenResourceError("the TLS handshake failed")
            return True
        self._handshake_event = trio.Event()
        try:
            await self._handshake()
            self._handshake_done = True
        except BaseException:
            if self._state is _State.OK:
                self._state = _State.BROKEN
            raise
        finally:
            self._handshake_event.set()
        return True

    async def do_handshake(self) -> None:
        """Complete the TLS handshake now (it otherwise runs on first use).

        Raises:
            trio.BrokenResourceError: The handshake failed (the ``ssl`` error, for example an
                ``ssl.SSLCertVerificationError``, is the ``__cause__``).
            trio.ClosedResourceError: The stream was closed.
        """
        self._check_status()
        await trio.lowlevel.checkpoint_if_cancelled()
        if not await self._ensure_handshake():
            await trio.lowlevel.cancel_shielded_checkpoint()

    # ----------------------------------------------------------------------------------------
    # Receive

    def _decrypt(self, max_bytes: int) -> bytes:
        """Decrypt up to ``max_bytes`` from the incoming BIO; b"" means more input is needed.

        Sets ``_eof_received`` on close_notify. Raises ``ssl`` errors, but only when no data
        was collected first; otherwise the error is kept for the next call.
        The caller holds the SSL lock.
        """
        # typeshed says read() returns bytes; with a buffer it returns the count (an int).
        read = cast("Callable[[int, memoryview], int]", self._ssl.read)
        view = self._rview
        limit = min(max_bytes, len(view))
        pos = 0
        while pos < limit:
            try:
                n = read(limit - pos, view[pos:limit])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:
                if not pos:
                    raise
                self._deferred_error = exc
                break
            if not n:
                # _ssl returns 0 instead of raising SSLZeroReturnError after close_notify.
                self._eof_received = True
                break
            pos += n
            if self._drained():
                break  # another read would only raise SSLWantReadError (a costly exception)
        return bytes(view[:pos])

    def _drained(self) -> bool:
        """True if a read now could only ask for more input: no decrypted bytes are kept and
        the incoming BIO is empty and not at EOF (a partial record kept by OpenSSL needs more
        input as well). The caller holds the SSL lock, or no worker thread exists."""
        incoming = self._incoming
        return not incoming.pending and not incoming.eof and not self._ssl.pending()

    def _feed_and_decrypt(self, data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
        # The caller holds the SSL lock.
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        return self._decrypt(max_bytes)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return decrypted bytes (many records at once), or b"" after the peer's close_notify.

        Raises:
            trio.BrokenResourceError: TLS or transport failure, or EOF without close_notify.
            trio.ClosedResourceError: This stream was closed.
            trio.BusyResourceError: Another task is receiving.
        """
        with self._recv_conflict:
            self._check_status()
            if max_bytes is None:
                max_bytes = self._receive_size
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = False if self._handshake_done else await self._ensure_handshake()
            if self._eof_received:
                await trio.lowlevel.checkpoint()
                return b""
            if self._offload is None and self._raw_socket is not None:
                return await self._receive_direct(max_bytes, yielded)
            data = b""
            incoming: bytes | bytearray | memoryview | None = None
            while True:
                try:
                    if self._deferred_error is not None:
                        exc, self._deferred_error = self._deferred_error, None
                        raise exc
                    if incoming is None:
                        if self._offload is None and self._drained():
                            data, y = b"", False  # nothing to decrypt: read the socket
                        else:
                            data, y = await self._call(False, self._decrypt, max_bytes)
                    else:
                        big = self._offload is not None and len(incoming) >= self._offload
                        data, y = await self._call(big, self._feed_and_decrypt, incoming, max_bytes)
                        incoming = None
                    yielded |= y
                except ssl.SSLZeroReturnError:
                    self._eof_received = True
                    data = b""
                    break
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise self._transport_error(exc) from exc
                if data or self._eof_received:
                    # Output the reads produced (rare) waits for the next send, or for the next
                    # call that must block: a cancelled flush here would lose ``data``.
                    break
                if self._outgoing.pending:
                    await self._flush_if_free()
                    yielded = True
                incoming = await self._transport_receive()
                yielded |= self._recv_yielded
            if not yielded:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def _receive_direct(self, max_bytes: int, yielded: bool) -> bytes:
        """:meth:`receive_some`'s loop on a socket transport without a crypto thread.

        Only the trio thread ever uses the ``SSLObject`` then, so it is called directly: no
        SSL lock, no hand-off. Transport errors come from :meth:`_transport_receive` wrapped
        already, as in the general loop.
        """
        incoming = self._incoming
        data = b""
        try:
            if self._deferred_error is not None:
                exc, self._deferred_error = self._deferred_error, None
                raise exc
            while True:
                if not self._drained():
                    data = self._decrypt(max_bytes)
                    if data or self._eof_received:
                        break
                if self._outgoing.pending:
                    await self._flush_if_free()
                    yielded = True
                chunk = await self._transport_receive()
                yielded |= self._recv_yielded
                if chunk:
                    incoming.write(chunk)
                else:
                    incoming.write_eof()
                data = self._decrypt(max_bytes)
                if data or self._eof_received:
                    break
        except ssl.SSLZeroReturnError:
            self._eof_received = True
            data = b""
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise self._transport_error(exc) from exc
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    # ----------------------------------------------------------------------------------------
    # Send

    def _encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        # The caller holds the SSL lock. Memory BIOs never want to write.
        self._ssl.write(data)
        return self._outgoing.read()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` (in pieces of at most :data:`SEND_CHUNK`) and send it.

        Raises:
            trio.BrokenResourceError: TLS or transport failure (also after a cancelled send).
            trio.ClosedResourceError: This stream was closed.
            trio.BusyResourceError: Another task is sending.
        """
        with self._send_conflict:
            self._check_status()
            await trio.lowlevel.checkpoint_if_cancelled()
            yielded = await self._ensure_handshake()
            if type(data) is memoryview and data.itemsize != 1:
                data = data.cast("B")
            total = len(data)
            if not total and not self._backlog:
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            view = data if total <= SEND_CHUNK else memoryview(data).cast("B")
            lock = self._send_lock
            try:
                # Uncontended (the usual case: one writer task): take the lock without a
                # schedule point, so the record reaches the socket in this very run of the task.
                lock.acquire_nowait()
            except trio.WouldBlock:
                await lock.acquire()
            try:
                self._check_status()
                if self._backlog:
                    backlog, self._backlog = self._backlog, b""
                    await self._transport_send(backlog)
                offload = self._offload
                for start in range(0, total, SEND_CHUNK):
                    piece = view[start : start + SEND_CHUNK]
                    big = offload is not None and len(piece) >= offload
                    try:
                        out, _ = await self._call(big, self._encrypt, piece)
                    except (ssl.SSLError, ssl.CertificateError) as exc:
                        raise self._transport_error(exc) from exc
                    await self._transport_send(out)
                await self._flush_locked()
            finally:
                lock.release()

    @property
    def can_send_nowait(self) -> bool:
        """True if :meth:`send_nowait` may be called now: a socket transport, the handshake
        done, no crypto thread, no send in progress and nothing left over from the last one."""
        return (
            self._raw_socket is not None
            and self._state is _State.OK
            and self._handshake_done
            and self._offload is None
            and not self._backlog
            and not self._send_lock.locked()
        )

    @property
    def backlog(self) -> int:
        """Ciphertext bytes :meth:`send_nowait` left for the next ``send_all`` to send."""
        return len(self._backlog)

    def send_nowait(self, data: bytes | bytearray | memoryview, *, checked: bool = False) -> bool:
        """Encrypt ``data`` and give it to the socket without waiting (see ``can_send_nowait``).

        Returns True if the socket took all of it. Otherwise the rest waits in :attr:`backlog`
        and the caller must make sure a ``send_all`` follows (with ``b""`` if nothing else is
        to be sent), which sends it first. Never raises: a TLS or socket error breaks the
        stream, and the next ``send_all`` reports it. ``checked=True``: the caller saw
        ``can_send_nowait`` True in this same step, without a schedule point since.
        """
        sock = self._raw_socket
        if sock is None or not (checked or self.can_send_nowait):
            raise trio.BusyResourceError("send_nowait is not possible now (see can_send_nowait)")
        # No SSL lock: without a crypto thread (``can_send_nowait`` requires that) only the
        # trio thread ever takes it, and never across a schedule point.
        try:
            out = self._encrypt(data)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._transport_error(exc)
            return False
        try:
            sent = sock.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._transport_error(exc)
            return False
        if sent < len(out):
            self._backlog = out[sent:]
            return False
        return True

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport can take more data (see ``trio.abc.SendStream``)."""
        with self._send_conflict:
            self._check_status()
            async with self._send_lock:
                try:
                    await self.transport_stream.wait_send_all_might_not_block()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise self._transport_error(exc) from exc
                await self._flush_locked()

    # ----------------------------------------------------------------------------------------
    # Close

    def _shutdown(self) -> bytes:
        # The caller holds the SSL lock. Queues close_notify; we do not wait for the peer's
        # (SSL_shutdown wants to read it and raises SSLWantReadError).
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass
        return self._outgoing.read()

    async def aclose(self) -> None:
        """Send close_notify (bounded by ``close_timeout``), then close the transport.

        Closing twice is fine. If the stream is broken, the handshake never finished, or a
        task is blocked sending, the transport is closed without close_notify.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        clean = self._state is _State.OK and self._handshake_done
        self._state = _State.CLOSED
        transport = self.transport_stream
        try:
            if clean and not self._send_lock.locked():
                with trio.move_on_after(self._close_timeout):
                    async with self._send_lock:
                        out, _ = await self._call(False, self._shutdown)
                        out, self._backlog = self._backlog + out, b""
                        if out:
                            await transport.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except BaseException:
            await trio.aclose_forcefully(transport)
            raise
        await transport.aclose()
