"""The interface between the GRPO trainer and whatever samples its completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ContextManager, Protocol

import torch

from visual_rft.data.record import Record


@dataclass
class RolloutRequest:
    """One micro-batch of prompts to sample `group_size` completions each for."""

    records: list[Record]
    group_inputs: dict[str, torch.Tensor]  # processor output, one left-padded row per prompt
    images_per_row: list[int]  # each prompt's image count (rows may differ)
    group_size: int
    seed: int | None = None  # this micro-batch slot's sampling seed (None: from torch's global RNG)
    pixel_rows: list[int] | None = None  # each prompt's pixel_values entries where the family tiles
    # what group_inputs were made from (runtime.prompt_parts), for engines that take raw prompts
    images: list[list[Any]] | None = None  # each prompt's images, sized as the processor got them
    prompts: list[str] | None = None  # each prompt's question text (before the chat template)
    # token prompts (tool conversations, whose rows are not one question): each row's images in order,
    # for engines that take the row's ids from group_inputs and need its images beside them
    row_images: list[list[Any]] | None = None


@dataclass
class Generation:
    """G completions per prompt, rows in prompt order (row i*G + j = sample j of prompt i)."""

    ids: torch.Tensor  # [N, T], padding after the first EOS
    mask: torch.Tensor  # [N, T], 1 up to and including the first EOS
    texts: list[str]
    # The sampler's own log-probs of the drawn tokens [N, T] (0 on padding), from the distribution it
    # actually drew from (temperature, suppressed tokens, top-k / top-p applied); None where the
    # engine samples from the policy itself and they would equal the trainer's.
    sampler_logp: torch.Tensor | None = None
    paths: dict[str, bool] = field(default_factory=dict)  # which shortcuts drew these samples


class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    name: str
    syncs_weights: bool  # holds its own copy of the weights: sync before each step's rollout

    def sync(self, model: Any) -> bool:
        """Bring the engine's weights up to the policy's before a rollout; True if weights moved."""

    def generate(self, model: Any, request: RolloutRequest) -> Generation:
        """Sample the request's completions (`model`: the training wrapper of the policy)."""

    def after_rollout(self) -> None:
        """The step's rollout is over (every micro-batch drawn): free what the update needs back."""

    def hold(self, model: Any) -> ContextManager[None]:
        """Keep what generation needs (e.g. ZeRO-3's gathered weights) across the generate calls inside
        the block: a tool conversation's turns, whose number differs between processes, so no call
        inside may be a collective."""
