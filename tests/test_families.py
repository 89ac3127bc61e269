"""Every supported family, on its tiny random-init model (tiny-model --arch): load through the project's
loader, keep the processor's saved settings, never sample vision tokens, score completions exactly like
a plain forward (log-probs and gradients), generate grouped exactly like transformers' generate, and
train + evaluate from the CLI."""

import json
from pathlib import Path

import pytest
import torch

from visual_rft.cli import main
from visual_rft.data.embedded import mnist_records
from visual_rft.models.families import FAMILIES, default_box_space, fast_paths
from visual_rft.models.loading import (build_model_inputs, load_model_and_processor, pixel_rows_per_prompt,
                                      vision_token_ids)
from visual_rft.models.tiny import build_tiny_model
from visual_rft.rl.fast import can_pack, generate_grouped, group_logprobs, prefill_once_blocker, rollout_logprobs
from visual_rft.rl.rollout import Rollout, eos_token_ids, generate, repeat_inputs, scoring_inputs

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "internvl", "gemma3", "smolvlm", "llava_onevision", "glm4v"]
PROMPTS = ["Which digit is this?", "Look closely at the picture and name the handwritten digit it shows."]
G = 3
# Settings the stock processors default to 256 / 169 / None: the tiny models save 4 (issue 15).
SAVED_SETTINGS = {"internvl": "image_seq_length", "gemma3": "image_seq_length", "smolvlm": "image_seq_len",
                  "llava_onevision": "num_image_tokens"}
DEMO_CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (conftest.one_thread)."""


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory):
    """(arch, checkpoint dir, model in eval mode, processor, two left-padded prompts with their images)."""
    path = build_tiny_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param)
    model, processor = load_model_and_processor(str(path))
    images = [r.load_image() for r in mnist_records(limit=len(PROMPTS), size=56)]
    group = dict(build_model_inputs(processor, images, PROMPTS))
    return request.param, path, model.eval(), processor, group


def test_loader_keeps_the_family_and_its_saved_processor_settings(family):
    arch, path, model, processor, group = family
    assert model.config.model_type == arch
    assert "video_processor" not in type(processor).get_attributes()  # no torchvision needed
    if arch in SAVED_SETTINGS:
        assert getattr(processor, SAVED_SETTINGS[arch]) == 4
    ids = group["input_ids"]
    assert (group["attention_mask"][0] == 0).any()  # the two prompts differ in length: left padding
    image_id = model.config.to_dict().get("image_token_id", model.config.to_dict().get("image_token_index"))
    assert (ids == image_id).sum(1).tolist() == [(ids[1] == image_id).sum().item()] * 2  # same image tokens per row


def test_vision_tokens_are_never_generated(family):
    arch, _, model, processor, group = family
    suppress = vision_token_ids(processor, model.config)
    config = model.config.to_dict()
    assert config.get("image_token_id", config.get("image_token_index")) in suppress
    if arch == "gemma3":
        assert processor.tokenizer.convert_tokens_to_ids("<image_soft_token>") in suppress
    # Make the vision tokens the most likely ones: without suppression greedy decoding emits them.
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    with torch.no_grad():
        head[suppress] *= 40
    try:
        plain, _, _ = generate(model, processor.tokenizer, group, max_new_tokens=4, temperature=0)
        kept, _, _ = generate_grouped(model, processor.tokenizer, group, 2, max_new_tokens=4, temperature=1.0,
                                      suppress_ids=suppress)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert torch.isin(plain, torch.tensor(suppress)).any()
    assert not torch.isin(kept, torch.tensor(suppress)).any()


def _fixed_completions(model, processor, rows, length=6):
    gen = torch.Generator().manual_seed(1)
    banned = set(vision_token_ids(processor, model.config))
    allowed = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in banned])
    ids = allowed[torch.randint(len(allowed), (rows, length), generator=gen)]
    eos, pad = eos_token_ids(model, processor.tokenizer)[0], processor.tokenizer.pad_token_id
    ids[1, 2], ids[1, 3:] = eos, pad  # an early EOS, then padding
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    return ids, mask


def _fixed_rollout(model, processor, group, repeated):
    """G fixed completions per prompt of `group` (one with an early EOS), over its repeated inputs."""
    rows = group["input_ids"].size(0) * G
    ids, mask = _fixed_completions(model, processor, rows)
    return Rollout([None] * rows, [""] * rows, repeated, ids, mask, [""] * rows, group_inputs=group, group_size=G)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _assert_scores_like_a_plain_forward(model, rollout, reference):
    """The trainer's log-probs of rollout's completions, and their gradients under a fixed weighting,
    equal a plain forward's log-softmax on `reference` (the same prompts, repeated); returns them."""
    ids, mask = rollout.completion_ids, rollout.completion_mask
    weights = torch.linspace(-1, 1, ids.numel()).view_as(ids)
    model.zero_grad()
    fast = rollout_logprobs(model, rollout)
    (fast * weights * mask).sum().backward()
    fast_grads = _grads(model)
    model.zero_grad()
    logits = model(**scoring_inputs(reference, ids, mask)).logits[:, -ids.size(1) - 1:-1]
    plain = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    (plain * weights * mask).sum().backward()
    assert ((fast - plain).abs() * mask).max() < 1e-5
    assert (fast_grads - _grads(model)).abs().max() < 1e-5 * max(1.0, fast_grads.abs().max().item())
    model.zero_grad()
    return plain


def test_trainer_logprobs_and_gradients_equal_a_plain_forward(family):
    arch, _, model, processor, group = family
    rollout = _fixed_rollout(model, processor, group, repeat_inputs(group, G))
    _assert_scores_like_a_plain_forward(model, rollout, repeat_inputs(group, G))


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_grouped_generation_equals_generate(family, temperature):
    """Each prompt prefilled once and its cache repeated for the group: the very tokens of
    transformers' generate on the repeated prompts, greedy and sampled from one RNG state — for the
    1-D-position families too (InternVL, Gemma 3, SmolVLM, LLaVA-OneVision: issue 19, item 1)."""
    arch, _, model, processor, group = family
    suppress = vision_token_ids(processor, model.config)
    tok = processor.tokenizer
    assert prefill_once_blocker(model, group, G) is None  # the shortcut itself runs, not the fallback
    torch.manual_seed(7)
    fast, fast_mask, _ = generate_grouped(model, tok, group, G, max_new_tokens=6, temperature=temperature,
                                          suppress_ids=suppress, sampler="multinomial")
    torch.manual_seed(7)
    plain, plain_mask, _ = generate(model, tok, repeat_inputs(group, G), max_new_tokens=6, temperature=temperature,
                                    suppress_ids=suppress)
    assert torch.equal(fast * fast_mask, plain[:, :fast.size(1)] * plain_mask[:, :fast.size(1)])
    assert fast_paths(model.config).prefill_once


def test_packing_is_refused_where_it_would_be_wrong(family):
    arch, _, model, processor, group = family
    rollout = _fixed_rollout(model, processor, group, repeat_inputs(group, G))
    ids, mask = rollout.completion_ids, rollout.completion_mask
    paths = fast_paths(model.config)
    if arch == "qwen3_5":
        assert not paths.packed_scoring and "linear_attention" in paths.packing_reason
        with torch.no_grad():  # why: packed completions share the recurrent state
            packed = group_logprobs(model, group, G, ids, mask)
            plain = rollout_logprobs(model, rollout)
        assert ((packed - plain).abs() * mask).max() > 1e-4
    if not paths.packed_scoring:
        assert not can_pack(model, rollout)
    if arch in ("internvl", "smolvlm", "llava_onevision", "gemma3"):
        # 1-D positions restart per completion after the shared prompt (issue 19, item 2): packing
        # runs, and test_trainer_logprobs_and_gradients_equal_a_plain_forward checks it (Gemma 3 with
        # its own per-layer-type masks: test_gemma3_packed_scoring_with_a_window_shorter_than_the_prompt)
        assert can_pack(model, rollout)


# ---- several images per prompt (issue 21, item 2): a batch mixing a 1-image and a 2-image prompt
MIXED_PROMPTS = ["Which digit is this?", "Compare the two digits and name the larger one."]
IMAGES_PER_ROW = [1, 2]


def _mixed(processor):
    """The mixed prompts once per group, and the same G-repeated batch built by the processor itself
    (the independent reference for repeat_inputs)."""
    digits = [r.load_image() for r in mnist_records(limit=3, size=56)]
    images = [[digits[0]], [digits[1], digits[2]]]
    group = dict(build_model_inputs(processor, images, MIXED_PROMPTS))
    reference = dict(build_model_inputs(processor, [i for i in images for _ in range(G)],
                                        [p for p in MIXED_PROMPTS for _ in range(G)]))
    return group, reference


def test_mixed_image_counts_score_like_a_plain_forward(family):
    """The trainer's log-probs and gradients (packed where the family packs) on a batch mixing 1- and
    2-image prompts equal a plain forward of the processor's own repeated batch."""
    arch, _, model, processor, _ = family
    group, reference = _mixed(processor)
    image_id = model.config.to_dict().get("image_token_id", model.config.to_dict().get("image_token_index"))
    tokens = (group["input_ids"] == image_id).sum(1).tolist()
    # The second prompt carries both images' tokens; LLaVA-OneVision gives a prompt of several images
    # each image's base view only (its anyres tiles are for single-image prompts), so fewer there.
    assert tokens[0] > 0 and (tokens[1] == 2 * tokens[0] if arch != "llava_onevision" else tokens[1] > 0)
    repeated = repeat_inputs(group, G, IMAGES_PER_ROW)
    assert repeated.keys() == reference.keys()
    for key, value in reference.items():
        assert not torch.is_tensor(value) or torch.equal(repeated[key], value), key
    rollout = _fixed_rollout(model, processor, group, repeated)
    assert can_pack(model, rollout) == fast_paths(model.config).packed_scoring  # the shortcut runs where it does
    _assert_scores_like_a_plain_forward(model, rollout, reference)


def test_pixel_rows_are_counted_for_the_one_row_per_tile_families_only(family):
    """InternVL (one pixel row per tile) and Gemma 3 (per crop) count each prompt's rows from its
    placeholders; the other layouts are read from the tensors. Either way the repeat is the reference."""
    arch, _, _, processor, _ = family
    group, reference = _mixed(processor)
    rows = pixel_rows_per_prompt(processor, group)
    assert rows == ([1, 2] if arch in ("internvl", "gemma3") else None)  # 56-px digits: one tile each
    repeated = repeat_inputs(group, G, IMAGES_PER_ROW, rows)
    for key, value in reference.items():
        assert not torch.is_tensor(value) or torch.equal(repeated[key], value), key


def test_mixed_image_counts_generate_like_generate(family):
    """Prefill-once and the plain fallback (the prompts repeated by repeat_inputs) both give
    transformers' greedy tokens on the processor's repeated batch."""
    arch, _, model, processor, _ = family
    group, reference = _mixed(processor)
    suppress, tok = vision_token_ids(processor, model.config), processor.tokenizer
    assert prefill_once_blocker(model, group, G) is None
    plain, plain_mask, _ = generate(model, tok, reference, max_new_tokens=6, temperature=0, suppress_ids=suppress)
    for prefill in (True, False):
        fast, fast_mask, _ = generate_grouped(model, tok, group, G, max_new_tokens=6, temperature=0,
                                              suppress_ids=suppress, prefill_once=prefill,
                                              images_per_row=IMAGES_PER_ROW)
        assert torch.equal(fast * fast_mask, plain[:, :fast.size(1)] * plain_mask[:, :fast.size(1)]), prefill


def test_default_box_space_per_family():
    assert default_box_space("qwen2_vl") == default_box_space("qwen3_vl") == "qwen2vl"
    assert default_box_space("qwen2_5_vl") == "pixels"
    assert default_box_space("some_new_family") == "qwen2vl"


def test_two_grpo_steps_and_evaluation_from_the_cli(family, pairs_jsonl, tmp_path, capsys):
    """On records mixing one and two images per question (pair, one, pair, one)."""
    arch, path, *_ = family
    common = [f"model.name_or_path={path}", f"data.train={pairs_jsonl}", f"data.eval={pairs_jsonl}",
              "data.limit=4", "output.progress=false", "eval.max_new_tokens=6", "eval.batch_size=4"]
    assert main(["train", str(DEMO_CONFIG), *common, f"output.dir={tmp_path / 'run'}", "grpo.num_generations=2",
                 "grpo.per_device_batch_size=2", "grpo.max_completion_length=6", "grpo.max_steps=2",
                 "grpo.optim.learning_rate=1e-2", "task.rewards=[toy_rewards:text_length]"]) == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["grad_norm"] > 0 for s in steps)
    trained = sorted((tmp_path / "run").glob("checkpoint-*"))[-1] / "model"
    assert main(["eval", str(DEMO_CONFIG), *common, "--model", str(trained), "--out", str(tmp_path / "eval")]) == 0
    rows = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(rows) == 4 and 0 <= metrics["accuracy"] <= 1


@pytest.mark.parametrize("model_type, setting, record_space, expected", [
    ("qwen2_5_vl", "auto", None, "pixels"),
    ("qwen3_vl", "auto", None, "qwen2vl"),
    ("qwen2_5_vl", "normalized", None, "normalized"),
    ("qwen2_5_vl", "auto", "qwen2vl", "qwen2vl"),  # the data's own box_space wins
])
def test_task_box_space_sets_the_default_of_the_data(tmp_path, model_type, setting, record_space, expected):
    from transformers import AutoConfig

    from visual_rft.config import load_config
    from visual_rft.runtime import load_split

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    mnist_records(limit=1, size=56)[0].load_image().save(tmp_path / "digit.png")
    row = {"image": "digit.png", "solution": "[]", **({"box_space": record_space} if record_space else {})}
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    cfg = load_config(None, ["task.name=detection", f"task.box_space={setting}", f"model.name_or_path={tmp_path}",
                             f"data.train={tmp_path / 'data.jsonl'}", "data.check=false"])
    assert [r.fields["box_space"] for r in load_split(cfg, "train")] == [expected]


def test_task_box_space_is_validated(tmp_path):
    from visual_rft.config import ConfigError, load_config
    from visual_rft.runtime import load_split

    with pytest.raises(ConfigError, match="task.box_space"):
        load_config(None, ["task.box_space=pixel"])
    cfg = load_config(None, ["task.name=detection", f"model.name_or_path={tmp_path / 'missing'}",
                             "data.train=embedded:trees?tile=112"])
    with pytest.raises(ConfigError, match="task.box_space: auto takes the model family"):
        load_split(cfg, "train")


def test_untested_transformers_versions_are_refused(monkeypatch):
    from visual_rft.versions import OVERRIDE_ENV, check_transformers, is_tested

    assert is_tested("5.17.0") and is_tested("5.24.0") and is_tested("5.24.3")
    assert not is_tested("5.16.1") and not is_tested("5.25.0") and not is_tested("6.0.0")
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"transformers 5.16.1 is not tested .*5.17 to 5.24"):
        check_transformers("5.16.1")
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    with pytest.warns(UserWarning, match="not tested"):
        check_transformers("6.0.0")


def test_declared_range_and_ci_match_the_tested_versions():
    from visual_rft.versions import HIGHEST_TESTED, LOWEST_TESTED

    root = Path(__file__).parent.parent
    pyproject = (root / "pyproject.toml").read_text()
    high = HIGHEST_TESTED.split(".")
    assert f'"transformers>={LOWEST_TESTED},<{high[0]}.{int(high[1]) + 1}"' in pyproject
    assert f"transformers=={HIGHEST_TESTED}." in (root / "constraints.txt").read_text()
    assert f"TRANSFORMERS_LOWEST ?= {LOWEST_TESTED}." in (root / "Makefile").read_text()


def _set_sliding_window(model, window):
    model.config.get_text_config().sliding_window = window
    for layer in model.model.language_model.layers:
        if getattr(layer.self_attn, "is_sliding", False):
            layer.self_attn.sliding_window = window


def test_gemma3_prefill_once_with_a_window_shorter_than_the_prompt():
    """Gemma 3's sliding-window layers (the tiny model's window, 64, is longer than its prompts): with
    a window of 8 the tokens change, and prefill-once still gives generate's, greedy and sampled."""
    from visual_rft.models.tiny import make_tiny_model

    model, processor = make_tiny_model(seed=0, arch="gemma3")
    processor.tokenizer.padding_side = "left"
    images = [r.load_image() for r in mnist_records(limit=len(PROMPTS), size=56)]
    group = dict(build_model_inputs(processor, images, PROMPTS))
    suppress, tok = vision_token_ids(processor, model.config), processor.tokenizer
    wide, _, _ = generate(model, tok, repeat_inputs(group, G), max_new_tokens=12, temperature=0, suppress_ids=suppress)
    _set_sliding_window(model, 8)
    assert group["input_ids"].size(1) > 8
    for temperature in (0, 1.0):
        torch.manual_seed(7)
        fast, fast_mask, _ = generate_grouped(model, tok, group, G, max_new_tokens=12, temperature=temperature,
                                              suppress_ids=suppress, sampler="multinomial")
        torch.manual_seed(7)
        plain, plain_mask, _ = generate(model, tok, repeat_inputs(group, G), max_new_tokens=12,
                                        temperature=temperature, suppress_ids=suppress)
        assert torch.equal(fast * fast_mask, plain[:, :fast.size(1)] * plain_mask[:, :fast.size(1)])
        if temperature == 0:
            assert not torch.equal(plain, wide)  # the window is in effect


@pytest.mark.parametrize("window, needed", [(None, "blocks"), (8, "window")])
def test_gemma3_packed_scoring_carries_its_window_and_image_blocks(window, needed):
    """Packed scoring for Gemma 3 carries a mask per layer type: its sliding window measured as in the
    plain row, and each image's tokens attending both ways. With the tiny model's window (64, longer
    than the row) and with a window of 8 (shorter than the prompt), log-probs and gradients equal a
    plain forward; and the masks without the image blocks (wide window) or without the window (window
    8: there the images are out of the completions' reach) would not."""
    from visual_rft.models.tiny import make_tiny_model
    from visual_rft.rl import fast

    model, processor = make_tiny_model(seed=0, arch="gemma3")
    processor.tokenizer.padding_side = "left"
    # The tiny vision tower gives all tokens of an image the same feature, which makes attention
    # inside an image nearly moot: spread them (the same model for both paths) so the blocks count.
    model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, out: out + torch.linspace(-2, 2, out.size(1))[None, :, None])
    group, reference = _mixed(processor)
    if window is not None:
        _set_sliding_window(model, window)
        assert group["input_ids"].size(1) > window
    rollout = _fixed_rollout(model, processor, group, repeat_inputs(group, G, IMAGES_PER_ROW))
    mask = rollout.completion_mask
    assert can_pack(model, rollout)
    plain = _assert_scores_like_a_plain_forward(model, rollout, reference)
    assert set(fast.packed_masks(model, group, G, mask.reshape(len(MIXED_PROMPTS), -1))) == {
        "full_attention", "sliding_attention"}
    stock = fast._group_mask
    fast._group_mask = lambda *a, **k: stock(*a, **{**k, needed: None})
    try:
        with torch.no_grad():
            wrong = rollout_logprobs(model, rollout)
    finally:
        fast._group_mask = stock
    assert ((wrong - plain).abs() * mask).max() > 1e-4
