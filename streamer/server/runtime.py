"""The running server's parts wired together: its streams, the engine, the inference loop,
the events hub and the ask service.

The CLI builds it, starts it and stops it; the app (:mod:`streamer.server.app`) and its
adapters read from it. Importing it imports no torch: the engine and the inference loop are
imported when they are started.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streamer import __version__
from streamer.capture import RingBuffer, Stream, StreamStatus, stream_for
from streamer.config import ModelConfig, Settings, SourceConfig
from streamer.inference.questions import StreamFeed
from streamer.inference.registry import create_engine, engine_backends, engine_memory
from streamer.service import AskService, EventHub, StreamChanged
from streamer.service.outlets import MqttOutlet, WebhookOutlet
from streamer.service.rules import RuleRunner
from streamer.service.storage import EventStore

if TYPE_CHECKING:
    from streamer.inference.engine import Engine
    from streamer.inference.loop import InferenceLoop

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.version = __version__
        #: Answers, alerts and stream status, for every subscriber.
        self.events = EventHub()
        self.service = AskService(settings, self.events, sources=self.source)
        self.captures: dict[str, Stream] = {s.name: stream_for(s, self._status_changed) for s in settings.sources}
        self.engine = engine
        self.loop: InferenceLoop | None = None
        self.started_at = time.time()
        #: Rules, stored events and their delivery, once :meth:`start_monitoring` ran.
        self.monitor: RuleRunner | None = None
        self.webhooks: list[WebhookOutlet] = []
        self.mqtt: MqttOutlet | None = None

    def start_capture(self) -> None:
        for capture in self.captures.values():
            capture.start()

    def load_engine(self, progress: Callable[[str], None] | None = None) -> Engine:
        """Load the configured engine (slow: seconds to minutes) unless one was given."""
        if self.engine is None:
            self.engine = create_engine(self.settings.model, progress)
        return self.engine

    def start_inference(self) -> None:
        from streamer.inference.loop import InferenceLoop

        engine = self.load_engine()
        feeds = {name: _feed(c) for name, c in self.captures.items()}
        model = self.settings.model
        self.loop = InferenceLoop(
            engine,
            feeds,
            queue_size=self.settings.server.queue_size,
            max_batch=model.max_batch if model.fast_path else 1,
            batch_window_s=model.batch_window_ms / 1000,
            batch_gap_s=model.batch_gap_ms / 1000,
            warm_frames=model.frames if model.fast_path and model.prewarm else 0,
            window_lag_s=model.window_lag_s,
            frame_stride=model.frame_stride,
            max_frame_stride=model.max_frame_stride,
        )
        self.loop.start()
        self.service.attach(self.loop)
        for capture in self.captures.values():
            _warn_if_short_of_stride(capture.cfg, model)

    def start_monitoring(self) -> None:
        """Open the event store, start the outlets and the rules (after :meth:`start_inference`).
        Raises ValueError when an outlet's settings cannot work (a secret that is not set)."""
        from streamer.server.previews import encode_preview

        events = self.settings.events
        store = EventStore(events.directory, max_age_days=events.max_age_days, max_count=events.max_count)
        self.webhooks = [WebhookOutlet(w, store) for w in events.webhooks]
        self.mqtt = MqttOutlet(events.mqtt) if events.mqtt is not None else None
        outlets = [*self.webhooks, *([self.mqtt] if self.mqtt else [])]
        width = events.thumbnail_width
        self.monitor = RuleRunner(
            self.service, store, rings=self.ring_of, encode=lambda f: encode_preview(f, width)[0], outlets=outlets
        )
        for outlet in outlets:
            outlet.start()
        self.monitor.start(self.settings.rules)
        for status in self.statuses():  # where each stream stands at start: the first status events
            self.events.publish(StreamChanged(status))
        log.info("monitoring: %d rule(s), events in %s", len(self.monitor.rules), store.path)

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        for outlet in [*self.webhooks, *([self.mqtt] if self.mqtt else [])]:
            outlet.stop()
        if self.loop is not None:
            self.loop.stop()
        for capture in self.captures.values():
            capture.stop()

    # -- streams -------------------------------------------------------------------------

    def add_source(self, cfg: SourceConfig) -> Stream:
        """Start serving a new stream (a pushed one: ``url: push``) while running."""
        if cfg.name in self.captures:
            raise ValueError(f"there is a stream named {cfg.name!r} already")
        stream = stream_for(cfg, self._status_changed)
        self.captures[cfg.name] = stream
        stream.start()
        if self.loop is not None:
            self.loop.add_stream(cfg.name, _feed(stream))
            _warn_if_short_of_stride(cfg, self.settings.model)
        return stream

    def remove_source(self, name: str) -> None:
        """Stop serving a stream: its open questions and watches end, its subscribers hear it is down."""
        stream = self.captures.pop(name)
        stream.stop()
        if self.loop is not None:
            self.loop.remove_stream(name)
        stream.health.set_state("down", "removed")

    def source(self, name: str) -> SourceConfig | None:
        stream = self.captures.get(name)
        return stream.cfg if stream is not None else None

    def ring_of(self, name: str) -> RingBuffer | None:
        stream = self.captures.get(name)
        return stream.ring if stream is not None else None

    def statuses(self) -> list[StreamStatus]:
        """Every stream's status, configured ones first, in order."""
        return [c.status() for c in list(self.captures.values())]

    def _status_changed(self, status: StreamStatus) -> None:  # on a capture thread
        self.events.publish(StreamChanged(status))

    # -- the model -----------------------------------------------------------------------

    @property
    def model_note(self) -> str | None:
        """The caveat users must see with every answer (e.g. random weights), once loaded."""
        return self.engine.note if self.engine is not None else None

    def model_memory(self) -> dict[str, int]:
        """Bytes held by the model: its weights, and on CUDA what the allocator holds."""
        return engine_memory(self.engine)

    def backend_statuses(self) -> list[dict[str, Any]] | None:
        """A remote engine's servers: state, requests, latency (``/healthz``, ``/metrics``);
        None for an engine in this process. Not in ``welcome``: clients need not see them."""
        return engine_backends(self.engine)


def _warn_if_short_of_stride(source: SourceConfig, model: ModelConfig) -> None:
    """Say so when a stream's ring buffer is too short for the largest frame stride its
    windows may take (the loop then lowers the stride to what the buffer holds)."""
    from streamer.inference.loop import window_span

    stride = model.max_frame_stride if model.frame_stride == "auto" else model.frame_stride
    needed = stride * window_span(model.frames)
    if stride > 1 and source.buffer_frames < needed:
        log.warning(
            "stream %s: buffer_frames %d holds %d-frame windows up to stride %d, not %d; set buffer_frames to %d",
            source.name,
            source.buffer_frames,
            model.frames,
            max(1, source.buffer_frames // window_span(model.frames)),
            stride,
            needed,
        )


def _feed(stream: Stream) -> StreamFeed:
    return StreamFeed(stream.ring, stream.cfg.sample_fps)
