"""Sampling G completions per prompt and scoring their tokens under a model.

A rollout holds everything later phases need, so nothing is recomputed between phases: the prompt
tensors (already repeated G times), the completion tokens and mask, the decoded text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from visual_rft.data.record import Record
from visual_rft.rl.loss import token_logprobs


@dataclass
class Rollout:
    """One micro-batch of sampled completions: `records[i]` produced `completions[i]`."""

    records: list[Record]
    prompts: list[str]
    prompt_inputs: dict[str, torch.Tensor]  # processor output, one row per completion
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T], 1 up to and including the first EOS
    completions: list[str]
    scores: dict[str, list[float]] = field(default_factory=dict)
    rewards: torch.Tensor | None = None  # [N] weighted total
    advantages: torch.Tensor | None = None  # [N]
    old_logp: torch.Tensor | None = None  # [N, T], policy at sampling time (num_iterations > 1)
    ref_logp: torch.Tensor | None = None  # [N, T], reference model (beta > 0)


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS, 0 after it (padding)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~seen_before).long()


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return [int(i) for i in ids if i is not None]


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    inputs: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress_ids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Sample (temperature > 0) or decode greedily; returns completion ids, mask and text."""
    eos = eos_token_ids(model, tokenizer)
    sampling = temperature > 0
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        # A sampled <|image_pad|> would break the scoring forward ("image features and image
        # tokens do not match"), so vision tokens are never generated.
        suppress_tokens=suppress_ids or None,
    )
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    sequences = model.generate(**inputs, **kwargs)
    completion_ids = sequences[:, inputs["input_ids"].size(1):]
    mask = completion_mask(completion_ids, eos)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return completion_ids, mask, texts


def scoring_inputs(prompt_inputs: dict[str, torch.Tensor], completion_ids: torch.Tensor,
                   completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt + completion as one forward batch: per-token prompt tensors are extended over the
    completion (attention by the completion mask, token-type ids such as mm_token_type_ids by 0)."""
    prompt_len = prompt_inputs["input_ids"].size(1)
    batch = {}
    for key, value in prompt_inputs.items():
        if key == "input_ids":
            batch[key] = torch.cat([value, completion_ids], dim=1)
        elif key == "attention_mask":
            batch[key] = torch.cat([value, completion_mask.to(value.dtype)], dim=1)
        elif torch.is_tensor(value) and value.dim() == 2 and value.size(1) == prompt_len and key.endswith("type_ids"):
            batch[key] = torch.cat([value, torch.zeros_like(completion_ids, dtype=value.dtype)], dim=1)
        else:
            batch[key] = value
    return batch


def completion_logprobs(model: Any, prompt_inputs: dict[str, torch.Tensor], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> torch.Tensor:
    """log p(completion token) under `model` [N, T]; logits are computed for completion positions only."""
    batch = scoring_inputs(prompt_inputs, completion_ids, completion_mask)
    length = completion_ids.size(1)
    # The logits at position t predict token t+1, so the last T+1 positions cover every completion token.
    logits = model(**batch, logits_to_keep=length + 1, use_cache=False).logits[:, :-1]
    return token_logprobs(logits, completion_ids)
