"""Engines by name: ``model.backend`` picks one, and only the chosen one is imported.

Each backend is a factory ``(ModelConfig, progress) -> Engine``. Importing this module
imports no engine, and so no torch: the CLI checks a config's backend before anything heavy
loads. A new backend (a remote vLLM server, say) is one entry here and one module beside
the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streamer.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from streamer.inference.engine import Engine

Progress = Callable[[str], None]
EngineFactory = Callable[[ModelConfig, Progress | None], "Engine"]


def _transformers(cfg: ModelConfig, progress: Progress | None) -> Engine:
    """The model in this process, with transformers (``from_pretrained``)."""
    from streamer.inference.loader import load_model
    from streamer.inference.transformers_engine import TransformersEngine

    return TransformersEngine(load_model(cfg, progress), cfg)


def _openai(cfg: ModelConfig, progress: Progress | None) -> Engine:
    """OpenAI-compatible servers (vLLM) over HTTP; no model in this process."""
    from streamer.inference.remote import RemoteEngine

    return RemoteEngine(cfg)


BACKENDS: dict[str, EngineFactory] = {"transformers": _transformers, "openai": _openai}


def engine_factory(backend: str) -> EngineFactory:
    """The factory registered as ``backend``; :class:`ConfigError` naming the field if none is."""
    factory = BACKENDS.get(backend)
    if factory is None:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"model.backend: unknown engine {backend!r} (known: {known})")
    return factory


def create_engine(cfg: ModelConfig, progress: Progress | None = None) -> Engine:
    """Build the engine ``cfg.backend`` names (slow: loads the model)."""
    return engine_factory(cfg.backend)(cfg, progress)


def engine_device(engine: Engine | None) -> str:
    """Where the engine computes ("cpu", "cuda:0"; "remote" when not in this process)."""
    # Until engines report this themselves (Engine.stats(), after issue 12), the one place that
    # looks inside an engine.
    loaded = getattr(engine, "loaded", None)
    return str(loaded.device) if loaded is not None else "remote"


def engine_memory(engine: Engine | None) -> dict[str, int]:
    """Bytes the engine's model holds in this process: its weights, and on CUDA what the
    allocator holds. Empty for an engine without a local model."""
    loaded: Any = getattr(engine, "loaded", None)
    if loaded is None:
        return {}
    import torch  # a local model is loaded: torch is imported already

    model = loaded.model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    out = {"weights": weights}
    if loaded.device.type == "cuda":
        out["cuda_allocated"] = torch.cuda.memory_allocated(loaded.device)
        out["cuda_reserved"] = torch.cuda.memory_reserved(loaded.device)
    return out


def engine_backends(engine: Engine | None) -> list[dict[str, Any]] | None:
    """A remote engine's servers (state, requests, latency), or None for a local engine."""
    statuses = getattr(engine, "backend_statuses", None)
    return statuses() if statuses is not None else None
