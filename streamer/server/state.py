"""What the server's handlers share: the runtime, metrics, preview feeds, open connections,
and the graceful stop of them all."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from streamer.server.metrics import Metrics
from streamer.server.outbox import CLOSE_GOING_AWAY
from streamer.server.previews import PreviewHub
from streamer.server.publishing import Publishers
from streamer.server.runtime import Runtime


class OpenConnection(Protocol):
    def close(self, code: int, reason: str = "") -> None: ...
    async def drained(self, timeout: float) -> None: ...
    def abort(self) -> None: ...
    def follow(self, stream: str) -> None: ...


@dataclass
class ServerState:
    runtime: Runtime
    metrics: Metrics
    previews: PreviewHub
    publishers: Publishers
    connections: set[OpenConnection] = field(default_factory=set)

    def announce(self, stream: str) -> None:
        """A stream was published: every client hears its ``stream_status`` from now on,
        subscribed to it or not, so that lists of streams learn it came and went."""
        for conn in list(self.connections):
            conn.follow(stream)

    async def drain(self, deadline_s: float) -> None:
        """Graceful stop: no new questions; the running answer may finish within the
        deadline, everything else ends with ``shutting_down``; then every connection is
        closed with 1001 once its last messages are sent."""
        started = time.monotonic()
        await asyncio.to_thread(self.runtime.service.shutdown, finish_running_within=deadline_s * 0.8)
        await asyncio.sleep(0)  # let the answers published from the inference thread be queued
        self.previews.close()
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, "server shutting down")
        left = max(0.5, deadline_s - (time.monotonic() - started))
        await asyncio.gather(*(conn.drained(left) for conn in list(self.connections)))
        for conn in list(self.connections):
            conn.abort()  # still stuck behind a peer that does not read
