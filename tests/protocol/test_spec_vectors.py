"""The test vectors of protocol-spec.md Appendix A, checked against the codec.

The vectors are read from the spec itself (the one ```json muxtunnel-vectors block), so the
document and the implementation cannot drift apart. They were produced by a reference encoder
written from the spec, independently of ``muxtunnel.protocol``.

Valid vectors must decode (whole and one byte at a time) into exactly the frame described, and
encode back into exactly the bytes (non-canonical vectors: into the bytes with Reserved and
undefined flag bits cleared). Invalid vectors must raise the ProtocolError subclass whose wire
error code has the vector's name, judged with the default limits and no session state
(protocol-spec.md §4.5 steps 1-6).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from muxtunnel.errors import ErrorCode, ProtocolError
from muxtunnel.protocol.constants import (
    BIND_FLAG_OPTIONS,
    FLAG_ACK,
    FLAG_FIN,
    MAGIC,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    FrameType,
    Role,
)
from muxtunnel.protocol.frames import (
    AckFrame,
    Address,
    AuthFrame,
    BindFrame,
    BindOptions,
    ChallengeFrame,
    CloseFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HelloFrame,
    OpenAckFrame,
    OpenFailFrame,
    OpenFrame,
    PingFrame,
    ResetFrame,
    ResultFrame,
    ResumedFrame,
    ResumeFrame,
    Settings,
    TicketFrame,
    UnbindFrame,
    WindowFrame,
    decode_payload,
    encode_frame,
)
from muxtunnel.protocol.reader import FrameReader
from muxtunnel.protocol.session import Session

if TYPE_CHECKING:
    from types import ModuleType

SPEC = Path(__file__).resolve().parents[2] / "protocol-spec.md"
FENCE = "```json muxtunnel-vectors"

#: Default receive limits the invalid vectors are judged with (spec Appendix A.1 item 2).
MAX_FRAME_PAYLOAD = 65_536
MAX_CONTROL_PAYLOAD = 4_096

FRAME_CLASSES: dict[str, type[Any]] = {
    "DATA": DataFrame,
    "WINDOW": WindowFrame,
    "OPEN": OpenFrame,
    "OPEN_ACK": OpenAckFrame,
    "OPEN_FAIL": OpenFailFrame,
    "RESET": ResetFrame,
    "HELLO": HelloFrame,
    "PING": PingFrame,
    "GOAWAY": GoAwayFrame,
    "CLOSE": CloseFrame,
    "AUTH": AuthFrame,
    "BIND": BindFrame,
    "UNBIND": UnbindFrame,
    "RESULT": ResultFrame,
    "CHALLENGE": ChallengeFrame,
    "ACK": AckFrame,
    "TICKET": TicketFrame,
    "RESUME": ResumeFrame,
    "RESUMED": ResumedFrame,
    "EXTENSION": ExtensionFrame,
}
#: Flag bits each defined type knows; the rest must be ignored on receipt and sent as 0.
DEFINED_FLAGS: dict[int, int] = {FrameType.DATA: FLAG_FIN, FrameType.PING: FLAG_ACK}
BYTES_FIELDS = frozenset({"data", "credential", "nonce", "payload", "ticket"})
ADDRESS_FIELDS = frozenset({"origin", "target", "bind", "bound"})


def _spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def _load_vectors() -> list[dict[str, Any]]:
    text = _spec_text()
    assert text.count(FENCE) == 1, "the spec must hold exactly one vectors block"
    start = text.index(FENCE) + len(FENCE)
    end = text.index("\n```", start)
    vectors = json.loads(text[start:end])
    assert isinstance(vectors, list)
    return vectors


VECTORS = _load_vectors()
VALID = [v for v in VECTORS if v["kind"] == "valid"]
INVALID = [v for v in VECTORS if v["kind"] == "invalid"]


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [str(v["name"]) for v in vectors]


def _address(value: dict[str, Any] | None) -> Address | None:
    if value is None:
        return None
    return Address(value["host"], value["port"])


def _options(value: dict[str, Any] | None) -> BindOptions | None:
    """A BIND's ``options``: null (no OPTIONS flag) or an object with every BindOptions field."""
    if value is None:
        return None
    names = {f.name for f in dataclasses.fields(BindOptions)}
    assert set(value) == names, f"options fields {sorted(value)} != {sorted(names)}"
    return BindOptions(
        allow=tuple(ipaddress.ip_network(n) for n in value["allow"]),
        deny=tuple(ipaddress.ip_network(n) for n in value["deny"]),
        name=value["name"],
        visit=value["visit"],
        unknown=tuple(value["unknown"]),
    )


def _field(name: str, value: Any) -> Any:
    if name == "options":
        return _options(value)
    if name in BYTES_FIELDS:
        return bytes.fromhex(value)
    if name in ADDRESS_FIELDS:
        return _address(value)
    if name == "settings":
        return tuple((int(sid), int(val)) for sid, val in value)
    return value


def _expected_frame(description: dict[str, Any]) -> Frame:
    """Build the frame a valid vector describes; its keys must be the dataclass fields exactly.

    Two keys are renamed on the way (spec A.1): EXTENSION ``header_flags`` is the header's
    Flags byte (``ExtensionFrame.flags``), and BIND ``flags`` is the payload byte with the
    OPTIONS bit, which ``BindFrame`` keeps apart as ``options is not None``.
    """
    cls = FRAME_CLASSES[description["type"]]
    kwargs = {k: _field(k, v) for k, v in description.items() if k != "type"}
    if cls is ExtensionFrame:
        assert "flags" not in kwargs, "EXTENSION: the header's Flags byte is `header_flags`"
        kwargs["flags"] = kwargs.pop("header_flags")
    if cls is BindFrame:
        options_bit = bool(kwargs["flags"] & BIND_FLAG_OPTIONS)
        assert options_bit == (kwargs["options"] is not None), "OPTIONS bit vs options"
        kwargs["flags"] &= ~BIND_FLAG_OPTIONS
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(kwargs) == names, f"vector fields {sorted(kwargs)} != {cls.__name__} {sorted(names)}"
    frame: Frame = cls(**kwargs)
    return frame


def _whole(data: bytes) -> Iterator[bytes]:
    yield data


def _bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


Feeder = Callable[[bytes], Iterator[bytes]]
FEEDERS = [pytest.param(_whole, id="whole"), pytest.param(_bytewise, id="bytewise")]


def _decode(data: bytes, feeder: Feeder) -> tuple[list[Frame], FrameReader]:
    """Decode as spec §4.5 steps 1-6: reader, payload decoder, HELLO settings (major 1 only)."""
    reader = FrameReader(
        max_data_payload=MAX_FRAME_PAYLOAD,
        max_control_payload=MAX_CONTROL_PAYLOAD,
        expect_magic=False,
    )
    frames: list[Frame] = []
    for piece in feeder(data):
        for frame_type, flags, stream_id, payload in reader.feed(piece):
            frame = decode_payload(frame_type, flags, stream_id, payload)
            if isinstance(frame, HelloFrame) and frame.major == PROTOCOL_MAJOR:
                Settings.from_pairs(frame.settings)
            frames.append(frame)
    return frames, reader


def _canonical(data: bytes) -> bytes:
    """``data`` with Reserved cleared and flag bits the type does not define cleared."""
    frame_type = data[4]
    flags = data[5]
    if frame_type < 0x80:
        flags &= DEFINED_FLAGS.get(frame_type, 0)
    return data[:5] + bytes((flags,)) + b"\x00\x00" + data[8:]


# ---------------------------------------------------------------------------------------
# The vector set itself


def test_vector_set_is_complete() -> None:
    assert len(VECTORS) >= 24
    names = _ids(VECTORS)
    assert len(names) == len(set(names)), "vector names must be unique"
    valid_types = {v["frame"]["type"] for v in VALID}
    missing = {t.name for t in FrameType} - valid_types
    assert not missing, f"frame types without a valid vector: {sorted(missing)}"
    assert "EXTENSION" in valid_types
    assert any(v.get("canonical") is False for v in VALID)
    assert INVALID


@pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))
def test_vector_is_well_formed(vector: dict[str, Any]) -> None:
    assert re.fullmatch(r"(?:[0-9a-f]{2})+", vector["hex"]), "hex: lowercase pairs, no spaces"
    assert vector["kind"] in {"valid", "invalid"}
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", _spec_text(), re.MULTILINE))
    assert vector["section"] in headings, f"no section {vector['section']} in the spec"
    if vector["kind"] == "valid":
        assert "error" not in vector
        assert vector["frame"]["type"] in FRAME_CLASSES
    else:
        assert "frame" not in vector
        assert vector["error"] in {code.name for code in ErrorCode}


def _generator() -> ModuleType:
    """scripts/spec_vectors.py, which writes Appendix A.2 from the JSON block of A.3."""
    path = SPEC.parent / "scripts" / "spec_vectors.py"
    spec = importlib.util.spec_from_file_location("spec_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_annotated_vectors_are_generated_from_the_json() -> None:
    """Appendix A.2 (for humans) is exactly what the generator renders from A.3 (for machines)."""
    generator = _generator()
    text = _spec_text()
    assert generator.splice(text) == text, (
        f"protocol-spec.md Appendix A.2 is out of date; run: {generator.FIX_COMMAND}"
    )
    assert generator.main(["--check"]) == 0


def test_annotated_rendering_shows_every_byte() -> None:
    """Each A.2 block shows the vector's bytes in order, whatever its annotations say."""
    text = _spec_text()
    rendered: dict[str, str] = {}
    pattern = re.compile(
        r"^A\.2\.\d+\. `([^`]+)`.*?\n```text\n(.*?)\n```", re.MULTILINE | re.DOTALL
    )
    for name, block in pattern.findall(text):
        hex_parts = []
        for line in block.splitlines():
            m = re.match(r"^  ([0-9a-f]{2}(?: [0-9a-f]{2})*)(?: {2,}|$)", line)
            if m:
                hex_parts.append(m.group(1).replace(" ", ""))
        rendered[name] = "".join(hex_parts)
    assert rendered == {v["name"]: v["hex"] for v in VECTORS}


def test_generator_check_fails_on_a_stale_appendix(tmp_path: Path) -> None:
    generator = _generator()
    stale = tmp_path / "spec.md"
    stale.write_text(
        _spec_text().replace("header: length 5;", "header: length 6;", 1), encoding="utf-8"
    )
    assert generator.main(["--check", "--spec", str(stale)]) == 1
    assert generator.main(["--spec", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == _spec_text()


# ---------------------------------------------------------------------------------------
# Valid vectors


@pytest.mark.parametrize("feeder", FEEDERS)
@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_valid_vector_decodes(vector: dict[str, Any], feeder: Feeder) -> None:
    data = bytes.fromhex(vector["hex"])
    frames, reader = _decode(data, feeder)
    expected = _expected_frame(vector["frame"])
    assert frames == [expected]
    assert type(frames[0]) is type(expected)
    assert reader.buffered == 0


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_valid_vector_encodes(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    encoded = encode_frame(_expected_frame(vector["frame"]))
    if vector.get("canonical", True):
        assert encoded == data
    else:
        assert encoded != data
        assert encoded == _canonical(data)


# ---------------------------------------------------------------------------------------
# Invalid vectors


@pytest.mark.parametrize("feeder", FEEDERS)
@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_invalid_vector_is_rejected(vector: dict[str, Any], feeder: Feeder) -> None:
    data = bytes.fromhex(vector["hex"])
    with pytest.raises(ProtocolError) as info:
        _decode(data, feeder)
    assert info.value.error_code.name == vector["error"], str(info.value)


HEADER_ONLY = [v for v in INVALID if len(v["hex"]) == 32 and int(v["hex"][:8], 16) > 0]


@pytest.mark.parametrize("vector", HEADER_ONLY, ids=_ids(HEADER_ONLY))
def test_oversize_length_is_rejected_on_the_header(vector: dict[str, Any]) -> None:
    """Header-only vectors fail on the 16th byte, before any payload exists (spec §4.2)."""
    data = bytes.fromhex(vector["hex"])
    reader = FrameReader(
        max_data_payload=MAX_FRAME_PAYLOAD,
        max_control_payload=MAX_CONTROL_PAYLOAD,
        expect_magic=False,
    )
    assert reader.feed(data[:15]) == []
    with pytest.raises(ProtocolError) as info:
        reader.feed(data[15:])
    assert info.value.error_code.name == vector["error"]


def test_header_only_vectors_exist() -> None:
    assert {v["name"] for v in HEADER_ONLY} >= {"oversize-data-header-only"}


# ---------------------------------------------------------------------------------------
# Minor version 1: BIND options, private and visit tunnels (spec §6.12, §7.2, §9.2)


def test_minor_1_vectors_exist() -> None:
    names = {v["name"]: v for v in VECTORS}
    valid = {"bind-options-allow-deny", "bind-private-name", "bind-visit", "bind-unknown-option"}
    valid |= {"result-private-ok", "open-visit"}
    assert valid <= {n for n, v in names.items() if v["kind"] == "valid"}
    invalid = {n for n, v in names.items() if v["kind"] == "invalid" and n.startswith("bind-")}
    assert len(invalid) >= 8
    kinds = {
        kind
        for v in VALID
        if v["frame"]["type"] == "BIND" and v["frame"]["options"]
        for kind, value in v["frame"]["options"].items()
        if value
    }
    assert kinds == {"allow", "deny", "name", "visit", "unknown"}
    assert names["open-visit"]["frame"]["stream_id"] % 2 == 1  # client-opened


@pytest.mark.parametrize(
    ("name", "role"),
    [("hello-client-defaults", Role.CLIENT), ("hello-server-minimal", Role.SERVER)],
)
def test_hello_vectors_are_what_a_session_sends(name: str, role: Role) -> None:
    """A default session's first bytes: MAGIC, then exactly the vector (minor version 2)."""
    vector = next(v for v in VECTORS if v["name"] == name)
    sent = Session(role).data_to_send()
    assert sent[: len(MAGIC)] == MAGIC
    hello = bytes.fromhex(vector["hex"])
    if role == Role.CLIENT:
        assert sent[len(MAGIC) :] == hello
    else:  # the relay's HELLO has every setting; the vector only the one that differs
        (frame,), _ = _decode(sent[len(MAGIC) :], _whole)
        assert isinstance(frame, HelloFrame)
        assert frame.minor == vector["frame"]["minor"] == PROTOCOL_MINOR
        assert dict(frame.settings)[4] == 0


# ---------------------------------------------------------------------------------------
# AUTH credentials (spec §7.1)

AUTH_VECTORS = [v for v in VALID if "auth" in v]


def test_auth_vectors_cover_both_methods() -> None:
    assert sorted(v["frame"]["method"] for v in AUTH_VECTORS) == [1, 2]


@pytest.mark.parametrize("vector", AUTH_VECTORS, ids=_ids(AUTH_VECTORS))
def test_auth_vector_credential(vector: dict[str, Any]) -> None:
    """The credential is what §7.1 computes from the token and both nonces, and it checks."""
    from muxtunnel.protocol import auth

    frame = vector["frame"]
    token = vector["auth"]["token"]
    server_nonce = bytes.fromhex(vector["auth"]["server_nonce"])
    credential = bytes.fromhex(frame["credential"])
    client_nonce = credential[:32]
    if frame["method"] == 1:
        assert auth.hmac_credential(token, server_nonce, client_nonce) == credential
        assert auth.check_mac([None, "other", token], server_nonce, credential) == 2
    else:
        stored = bytes.fromhex(vector["auth"]["stored_key"])
        assert auth.stored_key(token) == stored
        assert auth.stored_key_credential(token, server_nonce, client_nonce) == credential
        assert auth.check_proof([bytes(32), stored], server_nonce, credential) == 1
        assert auth.check_proof([stored], bytes(32), credential) is None
