"""Challenge-response authentication and tunnel binding over a running MuxConnection.

The token never crosses the wire (protocol-spec.md §7.1): the relay sends a 32-byte nonce in
CHALLENGE; the client answers AUTH with its own nonce and a MAC over both. With a relay that
speaks minor version 1 the client uses method 2, which the relay checks with the token's stored
key alone; with an older relay, method 1 (an HMAC keyed with the token). The relay checks every
token it accepts in constant time (:mod:`muxtunnel.protocol.auth`), so neither timing nor the
number of tokens tells which (if any) matched.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from muxtunnel.connection import MuxConnection, MuxSessionClosedError
from muxtunnel.errors import AuthError, ErrorCode, HandshakeError, JoinRefusedError
from muxtunnel.logsafe import peer_text
from muxtunnel.protocol import auth
from muxtunnel.protocol.constants import AUTH_NONCE_SIZE, AuthMethod, ResultStatus
from muxtunnel.protocol.events import (
    AuthRequested,
    ChallengeReceived,
    ConnectionClosed,
    ResultReceived,
)
from muxtunnel.protocol.frames import Address
from muxtunnel.tokens import token_id

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from muxtunnel.access import TokenEntry
    from muxtunnel.protocol.events import Event
    from muxtunnel.protocol.frames import BindOptions

__all__ = [
    "AUTH_REQ_ID",
    "BindOutcome",
    "authenticate_client",
    "client_credential",
    "client_handshake",
    "make_credential",
    "match_entry",
    "token_id",
]

logger = logging.getLogger(__name__)

#: The client's request id for AUTH; BINDs use 2, 3, ...
AUTH_REQ_ID = 1
#: Request id of a JOIN (protocol-spec.md §10.7): never one of a BIND's.
JOIN_REQ_ID = 0xFFFF_FFFD


def make_credential(token: str, server_nonce: bytes, method: int = AuthMethod.HMAC_SHA256) -> bytes:
    """The AUTH credential for ``method`` (1 or 2): a fresh client nonce, then the MAC or proof."""
    client_nonce = secrets.token_bytes(AUTH_NONCE_SIZE)
    if method == AuthMethod.HMAC_SHA256_STORED_KEY:
        return auth.stored_key_credential(token, server_nonce, client_nonce)
    return auth.hmac_credential(token, server_nonce, client_nonce)


def client_credential(token: str, server_nonce: bytes, minor: int) -> tuple[int, bytes]:
    """The client's AUTH method and credential for a relay of protocol minor ``minor``: method 2
    from minor 1 on, else method 1 (spec §7.1). Also answers the CHALLENGE of a resume."""
    method = AuthMethod.HMAC_SHA256_STORED_KEY if minor >= 1 else AuthMethod.HMAC_SHA256
    return method, make_credential(token, server_nonce, method)


def match_entry(
    entries: Sequence[TokenEntry], method: int, server_nonce: bytes, credential: bytes
) -> TokenEntry | None:
    """The entry whose token produced ``credential`` with ``method``, or None.

    Method 2 is checked against every entry's stored key, method 1 against the entries that
    hold their token in clear (``secret``).
    """
    if method == AuthMethod.HMAC_SHA256_STORED_KEY:
        index = auth.check_proof([e.stored_key for e in entries], server_nonce, credential)
    else:
        index = auth.check_mac([e.secret for e in entries], server_nonce, credential)
    return None if index is None else entries[index]


_METHODS = frozenset({AuthMethod.HMAC_SHA256, AuthMethod.HMAC_SHA256_STORED_KEY})


async def authenticate_client(
    conn: MuxConnection,
    entries: Sequence[TokenEntry],
    *,
    before_auth: Callable[[Event], None] | None = None,
) -> TokenEntry:
    """Relay side: send CHALLENGE, check the client's AUTH, answer RESULT; return the entry.

    On failure RESULT(AUTH_FAILED or UNSUPPORTED_METHOD) and CLOSE(AUTH_FAILED) are queued.
    ``before_auth`` gets every other control event that arrives before the AUTH (the relay
    watches for a RESUME, protocol-spec.md §10.6).

    Raises:
        AuthError: Wrong token or unsupported method; the message is the bare reason
            (``wrong token``) for the relay's ``authentication failed from ...`` line.
        HandshakeError: The connection ended before AUTH.
    """
    nonce = secrets.token_bytes(AUTH_NONCE_SIZE)
    conn.send_challenge(nonce)
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
        if before_auth is not None:
            before_auth(event)
    if event.method not in _METHODS:
        conn.send_result(event.req_id, ResultStatus.UNSUPPORTED_METHOD, "unsupported auth method")
        conn.close(ErrorCode.AUTH_FAILED, "unsupported auth method")
        raise AuthError(f"unsupported auth method {event.method}")
    entry = match_entry(entries, event.method, nonce, event.credential)
    if entry is None:
        conn.send_result(event.req_id, ResultStatus.AUTH_FAILED, "authentication failed")
        conn.close(ErrorCode.AUTH_FAILED, "authentication failed")
        raise AuthError("wrong token")
    conn.send_result(event.req_id, ResultStatus.OK, "")
    # The session held the frames pipelined after AUTH (BINDs ...): process them now.
    conn.process_held()
    return entry


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


def _auth_failed(relay_says: str) -> str:
    """The client's one line for a refused token, without repeating "authentication failed"."""
    said = peer_text(relay_says)
    extra = "" if said.strip(" .").lower() in ("", "authentication failed") else f" ({said})"
    return (
        f"authentication failed: the relay refused the token{extra}; check --token-file, "
        "MUXTUNNEL_TOKEN or --token"
    )


async def client_handshake(
    conn: MuxConnection,
    token: str,
    binds: Sequence[tuple[int, int, BindOptions | None]],
    *,
    join: bytes | None = None,
) -> list[BindOutcome]:
    """Client side: answer CHALLENGE with AUTH, pipeline one BIND per ``(tunnel_id, port, options)``.

    With ``join`` (a session's ticket) a JOIN goes before the AUTH: this connection becomes
    one more connection of that session (protocol-spec.md §10.7; ``binds`` is then empty).

    Port 0 lets the relay choose; ``options`` None sends a BIND without options. AUTH uses
    method 2 when the relay speaks minor version 1 or later, else method 1 (spec §7.1).
    Returns one outcome per bind, in order.

    Raises:
        AuthError: The relay refused the token.
        JoinRefusedError: The relay refused the JOIN.
        HandshakeError: The connection ended or the relay answered nonsense.
    """
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
    if join is not None:
        if conn.max_connections < 2:
            raise JoinRefusedError("the relay takes one connection per session")
        conn.send_join(JOIN_REQ_ID, join)
    joined = join is None
    conn.send_auth(AUTH_REQ_ID, *client_credential(token, event.nonce, conn.minor))
    requests: dict[int, tuple[int, int]] = {}
    for index, (tunnel_id, port, options) in enumerate(binds):
        req_id = AUTH_REQ_ID + 1 + index
        requests[req_id] = (tunnel_id, port)
        bind = Address(None, 0) if port == 0 else Address("0.0.0.0", port)
        if options is None:
            conn.send_bind(req_id, tunnel_id, bind)
        else:
            conn.send_bind(req_id, tunnel_id, bind, options=options)
    outcomes: dict[int, BindOutcome] = {}
    authenticated = False
    while not authenticated or not joined or len(outcomes) < len(requests):
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
                raise AuthError(_auth_failed(event.message))
            raise HandshakeError(
                f"relay closed the connection ({event.error_code.name}: {peer_text(event.message)})"
            )
        if not isinstance(event, ResultReceived):
            continue  # TICKET (the connection keeps the newest), GOAWAY ...
        if event.req_id == AUTH_REQ_ID:
            if event.status != ResultStatus.OK:
                raise AuthError(
                    _auth_failed(event.message or getattr(event.status, "name", str(event.status)))
                )
            authenticated = True
        elif event.req_id == JOIN_REQ_ID and not joined:
            if event.status != ResultStatus.OK:
                status = getattr(event.status, "name", str(event.status))
                raise JoinRefusedError(
                    f"the relay refused the extra connection ({status}: {peer_text(event.message)})",
                    int(event.status),
                )
            joined = True
        elif event.req_id in requests:
            tunnel_id, port = requests[event.req_id]
            outcomes[event.req_id] = BindOutcome(
                tunnel_id, port, int(event.status), event.message, event.bound
            )
    return [outcomes[req] for req in sorted(outcomes)]
