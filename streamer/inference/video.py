"""Build Qwen2-VL's video input from ring-buffer frames, exactly as the reference does.

The reference is qwen-vl-utils' ``process_vision_info`` on a list of frames followed by the
processor. For a list of frames it (1) resizes each frame on its own with the image rule
(multiples of 56, within ``min_pixels``..``max_pixels``, PIL bicubic), (2) pads the clip to an
even length by repeating the last frame, (3) resizes the whole clip with the video rule
(multiples of 28, the per-frame cap lowered by the total-pixel budget, torchvision bicubic
with antialias). :func:`video_tensor` repeats those steps on numpy frames, so the pixels the
model sees are the reference's, bit for bit (``tests/test_video_inputs.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from qwen_vl_utils import vision_process as qvu
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

PATCH_SIZE = 14
#: Side multiple of a frame after the video resize (patch 14 x spatial merge 2).
VIDEO_FACTOR = PATCH_SIZE * qvu.SPATIAL_MERGE_SIZE
#: qwen-vl-utils hands ``VIDEO_FACTOR`` to ``fetch_image`` as its patch size, so the first,
#: per-frame resize uses multiples of 56.
FRAME_FACTOR_PIXELS = VIDEO_FACTOR * qvu.SPATIAL_MERGE_SIZE
TEMPORAL_PATCH = qvu.FRAME_FACTOR


def frame_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of a frame after the per-frame resize."""
    return qvu.smart_resize(height, width, factor=FRAME_FACTOR_PIXELS, min_pixels=min_pixels, max_pixels=max_pixels)


def clip_size(height: int, width: int, num_frames: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of every frame after the whole-clip resize, for a clip of ``num_frames``."""
    total_pixels = qvu.MODEL_SEQ_LEN * VIDEO_FACTOR * VIDEO_FACTOR * 0.9
    frame_max = qvu.VIDEO_MAX_TOKEN_NUM * VIDEO_FACTOR * VIDEO_FACTOR
    cap = max(min(frame_max, total_pixels / num_frames * TEMPORAL_PATCH), int(min_pixels * 1.05))
    return qvu.smart_resize(height, width, factor=VIDEO_FACTOR, min_pixels=min_pixels, max_pixels=min(max_pixels, cap))


def resize_frame(rgb: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    """The per-frame step: one RGB frame resized like ``qwen_vl_utils.fetch_image``."""
    h, w = frame_size(rgb.shape[0], rgb.shape[1], min_pixels, max_pixels)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC))


def video_tensor(frames: Sequence[np.ndarray], *, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """A ``T x 3 x H x W`` float tensor (values 0..255) for the processor, ``T`` even.

    All frames must share one size (a stream that changes resolution mid-window is cut by
    the caller to the frames of the newest size).
    """
    if not frames:
        raise ValueError("a video needs at least one frame")
    resized = [resize_frame(f, min_pixels, max_pixels) for f in frames]
    if len(resized) % TEMPORAL_PATCH:
        resized.append(resized[-1])
    clip = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    h, w = clip_size(clip.shape[2], clip.shape[3], clip.shape[0], min_pixels, max_pixels)
    clip = tvf.resize(clip, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return clip.float()


def image_of(rgb: np.ndarray, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """One frame as the image input, resized like ``qwen_vl_utils.fetch_image`` (multiples of 28)."""
    h, w = qvu.smart_resize(
        rgb.shape[0], rgb.shape[1], factor=VIDEO_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels
    )
    image = Image.fromarray(rgb)
    return image if (h, w) == rgb.shape[:2] else image.resize((w, h), Image.Resampling.BICUBIC)


def chat_messages(question: str, system_prompt: str | None = None, mode: str = "video") -> list[dict[str, Any]]:
    """The conversation for one question about one video (or, in image mode, one image).

    The visual input comes before the question, so every question about the same window
    shares the prompt prefix up to ``<|vision_end|>``.
    """
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": [{"type": mode}, {"type": "text", "text": question}]})
    return messages


def processor_inputs(
    processor: Any,
    frames: Sequence[np.ndarray],
    question: str,
    *,
    sample_fps: float,
    min_pixels: int,
    max_pixels: int,
    system_prompt: str | None = None,
    mode: str = "video",
) -> Any:
    """Tokenised prompt plus the video (or, in image mode, the last frame as an image) as a
    ``BatchFeature`` for one question."""
    messages = chat_messages(question, system_prompt, mode)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if mode == "image":
        image = image_of(frames[-1], min_pixels=min_pixels, max_pixels=max_pixels)
        return processor(text=[prompt], images=[image], size=size, return_tensors="pt")
    video = video_tensor(frames, min_pixels=min_pixels, max_pixels=max_pixels)
    return processor(
        text=[prompt],
        videos=[video],
        fps=sample_fps,
        do_sample_frames=False,
        size=size,
        return_tensors="pt",
    )
