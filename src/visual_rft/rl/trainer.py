"""The GRPO loop. Each optimiser step reads top to bottom as named, timed phases:
rollout -> reward -> reference -> old_policy -> update -> log/checkpoint."""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from visual_rft.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from visual_rft.config import Config, save_config
from visual_rft.data.record import Record, columns_of
from visual_rft.models import load_reference_model, vision_token_ids
from visual_rft.optim import (NonFiniteGuard, clip_and_step, make_optimizer, make_scheduler, seed_everything, shard,
                              slot_seed, step_indices, total_steps)
from visual_rft.rewards import RewardSet, resolve_rewards, task_module
from visual_rft.rl.advantages import group_advantages, group_reward_std
from visual_rft.rl.fast import generate_grouped, rollout_logprobs
from visual_rft.rl.loss import aggregate, clipped_surrogate, k3_kl, masked_mean, ratio_one_grad_hint
from visual_rft.rl.rollout import Rollout, repeat_inputs
from visual_rft.runlog import PhaseTimer, RunLog
from visual_rft.runtime import load_policy, load_split, make_accelerator, prompt_batch
from visual_rft.sharding import full_weights_for_generation


class GRPOTrainer:
    """Owns the policy, the optional reference, the optimiser and the run directory."""

    def __init__(self, cfg: Config, records: list[Record], rewards: RewardSet, *, resume: bool = False) -> None:
        self.cfg, self.g, self.records, self.rewards = cfg, cfg.grpo, records, rewards
        self.accelerator = make_accelerator(cfg)
        self.out = Path(cfg.output.dir)
        seed_everything(self.g.seed)
        ckpt = latest_checkpoint(self.out) if resume else None
        if resume and ckpt is None:
            print(f"--resume: no complete checkpoint in {self.out}, starting from scratch")
        self.model, self.processor = load_policy(cfg, self.accelerator.device, ckpt / "model" if ckpt else None)
        self.ref_model = None
        if self.g.beta > 0 and not cfg.model.lora.enabled:
            self.ref_model = load_reference_model(cfg.model.name_or_path, dtype=cfg.model.dtype,
                                                  device=str(self.accelerator.device))
        self.suppress = vision_token_ids(self.processor)
        self.parse = task_module(cfg.task.name).parse_answer
        per_step = self.g.per_device_batch_size * self.g.grad_accum_steps * self.accelerator.num_processes
        self.per_step, self.total = per_step, total_steps(len(records), per_step, self.g.num_epochs, self.g.max_steps)
        optimizer = make_optimizer(self.model.parameters(), lr=self.g.learning_rate, weight_decay=self.g.weight_decay,
                                   betas=(self.g.adam_beta1, self.g.adam_beta2))
        scheduler = make_scheduler(optimizer, self.g.lr_scheduler, self.total, self.g.warmup_ratio)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.scheduler = scheduler
        self.start_step = 0
        if ckpt is not None:
            self.start_step = load_training_state(ckpt, optimizer=self.optimizer, scheduler=self.scheduler)["step"]
        self.log = RunLog(self.out, enabled=self.accelerator.is_main_process, accelerator=self.accelerator, cfg=cfg)
        if ckpt is not None:
            self.log.truncate_after(self.start_step)
        self.timer = PhaseTimer()
        self.guard = NonFiniteGuard(self.g.max_nonfinite_steps)

    @property
    def policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ phases
    def sample(self, batch: list[Record]) -> Rollout:
        # Each prompt is processed and prefilled once, then its KV cache serves all G samples.
        g = self.g.num_generations
        group, prompts = prompt_batch(batch, self.cfg, self.processor, self.accelerator.device,
                                      max_prompt_length=self.g.max_prompt_length)
        with full_weights_for_generation(self.accelerator, self.model) as policy:  # ZeRO-3 / FSDP: gather once
            ids, mask, texts = generate_grouped(
                policy, self.processor.tokenizer, group, g, max_new_tokens=self.g.max_completion_length,
                temperature=self.g.temperature, top_p=self.g.top_p, top_k=self.g.top_k, suppress_ids=self.suppress,
            )
        records = [r for r in batch for _ in range(g)]
        prompts = [p for p in prompts for _ in range(g)]
        return Rollout(records, prompts, repeat_inputs(group, g), ids, mask, texts, group_inputs=group, group_size=g)

    def score(self, rollout: Rollout) -> None:
        columns = columns_of(rollout.records)
        rollout.scores = self.rewards.score(rollout.completions, columns)
        rollout.rewards = torch.tensor(self.rewards.total(rollout.scores), dtype=torch.float32)
        rollout.advantages = group_advantages(rollout.rewards, self.g.num_generations, scale=self.g.scale_rewards)

    @torch.no_grad()
    def reference(self, rollout: Rollout) -> None:
        if self.ref_model is not None:
            rollout.ref_logp = rollout_logprobs(self.ref_model, rollout)
        else:  # LoRA: the reference is the base model, i.e. the policy with its adapters switched off
            with self.policy.disable_adapter():
                rollout.ref_logp = rollout_logprobs(self.model, rollout)

    @torch.no_grad()
    def old_policy(self, rollout: Rollout) -> None:
        rollout.old_logp = rollout_logprobs(self.model, rollout)

    def loss(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        mask = rollout.completion_mask
        eps_high = self.g.epsilon_high if self.g.epsilon_high is not None else self.g.epsilon
        adv = rollout.advantages.to(mask.device)
        hint = None
        if rollout.old_logp is None:  # dLoss/dlogp is known up front: the LM head's forward computes the gradients
            hint = ratio_one_grad_hint(adv, rollout.ref_logp, mask, beta=self.g.beta, eps_low=self.g.epsilon,
                                       eps_high=eps_high, loss_type=self.g.loss_type,
                                       max_completion_length=self.g.max_completion_length)
        logp = rollout_logprobs(self.model, rollout, grad_hint=hint)  # one packed row per group, chunked LM head
        # With one update per rollout the sampling policy is the current one: the ratio is 1 and
        # only its gradient matters, so the detached log-probs stand in for a second forward pass.
        old = rollout.old_logp if rollout.old_logp is not None else logp.detach()
        per_token, clipped = clipped_surrogate(logp, old, adv, self.g.epsilon, eps_high)
        stats = {"clip_frac": masked_mean(clipped, mask).item()}
        if rollout.ref_logp is not None:
            kl = k3_kl(logp, rollout.ref_logp)
            per_token = per_token + self.g.beta * kl
            stats["kl"] = masked_mean(kl, mask).item()
        return aggregate(per_token, mask, self.g.loss_type, self.g.max_completion_length), stats

    def update(self, rollouts: list[Rollout]) -> dict[str, float]:
        self.model.train()
        stats: list[dict[str, float]] = []
        losses = []
        for i, rollout in enumerate(rollouts):
            last = i == len(rollouts) - 1
            with self.accelerator.no_sync(self.model) if not last else contextlib.nullcontext():
                loss, s = self.loss(rollout)
                self.accelerator.backward(loss / len(rollouts))
            losses.append(loss.item())
            stats.append(s)
        clip = self.accelerator.clip_grad_norm_
        grad_norm, stepped = clip_and_step(self.model, self.optimizer, self.scheduler, self.g.max_grad_norm, clip)
        merged = {k: statistics.fmean(s[k] for s in stats) for k in stats[0]}
        return {"loss": statistics.fmean(losses), "grad_norm": grad_norm, "stepped": stepped, **merged}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        save_config(self.cfg, self._ensure_dir() / "config.yaml")
        bar = tqdm(range(self.start_step, self.total), initial=self.start_step, total=self.total,
                   desc="grpo", disable=not (self.cfg.output.progress and self.accelerator.is_main_process))
        for step in bar:
            indices = step_indices(step, self.per_step, len(self.records), self.g.seed)
            micro = shard(indices, self.g.per_device_batch_size, self.accelerator.process_index,
                          self.accelerator.num_processes)
            self.model.eval()
            with self.timer.phase("rollout"):
                rollouts = []
                for m, batch in enumerate(micro):
                    # Sampling is seeded per (step, global micro-batch slot), so the completions do not
                    # depend on how many processes share the step, nor on where a run was resumed.
                    slot = m * self.accelerator.num_processes + self.accelerator.process_index
                    torch.manual_seed(slot_seed(self.g.seed, step, slot))
                    rollouts.append(self.sample([self.records[i] for i in batch]))
            with self.timer.phase("reward"):
                for r in rollouts:
                    self.score(r)
            if self.g.beta > 0:
                with self.timer.phase("reference"):
                    for r in rollouts:
                        self.reference(r)
            if self.g.num_iterations > 1:
                with self.timer.phase("old_policy"):
                    for r in rollouts:
                        self.old_policy(r)
            with self.timer.phase("update"):
                updates = [self.update(rollouts) for _ in range(self.g.num_iterations)]
            for update in updates:
                self.guard.record(step + 1, update.pop("stepped"))
            metrics = self._metrics(rollouts, updates)
            self._log(step + 1, metrics, rollouts)
            bar.set_postfix(reward=f"{metrics['reward/total_mean']:.3f}")
            if self._should_save(step + 1):
                self.save(step + 1)
        self.log.close()
        return self.out

    # ------------------------------------------------------------------ bookkeeping
    def _ensure_dir(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out

    def _should_save(self, step: int) -> bool:
        every = self.cfg.output.save_steps
        return step == self.total or (every > 0 and step % every == 0)

    def save(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.out, step, model=self.policy, processor=self.processor, optimizer=self.optimizer,
                            scheduler=self.scheduler, cfg=self.cfg, keep=self.cfg.output.save_total_limit,
                            extra={"total_steps": self.total})
        self.accelerator.wait_for_everyone()

    def _metrics(self, rollouts: list[Rollout], updates: list[dict[str, float]]) -> dict[str, float]:
        """Per-sample statistics gathered from every process, so the log describes the global batch."""
        names = self.rewards.names
        rows = []
        for r in rollouts:
            failed = [self.parse(t, mode=self.cfg.task.mode, **rec.columns()) is None
                      for t, rec in zip(r.completions, r.records)]
            rows.append(torch.stack([r.rewards, r.completion_mask.sum(1).float().cpu(), torch.tensor(failed).float(),
                                     *[torch.tensor(r.scores[n]) for n in names]], dim=1))
        table = self.accelerator.gather(torch.cat(rows).to(self.accelerator.device)).cpu()
        total = table[:, 0]
        out: dict[str, float] = {"reward/total_mean": total.mean().item(),
                                 "reward/group_std": group_reward_std(total, self.g.num_generations).item()}
        for i, name in enumerate(names):
            values = table[:, 3 + i]
            out[f"reward/{name}_mean"] = values.mean().item()
            out[f"reward/{name}_std"] = values.std().item() if values.numel() > 1 else 0.0
        out["parse_failure_rate"] = table[:, 2].mean().item()
        out["completion_length"] = table[:, 1].mean().item()
        last = updates[-1]
        reduced = self.accelerator.reduce(torch.tensor(list(last.values()), device=self.accelerator.device), "mean")
        out.update(dict(zip(last, reduced.tolist())))  # averaged over processes, like the gradients
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["skipped_steps_total"] = self.guard.total
        out.update(self.timer.pop())
        return out

    def _log(self, step: int, metrics: dict[str, float], rollouts: list[Rollout]) -> None:
        if step % max(self.cfg.output.log_steps, 1) == 0 or step == self.total:
            self.log.metrics(step, metrics)
        every = self.cfg.output.sample_steps
        if every > 0 and (step % every == 0 or step == 1):
            self.log.rollouts(step, _rollout_rows(rollouts[0], self.rewards.names))


def _rollout_rows(rollout: Rollout, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i, (text, record) in enumerate(zip(rollout.completions, rollout.records)):
        rows.append({"source": record.source, "prompt": rollout.prompts[i], "solution": record.solution,
                     "completion": text, "advantage": round(float(rollout.advantages[i]), 4),
                     **{name: rollout.scores[name][i] for name in names}})
    return rows


def train_grpo(cfg: Config, *, resume: bool = False) -> Path:
    """Validate everything cheap first (rewards, data), then load models and train."""
    rewards = resolve_rewards(cfg.task.name, cfg.task.rewards, cfg.task.mode, cfg.task.reward_weights)
    records = load_split(cfg, "train")
    return GRPOTrainer(cfg, records, rewards, resume=resume).fit()
