"""The fast path's planning and decoding for the transformers engine.

:class:`FastRunner` turns requests about one window into rows that share the window's
prefilled prompt prefix (:mod:`streamer.inference.fastpath`), each with what ``generate``
would do for it (:mod:`streamer.inference.generation`); its base :class:`WindowPrefixes`
builds the prompts, prefills the shared prefixes and prepares windows ahead of questions.
Called from the inference loop's one thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch

from streamer.config import ModelConfig
from streamer.inference import fastpath
from streamer.inference.engine import GenerationRequest, GenerationResult, Joiner, Readiness
from streamer.inference.fastpath import (
    PairKey,
    Prefix,
    PrefixCache,
    PrefixPrefill,
    Row,
    Tail,
    VisionEncoder,
    Window,
    batch_kv_bytes,
    rope_positions,
    split_prompt,
)
from streamer.inference.generation import row_decoding
from streamer.inference.loader import LoadedModel
from streamer.inference.video import chat_messages, processor_inputs

log = logging.getLogger(__name__)


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


class WindowPrefixes:
    """Owns a window's prompt and its prefilled shared prefix: the prompt's token ids, the
    rope index's extra arguments, the prefix cache key, the layer-stepped prefill (resumed across
    calls), and preparing windows ahead of questions (:meth:`warm`, :meth:`readiness`).
    :class:`FastRunner` builds on it to decode the rows that share a prefix."""

    def __init__(self, loaded: LoadedModel, cfg: ModelConfig, vision: VisionEncoder, prefix_cache: PrefixCache) -> None:
        self.loaded = loaded
        self.cfg = cfg
        self.vision = vision
        self.prefix_cache = prefix_cache
        #: Prefills under way (resumed by the next warm step or question about their window).
        self.prefills: dict[Hashable, PrefixPrefill] = {}
        #: Per stream, the next window's prefill begun before its newest pair exists
        #: (:meth:`warm_ahead`): the pairs it starts with, and the prefill.
        self.ahead: dict[str, tuple[Hashable, PrefixPrefill]] = {}
        self._second_per_grid: dict[float, Any] = {}
        #: Seconds per token through one decoder layer in prefills here (exponential average
        #: of the steps' times; None before the first): the time a prefill still needs.
        self.token_layer_s: float | None = None
        self._layers = len(loaded.model.model.language_model.layers)
        self._prefix_ids: dict[int, list[int]] = {}
        tok = loaded.processor.tokenizer
        self.video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
        self._vision_end = tok.convert_tokens_to_ids("<|vision_end|>")

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """One piece of the window's work: its newest missing pair, else one step of its
        prefill (a decoder layer); False when it is ready (or cannot take the fast path)."""
        n = len(frames) - len(frames) % 2
        frames, ids = frames[-n:], ids[-n:]
        if self.vision.warm(stream, frames, ids):
            return True
        pairs = self.vision.pair_keys(stream, frames, ids)
        if pairs is None:
            return False
        keys = tuple(key for _, key in pairs)
        if self.prefix_key(keys, sample_fps) in self.prefix_cache:
            return False
        window = self.vision.window(stream, frames, ids)
        assert window is not None  # its pairs are all cached
        self.prefix_of(window, sample_fps, steps=1)
        return True

    def warm_ahead(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """One step of the next window's prefill, before its newest pair exists: the window
        that drops this one's oldest pair and adds the next pair (on a grid of frame pairs,
        the window a live stream shows next). Its prompt and positions are this window's
        (same frame count and size); its video embeddings but the last pair's are this
        window's newer pairs', so the prefill runs up to where the new pair's tokens start.
        When that window comes, :meth:`prefix_of` hands its last pair over and goes on from
        there. False when there is nothing to do: this window is not fully encoded, or the
        prefill ahead is as far as it can go."""
        n = len(frames) - len(frames) % 2
        frames, ids = frames[-n:], ids[-n:]
        pairs = self.vision.pair_keys(stream, frames, ids)
        if pairs is None or len(pairs) < 2 or any(key not in self.vision.cache for _, key in pairs):
            return False
        # The pairs it starts with (their keys hold the frame size) and the frame rate.
        key = (tuple(key for _, key in pairs[1:]), self.prefix_key((), sample_fps))
        known, run = self.ahead.get(stream, (None, None))
        if run is None or known != key:
            window = self.vision.window(stream, frames, ids)
            assert window is not None
            rows = window.embeds.shape[0] // len(pairs)  # video tokens per pair
            run = PrefixPrefill(
                self.loaded.model,
                self.prefix_ids(window.embeds.shape[0]),
                window.embeds[rows:].to(self.loaded.dtype),
                window.grid,
                self.video_pad,
                self.rope_kwargs(sample_fps),
                chunk_tokens=self.cfg.prefill_chunk_tokens,
            )
            self.ahead[stream] = (key, run)
        if run.blocked or run.prefix is not None:
            return False
        self._step(run)
        return True

    def _step(self, run: PrefixPrefill) -> bool:
        """One step of ``run`` (:meth:`PrefixPrefill.step`), timed for :attr:`token_layer_s`."""
        before, _ = run.work
        started = time.perf_counter()
        done = run.step()
        after, _ = run.work
        if after > before:
            seconds = (time.perf_counter() - started) / (after - before)
            old = self.token_layer_s
            self.token_layer_s = seconds if old is None else 0.7 * old + 0.3 * seconds
        return done

    def _ahead_of(self, stream: str, keys: tuple[PairKey, ...], sample_fps: float) -> PrefixPrefill | None:
        """The prefill begun ahead for the window of pairs ``keys`` (its pairs but the last, and
        its frame rate, match), left where it is; None if there is none."""
        known, run = self.ahead.get(stream, (None, None))
        return run if known == (keys[:-1], self.prefix_key((), sample_fps)) else None

    def _ahead_for(self, window: Window, sample_fps: float) -> PrefixPrefill | None:
        """The prefill begun ahead for ``window``, taken over, with the window's embeddings
        supplied; None if there is none."""
        stream = window.keys[0].stream
        run = self._ahead_of(stream, window.keys, sample_fps)
        if run is None:
            return None
        del self.ahead[stream]
        run.supply(window.embeds.to(self.loaded.dtype))
        log.debug("window %s: its prefill begun ahead has %s", stream, run.progress)
        return run

    def readiness(
        self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float
    ) -> Readiness | None:
        pairs = self.vision.pair_keys(stream, frames, ids)
        if pairs is None:
            return None
        keys = tuple(key for _, key in pairs)
        missing = sum(1 for key in keys if key not in self.vision.cache)
        key = self.prefix_key(keys, sample_fps)
        speed = self.token_layer_s
        whole = len(self.prefix_ids(len(keys) * self._pair_tokens(keys[0]))) * self._layers  # token-layers
        prefill_s = None if speed is None else whole * speed
        if key in self.prefix_cache:
            return Readiness(missing_pairs=missing, prefix_ready=True, prefill_left_s=0.0, prefill_s=prefill_s)
        left = None
        if speed is not None:
            begun = self.prefills.get(key) or self._ahead_of(stream, keys, sample_fps)
            done, total = begun.work if begun is not None else (0, whole)
            left = (total - done) * speed
        return Readiness(missing_pairs=missing, prefix_ready=False, prefill_left_s=left, prefill_s=prefill_s)

    def _pair_tokens(self, key: PairKey) -> int:
        """Video tokens a pair of frames of ``key``'s size makes (patches, merged)."""
        vision = self.loaded.model.config.vision_config
        merge = vision.spatial_merge_size
        return (key.height // vision.patch_size) * (key.width // vision.patch_size) // (merge * merge)

    def rope_kwargs(self, sample_fps: float) -> dict[str, Any]:
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

    def prefix_key(self, pair_keys: tuple[Hashable, ...], sample_fps: float) -> Hashable:
        seconds = self.rope_kwargs(sample_fps).get("second_per_grid_ts")
        return (pair_keys, self.cfg.system_prompt, None if seconds is None else tuple(seconds.tolist()))

    def prefix_of(
        self,
        window: Window,
        sample_fps: float,
        *,
        steps: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        tail: Tail | None = None,
    ) -> Prefix | None:
        """The prefilled shared prefix of ``window``'s prompt (cached for recent windows),
        prefilled a decoder layer at a time (:class:`PrefixPrefill`, over chunks of
        ``model.prefill_chunk_tokens``), resuming one under way; None when it ran ``steps``
        steps without finishing, or ``should_stop`` said so between two steps (what was done
        is kept for the next call). ``tail``: a question's own tokens, prefilled with the
        prefix's last chunk if that has not begun (:meth:`PrefixPrefill.add_tail`; its
        ``cache`` is set when it was)."""
        key = self.prefix_key(window.keys, sample_fps)
        prefix = self.prefix_cache.get(key)
        if prefix is not None:
            return prefix
        run = self.prefills.pop(key, None) or self._ahead_for(window, sample_fps)
        if run is None:
            run = PrefixPrefill(
                self.loaded.model,
                self.prefix_ids(window.embeds.shape[0]),
                window.embeds.to(self.loaded.dtype),
                window.grid,
                self.video_pad,
                self.rope_kwargs(sample_fps),
                chunk_tokens=self.cfg.prefill_chunk_tokens,
            )
        if tail is not None:
            run.add_tail(tail)
        ran = 0
        while not self._step(run):
            ran += 1
            if (steps is not None and ran >= steps) or (should_stop is not None and should_stop()):
                # Keep the newest unfinished prefill only: a live window slides on.
                self.prefills = {key: run}
                return None
        assert run.prefix is not None
        self.prefix_cache.put(key, run.prefix)
        return run.prefix

    def prefix_ids(self, video_tokens: int) -> list[int]:
        """The token ids every question about a window of ``video_tokens`` shares: the
        prompt up to ``<|vision_end|>``."""
        if video_tokens not in self._prefix_ids:
            self._prefix_ids[video_tokens], _ = split_prompt(self.prompt_ids("?", video_tokens), self._vision_end)
        return list(self._prefix_ids[video_tokens])

    def prompt_ids(self, question: str, video_tokens: int) -> list[int]:
        """The whole prompt's token ids, the video's ``video_tokens`` placeholders included,
        as the processor builds them."""
        processor = self.loaded.processor
        prompt = processor.apply_chat_template(
            chat_messages(question, self.cfg.system_prompt), add_generation_prompt=True, tokenize=False
        )
        ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        at = ids.index(self.video_pad)
        return ids[:at] + [self.video_pad] * video_tokens + ids[at + 1 :]


class FastRunner(WindowPrefixes):
    """Answers requests about one window together, sharing its prefilled prefix: owns the
    rows (each question's prompt, positions and decoding), cutting them into batches within
    ``model.batch_kv_mb``, decoding them and taking in joiners between steps. The prompt and
    prefix work is :class:`WindowPrefixes`'."""

    def __init__(
        self,
        loaded: LoadedModel,
        cfg: ModelConfig,
        vision: VisionEncoder,
        prefix_cache: PrefixCache,
        generation: Any,
        *,
        fault_shift: int = 0,
    ) -> None:
        """``generation``: the merged generation config; ``fault_shift``: a test hook that
        shifts every row's positions (answers then differ from ``generate``'s)."""
        super().__init__(loaded, cfg, vision, prefix_cache)
        self.generation = generation
        self.fault_shift = fault_shift
        self.batch_kv_limit = cfg.batch_kv_mb * 2**20
        self.batch_kv_bytes = 0

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
        on_results: Sequence[Callable[[GenerationResult], None]] | None = None,
        joiners: Callable[[int], list[Joiner]] | None = None,
    ) -> list[GenerationResult] | None:
        """Answer ``requests`` (all about one window), each result going to its ``on_results``
        entry the step it ends, and take in ``joiners`` between steps; None if the window
        cannot take the fast path (an odd frame count, or a frame size that depends on the
        window's length)."""
        first = requests[0]
        assert first.stream is not None and first.frame_ids is not None
        window = self.vision.window(first.stream, first.frames, first.frame_ids)
        if window is None:
            return None
        on_results = on_results or [lambda result: None] * len(requests)
        results: list[GenerationResult | None] = [None] * len(requests)

        def keep(i: int, on_result: Callable[[GenerationResult], None]) -> Callable[[GenerationResult], None]:
            def done(result: GenerationResult) -> None:
                results[i] = result
                on_result(result)

            return done

        head = self.prefix_ids(window.embeds.shape[0])
        rows = [
            self._row(window, head, r, t, s, keep(i, o))
            for i, (r, t, s, o) in enumerate(zip(requests, on_texts, should_stops, on_results, strict=True))
        ]
        # A window not prefilled yet: the first question's tokens go with the prefix's last
        # chunk, one pass as generate's, rather than a pass of their own after it.
        tail = Tail(rows[0].suffix, rows[0].positions)
        prefix = self.prefix_of(window, first.sample_fps, should_stop=lambda: all(s() for s in should_stops), tail=tail)
        if prefix is None:  # every question was cancelled during the prefill
            results = [GenerationResult("", [], stopped=True, first_token_at=None) for _ in requests]
            for result, on_result in zip(results, on_results, strict=True):
                on_result(result)
            return results
        longest = max(r.max_new_tokens for r in requests)

        def join(running: int) -> list[Row]:
            if joiners is None:
                return []
            room = 0
            while batch_kv_bytes(prefix, running + room + 1, 64, longest) <= self.batch_kv_limit:
                room += 1
            joined = joiners(room) if room else []
            return [self._row(window, head, j.request, j.on_text, j.should_stop, j.on_result) for j in joined]

        pad = self.generation.pad_token_id
        pad_id = pad if pad is not None else (self.loaded.processor.tokenizer.pad_token_id or 0)
        new_tokens = [r.max_new_tokens for r in requests]
        prefilled = tail if tail.cache is not None else None
        for part in self._parts(prefix, rows, new_tokens):
            self.batch_kv_bytes = fastpath.decode(
                self.loaded.model, prefix, part, pad_id=pad_id, joiners=join, prefilled=prefilled
            )
            prefilled = None  # the first part's first row
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _row(
        self,
        window: Window,
        head: list[int],
        request: GenerationRequest,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
        on_result: Callable[[GenerationResult], None],
    ) -> Row:
        """One question's row: its prompt and positions (the model's rope index on the whole
        prompt), its decoding (as ``generate`` builds it) and its result when it ends."""
        model = self.loaded.model
        tokenizer = self.loaded.processor.tokenizer
        ids = self.prompt_ids(request.question, window.embeds.shape[0])
        own_head, suffix = split_prompt(ids, self._vision_end)
        assert own_head == head  # the shared prefix
        prompt = torch.tensor([ids], device=self.loaded.device)
        rope_kwargs = self.rope_kwargs(request.sample_fps)
        positions = rope_positions(model, prompt, window.grid, self.video_pad, rope_kwargs) + self.fault_shift
        decoder = IncrementalDecoder(tokenizer, on_text)
        row = Row(
            prompt=prompt,
            suffix=suffix,
            positions=positions[:, len(head) :],
            # generate continues each position row from the prompt's last one.
            next_position=positions[:, -1] + 1,
            decoding=row_decoding(
                model,
                self.generation,
                prompt,
                max_new_tokens=request.max_new_tokens,
                seed=self.cfg.seed,
                tokenizer=tokenizer,
            ),
            on_token=lambda t: decoder.add([t]),
            should_stop=should_stop,
        )
        row.on_done = lambda: on_result(
            GenerationResult(
                text=decoder.finish(), token_ids=row.tokens, stopped=row.stopped, first_token_at=row.first_token_at
            )
        )
        return row

    def _parts(self, prefix: Prefix, rows: list[Row], new_tokens: list[int]) -> list[list[Row]]:
        """``rows`` cut into consecutive batches whose KV caches stay within
        ``model.batch_kv_mb`` (at least one question each: it needs what ``generate`` needs)."""
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
