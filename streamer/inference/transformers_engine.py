"""The model in this process, with transformers: :class:`TransformersEngine`.

Video questions take the fast path (:class:`~streamer.inference.fastrunner.FastRunner`);
everything else goes through ``model.generate`` with the processor's inputs, as the
reference pipeline does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from streamer.config import ModelConfig
from streamer.inference.cpu_linear import route_few_row_linears
from streamer.inference.engine import Engine, GenerationRequest, GenerationResult, Joiner, Readiness
from streamer.inference.fastrunner import FastRunner, IncrementalDecoder
from streamer.inference.loader import LoadedModel
from streamer.inference.questions import Sampling
from streamer.inference.video import processor_inputs

log = logging.getLogger(__name__)

#: Model types the fast path reproduces ``generate`` for (their rope index and vision tower
#: are checked in ``tests/test_exactness.py``); others take the plain path.
FAST_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

#: Test-only fault injection: shift the M-RoPE positions of every question on the fast path by
#: this much, so a check of exactness (``streamer bench``) can be shown to fail.
_FAULT_SHIFT_ENV = "STREAMER_FAULT_SHIFT_POSITION"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: torch's (GPU) ``OutOfMemoryError``, or the
    ``RuntimeError`` its CPU allocator raises."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("DefaultCPUAllocator" in text or "not enough memory" in text)


class _StreamerAdapter:
    """The ``streamer=`` object ``generate`` calls with each new token (prompt first)."""

    def __init__(self, decoder: IncrementalDecoder) -> None:
        self._decoder = decoder
        self._prompt_seen = False
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._decoder.add(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _StopWhen:
    """A stopping criterion that asks ``should_stop`` after every decode step."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._should_stop = should_stop
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.fired = self.fired or self._should_stop()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class TransformersEngine(Engine):
    """Runs Qwen2-VL or Qwen2.5-VL in this process with transformers.

    Video questions take the fast path (:class:`~streamer.inference.fastrunner.FastRunner`):
    vision embeddings of frame pairs are computed once (ahead of questions when the loop is
    idle) and reused, and questions about the same window are decoded as one batch sharing
    the video prefix, with what ``generate`` would do for each. Everything the fast path
    cannot reproduce (image mode, odd frame counts, beam search and other generation modes,
    other model types) goes through ``model.generate`` with the processor's inputs, as the
    reference pipeline does; each reason is logged once.
    """

    def __init__(self, loaded: LoadedModel, cfg: ModelConfig) -> None:
        from streamer.inference.fastpath import PrefixCache, VisionCache, VisionEncoder
        from streamer.inference.generation import merged_config, unsupported

        self.loaded = loaded
        self.cfg = cfg
        self.model_id = loaded.model_id
        self.note = loaded.note
        model = loaded.model
        if loaded.device.type == "cpu" and cfg.onednn_few_rows:
            route_few_row_linears(model)
        self.vision_cache = VisionCache(cfg.vision_cache_mb * 2**20)
        self.vision = VisionEncoder(model, loaded.processor, self.vision_cache, cfg.min_pixels, cfg.max_pixels)
        self.prefix_cache = PrefixCache(keep=cfg.prefix_cache_windows, max_bytes=cfg.prefix_cache_mb * 2**20)
        self._reasons_logged: set[str] = set()
        self._overrides = cfg.generation_kwargs()
        self._generation = merged_config(model, self._overrides)
        #: The fast path's planning and decoding (its caches are the engine's).
        self.fast = FastRunner(
            loaded,
            cfg,
            self.vision,
            self.prefix_cache,
            self._generation,
            fault_shift=int(os.environ.get(_FAULT_SHIFT_ENV) or 0),
        )
        model_type = model.config.model_type
        #: Why no question takes the fast path, or None when they may.
        self.fast_path_off: str | None = None
        if not cfg.fast_path:
            self.fast_path_off = "model.fast_path is false"
        elif model_type not in FAST_MODEL_TYPES:
            self.fast_path_off = (
                f"model type {model_type!r} is not one the fast path reproduces ({', '.join(FAST_MODEL_TYPES)})"
            )
        elif (reason := unsupported(self._generation)) is not None:
            self.fast_path_off = reason
        if self.fast_path_off is not None and cfg.fast_path:
            self.log_plain_once(self.fast_path_off)
        if self._generation.do_sample and cfg.seed is None:
            log.info("sampling without model.seed: answers are random, on the fast path as with generate")

    def log_plain_once(self, reason: str) -> None:
        if reason not in self._reasons_logged:
            self._reasons_logged.add(reason)
            log.info("questions take the plain generate path: %s", reason)

    def stats(self) -> dict[str, int]:
        return {
            "vision_cache_entries": len(self.vision_cache),
            "vision_cache_bytes": self.vision_cache.bytes,
            "vision_cache_limit_bytes": self.vision_cache.max_bytes,
            "vision_cache_hits": self.vision_cache.hits,
            "vision_cache_misses": self.vision_cache.misses,
            "prefix_cache_entries": len(self.prefix_cache),
            "prefix_cache_bytes": self.prefix_cache.bytes,
            "prefix_cache_limit_bytes": self.prefix_cache.max_bytes,
            "batch_kv_bytes": self.fast.batch_kv_bytes,
            "batch_kv_limit_bytes": self.fast.batch_kv_limit,
        }

    def describe_failure(self, err: BaseException) -> str | None:
        if not is_out_of_memory(err):  # generate_batch has freed what it could
            return None
        where = "GPU memory" if isinstance(err, torch.OutOfMemoryError) else "memory"
        return f"inference ran out of {where}; try fewer frames or a smaller max_pixels"

    def prepare(self, request: GenerationRequest) -> Any:
        inputs = processor_inputs(
            self.loaded.processor,
            request.frames,
            request.question,
            sample_fps=request.sample_fps,
            min_pixels=self.cfg.min_pixels,
            max_pixels=self.cfg.max_pixels,
            system_prompt=self.cfg.system_prompt,
            mode=request.mode,
        )
        inputs = inputs.to(self.loaded.device)
        for key in ("pixel_values_videos", "pixel_values"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.loaded.dtype)
        return inputs

    def _plain_reason(self, request: GenerationRequest) -> str | None:
        """Why ``request`` takes the plain path, or None if the fast path may take it."""
        if self.fast_path_off is not None:
            return self.fast_path_off
        if request.mode != "video":
            return "image questions"
        if request.stream is None or request.frame_ids is None:
            return "requests without frame identities"
        if request.sampling is not None:
            return "questions with their own sampling settings"
        return None

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
        *,
        on_results: Sequence[Callable[[GenerationResult], None]] | None = None,
        joiners: Callable[[int], list[Joiner]] | None = None,
    ) -> list[GenerationResult]:
        """Answer requests; those about one window together on the fast path, where each
        result goes out the step it ends and ``joiners`` join between steps. An allocation
        failure frees the caches and is raised (the loop ends the batch with ``internal``,
        saying :meth:`describe_failure`)."""
        try:
            first = requests[0]
            same_window = all(r.stream == first.stream and r.frame_ids == first.frame_ids for r in requests)
            reason = next((why for r in requests if (why := self._plain_reason(r)) is not None), None)
            if same_window and reason is None:
                results = self.fast.generate(requests, on_texts, should_stops, on_results, joiners)
                if results is not None:
                    return results
                self.log_plain_once("windows of an odd frame count, or whose frame size depends on their length")
            elif reason is not None and reason != self.fast_path_off:
                self.log_plain_once(reason)
            results = []
            for i, (r, t, s) in enumerate(zip(requests, on_texts, should_stops, strict=True)):
                results.append(self._generate_plain(r, t, s))
                if on_results is not None:
                    on_results[i](results[-1])
            return results
        except Exception as err:
            if is_out_of_memory(err):
                self.free_memory()
            raise

    def free_memory(self) -> None:
        """Drop the prefilled prefixes (the largest cache) and return freed GPU memory."""
        import gc

        log.warning("out of memory: dropping %d prefilled prefixes", len(self.prefix_cache))
        self.prefix_cache.clear()
        gc.collect()
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """One piece of preparing the window: a missing pair, else one step (a decoder layer) of its prefill."""
        if self.fast_path_off is not None:
            return False
        return self.fast.warm(stream, frames, ids, sample_fps)

    def warm_ahead(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """One step (a decoder layer) of the next window's prefill, up to its newest pair's tokens."""
        if self.fast_path_off is not None:
            return False
        return self.fast.warm_ahead(stream, frames, ids, sample_fps)

    def readiness(
        self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float
    ) -> Readiness | None:
        if self.fast_path_off is not None:
            return None
        return self.fast.readiness(stream, frames, ids, sample_fps)

    def _generate_plain(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        from transformers import StoppingCriteriaList

        inputs = self.prepare(request)
        decoder = IncrementalDecoder(self.loaded.processor.tokenizer, on_text)
        streamer = _StreamerAdapter(decoder)
        stop = _StopWhen(should_stop)
        overrides = {**self._overrides, **(request.sampling.generate_kwargs() if request.sampling else {})}
        with torch.inference_mode(), self._seeded(request.sampling):
            self.loaded.model.generate(
                **inputs,
                **overrides,
                max_new_tokens=request.max_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([stop]),
                tokenizer=self.loaded.processor.tokenizer,
            )
        text = decoder.finish()
        return GenerationResult(
            text=text, token_ids=decoder.ids, stopped=stop.fired, first_token_at=streamer.first_token_at
        )

    def _seeded(self, sampling: Sampling | None = None) -> contextlib.AbstractContextManager:
        """Around ``generate``: torch's random numbers seeded with the question's seed, else
        ``model.seed``, when it samples (the global generator's state is restored after), else nothing."""
        seed = sampling.seed if sampling is not None and sampling.seed is not None else self.cfg.seed
        do_sample = (sampling.generate_kwargs() if sampling else {}).get("do_sample", self._generation.do_sample)
        if seed is None or not do_sample:
            return contextlib.nullcontext()
        return _seeded(seed, self.loaded.device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
