"""Engines turn (frames, question) into streamed text.

:class:`Engine` is the interface the inference loop talks to, so a remote backend (an
OpenAI-compatible vLLM server) can stand beside :class:`TransformersEngine`, which runs
the model in this process. Engines are called from the inference loop's one thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamer.config import ModelConfig
from streamer.inference.loader import LoadedModel
from streamer.inference.questions import Sampling
from streamer.inference.video import processor_inputs

if TYPE_CHECKING:
    from streamer.inference.fastpath import Prefix, Row, Window

log = logging.getLogger(__name__)


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


class Engine(ABC):
    """Generates an answer, streaming text pieces as they are decided."""

    model_id: str
    #: A caveat users must see with every answer (e.g. "random weights"), or None.
    note: str | None = None

    @abstractmethod
    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        """Answer ``request``. ``on_text`` gets pieces whose concatenation is the final text;
        ``should_stop`` is polled between decode steps."""

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
    ) -> list[GenerationResult]:
        """Answer several requests about the same frames; by default one after another."""
        return [self.generate(r, t, s) for r, t, s in zip(requests, on_texts, should_stops, strict=True)]

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """Do one piece of work ahead of questions (e.g. encode a new frame pair); True if
        there was some. Called by the inference loop when it has nothing else to do."""
        return False

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


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: torch's (GPU) ``OutOfMemoryError``, or the
    ``RuntimeError`` its CPU allocator raises."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("DefaultCPUAllocator" in text or "not enough memory" in text)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that never need taking back.

    A piece is released only when the decoded text so far extends what was already
    released and does not end inside a multi-byte character (``\\ufffd``), so the pieces
    concatenate to exactly the final text.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._on_text = on_text
        self.ids: list[int] = []
        self.text = ""

    def _decoded(self) -> str:
        return self._tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> None:
        self.ids.extend(token_ids)
        full = self._decoded()
        if full.startswith(self.text) and not full.endswith("\ufffd"):
            self._release(full[len(self.text) :])

    def finish(self) -> str:
        full = self._decoded()
        if full.startswith(self.text):
            self._release(full[len(self.text) :])
        return self.text

    def _release(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._on_text(piece)


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


#: Model types the fast path reproduces ``generate`` for (their rope index and vision tower
#: are checked in ``tests/test_exactness.py``); others take the plain path.
FAST_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

#: Test-only fault injection: shift the M-RoPE positions of every question on the fast path by
#: this much, so a check of exactness (``streamer bench``) can be shown to fail.
_FAULT_SHIFT_ENV = "STREAMER_FAULT_SHIFT_POSITION"


class TransformersEngine(Engine):
    """Runs Qwen2-VL or Qwen2.5-VL in this process with transformers.

    Video questions take the fast path (:mod:`streamer.inference.fastpath`): vision
    embeddings of frame pairs are computed once (ahead of questions when the loop is idle)
    and reused, and questions about the same window are decoded as one batch sharing the
    video prefix, with what ``generate`` would do for each (settings merged as ``generate``
    merges them, processors and positions from transformers). Everything the fast path
    cannot reproduce (image mode, odd frame counts, beam search and other generation modes,
    other model types) goes through ``model.generate`` with the processor's inputs, as the
    reference pipeline does; each reason is logged once.
    """

    def __init__(self, loaded: LoadedModel, cfg: ModelConfig) -> None:
        import os

        from streamer.inference.fastpath import PrefixCache, VisionCache, VisionEncoder
        from streamer.inference.generation import merged_config, unsupported

        self.loaded = loaded
        self.cfg = cfg
        self.model_id = loaded.model_id
        self.note = loaded.note
        model = loaded.model
        self.vision_cache = VisionCache(cfg.vision_cache_mb * 2**20)
        self.vision = VisionEncoder(model, loaded.processor, self.vision_cache, cfg.min_pixels, cfg.max_pixels)
        self.prefix_cache = PrefixCache(keep=cfg.prefix_cache_windows, max_bytes=cfg.prefix_cache_mb * 2**20)
        self.batch_kv_limit = cfg.batch_kv_mb * 2**20
        self.batch_kv_bytes = 0
        self._window_seen: dict[str, tuple[Hashable, float]] = {}  # newest window per stream, since when
        self._last_prefill_s = 0.0
        self._second_per_grid: dict[float, Any] = {}
        self._reasons_logged: set[str] = set()
        tok = loaded.processor.tokenizer
        self._video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
        self._vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        self._overrides = cfg.generation_kwargs()
        self._generation = merged_config(model, self._overrides)
        self._fault_shift = int(os.environ.get(_FAULT_SHIFT_ENV) or 0)
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
            self._log_plain_once(self.fast_path_off)
        if self._generation.do_sample and cfg.seed is None:
            log.info("sampling without model.seed: answers are random, on the fast path as with generate")

    def _log_plain_once(self, reason: str) -> None:
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
            "batch_kv_bytes": self.batch_kv_bytes,
            "batch_kv_limit_bytes": self.batch_kv_limit,
        }

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

    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> GenerationResult:
        return self.generate_batch([request], [on_text], [should_stop])[0]

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
    ) -> list[GenerationResult]:
        """Answer requests; those about one window together on the fast path. An allocation
        failure frees the caches and is raised (the loop ends the batch with ``internal``)."""
        try:
            first = requests[0]
            same_window = all(r.stream == first.stream and r.frame_ids == first.frame_ids for r in requests)
            reason = next((why for r in requests if (why := self._plain_reason(r)) is not None), None)
            if same_window and reason is None:
                results = self._generate_fast(requests, on_texts, should_stops)
                if results is not None:
                    return results
            elif reason is not None and reason != self.fast_path_off:
                self._log_plain_once(reason)
            return [self._generate_plain(r, t, s) for r, t, s in zip(requests, on_texts, should_stops, strict=True)]
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
        """Encode the newest window's missing pairs one by one, then prefill its prompt prefix."""
        if self.fast_path_off is not None:
            return False
        n = len(frames) - len(frames) % 2
        frames, ids = frames[-n:], ids[-n:]
        if self.vision.warm(stream, frames, ids):
            return True
        pairs = self.vision.pair_keys(stream, frames, ids)
        if pairs is None:
            return False
        keys = tuple(key for _, key in pairs)
        if self._prefix_key(keys, sample_fps) in self.prefix_cache:
            return False
        # A prefill is only worth doing ahead if the window will still be the newest when it
        # is done: on a CPU a live stream slides faster than the model prefills, and a
        # question would then wait behind work it cannot use.
        now = time.monotonic()
        seen_keys, since = self._window_seen.get(stream, (None, now))
        if seen_keys != keys:
            self._window_seen[stream] = (keys, now)
            since = now
        if now - since < self._last_prefill_s:
            return False
        window = self.vision.window(stream, frames, ids)
        assert window is not None  # its pairs are all cached
        started = time.monotonic()
        self._prefix_of(window, sample_fps)
        self._last_prefill_s = time.monotonic() - started
        return True

    def _rope_kwargs(self, sample_fps: float) -> dict[str, Any]:
        """What the model's rope index needs besides the grid: for Qwen2.5-VL the seconds per
        temporal patch, taken from the processor's own output for this frame rate (the same
        call as :func:`processor_inputs`, on a small clip) so the positions equal its."""
        if sample_fps not in self._second_per_grid:
            blank = np.zeros((56, 56, 3), dtype=np.uint8)
            inputs = processor_inputs(
                self.loaded.processor,
                [blank, blank],
                "",
                sample_fps=sample_fps,
                min_pixels=self.cfg.min_pixels,
                max_pixels=self.cfg.max_pixels,
            )
            value = inputs.get("second_per_grid_ts")
            self._second_per_grid[sample_fps] = None if value is None else value.to(self.loaded.device)
        value = self._second_per_grid[sample_fps]
        return {} if value is None else {"second_per_grid_ts": value}

    def _prefix_key(self, pair_keys: tuple[Hashable, ...], sample_fps: float) -> Hashable:
        seconds = self._rope_kwargs(sample_fps).get("second_per_grid_ts")
        return (pair_keys, self.cfg.system_prompt, None if seconds is None else tuple(seconds.tolist()))

    def _prefix_of(self, window: Window, sample_fps: float) -> Prefix:
        """The prefilled shared prefix of ``window``'s prompt (cached for recent windows)."""
        from streamer.inference.fastpath import prefill_prefix, split_prompt

        key = self._prefix_key(window.keys, sample_fps)
        prefix = self.prefix_cache.get(key)
        if prefix is None:
            head, _ = split_prompt(self._prompt_ids("?", window.embeds.shape[0]), self._vision_end)
            embeds = window.embeds.to(self.loaded.dtype)
            prefix = prefill_prefix(
                self.loaded.model, head, embeds, window.grid, self._video_pad, self._rope_kwargs(sample_fps)
            )
            self.prefix_cache.put(key, prefix)
        return prefix

    def _prompt_ids(self, question: str, video_tokens: int) -> list[int]:
        """The whole prompt's token ids, the video's ``video_tokens`` placeholders included,
        as the processor builds them."""
        from streamer.inference.video import chat_messages

        processor = self.loaded.processor
        prompt = processor.apply_chat_template(
            chat_messages(question, self.cfg.system_prompt), add_generation_prompt=True, tokenize=False
        )
        ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        at = ids.index(self._video_pad)
        return ids[:at] + [self._video_pad] * video_tokens + ids[at + 1 :]

    def _generate_fast(
        self,
        requests: Sequence[GenerationRequest],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
    ) -> list[GenerationResult] | None:
        from streamer.inference.fastpath import Row, decode, rope_positions, split_prompt
        from streamer.inference.generation import row_decoding

        first = requests[0]
        assert first.stream is not None and first.frame_ids is not None
        window = self.vision.window(first.stream, first.frames, first.frame_ids)
        if window is None:
            self._log_plain_once("windows of an odd frame count, or whose frame size depends on their length")
            return None
        model = self.loaded.model
        device = self.loaded.device
        rope_kwargs = self._rope_kwargs(first.sample_fps)
        prefix = self._prefix_of(window, first.sample_fps)
        tokenizer = self.loaded.processor.tokenizer
        rows, decoders = [], []
        for request, on_text, should_stop in zip(requests, on_texts, should_stops, strict=True):
            ids = self._prompt_ids(request.question, window.embeds.shape[0])
            head, suffix = split_prompt(ids, self._vision_end)
            assert head == prefix.ids
            prompt = torch.tensor([ids], device=device)
            positions = rope_positions(model, prompt, window.grid, self._video_pad, rope_kwargs) + self._fault_shift
            decoder = IncrementalDecoder(tokenizer, on_text)
            decoders.append(decoder)
            rows.append(
                Row(
                    prompt=prompt,
                    suffix=suffix,
                    positions=positions[:, len(head) :],
                    # generate continues each position row from the prompt's last one.
                    next_position=positions[:, -1] + 1,
                    decoding=row_decoding(
                        model,
                        self._generation,
                        prompt,
                        max_new_tokens=request.max_new_tokens,
                        seed=self.cfg.seed,
                        tokenizer=tokenizer,
                    ),
                    on_token=lambda t, d=decoder: d.add([t]),
                    should_stop=should_stop,
                )
            )
        pad = self._generation.pad_token_id
        pad_id = pad if pad is not None else (tokenizer.pad_token_id or 0)
        new_tokens = [r.max_new_tokens for r in requests]
        for part in self._parts(prefix, rows, new_tokens):
            self.batch_kv_bytes = decode(model, prefix, part, pad_id=pad_id)
        return [
            GenerationResult(text=d.finish(), token_ids=r.tokens, stopped=r.stopped, first_token_at=r.first_token_at)
            for r, d in zip(rows, decoders, strict=True)
        ]

    def _parts(self, prefix: Prefix, rows: list[Row], new_tokens: list[int]) -> list[list[Row]]:
        """``rows`` cut into consecutive batches whose KV caches stay within
        ``model.batch_kv_mb`` (at least one question each: it needs what ``generate`` needs)."""
        from streamer.inference.fastpath import batch_kv_bytes

        parts: list[list[Row]] = []
        longest: list[int] = []  # per part: the most new tokens one of its rows may get
        for row, new in zip(rows, new_tokens, strict=True):
            if parts:
                trial = [*parts[-1], row]
                width = max(len(r.suffix) for r in trial)
                if batch_kv_bytes(prefix, len(trial), width, max(longest[-1], new)) <= self.batch_kv_limit:
                    parts[-1].append(row)
                    longest[-1] = max(longest[-1], new)
                    continue
            parts.append([row])
            longest.append(new)
        return parts

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
