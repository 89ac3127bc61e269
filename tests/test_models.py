"""models/: the tiny checkpoint (tiny.py), the loader every checkpoint goes through (loading.py), the processor,
and the package's one-way imports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import visual_rft.models as models_package
from visual_rft.cli import main as cli_main
from visual_rft.models import loading
from visual_rft.models.families import processor_class_for
from visual_rft.models.loading import (
    build_model_inputs,
    chat_text,
    find_vision_tower,
    load_model_and_processor,
    load_reference_model,
    resolve_attention,
    resolve_dtype,
    vision_token_ids,
)
from visual_rft.models.tiny import FORMAT_TOKENS, QWEN2VL_SPECIAL_TOKENS, build_tiny_model, make_tiny_model

from import_layers import visual_rft_imports

IMAGE_ONLY_QWEN2_VL = processor_class_for("qwen2_vl")  # what the loader gives for the tiny checkpoint
PROMPTS = ["What digit is shown in the image?", "Which handwritten digit is this? Answer with a single digit."]
VISION_NAMES = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _images(n: int, size: int = 56) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model_and_processor(str(tiny_dir))


def test_build_is_byte_deterministic_per_seed(tmp_path, tiny_dir):
    same = build_tiny_model(tmp_path / "same", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    # The tokenizer is trained, not seeded: identical for every seed, and deterministic.
    assert (same / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_tiny_model_vocabulary_and_config(tiny_dir, loaded):
    model, processor = loaded
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    assert len(tok) == 512 == model.config.text_config.vocab_size
    specials = [vocab[t] for t in QWEN2VL_SPECIAL_TOKENS]
    assert specials == list(range(specials[0], specials[0] + 14))  # contiguous, in the real model's order
    assert set(QWEN2VL_SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    # The format tags are single ordinary tokens: they survive skip_special_tokens.
    answer = "<think>I see one handwritten digit.</think><answer>7</answer>"
    ids = tok(answer + "<|im_end|>").input_ids
    assert [tok.convert_ids_to_tokens(i) for i in ids if i in [vocab[t] for t in FORMAT_TOKENS]] == list(FORMAT_TOKENS)
    assert len(ids) == 12  # the demo's answer is short: 4 tags + 6 words/punct + the digit + <|im_end|>
    assert tok.decode(ids, skip_special_tokens=True) == answer
    assert model.config.text_config.eos_token_id == vocab["<|im_end|>"]
    assert model.config.text_config.pad_token_id == vocab["<|endoftext|>"] == tok.pad_token_id
    assert model.config.image_token_id == vocab["<|image_pad|>"]
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 1_000_000


def test_autoprocessor_resolves_the_image_only_class_where_transformers_allows(tiny_dir):
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    if not PROCESSOR_MAPPING._extra_content:  # transformers 5.17 ignores registrations for its own configs
        pytest.skip("this transformers version skips AutoProcessor.register for native configs")
    assert isinstance(AutoProcessor.from_pretrained(tiny_dir), IMAGE_ONLY_QWEN2_VL)


def test_loader_gives_image_processor_and_left_padded_inputs(tiny_dir):
    processor = loading.load_processor(str(tiny_dir))  # the project's path, on every declared version
    assert isinstance(processor, IMAGE_ONLY_QWEN2_VL)
    processor.tokenizer.padding_side = "right"  # build_model_inputs must pad left regardless
    batch = build_model_inputs(processor, _images(2), ["hi", PROMPTS[1]])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_pad).sum(dim=1).tolist() == [4, 4]  # 56x56 -> 4x4 patches -> 4 merged tokens
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert tuple(batch["pixel_values"].shape) == (32, 3 * 2 * 14 * 14)
    assert mask[0, 0] == 0 and mask[1].all() and mask[:, -1].all()  # the short row is padded on the left
    assert (ids[0][mask[0] == 0] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(batch["mm_token_type_ids"].bool(), ids == image_pad)
    # Both rows end with the same generation prompt, so new tokens continue right after it.
    tail = processor.tokenizer("<|im_start|>assistant\n").input_ids
    assert ids[:, -len(tail):].tolist() == [tail, tail]


def test_loaded_logits_equal_in_memory_model(loaded):
    mem_model, mem_processor = make_tiny_model(seed=0)
    model, processor = loaded
    inputs = build_model_inputs(processor, _images(2), PROMPTS)
    mem_inputs = build_model_inputs(mem_processor, _images(2), PROMPTS)
    assert torch.equal(inputs["input_ids"], mem_inputs["input_ids"])
    assert torch.equal(inputs["pixel_values"], mem_inputs["pixel_values"])
    with torch.no_grad():
        a = model.eval()(**inputs).logits
        b = mem_model(**mem_inputs).logits
    model.train()
    assert a.shape == (2, inputs["input_ids"].shape[1], 512)
    assert torch.equal(a, b)


def test_forward_requires_mm_token_type_ids(loaded):
    # Documents the transformers 5.x requirement the trainer relies on (STACK.md).
    model, processor = loaded
    inputs = dict(build_model_inputs(processor, _images(1), PROMPTS[:1]))
    inputs.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**inputs)


def test_suppressed_generation_never_emits_vision_tokens(loaded):
    model, processor = loaded
    suppress = vision_token_ids(processor)
    vocab = processor.tokenizer.get_vocab()
    assert suppress == sorted(vocab[t] for t in VISION_NAMES)
    inputs = build_model_inputs(processor, _images(8), PROMPTS * 4)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.eval().generate(
            **inputs, do_sample=True, temperature=1.5, top_k=0, max_new_tokens=32, min_new_tokens=32,
            suppress_tokens=suppress,
        )
    model.train()
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new.shape == (8, 32)
    assert not torch.isin(new, torch.tensor(suppress)).any()
    assert len(set(new.flatten().tolist())) > 50  # really sampled at high temperature, not a stuck loop


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    for names, dtype in ((("float32", "fp32"), torch.float32), (("bfloat16", "BF16"), torch.bfloat16),
                         (("float16", "fp16"), torch.float16)):
        assert all(resolve_dtype(n, "cpu") is dtype for n in names)
    with pytest.raises(ValueError, match="float32.*bfloat16.*float16"):
        resolve_dtype("float64", "cpu")


def test_bad_paths_give_clear_errors(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model_and_processor(missing)
    with pytest.raises(FileNotFoundError, match=r"\./nope/model"):
        load_model_and_processor("./nope/model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_and_processor(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_reference_model(missing, dtype="auto", device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="weights.bin"):
        load_model_and_processor(str(tmp_path / "weights.bin"))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    # A hub id is passed through to transformers; offline, the error names the id and the way out.
    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match=r"Qwen/Qwen2-VL-2B-Instruct.*local directory"):
        load_model_and_processor("Qwen/Qwen2-VL-2B-Instruct")
    # ... and the command line says so in one line with exit 2 (it printed a traceback)
    image = tmp_path / "digit.png"
    Image.new("RGB", (28, 28)).save(image)
    assert cli_main(["predict", "Qwen/Qwen2-VL-2B-Instruct", str(image)]) == 2
    assert "Qwen/Qwen2-VL-2B-Instruct" in capsys.readouterr().err


def test_freeze_vision(tiny_dir):
    model, _ = load_model_and_processor(str(tiny_dir), freeze_vision=True)
    tower = find_vision_tower(model)
    assert tower is model.model.visual
    tower_ids = {id(p) for p in tower.parameters()}
    assert tower_ids and not any(p.requires_grad for p in tower.parameters())
    text = [p for p in model.parameters() if id(p) not in tower_ids]
    assert text and all(p.requires_grad for p in text)
    assert model.training


def test_lora_trains_only_adapters_outside_the_vision_tower(tiny_dir):
    model, _ = load_model_and_processor(str(tiny_dir), lora={"r": 4, "alpha": 8, "dropout": 0.0})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B x (q, k, v, o) x 2 layers
    assert all(".language_model." in n for n in trainable)
    tower = find_vision_tower(model)
    assert not any("lora" in n for n, _ in tower.named_modules())
    assert not any(p.requires_grad for p in tower.parameters())
    with pytest.raises(ValueError, match="rank"):
        load_model_and_processor(str(tiny_dir), lora={"rank": 4})


def test_reference_model_is_frozen_copy(tiny_dir, loaded):
    ref = load_reference_model(str(tiny_dir), dtype="auto", device="cpu")
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    model, processor = loaded
    inputs = build_model_inputs(processor, _images(1), PROMPTS[:1])
    with torch.no_grad():
        assert torch.equal(ref(**inputs).logits, model.eval()(**inputs).logits)
    model.train()


def test_chat_text_prompt_is_token_prefix_of_sft_text(loaded):
    _, processor = loaded
    prompt = chat_text(processor, PROMPTS[0], system="Answer briefly.")
    full = chat_text(processor, PROMPTS[0], "<think>ok</think><answer>3</answer>", system="Answer briefly.")
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
                             "<|vision_start|><|image_pad|><|vision_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert full == prompt + "<think>ok</think><answer>3</answer><|im_end|>"
    tok = processor.tokenizer
    p_ids, f_ids = tok(prompt).input_ids, tok(full).input_ids
    assert f_ids[: len(p_ids)] == p_ids  # SFT can mask the prompt by its token count


def test_real_checkpoint_layout_loads_through_the_same_path(tmp_path):
    # Qwen/Qwen2.5-VL-*-Instruct ship preprocessor_config.json naming the stock processor (whose video
    # slot needs torchvision) and chat_template.json; recreate that layout from a tiny Qwen2.5-VL.
    d = build_tiny_model(tmp_path / "q25", arch="qwen2_5_vl")
    saved = json.loads((d / "processor_config.json").read_text())
    os.remove(d / "processor_config.json")
    image = saved["image_processor"]
    size = image.pop("size")
    image.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"],
                 processor_class="Qwen2_5_VLProcessor")
    (d / "preprocessor_config.json").write_text(json.dumps(image))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": (d / "chat_template.jinja").read_text()}))
    os.remove(d / "chat_template.jinja")

    model, processor = load_model_and_processor(str(d))
    assert isinstance(processor, processor_class_for("qwen2_5_vl"))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    inputs = build_model_inputs(processor, _images(2), PROMPTS)
    assert (inputs["input_ids"] == processor.image_token_id).sum().item() == 8
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == len(processor.tokenizer)


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_gradient_checkpointing_still_backpropagates(tiny_dir, lora):
    model, processor = load_model_and_processor(str(tiny_dir), gradient_checkpointing=True, lora=lora)
    base = model.get_base_model() if lora else model
    assert base.model.language_model.gradient_checkpointing
    inputs = build_model_inputs(processor, _images(1), PROMPTS[:1])
    model(**inputs).logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_mismatched_images_and_prompts(loaded):
    with pytest.raises(ValueError, match=r"one image \(or list\) per prompt"):
        build_model_inputs(loaded[1], _images(1), PROMPTS)


def test_auto_attention_picks_flash_only_where_it_can_run(monkeypatch):
    import importlib.util

    assert resolve_attention("eager", "cuda", torch.bfloat16) == "eager"  # an explicit choice passes through
    assert resolve_attention(None, "cpu", torch.float32) is None
    real_find = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if installed else None) if name == "flash_attn" else real_find(name, *a))
        assert resolve_attention("auto", "cpu", torch.bfloat16) == "sdpa"
        assert resolve_attention("auto", "cuda", torch.float32) == "sdpa"  # flash-attention is half precision only
        assert resolve_attention("auto", "cuda", torch.bfloat16) == ("flash_attention_2" if installed else "sdpa")


# ----------------------------------------------------------------------------------------- import layering
MODELS_DIR = Path(models_package.__file__).parent
PACKAGE = "visual_rft.models"
# bottom (0) to top; a module imports only from lower layers, which also rules out cycles. A new
# module must be given a layer here (the test fails for one it does not know).
LAYERS = {"families": 0, "tiny_families": 0, "quiet": 0, "tiny": 1, "loading": 1, "__init__": 1}
BELOW_MODELS = {"visual_rft.versions"}  # the only visual_rft module outside models/ it may import


def _layer(name: str) -> int | None:
    """The layer of a models/ module given by its dotted name; None outside models/."""
    if name == PACKAGE:
        return LAYERS["__init__"]
    return LAYERS[name.split(".")[2]] if name.startswith(PACKAGE + ".") else None


def test_every_models_module_has_a_layer():
    assert sorted(p.stem for p in MODELS_DIR.glob("*.py")) == sorted(LAYERS)


def _violations(module: str, path: Path) -> list[str]:
    """What breaks the layering in `path` (models/ module `module`): an import from its own or a higher
    layer, from visual_rft outside models/ (but BELOW_MODELS), or from visual_rft inside a function."""
    wrong = []
    for name, nested in visual_rft_imports(path, PACKAGE):
        target = _layer(name)
        if (target is None and name not in BELOW_MODELS) or (target is not None and target >= LAYERS[module]):
            wrong.append(f"{module} (layer {LAYERS[module]}) imports {name}")
        if nested:
            wrong.append(f"{module} imports {name} inside a function")
    return wrong


def test_models_imports_point_down_and_nowhere_else():
    """families and tiny_families at the bottom, tiny and loading above them, nothing of rl/ or the
    commands, no lazy imports (families used to import rl.rollout lazily; tiny_model and models each other)."""
    assert [v for module in LAYERS for v in _violations(module, MODELS_DIR / f"{module}.py")] == []


def test_the_layering_check_fails_on_the_old_knot(tmp_path):
    families = tmp_path / "families.py"
    families.write_text("def fast_paths(model):\n    from visual_rft.rl.rollout import unwrap_model\n")
    tiny = tmp_path / "tiny.py"
    tiny.write_text("from . import families\nfrom visual_rft.models import loading\n\n"
                    "def make_tiny_model():\n    from visual_rft.models.families import processor_class_for\n")
    assert _violations("families", families) == ["families (layer 0) imports visual_rft.rl.rollout",
                                                 "families imports visual_rft.rl.rollout inside a function"]
    assert _violations("tiny", tiny) == ["tiny (layer 1) imports visual_rft.models.loading",
                                         "tiny imports visual_rft.models.families inside a function"]
