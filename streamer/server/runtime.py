"""The running service: capture threads, the engine and the inference loop, wired together.

The server's handlers read from it; the CLI builds it, starts it and stops it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from streamer import __version__
from streamer.capture import CaptureThread, StreamStatus
from streamer.config import Settings
from streamer.inference.engine import Engine
from streamer.inference.scheduler import InferenceLoop, StreamFeed

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.version = __version__
        self._status_listeners: list[Callable[[StreamStatus], None]] = []
        self.captures: dict[str, CaptureThread] = {
            s.name: CaptureThread(s, on_status=self._status_changed) for s in settings.sources
        }
        self.engine = engine
        self.loop: InferenceLoop | None = None
        self.started_at = time.time()

    def start_capture(self) -> None:
        for capture in self.captures.values():
            capture.start()

    def load_engine(self, progress: Callable[[str], None] | None = None) -> Engine:
        """Load the configured model (slow: seconds to minutes) unless an engine was given."""
        if self.engine is None and self.settings.model.backend == "openai":
            from streamer.inference.remote import RemoteEngine

            self.engine = RemoteEngine(self.settings.model)
        if self.engine is None:
            from streamer.inference.engine import TransformersEngine
            from streamer.inference.loader import load_model

            self.engine = TransformersEngine(load_model(self.settings.model, progress), self.settings.model)
        return self.engine

    def start_inference(self) -> None:
        engine = self.load_engine()
        feeds = {name: StreamFeed(c.ring, c.cfg.sample_fps) for name, c in self.captures.items()}
        model = self.settings.model
        self.loop = InferenceLoop(
            engine,
            feeds,
            queue_size=self.settings.server.queue_size,
            max_batch=model.max_batch if model.fast_path else 1,
            batch_window_s=model.batch_window_ms / 1000,
            warm_frames=model.frames if model.fast_path and model.prewarm else 0,
        )
        self.loop.start()

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        for capture in self.captures.values():
            capture.stop()

    def add_status_listener(self, listener: Callable[[StreamStatus], None]) -> None:
        """Call ``listener`` (on a capture thread; it must return at once) on status changes."""
        self._status_listeners.append(listener)

    def _status_changed(self, status: StreamStatus) -> None:
        for listener in list(self._status_listeners):
            listener(status)

    def stream_objects(self) -> list[dict[str, Any]]:
        """PROTOCOL.md stream objects of every stream, in config order."""
        return [stream_object(c.status()) for c in self.captures.values()]

    def model_memory(self) -> dict[str, int]:
        """Bytes held by the model: its weights, and on CUDA what the allocator holds."""
        loaded = getattr(self.engine, "loaded", None)
        if loaded is None:
            return {}
        import torch

        model = loaded.model
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        out = {"weights": weights}
        if loaded.device.type == "cuda":
            out["cuda_allocated"] = torch.cuda.memory_allocated(loaded.device)
            out["cuda_reserved"] = torch.cuda.memory_reserved(loaded.device)
        return out

    def backend_statuses(self) -> list[dict[str, Any]] | None:
        """A remote engine's servers: state, requests, latency (``/healthz``, ``/metrics``);
        None for an engine in this process. Not in ``welcome``: clients need not see them."""
        statuses = getattr(self.engine, "backend_statuses", None)
        return statuses() if statuses is not None else None

    def model_info(self) -> dict[str, Any]:
        engine = self.engine
        return {"id": self.settings.model.id, "note": engine.note if engine else None}


def stream_object(st: StreamStatus) -> dict[str, Any]:
    """A PROTOCOL.md stream object, plus the documented extensions."""
    return {
        "id": st.name,
        "name": st.name,
        "status": st.status,
        "width": st.width,
        "height": st.height,
        "fps_in": st.fps_in,
        "fps_sampled": st.fps_sampled,
        "frames_buffered": st.frames_buffered,
        "last_seq": st.last_seq,
        "frames_dropped": st.frames_dropped,
        "reconnects": st.reconnects,
        "error": st.error,
    }


def stream_status_message(st: StreamStatus) -> dict[str, Any]:
    """A PROTOCOL.md ``stream_status`` message (``error`` only when there is one)."""
    return {
        "type": "stream_status",
        "stream": st.name,
        "status": st.status,
        "fps_in": st.fps_in,
        "fps_sampled": st.fps_sampled,
        "error": st.error,
        "frames_dropped": st.frames_dropped,
        "reconnects": st.reconnects,
    }
