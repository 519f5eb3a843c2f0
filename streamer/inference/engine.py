"""Engines turn (frames, question) into streamed text.

:class:`Engine` is the interface the inference loop talks to, so a remote backend (an
OpenAI-compatible vLLM server) can stand beside :class:`TransformersEngine`, which runs
the model in this process. Engines are called from the inference loop's one thread.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamer.config import ModelConfig
from streamer.inference.loader import LoadedModel
from streamer.inference.video import processor_inputs

if TYPE_CHECKING:
    from streamer.inference.fastpath import Prefix, Window

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

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable]) -> bool:
        """Do one piece of work ahead of questions (e.g. encode a new frame pair); True if
        there was some. Called by the inference loop when it has nothing else to do."""
        return False


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


class TransformersEngine(Engine):
    """Runs Qwen2-VL in this process with transformers.

    Greedy video questions take the fast path (:mod:`streamer.inference.fastpath`): vision
    embeddings of frame pairs are computed once (ahead of questions when the loop is idle)
    and reused, and questions about the same window are decoded as one batch sharing the
    video prefix. Everything else (image mode, sampling, odd frame counts) goes through
    ``model.generate`` with the processor's inputs, as the reference pipeline does.
    """

    def __init__(self, loaded: LoadedModel, cfg: ModelConfig) -> None:
        from streamer.inference.fastpath import PrefixCache, VisionCache, VisionEncoder

        self.loaded = loaded
        self.cfg = cfg
        self.model_id = loaded.model_id
        self.note = loaded.note
        self.vision_cache = VisionCache(cfg.vision_cache_mb * 2**20)
        self.vision = VisionEncoder(loaded.model, loaded.processor, self.vision_cache, cfg.min_pixels, cfg.max_pixels)
        self.prefix_cache = PrefixCache(keep=cfg.prefix_cache_windows)
        self._window_seen: dict[str, tuple[Hashable, float]] = {}  # newest window per stream, since when
        self._last_prefill_s = 0.0
        tok = loaded.processor.tokenizer
        self._video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
        self._vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
        eos = loaded.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = loaded.model.generation_config.pad_token_id
        self._pad = pad if pad is not None else tok.pad_token_id or 0

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

    def _fast(self, request: GenerationRequest) -> bool:
        return (
            self.cfg.fast_path
            and request.mode == "video"
            and request.stream is not None
            and request.frame_ids is not None
            and not self.cfg.do_sample
            and self.cfg.repetition_penalty is None
        )

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
        first = requests[0]
        same_window = all(r.stream == first.stream and r.frame_ids == first.frame_ids for r in requests)
        if same_window and all(self._fast(r) for r in requests):
            results = self._generate_fast(requests, on_texts, should_stops)
            if results is not None:
                return results
        return [self._generate_plain(r, t, s) for r, t, s in zip(requests, on_texts, should_stops, strict=True)]

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable]) -> bool:
        """Encode the newest window's missing pairs one by one, then prefill its prompt prefix."""
        if not self.cfg.fast_path:
            return False
        n = len(frames) - len(frames) % 2
        frames, ids = frames[-n:], ids[-n:]
        if self.vision.warm(stream, frames, ids):
            return True
        pairs = self.vision.pair_keys(stream, frames, ids)
        if pairs is None:
            return False
        keys = tuple(key for _, key in pairs)
        if self._prefix_key(keys) in self.prefix_cache:
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
        self._prefix_of(window)
        self._last_prefill_s = time.monotonic() - started
        return True

    def _prefix_key(self, pair_keys: tuple[Hashable, ...]) -> Hashable:
        return (pair_keys, self.cfg.system_prompt)

    def _prefix_of(self, window: Window) -> Prefix:
        """The prefilled shared prefix of ``window``'s prompt (cached for recent windows)."""
        from streamer.inference.fastpath import prefill_prefix, split_prompt

        key = self._prefix_key(window.keys)
        prefix = self.prefix_cache.get(key)
        if prefix is None:
            head, _ = split_prompt(self._prompt_ids("?", window.embeds.shape[0]), self._vision_end)
            embeds = window.embeds.to(self.loaded.dtype)
            prefix = prefill_prefix(self.loaded.model, head, embeds, window.grid, self._video_pad)
            self.prefix_cache.put(key, prefix)
        return prefix

    def _prompt_ids(self, question: str, video_tokens: int) -> list[int]:
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
        from streamer.inference.fastpath import Row, decode_greedy, split_prompt

        first = requests[0]
        assert first.stream is not None and first.frame_ids is not None
        window = self.vision.window(first.stream, first.frames, first.frame_ids)
        if window is None:
            return None
        tokenizer = self.loaded.processor.tokenizer
        rows, decoders = [], []
        for request, on_text, should_stop in zip(requests, on_texts, should_stops, strict=True):
            _, suffix = split_prompt(self._prompt_ids(request.question, window.embeds.shape[0]), self._vision_end)
            decoder = IncrementalDecoder(tokenizer, on_text)
            decoders.append(decoder)
            rows.append(Row(suffix, request.max_new_tokens, lambda t, d=decoder: d.add([t]), should_stop, []))
        decode_greedy(self.loaded.model, self._prefix_of(window), rows, eos_ids=self._eos, pad_id=self._pad)
        return [
            GenerationResult(text=d.finish(), token_ids=r.tokens, stopped=r.stopped, first_token_at=r.first_token_at)
            for r, d in zip(rows, decoders, strict=True)
        ]

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
        with torch.inference_mode():
            self.loaded.model.generate(
                **inputs,
                **self.cfg.generation_kwargs(),
                max_new_tokens=request.max_new_tokens,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([stop]),
            )
        text = decoder.finish()
        return GenerationResult(
            text=text, token_ids=decoder.ids, stopped=stop.fired, first_token_at=streamer.first_token_at
        )
