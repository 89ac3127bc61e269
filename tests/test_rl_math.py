"""The GRPO math on hand-computed 2x3 examples."""

import math

import pytest
import torch

from visual_rft.rl.advantages import group_advantages, group_reward_std
from visual_rft.rl.lm_head import token_logprobs
from visual_rft.rl.loss import aggregate, clipped_surrogate, k3_kl, masked_mean


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 3.0])
    adv = group_advantages(rewards, 3, eps=0.0)
    # group 1: mean 1, unbiased std 1 -> [0, -1, 1]; group 2: identical rewards -> 0 (0/eps guarded below)
    assert adv[:3].tolist() == pytest.approx([0.0, -1.0, 1.0])
    adv = group_advantages(rewards, 3)  # default eps keeps the identical group at exactly 0
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]
    assert adv[:3].tolist() == pytest.approx([0.0, -1 / 1.0001, 1 / 1.0001])


def test_group_advantages_without_scaling_is_centred_only():
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 4.0, 0.0, 2.0]), 3, scale=False)
    assert adv.tolist() == pytest.approx([0.0, -1.0, 1.0, 2.0, -2.0, 0.0])


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_group_reward_std():
    assert group_reward_std(torch.tensor([1.0, 0.0, 2.0, 3.0, 3.0, 3.0]), 3).item() == pytest.approx(0.5)


def test_token_logprobs_matches_log_softmax_and_chunking_is_invisible():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 2, 3], [6, 0, 5]])
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets), expected, atol=1e-6)
    assert torch.allclose(token_logprobs(logits, targets, chunk_size=2), expected, atol=1e-6)


def test_clipped_surrogate_by_hand():
    log_ratio = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.1, 0.7, 1.3]]))  # ratios are exactly these numbers
    adv = torch.tensor([1.0, -2.0])
    loss, clipped = clipped_surrogate(log_ratio, adv, 0.2, 0.2)
    # A>0: -min(r, clip(r)) -> r=1.5 clipped to 1.2; r=0.5 stays (min picks the unclipped 0.5)
    # A<0: -min(-2r, -2clip(r)) -> r=1.1 stays; r=0.7 clipped up to 0.8 -> -2*0.8 is larger, min keeps -1.4
    assert torch.allclose(loss, torch.tensor([[-1.2, -1.0, -0.5], [2.2, 1.6, 2.6]]))
    assert clipped.tolist() == [[1, 0, 0], [0, 1, 0]]


def test_k3_kl_by_hand_and_zero_at_equality():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[0.0, -2.0, -1.0]])
    expected = [0.0, math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1]
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx(expected)
    assert (k3_kl(logp, ref) >= 0).all()


def test_aggregate_loss_types_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_token, mask, "grpo", 3).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per_token, mask, "dapo", 3).item() == pytest.approx(10.0 / 4)
    assert aggregate(per_token, mask, "dr_grpo", 5).item() == pytest.approx(10.0 / (2 * 5))
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(per_token, mask, "ppo", 3)


def test_masked_mean_ignores_padding():
    assert masked_mean(torch.tensor([[1.0, 9.0], [3.0, 9.0]]), torch.tensor([[1, 0], [1, 0]])).item() == 2.0


# ---------------------------------------------------------------- the objective's semantics (issue 10)
from types import SimpleNamespace  # noqa: E402

from visual_rft.config import GRPOConfig  # noqa: E402
from visual_rft.rewards import RewardSet  # noqa: E402
from visual_rft.rl.advantages import zero_variance_groups  # noqa: E402
from visual_rft.rl.lm_head import head_logprobs  # noqa: E402
from visual_rft.rl.loss import Objective, policy_loss  # noqa: E402
from visual_rft.rl.rollout import Rollout  # noqa: E402
from visual_rft.rl.trainer import GRPOTrainer  # noqa: E402


def test_logprobs_are_those_of_the_tempered_distribution():
    # logits [2, 0] at T=0.5 are [4, 0]: log p(token 0) = 4 - ln(e^4 + 1)
    logits = torch.tensor([[[2.0, 0.0]]])
    expected = 4 - math.log(math.exp(4) + 1)
    assert token_logprobs(logits, torch.tensor([[0]]), temperature=0.5).item() == pytest.approx(expected, abs=1e-6)
    hidden = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    weight = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)  # hidden @ weight.T = [2, 0]
    got = head_logprobs(hidden, weight, torch.tensor([[0]]), temperature=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    got.sum().backward()
    # d/dh of log softmax(h W^T / T)[0] = (1 - p0) * (w0 - w1) / T, p0 = sigmoid(4)
    p0 = 1 / (1 + math.exp(-4))
    assert hidden.grad[0, 0].tolist() == pytest.approx([(1 - p0) * 2 / 0.5, 0.0], abs=1e-6)


def _by_hand_grads(objective, logp, mask, adv, normalizer=None, ref=None, old=None):
    x = logp.clone().requires_grad_()
    loss, stats = policy_loss(x, x.detach() if old is None else old, ref, adv, mask, objective, normalizer)
    loss.backward()
    return loss.item(), x.grad, stats


def test_dapo_divides_by_the_tokens_of_the_whole_step_across_micro_batches():
    # two micro-batches of 2 and 3 completion tokens: 5 tokens in the step, each micro-batch's loss is
    # divided by 5 / 2 (tokens per micro-batch) and then by the 2 micro-batches, as the trainer does
    objective = Objective(loss_type="dapo")
    first = (torch.zeros(1, 3), torch.tensor([[1, 1, 0]]), torch.tensor([2.0]))
    second = (torch.zeros(1, 3), torch.tensor([[1, 1, 1]]), torch.tensor([-1.0]))
    total, grads = 0.0, []
    for logp, mask, adv in (first, second):
        loss, grad, _ = _by_hand_grads(objective, logp, mask, adv, normalizer=torch.tensor(5 / 2))
        total += loss / 2
        grads.append(grad / 2)
    # ratio 1: per-token loss -A, so the step's loss is (-2 - 2 + 1 + 1 + 1) / 5 and dL/dlogp = -A / 5
    assert total == pytest.approx(-1 / 5)
    assert grads[0][0].tolist() == pytest.approx([-2 / 5, -2 / 5, 0.0])
    assert grads[1][0].tolist() == pytest.approx([1 / 5, 1 / 5, 1 / 5])
    # without the step's count each micro-batch would average its own tokens: -2 and +1, mean -0.5
    local = [policy_loss(lp, lp, None, a, m, objective)[0].item() / 2 for lp, m, a in (first, second)]
    assert sum(local) == pytest.approx(-0.5)


def test_padding_never_enters_exp():
    # a reference 1000 nats away at a padding position used to give exp(1000) = inf, then NaN
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, 1000.0]])
    mask = torch.tensor([[1, 1, 0]])
    objective = Objective(loss_type="grpo", beta=0.1)
    loss, grad, stats = _by_hand_grads(objective, logp, mask, torch.tensor([1.0]), ref=ref)
    kl_first = math.exp(-0.5) + 0.5 - 1
    assert loss == pytest.approx((-1 - 1 + 0.1 * kl_first) / 2)
    assert stats["kl"].item() == pytest.approx(kl_first / 2)
    # dL/dlogp per valid token: (-A + beta * (1 - exp(ref - logp))) / 2 ; padding gets exactly 0
    assert grad[0].tolist() == pytest.approx([(-1 + 0.1 * (1 - math.exp(-0.5))) / 2, -0.5, 0.0])
    assert torch.isfinite(grad).all()


def test_gspo_uses_one_length_normalised_ratio_per_sequence():
    logp = torch.tensor([[0.2, -0.1, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    old = torch.zeros(1, 3)
    seq = Objective(importance_sampling_level="sequence")
    loss, grad, _ = _by_hand_grads(seq, logp, mask, torch.tensor([1.0]), old=old)
    r = math.exp((0.2 - 0.1) / 2)  # exp of the mean log-ratio: 1.0513, inside [0.8, 1.2]
    assert loss == pytest.approx(-r)
    assert grad[0].tolist() == pytest.approx([-r / 2, -r / 2, 0.0])  # every token pulls with the sequence ratio
    token = Objective(importance_sampling_level="token")
    _, grad, _ = _by_hand_grads(token, torch.tensor([[0.1, -0.1, 0.0]]), mask, torch.tensor([1.0]), old=old)
    assert grad[0].tolist() == pytest.approx([-math.exp(0.1) / 2, -math.exp(-0.1) / 2, 0.0])  # per-token ratios
    # a sequence ratio past 1 + eps with A > 0 is clipped: constant loss, no gradient
    loss, grad, stats = _by_hand_grads(seq, torch.tensor([[0.5, 0.3, 0.0]]), mask, torch.tensor([1.0]), old=old)
    assert loss == pytest.approx(-1.2) and grad.abs().max().item() == 0.0 and stats["clip_frac"].item() == 1.0


def test_unscorable_completions_zero_or_excluded():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0])  # the third completion: no reward applied (None -> 0)
    scorable = torch.tensor([True, True, False, True])
    # exclude: mean of 1, 0, 2 = 1, unbiased std 1 -> [0, -1, 0, 1] / (1 + eps)
    excluded = group_advantages(rewards, 4, scorable=scorable)
    assert excluded.tolist() == pytest.approx([0.0, -1 / 1.0001, 0.0, 1 / 1.0001])
    # zero (default): the 0 takes part: mean 0.75, std sqrt(2.75 / 3)
    std = math.sqrt(2.75 / 3)
    assert group_advantages(rewards, 4).tolist() == pytest.approx([(r - 0.75) / (std + 1e-4) for r in rewards.tolist()])
    # fewer than two scorable completions: nothing to compare, advantage 0
    assert group_advantages(rewards, 4, scorable=torch.tensor([False, True, False, False])).tolist() == [0.0] * 4
    reward_set = RewardSet(["maybe"], [lambda completions, **_: [None if c == "?" else 1.0 for c in completions]], [1.0],
                           parse=lambda completion, **_: None if completion == "?" else completion)
    scored = reward_set.score_all(["a", "?"], {})
    assert scored.components == {"maybe": [1.0, 0.0]} and scored.applicable == [True, False]
    assert scored.parse_failed == [False, True]


def _advantage_phase(**settings):
    """GRPOTrainer.advantage on a hand-made rollout: G=2, groups (1, 1) and (0, 1); row 3 is truncated."""
    g = GRPOConfig(num_generations=2, **settings)
    mask = torch.ones(4, 3, dtype=torch.long)
    rollout = Rollout([None] * 4, [""] * 4, {}, torch.zeros(4, 3, dtype=torch.long), mask, [""] * 4, group_size=2,
                      truncated=torch.tensor([False, False, False, True]), scorable=torch.ones(4, dtype=torch.bool))
    rollout.rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    GRPOTrainer.advantage(SimpleNamespace(g=g), rollout)
    return rollout


def test_zero_variance_groups_and_truncated_completions_leave_the_loss():
    assert zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist() == [True, False]
    plain = _advantage_phase()
    assert plain.loss_mask.sum(1).tolist() == [3, 3, 3, 3]
    assert plain.zero_variance.tolist() == [True, False]
    skipped = _advantage_phase(skip_zero_variance_groups=True)
    assert skipped.loss_mask.sum(1).tolist() == [0, 0, 3, 3]
    both = _advantage_phase(skip_zero_variance_groups=True, mask_truncated_completions=True)
    assert both.loss_mask.sum(1).tolist() == [0, 0, 3, 0]
    # the rows left out count for nothing, divisor included: grpo averages the 2 remaining completions
    adv = skipped.advantages  # (0, 1) group: -1/(std + eps), +1/(std + eps) with std = sqrt(0.5)
    loss, grad, _ = _by_hand_grads(Objective(), torch.zeros(4, 3), skipped.loss_mask, adv)
    assert loss == pytest.approx(-(adv[2] + adv[3]).item() / 2)
    assert grad[:2].abs().max().item() == 0.0
    assert grad[2].tolist() == pytest.approx([-adv[2].item() / 6] * 3)
