"""Log-probabilities of chosen tokens through the LM head, without a [tokens x vocab] tensor.

`head_logprobs` is a custom autograd head: it multiplies hidden states by the head weight in row
chunks and keeps only each row's logsumexp, so the logits never exist for more than one chunk, in
the forward or the backward. It is a speed and memory device, not part of the objective: the
objective (loss.py) sees only the log-probabilities it returns, and equals the plain
`log_softmax(model(**inputs).logits / T)` to float rounding (tests/test_rl_equivalence.py).
"""

from __future__ import annotations

import torch

# Rows of logits alive at once in head_logprobs: bounds the [rows, vocab] fp32 block (with a 151,936
# vocabulary, 256 rows are 156 MB) while keeping each matmul large enough to run near peak.
HEAD_CHUNK_BYTES = 160 * 2**20


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per position for logits [B, T, V] and targets [B, T], in fp32.

    Rows are processed in chunks so the fp32 log-softmax never materialises for the whole batch at
    once (with a 151k vocabulary that tensor is the largest of the step).
    """
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_targets = targets.reshape(-1)
    out = []
    for start in range(0, flat_logits.size(0), chunk_size):
        rows = flat_logits[start:start + chunk_size].float()
        if temperature != 1.0:
            rows = rows / temperature
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


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                  chunk_rows: int | None = None, grad_hint=None) -> torch.Tensor:
    """log p(target) [B, T] (fp32) from final hidden states [B, T, H] and the LM head weight [V, H].

    Equals token_logprobs(hidden @ weight.T, targets, temperature=temperature) (dividing the hidden
    states by the temperature divides the logits by it, gradients included), but the [B, T, V] logits never exist: peak
    memory is one chunk of rows (HEAD_CHUNK_BYTES), in the forward and in the backward.
    `grad_hint(logp_rows, rows) -> dLoss/dlogp_rows` (flat row indices) lets the forward compute the
    gradients too (see _HeadLogprob); results are the same with or without it.
    """
    flat = hidden.reshape(-1, hidden.size(-1))
    if temperature != 1.0:
        flat = flat / temperature
    rows = _head_rows(weight.size(0), chunk_rows)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        grad_hint = None
    return _HeadLogprob.apply(flat, weight, targets.reshape(-1), rows, grad_hint).view(targets.shape)
