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
