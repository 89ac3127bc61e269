"""Group-relative advantages: GRPO's replacement for a learned value function."""

from __future__ import annotations

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4,
                     scorable: torch.Tensor | None = None) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps), or r - mean_group when `scale` is False (Dr. GRPO).

    `rewards` is flat [num_prompts * group_size], grouped contiguously (all G samples of prompt 0,
    then prompt 1, ...). The std is the unbiased sample std, as in the GRPO paper and TRL, so a
    group of identical rewards gets zero advantage and contributes no gradient.
    `scorable` (bool, like rewards): completions no reward could score are left out of their
    group's mean and std and get advantage 0 (grpo.unscorable=exclude); a group with fewer than two
    scorable completions has no spread to learn from and gets 0 throughout.
    """
    grouped = _grouped(rewards, group_size)
    keep = torch.ones_like(grouped, dtype=torch.bool) if scorable is None else _grouped(scorable, group_size).bool()
    count = keep.sum(1, keepdim=True)
    mean, std = _mean_std(grouped, keep, count)
    centred = torch.where(keep, grouped - mean, torch.zeros_like(grouped))
    if scale:
        centred = centred / (std + eps)
    return torch.where(count >= 2, centred, torch.zeros_like(centred)).reshape(-1)


def _mean_std(grouped: torch.Tensor, keep: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and unbiased std over the kept entries. With every entry kept this is torch's
    own mean/std, bit for bit what earlier versions computed (the masked sums differ by ~1e-7)."""
    if keep.all():
        return grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    mean = torch.where(keep, grouped, torch.zeros_like(grouped)).sum(1, keepdim=True) / count.clamp(min=1)
    squares = torch.where(keep, grouped - mean, torch.zeros_like(grouped)).pow(2).sum(1, keepdim=True)
    return mean, (squares / (count - 1).clamp(min=1)).sqrt()


def zero_variance_groups(rewards: torch.Tensor, group_size: int, scorable: torch.Tensor | None = None) -> torch.Tensor:
    """[num_groups] bool: groups whose (scorable) rewards are all equal, so every advantage is 0 and
    their completions teach nothing but the KL term (common in few-shot classification: all right)."""
    grouped = _grouped(rewards, group_size)
    keep = torch.ones_like(grouped, dtype=torch.bool) if scorable is None else _grouped(scorable, group_size).bool()
    high = torch.where(keep, grouped, torch.full_like(grouped, -float("inf"))).max(1).values
    low = torch.where(keep, grouped, torch.full_like(grouped, float("inf"))).min(1).values
    return (keep.sum(1) < 2) | (high == low)


def group_reward_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean within-group std: 0 means no group had a learning signal."""
    return rewards.view(-1, group_size).std(dim=1).mean()
