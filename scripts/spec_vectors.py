"""Write protocol-spec.md Appendix A.2 (annotated vectors) from its A.3 JSON block.

A.3 (the ```json muxtunnel-vectors block) is the one source of the test vectors. A.2 shows
the same bytes to a human reader, field by field: this script renders it between the markers
``<!-- vectors:begin -->`` and ``<!-- vectors:end -->``. It decodes each vector with its own
small, tolerant field walker written from the spec (standard library only, independent of
``muxtunnel.protocol``), so a malformed vector is shown up to the field where it breaks.

Usage (from a checkout)::

    python scripts/spec_vectors.py           # rewrite A.2 in protocol-spec.md
    python scripts/spec_vectors.py --check   # exit 1 if A.2 is out of date

``tests/protocol/test_spec_vectors.py`` runs the check, so A.2 cannot go stale.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

SPEC = Path(__file__).resolve().parent.parent / "protocol-spec.md"
FENCE = "```json muxtunnel-vectors"
BEGIN = "<!-- vectors:begin -->"
END = "<!-- vectors:end -->"
FIX_COMMAND = "python scripts/spec_vectors.py"

#: Frame type names (§6).
TYPES = {
    0x00: "DATA",
    0x01: "WINDOW",
    0x02: "OPEN",
    0x03: "OPEN_ACK",
    0x04: "OPEN_FAIL",
    0x05: "RESET",
    0x06: "ACK",
    0x08: "HELLO",
    0x09: "PING",
    0x0A: "GOAWAY",
    0x0B: "CLOSE",
    0x10: "AUTH",
    0x11: "BIND",
    0x12: "UNBIND",
    0x13: "RESULT",
    0x14: "CHALLENGE",
    0x15: "TICKET",
    0x16: "RESUME",
    0x17: "RESUMED",
}
#: Payload size of the fixed-size types (§6).
FIXED = {
    0x01: 8,
    0x03: 0,
    0x05: 12,
    0x06: 8,
    0x09: 8,
    0x12: 12,
    0x14: 32,
    0x15: 36,
    0x16: 44,
    0x17: 12,
}
#: Error codes (§11.1).
ERRORS = [
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "STREAM_LIMIT_ERROR",
    "FRAME_SIZE_ERROR",
    "STREAM_STATE_ERROR",
    "FINAL_SIZE_ERROR",
    "REFUSED_STREAM",
    "CONNECT_ERROR",
    "CANCEL",
    "ENHANCE_YOUR_CALM",
    "AUTH_FAILED",
    "TIMEOUT",
    "VERSION_MISMATCH",
    "TUNNEL_CLOSED",
]
#: OPEN_FAIL reasons (§11.2).
REASONS = {
    1: "ADMINISTRATIVELY_PROHIBITED",
    2: "CONNECT_FAILED",
    3: "UNKNOWN_TUNNEL",
    4: "RESOURCE_SHORTAGE",
    5: "CONNECT_TIMEOUT",
    6: "UNREACHABLE",
    7: "NAME_RESOLUTION_FAILED",
    8: "REFUSED",
}
#: RESULT statuses (§11.3).
STATUSES = [
    "OK",
    "MALFORMED",
    "AUTH_REQUIRED",
    "AUTH_FAILED",
    "UNSUPPORTED_METHOD",
    "DENIED",
    "ADDRESS_IN_USE",
    "UNSUPPORTED_PROTO",
    "LIMIT_REACHED",
    "DUPLICATE_TUNNEL",
    "UNKNOWN_TUNNEL",
    "INTERNAL",
    "OUT_OF_RANGE",
    "TICKET_UNKNOWN",
    "RESUME_FAILED",
]
#: Settings (§5.3).
SETTINGS = {
    1: "INITIAL_STREAM_WINDOW",
    2: "INITIAL_CONN_WINDOW",
    3: "MAX_FRAME_PAYLOAD",
    4: "MAX_CONCURRENT_STREAMS",
    5: "MAX_PENDING_OPENS",
    6: "IDLE_TIMEOUT_MS",
    7: "MAX_CONTROL_PAYLOAD",
    8: "RESUME_WINDOW",
    9: "MAX_CONNECTIONS",
}
AUTH_METHODS = {1: "HMAC-SHA256", 2: "HMAC-SHA256-STORED-KEY"}
OPTION_KINDS = {1: "ALLOW", 2: "DENY", 3: "NAME", 4: "VISIT"}
ROLES = {1: "client", 2: "relay"}
ATYPS = {0: "none, no port", 1: "IPv4", 3: "domain", 4: "IPv6"}

#: Width of the prose lines.
_WIDTH = 100
#: Column where the annotations start (2 spaces, 16 hex pairs, 2 spaces).
_HEX_WIDTH = 2 + 16 * 3 - 1


class _Stop(Exception):
    """The payload ends (or cannot be decoded) before the next field: stop annotating."""


def _quote(raw: bytes) -> str:
    """Text in single quotes, UTF-8 decoded with U+FFFD, control characters escaped."""
    text = raw.decode("utf-8", errors="replace")
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch in "'\\":
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def _count(n: int) -> str:
    return f"{n} byte" if n == 1 else f"{n} bytes"


def _printable(raw: bytes) -> bool:
    return all(0x20 <= b < 0x7F or b in (0x0A, 0x0D, 0x09) for b in raw)


def _name(table: list[str] | dict[int, str], value: int) -> str:
    if isinstance(table, list):
        return table[value] if value < len(table) else "(unknown)"
    return table.get(value, "(unknown)")


class _Walker:
    """Reads a payload field by field and records ``(bytes, annotation)`` rows."""

    def __init__(self, payload: bytes) -> None:
        self.data = payload
        self.pos = 0
        self.rows: list[tuple[bytes, str]] = []

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def note(self, text: str) -> None:
        """An annotation without bytes."""
        self.rows.append((b"", text))

    def take(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes; if fewer are left, show them and stop."""
        if self.remaining < n:
            rest = self.data[self.pos :]
            self.pos = len(self.data)
            if rest:
                self.rows.append((rest, f"{what}: {len(rest)} of {n} bytes (the payload ends)"))
            else:
                self.note(f"(the payload ends before {what})")
            raise _Stop
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw

    def field(self, n: int, what: str, label: str | None = None) -> int:
        raw = self.take(n, what)
        value = int.from_bytes(raw, "big")
        self.rows.append((raw, label if label is not None else f"{what} {value}"))
        return value

    def u8(self, what: str) -> int:
        return self.field(1, what)

    def named(self, n: int, what: str, table: list[str] | dict[int, str]) -> int:
        raw = self.take(n, what)
        value = int.from_bytes(raw, "big")
        self.rows.append((raw, f"{what} {value} {_name(table, value)}"))
        return value

    def raw(self, raw: bytes, label: str) -> None:
        self.rows.append((raw, label))

    def str16(self, what: str) -> None:
        size = self.field(2, f"{what} length")
        if self.remaining < size:
            rest = self.data[self.pos :]
            self.pos = len(self.data)
            self.raw(rest, f"{what}: {len(rest)} of {size} bytes (the payload ends)")
            raise _Stop
        if size:
            text = self.take(size, what)
            self.raw(text, f"{what} {_quote(text)}")

    def addr(self, what: str) -> str | None:
        """An ADDR (§5.1); returns its host text (None for atyp 0)."""
        atyp = self.take(1, f"{what} atyp")[0]
        kind = ATYPS.get(atyp, "undefined")
        self.raw(bytes([atyp]), f"{what}: atyp {atyp} ({kind})")
        host: str | None
        if atyp == 0:
            return None
        if atyp == 1:
            host = str(ipaddress.IPv4Address(self.take(4, "IPv4 address")))
            self.raw(self.data[self.pos - 4 : self.pos], host)
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(self.take(16, "IPv6 address")))
            self.raw(self.data[self.pos - 16 : self.pos], host)
        elif atyp == 3:
            size = self.field(1, "domain length")
            name = self.take(size, "domain")
            host = name.decode("ascii", errors="replace")
            if name:
                suffix = "" if name.isascii() else " (not ASCII)"
                self.raw(name, _quote(name) + suffix)
        else:
            rest = self.data[self.pos :]
            self.pos = len(self.data)
            if rest:
                self.raw(rest, f"{len(rest)} bytes that cannot be decoded after atyp {atyp}")
            raise _Stop
        self.field(2, "port")
        return host

    def trailing(self) -> None:
        if self.remaining:
            n = self.remaining
            self.raw(self.data[self.pos :], f"{_count(n)} trailing")
            self.pos = len(self.data)


def _hello(w: _Walker) -> None:
    w.u8("major")
    w.u8("minor")
    role = w.take(1, "role")[0]
    w.raw(bytes([role]), f"role {role} ({ROLES.get(role, 'undefined')})")
    flags = w.take(1, "flags")[0]
    w.raw(bytes([flags]), f"flags 0x{flags:02x}")
    while w.remaining >= 6:
        raw = w.take(2, "setting id")
        sid = int.from_bytes(raw, "big")
        w.raw(raw, f"setting 0x{sid:x} {SETTINGS.get(sid, 'unknown')}")
        value = w.take(4, "setting value")
        w.raw(value, f"= {int.from_bytes(value, 'big')}")
    if w.remaining:
        n = w.remaining
        w.raw(w.data[w.pos :], f"{_count(n)} left over (not a whole setting)")
        w.pos = len(w.data)


def _auth(w: _Walker) -> None:
    w.field(4, "req_id")
    method = w.take(1, "method")[0]
    label = AUTH_METHODS.get(method)
    w.raw(
        bytes([method]), f"method {method} {label}" if label else f"method 0x{method:02x} (unknown)"
    )
    size = w.field(2, "credential length")
    if w.remaining < size:
        rest = w.data[w.pos :]
        w.pos = len(w.data)
        w.raw(rest, f"credential: {len(rest)} of {size} bytes (the payload ends)")
        raise _Stop
    credential = w.take(size, "credential")
    if method in AUTH_METHODS and size == 64:
        w.raw(credential[:32], "client_nonce")
        if method == 1:
            w.raw(
                credential[32:], "mac = HMAC-SHA256(token, context || server_nonce || client_nonce)"
            )
        else:
            w.raw(
                credential[32:],
                "proof = client_key XOR HMAC-SHA256(stored_key, context2 || server_nonce "
                "|| client_nonce)",
            )
    elif credential:
        w.raw(credential, f"credential ({size} bytes)")


def _options(w: _Walker) -> None:
    size = w.field(2, "options length")
    if w.remaining < size:
        w.rows[-1] = (w.rows[-1][0], f"options length {size}: only {w.remaining} bytes follow")
    end = min(len(w.data), w.pos + size)
    while w.pos < end:
        header = w.take(2, "entry header")
        kind, length = header
        name = OPTION_KINDS.get(kind, "unknown")
        w.raw(header, f"entry: kind 0x{kind:02x} {name}, length {length}")
        value = w.take(length, f"the {name} value")
        if kind in (1, 2) and value:
            w.raw(value[:1], f"prefix_len {value[0]}")
            address = value[1:]
            if len(address) == 4:
                w.raw(address, str(ipaddress.IPv4Address(address)))
            elif len(address) == 16:
                w.raw(address, str(ipaddress.IPv6Address(address)))
            elif address:
                w.raw(
                    address,
                    f"{len(address)} address bytes: neither IPv4 (4) nor IPv6 (16)",
                )
        elif kind in (3, 4) and value:
            w.raw(value, _quote(value))
        elif value:
            w.raw(value, f"value ({len(value)} bytes)")


def _bind(w: _Walker) -> None:
    w.field(4, "req_id")
    w.field(4, "tunnel_id")
    proto = w.take(1, "proto")[0]
    w.raw(bytes([proto]), f"proto {proto} TCP" if proto == 1 else f"proto {proto}")
    flags = w.take(1, "flags")[0]
    w.raw(bytes([flags]), f"flags 0x{flags:02x}" + (" OPTIONS" if flags & 1 else ""))
    w.addr("bind")
    if flags & 1:
        _options(w)


def _payload(w: _Walker, frame_type: int, stream_id: int) -> None:
    """Annotate the payload of one frame; raises _Stop where it cannot go on."""
    length = len(w.data)
    if frame_type in FIXED and length != FIXED[frame_type]:
        name = TYPES[frame_type]
        w.raw(w.data, f"{_count(length)}: the {name} payload is exactly {FIXED[frame_type]} bytes")
        w.pos = length
        return
    if frame_type == 0x00:
        label = _quote(w.data) if _printable(w.data) else w.data.hex(" ")
        if length > 16 and not _printable(w.data):
            label = f"({length} bytes)"
        w.raw(w.take(length, "data"), f"data {label}")
    elif frame_type == 0x01:
        offset = int.from_bytes(w.data, "big")
        text = {2**62: "2^62 (largest allowed)", 2**62 + 1: "2^62+1"}.get(offset, str(offset))
        w.field(8, "max_offset", f"max_offset {text}" + ("" if stream_id else " (connection)"))
    elif frame_type == 0x02:
        w.field(4, "tunnel_id")
        w.addr("origin")
        w.addr("target")
    elif frame_type == 0x04:
        w.named(4, "reason", REASONS)
        w.str16("message")
    elif frame_type == 0x05:
        w.named(4, "error_code", ERRORS)
        w.field(8, "final_offset")
    elif frame_type == 0x06:
        w.field(8, "received")
    elif frame_type == 0x08:
        _hello(w)
    elif frame_type == 0x09:
        w.field(8, "seq")
    elif frame_type == 0x0A:
        last = int.from_bytes(w.data[:8], "big")
        w.field(8, "last_stream_id", "last_stream_id 2^64-1" if last == 2**64 - 1 else None)
        w.named(4, "error_code", ERRORS)
        w.str16("message")
    elif frame_type == 0x0B:
        w.named(4, "error_code", ERRORS)
        w.str16("message")
    elif frame_type == 0x10:
        _auth(w)
    elif frame_type == 0x11:
        _bind(w)
    elif frame_type == 0x12:
        req_id = int.from_bytes(w.data[:4], "big")
        w.field(4, "req_id", "req_id 0 (notice)" if req_id == 0 else None)
        w.field(4, "tunnel_id")
        w.named(4, "error_code", ERRORS)
    elif frame_type == 0x13:
        w.field(4, "req_id")
        w.named(2, "status", STATUSES)
        w.str16("message")
        if w.remaining:
            w.addr("bound")
    elif frame_type == 0x14:
        w.raw(w.take(32, "nonce"), "nonce (32 bytes)")
    elif frame_type == 0x15:
        w.raw(w.take(32, "ticket"), "ticket (32 bytes)")
        w.field(4, "lifetime", f"lifetime {int.from_bytes(w.data[32:36], 'big')} s")
    elif frame_type == 0x16:
        w.field(4, "req_id")
        w.raw(w.take(32, "ticket"), "ticket (32 bytes)")
        w.field(8, "received")
    elif frame_type == 0x17:
        w.field(4, "req_id")
        w.field(8, "received")
    elif frame_type >= 0x80:
        text = _quote(w.data) if _printable(w.data) else f"({length} bytes)"
        w.raw(w.take(length, "payload"), f"opaque payload {text}")
    else:
        w.raw(w.take(length, "payload"), f"{length} bytes (payload of an undefined type)")


def annotate(raw: bytes, vector: dict[str, Any]) -> list[tuple[bytes, str]]:
    """The rows of one vector: its header, then its payload field by field."""
    if len(raw) < 16:
        return [(raw, f"{_count(len(raw))} of the 16-byte header")]
    length = int.from_bytes(raw[:4], "big")
    frame_type, flags = raw[4], raw[5]
    reserved = int.from_bytes(raw[6:8], "big")
    stream_id = int.from_bytes(raw[8:16], "big")
    name = "extension" if frame_type >= 0x80 else TYPES.get(frame_type, "(undefined)")
    header = (
        f"header: length {length}; type 0x{frame_type:02x} {name}; flags 0x{flags:02x}; "
        f"reserved 0x{reserved:04x}; stream id {stream_id}"
    )
    rows: list[tuple[bytes, str]] = [(raw[:16], header)]
    payload = raw[16:]
    if not payload:
        if length:
            rows.append((b"", "(header only: the error is due before any payload byte)"))
        else:
            rows.append((b"", "(no payload)"))
        return rows
    walker = _Walker(payload)
    try:
        _payload(walker, frame_type, stream_id)
        walker.trailing()
    except _Stop:
        pass
    rows.extend(walker.rows)
    shown = b"".join(row for row, _ in rows)
    if shown != raw:  # a walker bug
        raise AssertionError(f"{vector['name']}: the rows do not cover the bytes")
    return rows


def _lines(rows: list[tuple[bytes, str]]) -> list[str]:
    out = []
    for raw, label in rows:
        if not raw:
            out.append("  " + label)
            continue
        for offset in range(0, len(raw), 16):
            chunk = raw[offset : offset + 16]
            text = "  " + chunk.hex(" ")
            note = label if offset == 0 else "..."
            out.append(f"{text.ljust(_HEX_WIDTH)}  {note}")
    return out


def _auth_details(vector: dict[str, Any]) -> str:
    """The intermediate values of a method-2 AUTH vector (§7.1)."""
    auth = vector["auth"]
    frame = vector["frame"]
    if frame["method"] != 2:
        return ""
    token = auth["token"].encode()
    nonce_s = bytes.fromhex(auth["server_nonce"])
    nonce_c = bytes.fromhex(frame["credential"])[:32]
    client_key = hmac.new(token, b"muxtunnel/1 client key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    signature = hmac.new(
        stored, b"muxtunnel/1 auth2\x00" + nonce_s + nonce_c, hashlib.sha256
    ).digest()
    return (
        f"Intermediate values: client_key = {client_key.hex()}, stored_key = {stored.hex()}, "
        f"signature = {signature.hex()}."
    )


def render_vector(index: int, vector: dict[str, Any]) -> str:
    """A.2.<index>: the title line, the context, and the annotated bytes."""
    name, section, kind = vector["name"], vector["section"], vector["kind"]
    if kind == "valid":
        what = "valid"
        if vector.get("canonical") is False:
            what += ", non-canonical: re-encodes with Reserved 0 and undefined flags 0"
    else:
        what = f"invalid → {vector['error']}"
    lines = [f"A.2.{index}. `{name}` (§{section}, {what})"]
    notes = []
    if "context" in vector:
        context = vector["context"]
        notes.append(context if context.endswith(".") else context + ".")
    if "auth" in vector:
        details = _auth_details(vector)
        if details:
            notes.append(details)
    if notes:
        lines += textwrap.wrap(
            " ".join(notes), _WIDTH, break_long_words=False, break_on_hyphens=False
        )
    lines += ["", "```text", *_lines(annotate(bytes.fromhex(vector["hex"]), vector)), "```"]
    return "\n".join(lines)


def load_vectors(text: str) -> list[dict[str, Any]]:
    """The vectors of the spec's one ```json muxtunnel-vectors block."""
    if text.count(FENCE) != 1:
        raise ValueError("the spec must hold exactly one vectors block")
    start = text.index(FENCE) + len(FENCE)
    end = text.index("\n```", start)
    vectors = json.loads(text[start:end])
    if not isinstance(vectors, list):
        raise ValueError("the vectors block is not a JSON list")
    return vectors


def render(vectors: list[dict[str, Any]]) -> str:
    """The generated part of A.2, markers included."""
    parts = [
        BEGIN,
        f"<!-- generated by `{FIX_COMMAND}` from the JSON block of A.3: edit that, then run it -->",
    ]
    parts += [render_vector(i, v) for i, v in enumerate(vectors, 1)]
    parts.append(END)
    return "\n\n".join(parts)


def splice(text: str) -> str:
    """``text`` with A.2's generated part replaced by a fresh rendering."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"the spec must hold one {BEGIN} and one {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render(load_vectors(text)) + tail


def main(argv: list[str] | None = None) -> int:
    """Rewrite A.2 (or with ``--check`` only compare); 1 when ``--check`` finds it stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    parser.add_argument("--spec", type=Path, default=SPEC, help="the spec file")
    args = parser.parse_args(argv)
    current = args.spec.read_text(encoding="utf-8")
    fresh = splice(current)
    if args.check:
        if fresh != current:
            print(f"{args.spec}: Appendix A.2 is out of date; run: {FIX_COMMAND}")
            return 1
        return 0
    if fresh != current:
        args.spec.write_text(fresh, encoding="utf-8")
        print(f"{args.spec}: Appendix A.2 rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
