"""Load Qwen2-VL and its processor with ``from_pretrained``: hub id or local folder.

The same code loads ``Qwen/Qwen2-VL-2B-Instruct`` from the Hub and the project's tiny
random models from their cache folders; ``tiny-random`` (and the other ids in
``TINY_MODEL_IDS``) are only resolved to their folders first.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamer.config import ModelConfig

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model or processor could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    model_id: str
    path: str
    #: Shown to users next to every answer where it matters (e.g. random weights).
    note: str | None = None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device_and_dtype(cfg: ModelConfig) -> tuple[torch.device, torch.dtype]:
    """CUDA + bfloat16 when a GPU is there (and not refused), else CPU + float32."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    if cfg.dtype != "auto":
        return device, _DTYPES[cfg.dtype]
    # bf16 is no faster than fp32 on CPUs without AMX, and fp32 is exact there.
    return device, (torch.bfloat16 if use_cuda else torch.float32)


def resolve_model_path(model_id: str, progress: Callable[[str], None] | None = None) -> tuple[str, str | None]:
    """The ``from_pretrained`` argument for a configured model id, and a note for users."""
    from streamer.config import TINY_MODEL_IDS

    if model_id in TINY_MODEL_IDS:
        from streamer.inference.tiny import GIBBERISH_NOTE, ensure_tiny_model

        return str(ensure_tiny_model(model_id, progress=progress)), GIBBERISH_NOTE
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder (no config.json in it)")
        marker = path / "STREAMER_TINY_MODEL.json"
        if marker.is_file():
            from streamer.inference.tiny import GIBBERISH_NOTE

            return str(path), GIBBERISH_NOTE
        return str(path), None
    return model_id, None


def load_time_fusions(cfg: ModelConfig) -> dict[str, Any]:
    """``from_pretrained``'s ``fusion_config`` for ``cfg``: transformers' own load-time module
    swaps, with the checkpoint's weights converted as they load.

    ``patch_embeddings``: Qwen2-VL's and Qwen2.5-VL's patch embedding is a Conv3d whose stride
    is its kernel, so each output is one patch's dot products, which the fusion computes as a
    Linear over the flattened patch (one GEMM; the difference is the summation order, ~1e-6
    relative). On this project's 2-core CPU the convolution takes 87 ms for a 448x448 pair's
    1024 patches and the Linear 18 ms: about 4 % of the pair's pass through the tower at the
    benchmark's shape (a quarter of Qwen2-VL-2B's depth), about 1 % at full depth. Some GPU
    stacks hit far slower Conv3d kernels. Models without such a module load unchanged."""
    return {"fusion_config": {"patch_embeddings": True}} if cfg.patch_embed_linear else {}


def load_model(cfg: ModelConfig, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Load model and processor; raises :class:`ModelLoadError` with a clear message."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    say = progress or (lambda msg: None)
    path, note = resolve_model_path(cfg.id, say)
    device, dtype = pick_device_and_dtype(cfg)
    attn = cfg.attn_implementation
    if attn == "flash_attention_2" and device.type != "cuda":
        raise ModelLoadError("attn_implementation 'flash_attention_2' needs a CUDA device; use 'sdpa' on CPU")
    say(f"loading {cfg.id} on {device.type} ({str(dtype).removeprefix('torch.')}, attention {attn})")
    try:
        processor = AutoProcessor.from_pretrained(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=dtype, attn_implementation=attn, **load_time_fusions(cfg)
            )
    except ImportError as err:
        raise ModelLoadError(f"cannot load {cfg.id} with attention '{attn}': {err}") from None
    except OSError as err:
        raise ModelLoadError(
            f"cannot load model {cfg.id!r}: {err}\n"
            "Give a local folder, or a hub id with network access (HF_HOME holds the download cache)."
        ) from None
    model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    say(f"model ready: {params / 1e6:.1f} M parameters")
    return LoadedModel(
        model=model, processor=processor, device=device, dtype=dtype, model_id=cfg.id, path=path, note=note
    )
