"""Run by tests/test_deepspeed.py under `accelerate launch` with zero3.yaml (2 CPU processes): a GRPO run
with tools in which rank 0's conversations call rotate in every turn (3, tools.max_turns) and rank 1's
answer at once, so rank 0 draws three turns per rollout and rank 1 one. Every turn is drawn by the real hf engine (the ZeRO-3 policy, its weights
gathered) and then its text replaced by the script. Were the weights gathered per turn, rank 0's second
gather would be a collective rank 1 never enters."""

import sys

import torch

from visual_rft.config import load_config
from visual_rft.rewards import task_rewards
from visual_rft.rl.engines.base import Generation
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.runtime import load_split

CALL = '<think>turned</think><tool_call>\n{"name": "rotate", "arguments": {"angle": 90}}\n</tool_call>'
ANSWER = "<think>a digit</think><answer>7</answer>"


def scripted(tokenizer, texts):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [tokenizer.encode(t, add_special_tokens=False) + [end] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return Generation(ids, mask, texts)


def main() -> None:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = GRPOTrainer(cfg, load_split(cfg), task_rewards(cfg.task, tools=cfg.tools))
    engine, rank = trainer.rollout_engine, trainer.accelerator.process_index
    real = engine.generate

    def generate(model, request):
        drawn = real(model, request)  # the policy really samples under ZeRO-3, then the script decides
        text = CALL if rank == 0 else ANSWER
        return scripted(trainer.processor.tokenizer, [text] * drawn.ids.size(0))

    engine.generate = generate
    trainer.fit()


if __name__ == "__main__":
    main()
