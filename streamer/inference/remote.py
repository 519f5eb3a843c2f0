"""The remote engine: answers from OpenAI-compatible servers (vLLM) over HTTP.

``model.backend: openai`` puts :class:`RemoteEngine` where :class:`TransformersEngine` would
be: the inference loop, its scheduling and the protocol stay as they are, and each question
becomes one streamed chat-completion request. The window goes as a video in the form vLLM
accepts for Qwen2-VL, its JPEG frames in one ``video_url`` part
(``data:video/jpeg;base64,<f1>,<f2>,...``), or in image mode as one ``image_url``. Each
frame is encoded once (:class:`~streamer.inference.jpeg_window.JpegFrames`), so every
question about a window sends the same bytes and vLLM's prefix cache serves the video from
the second question on.

Guarantees:

- the pieces passed to ``on_text`` concatenate to the answer's text; once ``should_stop``
  returns True the request passes nothing more on and its HTTP stream is closed (vLLM
  aborts a request whose client went away). ``should_stop`` is asked at every chunk and
  every :data:`STOP_POLL_S` while a stream is silent;
- no wait is unbounded: connecting and probing (``connect_timeout_s``), silence inside a
  stream, first token included (``read_timeout_s``), a free request slot (``slot_timeout_s``);
- a request that fails before its first token moves to the next server of the pool. A
  server that fails is ejected and tried again after a backoff that doubles up to
  ``backend_backoff_max_s``, with a cheap ``GET /models`` on the request path (no background
  work). When every server is ejected, the one due soonest is probed at once: a question
  never fails because of the backoff alone;
- a failure raises :class:`RemoteError` with a message that names the server and what went
  wrong, after the batch's other requests were stopped (the loop ends the batch's questions
  with ``internal``);
- greedy decoding unless ``model.do_sample`` is true: vLLM samples by default, so
  ``temperature: 0`` is sent explicitly. With ``do_sample: true`` the configured
  temperature, top_p, top_k and seed are sent; those left unset are the server's (with
  vLLM's default ``--generation-config auto``, the checkpoint's). A configured
  repetition_penalty is always sent.

Like every engine it is called from the inference loop's one thread. It runs an asyncio
event loop of its own on that thread for the length of a batch, so callbacks come on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx2
import numpy as np
import openai

from streamer.capture import mask_url
from streamer.config import ModelConfig
from streamer.inference.engine import Engine, GenerationRequest, GenerationResult, Joiner
from streamer.inference.jpeg_window import JpegFrames
from streamer.inference.questions import Sampling

log = logging.getLogger(__name__)

#: How often a batch asks ``should_stop`` while its streams are silent, and how often a
#: request waiting for a slot looks again, seconds.
STOP_POLL_S = 0.01
#: HTTP statuses that say the server, not the request, is at fault: the server is ejected.
_SERVER_FAULT = {408, 429}


class RemoteError(RuntimeError):
    """A question could not be answered by the remote servers; the message says why."""


@dataclass
class Backend:
    """One server of the pool and what streamer has seen of it.

    Changed on the inference thread only; ``/healthz`` and ``/metrics`` read it unlocked
    (each figure is current, two figures may be a request apart).
    """

    url: str
    client: openai.AsyncOpenAI
    #: "up": takes requests; "down": ejected until ``retry_at`` (time.monotonic()).
    state: str = "up"
    in_flight: int = 0
    #: Consecutive failures; the backoff doubles with each.
    failures: int = 0
    retry_at: float = 0.0
    ejections: int = 0
    last_error: str | None = None
    #: Requests by outcome: answered, stopped (cancelled), failed. Every key exists from the
    #: start, so a reader on another thread never sees the dict change size.
    outcomes: Counter[str] = field(default_factory=lambda: Counter(answered=0, stopped=0, failed=0))
    first_token_s_sum: float = 0.0
    first_token_count: int = 0
    last_first_token_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    #: Bytes of the request bodies sent (the frames, mostly).
    request_bytes: int = 0
    _probe: asyncio.Task | None = None

    @property
    def label(self) -> str:
        """The URL with any credentials masked: what logs, /healthz and /metrics show."""
        return mask_url(self.url)

    def status(self) -> dict[str, Any]:
        """The server's state for ``/healthz`` (``model.backends[]``)."""
        now = time.monotonic()
        return {
            "url": self.label,
            "state": self.state,
            "in_flight": self.in_flight,
            "requests": dict(self.outcomes),
            "consecutive_failures": self.failures,
            "ejections": self.ejections,
            "retry_in_s": round(max(0.0, self.retry_at - now), 1) if self.state == "down" else None,
            "last_error": self.last_error,
            "first_token_count": self.first_token_count,
            "first_token_s_sum": round(self.first_token_s_sum, 4),
            "first_token_s_avg": (
                round(self.first_token_s_sum / self.first_token_count, 4) if self.first_token_count else None
            ),
            "first_token_s_last": None if self.last_first_token_s is None else round(self.last_first_token_s, 4),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "request_bytes": self.request_bytes,
        }


class BackendPool:
    """Servers chosen by fewest outstanding requests; failing ones ejected and retried with backoff.

    A batch (questions about one window) goes to one server while it has free slots, so the
    server prefills the window once; ties go to the stream's own order of servers
    (rendezvous hashing on the stream's name), so every front end sends a stream's windows
    to the same server and its prefix cache, and streams spread over the pool.
    """

    def __init__(self, cfg: ModelConfig, api_key: str | None) -> None:
        self.cfg = cfg
        self.backends = [Backend(url, self._client(url, api_key)) for url in cfg.remote_urls]

    def _client(self, url: str, api_key: str | None) -> openai.AsyncOpenAI:
        async def count_bytes(request: httpx2.Request) -> None:
            backend = next(b for b in self.backends if b.url == url)
            backend.request_bytes += len(request.content)

        return openai.AsyncOpenAI(
            base_url=url,
            api_key=api_key or "none",
            max_retries=0,  # the pool retries, on another server
            timeout=openai.Timeout(self.cfg.read_timeout_s, connect=self.cfg.connect_timeout_s),
            http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [count_bytes]}),
        )

    def _rank(self, stream: str | None, backend: Backend) -> bytes:
        return hashlib.blake2b(f"{stream}\n{backend.url}".encode(), digest_size=8).digest()

    def order(self, stream: str | None) -> list[Backend]:
        """The stream's own order of servers (rendezvous hashing: the same in every front end,
        and dropping a server moves only the streams it was first for)."""
        return sorted(self.backends, key=lambda b: self._rank(stream, b))

    def failed(self, backend: Backend, error: str) -> None:
        """Record a failure of ``backend``: ejected, next try after the backoff."""
        backend.failures += 1
        backend.last_error = error
        delay = min(self.cfg.backend_backoff_max_s, self.cfg.backend_backoff_s * 2 ** (backend.failures - 1))
        backend.retry_at = time.monotonic() + delay
        if backend.state == "up":
            backend.ejections += 1
            log.warning("remote server %s ejected: %s (next try in %.1f s)", backend.label, error, delay)
        backend.state = "down"

    def recovered(self, backend: Backend) -> None:
        """Record that ``backend`` answered: it takes requests, its backoff starts over."""
        if backend.state == "down":
            log.info("remote server %s is back", backend.label)
        backend.state = "up"
        backend.failures = 0

    async def _probe(self, backend: Backend) -> None:
        """``GET /models`` with the connect timeout; the server is up again if it answers and
        serves the model. Concurrent callers share one probe (a caller that is stopped leaves
        it running for the others; :meth:`settle` waits for it)."""
        if backend._probe is None or backend._probe.done():
            backend._probe = asyncio.ensure_future(self._run_probe(backend))
        await asyncio.shield(backend._probe)

    async def settle(self) -> None:
        """Wait for probes still running, so that no task outlives a batch."""
        probes = [b._probe for b in self.backends if b._probe is not None and not b._probe.done()]
        await asyncio.gather(*probes, return_exceptions=True)

    async def _run_probe(self, backend: Backend) -> None:
        name = self.cfg.name or self.cfg.id
        try:
            models = await backend.client.models.list(timeout=self.cfg.connect_timeout_s)
        except (openai.APIError, httpx2.HTTPError) as err:
            self.failed(backend, f"probe failed: {describe(err)}")
            return
        served = [m.id for m in models.data]
        if name not in served:
            self.failed(backend, f"does not serve model {name!r} (it serves: {', '.join(served) or 'nothing'})")
            return
        self.recovered(backend)

    async def acquire(
        self, stream: str | None, preferred: list[Backend | None], tried: list[Backend], deadline: float
    ) -> Backend:
        """A server for one request, its slot taken: ``preferred[0]`` (the batch's server)
        while it is up and has a free slot, else the least busy of the others not ``tried``.
        Waits for a free slot until ``deadline``; raises :class:`RemoteError`."""
        while True:
            candidates = [b for b in self.backends if b not in tried]
            if not candidates:
                raise RemoteError(self._unavailable(tried))
            now = time.monotonic()
            due = sorted((b for b in candidates if b.state == "down" and now >= b.retry_at), key=lambda b: b.retry_at)
            for backend in due:
                await self._probe(backend)
            up = [b for b in candidates if b.state == "up"]
            if not up and not due:
                await self._probe(min(candidates, key=lambda b: b.retry_at))  # the last resort: no backoff
                up = [b for b in candidates if b.state == "up"]
            if not up:
                raise RemoteError(self._unavailable(candidates))
            free = [b for b in up if b.in_flight < self.cfg.max_in_flight]
            if free:
                first = preferred[0]
                if first in free:
                    chosen = first
                else:
                    ranks = {b.url: i for i, b in enumerate(self.order(stream))}
                    chosen = min(free, key=lambda b: (b.in_flight, ranks[b.url]))
                    if first is None:
                        preferred[0] = chosen
                chosen.in_flight += 1
                return chosen
            if time.monotonic() >= deadline:
                raise RemoteError(
                    f"no free request slot within {self.cfg.slot_timeout_s:g} s: every server is at "
                    f"model.max_in_flight={self.cfg.max_in_flight} ({', '.join(b.label for b in up)})"
                )
            await asyncio.sleep(STOP_POLL_S)

    def _unavailable(self, backends: list[Backend]) -> str:
        parts = [f"{b.label} ({b.last_error or b.state})" for b in backends]
        return "no remote server could take the question: " + "; ".join(parts)

    def statuses(self) -> list[dict[str, Any]]:
        return [b.status() for b in self.backends]

    async def close(self) -> None:
        for backend in self.backends:
            await backend.client.close()


def describe(err: BaseException) -> str:
    """A short, credential-free account of an HTTP failure."""
    if isinstance(err, openai.APIStatusError):
        text = f"HTTP {err.status_code}: {err.message}"
    elif isinstance(err, openai.APITimeoutError | httpx2.TimeoutException):
        text = "timed out"
    else:
        # openai wraps transport errors (connection refused, reset) as their cause.
        cause = err.__cause__ if isinstance(err, openai.APIConnectionError) and err.__cause__ is not None else err
        text = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return mask_url(text)


@dataclass
class _Reply:
    """One request's progress, kept outside its task so a stopped task leaves it behind."""

    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    stopped: bool = False

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self.pieces),
            token_ids=self.token_ids,
            stopped=self.stopped,
            first_token_at=self.first_token_at,
        )


# -- one request: its attempts on the pool's servers and the streaming of each -------------
# (module-level functions, so that RemoteEngine keeps the Engine side, request building and
# the batch's orchestration)


async def _answer(
    pool: BackendPool,
    slot_timeout_s: float,
    stream: str | None,
    preferred: list[Backend | None],
    body: dict[str, Any],
    reply: _Reply,
    on_text: Callable[[str], None],
    should_stop: Callable[[], bool],
) -> None:
    """Answer one request of a batch: acquire a server of ``pool`` and stream from it, moving
    to the next server while attempts fail before the first token."""
    deadline = time.monotonic() + slot_timeout_s
    tried: list[Backend] = []
    while True:
        backend = await pool.acquire(stream, preferred, tried, deadline)
        tried.append(backend)
        try:
            retry = await _stream(pool, backend, body, reply, on_text, should_stop)
        except asyncio.CancelledError:
            backend.outcomes["stopped"] += 1
            raise
        finally:
            backend.in_flight -= 1
        if not retry:
            return
        # Failed before its first token: the next server may answer it.
        preferred[0] = None


async def _stream(
    pool: BackendPool,
    backend: Backend,
    body: dict[str, Any],
    reply: _Reply,
    on_text: Callable[[str], None],
    should_stop: Callable[[], bool],
) -> bool:
    """One attempt on ``backend``; True when it failed before the first token and another
    server may be tried (the failure is then recorded), else done. Raises :class:`RemoteError`."""
    sent = time.monotonic()
    finish: str | None = None
    try:
        response = await backend.client.chat.completions.create(**body)
        async with response:
            async for chunk in response:
                if should_stop():
                    reply.stopped = True
                    backend.outcomes["stopped"] += 1
                    return False
                for choice in chunk.choices:
                    ids = getattr(choice, "token_ids", None) or []
                    if ids and reply.first_token_at is None:
                        reply.first_token_at = time.monotonic()
                        backend.last_first_token_s = reply.first_token_at - sent
                        backend.first_token_s_sum += backend.last_first_token_s
                        backend.first_token_count += 1
                    reply.token_ids.extend(ids)
                    piece = choice.delta.content if choice.delta is not None else None
                    if piece:
                        reply.pieces.append(piece)
                        on_text(piece)
                    finish = choice.finish_reason or finish
                if chunk.usage is not None:
                    backend.prompt_tokens += chunk.usage.prompt_tokens
                    details = chunk.usage.prompt_tokens_details
                    backend.cached_tokens += (details.cached_tokens or 0) if details is not None else 0
    except openai.APIStatusError as err:
        if err.status_code < 500 and err.status_code not in _SERVER_FAULT:
            backend.outcomes["failed"] += 1  # the request's fault: the server stays in
            raise RemoteError(f"remote server {backend.label} refused the question: {describe(err)}") from None
        return _attempt_failed(pool, backend, reply, describe(err))
    except (openai.APIError, httpx2.HTTPError) as err:
        return _attempt_failed(pool, backend, reply, describe(err))
    if finish is None:
        return _attempt_failed(pool, backend, reply, "the answer's stream ended without a finish reason")
    pool.recovered(backend)
    backend.outcomes["answered"] += 1
    return False


def _attempt_failed(pool: BackendPool, backend: Backend, reply: _Reply, error: str) -> bool:
    backend.outcomes["failed"] += 1
    pool.failed(backend, error)
    if reply.token_ids or reply.pieces:
        raise RemoteError(
            f"remote server {backend.label} failed after {len(reply.token_ids)} tokens of the answer: {error}"
        )
    return True


class RemoteEngine(Engine):
    """Answers questions with the model served by OpenAI-compatible servers (vLLM); see the
    module's guarantees. The servers need (README, "Remote engine"):
    ``--media-io-kwargs '{"video": {"num_frames": -1}}'`` (vLLM keeps the first 32 frames of a
    JPEG video otherwise) and ``--enable-prompt-tokens-details`` (cached prompt tokens in
    ``/metrics``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        from streamer.inference.loader import ModelLoadError
        from streamer.inference.tiny import GIBBERISH_NOTE

        api_key = None
        if cfg.api_key_env is not None:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise ModelLoadError(f"model.api_key_env names {cfg.api_key_env}, which is not set or empty")
        self.cfg = cfg
        self.model_id = cfg.id
        self.served_name = cfg.name or cfg.id
        self.note = GIBBERISH_NOTE if cfg.is_tiny else None
        self.pool = BackendPool(cfg, api_key)
        self.jpeg = JpegFrames(cfg.jpeg_cache_mb * 2**20, cfg.jpeg_quality)
        self._warmed: dict[str, tuple[Hashable, ...]] = {}
        self._loop = asyncio.new_event_loop()

    # -- Engine ---------------------------------------------------------------------------

    def generate_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
        *,
        on_results: Sequence[Callable[[GenerationResult], None]] | None = None,
        joiners: Callable[[int], list[Joiner]] | None = None,
    ) -> list[GenerationResult]:
        """Send the requests at once (the server batches them) and stream each one's answer;
        results go to ``on_results`` when all have ended (``joiners`` are left to the loop)."""
        bodies = [self.request_body(r) for r in requests]
        streams = {r.stream for r in requests}
        stream = streams.pop() if len(streams) == 1 else None
        results = self._loop.run_until_complete(self._batch(stream, bodies, on_texts, should_stops))
        for on_result, result in zip(on_results or [], results, strict=False):
            on_result(result)
        return results

    def warm(self, stream: str, frames: Sequence[np.ndarray], ids: Sequence[Hashable], sample_fps: float) -> bool:
        """Encode the newest window's new frames while no question waits (once per window)."""
        key = tuple(ids)
        if self._warmed.get(stream) == key:
            return False
        self._warmed[stream] = key
        return self.jpeg.encode_missing(stream, frames, ids) > 0

    def stats(self) -> dict[str, int]:
        return {
            "jpeg_cache_entries": len(self.jpeg),
            "jpeg_cache_bytes": self.jpeg.bytes,
            "jpeg_cache_limit_bytes": self.jpeg.max_bytes,
            "jpeg_cache_hits": self.jpeg.hits,
            "jpeg_cache_misses": self.jpeg.misses,
        }

    def backend_statuses(self) -> list[dict[str, Any]]:
        """Each server's state, requests and latency (``/healthz`` ``model.backends``, ``/metrics``)."""
        return self.pool.statuses()

    def close(self) -> None:
        """Close the HTTP clients and the event loop (the engine is unusable after)."""
        self._loop.run_until_complete(self.pool.close())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    # -- requests -------------------------------------------------------------------------

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The chat-completion request for ``request``: the same window gives the same body."""
        if request.mode == "image":
            frame = self.jpeg.frame(
                request.stream, None if request.frame_ids is None else request.frame_ids[-1], request.frames[-1]
            )
            visual = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + frame}}
        else:
            frames = self.jpeg.window(request.stream, request.frames, request.frame_ids)
            visual = {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(frames)}}
        messages: list[dict[str, Any]] = []
        if self.cfg.system_prompt:
            messages.append({"role": "system", "content": self.cfg.system_prompt})
        # The video before the question, as the local engine prompts: questions about one
        # window share the prompt up to the end of the video.
        messages.append({"role": "user", "content": [visual, {"type": "text", "text": request.question}]})
        return {
            "model": self.served_name,
            "messages": messages,
            "max_tokens": request.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.sampling(request.sampling),
            "extra_body": {"return_token_ids": True, **self.sampling_extra()},
        }

    def sampling(self, own: Sampling | None = None) -> dict[str, Any]:
        """The OpenAI sampling fields: ``temperature: 0`` (greedy) unless sampling is configured
        or the question samples (``own``: its settings over the configured ones)."""
        cfg = self.cfg
        fields: dict[str, Any]
        if not cfg.do_sample:
            fields = {"temperature": 0.0}
        else:
            fields = {"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
        if own is not None:
            if own.generate_kwargs().get("do_sample") is False:
                return {"temperature": 0.0}
            if own.generate_kwargs().get("do_sample") and not fields.get("temperature"):
                fields["temperature"] = cfg.temperature or 1.0  # sampling, at the configured temperature
            fields.update({k: v for k, v in asdict(own).items() if v is not None})
        return {k: v for k, v in fields.items() if v is not None}

    def sampling_extra(self) -> dict[str, Any]:
        """vLLM's sampling fields beyond OpenAI's."""
        cfg = self.cfg
        fields = {"repetition_penalty": cfg.repetition_penalty, "top_k": cfg.top_k if cfg.do_sample else None}
        return {k: v for k, v in fields.items() if v is not None}

    async def _batch(
        self,
        stream: str | None,
        bodies: list[dict[str, Any]],
        on_texts: Sequence[Callable[[str], None]],
        should_stops: Sequence[Callable[[], bool]],
    ) -> list[GenerationResult]:
        replies = [_Reply() for _ in bodies]
        preferred: list[Backend | None] = [None]  # the batch's server, chosen by its first request
        tasks = [
            asyncio.ensure_future(
                _answer(self.pool, self.cfg.slot_timeout_s, stream, preferred, body, reply, on_text, should_stop)
            )
            for body, reply, on_text, should_stop in zip(bodies, replies, on_texts, should_stops, strict=True)
        ]
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=STOP_POLL_S, return_when=asyncio.FIRST_EXCEPTION)
                for task, reply, should_stop in zip(tasks, replies, should_stops, strict=True):
                    if not task.done() and should_stop():
                        reply.stopped = True
                        task.cancel()  # closes its HTTP stream
                failed = [t for t in done if not t.cancelled() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                if not pending:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.pool.settle()
            # Streams left early leave their async generators to be closed by tasks that the
            # loop scheduled meanwhile: let those run before the loop stops until the next batch.
            for _ in range(3):
                await asyncio.sleep(0)
        return [reply.result() for reply in replies]
