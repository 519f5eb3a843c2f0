"""The tiny random Qwen2-VL: deterministic, loadable by from_pretrained, in vLLM's shape."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoProcessor

from streamer.config import ModelConfig
from streamer.inference.loader import ModelLoadError, load_model, resolve_model_path
from streamer.inference.tiny import GIBBERISH_NOTE, SPECIAL_TOKENS, build_tiny_model


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert _digest(again) == _digest(tiny_model)
    assert (again / "tokenizer.json").read_text() == (tiny_model / "tokenizer.json").read_text()


def test_shape_vllm_can_serve(tiny_model: Path) -> None:
    cfg = AutoConfig.from_pretrained(tiny_model)
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim in (32, 64, 80, 96, 112, 128)  # vLLM CPU attention's supported sizes
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.hidden_size == text.hidden_size  # the merger feeds the language model
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)


def test_tokenizer_has_qwen_special_tokens(tiny_model: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model)
    tok = processor.tokenizer
    cfg = AutoConfig.from_pretrained(tiny_model)
    for token in SPECIAL_TOKENS:
        (token_id,) = tok.encode(token, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(token_id) == token
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    for text in ["What is moving?", "视频里有什么在动？", "ما الذي يتحرك"]:
        assert tok.decode(tok.encode(text)) == text  # byte-level: any UTF-8 round-trips
    marker = json.loads((tiny_model / "STREAMER_TINY_MODEL.json").read_text())
    assert marker["note"] == GIBBERISH_NOTE


def test_tiny_id_resolves_to_the_cache_and_carries_the_note(tiny_model: Path) -> None:
    assert resolve_model_path("tiny-random") == (str(tiny_model), GIBBERISH_NOTE)
    assert resolve_model_path(str(tiny_model)) == (str(tiny_model), GIBBERISH_NOTE)
    loaded = load_model(ModelConfig(id=str(tiny_model)))
    assert loaded.device.type == "cpu" and str(loaded.dtype) == "torch.float32"
    assert loaded.note == GIBBERISH_NOTE


def test_load_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(ModelConfig(id=str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError, match="flash_attention_2"):
        load_model(ModelConfig(id="tiny-random", attn_implementation="flash_attention_2", device="cpu"))


@pytest.mark.slow
def test_serve_with_unreachable_hub_model_exits_with_a_clear_error(streamer_cache: Path) -> None:
    # HF_HUB_OFFLINE must be set before huggingface_hub is imported: use a fresh process.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "streamer.cli", "serve", "--source", "cam=demo", "--model", "nobody/no-such-model"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "error: cannot load model 'nobody/no-such-model'" in done.stderr
    assert "Traceback" not in done.stderr


def test_tiny_variants_load_by_id(streamer_cache: Path) -> None:
    """The Instruct-settings and Qwen2.5-VL variants resolve by id and load with from_pretrained."""
    from streamer.config import TINY_MODEL_IDS
    from streamer.inference.tiny import INSTRUCT_GENERATION, TINY_VARIANTS

    assert set(TINY_VARIANTS) == set(TINY_MODEL_IDS)
    instruct = load_model(ModelConfig(id="tiny-random-instruct"))
    config = instruct.model.generation_config
    assert {k: getattr(config, k) for k in INSTRUCT_GENERATION} == INSTRUCT_GENERATION
    assert len(config.eos_token_id) == 2 and instruct.note == GIBBERISH_NOTE
    qwen25 = load_model(ModelConfig(id="tiny-random-qwen2.5-vl"))
    assert qwen25.model.config.model_type == "qwen2_5_vl"
    assert type(qwen25.processor).__name__ == "Qwen2_5_VLProcessor"
