"""The wire protocol (``PROTOCOL.md``, version 1): every message shape, in and out.

Client messages are parsed into the models below and validated strictly (a string where a
number belongs is an error, not coerced); unknown extra fields are ignored so newer clients
keep working. Server messages are built by the functions in the second half, from the
service's events and the streams' status, and sent with :func:`encode`, which drops
optional fields that are unset. The ``/healthz`` body is here too: it shares the stream
and model objects.

Extensions to version 1 (compatible) are documented in ``docs/protocol-extensions.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streamer.capture import StreamStatus
from streamer.service.asks import AskRequest, WatchRequest
from streamer.service.events import Accepted, Alerted, Answered, Event, Failed, StreamChanged, Token

PROTOCOL_VERSION = 1


class ProtocolError(Exception):
    """A client message was refused; becomes an ``error`` message."""

    def __init__(self, code: str, message: str, id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


class _ClientMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


QuestionId = Annotated[str, Field(min_length=1, max_length=64)]
StreamId = Annotated[str, Field(min_length=1, max_length=64)]
QuestionText = Annotated[str, Field(min_length=1, max_length=2000)]


class Hello(_ClientMessage):
    type: Literal["hello"]
    token: str | None = None
    client: Annotated[str, Field(max_length=200)] | None = None


class Ask(_ClientMessage):
    type: Literal["ask"]
    id: QuestionId
    stream: StreamId
    question: QuestionText
    frames: Annotated[int, Field(ge=2, le=64)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] | None = None
    mode: Literal["video", "image"] | None = None  # extension

    def request(self) -> AskRequest:
        return AskRequest(self.id, self.stream, self.question, self.frames, self.max_new_tokens, self.mode)


class Cancel(_ClientMessage):
    type: Literal["cancel"]
    id: QuestionId


class AlertIf(_ClientMessage):
    contains: Annotated[str, Field(min_length=1, max_length=2000)]


class Watch(_ClientMessage):
    type: Literal["watch"]
    id: QuestionId
    stream: StreamId
    question: QuestionText
    every_s: Annotated[float, Field(ge=1)]
    alert_if: AlertIf | None = None
    frames: Annotated[int, Field(ge=2, le=64)] | None = None  # extension, as in ask
    max_new_tokens: Annotated[int, Field(ge=1, le=1024)] | None = None  # extension
    mode: Literal["video", "image"] | None = None  # extension

    def request(self) -> WatchRequest:
        return WatchRequest(
            self.id,
            self.stream,
            self.question,
            self.frames,
            self.max_new_tokens,
            self.mode,
            every_s=self.every_s,
            alert_contains=self.alert_if.contains if self.alert_if else None,
        )


class Subscribe(_ClientMessage):
    type: Literal["subscribe"]
    stream: StreamId
    preview_fps: Annotated[float, Field(ge=0, le=10)] | None = None
    max_width: Annotated[int, Field(ge=16, le=4096)] | None = None


class Publish(_ClientMessage):
    """Extension: the binary frames that follow are this stream's JPEG frames."""

    type: Literal["publish"]
    stream: StreamId
    fps: Annotated[float, Field(gt=0, le=60)] | None = None


class Unpublish(_ClientMessage):
    """Extension: end this connection's publication (closing the socket does too)."""

    type: Literal["unpublish"]


ClientMessage = Annotated[Hello | Ask | Cancel | Watch | Subscribe | Publish | Unpublish, Field(discriminator="type")]
_client_message = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("hello", "ask", "cancel", "watch", "subscribe", "publish", "unpublish")


def _describe(err: ValidationError, msg_type: str) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = [str(p) for p in e["loc"] if p != msg_type]
        field = ".".join(loc) or "message"
        if e["type"] == "missing":
            parts.append(f"missing field '{field}'")
        else:
            parts.append(f"field '{field}': {e['msg']}")
    return f"invalid {msg_type}: " + "; ".join(parts)


def parse_client_message(raw: str | bytes) -> Hello | Ask | Cancel | Watch | Subscribe | Publish | Unpublish:
    """Parse one text frame; raises :class:`ProtocolError` (``bad_request``) when it is not
    a valid client message. The error carries the message's ``id`` when it has one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_request", "message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "message must be a JSON object")
    raw_id = data.get("id")
    msg_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 64 else None
    msg_type = data.get("type")
    if not isinstance(msg_type, str):
        raise ProtocolError("bad_request", "message has no string field 'type'", msg_id)
    if msg_type not in CLIENT_TYPES:
        shown = msg_type if len(msg_type) <= 40 else msg_type[:40] + "..."
        raise ProtocolError("bad_request", f"unknown message type {shown!r}", msg_id)
    try:
        return _client_message.validate_python(data)
    except ValidationError as err:
        raise ProtocolError("bad_request", _describe(err, msg_type), msg_id) from None


# -- server to client ----------------------------------------------------------------------


def encode(message: dict[str, Any]) -> str:
    """One server message as a text frame: UTF-8 JSON, unset optional fields dropped."""
    return json.dumps({k: v for k, v in message.items() if v is not None}, ensure_ascii=False, separators=(",", ":"))


def error_message(code: str, message: str, id: str | None = None, watch: bool | None = None) -> dict[str, Any]:
    """An ``error``; ``watch``: one round of a watch failed and the watch goes on (extension)."""
    return {"type": "error", "id": id, "code": code, "message": message, "watch": watch}


def model_object(model_id: str, note: str | None) -> dict[str, Any]:
    """The ``model`` of ``welcome`` and ``/healthz`` (extension)."""
    return {"id": model_id, "note": note}


def stream_object(st: StreamStatus) -> dict[str, Any]:
    """A stream object (``welcome.streams[]``, ``/healthz``), plus the documented extensions."""
    return {
        "id": st.name,
        "name": st.name,
        "status": st.status,
        "width": st.width,
        "height": st.height,
        "fps_in": st.fps_in,
        "fps_sampled": st.fps_sampled,
        "frames_buffered": st.frames_buffered,
        "last_seq": st.last_seq,
        "frames_dropped": st.frames_dropped,
        "reconnects": st.reconnects,
        "error": st.error,
    }


def welcome(server: str, streams: Iterable[StreamStatus], model: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "welcome",
        "protocol": PROTOCOL_VERSION,
        "server": server,
        "streams": [stream_object(st) for st in streams],
        "model": model,
    }


def stream_status(st: StreamStatus) -> dict[str, Any]:
    """A ``stream_status`` message (``error`` only when there is one)."""
    return {
        "type": "stream_status",
        "stream": st.name,
        "status": st.status,
        "fps_in": st.fps_in,
        "fps_sampled": st.fps_sampled,
        "error": st.error,
        "frames_dropped": st.frames_dropped,
        "reconnects": st.reconnects,
    }


def preview_header(stream: str, seq: int, ts: float, width: int, height: int, size: int) -> dict[str, Any]:
    """A ``preview``: the next binary frame is a JPEG of ``size`` bytes."""
    return {"type": "preview", "stream": stream, "seq": seq, "ts": ts, "width": width, "height": height, "bytes": size}


def publishing(
    stream: str, state: Literal["open", "closed"], reason: str | None = None, **limits: Any
) -> dict[str, Any]:
    """Extension: a ``publish`` was accepted (``open``, with the limits) or it ended (``closed``)."""
    return {"type": "publishing", "stream": stream, "state": state, "reason": reason, **limits}


def event_message(event: Event) -> dict[str, Any]:
    """The message a service event becomes on the wire."""
    match event:
        case Accepted():
            return {"type": "accepted", "id": event.id, "position": event.position}
        case Token():
            return {"type": "token", "id": event.id, "text": event.text}
        case Answered():
            a = event.answer
            return {
                "type": "answer",
                "id": event.id,
                "text": a.text,
                "stream": event.stream,
                "frames": a.frames.as_dict(),
                "timings": {
                    "queued_ms": a.queued_ms,
                    "first_token_ms": a.first_token_ms,
                    "total_ms": a.total_ms,
                    **(
                        {}
                        if a.capture_to_first_token_ms is None
                        else {"capture_to_first_token_ms": a.capture_to_first_token_ms}
                    ),
                },
                "watch": True if event.watch else None,
                "token_ids": list(a.token_ids),
                "prepared": None
                if a.pairs_missing is None
                else {"pairs_missing": a.pairs_missing, "prefix_ready": a.prefix_ready},
            }
        case Alerted():
            frames = event.frames.as_dict()
            return {"type": "alert", "id": event.id, "text": event.text, "stream": event.stream, "frames": frames,
                    "matched": event.matched}  # fmt: skip
        case Failed():
            return error_message(event.code, event.message, event.id, watch=True if not event.final else None)
        case StreamChanged():
            return stream_status(event.status)
    raise TypeError(f"no wire shape for {event!r}")


def health(status: str, server: str, model: dict[str, Any], streams: Iterable[StreamStatus]) -> dict[str, Any]:
    """The ``GET /healthz`` body."""
    objects = [stream_object(st) for st in streams]
    live = [s["id"] for s in objects if s["status"] == "live"]
    return {"status": status, "server": server, "model": model, "streams": objects, "live": live}
