"""The engine mismatch: the sampler's log-probs (vLLM) against the trainer's, measured and corrected.

A rollout engine other than the policy itself draws tokens from a slightly different distribution
(other kernels, other reduction orders, suppressed tokens, top-k / top-p), so the on-policy gradient
is biased. Truncated importance sampling (TIS; as TRL's vllm_importance_sampling_correction and
verl's rollout_correction) reweights each token's policy-gradient term by pi_trainer / pi_sampler of
the sampled token, computed once from the detached log-probs and capped:
- token_*: one weight per token, exp(logp_trainer - logp_sampler);
- sequence_*: one weight per completion, exp of the sum of its tokens' log-ratios;
- *_truncate: min(w, cap); *_mask: w where w <= cap, else 0 (the token or completion drops out).
Padding positions get weight 0 and never enter an exp.
"""

from __future__ import annotations

import torch

CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "off")


def _log_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                 level: str) -> torch.Tensor:
    """log w [B, T] before any cap: per token, or the completion's summed log-ratio on each of its tokens."""
    valid = mask.bool()
    delta = trainer_logp.detach() - sampler_logp.to(trainer_logp)
    log_ratio = torch.where(valid, delta, torch.zeros_like(delta))
    return log_ratio.sum(1, keepdim=True).expand_as(log_ratio) if level == "sequence" else log_ratio


def correction_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       mode: str, cap: float) -> torch.Tensor:
    """Importance weights [B, T] (detached) for the policy term of the loss; 1 everywhere for `off`."""
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown correction {mode!r}; expected one of {', '.join(CORRECTIONS)}")
    valid = mask.bool()
    if mode == "off":
        return valid.to(trainer_logp.dtype)
    level, rule = mode.split("_")
    weights = torch.exp(_log_weights(trainer_logp, sampler_logp, mask, level))
    weights = weights.clamp(max=cap) if rule == "truncate" else torch.where(weights <= cap, weights, 0.0)
    return torch.where(valid, weights, torch.zeros_like(weights))


def mismatch_stats(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                   mode: str, cap: float) -> dict[str, torch.Tensor]:
    """How far the sampler is from the trainer on the sampled tokens, and what the correction does.

    logp_diff_mean / _max: |logp_trainer - logp_sampler| per token; kl: the k3 estimate of
    KL(sampler || trainer) from tokens the sampler drew (exp(d) - d - 1, d = trainer - sampler);
    is_weight_mean / _min / _max: the correction's weights; is_capped_frac: tokens whose weight the
    cap changed (truncated or masked). Means over the tokens of `mask`.
    """
    valid = mask.bool()
    keys = ("logp_diff_mean", "logp_diff_max", "kl", "is_weight_mean", "is_weight_min", "is_weight_max",
            "is_capped_frac")
    if not valid.any():
        return {key: trainer_logp.new_zeros(()) for key in keys}
    delta = (trainer_logp.detach() - sampler_logp.to(trainer_logp))[valid]
    weights = correction_weights(trainer_logp, sampler_logp, mask, mode, cap)[valid]
    level = "sequence" if mode.startswith("sequence") else "token"
    uncapped = torch.exp(_log_weights(trainer_logp, sampler_logp, mask, level))[valid]
    capped = (weights != uncapped).float() if mode != "off" else torch.zeros_like(weights)
    values = (delta.abs().mean(), delta.abs().max(), (torch.exp(delta) - delta - 1).mean(), weights.mean(),
              weights.min(), weights.max(), capped.mean())
    return dict(zip(keys, values))
