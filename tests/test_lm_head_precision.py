"""The chunked head in bf16: the temperature divides the fp32 logits (what generation samples from),
and the head's gradient accumulates in fp32 (issue 20, item 7)."""

import torch

from visual_rft.rl.lm_head import head_logprobs

VOCAB, HIDDEN, ROWS = 512, 64, 256


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    return hidden, weight, targets


def _sampling_logprobs(hidden, weight, targets, temperature):
    """What generate() samples from: the model's bf16 logits, cast to fp32, divided by T."""
    logits = (hidden @ weight.T).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def test_tempered_bf16_logprobs_match_the_sampling_distribution():
    hidden, weight, targets = _inputs()
    expected = _sampling_logprobs(hidden, weight, targets, 0.7)
    got = head_logprobs(hidden[None], weight, targets[None], temperature=0.7, chunk_rows=32)[0]
    assert (got - expected).abs().max().item() < 1e-4
    # the check can fail: dividing the bf16 hidden states instead (the old head) is visibly off
    divided_first = _sampling_logprobs((hidden / 0.7).to(torch.bfloat16), weight, targets, 1.0)
    assert (divided_first - expected).abs().max().item() > 1e-3


def _reference_grads(hidden, weight, targets, coeff, temperature):
    """Float64 gradients from the same bf16 logits the head computes (so only accumulation differs)."""
    logits = (hidden @ weight.T).double() / temperature
    grad_logits = -torch.softmax(logits, -1)
    grad_logits[torch.arange(ROWS), targets] += 1
    grad_logits *= coeff.double()[:, None] / temperature
    return grad_logits @ weight.double(), grad_logits.T @ hidden.double()


def test_bf16_head_gradient_accumulates_in_fp32_and_equals_the_hinted_path():
    hidden, weight, targets = _inputs(1)
    coeff = torch.randn(ROWS, generator=torch.Generator().manual_seed(2))
    _, ref_w = _reference_grads(hidden, weight, targets, coeff, 0.7)
    grads = []
    for hint in (None, lambda logp, rows: coeff[rows]):
        w = weight.clone().requires_grad_()
        logp = head_logprobs(hidden[None], w, targets[None], temperature=0.7, chunk_rows=8, grad_hint=hint)
        (logp[0] * coeff).sum().backward()
        assert w.grad.dtype == torch.bfloat16
        grads.append(w.grad.double())
    assert torch.equal(grads[0], grads[1])
    # 32 chunks summed: a bf16 accumulator rounds each partial sum; fp32 leaves one final rounding
    error = ((grads[0] - ref_w).norm() / ref_w.norm()).item()
    assert error < 3e-3, error


def test_frozen_head_gets_no_gradient_and_the_hidden_gradient_is_unchanged():
    hidden, weight, targets = _inputs(3)
    coeff = torch.randn(ROWS, generator=torch.Generator().manual_seed(4))
    ref_h, _ = _reference_grads(hidden, weight, targets, coeff, 0.7)
    for hint in (None, lambda logp, rows: coeff[rows]):
        h = hidden.clone().requires_grad_()
        logp = head_logprobs(h[None], weight, targets[None], temperature=0.7, chunk_rows=8, grad_hint=hint)
        (logp[0] * coeff).sum().backward()
        assert weight.grad is None
        assert ((h.grad.double() - ref_h).norm() / ref_h.norm()).item() < 1e-2
