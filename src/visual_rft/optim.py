"""Optimiser, LR schedule and the deterministic data order shared by GRPO and SFT (each with its own OptimConfig)."""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from transformers import get_scheduler

from visual_rft.config import OptimConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, *,
                   master_weights: bool = True) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad; with fp32 master weights where they are bf16/fp16
    (unless the engine keeps its own masters: `master_weights=False`, DeepSpeed)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all frozen?)")
    kwargs = dict(lr=optim.learning_rate, weight_decay=optim.weight_decay, betas=(optim.adam_beta1, optim.adam_beta2))
    if master_weights and any(p.dtype in LOW_PRECISION for p in trainable):
        return MasterWeightAdamW(trainable, **kwargs)
    return torch.optim.AdamW(trainable, **kwargs)


LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW that steps fp32 copies of low-precision parameters and writes them back rounded.

    A bf16 weight of size ~0.05 has an ulp of ~2.4e-4: an update of lr 1e-6 (the paper's rate) is far
    below half of it, so AdamW on bf16 parameters rounds almost every update away (measured: 2.18% of
    the weights changed after 2 steps). Here the update lands on an fp32 master, which accumulates it
    exactly, and the model's bf16 weight is the master rounded. The masters travel in state_dict, so
    a resumed run continues from them rather than from the rounded weights in the checkpoint.
    """

    def __init__(self, params: list[torch.nn.Parameter], **kwargs: Any) -> None:
        self.model_params = list(params)
        self.masters = [p.detach().float() if p.dtype in LOW_PRECISION else p for p in self.model_params]
        super().__init__(self.masters, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        if closure is not None:
            raise ValueError("MasterWeightAdamW does not take a closure")
        for param, master in self._low_precision_pairs():
            master.grad = None if param.grad is None else param.grad.float()
        out = super().step()
        for param, master in self._low_precision_pairs():
            param.copy_(master)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        super().zero_grad(set_to_none)
        for param, _ in self._low_precision_pairs():
            param.grad = None if set_to_none else (param.grad.zero_() if param.grad is not None else None)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state = super().state_dict()
        state["fp32_masters"] = [m.detach().clone() for _, m in self._low_precision_pairs()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        state_dict = dict(state_dict)
        masters = state_dict.pop("fp32_masters", None)
        super().load_state_dict(state_dict)
        pairs = list(self._low_precision_pairs())
        if masters is not None:
            if len(masters) != len(pairs):
                raise ValueError(f"optimizer state has {len(masters)} fp32 master weights, the model {len(pairs)}")
            with torch.no_grad():
                for (param, master), saved in zip(pairs, masters):
                    master.copy_(saved)
                    param.copy_(master)

    def _low_precision_pairs(self):
        return ((p, m) for p, m in zip(self.model_params, self.masters) if p is not m)


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> Any:
    """optim.lr_scheduler over `total_steps` optimiser steps, the first warmup_ratio of them warming up."""
    return get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=int(optim.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def apply_optim_settings(scheduler: Any, optim: OptimConfig) -> None:
    """Put the run's own optimiser settings over those a resumed checkpoint restored.

    An optimiser's state_dict carries its hyper-parameters (lr, initial_lr, betas, weight_decay) and a
    LambdaLR's carries base_lrs, so loading them brings back the checkpoint's values: a resume with a
    new learning rate (--resume-with-changes) recorded it and went on at the old one. The moments and
    the step count stay restored; the rate is recomputed from the new peak and the new schedule at the
    restored step (same values bit for bit when nothing changed)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # every optim.lr_scheduler choice is one
        raise TypeError(f"cannot re-apply optimiser settings to a {type(scheduler).__name__}")
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [optim.learning_rate] * len(groups)
    lrs = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(groups, lrs):
        group.update(lr=lr, initial_lr=optim.learning_rate, weight_decay=optim.weight_decay,
                     betas=(optim.adam_beta1, optim.adam_beta2))
    scheduler._last_lr = lrs  # what get_last_lr() (metrics.jsonl's lr) reads


def total_steps(num_records: int, per_step: int, num_epochs: float, max_steps: int) -> int:
    """Optimiser steps for a run: `max_steps` when set, else enough steps to see the data num_epochs times."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_records * num_epochs / per_step))


def step_indices(step: int, per_step: int, num_records: int, seed: int) -> list[int]:
    """Record indices consumed by optimiser step `step`.

    The order is an endless concatenation of per-epoch permutations seeded by (seed, epoch), so it
    depends only on the step number: a resumed run sees exactly the data an uninterrupted one would.
    """
    perms: dict[int, list[int]] = {}
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_records)
        if epoch not in perms:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_records, generator=generator).tolist()
        out.append(perms[epoch][offset])
    return out


def slot_seed(seed: int, step: int, slot: int) -> int:
    """A seed for one micro-batch slot of one step, independent of process count and resume point."""
    return (seed * 1_000_003 + step * 10_007 + slot) % (2**63 - 1)


def shard(indices: list[int], micro_batch: int, rank: int, world: int) -> list[list[int]]:
    """Split a step's indices into this rank's micro-batches: micro m of rank r is slot m*world + r."""
    chunks = [indices[i:i + micro_batch] for i in range(0, len(indices), micro_batch)]
    return [chunk for slot, chunk in enumerate(chunks) if slot % world == rank]


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                  max_grad_norm: float, clip_fn: Any = None) -> tuple[float, bool]:
    """Clip, step, schedule, zero; returns (pre-clip gradient norm, whether the step was taken).

    A non-finite gradient norm (a NaN/inf loss or gradient anywhere) skips the step entirely —
    optimiser and scheduler untouched — so no NaN can ever reach the weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    clip = clip_fn or torch.nn.utils.clip_grad_norm_
    norm = float(clip(params, limit))
    finite = math.isfinite(norm)
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite


class NonFiniteGuard:
    """Counts consecutive skipped steps and stops the run with a clear message after `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit, self.consecutive, self.total = limit, 0, 0

    def record(self, step: int, stepped: bool) -> None:
        if stepped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        warnings.warn(f"step {step}: non-finite loss or gradient, update skipped "
                      f"({self.consecutive} in a row, limit {self.limit})", RuntimeWarning, stacklevel=2)
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"{self.consecutive} consecutive steps with a non-finite loss or gradient (last: step {step}); "
                "stopping before anything is saved. Lower the learning rate, check the data, or use fp32."
            )
