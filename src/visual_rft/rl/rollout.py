"""Sampling G completions per prompt and scoring their tokens under a model.

A rollout holds everything later phases need, so nothing is recomputed between phases: the prompt
tensors (once per group and repeated G times), the completion tokens and mask, the decoded text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from visual_rft.data.record import Record
from visual_rft.rl.lm_head import head_logprobs, token_logprobs
from visual_rft.engine import is_sharded, under_fsdp, unwrap_model


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
    # The same prompts once per group (row i = records[i * group_size]); lets the fast paths run each
    # prompt and image once instead of G times. None: only prompt_inputs is known.
    group_inputs: dict[str, torch.Tensor] | None = None
    group_size: int = 1
    # The sampling temperature: every log-prob of these completions (policy, old policy, reference)
    # is scored from logits / temperature, the distribution that actually drew them.
    temperature: float = 1.0
    truncated: torch.Tensor | None = None  # [N] bool, cut at max_completion_length without an EOS
    scorable: torch.Tensor | None = None  # [N] bool, some reward applied (not None)
    parse_failed: torch.Tensor | None = None  # [N] bool, the task's parser found no answer
    loss_mask: torch.Tensor | None = None  # [N, T], the tokens that train (completion_mask minus left-out rows)
    zero_variance: torch.Tensor | None = None  # [N / group_size] bool, groups whose rewards are all equal
    paths: dict[str, bool] = field(default_factory=dict)  # which shortcuts produced this rollout's numbers
    # The rollout engine's own log-probs of the sampled tokens [N, T] where it is not the policy itself
    # (vLLM): the engine mismatch is measured and corrected against them (rl/mismatch.py).
    sampler_logp: torch.Tensor | None = None
    # Multi-turn tool rollouts (rl/tool_rollout.py): each row's whole conversation, left-padded, with the
    # tool images of every turn; its last T tokens are completion_ids, and completion_mask is 1 only on
    # the tokens the model generated among them. None: one-turn rollouts, scored as prompt + completion.
    sequence_inputs: dict[str, torch.Tensor] | None = None
    conversations: list[Any] | None = None  # the tool_rollout.ToolConversation of each row

    def train_mask(self) -> torch.Tensor:
        return self.completion_mask if self.loss_mask is None else self.loss_mask


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
        # transformers syncs every decode step across processes under ZeRO-3 (an all-reduce per token) so
        # that sharded forwards pair up; ours run on gathered weights with DeepSpeed's hooks off
        # (engine.full_weights_for_generation), so each process decodes on its own, as many steps and
        # turns as its own rows need
        synced_gpus=False,
    )
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    sequences = model.generate(**inputs, **kwargs)
    completion_ids = sequences[:, inputs["input_ids"].size(1):]
    mask = completion_mask(completion_ids, eos)
    return completion_ids, mask, decode_completions(tokenizer, completion_ids, mask)


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The completions' text: tokens up to the first EOS, special tokens dropped."""
    return tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)


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


_GRIDS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


def _image_blocks(inputs: dict[str, torch.Tensor], key: str, counts: list[int],
                  pixel_rows: list[int] | None = None) -> list[torch.Tensor]:
    """`inputs[key]` split into one block per prompt row, row r holding `counts[r]` images.

    Qwen-VL / GLM-4V put all images' patches back to back (image i has prod(image_grid_thw[i]) rows);
    LLaVA-OneVision has one leading entry per image, SmolVLM one per prompt row (its images padded per
    row); InternVL one per tile and Gemma 3 one per image and pan-and-scan crop, an image's count
    depending on its size: their entries are split by `pixel_rows` (each row's entry count, from
    models.loading.pixel_rows_per_prompt), or by image where every image has one, never guessed.
    """
    value, grid = inputs[key], inputs.get(_GRIDS.get(key, ""))
    rows, images = len(counts), sum(counts)
    if grid is not None:
        per_image = value.split(grid.prod(-1).tolist())
    elif value.size(0) == rows or rows == 1:  # one entry per row (also: one image per row), or a lone row
        return list(value.split(value.size(0) // rows))
    elif pixel_rows is not None and value.size(0) == sum(pixel_rows):
        return list(value.split(pixel_rows))
    elif value.size(0) == images:
        per_image = value.split(1)
    else:
        raise ValueError(f"cannot tell which of the {value.size(0)} {key} rows belong to which of {images} images "
                         "(images tiled, maybe into different numbers of tiles): pass each prompt's pixel row count "
                         "(models.loading.pixel_rows_per_prompt) or turn tiling off in the image processor")
    bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
    return [torch.cat(per_image[start:end]) for start, end in zip(bounds, bounds[1:])]


def repeat_inputs(inputs: dict[str, torch.Tensor], repeats: int, images_per_row: list[int] | None = None,
                  pixel_rows: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Processor output with every row repeated `repeats` times in a row, images included.

    `images_per_row` (default: one each) tells which images belong to which prompt: per-image tensors
    (pixel values whatever the family's layout, image grids, image sizes; see _image_blocks) are
    repeated per row's block of images, per-row tensors row by row. `pixel_rows`: how many pixel-value
    entries each prompt holds where a family has one per tile (models.loading.pixel_rows_per_prompt);
    without it a batch of tiled images raises rather than guess which tiles are whose.
    """
    if repeats == 1:
        return dict(inputs)
    rows = inputs["input_ids"].size(0)
    counts = list(images_per_row) if images_per_row is not None else [1] * rows
    if len(counts) != rows or min(counts) < 1:
        raise ValueError(f"images_per_row {counts} does not give every one of the {rows} prompts an image")
    if pixel_rows is not None and (len(pixel_rows) != rows or any(p < c for p, c in zip(pixel_rows, counts))):
        raise ValueError(f"pixel_rows {list(pixel_rows)} does not give each of the {rows} prompts at least one entry "
                         f"per image (images_per_row {counts})")
    images, tiles = sum(counts), sum(pixel_rows) if pixel_rows is not None else None
    out = {}
    for key, value in inputs.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value
        elif key in _GRIDS or (value.size(0) in (images, tiles) and value.size(0) != rows):
            out[key] = torch.cat([b for b in _image_blocks(inputs, key, counts, pixel_rows) for _ in range(repeats)])
        elif value.size(0) == rows:
            out[key] = value.repeat_interleave(repeats, dim=0)
        else:
            out[key] = value
    return out


def repeat_cache(cache: Any, repeats: int, rows: int) -> None:
    """A prefilled cache repeated for `repeats` samples per row, in place: key/value layers and the
    conv / recurrent states of linear-attention layers (Qwen3.5's Gated DeltaNet) alike."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        cache.batch_repeat_interleave(repeats)
        return
    index = torch.arange(rows).repeat_interleave(repeats)
    for layer in layers:
        if hasattr(layer, "conv_states"):  # states live in dicts; reorder_cache index-selects each of them
            layer.reorder_cache(index.to(layer.device or "cpu"))
        else:
            layer.batch_repeat_interleave(repeats)


def lm_head_weight(model: Any) -> torch.Tensor | None:
    """The output projection's weight when logits are exactly hidden @ weight.T (a plain bias-free
    Linear, no logit scaling or soft-capping, whole on this rank); else None, and callers use the
    model's logits. A ZeRO-3 / FSDP shard is not the weight: only the engine's forward gathers it."""
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    text = base.config.get_text_config()
    if any(getattr(text, key, None) is not None for key in ("final_logit_softcapping", "logit_scale")):
        return None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if is_sharded(head.weight) or head.weight.shape != (head.out_features, head.in_features) or under_fsdp(model):
        return None
    return head.weight


def completion_logprobs(model: Any, prompt_inputs: dict[str, torch.Tensor], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, *, temperature: float = 1.0,
                        chunked_head: bool = True, grad_hint=None) -> torch.Tensor:
    """log softmax(logits / temperature)[completion token] under `model` [N, T], completion positions only
    (prompt + completion as one batch, see tail_logprobs)."""
    batch = scoring_inputs(prompt_inputs, completion_ids, completion_mask)
    return tail_logprobs(model, batch, completion_ids, temperature=temperature, chunked_head=chunked_head,
                         grad_hint=grad_hint)


def tail_logprobs(model: Any, batch: dict[str, torch.Tensor], tail_ids: torch.Tensor, *, temperature: float = 1.0,
                  chunked_head: bool = True, grad_hint=None) -> torch.Tensor:
    """log softmax(logits / temperature) of each row's last T tokens [N, T] (T = tail_ids.size(1), which
    are `batch["input_ids"][:, -T:]`), from one forward of the whole batch.

    The forward goes through `model` itself (so DDP and PEFT see it). With `chunked_head` it returns
    the final hidden states and the LM head runs in row chunks (head_logprobs), so the [N, T, vocab]
    logits never exist; heads that are not a plain Linear (e.g. LoRA on lm_head), and
    chunked_head=False (grpo.fast=off), take the model's own logits. grad_hint: see head_logprobs.
    """
    length = tail_ids.size(1)
    weight = lm_head_weight(model) if chunked_head else None
    if weight is None:
        # The logits at position t predict token t+1, so the last T+1 positions cover every tail token.
        logits = model(**batch, logits_to_keep=length + 1, use_cache=False).logits[:, :-1]
        return token_logprobs(logits, tail_ids, temperature=temperature)
    out = model(**batch, logits_to_keep=1, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -(length + 1):-1]  # the final (normed) hidden states
    return head_logprobs(hidden, weight, tail_ids, temperature=temperature, grad_hint=grad_hint)
