"""The OpenAI-compatible wire shapes of ``/v1`` (:mod:`streamer.server.v1`): the chat
completion request, the ``chat.completion`` and ``chat.completion.chunk`` bodies, the model
list, and error objects. One place for them, as :mod:`streamer.server.protocol` is for the
WebSocket.

Requests follow OpenAI's JSON, validated strictly (a string where a number belongs is an
error naming the field, not coerced); unknown fields are ignored so any OpenAI client works. The extension
object ``streamer`` (``frames``, ``mode``) goes in the request; the answer's frames come
back in ``streamer.frames`` (the WebSocket ``answer``'s ``frames`` object).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamer.capture import StreamStatus
from streamer.inference.questions import Answer, Sampling

OBJECT_CHUNK = "chat.completion.chunk"
DONE = "data: [DONE]\n\n"


class V1Error(Exception):
    """A request refused with an OpenAI error object (see :func:`error_body`)."""

    def __init__(self, status: int, message: str, type: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


#: The service's error codes (:data:`~streamer.inference.questions.ErrorCode`, ``rate_limited``)
#: -> (HTTP status, OpenAI error type, the code sent, the request field at fault).
SERVICE_ERRORS: dict[str, tuple[int, str, str, str | None]] = {
    "unknown_stream": (404, "invalid_request_error", "model_not_found", "model"),
    "stream_unavailable": (503, "service_unavailable", "stream_unavailable", "model"),
    "busy": (429, "rate_limit_error", "busy", None),
    "rate_limited": (429, "rate_limit_error", "rate_limited", None),
    "shutting_down": (503, "service_unavailable", "shutting_down", None),
    "duplicate_id": (500, "server_error", "duplicate_id", None),
    "cancelled": (500, "server_error", "cancelled", None),
    "superseded": (500, "server_error", "superseded", None),
    "internal": (500, "server_error", "internal", None),
}


def service_error(code: str, message: str) -> V1Error:
    """The OpenAI error for a question the service ended with ``code``."""
    status, type_, sent, param = SERVICE_ERRORS.get(code, (500, "server_error", code, None))
    return V1Error(status, message, type_, sent, param)


def unauthorized() -> V1Error:
    return V1Error(
        401,
        "a valid token is required: 'Authorization: Bearer <token>' (the server's tokens)",
        "invalid_request_error",
        "invalid_api_key",
    )


def too_large(limit: int) -> V1Error:
    return V1Error(413, f"the body is larger than {limit} bytes (server.max_message_bytes)", "invalid_request_error")


# -- requests --------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class OtherPart(_Model):
    """A content part streamer cannot use (``image_url``, ``input_audio``, ...)."""

    type: str

    @model_validator(mode="after")
    def _refuse(self) -> OtherPart:
        raise ValueError(f"content parts of type {self.type!r} are not supported: the frames come from the stream")


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Annotated[TextPart | OtherPart, Field(union_mode="left_to_right")]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content or [] if isinstance(p, TextPart))


class StreamOptions(_Model):
    include_usage: bool = False


class StreamerOptions(_Model):
    """The ``streamer`` extension: how many of the newest frames, and as video or one image."""

    frames: Annotated[int, Field(ge=2, le=64)] | None = None
    mode: Literal["video", "image"] | None = None


MaxTokens = Annotated[int, Field(ge=1, le=1024)]


class ChatRequest(_Model):
    """``POST /v1/chat/completions``; ``model`` names the stream."""

    model: Annotated[str, Field(min_length=1, max_length=64)]
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    streamer: StreamerOptions | None = None

    def question(self) -> str:
        """The last user message's text: the question asked about the stream's newest frames."""
        for message in reversed(self.messages):
            if message.role == "user":
                text = message.text().strip()
                if not text:
                    raise _bad("the last user message has no text", "messages")
                if len(text) > 2000:
                    raise _bad("the question (the last user message) is longer than 2000 characters", "messages")
                return text
        raise _bad("no user message: the last user message is the question", "messages")

    def sampling(self) -> Sampling | None:
        """``temperature``, ``top_p`` and ``seed`` when any is given (None: the configured decoding)."""
        if self.temperature is None and self.top_p is None and self.seed is None:
            return None
        return Sampling(self.temperature, self.top_p, self.seed)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _bad(message: str, param: str | None) -> V1Error:
    return V1Error(400, message, "invalid_request_error", "invalid_request", param)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The request body, or a 400 :class:`V1Error` naming the field at fault in ``param``."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad("the body is not valid JSON", None) from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object", None)
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as err:
        # Of a union's alternatives, the error that says most: our own refusal, else the
        # deepest, else the last (the list form of ``stop``, of ``content``).
        errors = err.errors()
        first = max(enumerate(errors), key=lambda ie: (ie[1]["type"] == "value_error", len(ie[1]["loc"]), ie[0]))[1]
        # The field's path without pydantic's union-member names: messages.0.content.
        loc = [str(p) for p in first["loc"] if isinstance(p, int) or not _union_tag(p)]
        param = ".".join(loc) or None
        what = "missing" if first["type"] == "missing" else first["msg"].removeprefix("Value error, ")
        raise _bad(f"{param}: {what}" if param else what, param) from None
    request.question()  # a request without a question is bad input, not a question that fails later
    return request


def _union_tag(part: object) -> bool:
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or part in ("str", "list", "int"))


# -- responses -------------------------------------------------------------------------------


def model_list(streams: list[StreamStatus], created: int) -> dict[str, Any]:
    """``GET /v1/models``: each stream is a model whose ``id`` is the stream's name."""
    return {"object": "list", "data": [model_card(st.name, created) for st in streams]}


def model_card(stream: str, created: int) -> dict[str, Any]:
    return {"id": stream, "object": "model", "created": created, "owned_by": "streamer"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def streamer_object(answer: Answer) -> dict[str, Any]:
    """The ``streamer`` extension of a response: the frames the answer is about, and timings."""
    timings = {"queued_ms": answer.queued_ms, "first_token_ms": answer.first_token_ms, "total_ms": answer.total_ms}
    return {"frames": answer.frames.as_dict(), "timings": timings}


def completion(
    id: str, created: int, stream: str, text: str, finish_reason: str, usage_: dict[str, int], answer: Answer
) -> dict[str, Any]:
    """A ``chat.completion`` (``stream: false``)."""
    message = {"role": "assistant", "content": text, "refusal": None}
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": stream,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_,
        "streamer": streamer_object(answer),
    }


def chunk(
    id: str,
    created: int,
    stream: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    *,
    usage_: dict[str, int] | None = None,
    answer: Answer | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: a delta, or (``delta`` None) the usage chunk with no choices."""
    body: dict[str, Any] = {"id": id, "object": OBJECT_CHUNK, "created": created, "model": stream}
    if delta is None:
        body["choices"] = []
    else:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body["usage"] = usage_
    if answer is not None:
        body["streamer"] = streamer_object(answer)
    return body


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying ``body`` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
