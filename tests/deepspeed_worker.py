"""Run by tests/test_deepspeed.py under `accelerate launch` with a DeepSpeed config (2 CPU processes):
a GRPO run whose loss is NaN on rank 0 only, at its 2nd optimiser step. The NaN reaches every rank
through the gradient reduction, so the whole step must be skipped on all of them."""

import sys

from visual_rft.config import load_config
from visual_rft.rewards import task_rewards
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.runtime import load_split


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    rewards = task_rewards(cfg.task)
    trainer = GRPOTrainer(cfg, load_split(cfg), rewards)
    calls = {"n": 0}
    update, loss = trainer.update, trainer.loss

    def counting_update(rollouts):
        calls["n"] += 1
        return update(rollouts)

    def poisoned_loss(rollout, normalizer):
        value, stats = loss(rollout, normalizer)
        bad = calls["n"] == 2 and trainer.accelerator.process_index == 0
        return (value * float("nan") if bad else value), stats

    trainer.update, trainer.loss = counting_update, poisoned_loss
    trainer.fit()


if __name__ == "__main__":
    main()
