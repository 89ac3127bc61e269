"""The GRPO objective as small pure tensor functions: log-probs, clipped surrogate, k3 KL, averaging."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """log p(target) per position for logits [B, T, V] and targets [B, T], in fp32.

    Rows are processed in chunks so the fp32 log-softmax never materialises for the whole batch at
    once (with a 151k vocabulary that tensor is the largest of the step).
    """
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_targets = targets.reshape(-1)
    out = []
    for start in range(0, flat_logits.size(0), chunk_size):
        rows = flat_logits[start:start + chunk_size].float()
        picked = rows.gather(-1, flat_targets[start:start + chunk_size, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    return torch.cat(out).view_as(targets)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) and the mask of clipped tokens.

    `advantages` is per sequence [B]; logp/old_logp are [B, T].
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    was_clipped = (clipped < unclipped).float()
    return -torch.min(unclipped, clipped), was_clipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(q - p) - (q - p) - 1 >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """Average the per-token loss over completion tokens.

    grpo: mean over each sequence's tokens, then over sequences (short answers weigh more per token).
    dr_grpo: sum over all tokens / (num_sequences * max_completion_length), free of length bias.
    dapo: sum over all tokens / number of tokens in the batch (token-level mean).
    """
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected grpo, dr_grpo or dapo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
