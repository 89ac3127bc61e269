"""GRPO's group structure, exploited: every prompt (and its image) runs once per group, not G times.

All G completions of a group share one prompt, and with a vision-language model the prompt is
mostly image tokens, so the plain paths spend most of their compute on G identical copies of it:
- generation prefills each prompt once and copies its KV cache G times (`generate_grouped`);
- scoring packs a group into one row, [prompt, completion 1, ..., completion G], where each
  completion attends to the shared prompt and to itself only (a 4D mask) and continues the prompt's
  M-RoPE positions, so the vision tower and the prompt run once per group (`group_logprobs`).
Both give what the plain paths give (same tokens, same log-probs and gradients to float rounding;
tests/test_rl_equivalence.py) and fall back to them where a model does not fit the pattern.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from visual_rft.engine import unwrap_model
from visual_rft.models.families import family, fast_paths, uses_mrope
from visual_rft.rl.lm_head import head_logprobs
from visual_rft.rl.rollout import (Rollout, completion_logprobs, completion_mask, decode_completions, eos_token_ids,
                                   generate, lm_head_weight, repeat_cache, repeat_inputs, tail_logprobs)

_ROPE_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
_PACKABLE_ATTENTION = ("sdpa", "eager")


def prompt_positions(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Position ids of the prompts — M-RoPE [3, B, P] for the Qwen-VL-style families, else 1-D [B, P]
    as generate numbers a left-padded row — and the next text position after each [B].

    None where `positions_blocker` says these positions cannot be computed (the fast paths then fall back).
    """
    if positions_blocker(model, inputs) is not None:
        return None
    mask = inputs["attention_mask"]
    if not uses_mrope(unwrap_model(model).config):
        return text_positions(mask), mask.sum(1)
    base = unwrap_model(model).model
    extra = {k: inputs[k] for k in _ROPE_KEYS if inputs.get(k) is not None}
    positions, deltas = base.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                            attention_mask=mask, **extra)
    # get_rope_index's delta is (largest position + 1) - (number of real tokens): the next text position.
    return positions, mask.sum(1) + deltas.view(-1).to(mask.device)


# ---------------------------------------------------------------------------------------------- generation
def _warpers(temperature: float, top_p: float, top_k: int) -> LogitsProcessorList:
    """The sampling warpers transformers' generate builds for these settings, in its order."""
    procs = LogitsProcessorList()
    if temperature > 0:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p))
    return procs


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Row-wise draws from `probs` [N, V] given uniforms [N] in [0, 1): the first index whose
    cumulative probability exceeds u * total. Exact in distribution, and on a CPU with a 151k
    vocabulary about 10x faster than torch.multinomial (which draws V exponentials per row)."""
    cdf = probs.double().cumsum_(dim=-1)
    picked = torch.searchsorted(cdf, uniform.double()[:, None] * cdf[:, -1:], right=True).squeeze(1)
    # The first index whose cdf exceeds u * total has probability > 0, unless u * total rounded up to
    # the total: then nothing exceeds it, and the draw is the last token that has probability (found
    # for those rows only: the scan over [rows, vocab] cost more than the draw itself).
    over = picked >= probs.size(-1)
    if over.any():
        picked[over] = probs.size(-1) - 1 - (probs[over] > 0).flip(-1).int().argmax(dim=-1)
    return picked


def default_sampler(device: torch.device | str) -> str:
    """inverse CDF on CPU (far cheaper there), multinomial elsewhere (fast on GPUs, no float64 scan)."""
    return "inverse_cdf" if torch.device(device).type == "cpu" else "multinomial"


def positions_blocker(model: Any, inputs: dict[str, torch.Tensor] | None) -> str | None:
    """Why the prompt's positions cannot be computed and continued here (None: they can; always for
    the 1-D-position families). Cheap: both fast paths ask it before any position is computed."""
    if not uses_mrope(unwrap_model(model).config):
        return None
    if inputs is None or "mm_token_type_ids" not in inputs:
        return "the batch has no per-group prompt tensors with mm_token_type_ids"
    if not hasattr(getattr(unwrap_model(model), "model", None), "get_rope_index"):
        return "the model has no Qwen-VL get_rope_index to continue the prompt's positions"
    return None


def prefill_once_blocker(model: Any, group_inputs: dict[str, torch.Tensor], group_size: int) -> str | None:
    """Why `generate_grouped` cannot prefill each prompt once for this model and batch (None: it can)."""
    if group_size == 1:
        return "groups of one completion have nothing to share"
    paths = fast_paths(unwrap_model(model).config)  # the family's decision (models/families.py)
    if not paths.prefill_once:
        return paths.prefill_reason
    return positions_blocker(model, group_inputs)


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D position ids of left-padded rows, as transformers' generate builds them: the count of real
    tokens before each one (padding gets 1, never attended to)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)


def _draw(scores: torch.Tensor, sampling: bool, sampler: str) -> torch.Tensor:
    if not sampling:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sampler == "multinomial":  # transformers' own draw: the same tokens as generate for one RNG state
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return inverse_cdf(probs, torch.rand(probs.size(0), device=probs.device))


def _decode_head(model: Any) -> torch.Tensor | None:
    """On CPU, the LM head weight transposed into a contiguous [H, V] copy, or None.

    Each decode step multiplies a few rows by the whole head ([V, H], 311 MB at 151,936 x 512), a
    memory-bound product that MKL runs ~25% faster against a row-major [H, V] operand than against
    the transposed view nn.Linear passes it (same values, bit for bit). The copy lives for one call.
    """
    weight = lm_head_weight(model)
    if weight is None or weight.device.type != "cpu" or not hasattr(unwrap_model(model), "model"):
        return None
    return weight.detach().T.contiguous()


def _step_logits(model: Any, head_t: torch.Tensor | None, **inputs: Any) -> torch.Tensor:
    """One decode step's logits [N, V] (fp32), through `head_t` when there is one."""
    if head_t is None:
        return model(**inputs).logits[:, -1].float()
    return (unwrap_model(model).model(**inputs).last_hidden_state[:, -1] @ head_t).float()


@torch.no_grad()
def generate_grouped(
    model: Any,
    tokenizer: Any,
    group_inputs: dict[str, torch.Tensor],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress_ids: list[int] | None = None,
    sampler: str | None = None,
    prefill_once: bool = True,
    images_per_row: list[int] | None = None,
    pixel_rows: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`generate` on the prompts repeated `group_size` times in a row, with each prompt prefilled once.

    Same decoding as transformers' sampling loop: suppressed tokens, its temperature / top-k / top-p
    warpers, argmax or a draw from the softmax; finished rows emit padding; it stops when every row
    has finished. The draw is by inverse CDF (same distribution, far cheaper on CPU); with
    sampler="multinomial" it is transformers' own, and one RNG state gives the very same tokens.
    The default is `default_sampler`. `prefill_once=False` (grpo.fast=off), or a model or batch the
    shortcut does not fit (prefill_once_blocker), runs transformers' generate instead, on the prompts
    repeated (`images_per_row`: each prompt's image count, `pixel_rows`: its tile count where the family
    tiles, see repeat_inputs).
    Only the explicit settings apply: sampling defaults stored in a checkpoint's generation_config
    (repetition_penalty, a default top_k) are not picked up.
    """
    blocked = not prefill_once or prefill_once_blocker(model, group_inputs, group_size) is not None
    if blocked:  # switched off, nothing to share, or positions this code cannot continue
        return generate(model, tokenizer, repeat_inputs(group_inputs, group_size, images_per_row, pixel_rows),
                        max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, suppress_ids=suppress_ids)
    positions, start = prompt_positions(model, group_inputs)
    mrope = positions.dim() == 3
    # M-RoPE families number their prompt themselves (get_rope_index, as prompt_positions did); the 1-D
    # ones get generate's positions from the left-padded mask, as generate passes them
    out = model(**group_inputs, use_cache=True, logits_to_keep=1, **({} if mrope else {"position_ids": positions}))
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    # transformers renamed past_key_values to cache (5.2x); under the old name a `cache=` keyword is
    # silently swallowed and every step would run without its prefix.
    cache_name = "cache" if hasattr(out, "cache") else "past_key_values"
    repeat_cache(cache, group_size, group_inputs["input_ids"].size(0))  # linear-attention states too
    logits = out.logits[:, -1].float().repeat_interleave(group_size, dim=0)
    del out
    eos = torch.tensor(eos_token_ids(model, tokenizer), device=logits.device)
    pad = tokenizer.pad_token_id
    warpers = _warpers(temperature, top_p, top_k)
    suppress = torch.tensor(sorted(set(suppress_ids or [])), dtype=torch.long, device=logits.device)
    attention = group_inputs["attention_mask"].repeat_interleave(group_size, dim=0)
    position = start.repeat_interleave(group_size)
    rows = attention.size(0)
    head_t = _decode_head(model)
    sampler = sampler or default_sampler(logits.device)
    unfinished = torch.ones(rows, dtype=torch.long, device=logits.device)
    tokens = torch.empty(rows, 0, dtype=torch.long, device=logits.device)
    for step in range(max_new_tokens):
        scores = logits.index_fill(1, suppress, -float("inf")) if suppress.numel() else logits
        nxt = _draw(warpers(tokens, scores), temperature > 0, sampler)
        nxt = nxt * unfinished + pad * (1 - unfinished)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        unfinished = unfinished & ~torch.isin(nxt, eos)
        if step + 1 == max_new_tokens or not unfinished.any():
            break
        attention = torch.cat([attention, attention.new_ones(rows, 1)], dim=1)
        pos = (position + step).view(rows, 1)
        pos = pos.view(1, rows, 1).expand(3, rows, 1) if mrope else pos
        logits = _step_logits(model, head_t, input_ids=nxt[:, None], attention_mask=attention, position_ids=pos,
                              use_cache=True, **{cache_name: cache})
    mask = completion_mask(tokens, eos.tolist())
    return tokens, mask, decode_completions(tokenizer, tokens, mask)


# ------------------------------------------------------------------------------------------------- scoring
def _text_config(model: Any) -> Any:
    return unwrap_model(model).config.get_text_config()


def _attention_kind(model: Any) -> str:
    """The language model's attention (the packed row's 4-D mask goes to it, not to the vision tower)."""
    return getattr(_text_config(model), "_attn_implementation", None) or "eager"


@contextlib.contextmanager
def packable_attention(model: Any) -> Iterator[None]:
    """Around the packed forward: a language model configured with an attention that takes no 4-D
    mask (flash-attention) runs SDPA for this forward only, which takes the packed row's mask; the
    vision tower keeps its own. (The attention is looked up from the config at every forward.)"""
    config = _text_config(model)
    kind = _attention_kind(model)
    if kind in _PACKABLE_ATTENTION:
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = kind


def packing_pays(model: Any, prompt_len: int, completion_len: int, group_size: int) -> bool:
    """Whether one packed row per group is cheaper than G separate rows.

    Packing runs P + G*T tokens through the linear layers instead of G*(P+T), but its attention is a
    dense (P+G*T)^2 block against G*(P+T)^2: long completions and large groups can make it lose.
    Linear cost per token ~ 2 * 12 h^2 per layer, attention ~ 4 h per query-key pair per layer.
    """
    if group_size < 2:
        return False
    h = unwrap_model(model).config.get_text_config().hidden_size
    p, t, g = prompt_len, completion_len, group_size
    packed = (p + g * t) * 24 * h * h + 4 * h * (p + g * t) ** 2
    plain = g * (p + t) * 24 * h * h + 4 * h * g * (p + t) ** 2
    return packed < plain


def packing_blocker(model: Any, rollout: Rollout) -> str | None:
    """Why a group cannot be scored as one packed row (None: it can, and it saves compute)."""
    if rollout.sequence_inputs is not None:
        return "tool conversations differ per sample (own turns and tool images): one row per conversation"
    # e.g. no packing with recurrent layers: completions would share their state
    paths = fast_paths(unwrap_model(model).config)
    if not paths.packed_scoring:
        return paths.packing_reason
    rope = positions_blocker(model, rollout.group_inputs)
    if rope is not None:
        return rope
    if _attention_kind(model) not in _PACKABLE_ATTENTION and getattr(unwrap_model(model), "is_gradient_checkpointing",
                                                                       False):
        # the packed forward runs SDPA (packable_attention), but a checkpointed layer recomputes it in
        # the backward, outside that switch, under its own attention and a mask that attention cannot take
        return (f"attention {_attention_kind(model)!r} takes no 4-D mask and gradient checkpointing would "
                "recompute the packed forward with it")
    if lm_head_weight(model) is None:
        return "the LM head is not a plain, whole Linear (sharded, soft-capped or adapted)"
    if not packing_pays(model, rollout.group_inputs["input_ids"].size(1), rollout.completion_ids.size(1),
                        rollout.group_size):
        return "one row per completion is cheaper here (long completions or groups of one)"
    return None


def can_pack(model: Any, rollout: Rollout) -> bool:
    return packing_blocker(model, rollout) is None


def _group_mask(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, group_size: int,
                kind: str, dtype: torch.dtype, *, window: int | None = None,
                blocks: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, L, L] mask of a packed row: causal, each completion sees the prompt and itself only,
    padding is never a key. The diagonal stays open so a padding query never has an all-masked
    row (NaN under SDPA, which would leak into the real rows through the values).

    `window`: a sliding window, measured as in the plain row [prompt, completion] (each completion's
    token j sits at prompt length + j there); `blocks` [B, P]: image block ids of the prompt tokens
    (-1 for text), attending to each other both ways (Gemma 3's images), as the plain forward does."""
    rows, prompt_len = prompt_mask.shape
    length = completion_mask.size(1) // group_size
    device = prompt_mask.device
    segment = torch.cat([torch.zeros(prompt_len, dtype=torch.long, device=device),
                         torch.arange(1, group_size + 1, device=device).repeat_interleave(length)])
    size = segment.numel()
    causal = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    visible = causal & ((segment[:, None] == segment[None, :]) | (segment[None, :] == 0))
    keys = torch.cat([prompt_mask, completion_mask], dim=1).bool()
    allowed = visible[None] & keys[:, None, :]
    if blocks is not None:
        image = blocks >= 0
        allowed[:, :prompt_len, :prompt_len] |= (blocks[:, :, None] == blocks[:, None, :]) & image[:, :, None]
    if window is not None:
        index = torch.cat([torch.arange(prompt_len, device=device),
                           prompt_len + torch.arange(length, device=device).repeat(group_size)])
        allowed &= (index[None, :] > index[:, None] - window)[None]
    allowed = (allowed | torch.eye(size, dtype=torch.bool, device=device)[None])[:, None]
    if kind == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Each contiguous run of image tokens (token type 1) numbered 0, 1, ... per row; text is -1."""
    image = token_type_ids == 1
    starts = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)
    return torch.where(image, starts.long().cumsum(1) - 1, -1)


def packed_masks(model: Any, group_inputs: dict[str, torch.Tensor], group_size: int,
                 completion_mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed row's attention mask: one [B, 1, L, L] mask, or, for a family whose forward takes a
    mask per layer type (models/families.py mask_mapping: Gemma 3), one per type, with its sliding
    window and bidirectional image blocks, as that family builds them for the plain row."""
    args = (group_inputs["attention_mask"], completion_mask, group_size, _attention_kind(model),
            unwrap_model(model).dtype)
    entry = family(unwrap_model(model).config.model_type)
    if entry is None or not entry.mask_mapping:
        return _group_mask(*args)
    text = _text_config(model)
    blocks = image_blocks(group_inputs["token_type_ids"]) if "token_type_ids" in group_inputs else None
    masks = {"full_attention": _group_mask(*args, blocks=blocks)}
    if "sliding_attention" in (getattr(text, "layer_types", None) or []):
        masks["sliding_attention"] = _group_mask(*args, blocks=blocks, window=text.sliding_window)
    return masks


def packed_batch(model: Any, group_inputs: dict[str, torch.Tensor], group_size: int,
                 completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """Model inputs with one row per group, and for each completion token the packed position whose
    hidden state predicts it ([G*T] indices, the same for every row)."""
    ids, prompt_mask = group_inputs["input_ids"], group_inputs["attention_mask"]
    rows, prompt_len = ids.shape
    length = completion_ids.size(1)
    packed_ids = completion_ids.reshape(rows, group_size * length)
    packed_mask = completion_mask.reshape(rows, group_size * length).to(prompt_mask.dtype)
    # Every completion continues the prompt's text positions from the same start, as it would alone.
    offsets = torch.arange(length, device=ids.device).repeat(group_size)
    positions, start = prompt_positions(model, group_inputs)  # [3, B, P] (M-RoPE) or [B, P]
    completion_pos = start[:, None] + offsets[None]
    if positions.dim() == 3:
        completion_pos = completion_pos.unsqueeze(0).expand(3, -1, -1)
    position_ids = torch.cat([positions, completion_pos.to(positions.dtype)], dim=-1)
    batch = dict(group_inputs)
    batch.update(
        input_ids=torch.cat([ids, packed_ids], dim=1),
        attention_mask=packed_masks(model, group_inputs, group_size, packed_mask),
        position_ids=position_ids,
    )
    for key in ("mm_token_type_ids", "token_type_ids"):  # completion tokens are text
        if key in group_inputs:
            batch[key] = torch.cat([group_inputs[key], torch.zeros_like(packed_ids, dtype=group_inputs[key].dtype)], 1)
    # Token j of completion g sits at P + g*T + j and is predicted by the state just before it; the
    # first token of every completion is predicted by the prompt's last position.
    predict = prompt_len + torch.arange(group_size * length, device=ids.device) - 1
    predict[::length] = prompt_len - 1
    return batch, predict


def group_logprobs(model: Any, group_inputs: dict[str, torch.Tensor], group_size: int,
                   completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, temperature: float = 1.0,
                   grad_hint=None) -> torch.Tensor:
    """completion_logprobs [N, T] computed with one packed row per group (see packed_batch);
    temperature and grad_hint as in head_logprobs."""
    with packable_attention(model):
        batch, predict = packed_batch(model, group_inputs, group_size, completion_ids, completion_mask)
        out = model(**batch, logits_to_keep=1, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, predict]  # [B, G*T, H]
    hidden = hidden.reshape(completion_ids.size(0), completion_ids.size(1), -1)
    return head_logprobs(hidden, lm_head_weight(model), completion_ids, temperature=temperature, grad_hint=grad_hint)


def rollout_logprobs(model: Any, rollout: Rollout, *, fast: bool = True, grad_hint=None) -> torch.Tensor:
    """log p(completion tokens) [N, T] under `model`, from logits / rollout.temperature: packed per
    group when possible, else one row per completion; `fast=False` (grpo.fast=off) always takes the
    plain forward and the model's own logits. `grad_hint` (see loss.ratio_one_grad_hint) only saves
    work, wherever the chunked LM head runs."""
    if rollout.sequence_inputs is not None:  # multi-turn: the whole conversations, one row each
        return tail_logprobs(model, rollout.sequence_inputs, rollout.completion_ids, temperature=rollout.temperature,
                             chunked_head=fast, grad_hint=grad_hint)
    if fast and can_pack(model, rollout):
        return group_logprobs(model, rollout.group_inputs, rollout.group_size, rollout.completion_ids,
                              rollout.completion_mask, temperature=rollout.temperature, grad_hint=grad_hint)
    return completion_logprobs(model, rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask,
                               temperature=rollout.temperature, chunked_head=fast, grad_hint=grad_hint)
