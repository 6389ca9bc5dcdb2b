"""The one exception hierarchy of muxtunnel.

Every error that muxtunnel raises on purpose derives from :class:`MuxtunnelError`.
As in h11, the sans-IO session tells the two kinds of protocol fault apart: the *peer's*
faults on the wire are :class:`ProtocolError` subclasses (alias :data:`RemoteProtocolError`)
and carry the wire error code (``protocol-spec.md`` §11) that the session sent to the peer in
its CLOSE frame; *our own* misuse of the session (a call the current state does not allow)
is a :class:`LocalProtocolError`, raised before anything is queued, with no wire code.
Each class also names the process exit code the CLI uses when it ends a command.

This module imports nothing from trio, ssl or socket, so the sans-IO core may use it.
"""

from __future__ import annotations

import errno
from enum import IntEnum

__all__ = [
    "AuthError",
    "ConfigError",
    "ErrorCode",
    "ExitCode",
    "FinalSizeError",
    "FlowControlError",
    "FrameSizeError",
    "HandshakeError",
    "IdentityMismatchError",
    "LocalProtocolError",
    "MuxtunnelError",
    "NotARelayError",
    "PrefaceError",
    "ProtocolError",
    "RemoteProtocolError",
    "SessionClosedError",
    "StateFileError",
    "StreamLimitError",
    "StreamResetError",
    "StreamStateError",
    "TunnelError",
    "VersionMismatchError",
    "state_file_error",
]


class ErrorCode(IntEnum):
    """Wire error codes, shared by RESET, GOAWAY, CLOSE and UNBIND (protocol-spec.md §11.1)."""

    #: Graceful close; a RESET when the data is simply not wanted.
    NO_ERROR = 0x0
    #: Generic protocol violation.
    PROTOCOL_ERROR = 0x1
    #: A bug or resource failure in the sender.
    INTERNAL_ERROR = 0x2
    #: A flow-control window was exceeded.
    FLOW_CONTROL_ERROR = 0x3
    #: The concurrent-stream or pending-open limit was exceeded.
    STREAM_LIMIT_ERROR = 0x4
    #: A frame's length is wrong for its type or above the limit.
    FRAME_SIZE_ERROR = 0x5
    #: A frame is not allowed in the stream's state (for example DATA after FIN).
    STREAM_STATE_ERROR = 0x6
    #: A RESET's final offset differs from the bytes received.
    FINAL_SIZE_ERROR = 0x7
    #: The stream was not processed at all; retrying is safe.
    REFUSED_STREAM = 0x8
    #: The local TCP connection was reset or failed (maps to a TCP RST).
    CONNECT_ERROR = 0x9
    #: The stream is no longer wanted.
    CANCEL = 0xA
    #: The peer floods us with frames.
    ENHANCE_YOUR_CALM = 0xB
    #: Authentication failed.
    AUTH_FAILED = 0xC
    #: Idle, handshake or drain timeout.
    TIMEOUT = 0xD
    #: The peer speaks another major protocol version.
    VERSION_MISMATCH = 0xE
    #: The tunnel was unbound or revoked.
    TUNNEL_CLOSED = 0xF

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Map a received code to a member; unknown codes read as INTERNAL_ERROR."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


class ExitCode(IntEnum):
    """Process exit codes of the ``muxtunnel`` command."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    AUTH_REFUSED = 3
    IDENTITY_MISMATCH = 4


class MuxtunnelError(Exception):
    """Root of every error muxtunnel raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class ProtocolError(MuxtunnelError):
    """The peer broke the wire protocol; ``error_code`` is what we told it in CLOSE."""

    error_code: ErrorCode = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, error_code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if error_code is not None:
            self.error_code = error_code


#: The h11 name of :class:`ProtocolError`: a fault of the peer.
RemoteProtocolError = ProtocolError


class LocalProtocolError(MuxtunnelError, ValueError):
    """Our own misuse of the session: the call is not allowed in the current state.

    Nothing was queued and the session is unchanged. (A ``ValueError`` too, since the
    arguments do not fit the session's state; plainly bad arguments raise ``ValueError``.)
    """


class FrameSizeError(ProtocolError):
    """A frame length is wrong for its type or above the negotiated maximum."""

    error_code = ErrorCode.FRAME_SIZE_ERROR


class FlowControlError(ProtocolError):
    """The peer sent beyond a window, or advertised an absurd one."""

    error_code = ErrorCode.FLOW_CONTROL_ERROR


class StreamLimitError(ProtocolError):
    """The peer opened more streams (or pending opens) than we allow."""

    error_code = ErrorCode.STREAM_LIMIT_ERROR


class StreamStateError(ProtocolError):
    """A frame arrived that the stream's state does not allow."""

    error_code = ErrorCode.STREAM_STATE_ERROR


class FinalSizeError(ProtocolError):
    """A RESET's final offset disagrees with the bytes received."""

    error_code = ErrorCode.FINAL_SIZE_ERROR


class VersionMismatchError(ProtocolError):
    """The peer speaks another major version of the protocol."""

    error_code = ErrorCode.VERSION_MISMATCH


class PrefaceError(ProtocolError):
    """The peer's first bytes are not the muxtunnel preface (wrong port or protocol).

    No CLOSE frame is sent for this one: the peer does not speak our framing.
    """


class StreamResetError(MuxtunnelError):
    """Raised by stream I/O after the peer (or we) reset the stream."""

    def __init__(self, message: str, error_code: ErrorCode = ErrorCode.CANCEL) -> None:
        super().__init__(message)
        self.error_code = error_code


class SessionClosedError(MuxtunnelError):
    """The session is gone: CLOSE sent or received, or the transport broke."""

    def __init__(self, message: str, error_code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class HandshakeError(MuxtunnelError):
    """The TLS or muxtunnel handshake with the peer failed."""


class AuthError(HandshakeError):
    """The relay refused our token, or a client presented a wrong one."""

    exit_code = ExitCode.AUTH_REFUSED


class JoinRefusedError(HandshakeError):
    """The relay refused a connection's JOIN to a session (protocol-spec.md §10.7)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        #: The RESULT status of the refusal (0: refused before asking).
        self.status = status


class NotARelayError(HandshakeError):
    """The relay address answers, but not with TLS: a wrong port or another service."""


class IdentityMismatchError(HandshakeError):
    """The relay's certificate does not match the pinned fingerprint or the CA."""

    exit_code = ExitCode.IDENTITY_MISMATCH


class TunnelError(MuxtunnelError):
    """A tunnel could not be bound (port out of range, in use, denied ...)."""


class ConfigError(MuxtunnelError, ValueError):
    """A configuration file, flag or value is invalid; the message names the key."""

    exit_code = ExitCode.USAGE


class StateFileError(ConfigError):
    """A file or directory in the state dir cannot be read or written (exit status 2)."""


def state_file_error(action: str, path: object, exc: BaseException) -> StateFileError:
    """``cannot ACTION PATH: REASON — FIX``: the one message for a state dir it cannot use."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    denied = isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EROFS
    fix = "fix the permissions" if denied else "fix or remove what is there"
    return StateFileError(f"cannot {action} {path}: {reason} — {fix} or pass --state-dir DIR")
