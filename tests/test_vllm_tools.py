"""Tool conversations (issue 29) drawn by the vLLM engine: token prompts whose earlier turns are the
model's own ids and whose tool results carry new images, checked against the trainer's model.

Runs in the vLLM test environment only (`make test-vllm`); skipped where vLLM is not installed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from visual_rft.config import load_config  # noqa: E402
from visual_rft.rewards import task_rewards  # noqa: E402
from visual_rft.rl.engines.base import Generation, RolloutRequest  # noqa: E402
from visual_rft.rl.fast import generate_grouped  # noqa: E402
from visual_rft.rl.trainer import GRPOTrainer  # noqa: E402
from visual_rft.runtime import load_split  # noqa: E402
from visual_rft.tools.conversation import Conversation, batch_inputs  # noqa: E402

pytestmark = pytest.mark.vllm
DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"
TEMPERATURE = 0.7
TOKENS = 8
# one tool keeps the tools' system text short (~500 tokens on the tiny tokenizer, ~1700 with all five)
TOOLS = ["tools.enabled=true", "tools.names=[rotate]", "tools.max_turns=2", "grpo.max_prompt_length=700"]


def call_text(angle):
    call = f'{{"name": "rotate", "arguments": {{"angle": {angle}}}}}'
    return f"<think>it is tilted</think><tool_call>\n{call}\n</tool_call>"


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model_dir, digits_jsonl):
    cfg = load_config(DEMO_CONFIG, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={digits_jsonl}", "data.eval=null",
        f"output.dir={tmp_path_factory.mktemp('vllm_tools') / 'run'}", "output.progress=false", "grpo.rollout=vllm",
        "grpo.num_generations=2", "grpo.per_device_batch_size=2", f"grpo.max_completion_length={TOKENS}",
        "grpo.vllm.kv_cache_gib=0.5", f"grpo.temperature={TEMPERATURE}", "grpo.beta=0", *TOOLS])
    trainer = GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task, tools=cfg.tools))
    trainer.model.eval()
    trainer.rollout_engine.sync(trainer.model)
    return trainer


def conversations(trainer, angles=(90, 270)):
    """Turn 1 scripted (a rotate call, ended by the model's end token), its tool result: one per angle,
    the second image resized so the rows' prompt images differ in size."""
    tokenizer, eos = trainer.processor.tokenizer, trainer.eos.tolist()[0]
    convs = []
    for k, (record, angle) in enumerate(zip(trainer.records, angles)):
        image = record.load_image() if k == 0 else record.load_image().resize((84, 84))
        conv = Conversation(trainer.processor, record.problem, [image], system=trainer.tools.system)
        conv.add_model_turn(tokenizer.encode(call_text(angle), add_special_tokens=False) + [eos])
        turn = trainer.tools.answer(conv, call_text(angle))
        assert turn.call.name == "rotate" and turn.error is None and len(conv.images) == 2
        convs.append(conv)
    return convs


def turn_request(trainer, convs, seed=0):
    inputs = batch_inputs(convs)
    return RolloutRequest(trainer.records[:len(convs)], inputs, [len(c.images) for c in convs], 1, seed,
                          row_images=[list(c.images) for c in convs])


def plain_logprobs(trainer, conv, ids, temperature):
    """The drawn turn's log-probs by a plain forward of the whole conversation it ends (no fast path)."""
    inputs, drawn = conv.model_inputs(), torch.tensor([ids])
    length = inputs["input_ids"].size(1)
    for key, value in list(inputs.items()):  # per-token tensors: the ids, attention 1, type ids 0
        if value.dim() == 2 and value.shape == (1, length):
            extra = drawn if key == "input_ids" else torch.ones_like(drawn) if key == "attention_mask" else 0 * drawn
            inputs[key] = torch.cat([value, extra.to(value.dtype)], 1)
    with torch.no_grad():
        logits = trainer.policy(**inputs).logits[0, length - 1:-1].float() / temperature
    logits[:, trainer.suppress] = -float("inf")
    return torch.log_softmax(logits, -1).gather(-1, drawn[0, :, None]).squeeze(-1)


def test_the_second_turn_scores_and_decodes_like_the_trainer(trainer):
    """vLLM continues 2-turn conversations (2 images each) from their token ids: its prompt ids equal the
    trainer's (checked in generate), its sampled log-probs equal a plain forward of the conversation,
    its greedy turn equals the hf engine's."""
    convs = conversations(trainer)
    request = turn_request(trainer, convs)
    drawn = trainer.rollout_engine.generate(trainer.model, request)
    gaps = []
    for row, conv in enumerate(convs):
        n = int(drawn.mask[row].sum())
        reference = plain_logprobs(trainer, conv, drawn.ids[row, :n].tolist(), TEMPERATURE)
        gaps.append((drawn.sampler_logp[row, :n] - reference).abs().max().item())
    print(f"2-turn conversation: max |vLLM - plain forward| log-prob {max(gaps):.2e}")
    assert max(gaps) < 1e-4

    trainer.g.temperature = 0.0
    try:
        greedy = trainer.rollout_engine.generate(trainer.model, request)
    finally:
        trainer.g.temperature = TEMPERATURE
    ids, mask, _ = generate_grouped(trainer.policy, trainer.processor.tokenizer, request.group_inputs, 1,
                                    max_new_tokens=TOKENS, temperature=0.0, suppress_ids=trainer.suppress)
    assert torch.equal(greedy.ids, ids) and torch.equal(greedy.mask, mask)


def test_expanded_ids_would_be_expanded_again(trainer):
    """Why the engine folds images back: vLLM 0.32 expands the image token of a token prompt whatever
    follows it, so the processor's ids given as they are come back longer than the trainer's."""
    from vllm import SamplingParams

    conv = conversations(trainer)[0]
    ids = conv.input_ids().tolist()
    out = trainer.rollout_engine.llm.generate(
        [{"prompt_token_ids": ids, "multi_modal_data": {"image": list(conv.images)}}],
        SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    assert len(out[0].prompt_token_ids) > len(ids)


def test_the_trainers_tool_loop_draws_later_turns_with_vllm(trainer, monkeypatch):
    """The trainer's draw hands the engine each conversation's images: the first turn scripted (a rotate
    call per sample), the second drawn by vLLM from the 2-image conversations; the rollout carries vLLM's
    log-probs of turn 2 where the whole conversation's forward scores those tokens."""
    engine, real = trainer.rollout_engine, trainer.rollout_engine.generate
    tokenizer, eos, requests = trainer.processor.tokenizer, trainer.eos.tolist()[0], []

    def scripted_first(model, request):
        requests.append(request)
        if len(requests) > 1:
            return real(model, request)
        rows = len(request.records) * request.group_size
        ids = torch.tensor([tokenizer.encode(call_text(90), add_special_tokens=False) + [eos]] * rows)
        return Generation(ids, torch.ones_like(ids), [call_text(90)] * rows, sampler_logp=torch.zeros(ids.shape),
                          paths={"vllm": True})

    monkeypatch.setattr(engine, "generate", scripted_first)
    rollout = trainer.sample(trainer.records[:2], seed=3)
    assert [len(r.row_images) for r in requests] == [2, 4] and [len(i) for i in requests[1].row_images] == [2] * 4
    assert all(len(c.turns) == 2 and c.turns[0].call["name"] == "rotate" for c in rollout.conversations)

    tail = rollout.completion_ids.size(1)
    with torch.no_grad():
        logits = trainer.policy(**rollout.sequence_inputs).logits[:, -(tail + 1):-1].float() / TEMPERATURE
    logits[..., trainer.suppress] = -float("inf")
    reference = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    second = torch.zeros_like(rollout.completion_mask)
    for row, c in enumerate(rollout.conversations):
        start, end = c.conversation.turn_spans()[1]
        shift = tail - c.conversation.input_ids().numel()
        second[row, start + shift:end + shift] = 1
    assert second.sum() == sum(c.turns[1].tokens for c in rollout.conversations) > 0
    assert (second <= rollout.completion_mask).all()
    gap = (rollout.sampler_logp - reference)[second.bool()].abs().max().item()
    print(f"trainer's tool loop, turn 2: max |vLLM - whole-conversation forward| log-prob {gap:.2e}")
    assert gap < 1e-4


def test_a_grpo_run_with_tools_on_vllm_from_the_cli(tiny_model_dir, digits_jsonl, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "visual_rft.cli", "train", str(DEMO_CONFIG), f"model.name_or_path={tiny_model_dir}",
           f"data.train={digits_jsonl}", "data.eval=null", f"output.dir={out}", "grpo.max_steps=2",
           "grpo.num_generations=2", "grpo.per_device_batch_size=1", f"grpo.max_completion_length={TOKENS}",
           "grpo.rollout=vllm", "grpo.vllm.kv_cache_gib=0.5", f"grpo.temperature={TEMPERATURE}",
           "output.progress=false", "output.save_steps=0", *TOOLS]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert 1 <= row["tool/turns_mean"] <= 2 and 0 <= row["tool/call_rate"] <= 1
        assert "reward/total_mean" in row and any(k.startswith("reward/format") for k in row)
        # vLLM's log-probs travel with the conversations: the mismatch correction measures them (the
        # trainer's log-probs do not suppress vision tokens, so they differ a little, as in one-turn runs)
        assert 0 <= row["rollout/logp_diff_max"] < 0.1
