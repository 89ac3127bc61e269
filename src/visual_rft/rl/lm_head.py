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
    """log softmax(hidden @ weight.T / T)[target] without ever holding logits for more than one chunk of rows.

    Forward keeps only the per-row logsumexp (one exp pass per chunk, see _exp_shifted); backward
    recomputes each chunk's logits (one extra matmul) instead of storing [rows, vocab] activations, the
    same trade TRL's chunked head makes.
    With a `grad_hint` (the predicted dLoss/dlogp) the forward also computes the gradients while
    each chunk's logits are at hand, saving the recompute; backward uses them only if the gradient
    that actually arrives is a multiple of the prediction, and recomputes otherwise.

    Precision: the temperature divides the fp32 logits (as generation's sampler does), not the
    hidden states, which in bf16 would move log-probs by up to 0.03 nats at T=0.7; the head's
    gradient accumulates over chunks in an fp32 buffer, built only when the head trains.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, grad_hint, temperature):  # noqa: D102
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        spec = None
        if grad_hint:
            spec = (torch.empty_like(out), torch.empty_like(hidden) if ctx.needs_input_grad[0] else None,
                    _weight_grad_buffer(weight) if ctx.needs_input_grad[1] else None)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _tempered_logits(hidden[rows], weight, temperature)
            picked = logits.gather(1, targets[rows, None]).squeeze(1)
            lse[rows], exps, total = _exp_shifted(logits)
            out[rows] = picked - lse[rows]
            if spec is not None:
                spec[0][rows] = grad_hint(out[rows], rows)
                _chunk_grads(exps.div_(total), targets[rows], spec[0][rows] / temperature, hidden[rows], weight,
                             None if spec[1] is None else spec[1][rows], spec[2])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows, ctx.spec, ctx.temperature = chunk_rows, spec, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, targets, lse = ctx.saved_tensors
        scale = _hint_scale(ctx.spec[0], grad_out) if ctx.spec is not None else None
        if scale is not None:
            _, grad_hidden, grad_weight = ctx.spec
            ctx.spec = None
            return (_scaled(grad_hidden, scale, hidden.dtype), _scaled(grad_weight, scale, weight.dtype),
                    None, None, None, None)
        ctx.spec = None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = _weight_grad_buffer(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            softmax = _tempered_logits(hidden[rows], weight, ctx.temperature).sub_(lse[rows, None]).exp_()
            _chunk_grads(softmax, targets[rows], grad_out[rows].float() / ctx.temperature, hidden[rows],
                         weight, None if grad_hidden is None else grad_hidden[rows], grad_weight)
        return grad_hidden, _scaled(grad_weight, 1.0, weight.dtype), None, None, None, None


def _tempered_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk's fp32 logits divided by the temperature: the product in the model's dtype, as the
    model's own head computes it, then the division in fp32, as generation's sampler does it."""
    logits = (hidden @ weight.T).float()
    return logits if temperature == 1.0 else logits.div_(temperature)


def _weight_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """The head gradient's accumulator over chunks: fp32 whatever the weight's dtype (a bf16 buffer
    would round every chunk's contribution into a sum that is far larger than it)."""
    return torch.zeros_like(weight, dtype=torch.float32)


def _scaled(grad: torch.Tensor | None, scale: float, dtype: torch.dtype) -> torch.Tensor | None:
    if grad is None:
        return None
    if scale != 1.0:
        grad = grad.mul_(scale)
    return grad.to(dtype)


def _exp_shifted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logsumexp per row, exp(logits - row max), its row sums), overwriting `logits`: the one exp
    pass serves both the log-probs and, divided by the sums, the softmax their gradient needs
    (torch.logsumexp would run its own exp into a temporary, and the gradient a second one)."""
    top = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(top).exp_()
    total = exps.sum(dim=-1, keepdim=True)
    return (top + total.log()).squeeze(1), exps, total


def _chunk_grads(softmax, targets, g, hidden, weight, grad_hidden, grad_weight) -> None:
    """Add one chunk's gradients, given its softmax (overwritten: no second buffer) and dLoss/dlogits'
    scale `g` (dLoss/dlogp over the temperature). grad_weight is an fp32 accumulator."""
    # d logp[t] / d logits = onehot(t) - softmax(logits)
    grad_logits = softmax.mul_(-g[:, None])
    grad_logits.scatter_add_(1, targets[:, None], g[:, None])
    grad_logits = grad_logits.to(weight.dtype)
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden)
    if grad_weight is None:
        return
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.T, hidden)
    else:  # the product in the model's dtype (bf16 tensor cores), the sum over chunks in fp32
        grad_weight.add_(grad_logits.T @ hidden)


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

    Equals token_logprobs(hidden @ weight.T, targets, temperature=temperature) (the fp32 logits
    divided by the temperature, gradients included), but the [B, T, V] logits never exist: peak
    memory is one chunk of rows (HEAD_CHUNK_BYTES), in the forward and in the backward.
    `grad_hint(logp_rows, rows) -> dLoss/dlogp_rows` (flat row indices) lets the forward compute the
    gradients too (see _HeadLogprob); results are the same with or without it.
    """
    flat = hidden.reshape(-1, hidden.size(-1))
    rows = _head_rows(weight.size(0), chunk_rows)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        grad_hint = None
    return _HeadLogprob.apply(flat, weight, targets.reshape(-1), rows, grad_hint,
                              float(temperature)).view(targets.shape)
