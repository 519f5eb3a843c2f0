"""The seed pipeline, the yardstick of exactness: qwen-vl-utils' ``process_vision_info``, the
processor, ``model.generate``, one question at a time.

streamer's promise is that its answers are this pipeline's, token for token, only sooner.
The tests and ``streamer bench`` compare against it through this module alone. It shares
no code with streamer's own input path (:mod:`streamer.inference.video`) on purpose.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamer.config import ModelConfig


def seed_model_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` for loading the model as the seed did: ``from_pretrained`` with the checkpoint's
    own modules, without streamer's load-time fusions (:func:`~streamer.inference.loader.load_time_fusions`)."""
    return cfg.model_copy(update={"patch_embed_linear": False})


def reference_inputs(
    processor: Any,
    frames: list[np.ndarray],
    question: str,
    *,
    min_pixels: int,
    max_pixels: int,
    fps: float = 2.0,
    system_prompt: str | None = None,
) -> Any:
    """The seed's pipeline up to ``generate``: qwen-vl-utils' ``process_vision_info`` on the
    frames, then the processor, with the keyword arguments qwen-vl-utils hands back."""
    from PIL import Image
    from qwen_vl_utils import process_vision_info

    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(
        {
            "role": "user",
            "content": [
                {
                    "type": "video",
                    "video": [Image.fromarray(f) for f in frames],
                    "min_pixels": min_pixels,
                    "max_pixels": max_pixels,
                    "sample_fps": fps,
                },
                {"type": "text", "text": question},
            ],
        }
    )
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    _, videos, kwargs = process_vision_info(messages, return_video_kwargs=True)
    return processor(
        text=[text],
        videos=videos,
        fps=kwargs["fps"][0],
        do_sample_frames=kwargs["do_sample_frames"],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        return_tensors="pt",
    )


def reference_generate(
    model: Any,
    inputs: Any,
    *,
    max_new_tokens: int,
    seed: int | None = None,
    streamer: Any = None,
    **generation: Any,
) -> list[int]:
    """``model.generate`` on :func:`reference_inputs`' output: the new token ids.

    ``generation`` overrides the model's ``generation_config`` (none: the checkpoint's own
    settings, as the seed ran). ``seed``: ``torch.manual_seed(seed)`` first, as a user
    script would (torch's random state is restored after)."""
    import torch

    inputs = inputs.to(model.device)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **generation)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def reference_text(processor: Any, token_ids: list[int]) -> str:
    """The answer's text, decoded as the seed decoded it."""
    return processor.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
