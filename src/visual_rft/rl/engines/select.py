"""grpo.rollout -> the rollout engine: hf, vllm, or auto (vllm where it can serve the run, else hf)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from visual_rft.config import Config, ConfigError
from visual_rft.rl.engines.base import RolloutEngine
from visual_rft.rl.engines.hf import HFRolloutEngine


def make_rollout_engine(cfg: Config, training_engine: Any, policy: Any, processor: Any, suppress_ids: list[int], *,
                        fast: bool, shortcut: Callable[[str, str | None], bool], max_images: int = 1) -> RolloutEngine:
    """The engine `cfg.grpo.rollout` names. vllm that cannot serve this run stops here, naming why;
    auto falls back to hf and says why once."""
    choice = cfg.grpo.rollout
    if choice in ("vllm", "auto"):
        from visual_rft.rl.engines.vllm_support import vllm_blocker  # imports nothing of vLLM's until asked

        blocker = vllm_blocker(cfg, policy, training_engine.accelerator)
        if blocker is None:
            from visual_rft.rl.engines.vllm import VLLMRolloutEngine

            return VLLMRolloutEngine(cfg, training_engine, policy, processor, suppress_ids, max_images)
        if choice == "vllm":
            raise ConfigError(f"grpo.rollout=vllm: {blocker}")
        if training_engine.accelerator.is_main_process:
            print(f"visual-rft: grpo.rollout=auto uses hf: {blocker}", file=sys.stderr)
    return HFRolloutEngine(cfg.grpo, training_engine, processor.tokenizer, suppress_ids, fast=fast, shortcut=shortcut)
