"""One WebSocket connection speaking PROTOCOL.md.

Every outgoing message goes through one queue drained by one sender task, so messages
from the inference thread (posted with ``call_soon_threadsafe``) and replies from the
receive loop keep their order and never interleave on the socket.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from dataclasses import asdict
from typing import Any

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
from streamer.server.runtime import Runtime, stream_status_message
from streamer.server.subscriptions import Subscriptions

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 5.0
CLOSE_POLICY_VIOLATION = 1008
_connection_ids = itertools.count(1)
_STOP = object()  # tells the sender task to finish after what is already queued


class _Close:
    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason


class _QuestionSink:
    """Hands progress of asks and watches from the inference thread to the connection's loop."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _post(self, message: dict[str, Any], final_id: str | None = None) -> None:
        try:
            self._conn.loop.call_soon_threadsafe(self._conn.deliver, message, final_id)
        except RuntimeError:  # the event loop is closed: the connection is long gone
            pass

    def on_accepted(self, q: Question, position: int) -> None:
        self._post({"type": "accepted", "id": q.id, "position": position})

    def on_watch_accepted(self, w: Watch, position: int) -> None:
        self._post({"type": "accepted", "id": w.id, "position": position})

    def on_text(self, q: Question, text: str) -> None:
        self._post({"type": "token", "id": q.id, "text": text})

    def on_answer(self, q: Question, answer: Answer) -> None:
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
        if q.watch is not None:  # one round failed; the watch goes on
            self._post({**error_message(code, message, q.id), "watch": True})
        else:
            self._post(error_message(code, message, q.id), final_id=q.id)

    def on_watch_end(self, w: Watch, code: ErrorCode, message: str) -> None:
        self._post(error_message(code, message, w.id), final_id=w.id)


class Connection:
    def __init__(self, websocket: WebSocket, runtime: Runtime, subscriptions: Subscriptions) -> None:
        self.ws = websocket
        self.runtime = runtime
        self.subscriptions = subscriptions
        self.id = next(_connection_ids)
        self.loop = asyncio.get_running_loop()
        self._outbox: asyncio.Queue[str | bytes | _Close | object] = asyncio.Queue()
        self._open_ids: set[str] = set()
        self._sink = _QuestionSink(self)
        self._closed = False

    # -- sending ---------------------------------------------------------------------------

    def deliver(self, message: dict[str, Any], final_id: str | None = None) -> None:
        """Queue a message for sending (event-loop thread only)."""
        if final_id is not None:
            self._open_ids.discard(final_id)
        if not self._closed:
            self._outbox.put_nowait(encode(message))

    def _close_after_pending(self, code: int, reason: str = "") -> None:
        self._outbox.put_nowait(_Close(code, reason))

    async def _send_loop(self) -> None:
        try:
            while True:
                item = await self._outbox.get()
                if item is _STOP:
                    return
                if isinstance(item, _Close):
                    await self.ws.close(item.code, item.reason)
                    return
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_text(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the peer went away; the receive loop notices too

    # -- the connection's life ---------------------------------------------------------------

    async def serve(self) -> None:
        await self.ws.accept()
        sender = asyncio.create_task(self._send_loop(), name=f"ws-send-{self.id}")
        log.info("connection %d opened from %s", self.id, _peer(self.ws))
        try:
            if await self._authenticate():
                await self._receive_loop()
        except WebSocketDisconnect:
            pass
        finally:
            self._closed = True
            self.subscriptions.remove(self)
            if self.runtime.loop is not None:
                self.runtime.loop.cancel_owner(self)
            self._outbox.put_nowait(_STOP)
            try:
                await asyncio.wait_for(sender, timeout=2.0)
            except (TimeoutError, asyncio.CancelledError):
                sender.cancel()
            log.info("connection %d closed", self.id)

    def _token_ok(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        # Compare against every token, so timing says nothing about which one nearly matched.
        results = [
            hmac.compare_digest(given, t.get_secret_value().encode()) for t in self.runtime.settings.server.tokens
        ]
        return any(results)

    async def _authenticate(self) -> bool:
        if not self.runtime.settings.server.tokens:
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
        self.deliver(error_message("unauthorized", why))
        self._close_after_pending(CLOSE_POLICY_VIOLATION, "unauthorized")
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
        while True:
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
        capture = self.runtime.captures.get(msg.stream)
        if capture is None:
            self.deliver(error_message("unknown_stream", f"no stream named {msg.stream!r}"))
            return
        self.subscriptions.add(msg.stream, self)
        self.deliver(stream_status_message(capture.status()))

    def _can_open(self, qid: str) -> bool:
        if self.runtime.loop is None:
            self.deliver(error_message("shutting_down", "the server is not serving questions", qid))
            return False
        if qid in self._open_ids:
            self.deliver(error_message("duplicate_id", f"question {qid!r} is still open", qid))
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
