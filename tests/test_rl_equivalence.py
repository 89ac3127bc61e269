"""The fast paths give what the straightforward ones give, on the tiny model and a fixed batch.

Straightforward = the whole [N, T, V] logits of a plain forward on the G-times repeated prompts,
log_softmax, gather; and transformers' own generate. Fast = one packed row per group with a chunked
LM head (rollout_logprobs), and prefill-once generation (generate_grouped).
"""

import pytest
import torch

import visual_rft.rl.lm_head as lm_head_module
from visual_rft.data.embedded import mnist_records
from visual_rft.models.loading import build_model_inputs, vision_token_ids
from visual_rft.rl.fast import can_pack, generate_grouped, inverse_cdf, packing_pays, rollout_logprobs
from visual_rft.rl.lm_head import head_logprobs
from visual_rft.rl.loss import Objective, policy_loss, ratio_one_grad_hint
from visual_rft.rl.rollout import Rollout, completion_logprobs, generate, repeat_inputs, scoring_inputs
from visual_rft.models.tiny import make_tiny_model

G = 3
PROMPTS = ["Which digit is this?", "Look closely at the picture and name the handwritten digit it shows.", "Digit?"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (conftest.one_thread)."""


def _make(arch):
    model, processor = make_tiny_model(seed=0, arch=arch)
    processor.tokenizer.padding_side = "left"
    images = [r.load_image() for r in mnist_records(limit=len(PROMPTS), size=56)]
    group = dict(build_model_inputs(processor, images, PROMPTS))  # different lengths: left padding
    return model, processor, group


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny(request):
    """Both architectures: their M-RoPE positions differ, and the fast paths compute positions."""
    return _make(request.param)


@pytest.fixture(scope="module")
def tiny_vl():
    return _make("qwen2_vl")


def _fixed_rollout(model, processor, group, length=7, temperature=1.0):
    """Random completions in which some rows end early with EOS, followed by padding."""
    gen = torch.Generator().manual_seed(1)
    vocab = len(processor.tokenizer)
    allowed = torch.tensor([i for i in range(vocab) if i not in set(vision_token_ids(processor))])
    ids = allowed[torch.randint(len(allowed), (len(PROMPTS) * G, length), generator=gen)]
    eos, pad = processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.tokenizer.pad_token_id
    ids[1, 3], ids[1, 4:] = eos, pad
    ids[5, 0], ids[5, 1:] = eos, pad
    mask = torch.ones_like(ids)
    mask[1, 4:], mask[5, 1:] = 0, 0
    return Rollout([None] * ids.size(0), [""] * ids.size(0), repeat_inputs(group, G), ids, mask, [""] * ids.size(0),
                   group_inputs=group, group_size=G, temperature=temperature)


def _naive_logprobs(model, rollout):
    """The reference computation: a plain forward, all logits, divided by the sampling temperature."""
    batch = scoring_inputs(rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
    logits = model(**batch, use_cache=False).logits[:, -rollout.completion_ids.size(1) - 1:-1]
    logits = logits.float() / rollout.temperature
    return torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


OBJECTIVE = Objective(loss_type="grpo", beta=0.04, eps_low=0.2, eps_high=0.2, max_completion_length=7)


def _grpo_loss(logp, rollout, ref_logp, advantages):
    return policy_loss(logp, logp.detach(), ref_logp, advantages, rollout.completion_mask, OBJECTIVE)[0]


def _loss_and_grads(model, logprobs_fn, rollout, ref_logp, advantages, scale=1.0):
    model.zero_grad(set_to_none=True)
    loss = _grpo_loss(logprobs_fn(model, rollout), rollout, ref_logp, advantages)
    (loss * scale).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_head_logprobs_value_and_gradients_match_log_softmax():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    targets = torch.randint(11, (2, 5), generator=gen)
    scale = torch.randn(2, 5, generator=gen)
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    want = torch.autograd.grad((expected * scale).sum(), (hidden, weight))
    for rows in (3, 64):  # several chunks, and one
        got = head_logprobs(hidden, weight, targets, chunk_rows=rows)
        assert torch.allclose(got, expected, atol=1e-6)
        for g, w in zip(torch.autograd.grad((got * scale).sum(), (hidden, weight)), want):
            assert torch.allclose(g, w, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_scoring_gives_the_same_loss_and_gradients(tiny, monkeypatch, temperature):
    model, processor, group = tiny
    scales = []  # what each backward made of the hint: a scale (gradients taken from the forward) or None
    hint_scale = lm_head_module._hint_scale
    monkeypatch.setattr(lm_head_module, "_hint_scale", lambda p, a: scales.append(hint_scale(p, a)) or scales[-1])
    model.train()
    rollout = _fixed_rollout(model, processor, group, temperature=temperature)
    assert can_pack(model, rollout)  # the packed path is the one under test
    advantages = torch.linspace(-1.0, 1.0, rollout.completion_ids.size(0))
    with torch.no_grad():
        naive = _naive_logprobs(model, rollout)
        ref_logp = naive - 0.05 * torch.arange(naive.size(1))  # a reference that differs from the policy
        fast = rollout_logprobs(model, rollout)
        plain = completion_logprobs(model, rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask,
                                    temperature=temperature)
        untempered = completion_logprobs(model, rollout.prompt_inputs, rollout.completion_ids, rollout.completion_mask)
    mask = rollout.completion_mask.bool()
    if temperature != 1.0:  # the temperature matters: scoring without it is another distribution
        assert (untempered[mask] - naive[mask]).abs().max() > 0.05
    assert torch.allclose(fast[mask], naive[mask], atol=1e-5)
    assert torch.allclose(plain[mask], naive[mask], atol=1e-5)
    loss_naive, grads_naive = _loss_and_grads(model, _naive_logprobs, rollout, ref_logp, advantages)
    hint = ratio_one_grad_hint(advantages, ref_logp, rollout.completion_mask, OBJECTIVE)
    wrong = ratio_one_grad_hint(advantages, None, rollout.completion_mask, Objective(loss_type="dapo", beta=0.04))
    for name, fn, scale, used in [
        ("packed", rollout_logprobs, 1.0, []),
        ("grpo.fast=off: plain forward, model logits", lambda m, r: rollout_logprobs(m, r, fast=False), 1.0, []),
        ("packed + gradients in the forward", lambda m, r: rollout_logprobs(m, r, grad_hint=hint), 0.5, [0.5]),
        ("packed + a wrong hint (recomputed)", lambda m, r: rollout_logprobs(m, r, grad_hint=wrong), 1.0, [None]),
    ]:
        scales.clear()
        loss_fast, grads_fast = _loss_and_grads(model, fn, rollout, ref_logp, advantages, scale)
        assert scales == pytest.approx(used) if used != [None] else scales == [None], name
        assert abs(loss_fast.item() - loss_naive.item()) < 1e-5, name
        assert grads_fast.keys() == grads_naive.keys() and len(grads_naive) > 20  # vision tower included
        for key, grad in grads_naive.items():
            assert torch.allclose(grads_fast[key] / scale, grad, atol=1e-5), (name, key)


def test_eager_attention_packs_with_an_additive_mask(tiny_vl):
    model, processor, group = tiny_vl
    rollout = _fixed_rollout(model, processor, group)
    model.set_attn_implementation("eager")
    try:
        assert can_pack(model, rollout)
        with torch.no_grad():
            fast, naive = rollout_logprobs(model, rollout), _naive_logprobs(model, rollout)
    finally:
        model.set_attn_implementation("sdpa")
    mask = rollout.completion_mask.bool()
    assert torch.allclose(fast[mask], naive[mask], atol=1e-5)


def _recorded_step_logits(model):
    """The logits generate_grouped draws from at each step [N, V], rebuilt through the LM head from the
    last hidden state of every forward of the base model under it (a forward hook), and the hook."""
    head = model.get_output_embeddings().weight
    steps: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        logits = (output.last_hidden_state[:, -1] @ head.T).float()
        # the first call is the prefill, one row per group, whose logits generate_grouped repeats G times
        steps.append(logits if steps else logits.repeat_interleave(G, dim=0))

    return steps, model.model.register_forward_hook(keep)


def _both(model, processor, group, sampler="multinomial", **settings):
    """generate on the repeated prompts and generate_grouped, each from the same RNG state; with the
    logits generate_grouped drew each token from (recorded by a forward hook)."""
    settings = dict(max_new_tokens=8, suppress_ids=vision_token_ids(processor), **settings)
    torch.manual_seed(123)
    plain = generate(model, processor.tokenizer, repeat_inputs(group, G), **settings)
    torch.manual_seed(123)
    steps, hook = _recorded_step_logits(model)
    try:
        fast = generate_grouped(model, processor.tokenizer, group, G, sampler=sampler, **settings)
    finally:
        hook.remove()
    return plain, fast, steps


def test_grouped_generation_equals_generate_greedy(tiny):
    model, processor, group = tiny
    model.eval()
    (ids, mask, texts), (ids2, mask2, texts2), _ = _both(model, processor, group, temperature=0.0)
    assert torch.equal(ids2, ids) and torch.equal(mask2, mask) and texts2 == texts


def test_grouped_generation_stops_at_eos_like_generate(tiny_vl):
    model, processor, group = tiny_vl
    model.eval()
    (ids, _, _), _, _ = _both(model, processor, group, temperature=1.0)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [int(ids[0, 3]), int(ids[4, 5])]  # some rows now stop early
    try:
        (ids, mask, texts), (ids2, mask2, texts2), _ = _both(model, processor, group, temperature=1.0)
    finally:
        model.generation_config.eos_token_id = saved
    assert mask.sum(1).min() < ids.size(1) and (ids == processor.tokenizer.pad_token_id).any()
    assert torch.equal(ids2, ids) and torch.equal(mask2, mask) and texts2 == texts


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_grouped_sampling_draws_from_the_same_distribution(tiny_vl, settings):
    model, processor, group = tiny_vl
    model.eval()
    (ids, mask, _), (ids2, mask2, _), steps = _both(model, processor, group, **settings)
    # same RNG state and same logits -> the very same draws
    assert torch.equal(ids2, ids) and torch.equal(mask2, mask)
    # and the logits at every step are those of a plain forward over the sampled sequence (up to each
    # row's EOS: after it generation feeds padding that scoring masks out)
    batch = scoring_inputs(repeat_inputs(group, G), ids, mask)
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits[:, -ids.size(1) - 1:-1]
    valid = mask.bool()
    assert torch.allclose(torch.stack(steps, dim=1)[valid], full[valid], atol=1e-5)


def test_default_sampler_draws_from_the_distribution_of_every_step(tiny_vl):
    model, processor, group = tiny_vl
    model.eval()
    _, (ids, mask, _), steps = _both(model, processor, group, sampler="inverse_cdf", temperature=1.0)
    batch = scoring_inputs(repeat_inputs(group, G), ids, mask)
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits[:, -ids.size(1) - 1:-1]
    valid = mask.bool()
    assert torch.allclose(torch.stack(steps, dim=1)[valid], full[valid], atol=1e-5)
    assert not torch.isin(ids, torch.tensor(vision_token_ids(processor))).any()


def test_inverse_cdf_picks_the_bucket_of_each_uniform():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(7, -1)
    uniform = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.9999, 1.0 - 1e-12, 1.0])  # 1.0: u * total rounded up
    assert inverse_cdf(probs, uniform).tolist() == [1, 1, 3, 3, 3, 3, 3]  # never a zero-probability token
    draws = inverse_cdf(torch.tensor([[0.1, 0.2, 0.7]]).expand(100_000, -1), torch.rand(100_000))
    assert torch.allclose(torch.bincount(draws, minlength=3) / 1e5, torch.tensor([0.1, 0.2, 0.7]), atol=0.01)


def test_packing_is_chosen_only_when_it_saves_compute(tiny_vl):
    model = tiny_vl[0]
    assert packing_pays(model, prompt_len=290, completion_len=64, group_size=4)
    assert not packing_pays(model, prompt_len=300, completion_len=1024, group_size=16)
    assert not packing_pays(model, prompt_len=290, completion_len=64, group_size=1)


def test_packing_beside_an_attention_without_4d_masks_runs_sdpa_for_the_packed_forward(tiny_vl, monkeypatch):
    """Issue 19, item 3: under flash-attention (model.attn_implementation: auto on a GPU) packing was
    refused. Here eager stands in for an attention that takes no 4-D mask: packing still happens,
    its forward runs SDPA (counted), and log-probs and gradients equal the plain eager forward."""
    import visual_rft.rl.fast as fast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, processor, group = tiny_vl
    rollout = _fixed_rollout(model, processor, group)
    monkeypatch.setattr(fast, "_PACKABLE_ATTENTION", ("sdpa",))
    sdpa, calls = ALL_ATTENTION_FUNCTIONS["sdpa"], []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model.set_attn_implementation("eager")
    try:
        assert can_pack(model, rollout)
        packed = rollout_logprobs(model, rollout)
        assert calls and model.config.get_text_config()._attn_implementation == "eager"  # switched back
        calls.clear()
        naive = _naive_logprobs(model, rollout)
        assert not calls  # the plain forward ran eager
        mask = rollout.completion_mask.bool()
        assert torch.allclose(packed[mask], naive[mask], atol=1e-5)
        grads = []
        for logp in (packed, naive):
            model.zero_grad()
            (logp * mask).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert torch.allclose(grads[0], grads[1], atol=1e-4)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert "gradient checkpointing" in fast.packing_blocker(model, rollout)
    finally:
        model.gradient_checkpointing_disable()
        model.set_attn_implementation("sdpa")
        model.zero_grad()
