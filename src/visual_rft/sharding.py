"""Sharded training engines (DeepSpeed ZeRO-3, FSDP) and the code that reads weights directly.

Under ZeRO-3 and FSDP each rank holds a slice of every sharded weight; the engine gathers the full
tensors only inside its own forward. Two things in visual-rft need care:

- generation runs hundreds of small forwards: gathering the weights once around the whole rollout
  (`full_weights_for_generation`) instead of once per decode step, as TRL does;
- the chunked LM head (`rl.lm_head.head_logprobs`) multiplies by the head weight outside the module's
  forward, where a sharded weight is empty: `is_sharded` tells it to use the model's logits instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import DistributedType


def is_sharded(weight: torch.Tensor) -> bool:
    """True when `weight` is a shard of a larger tensor (a ZeRO-3 partitioned parameter, an FSDP-2
    DTensor, or an FSDP-1 flat-parameter view that is empty outside forward)."""
    if hasattr(weight, "ds_id") or weight.numel() == 0:
        return True
    return type(weight).__name__ == "DTensor"


def under_fsdp(model: Any) -> bool:
    """True when `model` is, or contains, an FSDP unit. FSDP-1 with use_orig_params leaves a rank's
    slice of a weight outside forward, sometimes as a 1-D view holding every value of a small tensor,
    which no shape or size test can tell from a weight reliably; hence this structural test."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    return any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in modules)


def zero_stage(accelerator: Any) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0


def fsdp_version(accelerator: Any) -> int:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return int(getattr(plugin, "fsdp_version", 1) or 1) if plugin is not None else 0


@contextlib.contextmanager
def full_weights_for_generation(accelerator: Any, model: Any) -> Iterator[Any]:
    """Yield the policy to sample from, with every weight whole on this rank for the whole block.

    - ZeRO-3: all parameters gathered once (deepspeed.zero.GatheredParameters; each rank then holds
      the full model for the rollout, as in TRL; its per-module hooks find them present).
    - FSDP-1: the root unit's parameters summoned (nested units gather in their own forward); called
      through the inner module, so FSDP's forward is not re-entered while summoned.
    - FSDP-2, DDP, one process: nothing to gather (FSDP-2's hooks live on the module itself).
    Weights are read-only inside: nothing is written back.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield accelerator.unwrap_model(model)
    elif kind == DistributedType.FSDP and fsdp_version(accelerator) == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield accelerator.unwrap_model(model)
    else:
        yield accelerator.unwrap_model(model)
