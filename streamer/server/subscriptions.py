"""Which connections follow which stream, and the fan-out of stream messages to them.

Used on the event loop only; capture threads reach it through ``call_soon_threadsafe``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

from streamer.capture import StreamStatus
from streamer.server.runtime import stream_status_message


class Subscriber(Protocol):
    def deliver(self, message: dict[str, Any], final_id: str | None = None) -> None: ...


class Subscriptions:
    def __init__(self) -> None:
        self._by_stream: dict[str, set[Subscriber]] = defaultdict(set)

    def add(self, stream: str, subscriber: Subscriber) -> None:
        self._by_stream[stream].add(subscriber)

    def remove(self, subscriber: Subscriber) -> None:
        for subscribers in self._by_stream.values():
            subscribers.discard(subscriber)

    def subscribers(self, stream: str) -> set[Subscriber]:
        return set(self._by_stream.get(stream, ()))

    def broadcast_status(self, status: StreamStatus) -> None:
        message = stream_status_message(status)
        for subscriber in self.subscribers(status.name):
            subscriber.deliver(message)
