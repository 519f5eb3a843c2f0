"""Settings for a streamer server: sources, model and server, loaded from YAML.

Everything a user can set lives in the pydantic models below. A YAML file in ``configs/``
loads into :class:`Settings`; command-line flags are applied on top with
:func:`apply_overrides`. Both paths validate, and a bad value fails at start-up with
:class:`ConfigError`, whose message names the offending field.

This module imports nothing heavy (no torch, no OpenCV): the CLI reads configs before it
decides whether a model is needed at all.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

#: The model id that names the project's own tiny random-weight Qwen2-VL. It is resolved to
#: a folder in the cache (built on first use) and then loaded with ``from_pretrained`` like
#: any other model. Its answers are gibberish.
TINY_MODEL_ID = "tiny-random"
#: Every tiny model id: the default above, one whose generation settings are those an Instruct
#: checkpoint ships, and a tiny Qwen2.5-VL. Resolved and loaded the same way.
TINY_MODEL_IDS = (TINY_MODEL_ID, "tiny-random-instruct", "tiny-random-qwen2.5-vl")

#: The configuration ``streamer demo`` runs (``configs/demo.yaml`` holds the same).
DEMO_CONFIG: dict[str, Any] = {
    "sources": [{"name": "demo", "url": "demo", "sample_fps": 2.0, "max_side": 448}],
    "model": {"id": TINY_MODEL_ID, "frames": 8, "max_new_tokens": 32},
    "server": {"host": "127.0.0.1", "port": 8765},
}


#: Where built artefacts (the tiny model) are cached. ``STREAMER_CACHE`` overrides it.
def cache_dir() -> Path:
    env = os.environ.get("STREAMER_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamer"


#: Where the server keeps what it stores (``events.db``): ``events.data_dir`` (``--data-dir``),
#: else ``STREAMER_DATA``, else ``$XDG_DATA_HOME/streamer`` (``~/.local/share/streamer``).
#: XDG by hand, as :func:`cache_dir` does: no dependency for two environment variables.
def default_data_dir() -> Path:
    env = os.environ.get("STREAMER_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "streamer"


class ConfigError(ValueError):
    """A configuration could not be read or is invalid; the message says where and why."""


def _not_above(low: float, high: float, low_name: str, high_name: str) -> None:
    """A backoff's first wait may not exceed its longest (both names in the message)."""
    if low > high:
        raise ValueError(f"{low_name} must not exceed {high_name}")


def _http_url(url: str, example: str = "") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL{example}")
    return url


class _Strict(BaseModel):
    # A typo in a YAML key must fail loudly instead of silently using a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SOURCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class SourceConfig(_Strict):
    """One video source and how it is sampled into its ring buffer."""

    name: str = Field(pattern=SOURCE_NAME_PATTERN, description="stream id used by clients")
    url: str = Field(
        min_length=1,
        description="'demo' (synthetic test pattern), a webcam index or /dev/videoN, "
        "a file path, an rtsp:// (or other FFmpeg) URL, or 'push' (frames are handed in)",
    )
    sample_fps: float = Field(default=2.0, gt=0, le=60, description="frames kept per second of video")
    max_side: int = Field(default=640, ge=56, le=4096, description="longer side of kept frames, pixels")
    buffer_frames: int = Field(default=64, ge=2, le=4096, description="ring buffer capacity")
    mode: Literal["video", "image"] | None = Field(default=None, description="questions' input; None: model.mode")
    loop: bool = Field(default=True, description="files: start again at the end")
    realtime: bool = Field(default=True, description="files and demo: pace reading at the video's own speed")
    transport: Literal["tcp", "udp"] = Field(default="tcp", description="rtsp: RTP transport")
    open_timeout_s: float = Field(default=10.0, gt=0, le=300, description="network sources: give up opening after")
    stall_timeout_s: float = Field(default=10.0, gt=0, le=300, description="reconnect when no frame came for this long")
    backoff_initial_s: float = Field(default=0.5, gt=0, le=60, description="first wait before reopening a source")
    backoff_max_s: float = Field(default=30.0, gt=0, le=3600, description="longest wait between reopen attempts")
    width: int | None = Field(default=None, ge=16, description="demo and webcam: requested width")
    height: int | None = Field(default=None, ge=16, description="demo and webcam: requested height")
    fps: float | None = Field(default=None, gt=0, le=240, description="demo and webcam: requested frame rate")
    context: str | None = Field(
        default=None,
        max_length=1000,
        description="a sentence about what the camera shows, put before every question about it",
    )

    @model_validator(mode="after")
    def _backoff_ordered(self) -> SourceConfig:
        _not_above(self.backoff_initial_s, self.backoff_max_s, "backoff_initial_s", "backoff_max_s")
        return self

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.url)


#: ``push``: nothing is read; frames are handed in (a browser camera, an uploaded clip).
SourceKind = Literal["demo", "webcam", "rtsp", "file", "push"]


def source_kind(url: str) -> SourceKind:
    """Classify a source URL: the one rule every part of streamer uses."""
    if url in ("demo", "push"):
        return url  # type: ignore[return-value]
    if url.isdigit() or re.fullmatch(r"/dev/video\d+", url):
        return "webcam"
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
        return "rtsp"
    return "file"


#: The port an origin leaves out when it is the scheme's default.
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")


def _split_authority(authority: str) -> tuple[str, int | None] | None:
    """``host[:port]`` -> (host in lower case, IPv6 without brackets; port), or None if malformed."""
    try:
        parts = urlsplit("//" + authority)
        port = parts.port
    except ValueError:
        return None
    name = parts.hostname
    if not name or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    if ":" in name:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    elif not _HOST_NAME.match(name):
        return None
    return name, port


def host_name(host_header: str) -> str | None:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]:port``): lower case, IPv6
    without brackets; None when it is not a well-formed host."""
    split = _split_authority(host_header)
    return split[0] if split else None


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1), with or without IPv6 brackets."""
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def serialized_origin(value: str) -> str | None:
    """``value`` as a browser writes it in an ``Origin`` header (lower case, the scheme's default
    port left out), or None when it is not an origin: ``null``, or a URL with a path or user.

    Both sides of every origin comparison go through here, so ``HTTP://Localhost:80`` and
    ``http://localhost`` are the same origin."""
    scheme, sep, authority = value.partition("://")
    scheme = scheme.lower()
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        return None
    split = _split_authority(authority)
    if split is None:
        return None
    name, port = split
    host = f"[{name}]" if ":" in name else name
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return f"{scheme}://{host}"


class ModelConfig(_Strict):
    """Which Qwen2-VL to load and how to prompt it."""

    id: str = Field(
        default="Qwen/Qwen2-VL-2B-Instruct",
        min_length=1,
        description=f"hub id or local folder; {', '.join(TINY_MODEL_IDS)}: the project's tiny random models",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    patch_embed_linear: bool = Field(
        default=True,
        description="load the vision tower's patch embedding (a Conv3d whose stride is its kernel) as the equal "
        "Linear, with transformers' fusion_config; the same products, several times faster (false: as the "
        "checkpoint declares it)",
    )
    onednn_few_rows: bool = Field(
        default=True,
        description="on CPU, multiply 4 to 128 rows by the decoder's float32 weights with oneDNN, where MKL takes "
        "up to twice as long (batch decode steps, question tails); false: every product with MKL",
    )
    frames: int = Field(default=8, ge=2, le=64, description="newest sampled frames given per question")
    min_pixels: int = Field(default=128 * 28 * 28, ge=4 * 28 * 28, description="per-frame pixel floor")
    max_pixels: int = Field(default=768 * 28 * 28, ge=4 * 28 * 28, description="per-frame pixel cap")
    max_new_tokens: int = Field(default=128, ge=1, le=1024)
    system_prompt: str | None = None
    mode: Literal["video", "image"] = Field(default="video", description="default input: newest frames or newest frame")
    # Generation settings: each one set here overrides the checkpoint's generation_config.json,
    # each one left unset keeps it (what model.generate does with keyword arguments).
    do_sample: bool | None = Field(default=None, description="sample instead of greedy decoding; None: the model's")
    temperature: float | None = Field(default=None, gt=0, le=10)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="sampling: seed every answer's draws; None: random"
    )
    fast_path: bool = Field(default=True, description="reuse vision work and batch questions about one window")
    vision_cache_mb: int = Field(default=512, ge=0, le=65536, description="memory for cached frame-pair embeddings")
    prewarm: bool = Field(default=True, description="encode and prefill new windows while no question waits")
    prefix_cache_windows: int = Field(
        default=4, ge=1, le=64, description="prefilled prompt prefixes kept (the newest windows)"
    )
    prefix_cache_mb: int = Field(
        default=1024, ge=0, le=1_048_576, description="memory for the KV caches of prefilled prompt prefixes"
    )
    batch_kv_mb: int = Field(
        default=2048,
        ge=0,
        le=1_048_576,
        description="memory for one batch's KV caches (copies of the prefix and what follows); "
        "a batch that would need more is decoded in parts",
    )
    max_batch: int = Field(default=8, ge=1, le=64, description="questions about one window decoded together")
    batch_window_ms: float = Field(
        default=20.0, ge=0, le=1000, description="how long a starting batch waits for more questions on its window"
    )
    batch_gap_ms: float = Field(
        default=3.0,
        ge=0,
        le=1000,
        description="a starting batch stops waiting once no question has come for this long (questions sent "
        "together arrive a few ms apart; a lone question need not wait the whole window)",
    )
    window_lag_s: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="a question may take a prepared window whose newest frame is this much older than the newest "
        "frame (0: always the newest frames); the answer says which frames it used",
    )
    frame_stride: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default=1,
        description="sampled frames from one frame of a video window to the next (1: consecutive, the newest "
        "frames); above 1 windows lie on a fixed grid of frame pairs, so they share vision work as the stream "
        "moves on, and their newest frame may be up to 2 x stride - 1 sampled frames old; auto: the smallest "
        "stride at which the loop keeps up with the streams (each new pair's encoding and prefill, measured, take at "
        "most 70% of the time), up to max_frame_stride",
    )
    max_frame_stride: int = Field(default=16, ge=1, le=64, description="frame_stride auto: the largest stride")
    prefill_chunk_tokens: int = Field(
        default=4096,
        ge=0,
        le=65536,
        description="prefills run one decoder layer at a time over chunks of at most this many tokens, so "
        "questions and cancels wait for one layer of one chunk, not a whole prefill (0: the whole prompt prefix "
        "in one chunk); each chunk costs a pass over the weights, so more chunks are slower",
    )
    backend: str = Field(
        default="transformers", min_length=1, description="engine: a name in streamer.inference.registry"
    )
    # The settings below are the remote engine's (backend "openai": vLLM or another
    # OpenAI-compatible server).
    base_url: str | None = Field(default=None, description="openai: a server's API root, e.g. http://host:8000/v1")
    base_urls: list[str] = Field(
        default_factory=list, description="openai: several servers (with base_url, if given): a pool"
    )
    name: str | None = Field(default=None, description="openai: the model name the servers serve; None: id")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="openai: environment variable with the API key"
    )
    connect_timeout_s: float = Field(default=3.0, gt=0, le=300, description="openai: connecting, and health probes")
    read_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="openai: longest silence in an answer's stream, first token included"
    )
    max_in_flight: int = Field(default=8, ge=1, le=1024, description="openai: requests open at once per server")
    slot_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="openai: longest wait for a free request slot before failing"
    )
    backend_backoff_s: float = Field(
        default=1.0, gt=0, le=600, description="openai: first wait before a failed server is tried again"
    )
    backend_backoff_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="openai: longest wait between tries of a failed server"
    )
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="openai: JPEG quality of the frames sent")
    jpeg_cache_mb: int = Field(
        default=64, ge=0, le=65536, description="openai: memory for frames' JPEG encodings, reused across questions"
    )

    def generation_kwargs(self) -> dict[str, Any]:
        """The generation settings this config sets, as ``generate`` keyword arguments; the
        ones left unset are absent, so the model's ``generation_config`` decides them."""
        names = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        return self

    @model_validator(mode="after")
    def _remote_settings(self) -> ModelConfig:
        urls = self.remote_urls
        if self.backend == "openai" and not urls:
            raise ValueError("backend 'openai' needs base_url or base_urls")
        if self.backend != "openai" and urls:
            raise ValueError("base_url and base_urls are for backend 'openai'")
        for url in urls:
            _http_url(url, " (e.g. http://127.0.0.1:8000/v1)")
        if len(set(urls)) != len(urls):
            raise ValueError("a server is listed twice in base_url/base_urls")
        _not_above(self.backend_backoff_s, self.backend_backoff_max_s, "backend_backoff_s", "backend_backoff_max_s")
        return self

    @property
    def remote_urls(self) -> list[str]:
        """The remote servers' API roots: ``base_url`` first, then ``base_urls``."""
        return ([self.base_url] if self.base_url else []) + list(self.base_urls)

    @property
    def is_tiny(self) -> bool:
        return self.id in TINY_MODEL_IDS


class IceServer(_Strict):
    """A STUN or TURN server (as in the browser's ``RTCIceServer``)."""

    urls: list[str] = Field(min_length=1, description="stun:host:port or turn:host:port?transport=udp|tcp")
    username: str | None = None
    credential: SecretStr | None = None


class PublishConfig(_Strict):
    """Streams that callers push in: a browser over WHIP, or JPEGs over the WebSocket."""

    max_streams: int = Field(default=4, ge=0, le=1000, description="published streams at once; 0: publishing off")
    max_side: int = Field(default=640, ge=56, le=4096, description="longer side kept; larger frames are downscaled")
    sample_fps: float = Field(default=2.0, gt=0, le=60, description="frames kept per second of a published stream")
    idle_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="hang up a publisher silent this long")
    stall_timeout_s: float = Field(default=5.0, gt=0, le=300, description="a published stream is down after this")
    max_frame_bytes: int = Field(default=1024 * 1024, ge=1024, le=16 * 1024 * 1024, description="largest JPEG frame")
    ice_servers: list[IceServer] = Field(
        default_factory=list, description="WHIP: STUN/TURN servers for the server's side; none: host candidates only"
    )


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    tokens: list[SecretStr] = Field(default_factory=list, description="access tokens; empty = no auth")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="browser Origins (scheme://host[:port]) allowed besides the server's own; '*' = any",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names accepted besides localhost and loopback addresses; set: checked on any bind",
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate: serve wss:// and https://")
    tls_key: Path | None = Field(default=None, description="PEM private key for tls_cert")
    queue_size: int = Field(default=32, ge=1, le=10_000, description="questions waiting at most")
    max_message_bytes: int = Field(
        default=64 * 1024, ge=1024, le=16 * 1024 * 1024, description="largest client message"
    )
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    max_open_per_connection: int = Field(default=8, ge=1, le=1000, description="asks and watches open at once")
    asks_per_minute: int = Field(default=60, ge=1, le=100_000, description="per connection; more get rate_limited")
    outbox_messages: int = Field(
        default=1000, ge=10, le=1_000_000, description="queued to a client before it is cut off"
    )
    ping_interval_s: float = Field(
        default=20.0, gt=0, description="keepalive ping; a peer silent past the timeout is dropped"
    )
    ping_timeout_s: float = Field(default=20.0, gt=0)
    shutdown_deadline_s: float = Field(default=10.0, gt=0, le=600, description="time to finish open answers on SIGTERM")
    log_json: bool = Field(default=False, description="log one JSON object per line")
    dashboard_dir: Path | None = Field(
        default=None, description="browser dashboard files; None: the dashboard shipped in the package"
    )
    publish: PublishConfig = Field(default_factory=PublishConfig)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} does not exist")
        return self

    @field_validator("allowed_origins")
    @classmethod
    def _origins_serialized(cls, origins: list[str]) -> list[str]:
        serialized = []
        for value in origins:
            origin = value if value == "*" else serialized_origin(value)
            if origin is None:
                raise ValueError(f"{value!r} is not an origin: write scheme://host[:port] (no path), or '*' for any")
            serialized.append(origin)
        return serialized

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_are_names(cls, hosts: list[str]) -> list[str]:
        names = []
        for value in hosts:
            bare = value.lower().removeprefix("[").removesuffix("]")
            name = host_name(f"[{bare}]" if ":" in bare else bare)
            if name != bare:
                raise ValueError(f"{value!r} is not a host name or IP address (give it without scheme or port)")
            names.append(name)
        return names

    @property
    def binds_loopback(self) -> bool:
        """Listening on a loopback address only: reachable from this machine alone."""
        return is_loopback_name(self.host)

    @field_validator("tokens")
    @classmethod
    def _tokens_non_empty(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        if any(not t.get_secret_value() for t in tokens):
            raise ValueError("an access token must not be empty")
        return tokens


RULE_NAME_PATTERN = SOURCE_NAME_PATTERN
_HOURS = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class AlertIfConfig(_Strict):
    """When a rule's answer is an alert: exactly one of the three (see
    :class:`streamer.inference.questions.AlertIf`, which applies it)."""

    contains: str | None = Field(default=None, min_length=1, description="case-insensitive text in the answer")
    regex: str | None = Field(default=None, min_length=1, description="Python regex searched in the answer")
    yes: bool = Field(default=False, description="the answer starts with a yes")

    @model_validator(mode="before")
    @classmethod
    def _yaml_yes_key(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare ``yes:`` key as the boolean True.
        if isinstance(data, dict) and True in data:
            data = {("yes" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, regex: str | None) -> str | None:
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"not a valid Python regex: {err}") from None
        return regex

    @model_validator(mode="after")
    def _exactly_one(self) -> AlertIfConfig:
        if sum((self.contains is not None, self.regex is not None, self.yes)) != 1:
            raise ValueError("give exactly one of contains, regex or yes: true")
        return self


class RuleConfig(_Strict):
    """A standing question the server asks on its own, whether or not anyone is connected."""

    name: str = Field(pattern=RULE_NAME_PATTERN, description="unique; the rule's id in events and the API")
    stream: str = Field(min_length=1)
    question: str = Field(min_length=1, max_length=4000)
    every_s: float = Field(ge=1, le=86400, description="seconds between rounds")
    frames: int | None = Field(default=None, ge=2, le=64, description="None: model.frames")
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024, description="None: model.max_new_tokens")
    mode: Literal["video", "image"] | None = None
    alert_if: AlertIfConfig | None = Field(default=None, description="None: rounds are recorded, never alerts")
    cooldown_s: float = Field(default=0, ge=0, le=7 * 86400, description="no second alert of this rule within")
    active: str | None = Field(
        default=None, description="local hours HH:MM-HH:MM it runs in (may wrap midnight); None: always"
    )
    when: Literal["always", "motion"] = Field(default="always", description="motion: only rounds after a change")
    motion_threshold: float = Field(
        default=0.02, gt=0, le=1, description="when: motion: the frame-to-frame change (0-1) that counts as motion"
    )

    @field_validator("active")
    @classmethod
    def _hours(cls, active: str | None) -> str | None:
        if active is not None and not _HOURS.match(active):
            raise ValueError("write hours as HH:MM-HH:MM, e.g. 07:30-19:00")
        return active


class WebhookConfig(_Strict):
    url: str = Field(min_length=1, description="http(s) URL the events are POSTed to")
    secret_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable with the HMAC secret"
    )
    kinds: list[Literal["alert", "round", "status"]] = Field(default_factory=lambda: ["alert"])
    timeout_s: float = Field(default=5.0, gt=0, le=120, description="one attempt's limit")
    retry_for_s: float = Field(default=3600.0, gt=0, le=7 * 86400, description="retry this long, then count it dead")
    backoff_initial_s: float = Field(default=1.0, gt=0, le=3600)
    backoff_max_s: float = Field(default=300.0, gt=0, le=86400)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        return _http_url(url)

    @model_validator(mode="after")
    def _backoff_ordered(self) -> WebhookConfig:
        _not_above(self.backoff_initial_s, self.backoff_max_s, "backoff_initial_s", "backoff_max_s")
        return self


class MqttConfig(_Strict):
    url: str = Field(description="mqtt://host:port (mqtts:// for TLS)")
    topic_prefix: str = Field(default="streamer", pattern=r"^[^#+\x00]+$")
    username: str | None = None
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tls: bool = Field(default=False, description="TLS to the broker (also implied by mqtts://)")
    client_id: str | None = Field(default=None, description="None: streamer-<prefix>")
    backoff_max_s: float = Field(default=30.0, ge=1, le=3600, description="longest wait between reconnects")

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"{url!r} is not an mqtt:// or mqtts:// URL")
        return url


class EventsConfig(_Strict):
    """Where events are stored and delivered."""

    data_dir: Path | None = Field(default=None, description="events.db goes here; None: STREAMER_DATA or XDG")
    max_age_days: float = Field(default=30, gt=0, le=36500, description="events older than this are deleted")
    max_count: int = Field(default=100_000, ge=100, le=100_000_000, description="only the newest this many are kept")
    thumbnail_width: int = Field(default=320, ge=32, le=1920)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    mqtt: MqttConfig | None = None

    @property
    def directory(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_data_dir()


class Settings(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    rules: list[RuleConfig] = Field(default_factory=list)
    events: EventsConfig = Field(default_factory=EventsConfig)

    @model_validator(mode="after")
    def _rules_known(self) -> Settings:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rules: names must be unique, repeated: {', '.join(dupes)}")
        for rule in self.rules:
            if self.source(rule.stream) is None:
                raise ValueError(f"rules: {rule.name!r} watches stream {rule.stream!r}, which is not in sources")
        return self

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        return sources

    def source(self, name: str) -> SourceConfig | None:
        return next((s for s in self.sources if s.name == name), None)


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_settings(data: dict[str, Any], origin: str = "config") -> Settings:
    """Validate a plain mapping into :class:`Settings` or raise :class:`ConfigError`."""
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (not yet validated)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, not {type(data).__name__}")
    return data


def load_settings(path: str | Path) -> Settings:
    return parse_settings(read_config_file(path), origin=str(path))


def parse_source_flag(flag: str) -> dict[str, str]:
    """``NAME=URL`` -> ``{"name": NAME, "url": URL}``; a bare URL is named ``cam0``."""
    name, sep, url = flag.partition("=")
    if not sep:
        raise ConfigError(f"--source expects NAME=URL, got {flag!r}")
    return {"name": name, "url": url}


def apply_overrides(
    data: dict[str, Any],
    *,
    sources: list[str] | None = None,
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
    tokens: list[str] | None = None,
    allowed_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    log_json: bool | None = None,
    data_dir: str | None = None,
    origin: str = "config",
) -> Settings:
    """Apply command-line flags on top of a config mapping and validate the result.

    ``--source`` flags replace a source of the same name or add a new one; ``--token``,
    ``--allowed-origin`` and ``--allowed-host`` flags are added to the configured ones. Tokens in the
    ``STREAMER_TOKENS`` environment variable (comma-separated) are added too, so they need
    not appear on a command line.
    """
    # Long on purpose: one branch per command-line flag, in the order `streamer serve --help` lists them.
    env_tokens = [t.strip() for t in os.environ.get("STREAMER_TOKENS", "").split(",") if t.strip()]
    tokens = [*(tokens or []), *env_tokens]
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if sources:
        current = [dict(s) if isinstance(s, dict) else s for s in merged.get("sources") or []]
        for flag in sources:
            entry = parse_source_flag(flag)
            for i, s in enumerate(current):
                if isinstance(s, dict) and s.get("name") == entry["name"]:
                    current[i] = {**s, "url": entry["url"]}
                    break
            else:
                current.append(entry)
        merged["sources"] = current
    if model is not None:
        merged.setdefault("model", {})
        merged["model"] = {**(merged["model"] or {}), "id": model}
    server = dict(merged.get("server") or {})
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    if tokens:
        server["tokens"] = list(server.get("tokens") or []) + list(tokens)
    if allowed_origins:
        server["allowed_origins"] = list(server.get("allowed_origins") or []) + list(allowed_origins)
    if allowed_hosts:
        server["allowed_hosts"] = list(server.get("allowed_hosts") or []) + list(allowed_hosts)
    if tls_cert is not None:
        server["tls_cert"] = tls_cert
    if tls_key is not None:
        server["tls_key"] = tls_key
    if log_json:
        server["log_json"] = True
    if server:
        merged["server"] = server
    if data_dir is not None:
        merged["events"] = {**(merged.get("events") or {}), "data_dir": data_dir}
    return parse_settings(merged, origin=origin)
