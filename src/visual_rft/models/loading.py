"""Loading the policy, the reference model and the processor; dtype policy; LoRA; prompt rendering.

One loader serves every checkpoint: the embedded tiny model (tiny.py) and Qwen/Qwen2-VL-2B-Instruct
go through the same `load_model_and_processor`, so whatever the tests check on the tiny model holds for
the real one. Per-family decisions come from families.py; nothing here imports the rest of visual_rft.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from visual_rft.models.families import (config_vision_token_ids, load_family_processor, processor_class_for,
                                        processor_vision_tokens, tile_placeholders)
from visual_rft.models.quiet import library_bars_off, peft_wrapping

# Placeholder / delimiter tokens that only the processor may place: a sampled <|image_pad|> makes the
# next forward fail with "Image features and image tokens do not match", so generation suppresses them
# (together with whatever the model config and the processor name as vision tokens: vision_token_ids).
VISION_TOKENS = (
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<image>", "<video>", "<|image|>", "<|video|>",
)


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are ~170x slower than fp32 here)."""
    key = str(name).lower()
    if key == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid values: auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, is it local); raise for a path that cannot be a checkpoint."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model path {str(path)!r} is a file; expected a checkpoint directory")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model directory {str(path)!r} has no config.json (expected a save_pretrained checkpoint)"
            )
        return str(path), True
    if name_or_path.startswith((".", "~", os.sep)) or ".." in name_or_path or not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    owner = Path(name_or_path.split("/", 1)[0])
    if "/" in name_or_path and owner.is_dir():  # `runs/tiny-model` beside a runs/ folder: a path, not a hub id
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist (there is a local {owner}/ folder, so "
                                "this is read as a path, not a hub id)")
    _check_hub(name_or_path)
    return name_or_path, False


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout_s: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError:
        return False
    return True


def _check_hub(repo_id: str) -> None:
    """A hub id without network: huggingface_hub retries its request five times (~30 s of 'Retrying'
    lines) before failing, even for a model in the local cache. Probe once instead: unreachable and
    cached, load from the cache (offline mode); unreachable and not cached, stop with one line."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or _hub_reachable():  # offline: the user's choice, the cache is read
        return
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        constants.HF_HUB_OFFLINE = True  # read by huggingface_hub at every request
        return
    raise FileNotFoundError(f"model {repo_id!r}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached and "
                            "the model is not in the local cache; download it where there is network and pass its "
                            "local directory")


def load_model_config(name_or_path: str):
    """The checkpoint's transformers config (config.json), with a clear message where it cannot be had."""
    source, is_local = _resolve_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        if is_local:
            raise
        # FileNotFoundError (an OSError): the command line reports it as a usage error, not a traceback
        raise FileNotFoundError(
            f"could not load {name_or_path!r} from the Hugging Face Hub ({err}). Without network access, "
            "download the checkpoint elsewhere and pass its local directory."
        ) from err


def load_processor(name_or_path: str, config=None) -> ProcessorMixin:
    """The image-text processor, left padding, with a pad token (generation needs both)."""
    config = config if config is not None else load_model_config(name_or_path)
    # Checkpoints name the stock processor class, whose video slot needs torchvision: load the known
    # families with their image-only subclass on every machine (one code path; videos are never used).
    source = _resolve_source(name_or_path)[0]
    if processor_class_for(config.model_type) is not None:
        processor = load_family_processor(source, config.model_type)
    else:
        processor = AutoProcessor.from_pretrained(source)
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"{name_or_path!r} gave a {type(processor).__name__}, not an image-text processor: the "
            "checkpoint needs an image processor config (preprocessor_config.json or processor_config.json)"
        )
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return processor


def find_vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision encoder, found by the attribute names transformers' VLMs use."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner in (base, getattr(base, "model", None)):
        for name in ("visual", "vision_tower", "vision_model", "vision_encoder"):
            tower = getattr(owner, name, None) if owner is not None else None
            if isinstance(tower, torch.nn.Module):
                return tower
    return None


_LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}


def _apply_lora(model: torch.nn.Module, lora: dict[str, Any]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model  # seconds to import: only runs that ask for LoRA pay for it

    unknown = set(lora) - _LORA_KEYS
    if unknown:
        raise ValueError(f"unknown lora keys {sorted(unknown)}; valid: {sorted(_LORA_KEYS)}")
    wanted = set(lora.get("target_modules") or ("q_proj", "k_proj", "v_proj", "o_proj"))
    tower = find_vision_tower(model)
    in_tower = {id(m) for m in tower.modules()} if tower is not None else set()
    # Full module names, so a target like "proj" can never reach into the vision tower.
    targets = [name for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in wanted and id(module) not in in_tower]
    if not targets:
        raise ValueError(f"lora target_modules {sorted(wanted)} match no language-model module")
    config = LoraConfig(
        r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)), target_modules=targets, bias="none",
    )
    with peft_wrapping():
        return get_peft_model(model, config)


def resolve_attention(requested: str | None, device, dtype: torch.dtype) -> str | None:
    """`auto`: flash-attention 2 where it can run (CUDA, half precision, flash_attn installed), else
    SDPA (which picks its own fused kernel on GPUs). Anything else passes through to transformers."""
    if requested != "auto":
        return requested
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _load_model(name_or_path: str, dtype: str, device, attn_implementation: str | None):
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, device)}
    attn_implementation = resolve_attention(attn_implementation, device, kwargs["dtype"])
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    source, is_local = _resolve_source(name_or_path)
    # transformers draws a "Loading weights" bar for every load, in every command; a hub download
    # keeps its bars (they also switch off huggingface_hub's), where minutes may pass
    with library_bars_off() if is_local else contextlib.nullcontext():
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    return model.to(device)


def load_model_and_processor(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
    freeze_vision: bool = False,
    lora: dict | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[torch.nn.Module, ProcessorMixin]:
    """The trainable policy (train mode) and its processor, from a local directory or a hub id."""
    config = load_model_config(str(name_or_path))
    processor = load_processor(str(name_or_path), config)
    model = _load_model(str(name_or_path), dtype, device, attn_implementation)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    if freeze_vision:
        tower = find_vision_tower(model)
        if tower is None:
            raise ValueError(f"freeze_vision: no vision tower found in {type(model).__name__}")
        tower.requires_grad_(False)
    if gradient_checkpointing:
        # transformers 5.24 renamed the API (the old name warns); earlier 5.x only has the old one.
        # Non-reentrant checkpointing needs no input-requires-grad hook, so it also works under LoRA.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = _apply_lora(model, lora)
    model.train()
    return model, processor


def load_reference_model(
    name_or_path: str, *, dtype: str = "auto", device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """A frozen copy for the KL term: eval mode (no dropout), no parameter requires grad."""
    model = _load_model(str(name_or_path), dtype, device, attn_implementation=None)
    model.requires_grad_(False)
    return model.eval()


def vision_token_ids(processor, config=None) -> list[int]:
    """Ids of the vision placeholder / delimiter tokens, to pass as `suppress_tokens` to generate: the
    known names, the processor's and tokenizer's named image tokens (Gemma 3's <image_soft_token>,
    InternVL's <img>) and, with the model `config`, its image_token_id / image_token_index & co."""
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab()
    names = set(VISION_TOKENS) | processor_vision_tokens(processor)
    ids = {vocab[name] for name in names if name in vocab}
    if config is not None:
        ids |= {i for i in config_vision_token_ids(config) if i < len(tokenizer)}
    return sorted(ids)


def prompt_messages(prompt: str, *, system: str | None = None, images: int = 1) -> list[dict]:
    """The chat messages of a prompt: the optional system turn, then one user turn with `images` image
    slots followed by the text."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_messages(processor, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Chat `messages` as text, through the processor's chat template.

    Rendered by the tokenizer with the processor's template: the same text as the processor's own
    apply_chat_template, which in some families (SmolVLM) reads the video processor we leave out.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False,
        chat_template=getattr(processor, "chat_template", None),
    )


def chat_text(
    processor, prompt: str, answer: str | None = None, *, system: str | None = None, images: int = 1
) -> str:
    """One user turn (`images` image slots, then the text) + the assistant header; with `answer`, the
    answer and its end.

    The answer is appended to the generation prompt rather than rendered by the template, so the
    prompt part is byte-identical to what generation sees (SFT masks exactly those tokens).
    """
    text = render_messages(processor, prompt_messages(prompt, system=system, images=images))
    if answer is None:
        return text
    tokenizer = getattr(processor, "tokenizer", processor)
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return text + answer + end


def build_model_inputs(
    processor, images: list, prompts: list[str], *, system: str | None = None
) -> BatchFeature:
    """Left-padded model inputs for one prompt per row, each with its image or its list of images in
    prompt order (rows may differ in image count): input_ids, attention_mask, pixel_values, and the
    family's extras: image_grid_thw / mm_token_type_ids for the Qwen-VL families, image_sizes,
    pixel_attention_mask, token_type_ids ..."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; need one image (or list) per prompt")
    nested = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
    texts = [chat_text(processor, prompt, system=system, images=len(row)) for prompt, row in zip(prompts, nested)]
    # Nested per prompt: Gemma 3 and SmolVLM need it, every other family accepts it.
    return processor(images=nested, text=texts, padding=True, padding_side="left", return_tensors="pt")


def pixel_rows_per_prompt(processor, inputs) -> list[int] | None:
    """How many `pixel_values` entries each prompt row of `inputs` (build_model_inputs' output) holds,
    for the families whose entries are tiles or crops in varying numbers per image (families.py
    tile_tokens: InternVL, whose processor tiles by image size whatever the saved crop_to_patches
    says, and Gemma 3 under pan-and-scan), counted from each row's placeholder tokens. None for the
    other families and for a batch without images: rl.rollout.repeat_inputs reads their layout
    (per patch with a grid, per image, per row) from the tensors."""
    placeholders = tile_placeholders(processor)
    pixels = inputs.get("pixel_values")
    if placeholders is None or pixels is None:
        return None
    image_id, per_entry = placeholders
    tokens = (inputs["input_ids"] == image_id).sum(1).tolist()
    rows = [count // per_entry for count in tokens]
    if any(count % per_entry for count in tokens) or sum(rows) != pixels.size(0):
        raise ValueError(f"image placeholder counts {tokens} per prompt are not {per_entry} per pixel_values entry "
                         f"for {pixels.size(0)} entries: families.py tile_tokens does not describe this batch")
    return rows
