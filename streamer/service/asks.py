"""Asks and watches, for every adapter: admission, defaults, limits, and the fan-out of
their progress as events.

An adapter (the WebSocket connection, an HTTP endpoint, a rule runner) opens a
:class:`Session` with :meth:`AskService.session`, asks and watches through it, and reads
what happens from the session's :attr:`~Session.events`. The session is the owner the
inference loop knows and the sink it reports to: it turns each report into one event.

Guarantees:

- every ask ends with exactly one :class:`~streamer.service.events.Answered` (``final``)
  or :class:`~streamer.service.events.Failed` (``final``) event for its id, refusals by the
  session included; every watch ends with exactly one final ``Failed``;
- an id is open from the ask until that final event is published: a second ask or watch
  with an open id is refused with ``duplicate_id``;
- the prompt is the question after the stream's ``context``, when it has one;
- defaults come from the configuration: ``frames`` and ``max_new_tokens`` from the model,
  ``mode`` from the stream, then the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from streamer.config import Settings, SourceConfig
from streamer.inference.questions import (
    AlertIf,
    Answer,
    ErrorCode,
    Mode,
    Question,
    Rejected,
    RoundGate,
    Sampling,
    Watch,
)
from streamer.service.events import (
    Accepted,
    Alerted,
    Answered,
    EventHub,
    Failed,
    Subscription,
    Token,
)

log = logging.getLogger(__name__)

#: An adapter's own check before a question reaches the loop: None to let it through, or
#: the (code, message) it is refused with (a connection's rate limit).
Throttle = Callable[[], "tuple[str, str] | None"]
NOT_SERVING = ("shutting_down", "the server is not taking questions")


@dataclass(frozen=True)
class AskRequest:
    """What an asker wants to know; unset options take the configured defaults."""

    id: str
    stream: str
    question: str
    frames: int | None = None
    max_new_tokens: int | None = None
    mode: Mode | None = None
    #: Decoding settings over the configured ones (asks only; None: the configured ones).
    sampling: Sampling | None = None


@dataclass(frozen=True)
class WatchRequest(AskRequest):
    """A standing question, asked again every ``every_s`` seconds."""

    every_s: float = 60.0
    alert_contains: str | None = None
    alert_if: AlertIf | None = None
    gate: RoundGate | None = None


class QuestionLoop(Protocol):
    """What the service needs of the inference loop (:class:`~streamer.inference.loop.InferenceLoop`)."""

    def submit(self, q: Question) -> int: ...
    def add_watch(self, w: Watch) -> object: ...
    def cancel(self, owner: Hashable, question_id: str) -> bool: ...
    def cancel_owner(self, owner: Hashable) -> int: ...
    def stop(self, timeout: float = ..., finish_running_within: float = ...) -> None: ...


class AskService:
    """Asks and watches on the one inference loop, with the configured defaults; progress
    goes out through ``events``. Questions are refused until :meth:`attach` gives it a loop
    and again once :meth:`shutdown` starts."""

    def __init__(
        self, settings: Settings, events: EventHub, sources: Callable[[str], SourceConfig | None] | None = None
    ) -> None:
        """``sources``: a stream's config by name, for streams added while running (default:
        the configured ones)."""
        self.settings = settings
        self.events = events
        self._source = sources or settings.source
        self.loop: QuestionLoop | None = None
        self.shutting_down = False

    @property
    def serving(self) -> bool:
        return self.loop is not None and not self.shutting_down

    def attach(self, loop: QuestionLoop) -> None:
        self.loop = loop

    def shutdown(self, finish_running_within: float = 0.0) -> None:
        """Take no new questions; end the open ones (the running one may finish within the
        deadline) with ``shutting_down``. Blocks: call it off the event loop."""
        self.shutting_down = True
        if self.loop is not None:
            self.loop.stop(finish_running_within=finish_running_within)

    def session(
        self,
        name: str,
        *,
        max_open: int,
        throttle: Throttle | None = None,
        maxsize: int = 1000,
        wake: Callable[[], None] | None = None,
    ) -> Session:
        """A new asker: at most ``max_open`` asks and watches open at once, its events in a
        queue of ``maxsize`` (see :class:`~streamer.service.events.Subscription`)."""
        return Session(self, name, max_open=max_open, throttle=throttle, maxsize=maxsize, wake=wake)

    def prompt(self, request: AskRequest) -> str:
        """The question as the model gets it: after the stream's ``context`` when it has one."""
        source = self._source(request.stream)
        if source is not None and source.context:
            return f"{source.context.strip()}\n{request.question}"
        return request.question

    def defaults(self, request: AskRequest) -> tuple[int, int, Mode]:
        """``frames``, ``max_new_tokens`` and ``mode`` for ``request``: its own, else the
        configured ones (the mode: the stream's, else the model's)."""
        model = self.settings.model
        source = self._source(request.stream)
        mode = request.mode or (source.mode if source is not None else None) or model.mode
        return request.frames or model.frames, request.max_new_tokens or model.max_new_tokens, mode


class Session:
    """One asker's questions: the owner the loop knows, and the sink of their progress.

    ``ask``/``watch``/``cancel``/``close`` may be called from any one thread at a time; the
    sink methods run on the inference thread (see :class:`~streamer.inference.questions.AnswerSink`).
    """

    def __init__(
        self,
        service: AskService,
        name: str,
        *,
        max_open: int,
        throttle: Throttle | None,
        maxsize: int,
        wake: Callable[[], None] | None,
    ) -> None:
        self.service = service
        self.name = name
        self.max_open = max_open
        self._throttle = throttle
        self._open: set[str] = set()
        self._lock = threading.Lock()
        #: This session's events: its questions' progress, and the streams it follows.
        self.events: Subscription = service.events.subscribe(owner=self, maxsize=maxsize, wake=wake, name=name)

    def __repr__(self) -> str:
        return f"Session({self.name!r})"

    # -- asking --------------------------------------------------------------------------

    def ask(self, request: AskRequest) -> None:
        """Ask once; the outcome arrives as events."""
        loop = self._open_or_refuse(request)
        if loop is None:
            return
        try:
            loop.submit(Question(**self._question_fields(request), sampling=request.sampling))
        except Rejected as err:  # ended through on_error already
            log.info("%s: question %s refused: %s", self.name, request.id, err.code)

    def watch(self, request: WatchRequest) -> None:
        """Start a standing question; its rounds, alerts and end arrive as events."""
        loop = self._open_or_refuse(request)
        if loop is None:
            return
        fields = self._question_fields(request)
        try:
            loop.add_watch(
                Watch(
                    **fields,
                    every_s=request.every_s,
                    alert_contains=request.alert_contains,
                    alert_if=request.alert_if,
                    gate=request.gate,
                )
            )
        except Rejected as err:  # ended through on_watch_end already
            log.info("%s: watch %s refused: %s", self.name, request.id, err.code)

    def _question_fields(self, request: AskRequest) -> dict[str, Any]:
        """What a Question and a Watch share: the request with the defaults filled in, and
        this session as owner and sink."""
        frames, max_new_tokens, mode = self.service.defaults(request)
        return {
            "id": request.id,
            "stream": request.stream,
            "text": self.service.prompt(request),
            "owner": self,
            "sink": self,
            "frames": frames,
            "max_new_tokens": max_new_tokens,
            "mode": mode,
        }

    def _refusal(self, qid: str) -> tuple[str, str] | None:
        """Why a new ask or watch with ``qid`` is refused, before any throttle (None: it is not)."""
        if not self.service.serving:
            return NOT_SERVING
        with self._lock:
            if qid in self._open:
                return "duplicate_id", f"question {qid!r} is still open"
            if len(self._open) >= self.max_open:
                return "busy", f"this connection has {self.max_open} questions open already"
        return None

    def _open_or_refuse(self, request: AskRequest) -> QuestionLoop | None:
        """The loop to hand ``request`` to, with its id now open; None when it was refused
        (and its one final event published)."""
        refused = self._refusal(request.id) or (self._throttle() if self._throttle is not None else None)
        loop = self.service.loop
        if refused is None and loop is not None:
            with self._lock:
                self._open.add(request.id)
            return loop
        code, message = refused or NOT_SERVING
        log.info("%s: %s refused: %s", self.name, request.id, code)
        watch = isinstance(request, WatchRequest)
        self.service.events.publish(Failed(self, request.id, code, message, watch=watch))
        return None

    def cancel(self, qid: str) -> bool:
        """Cancel an open ask or end a watch; False when this session has none with ``qid``."""
        loop = self.service.loop
        return loop is not None and loop.cancel(self, qid)

    def close(self) -> None:
        """The asker is gone: cancel everything it has open and stop its events."""
        self.events.close()
        if self.service.loop is not None:
            self.service.loop.cancel_owner(self)

    # -- the loop's reports (AnswerSink, WatchSink) ---------------------------------------

    def _publish(self, event: Accepted | Token | Answered | Alerted | Failed) -> None:
        if isinstance(event, Answered | Failed) and event.final:
            with self._lock:
                self._open.discard(event.id)
        self.service.events.publish(event)

    def on_accepted(self, q: Question, position: int) -> None:
        self._publish(Accepted(self, q.id, position))

    def on_watch_accepted(self, w: Watch, position: int) -> None:
        self._publish(Accepted(self, w.id, position))

    def on_text(self, q: Question, text: str) -> None:
        self._publish(Token(self, q.id, text))

    def on_answer(self, q: Question, answer: Answer) -> None:
        self._publish(Answered(self, q.id, q.stream, answer, watch=q.watch is not None))
        if answer.matched is not None:
            self._publish(Alerted(self, q.id, q.stream, answer.text, answer.frames, answer.matched))

    def on_error(self, q: Question, code: ErrorCode, message: str) -> None:
        round_of_watch = q.watch is not None  # one round failed; the watch goes on
        self._publish(Failed(self, q.id, code, message, watch=round_of_watch, final=not round_of_watch))

    def on_watch_end(self, w: Watch, code: ErrorCode, message: str) -> None:
        self._publish(Failed(self, w.id, code, message, watch=True, final=True))
