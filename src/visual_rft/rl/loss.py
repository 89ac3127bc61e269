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
    With a `grad_hint` (the predicted dLoss/dlogp) the forward also computes the gradients while
    each chunk's logits are at hand, saving the recompute; backward uses them only if the gradient
    that actually arrives is a multiple of the prediction, and recomputes otherwise.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, grad_hint):  # noqa: D102
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        spec = (torch.empty_like(out), torch.empty_like(hidden), torch.zeros_like(weight)) if grad_hint else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.T).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
            if spec is not None:
                spec[0][rows] = grad_hint(out[rows], rows)
                _chunk_grads(logits, lse[rows], targets[rows], spec[0][rows], hidden[rows], weight,
                             spec[1][rows], spec[2])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows, ctx.spec = chunk_rows, spec
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, targets, lse = ctx.saved_tensors
        scale = _hint_scale(ctx.spec[0], grad_out) if ctx.spec is not None else None
        if scale is not None:
            _, grad_hidden, grad_weight = ctx.spec
            ctx.spec = None
            return grad_hidden.mul_(scale), grad_weight.mul_(scale), None, None, None
        ctx.spec = None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logits = (hidden[rows] @ weight.T).float()
            _chunk_grads(logits, lse[rows], targets[rows], grad_out[rows].float(), hidden[rows], weight,
                         None if grad_hidden is None else grad_hidden[rows], grad_weight)
        return grad_hidden, grad_weight, None, None, None


def _chunk_grads(logits, lse, targets, g, hidden, weight, grad_hidden, grad_weight) -> None:
    """Add one chunk's gradients, given dLoss/dlogp `g`; overwrites `logits` (no second buffer)."""
    # d logp[t] / d logits = onehot(t) - softmax(logits)
    grad_logits = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    grad_logits.scatter_add_(1, targets[:, None], g[:, None])
    grad_logits = grad_logits.to(weight.dtype)
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T, hidden)


def _hint_scale(predicted: torch.Tensor, actual: torch.Tensor) -> float | None:
    """s with actual == s * predicted (to float rounding), else None. The loss is usually divided by
    the number of micro-batches (or scaled for fp16) after the prediction was made."""
    actual = actual.float()
    norm = predicted.dot(predicted)
    if norm == 0:
        return 0.0 if not actual.any() else None
    scale = (actual.dot(predicted) / norm).item()
    tolerance = 1e-6 * actual.abs().max().item() + 1e-30
    return scale if (actual - scale * predicted).abs().max().item() <= tolerance else None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  chunk_rows: int | None = None, grad_hint=None) -> torch.Tensor:
    """log p(target) [B, T] (fp32) from final hidden states [B, T, H] and the LM head weight [V, H].

    Equals token_logprobs(hidden @ weight.T, targets), but the [B, T, V] logits never exist: peak
    memory is one chunk of rows (HEAD_CHUNK_BYTES), in the forward and in the backward.
    `grad_hint(logp_rows, rows) -> dLoss/dlogp_rows` (flat row indices) lets the forward compute the
    gradients too (see _HeadLogprob); results are the same with or without it.
    """
    flat = hidden.reshape(-1, hidden.size(-1))
    rows = _head_rows(weight.size(0), chunk_rows)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        grad_hint = None
    return _HeadLogprob.apply(flat, weight, targets.reshape(-1), rows, grad_hint).view(targets.shape)


def ratio_one_grad_hint(advantages: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, *,
                        beta: float, eps_low: float, eps_high: float, loss_type: str, max_completion_length: int):
    """dLoss/dlogp of the GRPO loss with old_logp = logp.detach() (one update per rollout), for
    head_logprobs' grad_hint: the same functions the loss uses, differentiated per row."""
    rows, length = mask.shape
    probe = torch.zeros(rows, length, requires_grad=True)
    with torch.enable_grad():  # aggregate is linear in the per-token loss: its gradient is its weights
        weights = torch.autograd.grad(aggregate(probe, mask.cpu(), loss_type, max_completion_length), probe)[0]
    weights = weights.reshape(-1).to(mask.device)
    adv = advantages.to(mask.device).repeat_interleave(length)
    ref = ref_logp.reshape(-1) if ref_logp is not None else None

    def hint(logp: torch.Tensor, index: slice) -> torch.Tensor:
        with torch.enable_grad():
            x = logp.detach().requires_grad_()
            per_token, _ = clipped_surrogate(x[:, None], x.detach()[:, None], adv[index], eps_low, eps_high)
            per_token = per_token[:, 0]
            if ref is not None:
                per_token = per_token + beta * k3_kl(x, ref[index])
            return torch.autograd.grad((per_token * weights[index]).sum(), x)[0]

    return hint


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
