"""The GRPO objective, written once, as small pure tensor functions.

`policy_loss` is the only place the objective is written: the trainer calls it, the LM head's
gradient shortcut differentiates it (`ratio_one_grad_hint`), and the tests compare against it.
Its parts, each with a hand-computed test (tests/test_rl_math.py):
- the importance ratio per token, or per sequence (GSPO: the length-normalised sum of token
  log-ratios), clipped PPO-style at [1 - eps_low, 1 + eps_high];
- the k3 estimator of KL(policy || reference), weighted by beta;
- the average over completion tokens (`aggregate`): grpo, dr_grpo or dapo, optionally over the
  units of the whole optimiser step (`normalizer`) instead of this micro-batch's own.
Masked positions (padding after EOS, completions left out of the loss) are replaced by zeros
before any exp, so whatever a padding position holds can never turn the loss into inf or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class Objective:
    """The settings of the GRPO objective (the grpo section of the config, minus sampling)."""

    loss_type: str = "grpo"  # grpo | dr_grpo | dapo (see aggregate)
    beta: float = 0.0  # weight of the k3 KL term; 0 = no reference
    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ... and above at 1 + eps_high (DAPO clip-higher when > eps_low)
    max_completion_length: int = 256  # dr_grpo's constant length
    importance_sampling_level: str = "token"  # token (GRPO) | sequence (GSPO)

    @classmethod
    def from_config(cls, g) -> "Objective":
        return cls(loss_type=g.loss_type, beta=g.beta, eps_low=g.epsilon,
                   eps_high=g.epsilon_high if g.epsilon_high is not None else g.epsilon,
                   max_completion_length=g.max_completion_length, importance_sampling_level=g.importance_sampling_level)


def log_importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log(pi / pi_old) per token [B, T]; `sequence` (GSPO) gives every token of a completion the
    mean of its token log-ratios, exp of which is the length-normalised sequence likelihood ratio."""
    valid = mask.bool()
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    if level == "token":
        return log_ratio
    if level == "sequence":
        per_sequence = log_ratio.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
        return per_sequence.expand_as(logp)
    raise ValueError(f"unknown importance_sampling_level {level!r}; expected token or sequence")


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A), r = exp(log_ratio), and the
    mask of tokens where the clipped term won. `advantages` is per sequence [B]."""
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    was_clipped = (clipped < unclipped).float()
    return -torch.min(unclipped, clipped), was_clipped


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(q - p) - (q - p) - 1 >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def loss_units(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """What `aggregate` divides by, counted on `mask`: completions that train (grpo), those times the
    constant length (dr_grpo), or tokens (dapo). Sums over micro-batches and processes."""
    mask = mask.float()
    if loss_type == "dapo":
        return mask.sum()
    completions = (mask.sum(1) > 0).float().sum()
    if loss_type == "grpo":
        return completions
    if loss_type == "dr_grpo":
        return completions * max_completion_length
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
              normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """Average the per-token loss over completion tokens.

    grpo: mean over each completion's tokens, then over completions (short answers weigh more per token).
    dr_grpo: sum over all tokens / (completions * max_completion_length), free of length bias.
    dapo: sum over all tokens / number of tokens (token-level mean).
    `normalizer` replaces the divisor counted on this micro-batch (loss_units): the trainer passes the
    step's units per micro-batch, so several micro-batches and processes average like one batch.
    Rows whose mask is all zero (left out of the loss) count for nothing, divisor included.
    """
    valid = mask.bool()
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if loss_type == "grpo":
        numerator = (per_token.sum(1) / valid.sum(1).clamp(min=1)).sum()
    else:
        numerator = per_token.sum()
    if normalizer is None:
        normalizer = loss_units(mask, loss_type, max_completion_length)
    normalizer = torch.as_tensor(normalizer, dtype=numerator.dtype, device=numerator.device)
    return numerator / normalizer.clamp(min=1e-12)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, objective: Objective, normalizer: torch.Tensor | float | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch, and its clip fraction and KL (means over `mask`).

    logp / old_logp / ref_logp: [B, T] log-probs of the completion tokens under the policy, the
    policy that sampled (logp.detach() when there is one update per rollout) and the reference (None
    = no KL term). advantages [B]; mask [B, T]: the tokens that train. is_weights [B, T]: the
    engine-mismatch correction (rl/mismatch.py), multiplying the policy term only, as TRL and verl do.
    """
    valid = mask.bool()
    log_ratio = log_importance_ratio(logp, old_logp, mask, objective.importance_sampling_level)
    per_token, clipped = clipped_surrogate(log_ratio, advantages.to(logp.device), objective.eps_low, objective.eps_high)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token)
    stats = {"clip_frac": masked_mean(clipped, mask)}
    if ref_logp is not None and objective.beta > 0:
        zero = torch.zeros_like(logp)
        kl = k3_kl(torch.where(valid, logp, zero), torch.where(valid, ref_logp, zero))
        per_token = per_token + objective.beta * kl
        stats["kl"] = masked_mean(kl, mask)
    loss = aggregate(per_token, mask, objective.loss_type, objective.max_completion_length, normalizer)
    return loss, stats


def ratio_one_grad_hint(advantages: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
                        objective: Objective, normalizer: torch.Tensor | float | None = None, is_weights=None):
    """dLoss/dlogp of `policy_loss` with old_logp = logp.detach() (one update per rollout), for
    head_logprobs' grad_hint, which asks for it one chunk of flat [B*T] rows at a time.

    It differentiates policy_loss itself, at a point that agrees with the real log-probs on the
    chunk's rows. At ratio 1 every token's gradient depends only on its own log-prob (the surrogate
    and its GSPO form give -A * weight, the k3 term depends on that token alone), so the other rows'
    values do not matter; they are set to the reference (KL 0 there). head_logprobs checks the
    gradient that finally arrives against this prediction and recomputes if they disagree.
    is_weights: None, or `f(logp) -> [B, T]` weights of the mismatch correction computed from the
    (detached) log-probs; only a per-token rule keeps each token's gradient its own.
    """
    filler = (ref_logp.detach().float() if ref_logp is not None else torch.zeros(mask.shape)).reshape(-1)

    def hint(logp_rows: torch.Tensor, rows: slice) -> torch.Tensor:
        point = filler.to(logp_rows.device).clone()
        point[rows] = logp_rows.detach()
        with torch.enable_grad():
            x = point.view(mask.shape).requires_grad_()
            weights = is_weights(x.detach()) if is_weights is not None else None
            loss, _ = policy_loss(x, x.detach(), ref_logp, advantages, mask, objective, normalizer, weights)
            return torch.autograd.grad(loss, x)[0].reshape(-1)[rows]

    return hint


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    valid = mask.bool()
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp(min=1)
