"""The running service: capture threads, the engine and the inference loop, wired together.

The server's handlers read from it; the CLI builds it, starts it and stops it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from streamer import __version__
from streamer.capture import CaptureThread
from streamer.config import Settings
from streamer.inference.engine import Engine
from streamer.inference.scheduler import InferenceLoop, StreamFeed

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.version = __version__
        self.captures: dict[str, CaptureThread] = {s.name: CaptureThread(s) for s in settings.sources}
        self.engine = engine
        self.loop: InferenceLoop | None = None
        self.started_at = time.time()

    def start_capture(self) -> None:
        for capture in self.captures.values():
            capture.start()

    def load_engine(self, progress: Callable[[str], None] | None = None) -> Engine:
        """Load the configured model (slow: seconds to minutes) unless an engine was given."""
        if self.engine is None:
            from streamer.inference.engine import TransformersEngine
            from streamer.inference.loader import load_model

            self.engine = TransformersEngine(load_model(self.settings.model, progress), self.settings.model)
        return self.engine

    def start_inference(self) -> None:
        engine = self.load_engine()
        feeds = {name: StreamFeed(c.ring, c.cfg.sample_fps) for name, c in self.captures.items()}
        self.loop = InferenceLoop(engine, feeds, queue_size=self.settings.server.queue_size)
        self.loop.start()

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        for capture in self.captures.values():
            capture.stop()

    def stream_objects(self) -> list[dict[str, Any]]:
        """PROTOCOL.md stream objects (plus the ``last_seq`` extension)."""
        out = []
        for name, capture in self.captures.items():
            st = capture.status()
            out.append(
                {
                    "id": name,
                    "name": name,
                    "status": st.status,
                    "width": st.width,
                    "height": st.height,
                    "fps_in": st.fps_in,
                    "fps_sampled": st.fps_sampled,
                    "frames_buffered": st.frames_buffered,
                    "last_seq": st.last_seq,
                }
            )
        return out

    def model_info(self) -> dict[str, Any]:
        engine = self.engine
        return {"id": self.settings.model.id, "note": engine.note if engine else None}
