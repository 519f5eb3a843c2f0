"""What ``generate`` does for one question, built by transformers itself, for the fast path.

The settings are ``generate``'s own merge: the checkpoint's ``generation_config`` (e.g. the
sampling settings Qwen2-VL-Instruct ships), overridden by the settings streamer's config sets
(unset ones keep the checkpoint's) and by the question's ``max_new_tokens``. From them,
:func:`row_decoding` builds the logits processors and warpers (repetition penalty,
temperature, top-k, top-p, ...) and the stopping criteria (end tokens, length, stop strings)
with the very methods ``generate`` calls, for one question's prompt, so the fast path applies
exactly what ``generate`` would apply to a batch of one.

What the fast path cannot reproduce (beam search, assisted or contrastive decoding, several
sequences per question, classifier-free guidance, other cache kinds or no cache, chunked
prefill, token healing) is named by :func:`unsupported`; such settings send questions down
the plain ``generate`` path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RowDecoding:
    """How one question's next token is chosen, and when it ends, as ``generate`` does it."""

    processors: Any  # LogitsProcessorList
    criteria: Any  # StoppingCriteriaList
    do_sample: bool
    #: Sampling draws from this generator (seeded), or from torch's default one when None.
    generator: torch.Generator | None


def merged_config(model: Any, overrides: dict[str, Any]) -> Any:
    """The ``GenerationConfig`` that ``model.generate(**overrides)`` would run with (before
    its per-prompt steps): ``generate``'s own ``_prepare_generation_config``."""
    config, _ = model._prepare_generation_config(None, **overrides)
    return config


def unsupported(config: Any) -> str | None:
    """Why the fast path cannot give what ``generate`` gives for ``config``, or None."""
    from transformers.generation.configuration_utils import GenerationMode

    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {mode.value!r} (the fast path decodes greedy or sampled, one sequence per question)"
    reasons = {
        "num_return_sequences": (config.num_return_sequences or 1) != 1,
        "guidance_scale": config.guidance_scale not in (None, 1),
        "use_cache": config.use_cache is False,
        "cache_implementation": config.cache_implementation is not None,
        "prefill_chunk_size": config.prefill_chunk_size is not None,
        "token_healing": bool(config.token_healing),
    }
    names = [name for name, applies in reasons.items() if applies]
    if names:
        return f"generation setting {', '.join(names)} (only generate runs it)"
    return None


def row_decoding(
    model: Any,
    config: Any,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    seed: int | None,
    tokenizer: Any = None,
) -> RowDecoding:
    """Processors, stopping criteria and sampling of one question whose whole prompt is
    ``prompt_ids`` (1 x length, the video's tokens included), built the way
    ``generate(max_new_tokens=...)`` builds them for a batch of one from ``config`` (a
    :func:`merged_config`). ``seed``: sampling draws as ``generate`` does after
    ``torch.manual_seed(seed)``."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    config = copy.deepcopy(config)
    config.update(max_new_tokens=max_new_tokens)
    length = prompt_ids.shape[1]
    device = prompt_ids.device
    # generate: the processor's inputs carry an attention mask.
    model._prepare_special_tokens(config, True, device=device, batch_size=1)
    config = model._prepare_generated_length(
        generation_config=config,
        has_default_max_length=model.generation_config.max_length is None,
        has_default_min_length=model.generation_config.min_length is None,
        model_input_name="input_ids",
        input_ids_length=length,
        inputs_tensor=prompt_ids,
    )
    processors = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=length,
        encoder_input_ids=prompt_ids,
        logits_processor=LogitsProcessorList(),
        device=device,
        # generate drops an all-ones attention mask before it builds the processors.
        model_kwargs={},
    )
    criteria = model._get_stopping_criteria(
        generation_config=config, stopping_criteria=StoppingCriteriaList(), tokenizer=tokenizer
    )
    generator = None
    if config.do_sample and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    return RowDecoding(processors, criteria, bool(config.do_sample), generator)


def next_token(decoding: RowDecoding, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The next token (shape 1) after ``ids`` (1 x length) given the model's ``logits``
    (1 x vocab), as ``generate``'s decoding loop chooses it."""
    scores = decoding.processors(ids, logits.to(dtype=torch.float32, copy=True))
    if decoding.do_sample:
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=decoding.generator).squeeze(1)
    return torch.argmax(scores, dim=-1)
