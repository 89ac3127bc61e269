"""Run by tests/test_sharding.py under torchrun (2 CPU processes, gloo): a real FSDP-1 model.

Writes one JSON file per rank (rank<N>.json in the folder given as argv[1]; two ranks printing to one
shared stdout can interleave their lines): did greedy generation inside full_weights_for_generation give the
unsharded model's tokens, and how far are the FSDP model's completion log-probs from the plain ones."""

import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel

from visual_rft.data.embedded import mnist_records
from visual_rft.models.loading import build_model_inputs, vision_token_ids
from visual_rft.rl.fast import generate_grouped, rollout_logprobs
from visual_rft.rl.rollout import Rollout, lm_head_weight, repeat_inputs
from visual_rft.engine import full_weights_for_generation
from visual_rft.models.tiny import make_tiny_model


def main() -> None:
    dist.init_process_group("gloo")
    model, processor = make_tiny_model(seed=0)
    processor.tokenizer.padding_side = "left"
    model.eval()
    images = [r.load_image() for r in mnist_records(limit=2, size=56)]
    group = dict(build_model_inputs(processor, images, ["Which digit?", "Name the digit in the picture."]))
    settings = dict(max_new_tokens=6, temperature=0.0, suppress_ids=vision_token_ids(processor))
    ids, mask, _ = generate_grouped(model, processor.tokenizer, group, 2, **settings)
    rollout = Rollout([None] * 4, [""] * 4, repeat_inputs(group, 2), ids, mask, [""] * 4, group_inputs=group,
                      group_size=2)
    with torch.no_grad():
        plain = rollout_logprobs(model, rollout)
    sharded = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP, unwrap_model=lambda m: m.module,
        state=types.SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=types.SimpleNamespace(fsdp_version=1)))
    with full_weights_for_generation(accelerator, sharded) as policy:
        ids2, mask2, _ = generate_grouped(policy, processor.tokenizer, group, 2, **settings)
    with torch.no_grad():
        logp = rollout_logprobs(sharded, rollout)
    result = {"rank": dist.get_rank(), "head_used": lm_head_weight(sharded) is not None,
              "same_tokens": torch.equal(ids, ids2) and torch.equal(mask, mask2),
              "logp_diff": (logp - plain)[mask.bool()].abs().max().item()}
    (Path(sys.argv[1]) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
