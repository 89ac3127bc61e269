"""The transformers rollout engine: this project's own decode loop on the policy itself (rl/fast.py).

Each prompt is prefilled once and its KV cache serves all G samples; the policy samples, so its
weights are always current (nothing to sync) and the trainer's log-probs are the sampler's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from visual_rft.config import GRPOConfig
from visual_rft.rl.engines.base import Generation, RolloutRequest
from visual_rft.rl.fast import default_sampler, generate_grouped, prefill_once_blocker


class HFRolloutEngine:
    name = "hf"
    syncs_weights = False  # the policy samples itself

    def __init__(self, g: GRPOConfig, training_engine: Any, tokenizer: Any, suppress_ids: list[int], *,
                 fast: bool, shortcut: Callable[[str, str | None], bool]) -> None:
        """`shortcut(name, blocker)`: the trainer's check that says once why a shortcut is off."""
        self.g, self.training_engine, self.tokenizer, self.suppress = g, training_engine, tokenizer, suppress_ids
        self.fast, self.shortcut = fast, shortcut
        self._held: Any = None  # the policy with whole weights while hold() is open

    def sync(self, model: Any) -> bool:
        return False

    @contextlib.contextmanager
    def hold(self, model: Any) -> Iterator[None]:
        """Gather the weights once for the whole block (ZeRO-3 / FSDP-1: a collective every process must
        enter equally often); generate inside it samples from the held policy, gathering nothing."""
        with self.training_engine.generation_weights(model) as policy:
            self._held = policy
            try:
                yield
            finally:
                self._held = None

    def after_rollout(self) -> None:
        """Nothing held between rollouts."""

    def generate(self, model: Any, request: RolloutRequest) -> Generation:
        g = request.group_size
        # groups of one (a tool conversation's later turns) have nothing to share: no shortcut to explain
        prefill = self.fast and g > 1 and self.shortcut("prefill_once",
                                                        prefill_once_blocker(model, request.group_inputs, g))
        device = request.group_inputs["input_ids"].device
        sampler = self.g.sampler if self.g.sampler != "auto" else default_sampler(device)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        weights = (contextlib.nullcontext(self._held) if self._held is not None  # inside hold(): gathered already
                   else self.training_engine.generation_weights(model))  # ZeRO-3 / FSDP: gather once
        with weights as policy:
            ids, mask, texts = generate_grouped(
                policy, self.tokenizer, request.group_inputs, g, max_new_tokens=self.g.max_completion_length,
                temperature=self.g.temperature, top_p=self.g.top_p, top_k=self.g.top_k, suppress_ids=self.suppress,
                sampler=sampler, prefill_once=prefill, images_per_row=request.images_per_row,
                pixel_rows=request.pixel_rows,
            )
        # Without prefill-once, transformers' generate draws by multinomial whatever the setting.
        return Generation(ids, mask, texts, paths={"prefill_once": prefill,
                                                   "inverse_cdf": prefill and sampler == "inverse_cdf"})
