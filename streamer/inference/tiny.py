"""The project's tiny random-weight Qwen2-VL models: real model folders, built here, never downloaded.

Tests, the offline demo and CI need a Qwen2-VL that loads through the very same
``from_pretrained`` code as ``Qwen/Qwen2-VL-2B-Instruct``, but no weights can be downloaded.
:func:`build_tiny_model` writes one: a config in Qwen2-VL's shape (small), random weights
from a fixed seed, a byte-level BPE tokenizer trained on a small built-in corpus with
Qwen2-VL's special tokens, and a processor with Qwen2-VL's chat template.

Its answers are gibberish: the weights are random. It exists to exercise every code path,
not to answer anything. Two variants cover what real checkpoints bring: a tiny Qwen2.5-VL
(windowed vision attention, time-scaled M-RoPE), and a tiny Qwen2-VL whose
``generation_config.json`` carries the sampling settings the Instruct checkpoints ship. Their
text weights are drawn wider, so that, like trained models, their answers change when a
token's position does (tests of exactness need that).

The shape follows ``NOTES-qwen2vl.md`` so that vLLM's CPU backend can serve the same folder:
text head_dim 32 (vLLM's CPU attention supports 32, 64, 80, ...), mrope_section summing to
head_dim / 2, and a vision merger whose output width equals the text hidden size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from streamer.config import cache_dir

log = logging.getLogger(__name__)

#: Bump when anything below changes what is built, so stale caches are rebuilt.
TINY_MODEL_VERSION = 1
TINY_MODEL_SEED = 1234
GIBBERISH_NOTE = "tiny random-weight model: its answers are gibberish"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (as published with the model), so prompts built for the
# tiny model have the real model's structure.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small corpus in the languages users ask in, so the tokenizer has merges for them.
_CORPUS = [
    "What is moving in the video? A person walks across the loading bay.",
    "What is the barcode on the box I am holding? The barcode reads 4006381333931.",
    "Alert me when someone enters the room. Nobody is in the room right now.",
    "The camera shows a parking lot with three cars and a red truck.",
    "Describe the scene. A test pattern with coloured bars and a moving circle.",
    "How many people are there? There are two people near the door.",
    "视频里有什么在动？一个人正在走过装货区。",
    "盒子上的条形码是什么？",
    "ما الذي يتحرك في الفيديو؟ شخص يمشي عبر منطقة التحميل.",
    "Was bewegt sich im Video? Qu'est-ce qui bouge dans la vidéo ? ¿Qué se mueve?",
    "0123456789 frame clock time seconds minutes hours yes no left right up down",
]


TINY_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
}
TINY_VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 128, "mlp_ratio": 4, "num_heads": 4}
#: Qwen2.5-VL's vision tower in small: its width is ``hidden_size`` and the merger's output
#: ``out_hidden_size``; window attention (112 px windows, as the real models) in block 0, full
#: attention in block 1.
TINY_VISION_2_5 = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 4,
    "out_hidden_size": 128,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
}
#: What Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct ship in ``generation_config.json``
#: (besides the special tokens): sampling that is greedy in effect, and a repetition penalty.
INSTRUCT_GENERATION = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05}

#: The text model of the newer variants: weights drawn 5x wider than transformers' default, so
#: attention is sharp and answers depend on token positions as a trained model's do (with the
#: default spread attention is nearly uniform and a wrong position rarely changes a token).
TINY_TEXT_SHARP = {**TINY_TEXT, "initializer_range": 0.1}

#: The tiny variants by model id: (folder name, model type, text config, generation settings).
TINY_VARIANTS: dict[str, tuple[str, str, dict, dict]] = {
    "tiny-random": ("tiny-qwen2-vl", "qwen2_vl", TINY_TEXT, {}),
    "tiny-random-instruct": ("tiny-qwen2-vl-instruct", "qwen2_vl", TINY_TEXT_SHARP, INSTRUCT_GENERATION),
    "tiny-random-qwen2.5-vl": ("tiny-qwen2.5-vl", "qwen2_5_vl", TINY_TEXT_SHARP, {}),
}


_ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def _config_dict(
    model_type: str,
    vocab_size: int,
    token_ids: dict[str, int],
    text: dict,
    vision: dict,
    tie_word_embeddings: bool = False,
) -> dict:
    return {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
        "text_config": {
            "model_type": f"{model_type}_text",
            "vocab_size": vocab_size,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "bos_token_id": token_ids["<|endoftext|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
            **text,
        },
        "vision_config": {
            "model_type": f"{model_type}_vision",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **vision,
        },
    }


def _train_tokenizer(vocab_size: int = 1024, pad_vocab_to: int | None = None):
    """Train a byte-level BPE on the corpus and wrap it as a Qwen2 tokenizer.

    ``pad_vocab_to`` fills the vocabulary with decodable filler tokens up to that size, so
    the special tokens get Qwen2-VL's real ids (151643...) and every id a full-size random
    model emits decodes to some text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    spec = json.loads(bpe.to_str())["model"]
    vocab = dict(spec["vocab"])
    if pad_vocab_to is not None:
        i = 0
        while len(vocab) < pad_vocab_to:
            vocab.setdefault(f"Ġw{i:x}", len(vocab))  # "Ġ" is the byte-level space
            i += 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens(SPECIAL_TOKENS[:1], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_folder(
    out_dir: str | Path,
    *,
    text: dict,
    vision: dict,
    seed: int,
    marker: dict,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    model_type: str = "qwen2_vl",
    generation: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build a random-weight Qwen2-VL (``model_type`` "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl")
    folder (config, weights, tokenizer, processor) that ``from_pretrained`` loads like a
    downloaded one. ``vocab_size`` (e.g. Qwen2-VL's 151936) pads the tokenizer and sizes the
    embeddings; None: the tokenizer's own size. ``generation`` goes into
    ``generation_config.json`` beside the special tokens (e.g. :data:`INSTRUCT_GENERATION`)."""
    # Long on purpose: config, tokenizer, weights and marker, in the one order that makes the folder loadable.
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    classes = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
        "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor),
    }
    config_class, model_class, processor_class = classes[model_type]

    say = progress or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    say("training the byte-level BPE tokenizer")
    tokenizer = _train_tokenizer(pad_vocab_to=None if vocab_size is None else 151643)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    say(f"initialising random weights (seed {seed})")
    config = config_class(
        **_config_dict(model_type, vocab_size or len(tokenizer), token_ids, text, vision, tie_word_embeddings)
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if generation:
        # As the Instruct checkpoints: both end tokens stop, and the sampling settings.
        model.generation_config.eos_token_id = [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]]
        model.generation_config.bos_token_id = token_ids["<|endoftext|>"]
        model.generation_config.update(**generation)
    else:
        model.generation_config.eos_token_id = token_ids["<|im_end|>"]
    model.generation_config.pad_token_id = token_ids["<|endoftext|>"]

    say("saving model, tokenizer and processor")
    pixels = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}),
        video_processor=Qwen2VLVideoProcessor(size=pixels, cap_pixels_per_frame=True),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {**marker, "seed": seed, "parameters": sum(p.numel() for p in model.parameters())}
    (out / "STREAMER_TINY_MODEL.json").write_text(json.dumps(info, indent=2))
    return out


def build_tiny_model(
    out_dir: str | Path, variant: str = "tiny-random", *, progress: Callable[[str], None] | None = None
) -> Path:
    """Build a tiny random model (a key of :data:`TINY_VARIANTS`) into ``out_dir`` (created;
    must not hold another model).

    Deterministic: the same seed and library versions give the same weights and tokenizer.
    """
    _, model_type, text, generation = TINY_VARIANTS[variant]
    return build_model_folder(
        out_dir,
        text=text,
        vision=TINY_VISION_2_5 if model_type == "qwen2_5_vl" else TINY_VISION,
        seed=TINY_MODEL_SEED,
        marker={"version": TINY_MODEL_VERSION, "note": GIBBERISH_NOTE, "variant": variant},
        model_type=model_type,
        generation=generation,
        progress=progress,
    )


def tiny_model_dir(variant: str = "tiny-random") -> Path:
    """Where a cached tiny model lives (it may not exist yet)."""
    return cache_dir() / f"{TINY_VARIANTS[variant][0]}-v{TINY_MODEL_VERSION}"


def ensure_tiny_model(variant: str = "tiny-random", *, progress: Callable[[str], None] | None = None) -> Path:
    """Return the cached folder of a tiny model (a key of :data:`TINY_VARIANTS`), building it
    first if it is missing.

    Safe when several processes race: each builds into its own temporary folder and the
    first to finish renames it into place; the others discard theirs.
    """
    target = tiny_model_dir(variant)
    if (target / "STREAMER_TINY_MODEL.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    started = time.monotonic()
    family = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}[TINY_VARIANTS[variant][1]]
    say(f"building the tiny random {family} {variant!r} in {target} (first use only)")
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        build_tiny_model(tmp, variant, progress=say)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "STREAMER_TINY_MODEL.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"tiny model ready in {time.monotonic() - started:.1f} s")
    return target
