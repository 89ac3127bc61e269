"""Tiny random-init models of the other supported families (tiny.py builds Qwen2-VL / Qwen2.5-VL).

Each is built from transformers' own config classes with the family's real special tokens (names and
order), its chat-template layout and its image processor, at a size that runs a GRPO step on a CPU
in well under a second. The tokenizer is the same locally trained byte-level BPE for every family
(its vocabulary is not the family's; its special tokens and tokenizer attributes are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import transformers

_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# ChatML with the family's image placeholder; Qwen3-VL / Qwen3.5 drop Qwen2-VL's default system turn.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}IMAGE{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GEMMA3 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_GLM4V = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyFamily:
    specials: tuple[str, ...]  # in the family's vocabulary order
    eos: str
    pad: str
    chat_template: str
    build: Callable[..., tuple[Any, type, Any, dict]]  # (ids, dims) -> config, model class, image processor, kwargs
    named: tuple[tuple[str, str], ...] = ()  # tokenizer attributes the family's processor reads
    generation_eos: tuple[str, ...] = ()  # extra end-of-turn tokens for generation_config
    bos: str | None = None


def _text(d: dict, ids: dict, **extra) -> dict:
    heads = max(1, d["text_hidden"] // 32)
    base = dict(vocab_size=d["vocab"], hidden_size=d["text_hidden"], intermediate_size=3 * d["text_hidden"],
                num_hidden_layers=d["layers"], num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096, eos_token_id=ids[d["eos"]], pad_token_id=ids[d["pad"]],
                bos_token_id=ids.get(d["bos"]) if d["bos"] else None, tie_word_embeddings=True)
    return {**base, **extra}


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    spatial = (half * 3) // 8
    return [half - 2 * spatial, spatial, spatial]


def _qwen_ids(ids: dict) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                tie_word_embeddings=True)


def _qwen_vision(d: dict, **extra) -> dict:
    w = d["vision_width"]
    return dict(depth=d["vision_depth"], hidden_size=w, intermediate_size=2 * w, num_heads=max(1, w // 16),
                out_hidden_size=d["text_hidden"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                num_position_embeddings=64, **extra)


def _qwen_image_processor(d: dict, patch: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = 2 * patch * 2  # 4 patches a side = 4 merged image tokens
    return Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=patch, merge_size=2,
                                    temporal_patch_size=2)


def _qwen3_vl(ids, d):
    rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": _mrope(32), "mrope_interleaved": True}
    config = transformers.Qwen3VLConfig(text_config=_text(d, ids, head_dim=32, rope_parameters=rope),
                                        vision_config=_qwen_vision(d, deepstack_visual_indexes=[0]), **_qwen_ids(ids))
    return config, transformers.Qwen3VLForConditionalGeneration, _qwen_image_processor(d, 16), {}


def _qwen3_5(ids, d):
    rope = {"rope_type": "default", "rope_theta": 10_000_000.0, "mrope_section": _mrope(32),
            "mrope_interleaved": True, "partial_rotary_factor": 1.0}
    kinds = ["linear_attention", "full_attention"] * max(1, d["layers"] // 2)
    text = _text(d, ids, head_dim=32, rope_parameters=rope, layer_types=kinds[:max(2, d["layers"])],
                 num_hidden_layers=max(2, d["layers"]), linear_key_head_dim=16, linear_value_head_dim=16,
                 linear_num_key_heads=2, linear_num_value_heads=2, linear_conv_kernel_dim=4)
    config = transformers.Qwen3_5Config(text_config=text, vision_config=_qwen_vision(d), **_qwen_ids(ids))
    return config, transformers.Qwen3_5ForConditionalGeneration, _qwen_image_processor(d, 16), {}


def _siglip(d: dict, image: int, patch: int = 14) -> dict:
    w = d["vision_width"]
    return dict(model_type="siglip_vision_model", hidden_size=w, intermediate_size=2 * w,
                num_hidden_layers=d["vision_depth"], num_attention_heads=max(1, w // 16), image_size=image,
                patch_size=patch)


def _internvl(ids, d):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    w = d["vision_width"]
    vision = dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=d["vision_depth"],
                  num_attention_heads=max(1, w // 16), image_size=[56, 56], patch_size=[14, 14])
    config = transformers.InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **_text(d, ids)),
                                         image_token_id=ids["<IMG_CONTEXT>"], downsample_ratio=0.5)
    processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False)
    return config, transformers.InternVLForConditionalGeneration, processor, {"image_seq_length": 4}


def _gemma3(ids, d):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    text = _text(d, ids, head_dim=32, query_pre_attn_scalar=32, sliding_window=64)
    config = transformers.Gemma3Config(text_config=text, vision_config=_siglip(d, 56), mm_tokens_per_image=4,
                                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                                       image_token_index=ids["<image_soft_token>"], tie_word_embeddings=True)
    processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    return config, transformers.Gemma3ForConditionalGeneration, processor, {"image_seq_length": 4}


def _smolvlm(ids, d):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    vision = {k: v for k, v in _siglip(d, 56).items() if k != "model_type"}
    config = transformers.SmolVLMConfig(vision_config=vision, text_config=dict(model_type="llama", **_text(d, ids)),
                                        scale_factor=2, image_token_id=ids["<image>"], pad_token_id=ids[d["pad"]],
                                        tie_word_embeddings=True)
    processor = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": 56},
                                         max_image_size={"longest_edge": 56})
    return config, transformers.SmolVLMForConditionalGeneration, processor, {"image_seq_len": 4}


def _llava_onevision(ids, d):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    config = transformers.LlavaOnevisionConfig(
        vision_config=_siglip(d, 28), text_config=dict(model_type="qwen2", **_text(d, ids)),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
        tie_word_embeddings=True)
    processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                                image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])
    return (config, transformers.LlavaOnevisionForConditionalGeneration, processor,
            {"num_image_tokens": 4, "vision_feature_select_strategy": "full"})


def _glm4v(ids, d):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    w = d["vision_width"]
    rope = {"rope_type": "default", "rope_theta": 10_000.0, "mrope_section": _mrope(16),
            "partial_rotary_factor": 0.5}
    vision = dict(depth=d["vision_depth"], hidden_size=w, intermediate_size=2 * w, num_heads=max(1, w // 16),
                  out_hidden_size=d["text_hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  image_size=56)
    config = transformers.Glm4vConfig(
        text_config=_text(d, ids, rope_parameters=rope), vision_config=vision, image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=True)
    processor = Glm4vImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}, patch_size=14,
                                       merge_size=2, temporal_patch_size=2)
    return config, transformers.Glm4vForConditionalGeneration, processor, {}


TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen3_vl": TinyFamily(_QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>",
                           _CHATML.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"), _qwen3_vl),
    "qwen3_5": TinyFamily(_QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>",
                          _CHATML.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"), _qwen3_5),
    "internvl": TinyFamily(_QWEN_SPECIALS[:3] + ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), "<|im_end|>",
                           "<|endoftext|>", _CHATML.replace("IMAGE", "<IMG_CONTEXT>\n"), _internvl,
                           named=(("start_image_token", "<img>"), ("end_image_token", "</img>"),
                                  ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>"))),
    "gemma3": TinyFamily(("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                          "<end_of_image>", "<image_soft_token>"), "<eos>", "<pad>", _GEMMA3, _gemma3,
                         named=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                                ("image_token", "<image_soft_token>")),
                         generation_eos=("<end_of_turn>",), bos="<bos>"),
    "smolvlm": TinyFamily(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                           "<global-img>", "<end_of_utterance>"), "<end_of_utterance>", "<|im_end|>", _SMOLVLM,
                          _smolvlm, named=(("fake_image_token", "<fake_token_around_image>"),
                                           ("image_token", "<image>"), ("global_image_token", "<global-img>"),
                                           ("end_of_utterance_token", "<end_of_utterance>"))),
    "llava_onevision": TinyFamily(_QWEN_SPECIALS[:3] + ("<image>", "<video>"), "<|im_end|>", "<|endoftext|>",
                                  _CHATML.replace("IMAGE", "<image>\n"), _llava_onevision,
                                  named=(("image_token", "<image>"), ("video_token", "<video>"))),
    "glm4v": TinyFamily(("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                         "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                         "<|end_of_video|>", "<|image|>", "<|video|>"), "<|endoftext|>", "<|endoftext|>", _GLM4V,
                        _glm4v, generation_eos=("<|user|>", "<|observation|>")),
}
