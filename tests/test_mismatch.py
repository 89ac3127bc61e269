"""The engine-mismatch correction (rl/mismatch.py), by hand on a 2x3 example, and in the trainer."""

import math

import pytest
import torch

from visual_rft.rl.engines.base import Generation
from visual_rft.rl.fast import rollout_logprobs
from visual_rft.rl.loss import Objective, policy_loss, ratio_one_grad_hint
from visual_rft.rl.mismatch import correction_weights, mismatch_stats
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.rewards import task_rewards
from visual_rft.runlog import read_jsonl
from visual_rft.runtime import load_split

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
SAMPLER = torch.tensor([[-1.1, -1.0, -0.5], [-0.3, -2.5, 9.0]])  # 9.0 sits on padding: never used
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
E = math.exp


@pytest.mark.parametrize("mode, expected", [
    # token log-ratios: row 0 [0.1, -1.0, 0.0], row 1 [0.0, 1.3, pad]
    ("token_truncate", [[E(0.1), E(-1.0), 1.0], [1.0, 3.0, 0.0]]),
    ("token_mask", [[E(0.1), E(-1.0), 1.0], [1.0, 0.0, 0.0]]),
    # sequence log-ratios: row 0 -0.9, row 1 1.3 (over the cap of 3: exp(1.3) = 3.67)
    ("sequence_truncate", [[E(-0.9)] * 3, [3.0, 3.0, 0.0]]),
    ("sequence_mask", [[E(-0.9)] * 3, [0.0, 0.0, 0.0]]),
    ("off", [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]),
])
def test_correction_weights_by_hand(mode, expected):
    weights = correction_weights(TRAINER, SAMPLER, MASK, mode, cap=3.0)
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-6), weights


def test_mismatch_stats_by_hand():
    stats = mismatch_stats(TRAINER, SAMPLER, MASK, "token_truncate", cap=3.0)
    deltas = [0.1, -1.0, 0.0, 0.0, 1.3]
    weights = [E(0.1), E(-1.0), 1.0, 1.0, 3.0]
    expected = {"logp_diff_mean": sum(map(abs, deltas)) / 5, "logp_diff_max": 1.3,
                "kl": sum(E(d) - d - 1 for d in deltas) / 5, "is_weight_mean": sum(weights) / 5,
                "is_weight_min": E(-1.0), "is_weight_max": 3.0, "is_capped_frac": 0.2}
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, abs=1e-6), key


def test_unknown_correction_is_refused():
    with pytest.raises(ValueError, match="unknown correction 'token'"):
        correction_weights(TRAINER, SAMPLER, MASK, "token", cap=3.0)


def test_weights_scale_the_policy_term_only():
    """At ratio 1 the grpo loss's gradient on token t of row i is -A_i * w_it / (n_i * rows); the KL
    term (beta) is not weighted."""
    advantages = torch.tensor([1.0, -2.0])
    weights = correction_weights(TRAINER, SAMPLER, MASK, "token_truncate", cap=3.0)
    logp = TRAINER.clone().requires_grad_()
    loss, _ = policy_loss(logp, logp.detach(), None, advantages, MASK, Objective(), is_weights=weights)
    loss.backward()
    lengths = MASK.sum(1, keepdim=True)
    expected = -advantages[:, None] * weights / (lengths * 2) * MASK
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    ref = TRAINER - 0.1
    with_kl = TRAINER.clone().requires_grad_()
    objective = Objective(beta=0.5)
    loss, _ = policy_loss(with_kl, with_kl.detach(), ref, advantages, MASK, objective, is_weights=weights)
    loss.backward()
    kl_grad = 0.5 * (1 - torch.exp(ref - TRAINER)) / (lengths * 2) * MASK  # d k3 / d logp
    assert torch.allclose(with_kl.grad, expected + kl_grad, atol=1e-6)


def test_the_grad_hint_carries_the_per_token_weights():
    """The LM head's gradient shortcut predicts dLoss/dlogp with the weights recomputed from the rows'
    own log-probs: equal to autograd through policy_loss."""
    advantages = torch.tensor([1.0, -2.0])
    weights_of = lambda logp: correction_weights(logp, SAMPLER, MASK, "token_truncate", cap=3.0)  # noqa: E731
    hint = ratio_one_grad_hint(advantages, None, MASK, Objective(), None, is_weights=weights_of)
    x = TRAINER.clone().requires_grad_()
    loss, _ = policy_loss(x, x.detach(), None, advantages, MASK, Objective(), is_weights=weights_of(x.detach()))
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.allclose(hint(TRAINER.reshape(-1)[2:5], slice(2, 5)), grad.reshape(-1)[2:5], atol=1e-6)


class _OffsetSampler:
    """A stand-in engine that draws with the policy and reports log-probs `offset` nats below the
    trainer's: every token's importance weight is exactly exp(offset)."""

    name = "offset"
    syncs_weights = False

    def __init__(self, trainer, offset):
        self.inner, self.trainer, self.offset = trainer.rollout_engine, trainer, offset

    def sync(self, model):
        return False

    def after_rollout(self):
        pass

    def generate(self, model, request):
        drawn = self.inner.generate(model, request)
        from visual_rft.rl.rollout import Rollout, repeat_inputs

        g = request.group_size
        rollout = Rollout(request.records, [""] * len(drawn.texts), repeat_inputs(request.group_inputs, g,
                          request.images_per_row, request.pixel_rows), drawn.ids, drawn.mask, drawn.texts,
                          group_inputs=request.group_inputs, group_size=g, temperature=self.trainer.g.temperature)
        with torch.no_grad():
            logp = rollout_logprobs(model, rollout, fast=False)
        return Generation(drawn.ids, drawn.mask, drawn.texts, sampler_logp=(logp - self.offset) * drawn.mask)


def _first_step(small_cfg, correction, tmp_path, *extra):
    cfg = small_cfg("task.rewards=[toy_rewards:text_length]", "grpo.max_steps=1", "output.save_steps=0",
                    f"output.dir={tmp_path / (correction + ''.join(extra))}", *extra,
                    "grpo.beta=0", f"grpo.vllm.correction={correction}", "grpo.optim.max_grad_norm=1e9")
    trainer = GRPOTrainer(cfg, load_split(cfg, "train"), task_rewards(cfg.task))
    trainer.rollout_engine = _OffsetSampler(trainer, offset=0.5)
    trainer.fit()
    return read_jsonl(f"{cfg.output.dir}/metrics.jsonl")[0]


def test_the_trainer_weights_its_gradient_by_the_mismatch(small_cfg, one_thread, tmp_path):
    """Log-probs 0.5 nats below the trainer's: every weight is e^0.5 (under the cap of 3), so the
    corrected step's gradient is e^0.5 times the uncorrected one, and the metrics say so."""
    off, on = _first_step(small_cfg, "off", tmp_path), _first_step(small_cfg, "token_truncate", tmp_path)
    assert on["grad_norm"] > 0
    assert on["grad_norm"] / off["grad_norm"] == pytest.approx(E(0.5), rel=1e-4)
    assert on["rollout/logp_diff_max"] == pytest.approx(0.5, abs=1e-5)
    assert on["rollout/is_weight_min"] == pytest.approx(E(0.5), rel=1e-5)
    assert off["rollout/is_weight_max"] == 1.0 and on["rollout/is_capped_frac"] == 0.0


def test_the_configured_cap_is_the_one_applied(small_cfg, one_thread, tmp_path):
    """grpo.vllm.correction_cap=1.2 under weights of e^0.5 = 1.65: every weight is truncated to 1.2,
    the gradient is 1.2 times the uncorrected one and every token counts as capped."""
    off = _first_step(small_cfg, "off", tmp_path)
    capped = _first_step(small_cfg, "token_truncate", tmp_path, "grpo.vllm.correction_cap=1.2")
    assert capped["grad_norm"] / off["grad_norm"] == pytest.approx(1.2, rel=1e-4)
    assert capped["rollout/is_weight_max"] == pytest.approx(1.2) and capped["rollout/is_capped_frac"] == 1.0
