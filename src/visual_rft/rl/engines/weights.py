"""The policy's weights as (name, tensor) pairs for a rollout engine's copy: whole, or LoRA merged.

Names are the policy's own parameter names (vLLM's loaders map transformers' names to their modules).
A LoRA policy yields its base weights with the adapters' deltas added out of place: the training
weights are never merged and unmerged, which would leave rounding in them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

_PEFT_PREFIX = "base_model.model."


def _lora_layers(model: Any) -> dict[str, Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no LoRA layers
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _merged(layer: Any, base: torch.Tensor) -> torch.Tensor:
    merged = base.detach().clone()
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "lora_A", {}):
            merged += layer.get_delta_weight(adapter).to(merged.dtype)
    return merged


def policy_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of `model` (unwrapped; whole, i.e. inside a ZeRO-3 / FSDP gather) under the
    plain model's names; LoRA layers' weights merged with their adapters, the adapters themselves left out."""
    layers = _lora_layers(model)
    for name, param in model.named_parameters():
        if ".lora_" in name or "lora_embedding" in name:
            continue
        plain = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        plain = plain.replace(".base_layer.", ".")
        owner = name.rsplit(".", 2)[0] if ".base_layer." in name else None
        if owner is not None and owner in layers and name.endswith(".weight"):
            yield plain, _merged(layers[owner], param)
        else:
            yield plain, param.detach()
