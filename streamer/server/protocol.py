"""The wire protocol (``PROTOCOL.md``, version 1): message models, parsing, encoding.

Client messages are validated strictly (a string where a number belongs is an error, not
coerced); unknown extra fields are ignored so newer clients keep working. Server messages
are built with :func:`encode`, which drops optional fields that are unset.

Extensions to version 1 (compatible) are documented in ``docs/protocol-extensions.md``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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


class Subscribe(_ClientMessage):
    type: Literal["subscribe"]
    stream: StreamId
    preview_fps: Annotated[float, Field(ge=0, le=10)] | None = None
    max_width: Annotated[int, Field(ge=16, le=4096)] | None = None


ClientMessage = Annotated[Hello | Ask | Cancel | Watch | Subscribe, Field(discriminator="type")]
_client_message = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("hello", "ask", "cancel", "watch", "subscribe")


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


def parse_client_message(raw: str | bytes) -> Hello | Ask | Cancel | Watch | Subscribe:
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


def encode(message: dict[str, Any]) -> str:
    """One server message as a text frame: UTF-8 JSON, unset optional fields dropped."""
    return json.dumps({k: v for k, v in message.items() if v is not None}, ensure_ascii=False, separators=(",", ":"))


def error_message(code: str, message: str, id: str | None = None) -> dict[str, Any]:
    return {"type": "error", "id": id, "code": code, "message": message}
