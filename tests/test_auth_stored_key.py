"""AUTH method 2 (stored key, protocol-spec.md §7.1) and the relay's choice between methods.

The arithmetic is checked against fixed vectors (the same as Appendix A, computed
independently with the openssl command line), the relay side over in-memory and real TLS
connections, with relays that know tokens in clear, by stored key only, or both.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from muxtunnel import handshake
from muxtunnel.access import OPEN_POLICY, TokenEntry, TokenPolicy
from muxtunnel.config import ServerConfig
from muxtunnel.connection import MuxConnection, MuxSessionClosedError, make_session
from muxtunnel.errors import AuthError, ConfigError, HandshakeError
from muxtunnel.handshake import authenticate_client, client_handshake, match_entry
from muxtunnel.protocol import auth, session as session_module
from muxtunnel.protocol.constants import AuthMethod, Role
from muxtunnel.tls import client_ssl_context
from muxtunnel.tokens import plaintext_entry, token_id

from .conftest import TOKEN, start_relay

if TYPE_CHECKING:
    from collections.abc import Sequence

TOKEN_A = "s3cr3t-token"
NONCE_S = bytes(range(32))
NONCE_C = bytes(range(32, 64))
#: Fixed values for TOKEN_A, NONCE_S and NONCE_C (openssl dgst -sha256 -mac HMAC ...).
CLIENT_KEY = bytes.fromhex("b8654d3e318ba8908e13cc9713e7df6ff5b2141fb18d155c3d9a04b81af9a952")
STORED_KEY = bytes.fromhex("6368f9ddd8ac42352a6c29090be36462ebc2a0ba2bcd822d18fdeda40889e412")
PROOF = bytes.fromhex("72c547e936eba6814d7c59d69a2d74211d678df5f1f33d329f953375fc9af3dc")
MAC1 = bytes.fromhex("67b3966080d74956b4d7a87a495ccfc9ad72f30d2df8009ac045adbb539bc029")

OTHER = "another-token-with-enough-entropy-0001"
#: ServerConfig needs a state dir; these tests never use it.
STATE = Path("/nonexistent/muxtunnel-state")


# --------------------------------------------------------------------------------------------
# The arithmetic (sans-IO)


def test_fixed_vectors() -> None:
    assert auth.client_key(TOKEN_A) == CLIENT_KEY
    assert auth.stored_key_of(CLIENT_KEY) == STORED_KEY
    assert auth.stored_key(TOKEN_A) == STORED_KEY
    assert auth.make_proof(TOKEN_A, NONCE_S, NONCE_C) == PROOF
    assert auth.stored_key_credential(TOKEN_A, NONCE_S, NONCE_C) == NONCE_C + PROOF
    assert auth.mac(TOKEN_A, NONCE_S, NONCE_C) == MAC1
    assert auth.hmac_credential(TOKEN_A, NONCE_S, NONCE_C) == NONCE_C + MAC1
    assert auth.AUTH2_CONTEXT == b"muxtunnel/1 auth2\x00"
    assert auth.CLIENT_KEY_CONTEXT == b"muxtunnel/1 client key"
    assert int(AuthMethod.HMAC_SHA256_STORED_KEY) == 2


def test_check_proof_right_and_wrong_token() -> None:
    credential = NONCE_C + PROOF
    others = [auth.stored_key(f"{OTHER}-{i}") for i in range(3)]
    assert auth.check_proof([STORED_KEY], NONCE_S, credential) == 0
    assert auth.check_proof([*others, STORED_KEY], NONCE_S, credential) == 3
    assert auth.check_proof(others, NONCE_S, credential) is None
    assert auth.check_proof([], NONCE_S, credential) is None
    # Another server nonce, a flipped bit, or a bad length: no match.
    assert auth.check_proof([STORED_KEY], bytes(32), credential) is None
    flipped = credential[:-1] + bytes([credential[-1] ^ 1])
    assert auth.check_proof([STORED_KEY], NONCE_S, flipped) is None
    assert auth.check_proof([STORED_KEY], NONCE_S, credential[:-1]) is None
    assert auth.check_proof([STORED_KEY], NONCE_S, credential + b"\x00") is None


def test_stored_key_alone_does_not_authenticate() -> None:
    """Using the stored key as if it were the token (or the client key) gives a wrong proof."""
    credential = NONCE_C + PROOF
    for fake_token in (STORED_KEY.hex(), "sha256:" + STORED_KEY.hex()):
        forged = auth.stored_key_credential(fake_token, NONCE_S, NONCE_C)
        assert auth.check_proof([STORED_KEY], NONCE_S, forged) is None
    # The method 1 credential of the same token is not a method 2 credential.
    assert auth.check_proof([STORED_KEY], NONCE_S, NONCE_C + MAC1) is None
    assert auth.check_mac([TOKEN_A], NONCE_S, credential) is None


def test_check_mac_method_1() -> None:
    credential = NONCE_C + MAC1
    assert auth.check_mac([TOKEN_A], NONCE_S, credential) == 0
    assert auth.check_mac([None, OTHER, TOKEN_A], NONCE_S, credential) == 2
    assert auth.check_mac([None, OTHER], NONCE_S, credential) is None
    assert auth.check_mac([TOKEN_A], NONCE_S, credential[:63]) is None


def test_no_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate is computed and compared, also after a match; the first match wins."""
    calls: list[bytes] = []
    signature = auth._signature

    def counting(stored: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
        calls.append(stored)
        return signature(stored, server_nonce, client_nonce)

    monkeypatch.setattr(auth, "_signature", counting)
    keys = [STORED_KEY, auth.stored_key(OTHER), STORED_KEY, bytes(32)]
    assert auth.check_proof(keys, NONCE_S, NONCE_C + PROOF) == 0
    assert calls == keys

    macs: list[str] = []
    mac = auth.mac

    def counting_mac(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
        macs.append(token)
        return mac(token, server_nonce, client_nonce)

    monkeypatch.setattr(auth, "mac", counting_mac)
    assert auth.check_mac([TOKEN_A, None, OTHER, TOKEN_A], NONCE_S, NONCE_C + MAC1) == 0
    assert macs == [TOKEN_A, OTHER, TOKEN_A]  # None: a token known only by its stored key


def test_match_entry_by_method() -> None:
    hashed = TokenEntry("office", STORED_KEY, OPEN_POLICY)
    plain = plaintext_entry(TOKEN_A)
    m2 = AuthMethod.HMAC_SHA256_STORED_KEY
    m1 = AuthMethod.HMAC_SHA256
    assert match_entry([hashed], m2, NONCE_S, NONCE_C + PROOF) is hashed
    assert match_entry([plain], m2, NONCE_S, NONCE_C + PROOF) is plain
    # Method 1 needs the token in clear: a stored key cannot check it.
    assert match_entry([hashed], m1, NONCE_S, NONCE_C + MAC1) is None
    assert match_entry([hashed, plain], m1, NONCE_S, NONCE_C + MAC1) is plain
    assert plain.name == token_id(TOKEN_A)
    assert plain.secret == TOKEN_A
    assert plain.stored_key == STORED_KEY


# --------------------------------------------------------------------------------------------
# The relay's accepted tokens


def test_accepted_tokens_plaintext_and_named() -> None:
    named = TokenEntry("office", auth.stored_key(OTHER), TokenPolicy(max_tunnels=2))
    config = ServerConfig(tokens=(TOKEN_A, TOKEN_A), token_entries=(named,), state_dir=STATE)
    entries = config.accepted_tokens()
    assert [e.name for e in entries] == [token_id(TOKEN_A), "office"]
    assert entries[0].secret == TOKEN_A
    assert entries[0].policy is OPEN_POLICY
    assert entries[1] is named
    assert ServerConfig(state_dir=STATE).accepted_tokens() == ()


def test_accepted_tokens_rejects_clashes() -> None:
    same_name = TokenEntry(token_id(TOKEN_A), auth.stored_key(OTHER))
    with pytest.raises(ConfigError, match="used by two tokens"):
        ServerConfig(
            tokens=(TOKEN_A,), token_entries=(same_name,), state_dir=STATE
        ).accepted_tokens()
    same_token = TokenEntry("office", STORED_KEY)
    with pytest.raises(ConfigError, match="configured twice"):
        ServerConfig(
            tokens=(TOKEN_A,), token_entries=(same_token,), state_dir=STATE
        ).accepted_tokens()


# --------------------------------------------------------------------------------------------
# Handshake over in-memory connections


async def _handshake(
    entries: Sequence[TokenEntry], token: str
) -> tuple[TokenEntry | None, Exception | None, int]:
    """Run both sides; the relay's entry (or None), the client's error, the negotiated minor."""
    t_server, t_client = trio.testing.memory_stream_pair()
    server = MuxConnection(t_server, make_session(Role.SERVER), name="server")
    client = MuxConnection(t_client, make_session(Role.CLIENT), name="client")
    result: list[TokenEntry] = []
    errors: list[Exception] = []
    relay_errors: list[str] = []

    async def relay_side() -> None:
        try:
            result.append(await authenticate_client(server, entries))
        except AuthError as exc:
            relay_errors.append(str(exc))

    async def client_side() -> None:
        try:
            assert await client_handshake(client, token, []) == []
        except (AuthError, HandshakeError, MuxSessionClosedError) as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(client.run)
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(relay_side)
                inner.start_soon(client_side)
        minor = client.minor
        server.close()
        client.close()
        nursery.cancel_scope.cancel()
    assert relay_errors == ([] if result else ["wrong token"])
    return (result[0] if result else None), (errors[0] if errors else None), minor


async def test_method_2_in_memory_picks_the_right_entry() -> None:
    entries = [
        plaintext_entry(TOKEN),
        TokenEntry("office", STORED_KEY, TokenPolicy(max_tunnels=1)),
        TokenEntry("home", auth.stored_key(OTHER)),
    ]
    entry, error, minor = await _handshake(entries, TOKEN_A)
    assert minor >= 1
    assert error is None
    assert entry is entries[1]
    entry, error, _ = await _handshake(entries, OTHER)
    assert entry is entries[2]
    entry, error, _ = await _handshake(entries, "not-a-token-we-know-of-0000000000")
    assert entry is None
    assert isinstance(error, AuthError)
    assert "the relay refused the token" in str(error)


# --------------------------------------------------------------------------------------------
# Handshake over real TLS connections to an in-process relay


async def _connect(port: int, token: str) -> Exception | None:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, client_ssl_context(None), server_hostname="127.0.0.1")
    conn = MuxConnection(tls, make_session(Role.CLIENT), name="test client")
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        try:
            with trio.fail_after(15):
                assert await client_handshake(conn, token, []) == []
        except (AuthError, HandshakeError, MuxSessionClosedError, trio.BrokenResourceError) as exc:
            error = exc
        finally:
            conn.close()
            with trio.move_on_after(2):
                await conn.wait_closed()
            nursery.cancel_scope.cancel()
    return error


@pytest.fixture
def methods(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The AUTH methods the clients of this test used, in order."""
    used: list[int] = []
    make = handshake.make_credential

    def spy(token: str, server_nonce: bytes, method: int = AuthMethod.HMAC_SHA256) -> bytes:
        used.append(method)
        return make(token, server_nonce, method)

    monkeypatch.setattr(handshake, "make_credential", spy)
    return used


async def test_method_2_over_tls(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, methods: list[int]
) -> None:
    """A relay that knows only stored keys accepts the right token and refuses others."""
    caplog.set_level(logging.INFO, logger="muxtunnel.server")
    office = TokenEntry("office", STORED_KEY, OPEN_POLICY)
    relay = await start_relay(nursery, tmp_path, tokens=(), token_entries=(office,))
    assert await _connect(relay.info.port, TOKEN_A) is None
    wrong = await _connect(relay.info.port, TOKEN)
    assert isinstance(wrong, AuthError)
    assert methods == [AuthMethod.HMAC_SHA256_STORED_KEY] * 2
    text = caplog.text
    assert "authenticated (token office)" in text
    assert "authentication failed from 127.0.0.1 port" in text
    assert "wrong token" in text
    relay.shutdown.set()


async def test_method_1_with_an_old_peer(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    methods: list[int],
) -> None:
    """With minor version 0 negotiated the client uses method 1: only tokens in clear match."""
    monkeypatch.setattr(session_module, "PROTOCOL_MINOR", 0)
    caplog.set_level(logging.INFO, logger="muxtunnel.server")
    office = TokenEntry("office", auth.stored_key(OTHER), OPEN_POLICY)
    relay = await start_relay(nursery, tmp_path, tokens=(TOKEN,), token_entries=(office,))
    assert await _connect(relay.info.port, TOKEN) is None
    # OTHER is known by its stored key only: method 1 cannot be checked against it.
    refused = await _connect(relay.info.port, OTHER)
    assert isinstance(refused, AuthError)
    assert methods == [AuthMethod.HMAC_SHA256] * 2
    assert f"authenticated (token {token_id(TOKEN)})" in caplog.text
    assert "wrong token" in caplog.text
    relay.shutdown.set()


async def test_relay_without_any_token_refuses_to_start(tmp_path: Path) -> None:
    from muxtunnel.server import serve

    config = ServerConfig(listen_host="127.0.0.1", listen_port=0, state_dir=tmp_path / "s")
    with pytest.raises(ConfigError, match="at least one token"):
        await serve(config)
