"""The arithmetic of the AUTH methods (protocol-spec.md §7.1), sans-IO.

Method 1 (``HMAC_SHA256``): ``credential = nonce_c || HMAC-SHA256(token, context || nonce_s ||
nonce_c)``; the relay needs the token itself to check it.

Method 2 (``HMAC_SHA256_STORED_KEY``): the relay keeps only ``stored_key = SHA-256(client_key)``
where ``client_key = HMAC-SHA256(token, "muxtunnel/1 client key")``. The client sends
``nonce_c || client_key XOR HMAC-SHA256(stored_key, context2 || nonce_s || nonce_c)``; the relay
recovers a candidate ``client_key`` with the stored key and checks that it hashes to the stored
key. Whoever reads the relay's token file learns stored keys, which do not authenticate.

The checks compare against every candidate in constant time and never stop early, so neither
the timing nor the number of candidates tells which one (if any) matched.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from muxtunnel.protocol.constants import AUTH_CONTEXT, AUTH_NONCE_SIZE

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "AUTH2_CONTEXT",
    "CLIENT_KEY_CONTEXT",
    "CREDENTIAL_SIZE",
    "KEY_SIZE",
    "check_mac",
    "check_proof",
    "client_key",
    "hmac_credential",
    "mac",
    "make_proof",
    "stored_key",
    "stored_key_credential",
    "stored_key_of",
]

#: HMAC message that derives the client key from the token (§7.1, method 2).
CLIENT_KEY_CONTEXT = b"muxtunnel/1 client key"
#: Domain-separation prefix of the method 2 signature input (§7.1).
AUTH2_CONTEXT = b"muxtunnel/1 auth2\x00"
#: Size of a client key, a stored key, a MAC and a proof (SHA-256 output).
KEY_SIZE = 32
#: Size of the credential of methods 1 and 2: ``nonce_c`` then a 32-byte MAC or proof.
CREDENTIAL_SIZE = AUTH_NONCE_SIZE + KEY_SIZE


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------
# Method 1


def mac(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """Method 1: HMAC-SHA256 keyed with the token over the context and both nonces."""
    return _hmac(token.encode("utf-8"), AUTH_CONTEXT + server_nonce + client_nonce)


def hmac_credential(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """Method 1 credential: ``client_nonce || mac`` (64 bytes)."""
    return client_nonce + mac(token, server_nonce, client_nonce)


def check_mac(secrets: Sequence[str | None], server_nonce: bytes, credential: bytes) -> int | None:
    """Method 1: the index of the token in ``secrets`` that produced ``credential``, or None.

    None entries (tokens known only by their stored key) never match. Every token is
    compared in constant time, without early exit.
    """
    if len(credential) != CREDENTIAL_SIZE:
        return None
    client_nonce, received = credential[:AUTH_NONCE_SIZE], credential[AUTH_NONCE_SIZE:]
    found: int | None = None
    for index, secret in enumerate(secrets):
        if secret is None:
            continue
        ok = hmac.compare_digest(mac(secret, server_nonce, client_nonce), received)
        if ok and found is None:
            found = index
    return found


# ---------------------------------------------------------------------------------------
# Method 2


def client_key(token: str) -> bytes:
    """``HMAC-SHA256(key = token UTF-8, msg = "muxtunnel/1 client key")``."""
    return _hmac(token.encode("utf-8"), CLIENT_KEY_CONTEXT)


def stored_key_of(key: bytes) -> bytes:
    """The stored key for a client key: ``SHA-256(client_key)``."""
    return hashlib.sha256(key).digest()


def stored_key(token: str) -> bytes:
    """What the relay stores for ``token``: ``SHA-256(client_key(token))`` (32 bytes)."""
    return stored_key_of(client_key(token))


def _signature(stored: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _hmac(stored, AUTH2_CONTEXT + server_nonce + client_nonce)


def make_proof(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """``client_key XOR HMAC-SHA256(stored_key, AUTH2_CONTEXT || nonce_s || nonce_c)``."""
    key = client_key(token)
    return _xor(key, _signature(stored_key_of(key), server_nonce, client_nonce))


def stored_key_credential(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """Method 2 credential: ``client_nonce || proof`` (64 bytes)."""
    return client_nonce + make_proof(token, server_nonce, client_nonce)


def check_proof(stored_keys: Sequence[bytes], server_nonce: bytes, credential: bytes) -> int | None:
    """Method 2: the index of the stored key whose token produced ``credential``, or None.

    For every stored key (no early exit): recover ``ck = proof XOR signature`` and compare
    ``SHA-256(ck)`` with the stored key in constant time.
    """
    if len(credential) != CREDENTIAL_SIZE:
        return None
    client_nonce, proof = credential[:AUTH_NONCE_SIZE], credential[AUTH_NONCE_SIZE:]
    found: int | None = None
    for index, stored in enumerate(stored_keys):
        candidate = _xor(proof, _signature(stored, server_nonce, client_nonce))
        ok = hmac.compare_digest(stored_key_of(candidate), stored)
        if ok and found is None:
            found = index
    return found
