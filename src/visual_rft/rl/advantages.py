"""Group-relative advantages: GRPO's replacement for a learned value function."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), or r - mean_group when `scale` is False (Dr. GRPO).

    `rewards` is flat [num_prompts * group_size], grouped contiguously (all G samples of prompt 0,
    then prompt 1, ...). The std is the unbiased sample std, as in the GRPO paper and TRL, so a
    group of identical rewards gets zero advantage and contributes no gradient.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def group_reward_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean within-group std: 0 means no group had a learning signal."""
    return rewards.view(-1, group_size).std(dim=1).mean()
