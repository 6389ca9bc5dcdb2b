"""The session stories of protocol-spec.md Appendix A.4, run against ``Session``.

Each story is read from the spec's ```json muxtunnel-stories block: frames from the peer and
actions of the application go in, and the frames the session sends, the connection error it
reports and the events it returns must be exactly those the story lists (with the comparison
rules of A.4 item 4). Only the public API of ``muxtunnel.protocol.Session`` is used:
``receive_data(data, now)``, ``data_to_send()``, the ``send_*`` requests and the stream calls.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from muxtunnel.errors import ErrorCode, MuxtunnelError, ProtocolError
from muxtunnel.protocol import events as ev
from muxtunnel.protocol.constants import MAGIC, FrameType, OpenFailReason, ResultStatus, Role
from muxtunnel.protocol.frames import (
    Address,
    CloseFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    OpenFailFrame,
    ResultFrame,
    Settings,
    WindowFrame,
    decode_payload,
    encode_frame,
)
from muxtunnel.protocol.reader import FrameReader
from muxtunnel.protocol.session import Session, SessionConfig
from tests.protocol.test_spec_vectors import FRAME_CLASSES, _expected_frame

SPEC = Path(__file__).resolve().parents[2] / "protocol-spec.md"
FENCE = "```json muxtunnel-stories"

#: Frame types whose dataclass has a ``message`` that a story may leave out (A.4 item 3).
WITH_MESSAGE = (OpenFailFrame, GoAwayFrame, CloseFrame, ResultFrame)


def _load_stories() -> list[dict[str, Any]]:
    text = SPEC.read_text(encoding="utf-8")
    assert text.count(FENCE) == 1, "the spec must hold exactly one stories block"
    start = text.index(FENCE) + len(FENCE)
    end = text.index("\n```", start)
    stories = json.loads(text[start:end])
    assert isinstance(stories, list)
    return stories


STORIES = _load_stories()
BY_NAME = {story["name"]: story for story in STORIES}


def _steps(story: dict[str, Any]) -> list[dict[str, Any]]:
    """The story's steps, after those of the story it follows (``after``)."""
    before = _steps(BY_NAME[story["after"]]) if "after" in story else []
    return before + list(story["steps"])


def _bytes(value: str | dict[str, Any]) -> bytes:
    """A hex string, or ``{"fill": byte, "length": n}`` (A.4 item 3)."""
    if isinstance(value, dict):
        return bytes.fromhex(str(value["fill"])) * int(value["length"])
    return bytes.fromhex(value)


def _address(value: dict[str, Any] | None) -> Address | None:
    return None if value is None else Address(value["host"], value["port"])


def _frame(description: dict[str, Any], message: str = "") -> Frame:
    """The frame a story describes (A.3 notation); a left-out ``message`` becomes ``message``."""
    fields = dict(description)
    if "data" in fields:
        fields["data"] = _bytes(fields["data"]).hex()
    cls = FRAME_CLASSES[fields["type"]]
    if cls in WITH_MESSAGE:
        fields.setdefault("message", message)
    if cls is ResultFrame:
        fields.setdefault("bound", None)
    return _expected_frame(fields)


def _wire(description: dict[str, Any]) -> bytes:
    if description["type"] == "MAGIC":
        return MAGIC
    return encode_frame(_frame(description))


def _joined(frames: list[Frame | str]) -> list[Frame | str]:
    """Connection WINDOWs dropped, consecutive DATA frames of one stream joined (A.4 item 4)."""
    out: list[Frame | str] = []
    for frame in frames:
        if isinstance(frame, WindowFrame) and frame.stream_id == 0:
            continue
        last = out[-1] if out else None
        if (
            isinstance(frame, DataFrame)
            and isinstance(last, DataFrame)
            and last.stream_id == frame.stream_id
            and not last.fin
        ):
            out[-1] = DataFrame(
                stream_id=frame.stream_id, data=bytes(last.data) + bytes(frame.data), fin=frame.fin
            )
        elif isinstance(frame, DataFrame):
            out.append(dataclasses.replace(frame, data=bytes(frame.data)))
        else:
            out.append(frame)
    return out


def _event(event: ev.Event) -> dict[str, Any]:
    """An event in the notation of A.4 item 6."""
    fields: dict[str, Any]
    match event:
        case ev.HelloReceived():
            return {"event": "hello", "minor": event.minor}
        case ev.ChallengeReceived():
            return {"event": "challenge", "nonce": event.nonce.hex()}
        case ev.AuthRequested():
            fields = {"req_id": event.req_id, "method": event.method}
            return {"event": "auth", **fields, "credential": event.credential.hex()}
        case ev.BindRequested():
            assert event.options.allow == event.options.deny == ()
            assert not event.options.private
            bind = {"host": event.bind.host, "port": event.bind.port}
            fields = {
                "req_id": event.req_id,
                "tunnel_id": event.tunnel_id,
                "proto": event.proto,
            }
            return {"event": "bind", **fields, "bind": bind}
        case ev.ResultReceived():
            status = event.status.name if isinstance(event.status, ResultStatus) else event.status
            bound = None if event.bound is None else dataclasses.asdict(event.bound)
            fields = {
                "req_id": event.req_id,
                "status": status,
                "message": event.message,
            }
            return {"event": "result", **fields, "bound": bound}
        case ev.StreamOpened():
            fields = {"stream_id": event.stream_id, "tunnel_id": event.tunnel_id}
            origin, target = dataclasses.asdict(event.origin), dataclasses.asdict(event.target)
            return {"event": "opened", **fields, "origin": origin, "target": target}
        case ev.StreamAccepted():
            return {"event": "accepted", "stream_id": event.stream_id}
        case ev.DataReceived():
            return {"event": "data", "stream_id": event.stream_id, "data": bytes(event.data).hex()}
        case ev.StreamEnded():
            return {"event": "end", "stream_id": event.stream_id}
        case ev.StreamReset():
            fields = {
                "stream_id": event.stream_id,
                "error_code": event.error_code.name,
            }
            return {"event": "reset", **fields, "remote": event.remote}
        case ev.UnbindReceived():
            fields = {"req_id": event.req_id, "tunnel_id": event.tunnel_id}
            return {"event": "unbind", **fields, "error_code": event.error_code.name}
        case ev.PongReceived():
            return {"event": "pong", "seq": event.seq}
        case ev.WindowUpdated():
            return {"event": "window", "stream_id": event.stream_id}
        case ev.GoAwayReceived():
            fields = {
                "last_stream_id": event.last_stream_id,
                "error_code": event.error_code.name,
            }
            return {"event": "goaway", **fields, "message": event.message}
        case ev.TicketReceived():
            return {"event": "ticket", "ticket": event.ticket.hex(), "lifetime": event.lifetime}
        case ev.ResumeRequested():
            fields = {"req_id": event.req_id, "ticket": event.ticket.hex()}
            return {"event": "resume", **fields, "received": event.received}
        case ev.JoinRequested():
            return {"event": "join", "req_id": event.req_id, "ticket": event.ticket.hex()}
        case ev.SessionResumed():
            return {"event": "resumed", "peer_received": event.peer_received}
        case ev.ResumeRefused():
            status = event.status.name if isinstance(event.status, ResultStatus) else event.status
            fields = {"req_id": event.req_id, "status": status}
            return {"event": "resume_refused", **fields, "message": event.message}
        case _:  # pragma: no cover - an event no story expects
            raise AssertionError(f"unexpected event {event!r}")


def _joined_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for event in events:
        last = out[-1] if out else None
        if (
            event["event"] == "data"
            and last is not None
            and last["event"] == "data"
            and last["stream_id"] == event["stream_id"]
        ):
            last["data"] += event["data"]
        else:
            out.append(dict(event))
    return out


class Runner:
    """One endpoint under test, driven step by step."""

    def __init__(self, role: str, settings: dict[str, int] | None = None) -> None:
        server = role == "relay"
        config = None
        if settings:  # a story's settings differ from the role's defaults (A.4 item 1)
            base = {"max_concurrent_streams": 0} if server else {}
            config = SessionConfig(settings=Settings(**{**base, **settings}))
        self.session = Session(Role.SERVER if server else Role.CLIENT, config)
        self.reader = FrameReader(
            max_data_payload=16_777_215, max_control_payload=65_535, expect_magic=False
        )
        self.started = False
        self.now = 0.0

    def sent(self) -> list[Frame | str]:
        """Everything the session sends now, decoded (``"MAGIC"`` for the preface)."""
        data = self.session.data_to_send()
        frames: list[Frame | str] = []
        if not self.started:
            assert data.startswith(MAGIC), "the endpoint's first bytes must be MAGIC (§3.1)"
            data = data[len(MAGIC) :]
            frames.append("MAGIC")
            self.started = True
        for frame_type, flags, sid, payload in self.reader.feed(data):
            frames.append(decode_payload(frame_type, flags, sid, bytes(payload)))
        assert self.reader.buffered == 0, "the endpoint sent part of a frame"
        return frames

    def act(self, action: dict[str, Any]) -> list[ev.Event]:
        s, now, name = self.session, self.now, action["action"]
        sid = action.get("stream_id", 0)
        if name == "challenge":
            s.send_challenge(bytes.fromhex(action["nonce"]))
        elif name == "auth":
            s.send_auth(action["req_id"], action["method"], bytes.fromhex(action["credential"]))
        elif name == "bind":
            bind = _address(action["bind"])
            assert bind is not None
            s.send_bind(action["req_id"], action["tunnel_id"], bind)
        elif name == "result":
            status = ResultStatus[action["status"]]
            s.send_result(action["req_id"], status, action["message"], _address(action["bound"]))
            return s.receive_data(b"", now)  # frames held behind the AUTH (§7.6)
        elif name == "open":
            origin, target = _address(action["origin"]), _address(action["target"])
            assert origin is not None
            assert target is not None
            if action.get("refused"):
                with pytest.raises((MuxtunnelError, ValueError)):
                    s.open_stream(action["tunnel_id"], origin, target)
            else:
                assert s.open_stream(action["tunnel_id"], origin, target) == sid
        elif name == "accept":
            s.accept_stream(sid)
        elif name == "reject":
            s.reject_stream(sid, OpenFailReason[action["reason"]], action.get("message", ""))
        elif name == "send":
            s.send_data(sid, _bytes(action["data"]), end_stream=action["fin"])
        elif name == "end":
            s.end_stream(sid)
        elif name == "consume":
            s.acknowledge(sid, action["length"], now)
        elif name == "reset":
            s.reset_stream(sid, ErrorCode[action["error_code"]])
        elif name == "ping":
            assert s.ping(now) == action["seq"]
        elif name == "ticket":
            s.send_ticket(bytes.fromhex(action["ticket"]), action["lifetime"])
        elif name == "suspend":
            s.suspend()
        elif name == "resume":
            s.resume(action["req_id"], action["received"])
        elif name == "begin_resume":
            s.begin_resume()
            self.started = False  # the new connection starts with MAGIC again
        elif name == "resume_request":
            s.send_resume(action["req_id"], bytes.fromhex(action["ticket"]))
        else:  # pragma: no cover - a story with an action this runner does not know
            raise AssertionError(f"unknown action {name!r}")
        return []

    def step(self, index: int, step: dict[str, Any]) -> None:
        self.now = step.get("at", self.now)
        where = f"step {index}"
        if "context" in step:
            where += f" ({step['context']})"
        events: list[ev.Event] = []
        error: ProtocolError | None = None
        if "in" in step:
            data = b"".join(_wire(frame) for frame in step["in"])
            try:
                events = self.session.receive_data(data, self.now)
            except ProtocolError as exc:
                error = exc
        for action in step.get("do", []):
            events += self.act(action)
        if "error" in step:
            assert error is not None, f"{where}: expected connection error {step['error']}"
            assert error.error_code.name == step["error"], f"{where}: {error}"
        else:
            assert error is None, f"{where}: unexpected connection error: {error}"
        if "events" in step:
            expected_events = []
            for want in step["events"]:
                want = dict(want)
                if "data" in want:
                    want["data"] = _bytes(want["data"]).hex()
                expected_events.append(want)
            got = _joined_events([_event(e) for e in events])
            for want, have in zip(expected_events, got, strict=False):
                if "message" not in want:
                    have.pop("message", None)
            assert got == expected_events, f"{where}: events"
        actual = _joined(self.sent())
        expected: list[Frame | str] = []
        for i, description in enumerate(step["out"]):
            if description["type"] == "MAGIC":
                expected.append("MAGIC")
                continue
            sent = actual[i] if i < len(actual) else None
            message = sent.message if isinstance(sent, WITH_MESSAGE) else ""
            expected.append(_frame(description, message))
        assert actual == _joined(expected), f"{where}: frames sent"


def _ids() -> list[str]:
    return [story["name"] for story in STORIES]


def _settings(story: dict[str, Any]) -> dict[str, int] | None:
    """The story's ``settings`` (A.4 item 1), or those of the story it follows."""
    if "settings" in story:
        return dict(story["settings"])
    return _settings(BY_NAME[story["after"]]) if "after" in story else None


@pytest.mark.parametrize("story", STORIES, ids=_ids())
def test_story(story: dict[str, Any]) -> None:
    runner = Runner(story["role"], _settings(story))
    for index, step in enumerate(_steps(story), 1):
        runner.step(index, step)


def test_stories_are_well_formed() -> None:
    headings = set(
        re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", SPEC.read_text(encoding="utf-8"), re.M)
    )
    assert len(BY_NAME) == len(STORIES), "story names must be unique"
    for story in STORIES:
        assert story["role"] in {"client", "relay"}
        assert set(story["sections"]) <= headings, story["name"]
        assert story.get("after", story["name"]) in BY_NAME
        for step in story["steps"]:
            assert "out" in step, f"{story['name']}: every step lists what is sent"
            assert not ("in" in step and "do" in step), "one stimulus per step"
            assert "error" not in step or "in" in step


def test_stories_cover_the_session() -> None:
    """Handshake, open/accept/data/FIN, windows, reset and GOAWAY, on both roles (A.4)."""
    sent = {frame["type"] for story in STORIES for step in story["steps"] for frame in step["out"]}
    received = {
        frame["type"]
        for story in STORIES
        for step in story["steps"]
        for frame in step.get("in", [])
    }
    errors = {step["error"] for story in STORIES for step in story["steps"] if "error" in step}
    assert {"HELLO", "CHALLENGE", "AUTH", "BIND", "RESULT", "OPEN", "OPEN_ACK"} <= sent
    assert {"OPEN_FAIL", "DATA", "WINDOW", "RESET", "CLOSE", "PING"} <= sent
    assert {"HELLO", "AUTH", "BIND", "RESULT", "OPEN", "OPEN_ACK", "DATA"} <= received
    assert {"WINDOW", "RESET", "GOAWAY", "PING", "CHALLENGE"} <= received
    assert {"FLOW_CONTROL_ERROR", "FINAL_SIZE_ERROR", "PROTOCOL_ERROR"} <= errors
    assert {story["role"] for story in STORIES} == {"client", "relay"}
    assert {t.name for t in FrameType} <= sent | received


def test_a_wrong_story_fails() -> None:
    """The runner is not vacuous: a story that expects the wrong answer fails."""
    story = BY_NAME["relay-handshake"]
    steps = _steps(story)
    wrong = [*steps[:-1], {**steps[-1], "out": [{"type": "PING", "seq": 2, "ack": True}]}]
    runner = Runner(story["role"])
    for index, step in enumerate(wrong[:-1], 1):
        runner.step(index, step)
    with pytest.raises(AssertionError, match="frames sent"):
        runner.step(len(wrong), wrong[-1])
