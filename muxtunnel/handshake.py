"""Challenge-response authentication and tunnel binding over a running MuxConnection.

The token never crosses the wire (CONTRACT §1.1): the relay sends a 32-byte nonce in CHALLENGE;
the client answers AUTH with ``client_nonce || HMAC-SHA256(token, AUTH_CONTEXT + server_nonce
+ client_nonce)``. The relay recomputes the MAC for every configured token and compares each
in constant time, so neither timing nor the number of tokens tells which (if any) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from muxtunnel.connection import MuxConnection, MuxSessionClosedError
from muxtunnel.errors import AuthError, ErrorCode, HandshakeError
from muxtunnel.logsafe import peer_text
from muxtunnel.protocol.constants import AUTH_CONTEXT, AUTH_NONCE_SIZE, AuthMethod, ResultStatus
from muxtunnel.protocol.events import (
    AuthRequested,
    ChallengeReceived,
    ConnectionClosed,
    ResultReceived,
)
from muxtunnel.protocol.frames import Address

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "AUTH_REQ_ID",
    "BindOutcome",
    "authenticate_client",
    "client_handshake",
    "compute_mac",
    "make_credential",
    "match_token",
    "token_id",
]

logger = logging.getLogger(__name__)

#: The client's request id for AUTH; BINDs use 2, 3, ...
AUTH_REQ_ID = 1


def token_id(token: str) -> str:
    """A short, non-secret id for a token (for logs and lease ownership)."""
    return hashlib.sha256(b"muxtunnel token id\x00" + token.encode("utf-8")).hexdigest()[:12]


def compute_mac(token: str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256 of the auth context and both nonces, keyed with the token."""
    msg = AUTH_CONTEXT + server_nonce + client_nonce
    return hmac.new(token.encode("utf-8"), msg, hashlib.sha256).digest()


def make_credential(token: str, server_nonce: bytes) -> bytes:
    """The AUTH credential for method 1: a fresh client nonce followed by the MAC."""
    client_nonce = secrets.token_bytes(AUTH_NONCE_SIZE)
    return client_nonce + compute_mac(token, server_nonce, client_nonce)


def match_token(tokens: Sequence[str], server_nonce: bytes, credential: bytes) -> str | None:
    """Return the configured token that produced ``credential``, or None.

    Every token is checked with ``hmac.compare_digest`` (no early exit).
    """
    if len(credential) != 2 * AUTH_NONCE_SIZE:
        return None
    client_nonce, mac = credential[:AUTH_NONCE_SIZE], credential[AUTH_NONCE_SIZE:]
    found: str | None = None
    for token in tokens:
        if (
            hmac.compare_digest(compute_mac(token, server_nonce, client_nonce), mac)
            and found is None
        ):
            found = token
    return found


async def authenticate_client(conn: MuxConnection, tokens: Sequence[str]) -> str:
    """Relay side: send CHALLENGE, check the client's AUTH, answer RESULT; return the token.

    On failure RESULT(AUTH_FAILED or UNSUPPORTED_METHOD) and CLOSE(AUTH_FAILED) are queued.

    Raises:
        AuthError: Wrong token or unsupported method; the message is the bare reason
            (``wrong token``) for the relay's ``authentication failed from ...`` line.
        HandshakeError: The connection ended before AUTH.
    """
    nonce = secrets.token_bytes(AUTH_NONCE_SIZE)
    session = conn.session
    session.send_challenge(nonce)
    conn.wake_writer()
    while True:
        try:
            event = await conn.next_control_event()
        except MuxSessionClosedError as exc:
            raise HandshakeError(f"connection ended before authentication: {exc}") from None
        if isinstance(event, AuthRequested):
            break
        if isinstance(event, ConnectionClosed):
            raise HandshakeError(
                f"peer closed the connection before authentication ({event.error_code.name})"
            )
    if event.method != AuthMethod.HMAC_SHA256:
        session.send_result(
            event.req_id, ResultStatus.UNSUPPORTED_METHOD, "unsupported auth method"
        )
        conn.close(ErrorCode.AUTH_FAILED, "unsupported auth method")
        raise AuthError(f"unsupported auth method {event.method}")
    token = match_token(tokens, nonce, event.credential)
    if token is None:
        session.send_result(event.req_id, ResultStatus.AUTH_FAILED, "authentication failed")
        conn.close(ErrorCode.AUTH_FAILED, "authentication failed")
        raise AuthError("wrong token")
    session.send_result(event.req_id, ResultStatus.OK, "")
    # The session held the frames pipelined after AUTH (BINDs ...): process them now.
    conn.process_held()
    return token


@dataclass(frozen=True, slots=True)
class BindOutcome:
    """The relay's answer to one BIND."""

    tunnel_id: int
    requested: int
    status: int
    message: str
    bound: Address | None

    @property
    def ok(self) -> bool:
        """True if the tunnel is bound."""
        return self.status == ResultStatus.OK and self.bound is not None

    @property
    def status_name(self) -> str:
        """The status as a name (``OUT_OF_RANGE`` ...)."""
        try:
            return ResultStatus(self.status).name
        except ValueError:
            return str(self.status)


async def client_handshake(
    conn: MuxConnection, token: str, binds: Sequence[tuple[int, int]]
) -> list[BindOutcome]:
    """Client side: answer CHALLENGE with AUTH, pipeline one BIND per ``(tunnel_id, port)``.

    Port 0 lets the relay choose. Returns one outcome per bind, in order.

    Raises:
        AuthError: The relay refused the token.
        HandshakeError: The connection ended or the relay answered nonsense.
    """
    session = conn.session
    while True:
        try:
            event = await conn.next_control_event()
        except MuxSessionClosedError as exc:
            raise HandshakeError(
                f"relay closed the connection during the handshake: {exc}"
            ) from None
        if isinstance(event, ChallengeReceived):
            break
        if isinstance(event, ConnectionClosed):
            raise HandshakeError(
                f"relay closed the connection ({event.error_code.name}: {peer_text(event.message)})"
            )
    session.send_auth(AUTH_REQ_ID, AuthMethod.HMAC_SHA256, make_credential(token, event.nonce))
    requests: dict[int, tuple[int, int]] = {}
    for index, (tunnel_id, port) in enumerate(binds):
        req_id = AUTH_REQ_ID + 1 + index
        requests[req_id] = (tunnel_id, port)
        session.send_bind(
            req_id, tunnel_id, Address(None, 0) if port == 0 else Address("0.0.0.0", port)
        )
    conn.wake_writer()
    outcomes: dict[int, BindOutcome] = {}
    authenticated = False
    while not authenticated or len(outcomes) < len(requests):
        try:
            event = await conn.next_control_event()
        except MuxSessionClosedError as exc:
            if not authenticated:
                raise HandshakeError(
                    f"relay closed the connection during the handshake: {exc}"
                ) from None
            raise
        if isinstance(event, ConnectionClosed):
            if event.error_code == ErrorCode.AUTH_FAILED:
                raise AuthError(
                    f"authentication failed: the relay refused the token ({peer_text(event.message)})"
                )
            raise HandshakeError(
                f"relay closed the connection ({event.error_code.name}: {peer_text(event.message)})"
            )
        if not isinstance(event, ResultReceived):
            continue
        if event.req_id == AUTH_REQ_ID:
            if event.status != ResultStatus.OK:
                raise AuthError(
                    f"authentication failed: the relay refused the token ({peer_text(event.message or event.status)})"
                )
            authenticated = True
        elif event.req_id in requests:
            tunnel_id, port = requests[event.req_id]
            outcomes[event.req_id] = BindOutcome(
                tunnel_id, port, int(event.status), event.message, event.bound
            )
    return [outcomes[req] for req in sorted(outcomes)]
