"""Engines turn (frames, question) into streamed text: the interface, without torch.

:class:`Engine` is the interface the inference loop talks to, so a remote backend (an
OpenAI-compatible vLLM server, :mod:`streamer.inference.remote`) can stand beside the
transformers engine (:mod:`streamer.inference.engines.transformers`), which runs the model
in this process. Engines are called from the inference loop's one thread. Importing this
module imports no torch (``tests/test_imports.py``).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from streamer.inference.questions import Sampling


@dataclass(frozen=True)
class GenerationRequest:
    frames: Sequence[np.ndarray]
    question: str
    max_new_tokens: int
    sample_fps: float
    #: "video": the frames as one video; "image": the last frame as an image.
    mode: str = "video"
    #: Where the frames come from: the stream and an identity per frame that no other frame
    #: of that stream shares (the loop uses (seq, capture time)). Lets an engine reuse work.
    stream: str | None = None
    frame_ids: tuple[Hashable, ...] | None = None
    #: This question's decoding settings over the configured ones (None: the configured ones).
    sampling: Sampling | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    #: True when generation was stopped early by ``should_stop``.
    stopped: bool
    first_token_at: float | None  # time.monotonic() of the first generated token


@dataclass(frozen=True)
class Joiner:
    """A question that joins a running batch about the same window (continuous batching)."""

    request: GenerationRequest
    on_text: Callable[[str], None]
    should_stop: Callable[[], bool]
    #: Gets its result the step it ends.
    on_result: Callable[[GenerationResult], None]


@dataclass(frozen=True)
class Readiness:
    """How much of a window's work is done ahead of questions."""

    #: Frame pairs whose vision embeddings are not computed yet.
    missing_pairs: int
    #: Whether the prompt's shared prefix (system prompt and video) is prefilled.
    prefix_ready: bool
    #: Seconds the prefix's prefill still needs, at the speed measured on this machine (None:
    #: not measured yet); what was begun ahead counts as done.
    prefill_left_s: float | None = None
    #: Seconds the prefix's whole prefill takes at that speed, begun or not (None: not measured
    #: yet): a new pair's cost to the loop, with its encoding (:class:`StrideGovernor`).
    prefill_s: float | None = None


class Engine(ABC):
    """Generates an answer, streaming text pieces as they are decided."""

    model_id: str
    #: A caveat users must see with every answer (e.g. "random weights"), or None.
    note: str | None = None

    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        """Answer ``request``. ``on_text`` gets pieces whose concatenation is the final text;
        ``should_stop`` is polled between decode steps. An engine overrides this or
        :meth:`generate_batch` (each defaults to the other)."""
        if type(self).generate_batch is Engine.generate_batch:
            raise NotImplementedError(f"{type(self).__name__} overrides neither generate nor generate_batch")
        return self.generate_batch([request], [on_text], [should_stop])[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
        *,
        on_results: Sequence[Callable[[GenerationResult], None]] | None = None,
        joiners: Callable[[int], list[Joiner]] | None = None,
    ) -> list[GenerationResult]:
        """Answer several requests about the same frames; by default one after another.

        ``on_results[i]`` gets request i's result as soon as it is decided (before the
        others end, where the engine can). ``joiners(room)``, which an engine that batches
        continuously polls between decode steps, hands over up to ``room`` new questions
        about the same frames; their results go only to their own ``on_result``. An engine
        that never polls it leaves them to the loop's next batch."""
        results = []
        for i, (r, t, s) in enumerate(zip(requests, on_texts, should_stops, strict=True)):
            results.append(self.generate(r, t, s))
            if on_results is not None:
                on_results[i](results[-1])
        return results

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """Do one piece of work ahead of questions (encode a frame pair, one step of a prefill);
        True if there was some. Called by the inference loop when it has nothing else to do,
        which looks for questions between calls: a piece should be short."""
        return False

    def warm_ahead(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """Do one piece of the next window's work before its newest frames exist (the window
        that drops ``frames``' oldest pair and adds the stream's next one); True if there was
        some. Called like :meth:`warm`, once the current window is ready."""
        return False

    def readiness(
        self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float
    ) -> Readiness | None:
        """How prepared the window ``frames`` is; None when the engine prepares nothing
        ahead (the loop then always takes the newest frames)."""
        return None

    def describe_failure(self, err: BaseException) -> str | None:
        """What to tell users when ``err`` ended a batch, for failures this engine knows (an
        allocation failure, after freeing what it could); None for the loop's generic message."""
        return None

    def stats(self) -> dict[str, int]:
        """Figures for ``/metrics``, by name (see :data:`ENGINE_STATS`); those an engine does
        not have are absent."""
        return {}


#: What :meth:`Engine.stats` may report: name -> (kind, help). Counters only grow.
ENGINE_STATS: dict[str, tuple[str, str]] = {
    "vision_cache_entries": ("gauge", "Frame pairs with cached embeddings"),
    "vision_cache_bytes": ("gauge", "Memory of cached embeddings"),
    "vision_cache_limit_bytes": ("gauge", "Bound on the memory of cached embeddings (model.vision_cache_mb)"),
    "vision_cache_hits": ("counter", "Pair lookups that found the pair encoded"),
    "vision_cache_misses": ("counter", "Pair lookups that had to encode the pair"),
    "prefix_cache_entries": ("gauge", "Windows with a prefilled prompt prefix"),
    "prefix_cache_bytes": ("gauge", "Memory of the prefilled prefixes' KV caches"),
    "prefix_cache_limit_bytes": ("gauge", "Bound on the prefixes' KV caches (model.prefix_cache_mb)"),
    "batch_kv_bytes": ("gauge", "KV cache memory of the last batch decoded on the fast path"),
    "batch_kv_limit_bytes": ("gauge", "Bound on one batch's KV caches (model.batch_kv_mb)"),
    "jpeg_cache_entries": ("gauge", "Frames with a kept JPEG encoding (remote engine)"),
    "jpeg_cache_bytes": ("gauge", "Memory of the kept JPEG encodings (base64)"),
    "jpeg_cache_limit_bytes": ("gauge", "Bound on the kept JPEG encodings (model.jpeg_cache_mb)"),
    "jpeg_cache_hits": ("counter", "Frames sent with their kept JPEG encoding"),
    "jpeg_cache_misses": ("counter", "Frames that had to be JPEG-encoded"),
}
