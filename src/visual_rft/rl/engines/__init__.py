"""Rollout engines: what draws the G completions of each prompt for GRPO.

The trainer asks one small interface (`base.RolloutEngine`) for completions and knows nothing of how
they are drawn: `hf.HFRolloutEngine` runs this project's own transformers decode loop on the policy
itself; `vllm.VLLMRolloutEngine` runs vLLM colocated in the training process, with the policy's
weights synced into it before every rollout. `make_rollout_engine` picks one from `grpo.rollout`.
"""

from visual_rft.rl.engines.base import Generation, RolloutEngine, RolloutRequest
from visual_rft.rl.engines.select import make_rollout_engine

__all__ = ["Generation", "RolloutEngine", "RolloutRequest", "make_rollout_engine"]
