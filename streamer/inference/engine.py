"""Engines turn (frames, question) into streamed text.

:class:`Engine` is the interface the inference loop talks to, so a remote backend (an
OpenAI-compatible vLLM server) can stand beside :class:`TransformersEngine`, which runs
the model in this process. Engines are called from the inference loop's one thread.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamer.config import ModelConfig
from streamer.inference.loader import LoadedModel
from streamer.inference.video import processor_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    frames: Sequence[np.ndarray]
    question: str
    max_new_tokens: int
    sample_fps: float
    #: "video": the frames as one video; "image": the last frame as an image.
    mode: str = "video"


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
    """Runs Qwen2-VL in this process with transformers' ``generate`` (greedy by default)."""

    def __init__(self, loaded: LoadedModel, cfg: ModelConfig) -> None:
        self.loaded = loaded
        self.cfg = cfg
        self.model_id = loaded.model_id
        self.note = loaded.note

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

    def generate(
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
