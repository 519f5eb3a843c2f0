"""One WebSocket connection speaking PROTOCOL.md: a thin adapter over the service.

It parses client messages (:mod:`streamer.server.protocol`), hands asks, watches and
cancels to its :class:`~streamer.service.Session`, and encodes the session's events for the
socket. What is its own is what belongs to a socket: the token handshake, the connection
limit, the rate limit, the preview subscriptions and the :class:`~streamer.server.outbox.Outbox`.
Runs on the event loop; the session's events are handed over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from streamer.server import protocol
from streamer.server.outbox import CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION, CLOSE_TRY_AGAIN_LATER, Outbox
from streamer.server.previews import PreviewKey
from streamer.server.protocol import (
    Ask,
    Cancel,
    Hello,
    ProtocolError,
    Publish,
    Subscribe,
    Unpublish,
    parse_client_message,
)
from streamer.server.publishing import Publication, PublishError
from streamer.server.security import bearer_token_ok, token_valid
from streamer.server.state import ServerState
from streamer.service import CutOff, Session

log = logging.getLogger(__name__)

CLOSE_MESSAGE_TOO_BIG = 1009

AUTH_TIMEOUT_S = 5.0
_connection_ids = itertools.count(1)


class RateLimit:
    """A token bucket: ``per_minute`` events, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
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


class Connection:
    """One WebSocket client: its life, its messages, its previews and its session's events; the
    token handshake and publishing are the module-level functions below."""

    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.ws = websocket
        self.state = state
        self.runtime = state.runtime
        self.limits = state.runtime.settings.server
        self.id = next(_connection_ids)
        self.loop = asyncio.get_running_loop()
        metrics = state.metrics
        self.outbox = Outbox(
            websocket,
            limit=self.limits.outbox_messages,
            name=f"connection {self.id}",
            on_preview_dropped=metrics.dropped.labels("preview").inc,
            on_cut_off=metrics.slow_disconnects.inc,
        )
        self._rate = RateLimit(self.limits.asks_per_minute)
        self.session: Session | None = None
        self.publication: Publication | None = None  # extension: this socket publishes a stream

    # -- what the server and the preview feeds call --------------------------------------

    def deliver_preview(self, header: dict, jpeg: bytes) -> None:
        self.outbox.put_preview(header, jpeg)

    def close(self, code: int, reason: str = "") -> None:
        self.outbox.close(code, reason)

    async def drained(self, timeout: float) -> None:
        await self.outbox.drained(timeout)

    def abort(self) -> None:
        self.outbox.abort()

    def follow(self, stream: str) -> None:
        """Hear ``stream``'s status changes (a published stream: see ServerState.announce)."""
        if self.session is not None:
            self.session.events.follow(stream)

    # -- the connection's life -------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection to its end; Host and Origin were checked before (security.py)."""
        await self.ws.accept()
        self.outbox.start()
        metrics = self.state.metrics
        if len(self.state.connections) >= self.limits.max_connections:
            metrics.refused.labels("max_connections").inc()
            busy = f"the server has its maximum of {self.limits.max_connections} clients"
            self.outbox.put(protocol.error_message("busy", busy))
            self.outbox.close(CLOSE_TRY_AGAIN_LATER, "too many connections")
            await self.outbox.drained(2.0)
            return
        self.state.connections.add(self)
        metrics.connections.inc()
        metrics.connections_total.inc()
        log.info("connection %d opened from %s", self.id, _peer(self.ws))
        self.session = self.runtime.service.session(
            f"connection {self.id}",
            max_open=self.limits.max_open_per_connection,
            throttle=self._throttle,
            maxsize=self.limits.outbox_messages,
            wake=self._wake,
        )
        for published in list(self.state.publishers.active):
            self.follow(published)
        try:
            if await _authenticate(self):
                await self._receive_loop(self.session)
        except WebSocketDisconnect:
            pass
        finally:
            self.state.connections.discard(self)
            metrics.connections.dec()
            self.state.previews.leave_all(self)
            if self.publication is not None:
                self.state.publishers.close(self.publication, "socket closed")
            self.session.close()
            self.outbox.close(CLOSE_GOING_AWAY)
            await self.outbox.drained(2.0)
            self.outbox.stop()
            log.info("connection %d closed", self.id)

    def _wake(self) -> None:  # on whatever thread published
        try:
            self.loop.call_soon_threadsafe(self._pull_events)
        except RuntimeError:  # the event loop is closed: the connection is long gone
            pass

    def _pull_events(self) -> None:
        assert self.session is not None
        try:
            events = self.session.events.drain()
        except CutOff:
            self.outbox.cut_off()
            return
        for event in events:
            self.outbox.put(protocol.event_message(event))

    def _throttle(self) -> tuple[str, str] | None:
        if self._rate.allow():
            return None
        return "rate_limited", f"more than {self._rate.per_minute} questions a minute"

    def _welcome(self) -> None:
        runtime = self.runtime
        model = protocol.model_object(runtime.settings.model.id, runtime.model_note)
        self.outbox.put(protocol.welcome(runtime.version, runtime.statuses(), model))

    # -- messages --------------------------------------------------------------------------

    async def _receive_loop(self, session: Session) -> None:
        while not self.outbox.closing:
            event = await self.ws.receive()
            if event["type"] == "websocket.disconnect":
                return
            if event.get("text") is None:
                await _published_frame(self, event.get("bytes") or b"")
                continue
            if len(event["text"].encode()) > self.limits.max_message_bytes:  # the socket takes larger frames
                self.outbox.close(CLOSE_MESSAGE_TOO_BIG, "message too big")  # as the WebSocket itself would
                return
            try:
                msg = parse_client_message(event["text"])
            except ProtocolError as err:
                self.outbox.put(protocol.error_message(err.code, err.message, err.id))
                continue
            self._handle(msg, session)

    def _handle(
        self, msg: Hello | Ask | Cancel | protocol.Watch | Subscribe | Publish | Unpublish, session: Session
    ) -> None:
        match msg:
            case Hello():
                self._welcome()
            case Ask():
                session.ask(msg.request())
            case protocol.Watch():
                session.watch(msg.request())
            case Cancel():
                if not session.cancel(msg.id):
                    self.outbox.put(
                        protocol.error_message("bad_request", f"no open question with id {msg.id!r}", msg.id)
                    )
            case Subscribe():
                self._subscribe(msg, session)
            case Publish():
                _publish(self, msg)
            case Unpublish():
                if self.publication is None:
                    self.outbox.put(protocol.error_message("bad_request", "this connection publishes no stream"))
                else:
                    _end_publication(self, "unpublished")

    def _subscribe(self, msg: Subscribe, session: Session) -> None:
        stream = self.runtime.captures.get(msg.stream)
        if stream is None:
            self.outbox.put(protocol.error_message("unknown_stream", f"no stream named {msg.stream!r}"))
            return
        session.events.follow(msg.stream)
        fps = msg.preview_fps or 0
        key = PreviewKey.of(msg.stream, fps, msg.max_width) if fps > 0 else None
        self.state.previews.follow(self, key, msg.stream)
        self.outbox.put(protocol.stream_status(stream.status()))


# -- authentication: the token handshake a connection runs before its messages ----------
# (module-level functions, so that Connection keeps the socket's life and its messages)


async def _authenticate(conn: Connection) -> bool:
    """Welcome a client with a valid token (none configured, a bearer header or a first
    'hello' within AUTH_TIMEOUT_S); else refuse it and return False."""
    if not conn.limits.tokens:
        conn._welcome()
        return True
    if bearer_token_ok(conn.limits, conn.ws.headers.get("authorization")):
        conn._welcome()
        return True
    try:
        first = await asyncio.wait_for(conn.ws.receive(), timeout=AUTH_TIMEOUT_S)
    except TimeoutError:
        return _refuse(conn, "no token: send a 'hello' with 'token' within 5 seconds")
    if first.get("type") == "websocket.disconnect":
        return False
    try:
        msg = parse_client_message(first.get("text") or first.get("bytes") or b"")
    except ProtocolError:
        msg = None
    if isinstance(msg, Hello) and token_valid(conn.limits, msg.token):
        conn._welcome()
        return True
    return _refuse(conn, "authentication required: a valid token in 'Authorization: Bearer' or a first 'hello'")


def _refuse(conn: Connection, why: str) -> bool:
    log.warning("connection %d refused: unauthorized", conn.id)
    conn.state.metrics.refused.labels("unauthorized").inc()
    conn.outbox.put(protocol.error_message("unauthorized", why))
    conn.outbox.close(CLOSE_POLICY_VIOLATION, "unauthorized")
    return False


# -- publishing (extension): a socket that publishes a stream's frames ------------------
# (module-level functions on the Connection, whose ``publication`` they open, feed and end)


def _publish(conn: Connection, msg: Publish) -> None:
    if conn.publication is not None:
        why = f"this connection publishes {conn.publication.name!r} already; 'unpublish' first"
        conn.outbox.put(protocol.error_message("bad_request", why))
        return
    publishers = conn.state.publishers
    try:
        conn.publication = publishers.open(
            msg.stream, "websocket", functools.partial(_publication_hung_up, conn), msg.fps
        )
    except PublishError as err:
        conn.outbox.put(protocol.error_message(err.code, err.message))
        return
    cfg = publishers.cfg
    conn.outbox.put(protocol.publishing(msg.stream, "open", max_side=cfg.max_side, max_frame_bytes=cfg.max_frame_bytes))


def _publication_hung_up(conn: Connection, reason: str) -> None:  # by the server: idle, shutdown
    if conn.publication is not None:
        conn.outbox.put(protocol.publishing(conn.publication.name, "closed", reason))
        conn.publication = None


def _end_publication(conn: Connection, reason: str) -> None:
    assert conn.publication is not None
    publication, conn.publication = conn.publication, None
    conn.state.publishers.close(publication, reason)
    conn.outbox.put(protocol.publishing(publication.name, "closed", reason))


async def _published_frame(conn: Connection, data: bytes) -> None:
    if conn.publication is None:
        why = "binary frames are accepted from clients only after a 'publish' (then: JPEG frames)"
        conn.outbox.put(protocol.error_message("bad_request", why))
        return
    try:
        rgb = await conn.state.publishers.decode_jpeg(data)
    except PublishError as err:
        conn.outbox.put(protocol.error_message(err.code, err.message))
        return
    if conn.publication is not None:  # not ended while decoding
        conn.publication.push(rgb)


def _peer(ws: WebSocket) -> str:
    client = ws.client
    return f"{client.host}:{client.port}" if client else "?"
