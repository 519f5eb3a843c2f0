"""The OpenAI-compatible endpoint: ``GET /v1/models`` and ``POST /v1/chat/completions``,
a thin adapter over the service, as the WebSocket connection is.

Each stream is a model. A chat completion asks the last user message's text about the newest
frames of the stream named by ``model``, through a :class:`~streamer.service.Session` of its
own (the owner the loop's fair queue knows, at most one question open), and answers from
that session's events. Guarantees:

- refusals the service gives at once (unknown stream, no frames yet, queue full, rate
  limit, shutting down) are HTTP errors with OpenAI error objects, before any body; a
  failure after the stream started is an ``error`` event, then ``data: [DONE]``;
- the question ends exactly once: answered, or cancelled when the client goes away (the
  session is closed whatever way the request ends);
- the event loop only moves events: the model runs on the inference thread.

Wire shapes: :mod:`streamer.server.openai_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from streamer.server import openai_protocol as wire
from streamer.server.connection import RateLimit
from streamer.server.openai_protocol import ChatRequest, V1Error
from streamer.server.security import bearer_token_ok
from streamer.server.state import ServerState
from streamer.service import Accepted, Answered, AskRequest, CutOff, Failed, Session, Token

log = logging.getLogger(__name__)

_request_ids = itertools.count(1)


class StopScanner:
    """Applies OpenAI's ``stop`` strings to streamed text: pieces pass through until a stop
    string appears (it and what follows are dropped); text that could be the start of a
    stop string is held back until the next piece tells."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that may be sent now."""
        if self.stopped:
            return ""
        text = self._pending + piece
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._pending = True, ""
            return text[:cut]
        keep = min(self._hold, len(text))
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


class ChatCompletion:
    """One ``POST /v1/chat/completions``: its session, its events, its end."""

    def __init__(self, state: ServerState, request: Request, chat: ChatRequest, question: str) -> None:
        self.state = state
        self.http = request
        self.chat = chat
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        limits = state.runtime.settings.server
        self.session: Session = state.runtime.service.session(
            f"v1 request {next(_request_ids)}",
            max_open=1,
            throttle=None,
            maxsize=limits.outbox_messages,
            wake=self._wake,
        )
        self.ask = AskRequest(
            self.id,
            chat.model,
            question,
            frames=chat.streamer.frames if chat.streamer else None,
            max_new_tokens=chat.new_tokens,
            mode=chat.streamer.mode if chat.streamer else None,
            sampling=chat.sampling(),
        )
        self.max_new_tokens = state.runtime.service.defaults(self.ask)[1]
        self.stops = StopScanner(chat.stop_strings)
        self._early: list = []

    def _wake(self) -> None:  # on whatever thread published
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop has closed
            pass

    async def events(self) -> AsyncIterator[Accepted | Token | Answered | Failed]:
        """This question's events as they come, up to and including its final one."""
        events, self._early = self._early, []
        while True:
            if not events:
                await self._ready.wait()
                self._ready.clear()
                try:
                    events = self.session.events.drain()
                except CutOff:
                    yield Failed(self.session, self.id, "internal", "the answer's events fell behind")
                    return
            for event in events:
                if isinstance(event, Accepted | Token | Answered | Failed) and event.id == self.id:
                    yield event
                    if isinstance(event, Answered | Failed):
                        return
            events = []

    async def start(self) -> None:
        """Ask; raises the :class:`V1Error` for a refusal the service gave at once."""
        self.session.ask(self.ask)
        # A refusal (and an acceptance) is published before ask returns: the first events are here.
        self._ready.clear()
        first = self.session.events.drain()
        failed = next((e for e in first if isinstance(e, Failed) and e.id == self.id), None)
        if failed is not None:
            raise wire.service_error(failed.code, failed.message)
        self._early = first  # events() reads them first

    def finish_reason(self, answer_tokens: int) -> str:
        """``length`` when the answer used every token allowed it (it may have ended there anyway)."""
        if self.stops.stopped:
            return "stop"
        return "length" if answer_tokens >= self.max_new_tokens else "stop"

    def usage(self, answered: Answered) -> dict[str, int]:
        # The engines do not report prompt tokens to the service: 0 (documented).
        return wire.usage(0, len(answered.answer.token_ids))

    async def answer(self) -> Response:
        """``stream: false``: wait for the answer (the client leaving cancels it)."""
        text = []
        async with contextlib.aclosing(self._until_disconnected(self.events())) as events:
            async for event in events:
                if isinstance(event, Token):
                    text.append(self.stops.feed(event.text))
                elif isinstance(event, Failed):
                    raise wire.service_error(event.code, event.message)
                elif isinstance(event, Answered):
                    text.append(self.stops.flush())
                    body = wire.completion(
                        self.id,
                        self.created,
                        self.chat.model,
                        "".join(text),
                        self.finish_reason(len(event.answer.token_ids)),
                        self.usage(event),
                        event.answer,
                    )
                    return JSONResponse(body)
        raise wire.service_error("cancelled", "the client went away")

    async def _until_disconnected(self, events: AsyncIterator) -> AsyncIterator:
        """``events``, until the client disconnects (then nothing more)."""
        gone = asyncio.ensure_future(self._disconnected())
        try:
            iterator = events.__aiter__()
            while True:
                following = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
                if following not in done:
                    following.cancel()
                    log.info("%s: the client went away; cancelling", self.session.name)
                    return
                try:
                    event = following.result()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            gone.cancel()

    async def _disconnected(self) -> None:
        while (await self.http.receive())["type"] != "http.disconnect":
            pass

    async def chunks(self) -> AsyncIterator[str]:
        """``stream: true``: the SSE body. Starlette cancels it when the client disconnects."""
        chat, model = self.chat, self.chat.model
        try:
            yield wire.sse(wire.chunk(self.id, self.created, model, {"role": "assistant", "content": ""}))
            async for event in self.events():
                if isinstance(event, Token):
                    if piece := self.stops.feed(event.text):
                        yield wire.sse(wire.chunk(self.id, self.created, model, {"content": piece}))
                elif isinstance(event, Failed):
                    err = wire.service_error(event.code, event.message)
                    yield wire.sse(err.body())
                    break
                elif isinstance(event, Answered):
                    if rest := self.stops.flush():
                        yield wire.sse(wire.chunk(self.id, self.created, model, {"content": rest}))
                    reason = self.finish_reason(len(event.answer.token_ids))
                    yield wire.sse(wire.chunk(self.id, self.created, model, {}, reason, answer=event.answer))
                    if chat.include_usage:
                        yield wire.sse(wire.chunk(self.id, self.created, model, None, usage_=self.usage(event)))
            yield wire.DONE
        finally:
            self.close()

    def close(self) -> None:
        """Cancel whatever is still open (nothing once answered) and stop the events."""
        self.session.close()


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise wire.too_large(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise wire.too_large(limit)
    return bytes(body)


class _ClosingStream(StreamingResponse):
    """An SSE response that closes its completion however the response ends: a client that
    leaves before the first chunk never starts the body's generator, so its ``finally`` is not enough."""

    def __init__(self, completion: ChatCompletion, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.completion = completion

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.completion.close()


def routes(state: ServerState) -> list[BaseRoute]:
    """The ``/v1`` routes, sharing the server's state (tokens, limits, metrics)."""
    # Long because it defines the route handlers as closures over the shared state.
    runtime = state.runtime
    limits = runtime.settings.server
    rates: dict[str, RateLimit] = {}

    def refuse(err: V1Error) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def authorized(request: Request) -> bool:
        if bearer_token_ok(limits, request.headers.get("authorization")):
            return True
        state.metrics.refused.labels("unauthorized").inc()
        return False

    def rate_limited(request: Request) -> V1Error | None:
        """asks_per_minute, per token (per client address without tokens), as per WebSocket connection."""
        key = request.headers.get("authorization", "") if limits.tokens else (request.client or ("?",))[0]
        if key not in rates and len(rates) >= 1024:  # forget clients whose buckets have filled up again
            now = time.monotonic()
            for idle in [k for k, r in rates.items() if r.tokens + (now - r.updated) * r.rate >= r.capacity]:
                del rates[idle]
        rate = rates.setdefault(key, RateLimit(limits.asks_per_minute))
        if rate.allow():
            return None
        return wire.service_error("rate_limited", f"more than {rate.per_minute} questions a minute")

    async def models(request: Request) -> Response:
        if not authorized(request):
            return refuse(wire.unauthorized())
        return JSONResponse(wire.model_list(runtime.statuses(), int(runtime.started_at)))

    async def model(request: Request) -> Response:
        if not authorized(request):
            return refuse(wire.unauthorized())
        name = request.path_params["model"]
        if name not in runtime.captures:
            return refuse(wire.service_error("unknown_stream", f"no stream named {name!r}"))
        return JSONResponse(wire.model_card(name, int(runtime.started_at)))

    async def chat_completions(request: Request) -> Response:
        if not authorized(request):
            return refuse(wire.unauthorized())
        try:
            chat = wire.parse_chat_request(await _body(request, limits.max_message_bytes))
            if chat.model not in runtime.captures:
                raise wire.service_error("unknown_stream", f"no stream named {chat.model!r}")
            if (limited := rate_limited(request)) is not None:
                raise limited
        except V1Error as err:
            return refuse(err)
        completion = ChatCompletion(state, request, chat, chat.question())
        try:
            await completion.start()
        except V1Error as err:
            completion.close()
            return refuse(err)
        if chat.stream:
            return _ClosingStream(
                completion,
                completion.chunks(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return await completion.answer()
        except V1Error as err:
            return refuse(err)
        finally:
            completion.close()

    return [
        Route("/v1/models", models),
        Route("/v1/models/{model:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
