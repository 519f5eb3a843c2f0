"""One connection's outgoing messages: a bounded queue drained by one sender task.

Every message to a client goes through its outbox, so messages keep their order and never
interleave on the socket, whoever queued them (the receive loop, the service's events, the
preview feeds). A client that does not read fills only its own outbox: previews are dropped
first (only the newest waits), and a client that falls ``limit`` messages behind on the
rest is cut off (close 1008; the TCP connection is dropped if even the close cannot be
written). Nothing else ever waits for it. Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from streamer.server.protocol import encode

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
CUT_OFF_GRACE_S = 2.0


class _Close:
    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason


class _Preview:
    __slots__ = ("header", "jpeg")

    def __init__(self, header: str, jpeg: bytes) -> None:
        self.header = header
        self.jpeg = jpeg


class Outbox:
    """What waits to be sent to one WebSocket, and the task that sends it."""

    def __init__(
        self,
        ws: WebSocket,
        *,
        limit: int,
        name: str,
        on_preview_dropped: Callable[[], None] = lambda: None,
        on_cut_off: Callable[[], None] = lambda: None,
    ) -> None:
        self.ws = ws
        self.limit = limit
        self.name = name
        self._on_preview_dropped = on_preview_dropped
        self._on_cut_off = on_cut_off
        self._queue: deque[str | _Preview | _Close] = deque()
        self._wakeup = asyncio.Event()
        self._essential = 0  # queued messages that may not be dropped
        self._sender: asyncio.Task | None = None
        self.closing = False

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop(), name=f"ws-send-{self.name}")

    def put(self, message: dict[str, Any]) -> None:
        """Queue a message that must arrive (or the client is cut off)."""
        if self.closing:
            return
        if self._essential >= self.limit:
            self.cut_off()
            return
        self._essential += 1
        self._queue.append(encode(message))
        self._wakeup.set()

    def put_preview(self, header: dict[str, Any], jpeg: bytes) -> None:
        """Queue a preview; an older preview still waiting is dropped for it."""
        if self.closing:
            return
        for i, item in enumerate(self._queue):
            if isinstance(item, _Preview):
                del self._queue[i]
                self._on_preview_dropped()
                break
        self._queue.append(_Preview(encode(header), jpeg))
        self._wakeup.set()

    def cut_off(self) -> None:
        """The client is too far behind: drop what waits, close, and drop the TCP connection
        if even the close cannot be written."""
        log.warning("%s: cut off, %d messages unread", self.name, self._essential)
        self._on_cut_off()
        self._queue.clear()
        self._essential = 0
        self.close(CLOSE_POLICY_VIOLATION, "too slow: messages were not read")
        # The sender may be stuck writing to a peer that does not read, and a close frame
        # would wait behind it: give it a moment, then drop the TCP connection.
        asyncio.get_running_loop().call_later(CUT_OFF_GRACE_S, self.abort)

    def close(self, code: int, reason: str = "") -> None:
        """Close after what is already queued."""
        if not self.closing:
            self.closing = True
            self._queue.append(_Close(code, reason))
            self._wakeup.set()

    def abort(self) -> None:
        """Drop the TCP connection unless everything was sent (a peer that does not read)."""
        if self._sender is not None and self._sender.done():
            return
        # Starlette hides the transport; uvicorn's protocol object is behind ``send``.
        transport = getattr(getattr(self.ws._send, "__self__", None), "transport", None)
        if transport is not None:
            transport.abort()

    async def drained(self, timeout: float) -> None:
        """Wait until the sender has sent everything up to a close (or ``timeout``)."""
        if self._sender is not None:
            await asyncio.wait({self._sender}, timeout=timeout)

    def stop(self) -> None:
        """Stop sending (after :meth:`drained`, when it did not finish)."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()

    async def _send_loop(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                item = self._queue.popleft()
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
