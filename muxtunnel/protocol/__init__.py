"""The sans-IO core of muxtunnel: frame codec, stream state, flow control, scheduling.

Pure, synchronous code: bytes and events in, bytes and events out. Nothing here does I/O
or reads a clock; the trio adapter (``muxtunnel.connection``) passes timestamps in.
"""

from __future__ import annotations

from muxtunnel.errors import ErrorCode

from .constants import (
    ALPN,
    MAGIC,
    AuthMethod,
    BindOptionKind,
    FrameType,
    OpenFailReason,
    ResultStatus,
    Role,
    SettingId,
    TunnelProto,
)
from .events import (
    AuthRequested,
    BindRequested,
    ChallengeReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    JoinRequested,
    PongReceived,
    ResultReceived,
    ResumeRefused,
    ResumeRequested,
    SessionResumed,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
    TicketReceived,
    UnbindReceived,
    WindowUpdated,
)
from .frames import Address, BindOptions, Settings, decode_payload, encode_frame
from .reader import FrameReader
from .replay import ReplayLog, ResumeOffsetError
from .session import Session, SessionConfig

__all__ = [
    "ALPN",
    "MAGIC",
    "Address",
    "AuthMethod",
    "AuthRequested",
    "BindOptionKind",
    "BindOptions",
    "BindRequested",
    "ChallengeReceived",
    "ConnectionClosed",
    "DataReceived",
    "ErrorCode",
    "Event",
    "FrameReader",
    "FrameType",
    "GoAwayReceived",
    "HelloReceived",
    "JoinRequested",
    "OpenFailReason",
    "PongReceived",
    "ReplayLog",
    "ResultReceived",
    "ResultStatus",
    "ResumeOffsetError",
    "ResumeRefused",
    "ResumeRequested",
    "Role",
    "Session",
    "SessionConfig",
    "SessionResumed",
    "SettingId",
    "Settings",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamRejected",
    "StreamReset",
    "TicketReceived",
    "TunnelProto",
    "UnbindReceived",
    "WindowUpdated",
    "decode_payload",
    "encode_frame",
]
