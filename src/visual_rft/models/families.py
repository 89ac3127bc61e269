"""Per-family support in one table: model_type -> processor, image batching, box space, fast paths.

Everything that differs between vision-language families is decided here, from the checkpoint's
config.model_type, so the loader, the rollout and the trainer stay free of per-family branches:
- the processor class, made image-only where the stock one has a video slot (transformers 5.x builds
  video processors with torchvision, which does not run beside the CPU torch used here);
- the default box space of the family's answers (`task.box_space: auto`);
- which GRPO shortcuts (prefill-once generation, packed group scoring) are exact for the model, and
  why not where they are not (`fast_paths`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from transformers import CONFIG_MAPPING, AutoProcessor, AutoTokenizer
from transformers.processing_utils import ProcessorMixin


@dataclass(frozen=True)
class Family:
    """What the code needs to know about one model family."""

    processor: str  # the stock processor class in `transformers`
    box_space: str  # default answer box space: qwen2vl (0-1000 relative) or pixels (of the model input)
    box_reason: str  # why that default
    mrope: bool  # Qwen-VL-style 3-D positions (get_rope_index): the fast paths can continue them
    # "module:Class" of an image processor to load explicitly, where AutoImageProcessor cannot find the PIL
    # one without torchvision (transformers 5.17 marks SmolVLMImageProcessorPil as needing torchvision)
    image_processor: str | None = None
    # The forward takes a {layer type: 4-D mask} dict (transformers' mask mapping), so a packed row can
    # carry its own sliding-window and bidirectional-image masks (rl/fast.packed_masks)
    mask_mapping: bool = False
    # Where pixel_values holds one entry per tile or crop and an image's count varies (with its size,
    # or pan-and-scan): (processor attribute with the placeholder token id, processor attribute with
    # how many of them each entry gets, None for one). Each prompt's entry count is counted from them
    # (models.loading.pixel_rows_per_prompt): rl.rollout.repeat_inputs cannot tell it from the tensors.
    tile_tokens: tuple[str, str | None] | None = None


_QWEN_RELATIVE = "Qwen2-VL / Qwen3-VL grounding data is 0-1000 relative"
_NO_CONVENTION = ("no grounding convention in its training data; relative 0-1000 survives the fixed-size "
                  "resize its processor applies")

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("Qwen2VLProcessor", "qwen2vl", _QWEN_RELATIVE, True),
    "qwen2_5_vl": Family("Qwen2_5_VLProcessor", "pixels",
                         "Qwen2.5-VL was trained on absolute pixels of its (resized) input", True),
    "qwen3_vl": Family("Qwen3VLProcessor", "qwen2vl", _QWEN_RELATIVE, True),
    "qwen3_vl_moe": Family("Qwen3VLProcessor", "qwen2vl", _QWEN_RELATIVE, True),
    "qwen3_5": Family("Qwen3VLProcessor", "qwen2vl", "Qwen3.5 keeps Qwen3-VL's 0-1000 relative boxes", True),
    "glm4v": Family("Glm4vProcessor", "qwen2vl", "GLM-4V answers boxes in 0-1000 relative coordinates", True),
    # InternVL: image_seq_length context tokens per tile; Gemma 3: one <start_of_image> per image or crop
    "internvl": Family("InternVLProcessor", "qwen2vl", "InternVL's grounding data is 0-1000 relative", False,
                       tile_tokens=("image_token_id", "image_seq_length")),
    "gemma3": Family("Gemma3Processor", "qwen2vl", "Gemma 3: " + _NO_CONVENTION, False, mask_mapping=True,
                     tile_tokens=("image_token_id", None)),
    "smolvlm": Family("SmolVLMProcessor", "qwen2vl", "SmolVLM: " + _NO_CONVENTION, False,
                      "transformers.models.smolvlm.image_processing_pil_smolvlm:SmolVLMImageProcessorPil"),
    "llava_onevision": Family("LlavaOnevisionProcessor", "qwen2vl", "LLaVA-OneVision: " + _NO_CONVENTION, False),
}


def family(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def default_box_space(model_type: str) -> str:
    """`task.box_space: auto` resolved for a model family (qwen2vl for families not in the table)."""
    entry = FAMILIES.get(model_type)
    return entry.box_space if entry is not None else "qwen2vl"


# ----------------------------------------------------------------------------------------- processors
_IMAGE_ONLY: dict[type, type] = {}


def image_only(stock: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`stock` without its video processor, keeping every other `__init__` parameter by name.

    transformers passes a saved processor setting (num_image_tokens, image_seq_length, image_seq_len)
    only when the class's own `__init__` names it in its code object, and derives the sub-processors
    from that signature; so the subclass gets a generated `__init__` with the stock parameters minus
    `video_processor`, which calls the stock one with `video_processor=None`. The source is built
    from a library class's own parameter names (checked to be identifiers), never from user input.
    """
    if stock in _IMAGE_ONLY:
        return _IMAGE_ONLY[stock]
    params = inspect.signature(stock.__init__).parameters
    if "video_processor" not in params:
        return stock
    defaults, sig, call = {}, [], []
    for name, p in params.items():
        if name in ("self", "video_processor"):
            continue
        if not name.isidentifier():
            raise TypeError(f"{stock.__name__}.__init__ has an unexpected parameter {name!r}")
        if p.kind is p.VAR_KEYWORD:
            sig.append(f"**{name}")
            call.append(f"**{name}")
            continue
        defaults[f"_default_{name}"] = None if p.default is p.empty else p.default
        sig.append(f"{name}=_default_{name}")
        call.append(f"{name}={name}")
    source = (f"def __init__(self, {', '.join(sig)}):\n"
              f"    _stock(self, video_processor=None, {', '.join(call)})\n")
    namespace = {"_stock": stock.__init__, **defaults}
    exec(compile(source, f"<image-only {stock.__name__}>", "exec"), namespace)  # noqa: S102 (see docstring)
    cls = type(f"ImageOnly{stock.__name__}", (stock,), {
        "__init__": namespace["__init__"], "__module__": __name__,
        "__doc__": f"{stock.__name__} without a video processor (images + text only); needs no torchvision.",
    })
    _IMAGE_ONLY[stock] = cls
    return cls


def processor_class_for(model_type: str) -> type[ProcessorMixin] | None:
    """The (image-only where needed) processor class for a config.model_type, or None if unknown."""
    entry = FAMILIES.get(model_type)
    if entry is None:
        return None
    return image_only(getattr(importlib.import_module("transformers"), entry.processor))


def load_family_processor(path: str, model_type: str) -> ProcessorMixin:
    """The family's processor from a checkpoint directory: its image-only class's from_pretrained, or,
    where the family names its image processor, the same three steps with that one loaded directly."""
    cls = processor_class_for(model_type)
    name = FAMILIES[model_type].image_processor
    if name is None:
        return cls.from_pretrained(path)
    module, attr = name.split(":")
    image_processor = getattr(importlib.import_module(module), attr).from_pretrained(path)
    processor_dict, kwargs = cls.get_processor_dict(path)
    return cls.from_args_and_dict([image_processor, AutoTokenizer.from_pretrained(path)], processor_dict, **kwargs)


def tile_placeholders(processor: Any) -> tuple[int, int] | None:
    """(placeholder token id, placeholders per pixel_values entry) for a processor of a family with a
    `tile_tokens` entry, found by the processor's (stock) class; None for every other processor."""
    classes = {cls.__name__ for cls in type(processor).__mro__}
    for entry in FAMILIES.values():
        if entry.tile_tokens is not None and entry.processor in classes:
            token, per_entry = entry.tile_tokens
            return int(getattr(processor, token)), int(getattr(processor, per_entry)) if per_entry else 1
    return None


def register_processors() -> None:
    """Let AutoProcessor resolve the ImageOnly* class names saved in processor_config.json (otherwise
    it silently returns only the tokenizer)."""
    for model_type in FAMILIES:
        try:
            config_cls = CONFIG_MAPPING[model_type]
        except KeyError:  # a family this transformers version does not have
            continue
        AutoProcessor.register(config_cls, processor_class_for(model_type), exist_ok=True)


# -------------------------------------------------------------------------------------- vision tokens
_VISION_WORDS = ("image", "video", "vision", "boi", "eoi")


def config_vision_token_ids(config: Any) -> set[int]:
    """Ids the config names for image / video placeholders and delimiters (image_token_id,
    image_token_index, boi_token_index, vision_start_token_id, ...)."""
    ids: set[int] = set()
    for key, value in config.to_dict().items():
        if (key.endswith(("token_id", "token_index")) and any(w in key for w in _VISION_WORDS)
                and isinstance(value, int) and value >= 0):
            ids.add(value)
    return ids


def processor_vision_tokens(processor: Any) -> set[str]:
    """The processor's (and its tokenizer's) named image / video tokens: image_token, boi_token,
    start_image_token, fake_image_token, global_image_token, ..."""
    names: set[str] = set()
    for owner in (processor, getattr(processor, "tokenizer", None)):
        for key, value in vars(owner).items() if owner is not None else ():
            if key.endswith("_token") and isinstance(value, str) and any(w in key for w in _VISION_WORDS):
                names.add(value)
        extra = getattr(owner, "extra_special_tokens", None) if owner is not None else None
        if isinstance(extra, dict):
            names.update(str(v) for k, v in extra.items() if any(w in k for w in _VISION_WORDS))
    return names


# --------------------------------------------------------------------------------------- fast paths
@dataclass(frozen=True)
class FastPaths:
    """Which GRPO shortcuts are exact for a model, and why not where they are not."""

    prefill_once: bool
    packed_scoring: bool
    prefill_reason: str = ""
    packing_reason: str = ""


def non_attention_layers(config: Any) -> list[str]:
    """Layer types other than softmax attention (e.g. Qwen3.5's linear_attention, Mamba layers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None) or []
    return sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})


def uses_mrope(config: Any) -> bool:
    """Whether the family numbers positions Qwen-VL-style in 3-D (M-RoPE), else 1-D."""
    entry = FAMILIES.get(config.model_type)
    return entry is not None and entry.mrope


def fast_paths(config: Any) -> FastPaths:
    """The family's decision, from the model's config alone (the unwrapped model's `.config`)."""
    entry = FAMILIES.get(config.model_type)
    prefill, pack, prefill_reason, pack_reason = True, True, "", ""
    if entry is None:
        prefill = pack = False
        prefill_reason = pack_reason = f"{config.model_type}: not a family visual-rft knows (models/families.py)"
    # 1-D RoPE families: both shortcuts continue generate's own positions (rl/fast.text_positions)
    recurrent = non_attention_layers(config)
    if recurrent:
        # Completions packed in one row would share (leak through) the recurrent state.
        pack = False
        pack_reason = (f"{config.model_type} has non-attention layers ({', '.join(recurrent)}): packed "
                       "completions would share their recurrent state")
    text = config.get_text_config()
    if "sliding_attention" in (getattr(text, "layer_types", None) or []) and not (entry and entry.mask_mapping):
        pack = False
        pack_reason = pack_reason or f"{config.model_type}: sliding-window layers ignore the packed 4-D mask"
    return FastPaths(prefill, pack, prefill_reason, pack_reason)
