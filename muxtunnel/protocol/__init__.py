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
    FrameType,
    OpenFailReason,
    ResultStatus,
    Role,
    SettingId,
    TunnelProto,
)
from .frames import Address, Settings, decode_payload, encode_frame
from .reader import FrameReader

__all__ = [
    "ALPN",
    "MAGIC",
    "Address",
    "AuthMethod",
    "ErrorCode",
    "FrameReader",
    "FrameType",
    "OpenFailReason",
    "ResultStatus",
    "Role",
    "SettingId",
    "Settings",
    "TunnelProto",
    "decode_payload",
    "encode_frame",
]
