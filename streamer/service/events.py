"""Events: what happens to questions and streams, published once, read by any number of
subscribers (WebSocket connections, metrics; storage, webhooks and MQTT next).

Guarantees:

- :meth:`EventHub.publish` never blocks and never waits on a subscriber, whatever thread
  it runs on (the inference thread, a capture thread, the event loop);
- each subscriber has its own bounded queue and sees the events it wants in the order they
  were published; a subscriber that lets its queue fill up is cut off (its queue is
  emptied, it gets nothing more, and its next :meth:`Subscription.drain` raises
  :class:`CutOff`); nobody else notices;
- a subscriber is woken (its ``wake`` is called, on the publishing thread, and must return
  at once) when its queue goes from empty to not empty, and once more when it is cut off;
  an asyncio subscriber's ``wake`` hands over to its event loop with ``call_soon_threadsafe``.
  A thread can instead block in :meth:`Subscription.wait`;
- subscribers that follow every owner are offered each event before the owner's own.

Which events a subscription gets: question events of its ``owner`` (every owner's when it
has none), of the ``kinds`` it names (every kind when none); ``StreamChanged`` of the streams
it follows (every stream's when it has no owner).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from streamer.capture import StreamStatus
from streamer.inference.questions import Answer, FrameSpan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuestionEvent:
    """Something happened to the question (or watch) ``id`` of ``owner``."""

    owner: Hashable
    id: str


@dataclass(frozen=True)
class Accepted(QuestionEvent):
    #: Questions that go before it (0: it runs now).
    position: int


@dataclass(frozen=True)
class Token(QuestionEvent):
    #: The next piece of the answer; the pieces concatenate to the answer's text.
    text: str


@dataclass(frozen=True)
class Answered(QuestionEvent):
    stream: str
    answer: Answer
    #: A round of a watch (the watch goes on) rather than an ask (which this ends).
    watch: bool = False

    @property
    def final(self) -> bool:
        return not self.watch


@dataclass(frozen=True)
class Alerted(QuestionEvent):
    """A watch round whose answer contains the watch's ``alert_contains``."""

    stream: str
    text: str
    frames: FrameSpan
    matched: str


@dataclass(frozen=True)
class Failed(QuestionEvent):
    code: str
    message: str
    #: The id is a watch's: ``final`` ends the watch, else one round failed and it goes on.
    watch: bool = False
    final: bool = True


@dataclass(frozen=True)
class StreamChanged:
    """A stream's status or error changed."""

    status: StreamStatus


Event = Accepted | Token | Answered | Alerted | Failed | StreamChanged


class CutOff(Exception):
    """The subscriber fell ``maxsize`` events behind and was dropped."""


class Subscription:
    """One subscriber's queue (see the module's guarantees). Made by :meth:`EventHub.subscribe`."""

    def __init__(
        self,
        hub: EventHub,
        *,
        owner: Hashable | None,
        kinds: tuple[type, ...] | None,
        maxsize: int,
        wake: Callable[[], None] | None,
        name: str,
    ) -> None:
        self.owner = owner
        self.kinds = kinds
        self.maxsize = maxsize
        self.name = name
        self._hub = hub
        self._wake = wake
        self._queue: deque[Event] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._streams: frozenset[str] = frozenset()
        self._closed = False
        self.cut_off = False

    def follow(self, stream: str) -> None:
        """Also get ``StreamChanged`` events of ``stream``."""
        self._streams = self._streams | {stream}

    def follows(self, stream: str) -> bool:
        return self.owner is None or stream in self._streams

    def drain(self) -> list[Event]:
        """Everything queued, oldest first, without waiting. Raises :class:`CutOff`."""
        with self._ready:
            if self.cut_off:
                raise CutOff(f"subscriber {self.name} fell {self.maxsize} events behind")
            events = list(self._queue)
            self._queue.clear()
            return events

    def wait(self, timeout: float) -> list[Event]:
        """Like :meth:`drain`, but first wait up to ``timeout`` seconds for an event (for threads)."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while not self._queue and not self._closed and (left := deadline - time.monotonic()) > 0:
                self._ready.wait(left)
        return self.drain()

    def close(self) -> None:
        """Unsubscribe: nothing more is queued."""
        with self._ready:
            self._closed = True
            self._queue.clear()
            self._ready.notify_all()
        self._hub._remove(self)

    def _offer(self, event: Event) -> None:
        if self.kinds is not None and not isinstance(event, self.kinds):
            return
        with self._ready:
            if self._closed:
                return
            overflow = len(self._queue) >= self.maxsize
            if overflow:
                self._queue.clear()
                self._closed = self.cut_off = True
            else:
                self._queue.append(event)
            wake = overflow or len(self._queue) == 1
            self._ready.notify_all()
        if overflow:
            log.warning("events: subscriber %s fell %d events behind and was cut off", self.name, self.maxsize)
            self._hub._remove(self)
        if wake and self._wake is not None:
            try:
                self._wake()
            except Exception:
                log.exception("events: waking subscriber %s failed", self.name)


class EventHub:
    """Where events are published once and fanned out to every subscriber that wants them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._everyone: list[Subscription] = []
        self._by_owner: dict[Hashable, list[Subscription]] = {}

    def subscribe(
        self,
        *,
        owner: Hashable | None = None,
        kinds: tuple[type, ...] | None = None,
        maxsize: int = 1000,
        wake: Callable[[], None] | None = None,
        name: str = "?",
    ) -> Subscription:
        """A new subscriber's queue: events of ``owner``'s questions (None: everyone's), of the
        ``kinds`` given (None: all), at most ``maxsize`` waiting."""
        sub = Subscription(self, owner=owner, kinds=kinds, maxsize=maxsize, wake=wake, name=name)
        with self._lock:
            if owner is None:
                self._everyone = [*self._everyone, sub]
            else:
                self._by_owner[owner] = [*self._by_owner.get(owner, []), sub]
        return sub

    def publish(self, event: Event) -> None:
        """Queue ``event`` for each subscriber that wants it; returns at once."""
        with self._lock:  # lists are replaced, never changed: iterate them outside the lock
            if isinstance(event, StreamChanged):
                targets = [s for subs in (self._everyone, *self._by_owner.values()) for s in subs]
                targets = [s for s in targets if s.follows(event.status.name)]
            else:
                targets = [*self._everyone, *self._by_owner.get(event.owner, ())]
        for sub in targets:
            sub._offer(event)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub.owner is None:
                self._everyone = [s for s in self._everyone if s is not sub]
                return
            rest = [s for s in self._by_owner.get(sub.owner, []) if s is not sub]
            if rest:
                self._by_owner[sub.owner] = rest
            else:
                self._by_owner.pop(sub.owner, None)
