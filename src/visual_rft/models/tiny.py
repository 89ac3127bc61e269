"""The embedded tiny Qwen2-VL / Qwen2.5-VL: built offline, from a seed, in about a second.

No pretrained vision-language model is reachable here (no hub, none ships in a package), so tests and
the CPU demo use a randomly initialised model with the real architecture, the real special tokens and
the real chat template, and a byte-level BPE tokenizer trained locally. It is saved as an ordinary
checkpoint directory, so it is loaded by exactly the code that loads Qwen/Qwen2-VL-2B-Instruct
(loading.py). The other families' tiny specs are in tiny_families.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visual_rft.models.families import processor_class_for
from visual_rft.models.quiet import save_model_dir
from visual_rft.models.tiny_families import TINY_FAMILIES

ARCHS = ("qwen2_vl", "qwen2_5_vl", *TINY_FAMILIES)

# Same order as the real Qwen2-VL vocabulary (151643..151656), so relative ids match the real model.
QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Ordinary (non-special) whole tokens: the pre-tokenizer regex would split "<think>" into "<think" + ">",
# so BPE could never learn it; as added tokens each tag costs one token and survives skip_special_tokens.
FORMAT_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template shipped with Qwen/Qwen2-VL-2B-Instruct (chat_template.json), verbatim.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# What the demo and the task prompts say, so that prompts and answers tokenize into few tokens.
# The chat scaffolding is in every prompt: weighted so its words become single tokens.
CHAT_WORDS = ("system\n", "user\n", "assistant\n", "You are a helpful assistant.")
BUILTIN_CORPUS = (
    "What digit is shown in the image?", "What number is written in this image?",
    "Which handwritten digit is this? Answer with a single digit from 0 to 9.",
    "I see one handwritten digit.", "The image shows a handwritten digit.",
    "zero one two three four five six seven eight nine",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 64 75 100 128 200 256 500 1000",
    "This is an image containing an object. Please identify the category of the object based on the image.",
    "This is an image containing a plant. Please identify the species of the plant based on the image.",
    "This is an image containing a pet. Please identify the breed of the pet based on the image.",
    "This is an image containing an aircraft. Please identify the model of the aircraft based on the image.",
    "This is an image containing a car. Please identify the model of the car based on the image.",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    "The output format should be as follows:\n<think> ... </think> <answer>category name</answer>",
    "Please strictly follow the format.",
    "Detect all objects belonging to the category in the image, and provide the bounding boxes.",
    "Output the bounding box in the image with the label and the confidence.",
    'Answer as JSON: [{"label": "dog", "bbox_2d": [10, 20, 30, 40], "confidence": 0.9}]',
    "Locate the region the instruction refers to and output its bounding box coordinates.",
    "<think>I see one handwritten digit.</think><answer>7</answer>",
    "<think>The object is a flower with yellow petals.</think><answer>sunflower</answer>",
    "<think>There are two objects: a cat and a dog.</think><answer>cat</answer>",
    "a an the of in on at is are this that it with and or for to from by as be there here",
    "image picture photo object category class label species breed model box boxes region",
    "think step reason answer final format thinking process first then output tags",
    "cat dog bird car person plane flower tree boat bus train horse sheep cow",
    "small large left right top bottom center red green blue yellow black white",
)


def train_tokenizer(vocab_size: int, corpus: list[str] | None = None, *,
                    specials: tuple[str, ...] = QWEN2VL_SPECIAL_TOKENS, eos: str = "<|im_end|>",
                    pad: str = "<|endoftext|>", named: dict[str, str] | None = None,
                    tokenizer_cls: type = Qwen2Tokenizer, **tokenizer_kwargs: Any) -> Qwen2Tokenizer:
    """A byte-level BPE with the Qwen2 pre-tokenizer; its total length (specials included) <= vocab_size.

    `specials` (another family's special tokens, in its real order) go right after the learned
    vocabulary; `named` gives tokenizer attributes such as image_token / boi_token (other families'
    processors read them). tokenizers' BPE trainer breaks count ties by the pair itself, so the same
    corpus gives the same merges in every process (checked by the determinism test through the saved files).
    """
    n_fixed = len(specials) + len(FORMAT_TOKENS)
    if vocab_size < 256 + n_fixed:
        raise ValueError(f"vocab_size must be >= {256 + n_fixed} (256 bytes + special tokens), got {vocab_size}")
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_fixed,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(CHAT_WORDS) * 4 + list(BUILTIN_CORPUS) + list(corpus or []), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    # Specials go right after the learned vocabulary, in the real model's order.
    for token in specials + FORMAT_TOKENS:
        vocab[token] = len(vocab)
    extra = [t for t in specials if t not in (eos, pad)]
    tokenizer = tokenizer_cls(
        vocab=vocab,
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token=eos,
        pad_token=pad,
        model_max_length=32768,
        extra_special_tokens=extra,
        **(named or {}),  # `*_token` keywords become attributes: tokenizer.image_token, .image_token_id
        **tokenizer_kwargs,
    )
    tokenizer.add_tokens(list(FORMAT_TOKENS))
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) in Qwen's 1:1.5:1.5 ratio."""
    half = head_dim // 2
    spatial = (half * 3) // 8
    return [half - 2 * spatial, spatial, spatial]


def _tiny_config(arch: str, tokenizer, *, vocab: int, text_hidden: int, layers: int, vision_depth: int,
                 vision_width: int):
    heads = max(1, text_hidden // 32)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    text = dict(
        vocab_size=vocab, hidden_size=text_hidden, intermediate_size=3 * text_hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096, bos_token_id=None,
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                         "mrope_section": _mrope_section(text_hidden // heads)},
    )
    vision_heads = max(1, vision_width // 16)
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    if arch == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=text_hidden,
                      num_heads=vision_heads, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids), Qwen2VLForConditionalGeneration
    if arch == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                      num_heads=vision_heads, out_hidden_size=text_hidden, window_size=112,
                      fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2)
        return (Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids),
                Qwen2_5_VLForConditionalGeneration)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")


def make_tiny_model(
    *,
    seed: int = 0,
    vocab_size: int = 512,
    text_hidden: int = 128,
    layers: int = 2,
    vision_depth: int = 2,
    vision_width: int = 64,
    image_size: int = 56,
    corpus: list[str] | None = None,
    arch: str = "qwen2_vl",
):
    """The in-memory tiny model (fp32, eval mode) and its processor; see build_tiny_model."""
    if arch in TINY_FAMILIES:
        return _make_family_model(arch, seed=seed, vocab_size=vocab_size, text_hidden=text_hidden, layers=layers,
                                  vision_depth=vision_depth, vision_width=vision_width, corpus=corpus)
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (patch 14 x merge 2), got {image_size}")
    tokenizer = train_tokenizer(vocab_size, corpus)
    # The model's vocabulary is exactly the tokenizer's: a random policy can then never sample an id
    # that decodes to nothing (the real Qwen pads its embedding to 151,936 but never samples the padding).
    config, model_cls = _tiny_config(arch, tokenizer, vocab=len(tokenizer), text_hidden=text_hidden,
                                     layers=layers, vision_depth=vision_depth, vision_width=vision_width)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size, max_pixels=image_size * image_size,
        patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    processor = processor_class_for(config.model_type)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE
    )
    return model, processor


def _make_family_model(arch: str, *, seed: int, vocab_size: int, corpus: list[str] | None, **dims: int):
    """A tiny model of one of TINY_FAMILIES: its special tokens, tokenizer attributes, chat template,
    image processor and config class; each image becomes 4 image tokens (LLaVA-OneVision: its tiles')."""
    spec = TINY_FAMILIES[arch]
    tokenizer = train_tokenizer(vocab_size, corpus, specials=spec.specials, eos=spec.eos, pad=spec.pad,
                                named=dict(spec.named), **({"bos_token": spec.bos} if spec.bos else {}))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.specials}
    d = dict(dims, vocab=len(tokenizer), eos=spec.eos, pad=spec.pad, bos=spec.bos)
    config, model_cls, image_processor, processor_kwargs = spec.build(ids, d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    eos = [ids[spec.eos], *[ids[t] for t in spec.generation_eos]]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids[spec.pad],
                                               bos_token_id=ids[spec.bos] if spec.bos else None)
    processor = processor_class_for(config.model_type)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=spec.chat_template, **processor_kwargs)
    return model, processor


def build_tiny_model(out_dir: str | Path, **options: Any) -> Path:
    """Write a random-init tiny Qwen2-VL (or Qwen2.5-VL) checkpoint + processor into out_dir.

    Takes make_tiny_model's keyword options (seed, vocab_size, ..., corpus, arch). Same options ->
    byte-identical files. Every image is resized to about image_size**2 pixels, so a 56x56 image is
    4x4 patches of 14 px = 4 merged image tokens. The tokenizer's length (specials included) is at
    most vocab_size, and the model's vocabulary equals the tokenizer's length.
    """
    model, processor = make_tiny_model(**options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model_dir(model, processor, out)
    return out
