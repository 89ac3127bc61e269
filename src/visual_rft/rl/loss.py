"""The GRPO objective as small pure tensor functions: log-probs, clipped surrogate, k3 KL, averaging."""

from __future__ import annotations

import torch

# Rows of logits alive at once in head_logprobs: bounds the [rows, vocab] fp32 block (with a 151,936
# vocabulary, 256 rows are 156 MB) while keeping each matmul large enough to run near peak.
HEAD_CHUNK_BYTES = 160 * 2**20


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


def _head_rows(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(16, HEAD_CHUNK_BYTES // (4 * vocab))


class _HeadLogprob(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] without ever holding logits for more than one chunk of rows.

    Forward keeps only the per-row logsumexp; backward recomputes each chunk's logits (one extra
    matmul) instead of storing [rows, vocab] activations, the same trade TRL's chunked head makes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):  # noqa: D102
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.T).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            g = grad_out[rows].float()
            # d logp[t] / d logits = onehot(t) - softmax(logits), computed in place in the logits buffer
            grad_logits = (hidden[rows] @ weight.T).float().sub_(lse[rows, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[rows, None], g[:, None])
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden[rows])
        return grad_hidden, grad_weight, None, None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  chunk_rows: int | None = None) -> torch.Tensor:
    """log p(target) [B, T] (fp32) from final hidden states [B, T, H] and the LM head weight [V, H].

    Equals token_logprobs(hidden @ weight.T, targets), but the [B, T, V] logits never exist: peak
    memory is one chunk of rows (HEAD_CHUNK_BYTES), in the forward and in the backward.
    """
    flat = hidden.reshape(-1, hidden.size(-1))
    rows = _head_rows(weight.size(0), chunk_rows)
    return _HeadLogprob.apply(flat, weight, targets.reshape(-1), rows).view(targets.shape)


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
