"""bf16 parameters learn at the paper's learning rate: AdamW steps fp32 master weights (issue 20, item 6)."""

import torch

from visual_rft.config import OptimConfig
from visual_rft.optim import MasterWeightAdamW, make_optimizer

LR = 1e-6
STEPS = 2000  # moves a weight ~2e-3, several bf16 ulps of a typical weight


def _pair(seed=0):
    torch.manual_seed(seed)
    low = torch.nn.Linear(64, 64).to(torch.bfloat16)
    high = torch.nn.Linear(64, 64)
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    return low, high


def _grads(step):
    """A steady direction plus per-step noise, so AdamW's updates add up (about lr per step)."""
    base, gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(*shape, generator=base) + 0.3 * torch.randn(*shape, generator=gen)).to(torch.bfloat16)
            for shape in ((64, 64), (64,))]


def _run(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        for param, grad in zip(model.parameters(), _grads(step)):
            param.grad = grad.to(param.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _optim(model):
    return make_optimizer(model.parameters(), OptimConfig(learning_rate=LR, weight_decay=0.0))


def test_bf16_weights_are_the_fp32_run_rounded_after_many_small_updates():
    low, high = _pair()
    low_opt, high_opt = _optim(low), _optim(high)
    assert isinstance(low_opt, MasterWeightAdamW) and not isinstance(high_opt, MasterWeightAdamW)
    start = [p.detach().clone() for p in low.parameters()]
    _run(low, low_opt, STEPS)
    _run(high, high_opt, STEPS)
    for p_low, p_high, p0, master in zip(low.parameters(), high.parameters(), start, low_opt.masters):
        assert torch.allclose(master, p_high, rtol=0, atol=1e-9)  # the update the fp32 run made
        assert torch.equal(p_low, p_high.to(torch.bfloat16))  # and the weight is that, rounded
        assert (p_low != p0).float().mean().item() > 0.5
    # the check can fail: plain AdamW on the bf16 weights rounds the 1e-6 updates away
    plain, _ = _pair()
    _run(plain, torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.0), STEPS)
    assert (plain.weight != start[0]).float().mean().item() < 0.05


def test_master_weights_resume_exactly_from_a_state_dict():
    reference, _ = _pair()
    opt = _optim(reference)
    _run(reference, opt, 10)
    resumed, _ = _pair()
    first = _optim(resumed)
    _run(resumed, first, 5)
    saved, weights = first.state_dict(), {k: v.clone() for k, v in resumed.state_dict().items()}
    fresh, _ = _pair(seed=1)  # another init: everything must come from the checkpoint
    fresh.load_state_dict(weights)
    second = _optim(fresh)
    second.load_state_dict(saved)
    _run(fresh, second, 5, start=5)
    for a, b in zip(reference.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.masters, second.masters):
        assert torch.equal(a, b)
