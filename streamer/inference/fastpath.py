"""The fast path: vision work reused across questions, and questions decoded together.

Two facts about Qwen2-VL make this exact (see ``NOTES-qwen2vl.md``):

- the vision encoder attends within each temporal patch (a pair of frames) only, so a
  pair's embeddings do not depend on its neighbours: they are computed once per pair,
  kept in a bounded :class:`VisionCache`, and concatenated for any window that contains
  the pair. Frames are paired from the newest backwards, so every frame is encoded in the
  pair that ends with it ("pair ending at k") and any window ending at the newest frame
  is made of cached pairs;
- the prompt puts the video before the question, so every question about one window shares
  the prompt up to ``<|vision_end|>``: :class:`PrefixPrefill` prefills that prefix once (a
  decoder layer at a time), :func:`decode` repeats its KV cache for each question, prefills
  each question's own tokens, and decodes all of them as one batch, which rows leave the
  step they end and new rows about the same prefix join between steps (continuous
  batching; padding columns between the prefix and each row's question are masked out, so
  rows of any length and start step share one cache).

Nothing ``generate`` decides is re-derived here: each row's M-RoPE positions come from the
model's own rope index on that row's whole prompt, and its tokens are chosen by the logits
processors, warpers and stopping criteria transformers builds for it
(:mod:`streamer.inference.generation`).

The vision tower of Qwen2.5-VL adds window attention to Qwen2-VL's, but its windows lie
within one temporal patch too (``transformers.vision_utils.get_vision_window_index`` tiles
each patch on its own, and its full-attention blocks use the same per-patch ``cu_seqlens``),
so per-pair encoding is exact for it as well (``tests/test_exactness.py`` checks both).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streamer.inference.generation import RowDecoding, next_token
from streamer.inference.video import TEMPORAL_PATCH, clip_size, frame_size, video_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairEmbedding:
    """A pair's vision embeddings (tokens x hidden) and its grid (height, width in patches)."""

    embeds: torch.Tensor
    grid_h: int
    grid_w: int

    def numel(self) -> int:
        return self.embeds.numel()

    def element_size(self) -> int:
        return self.embeds.element_size()


class VisionCache:
    """Embeddings of frame pairs, least recently used evicted first, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, PairEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> PairEmbedding | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: PairEmbedding) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


@dataclass(frozen=True)
class PairKey:
    """A pair of frames of one stream (by their identities), resized for the model one way."""

    stream: str
    first: Hashable
    last: Hashable
    height: int
    width: int


@dataclass(frozen=True)
class Window:
    """A window's video embeddings, ``video_grid_thw``, how many pairs were computed for it,
    and the keys of its pairs (the window's identity)."""

    embeds: torch.Tensor
    grid: torch.Tensor
    computed: int
    keys: tuple[PairKey, ...]


class VisionEncoder:
    """Computes and caches per-pair embeddings with the model's own processor and tower."""

    def __init__(self, model: Any, processor: Any, cache: VisionCache, min_pixels: int, max_pixels: int) -> None:
        self.model = model
        self.processor = processor
        self.cache = cache
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def clip_shape(self, frame: np.ndarray, num_frames: int) -> tuple[int, int] | None:
        """Frame size after both resizes, or None when it would depend on the window length
        (the total-pixel cap binds): then the per-pair cache would not be exact."""
        h, w = frame_size(frame.shape[0], frame.shape[1], self.min_pixels, self.max_pixels)
        size = clip_size(h, w, num_frames, self.min_pixels, self.max_pixels)
        if size != clip_size(h, w, TEMPORAL_PATCH, self.min_pixels, self.max_pixels):
            return None
        return size

    def encode_pair(self, frames: Sequence[np.ndarray]) -> PairEmbedding:
        """Embeddings of two frames, with the grid the processor gave them."""
        return self.encode_pairs([frames])[0]

    def encode_pairs(self, pairs: Sequence[Sequence[np.ndarray]]) -> list[PairEmbedding]:
        """Embeddings of several pairs (each pair a video of its own: the tower attends within
        each pair, so one pass over all of them computes what one pass per pair does). On a
        GPU they go through the tower in one pass (larger products). On a CPU each pair has a
        pass of its own: a pair's largest activation (1024 patches of a 448x448 pair through
        the MLP, 21 MB in float32) stays under glibc's largest mmap threshold (32 MB), so the
        allocator reuses freed memory, where four pairs at once (84 MB) map and zero fresh
        pages on every block (800k page faults per 8-frame window here, ~6 % slower)."""
        clips = [video_tensor(frames, min_pixels=self.min_pixels, max_pixels=self.max_pixels) for frames in pairs]
        if self.model.device.type == "cpu":
            return [emb for clip in clips for emb in self._tower([clip])]
        return self._tower(clips)

    def _tower(self, clips: list[torch.Tensor]) -> list[PairEmbedding]:
        """The processor and the vision tower over ``clips`` in one pass."""
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        batch = self.processor.video_processor(videos=clips, size=size, do_sample_frames=False, return_tensors="pt")
        device = self.model.device
        pixels = batch["pixel_values_videos"].to(device)
        grid = batch["video_grid_thw"].to(device)
        with torch.inference_mode():
            out = self.model.model.get_video_features(pixels, grid)
        return [
            PairEmbedding(embeds, int(thw[1]), int(thw[2])) for embeds, thw in zip(out.pooler_output, grid, strict=True)
        ]

    def pair_keys(
        self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable]
    ) -> list[tuple[int, PairKey]] | None:
        """The first frame's index and the key of each pair of a window, paired so that the
        last pair ends with the newest frame; None when the window cannot be assembled from
        cached pairs exactly (odd length, or a size that depends on the window length)."""
        if not frames or len(frames) % TEMPORAL_PATCH:
            return None
        shape = self.clip_shape(frames[-1], len(frames))
        if shape is None:
            return None
        return [(a, PairKey(stream, ids[a], ids[a + 1], *shape)) for a in range(0, len(frames), TEMPORAL_PATCH)]

    def window(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable]) -> Window | None:
        """Embeddings and ``video_grid_thw`` of a whole window from cached pairs (computing
        the missing ones), and how many pairs had to be computed; None if the window cannot
        be assembled from pairs exactly."""
        pairs = self.pair_keys(stream, frames, ids)
        if pairs is None:
            return None
        found = [self.cache.get(key) for _, key in pairs]
        missing = [i for i, emb in enumerate(found) if emb is None]
        if missing:
            encoded = self.encode_pairs([[frames[pairs[i][0]], frames[pairs[i][0] + 1]] for i in missing])
            for i, emb in zip(missing, encoded, strict=True):
                self.cache.put(pairs[i][1], emb)
                found[i] = emb
        parts = [emb for emb in found if emb is not None]
        computed = len(missing)
        embeds = torch.cat([p.embeds for p in parts])
        grid = torch.tensor([[len(pairs), parts[0].grid_h, parts[0].grid_w]], device=embeds.device)
        return Window(embeds, grid, computed, tuple(key for _, key in pairs))

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable]) -> bool:
        """Encode one missing pair of the window, newest pair first (the next question needs
        it most); True if it did."""
        for a, key in reversed(self.pair_keys(stream, frames, ids) or []):
            if key not in self.cache:
                self.cache.put(key, self.encode_pair([frames[a], frames[a + 1]]))
                return True
        return False


@dataclass
class Row:
    """One question in a batch: its own prompt tokens, positions, decoding and callbacks.

    ``prompt`` is the question's whole prompt (the shared prefix, then ``suffix``), which the
    logits processors read as ``generate`` does; ``positions`` (3 x len(suffix)) are the
    suffix's M-RoPE positions and ``next_position`` (3) the first generated token's, both from
    the model's own rope index on the whole prompt (:func:`rope_positions`).
    """

    prompt: torch.Tensor
    suffix: list[int]
    positions: torch.Tensor
    next_position: torch.Tensor
    decoding: RowDecoding
    on_token: Callable[[int], None]
    should_stop: Callable[[], bool]
    #: Called once, the step the row ends (its last token decided, or stopped).
    on_done: Callable[[], None] = lambda: None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    stopped: bool = False
    first_token_at: float | None = None


def split_prompt(ids: list[int], vision_end_id: int) -> tuple[list[int], list[int]]:
    """The shared prefix (through ``<|vision_end|>``) and the question's own suffix."""
    cut = ids.index(vision_end_id) + 1
    return ids[:cut], ids[cut:]


def rope_positions(
    model: Any, ids: torch.Tensor, video_grid_thw: torch.Tensor, video_token_id: int, rope_kwargs: dict[str, Any]
) -> torch.Tensor:
    """M-RoPE positions (3 x length) of a prompt (1 x length) with one video, from the model's
    own ``get_rope_index`` (``rope_kwargs``: e.g. Qwen2.5-VL's ``second_per_grid_ts``)."""
    token_types = (ids == video_token_id).to(torch.int) * 2
    positions, _ = model.model.get_rope_index(
        ids,
        mm_token_type_ids=token_types,
        video_grid_thw=video_grid_thw,
        attention_mask=torch.ones_like(ids),
        **rope_kwargs,
    )
    return positions[:, 0]


def kv_bytes(cache: Any) -> int:
    """Bytes held by a KV cache's keys and values."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@dataclass
class Prefix:
    """The KV cache after a shared prompt prefix (its token ids), and its size in bytes."""

    ids: list[int]
    cache: Any
    bytes: int

    @property
    def length(self) -> int:
        return len(self.ids)


class PrefixCache:
    """Prefills of recent windows, least recently used evicted first, bounded by count
    (``keep``) and by the bytes of their KV caches (``max_bytes``), so a question about a
    window the loop has already seen skips straight to its own tokens."""

    def __init__(self, keep: int = 4, max_bytes: int = 2**30) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._items: OrderedDict[Hashable, Prefix] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Prefix | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self.hits += 1
                self._items.move_to_end(key)
            return item

    def put(self, key: Hashable, prefix: Prefix) -> None:
        """Keep ``prefix`` (unless it alone is over the byte bound), evicting the least
        recently used until both bounds hold."""
        if prefix.bytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.bytes
            self._items[key] = prefix
            self.bytes += prefix.bytes
            while len(self._items) > self.keep or self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class _LayerInputs(Exception):
    """Raised by the first decoder layer's pre-hook: what the model hands its decoder layers."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.hidden = hidden
        self.kwargs = kwargs


@dataclass
class _ChunkRun:
    """A chunk of the prefix part way through the decoder: its hidden state after ``layer``
    layers and the arguments the model gives every layer (mask, rotary embeddings, cache)."""

    end: int
    hidden: torch.Tensor
    kwargs: dict[str, Any]
    layer: int = 0


@dataclass
class Tail:
    """A question's own tokens (after the shared prefix) prefilled in the same pass as the
    prefix's last chunk, as ``generate`` prefills a whole prompt in one pass: on a cold window
    the first question then costs no pass of its own. ``positions`` (3 x len(ids)) are the
    question's from the rope index on its whole prompt. When the prefix is done, ``cache``
    holds the prefix and these tokens and ``hidden`` the last token's final hidden state."""

    ids: list[int]
    positions: torch.Tensor
    cache: Any = None
    hidden: torch.Tensor | None = None


class PrefixPrefill:
    """The prefill of a shared prefix (system prompt, video, ``<|vision_end|>``), run one
    decoder layer at a time so that other work can go between: :meth:`step` runs one layer
    over the current chunk of at most ``chunk_tokens`` tokens, :attr:`prefix` is set after
    the last layer of the last chunk.

    Stepping by layers, not by short chunks of tokens, keeps the one-pass cost: on a CPU each
    pass of the decoder streams all its weights from memory, so a prefix in five chunks costs
    four passes more than in one (about 20 % at Qwen2-VL-2B's width), while one layer of a
    whole window is as short a wait as a 256-token chunk of a shallow model and shorter than
    one of a deep one. Each layer is the model's own module called with what the model itself
    gives it: the first layer's inputs (embeddings with the video scattered in, the causal
    mask over the cache, the rotary embeddings) are taken from the model's own forward, which
    is stopped there; then the layers run in order and the model's final norm closes the
    chunk. Models whose layers take different masks (sliding-window layers) run each chunk as
    one forward instead.

    A prefill may start before its last video embeddings exist (``video_embeds`` holds the
    first rows only): it runs up to the first video token without its row, then waits
    (:attr:`blocked`) until :meth:`supply` hands over all of them. Causal attention makes
    the tokens before that point independent of what follows, so on a live stream the next
    window's prefill runs while its newest frames are still to come.

    A question waiting for the prefix may add its own tokens (:meth:`add_tail`) while the
    chunk that ends the prefix has not begun: they are prefilled with it, and the shared
    prefix's cache is cut from the result.

    Positions come from the model's rope index on the prefix alone, which equal the whole
    prompt's first positions (the index runs left to right); a chunk gets its slice of them,
    and of the video's embeddings the rows that its ``<|video_pad|>`` tokens take (the model
    scatters them in order). Attention over the cache plus the chunk is what the whole
    prefix's causal attention is, so the cache equals the one-pass prefill's (allclose:
    ``tests/test_continuous.py``).
    """

    def __init__(
        self,
        model: Any,
        prefix: list[int],
        video_embeds: torch.Tensor,
        video_grid_thw: torch.Tensor,
        video_token_id: int,
        rope_kwargs: dict[str, Any],
        chunk_tokens: int = 0,
    ) -> None:
        """``chunk_tokens``: tokens per chunk (0: the whole prefix in one)."""
        from transformers import DynamicCache

        self.model = model
        self.ids = list(prefix)
        self._tensor = torch.tensor([prefix], device=model.device)
        self._video = self._tensor == video_token_id
        self._embeds = video_embeds
        self._grid = video_grid_thw
        self.chunk_tokens = chunk_tokens or len(prefix)
        self._video_at = self._video[0].nonzero()[:, 0].tolist()  # the video tokens' indices
        self._note_embeds()
        with torch.inference_mode():
            self._positions = rope_positions(model, self._tensor, video_grid_thw, video_token_id, rope_kwargs)
        self._cache = DynamicCache(config=model.config)
        self._text = model.model.language_model
        layer_types = set(getattr(self._text.config, "layer_types", None) or ["full_attention"])
        #: Whether a step is one decoder layer (else one whole chunk).
        self.by_layer = len(layer_types) == 1
        self._chunk: _ChunkRun | None = None
        self.tail: Tail | None = None
        self.done_tokens = 0
        self.prefix: Prefix | None = None
        #: The prefix's last hidden state (tests compare prefills by its logits).
        self.last_hidden: torch.Tensor | None = None

    @property
    def layers(self) -> int:
        """Decoder layers: the steps one chunk takes (when stepping by layer)."""
        return len(self._text.layers)

    def _note_embeds(self) -> None:
        """Up to which token the prefill may run with the video embeddings it has."""
        known = self._embeds.shape[0]
        self._ready_until = self._video_at[known] if known < len(self._video_at) else len(self.ids)

    @property
    def blocked(self) -> bool:
        """The next step needs video embeddings not supplied yet."""
        return self.prefix is None and self._chunk is None and self.done_tokens >= self._ready_until < len(self.ids)

    @property
    def work(self) -> tuple[int, int]:
        """Tokens times decoder layers done, and in all: a prefill's time is about proportional
        to them (the layers dominate; attention grows with the context, little at these lengths)."""
        total = len(self.ids) * self.layers
        if self.prefix is not None:
            return total, total
        done = self.done_tokens * self.layers
        if self._chunk is not None:
            done += self._chunk.layer * (self._chunk.end - self.done_tokens)
        return min(done, total), total

    @property
    def progress(self) -> str:
        """How far the prefill is, in words (for logs): finished tokens, and the decoder
        layers done over the chunk in flight."""
        done = f"{self.done_tokens} of {len(self.ids)} tokens"
        if self._chunk is None:
            return done
        return f"{done}, {self._chunk.layer} of {self.layers} layers over tokens up to {self._chunk.end}"

    def supply(self, video_embeds: torch.Tensor) -> None:
        """All the video's embeddings (the rows given at the start among them, unchanged)."""
        assert video_embeds.shape[0] == len(self._video_at)
        self._embeds = video_embeds
        self._note_embeds()

    def add_tail(self, tail: Tail) -> bool:
        """Prefill ``tail`` with the prefix's last chunk; False (nothing changes) when that
        chunk has begun, or a tail is taken already."""
        begun = self.prefix is not None or (self._chunk is not None and self._chunk.end >= len(self.ids))
        if begun or self.tail is not None or not tail.ids:
            return False
        assert tail.positions.shape == (3, len(tail.ids))
        ids = torch.tensor([tail.ids], device=self._tensor.device)
        self._tensor = torch.cat([self._tensor, ids], dim=1)
        self._video = torch.cat([self._video, torch.zeros_like(ids, dtype=torch.bool)], dim=1)
        self._positions = torch.cat([self._positions, tail.positions.to(self._positions.device)], dim=1)
        self.tail = tail
        return True

    def step(self) -> bool:
        """Run the next decoder layer of the current chunk (or, without layer steps, the next
        chunk); True once the whole prefix is in the cache."""
        if self.prefix is not None:
            return True
        if self.blocked:
            raise RuntimeError("the prefill waits for video embeddings: supply them first")
        total = self._tensor.shape[1]  # the prefix, and a tail's tokens
        if self._ready_until < len(self.ids):
            total = self._ready_until
        with torch.inference_mode():
            if not self.by_layer:
                end = min(total, self.done_tokens + self.chunk_tokens)
                hidden = self.model.model(**self._chunk_inputs(end), use_cache=True).last_hidden_state
                return self._chunk_done(end, hidden)
            if self._chunk is None:
                end = min(total, self.done_tokens + self.chunk_tokens)
                self._chunk = self._layer_inputs(end)
            run = self._chunk
            run.hidden = self._text.layers[run.layer](run.hidden, **run.kwargs)
            run.layer += 1
            if run.layer < self.layers:
                return False
            self._chunk = None
            return self._chunk_done(run.end, self._text.norm(run.hidden))

    def _chunk_inputs(self, end: int) -> dict[str, Any]:
        """The model's arguments for the tokens from ``done_tokens`` to ``end``."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        start = self.done_tokens
        chunk = self._tensor[:, start:end]
        video = self._video[:, start:end]
        kwargs: dict[str, Any] = {}
        if bool(video.any()):
            first = int(self._video[:, :start].sum())
            rows = self._embeds[first : first + int(video.sum())]
            kwargs = {
                "mm_token_type_ids": video.to(torch.int) * 2,
                "video_grid_thw": self._grid,
                "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=(rows,))},
            }
        # The model without its output projection: nothing reads a prefix's logits, and the
        # vocabulary-wide product would cost each chunk as much as a decode step.
        return {
            "input_ids": chunk,
            "attention_mask": torch.ones((1, end), dtype=torch.long, device=chunk.device),
            "position_ids": self._positions[:, None, start:end],
            "cache": self._cache,
            **kwargs,
        }

    def _layer_inputs(self, end: int) -> _ChunkRun:
        """What the model's forward hands its first decoder layer for the chunk ending at
        ``end``: the forward runs up to that layer (embeddings, mask, rotary) and stops."""

        def stop(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _LayerInputs(args[0] if args else kwargs.pop("hidden_states"), kwargs)

        hook = self._text.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.model(**self._chunk_inputs(end), use_cache=True)
        except _LayerInputs as given:
            return _ChunkRun(end=end, hidden=given.hidden, kwargs=given.kwargs)
        finally:
            hook.remove()
        raise RuntimeError("the model's forward did not reach its first decoder layer")

    def _chunk_done(self, end: int, hidden: torch.Tensor) -> bool:
        """The chunk from ``done_tokens`` to ``end`` is in the cache (``hidden``: its final
        hidden states); True when it was the last."""
        import copy

        start, length = self.done_tokens, len(self.ids)
        self.done_tokens = end
        if start < length <= end:
            self.last_hidden = hidden[:, length - 1 - start : length - start]
        if end < self._tensor.shape[1]:
            return False
        cache = self._cache
        if self.tail is not None:
            # The question keeps the whole cache; the shared prefix is its first tokens.
            self.tail.cache, self.tail.hidden = cache, hidden[:, -1:]
            cache = copy.deepcopy(cache)
            for layer in cache.layers:
                layer.keys = layer.keys[..., :length, :].clone()
                layer.values = layer.values[..., :length, :].clone()
        self.prefix = Prefix(ids=self.ids, cache=cache, bytes=kv_bytes(cache))
        return True

    @property
    def last_logits(self) -> torch.Tensor | None:
        """Logits of the prefix's last token (computed on demand: tests compare prefills by them)."""
        if self.last_hidden is None:
            return None
        with torch.inference_mode():
            return self.model.lm_head(self.last_hidden)[:, -1]


def prefill_prefix(
    model: Any,
    prefix: list[int],
    video_embeds: torch.Tensor,
    video_grid_thw: torch.Tensor,
    video_token_id: int,
    rope_kwargs: dict[str, Any],
) -> Prefix:
    """Run the shared prefix through the model in one pass (see :class:`PrefixPrefill`)."""
    run = PrefixPrefill(model, prefix, video_embeds, video_grid_thw, video_token_id, rope_kwargs)
    run.step()
    assert run.prefix is not None
    return run.prefix


def batch_kv_bytes(prefix: Prefix, rows: int, width: int, new_tokens: int) -> int:
    """Bytes of the KV caches a batch of ``rows`` questions (suffixes padded to ``width``,
    up to ``new_tokens`` generated) grows to: the prefix's copies and what follows."""
    per_token = prefix.bytes / max(1, prefix.length)
    return int(rows * per_token * (prefix.length + width + new_tokens))


def decode(
    model: Any,
    prefix: Prefix,
    rows: list[Row],
    *,
    pad_id: int,
    joiners: Callable[[int], list[Row]] | None = None,
    prefilled: Tail | None = None,
) -> int:
    """Decode every row's answer after the shared ``prefix`` (left untouched); returns the
    most bytes the batch's KV caches held.

    Row i sees exactly the sequence ``prefix + rows[i].suffix + its own tokens``, at the
    positions its :class:`Row` gives (padding between the prefix and each row's question is
    masked out), and its tokens are chosen and stopped by its :class:`RowDecoding`, as
    ``generate`` would for that question alone. Tokens are appended to ``row.tokens`` and
    reported through ``row.on_token`` as they are decided; a row that ends calls
    ``row.on_done`` at once and leaves the batch. Between steps ``joiners(rows_running)``
    may hand over new rows about the same prefix: they are prefilled (their own tokens
    only) and decode from the next step on, beside the others (continuous batching).
    ``prefilled``: the first row's tokens were prefilled with the prefix (:class:`Tail`).
    """
    batch = _Batch(model, prefix, pad_id)
    if prefilled is not None:
        batch.adopt(rows[0], prefilled)
        rows = rows[1:]
    batch.add(rows)
    while batch.rows:
        batch.choose()
        if batch.rows:
            batch.step()
        # After the step: a newcomer's logits are its own prefill's, its next token is chosen
        # beside the others' (stepping it too would feed its last prompt token twice).
        if joiners is not None:
            batch.add(joiners(len(batch.rows)))
    return batch.peak_bytes


class _Batch:
    """The rows decoding together: one KV cache (a row per question), its attention mask,
    each row's last logits and next position. Rows join (:meth:`add`) and leave (in
    :meth:`choose`) between steps."""

    def __init__(self, model: Any, prefix: Prefix, pad_id: int) -> None:
        self.model = model
        self.prefix = prefix
        self.pad_id = pad_id
        self.device = model.device
        self.rows: list[Row] = []
        self.ids: list[torch.Tensor] = []  # per row: its prompt and tokens, as the processors read them
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.logits: torch.Tensor | None = None
        self.next_pos = torch.zeros((3, 0), dtype=torch.long, device=self.device)
        self.peak_bytes = 0

    def adopt(self, row: Row, tail: Tail) -> None:
        """Start the batch with ``row``, whose own tokens ``tail`` prefilled with the prefix
        (its cache holds them; its last hidden state gives the row's first logits)."""
        assert self.cache is None and tail.cache is not None and tail.hidden is not None
        assert tail.ids == row.suffix
        with torch.inference_mode():
            self.logits = self.model.lm_head(tail.hidden)[:, -1]
        self.cache = tail.cache
        self.mask = torch.ones((1, self.prefix.length + len(row.suffix)), dtype=torch.long, device=self.device)
        self.next_pos = row.next_position.to(self.device)[:, None]
        self.rows.append(row)
        self.ids.append(row.prompt.to(self.device))
        self.peak_bytes = max(self.peak_bytes, kv_bytes(self.cache))

    def add(self, rows: list[Row]) -> None:
        """Prefill ``rows``' questions after a copy of the prefix and take them into the batch."""
        import copy

        if not rows:
            return
        n, p, device = len(rows), self.prefix.length, self.device
        cache = copy.deepcopy(self.prefix.cache)
        if n > 1:
            cache.batch_repeat_interleave(n)
        lengths = [len(r.suffix) for r in rows]
        width = max(lengths)
        # Each row's question ends at the last column (padding, masked out, goes between the
        # shared prefix and the question), so only the last position needs logits.
        suffix = torch.full((n, width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, p + width), dtype=torch.long, device=device)
        mask[:, :p] = 1
        pos = torch.zeros((3, n, width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            pad = width - lengths[i]
            suffix[i, pad:] = torch.tensor(r.suffix, device=device)
            mask[i, p + pad :] = 1
            pos[:, i, pad:] = r.positions.to(device)
            pos[:, i, :pad] = r.positions[:, :1].to(device)
        with torch.inference_mode():
            out = self.model(
                input_ids=suffix, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
            )
        logits = out.logits[:, -1]
        next_pos = torch.stack([r.next_position.to(device) for r in rows], dim=1)  # 3 x n
        if self.cache is None:
            self.cache, self.mask, self.logits, self.next_pos = cache, mask, logits, next_pos
        else:
            # Pad the shorter side with masked columns right after the prefix, then stack rows.
            length = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_pad_after(self.mask, p, length), _pad_after(mask, p, length)])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_after(mine.keys, p, length), _pad_after(theirs.keys, p, length)])
                mine.values = torch.cat([_pad_after(mine.values, p, length), _pad_after(theirs.values, p, length)])
            assert self.logits is not None
            self.logits = torch.cat([self.logits, logits])
            self.next_pos = torch.cat([self.next_pos, next_pos], dim=1)
        self.rows.extend(rows)
        self.ids.extend(r.prompt.to(device) for r in rows)
        self.peak_bytes = max(self.peak_bytes, kv_bytes(self.cache))

    def choose(self) -> None:
        """Each row's next token from its logits; rows that end call ``on_done`` and leave."""
        assert self.logits is not None
        now = time.monotonic()
        keep = []
        for i, r in enumerate(self.rows):
            token = next_token(r.decoding, self.ids[i], self.logits[i : i + 1])
            self.ids[i] = torch.cat([self.ids[i], token[:, None]], dim=-1)
            r.tokens.append(int(token))
            r.first_token_at = r.first_token_at or now
            r.on_token(r.tokens[-1])
            if bool(r.decoding.criteria(self.ids[i], None).any()):
                r.done = True
            elif r.should_stop():
                r.done = r.stopped = True
            if r.done:
                r.on_done()
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.rows = [self.rows[i] for i in keep]
            self.ids = [self.ids[i] for i in keep]
            self.mask, self.logits = self.mask[index], self.logits[index]
            self.next_pos = self.next_pos[:, index]
            if keep:
                self.cache.batch_select_indices(index)
            else:  # every row left: rows that join start a batch of their own
                self.cache = None

    def step(self) -> None:
        """Run every row's newest token through the model: the next logits."""
        n = len(self.rows)
        step_ids = torch.tensor([[ids[0, -1]] for ids in self.ids], device=self.device)
        self.mask = torch.cat([self.mask, torch.ones((n, 1), dtype=torch.long, device=self.device)], dim=1)
        with torch.inference_mode():
            out = self.model(
                input_ids=step_ids,
                attention_mask=self.mask,
                position_ids=self.next_pos.unsqueeze(-1),
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.logits = out.logits[:, -1]
        self.next_pos = self.next_pos + 1
        self.peak_bytes = max(self.peak_bytes, kv_bytes(self.cache))


def _pad_after(t: torch.Tensor, at: int, length: int) -> torch.Tensor:
    """``t`` (a mask, rows x columns, or keys/values, rows x heads x columns x dim) with zero
    columns inserted at column ``at`` up to ``length`` columns."""
    axis = 1 if t.dim() == 2 else 2
    missing = length - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    zeros = torch.zeros(shape, dtype=t.dtype, device=t.device)
    head, tail = t.narrow(axis, 0, at), t.narrow(axis, at, t.shape[axis] - at)
    return torch.cat([head, zeros, tail], dim=axis)
