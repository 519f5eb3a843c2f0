"""streamer's video input equals the reference: qwen-vl-utils' process_vision_info + processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from streamer.inference.reference import reference_inputs
from streamer.inference.video import chat_messages, processor_inputs

VIDEO_MIN, VIDEO_MAX = 128 * 28 * 28, 768 * 28 * 28


@pytest.fixture(scope="module")
def processor(tiny_model: Path):
    return AutoProcessor.from_pretrained(tiny_model)


def _reference(processor, frames: list[np.ndarray], question: str, min_pixels: int, max_pixels: int, fps: float):
    return reference_inputs(processor, frames, question, min_pixels=min_pixels, max_pixels=max_pixels, fps=fps)


@pytest.mark.parametrize(
    ("height", "width", "count", "min_pixels", "max_pixels"),
    [
        (336, 448, 8, VIDEO_MIN, VIDEO_MAX),  # the demo's frames: no resize needed
        (480, 640, 7, VIDEO_MIN, VIDEO_MAX),  # odd count: the last frame is repeated
        (1080, 1920, 6, 100 * 784, 300 * 784),  # downscaled by the pixel cap
        (100, 140, 2, 4 * 784, 64 * 784),  # tiny frames, upscaled to the floor
        (720, 1280, 2, 256 * 784, 256 * 784),  # min == max
    ],
)
def test_video_input_matches_reference(processor, height, width, count, min_pixels, max_pixels) -> None:
    rng = np.random.default_rng(height * width + count)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    ours = processor_inputs(
        processor, frames, "What is moving?", sample_fps=2.0, min_pixels=min_pixels, max_pixels=max_pixels
    )
    ref = _reference(processor, frames, "What is moving?", min_pixels, max_pixels, 2.0)
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert ours["video_grid_thw"][0, 0].item() == (count + 1) // 2  # frame pairs, padded to even
    assert ours["pixel_values_videos"].dtype == ref["pixel_values_videos"].dtype
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert torch.equal(ours["input_ids"], ref["input_ids"])


def test_smooth_frames_match_reference(processor) -> None:
    """Natural-looking gradients (not just noise) go through the same two resizes."""
    y, x = np.mgrid[0:480, 0:640]
    frames = [
        np.stack([(x + 7 * i) % 256, (y + 3 * i) % 256, (x + y) % 256], axis=-1).astype(np.uint8) for i in range(4)
    ]
    ours = processor_inputs(processor, frames, "Q", sample_fps=1.0, min_pixels=VIDEO_MIN, max_pixels=200 * 784)
    ref = _reference(processor, frames, "Q", VIDEO_MIN, 200 * 784, 1.0)
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])


def test_prompt_puts_video_before_question_and_counts_video_tokens(processor) -> None:
    frames = [np.zeros((336, 448, 3), dtype=np.uint8)] * 4
    inputs = processor_inputs(processor, frames, "Where?", sample_fps=2.0, min_pixels=VIDEO_MIN, max_pixels=VIDEO_MAX)
    ids = inputs["input_ids"][0].tolist()
    tok = processor.tokenizer
    video_pad = tok.convert_tokens_to_ids("<|video_pad|>")
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert ids.count(video_pad) == t * h * w // 4  # 2x2 spatial merge
    text = tok.decode(ids)
    assert text.index("<|vision_end|>") < text.index("Where?")
    assert chat_messages("Q", "Be brief.")[0] == {"role": "system", "content": "Be brief."}
