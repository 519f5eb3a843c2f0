"""One WebSocket connection speaking PROTOCOL.md.

Every outgoing message goes through one bounded outbox drained by one sender task, so
messages from the inference thread (posted with ``call_soon_threadsafe``) and replies from
the receive loop keep their order and never interleave on the socket. A client that does
not read only fills its own outbox: previews are dropped first (only the newest waits), and
a client that falls ``outbox_messages`` behind on answers is cut off (close 1008). Nothing
else ever waits for it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
from collections import deque
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from streamer.inference.scheduler import Answer, ErrorCode, Mode, Question, Rejected, Watch
from streamer.server import protocol
from streamer.server.protocol import (
    PROTOCOL_VERSION,
    Ask,
    Cancel,
    Hello,
    ProtocolError,
    Subscribe,
    encode,
    error_message,
    parse_client_message,
)
from streamer.server.runtime import stream_status_message

if TYPE_CHECKING:
    from streamer.server.app import ServerState

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 5.0
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
CUT_OFF_GRACE_S = 2.0
_connection_ids = itertools.count(1)


class _Close:
    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason


class _Preview:
    __slots__ = ("header", "jpeg")

    def __init__(self, header: str, jpeg: bytes) -> None:
        self.header = header
        self.jpeg = jpeg


class RateLimit:
    """A token bucket: ``per_minute`` events, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.updated = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _QuestionSink:
    """Hands progress of asks and watches from the inference thread to the connection's loop."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._metrics = conn.state.metrics

    def _post(self, message: dict[str, Any], final_id: str | None = None) -> None:
        try:
            self._conn.loop.call_soon_threadsafe(self._conn.deliver, message, final_id)
        except RuntimeError:  # the event loop is closed: the connection is long gone
            pass

    def _count(self, q: Question | Watch, outcome: str) -> None:
        kind = "watch" if isinstance(q, Watch) or q.watch is not None else "ask"
        self._metrics.questions.labels(kind, outcome).inc()

    def on_accepted(self, q: Question, position: int) -> None:
        self._post({"type": "accepted", "id": q.id, "position": position})

    def on_watch_accepted(self, w: Watch, position: int) -> None:
        self._post({"type": "accepted", "id": w.id, "position": position})

    def on_text(self, q: Question, text: str) -> None:
        self._post({"type": "token", "id": q.id, "text": text})

    def on_answer(self, q: Question, answer: Answer) -> None:
        self._count(q, "answer")
        if answer.first_token_ms is not None:
            self._metrics.ttft.observe(answer.first_token_ms / 1000)
        self._metrics.total.observe(answer.total_ms / 1000)
        frames = asdict(answer.frames)
        self._post(
            {
                "type": "answer",
                "id": q.id,
                "text": answer.text,
                "stream": q.stream,
                "frames": frames,
                "timings": {
                    "queued_ms": answer.queued_ms,
                    "first_token_ms": answer.first_token_ms,
                    "total_ms": answer.total_ms,
                },
                "watch": True if q.watch is not None else None,
                "token_ids": list(answer.token_ids),
            },
            final_id=None if q.watch is not None else q.id,
        )
        if answer.matched is not None:
            self._post(
                {
                    "type": "alert",
                    "id": q.id,
                    "text": answer.text,
                    "stream": q.stream,
                    "frames": frames,
                    "matched": answer.matched,
                }
            )

    def on_error(self, q: Question, code: ErrorCode, message: str) -> None:
        self._count(q, code)
        if q.watch is not None:  # one round failed; the watch goes on
            self._post({**error_message(code, message, q.id), "watch": True})
        else:
            self._post(error_message(code, message, q.id), final_id=q.id)

    def on_watch_end(self, w: Watch, code: ErrorCode, message: str) -> None:
        self._post(error_message(code, message, w.id), final_id=w.id)


class Connection:
    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.ws = websocket
        self.state = state
        self.runtime = state.runtime
        self.limits = state.runtime.settings.server
        self.id = next(_connection_ids)
        self.loop = asyncio.get_running_loop()
        self._outbox: deque[str | _Preview | _Close] = deque()
        self._wakeup = asyncio.Event()
        self._essential = 0  # queued messages that may not be dropped
        self._open_ids: set[str] = set()
        self._sink = _QuestionSink(self)
        self._rate = RateLimit(self.limits.asks_per_minute)
        self._closing = False
        self._sender: asyncio.Task | None = None

    # -- sending ---------------------------------------------------------------------------

    def deliver(self, message: dict[str, Any], final_id: str | None = None) -> None:
        """Queue a message that must arrive (event-loop thread only)."""
        if final_id is not None:
            self._open_ids.discard(final_id)
        if self._closing:
            return
        if self._essential >= self.limits.outbox_messages:
            self._cut_off()
            return
        self._essential += 1
        self._outbox.append(encode(message))
        self._wakeup.set()

    def deliver_preview(self, header: dict[str, Any], jpeg: bytes) -> None:
        """Queue a preview; an older preview still waiting is dropped for it."""
        if self._closing:
            return
        for i, item in enumerate(self._outbox):
            if isinstance(item, _Preview):
                del self._outbox[i]
                self.state.metrics.dropped.labels("preview").inc()
                break
        self._outbox.append(_Preview(encode(header), jpeg))
        self._wakeup.set()

    def _cut_off(self) -> None:
        log.warning("connection %d: cut off, %d messages unread", self.id, self._essential)
        self.state.metrics.slow_disconnects.inc()
        self._outbox.clear()
        self._essential = 0
        self.close(CLOSE_POLICY_VIOLATION, "too slow: messages were not read")
        # The sender may be stuck writing to a peer that does not read, and a close frame
        # would wait behind it: give it a moment, then drop the TCP connection.
        self.loop.call_later(CUT_OFF_GRACE_S, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection unless everything was sent (a peer that does not read)."""
        if self._sender is not None and self._sender.done():
            return
        # Starlette hides the transport; uvicorn's protocol object is behind ``send``.
        transport = getattr(getattr(self.ws._send, "__self__", None), "transport", None)
        if transport is not None:
            transport.abort()

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is already queued (event-loop thread only)."""
        if not self._closing:
            self._closing = True
            self._outbox.append(_Close(code, reason))
            self._wakeup.set()

    async def _send_loop(self) -> None:
        try:
            while True:
                while not self._outbox:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                item = self._outbox.popleft()
                if isinstance(item, _Close):
                    await self.ws.close(item.code, item.reason)
                    return
                if isinstance(item, _Preview):
                    await self.ws.send_text(item.header)
                    await self.ws.send_bytes(item.jpeg)
                else:
                    self._essential -= 1
                    await self.ws.send_text(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the peer went away; the receive loop notices too

    async def drained(self, timeout: float) -> None:
        """Wait until the sender has sent everything up to a close (or ``timeout``)."""
        if self._sender is not None:
            await asyncio.wait({self._sender}, timeout=timeout)

    # -- the connection's life ---------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection to its end; Host and Origin were checked before (security.py)."""
        await self.ws.accept()
        self._sender = asyncio.create_task(self._send_loop(), name=f"ws-send-{self.id}")
        if len(self.state.connections) >= self.limits.max_connections:
            self.state.metrics.refused.labels("max_connections").inc()
            self.deliver(error_message("busy", f"the server has its maximum of {self.limits.max_connections} clients"))
            self.close(CLOSE_TRY_AGAIN_LATER, "too many connections")
            await self.drained(2.0)
            return
        self.state.connections.add(self)
        self.state.metrics.connections.inc()
        self.state.metrics.connections_total.inc()
        log.info("connection %d opened from %s", self.id, _peer(self.ws))
        try:
            if await self._authenticate():
                await self._receive_loop()
        except WebSocketDisconnect:
            pass
        finally:
            self.state.connections.discard(self)
            self.state.metrics.connections.dec()
            self.state.subscriptions.remove(self)
            self.state.previews.leave_all(self)
            if self.runtime.loop is not None:
                self.runtime.loop.cancel_owner(self)
            self.close(CLOSE_GOING_AWAY)
            await self.drained(2.0)
            if self._sender is not None and not self._sender.done():
                self._sender.cancel()
            log.info("connection %d closed", self.id)

    def _token_ok(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        # Compare against every token, so timing says nothing about which one nearly matched.
        results = [hmac.compare_digest(given, t.get_secret_value().encode()) for t in self.limits.tokens]
        return any(results)

    async def _authenticate(self) -> bool:
        if not self.limits.tokens:
            self._welcome()
            return True
        header = self.ws.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self._token_ok(value.strip()):
            self._welcome()
            return True
        try:
            first = await asyncio.wait_for(self.ws.receive(), timeout=AUTH_TIMEOUT_S)
        except TimeoutError:
            return self._refuse("no token: send a 'hello' with 'token' within 5 seconds")
        if first.get("type") == "websocket.disconnect":
            return False
        try:
            msg = parse_client_message(first.get("text") or first.get("bytes") or b"")
        except ProtocolError:
            msg = None
        if isinstance(msg, Hello) and self._token_ok(msg.token):
            self._welcome()
            return True
        return self._refuse("authentication required: a valid token in 'Authorization: Bearer' or a first 'hello'")

    def _refuse(self, why: str) -> bool:
        log.warning("connection %d refused: unauthorized", self.id)
        self.state.metrics.refused.labels("unauthorized").inc()
        self.deliver(error_message("unauthorized", why))
        self.close(CLOSE_POLICY_VIOLATION, "unauthorized")
        return False

    def _welcome(self) -> None:
        self.deliver(
            {
                "type": "welcome",
                "protocol": PROTOCOL_VERSION,
                "server": self.runtime.version,
                "streams": self.runtime.stream_objects(),
                "model": self.runtime.model_info(),
            }
        )

    async def _receive_loop(self) -> None:
        while not self._closing:
            event = await self.ws.receive()
            if event["type"] == "websocket.disconnect":
                return
            if event.get("text") is None:
                self.deliver(error_message("bad_request", "binary frames are not accepted from clients"))
                continue
            try:
                msg = parse_client_message(event["text"])
            except ProtocolError as err:
                self.deliver(error_message(err.code, err.message, err.id))
                continue
            self._handle(msg)

    def _handle(self, msg: Hello | Ask | Cancel | protocol.Watch | Subscribe) -> None:
        if isinstance(msg, Hello):
            self._welcome()
        elif isinstance(msg, Ask):
            self._ask(msg)
        elif isinstance(msg, Cancel):
            loop = self.runtime.loop
            if loop is None or not loop.cancel(self, msg.id):
                self.deliver(error_message("bad_request", f"no open question with id {msg.id!r}", msg.id))
        elif isinstance(msg, Subscribe):
            self._subscribe(msg)
        else:
            self._watch(msg)

    def _subscribe(self, msg: Subscribe) -> None:
        from streamer.server.previews import PreviewKey

        capture = self.runtime.captures.get(msg.stream)
        if capture is None:
            self.deliver(error_message("unknown_stream", f"no stream named {msg.stream!r}"))
            return
        self.state.subscriptions.add(msg.stream, self)
        fps = msg.preview_fps or 0
        key = PreviewKey.of(msg.stream, fps, msg.max_width) if fps > 0 else None
        self.state.previews.follow(self, key, msg.stream)
        self.deliver(stream_status_message(capture.status()))

    def _can_open(self, qid: str) -> bool:
        if self.runtime.loop is None or self.state.shutting_down:
            self.deliver(error_message("shutting_down", "the server is not taking questions", qid))
            return False
        if qid in self._open_ids:
            self.deliver(error_message("duplicate_id", f"question {qid!r} is still open", qid))
            return False
        if len(self._open_ids) >= self.limits.max_open_per_connection:
            limit = self.limits.max_open_per_connection
            self.deliver(error_message("busy", f"this connection has {limit} questions open already", qid))
            return False
        if not self._rate.allow():
            limit = self.limits.asks_per_minute
            self.deliver(error_message("rate_limited", f"more than {limit} questions a minute", qid))
            return False
        self._open_ids.add(qid)
        return True

    def _mode(self, stream: str, asked: Mode | None) -> Mode:
        """The input mode: the question's own, else its stream's, else the model's default."""
        source = self.runtime.settings.source(stream)
        return asked or (source.mode if source is not None else None) or self.runtime.settings.model.mode

    def _ask(self, msg: Ask) -> None:
        if not self._can_open(msg.id):
            return
        model = self.runtime.settings.model
        question = Question(
            id=msg.id,
            stream=msg.stream,
            text=msg.question,
            owner=self,
            sink=self._sink,
            frames=msg.frames or model.frames,
            max_new_tokens=msg.max_new_tokens or model.max_new_tokens,
            mode=self._mode(msg.stream, msg.mode),
        )
        try:
            self.runtime.loop.submit(question)  # type: ignore[union-attr]
        except Rejected as err:
            log.info("connection %d: question %s refused: %s", self.id, msg.id, err.code)

    def _watch(self, msg: protocol.Watch) -> None:
        if not self._can_open(msg.id):
            return
        model = self.runtime.settings.model
        watch = Watch(
            id=msg.id,
            stream=msg.stream,
            text=msg.question,
            owner=self,
            sink=self._sink,
            every_s=msg.every_s,
            frames=msg.frames or model.frames,
            max_new_tokens=msg.max_new_tokens or model.max_new_tokens,
            mode=self._mode(msg.stream, msg.mode),
            alert_contains=msg.alert_if.contains if msg.alert_if else None,
        )
        try:
            self.runtime.loop.add_watch(watch)  # type: ignore[union-attr]
        except Rejected as err:
            log.info("connection %d: watch %s refused: %s", self.id, msg.id, err.code)


def _peer(ws: WebSocket) -> str:
    client = ws.client
    return f"{client.host}:{client.port}" if client else "?"
