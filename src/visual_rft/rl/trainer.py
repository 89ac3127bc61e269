"""The GRPO loop. Each optimiser step reads top to bottom as named, timed phases:
rollout -> reward -> advantage -> reference -> old_policy -> update -> log/checkpoint."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from visual_rft.config import Config, save_config
from visual_rft.data.record import Record, columns_of
from visual_rft.engine import Engine
from visual_rft.evaluate import TrainingEval
from visual_rft.models.loading import load_reference_model, pixel_rows_per_prompt, vision_token_ids
from visual_rft.optim import NonFiniteGuard, make_scheduler, seed_everything, shard, slot_seed, step_indices, total_steps
from visual_rft.preemption import Preempted, StopSignals
from visual_rft.preflight import find_resume_checkpoint
from visual_rft.rewards import RewardSet, task_rewards
from visual_rft.rl.advantages import group_advantages, group_reward_std, zero_variance_groups
from visual_rft.rl.engines import RolloutRequest, make_rollout_engine
from visual_rft.rl.fast import packing_blocker, rollout_logprobs
from visual_rft.rl.loss import Objective, loss_units, policy_loss, ratio_one_grad_hint
from visual_rft.rl.mismatch import correction_weights, mismatch_stats
from visual_rft.rl.rollout import Rollout, eos_token_ids, lm_head_weight, repeat_inputs
from visual_rft.rl.tool_rollout import (ToolRunner, conversation_rollout, run_conversations, summarize_tool_columns,
                                        tool_columns, tool_metric_columns, turn_seed)
from visual_rft.runlog import PhaseTimer, RunLog
from visual_rft.runtime import check_prompt_length, load_policy, load_split, prompt_batch, prompt_parts
from visual_rft.tool_eval import conversation_fields, image_saver


class GRPOTrainer:
    """Owns the policy, the optional reference, the optimiser and the run directory."""

    evaluator: Any = None  # an evaluate.TrainingEval (train_grpo sets it from data.eval / eval.steps)

    def __init__(self, cfg: Config, records: list[Record], rewards: RewardSet, *, resume: bool = False) -> None:
        self.cfg, self.g, self.records, self.rewards = cfg, cfg.grpo, records, rewards
        self.engine = Engine(cfg, "grpo", micro_batch=self.g.per_device_batch_size, grad_accum=self.g.grad_accum_steps,
                             max_grad_norm=self.g.optim.max_grad_norm)
        self.accelerator = self.engine.accelerator
        self.out = Path(cfg.output.dir)
        seed_everything(self.g.seed)
        ckpt = find_resume_checkpoint(self.out, required=True) if resume else None
        dtype = self.engine.load_dtype(cfg.model.dtype)
        self.ref_model = None
        with self.engine.building():
            self.model, self.processor = load_policy(cfg, self.accelerator.device, ckpt / "model" if ckpt else None,
                                                     dtype)
            if self.g.beta > 0 and not cfg.model.lora.enabled:
                self.ref_model = load_reference_model(cfg.model.name_or_path, dtype=dtype,
                                                      device=str(self.accelerator.device))
        if self.ref_model is not None:
            self.ref_model = self.engine.prepare_reference(self.ref_model)
        self.suppress = vision_token_ids(self.processor, self.model.config)
        per_step = self.g.per_device_batch_size * self.g.grad_accum_steps * self.accelerator.num_processes
        self.per_step, self.total = per_step, total_steps(len(records), per_step, self.g.num_epochs, self.g.max_steps)
        optimizer = self.engine.optimizer(self.model, self.g.optim)
        self.scheduler = make_scheduler(optimizer, self.g.optim, self.total)
        self.model, self.optimizer = self.engine.prepare(self.model, optimizer)
        self.start_step = 0
        if ckpt is not None:
            self.start_step = self.engine.load_state(self.model, ckpt, optimizer=self.optimizer,
                                                     scheduler=self.scheduler)["step"]
            if self.accelerator.is_main_process:
                print(f"resuming from {ckpt} (step {self.start_step} of {self.total})")
        self.log = RunLog(self.out, enabled=self.accelerator.is_main_process, accelerator=self.accelerator, cfg=cfg)
        if ckpt is not None:
            self.log.truncate_after(self.start_step)
        self.timer = PhaseTimer()
        self.guard = NonFiniteGuard(self.g.optim.max_nonfinite_steps)
        self.objective = Objective.from_config(self.g)
        self.fast = self.g.fast == "auto"
        self._explained: set[str] = set()  # shortcuts whose fallback reason was already printed
        self.eos = torch.tensor(eos_token_ids(self.policy, self.processor.tokenizer))
        self.rollout_engine = make_rollout_engine(cfg, self.engine, self.policy, self.processor, self.suppress,
                                                  fast=self.fast, shortcut=self._shortcut,
                                                  max_images=max((len(r.images) for r in records), default=1))
        self.tools = ToolRunner.from_config(cfg, self.processor) if cfg.tools.enabled else None
        # dr_grpo's constant length: every turn of a tool conversation may use the per-turn limit
        self.max_tokens = self.g.max_completion_length * (cfg.tools.max_turns if self.tools else 1)

    @property
    def policy(self) -> Any:
        return self.engine.unwrap(self.model)

    # ------------------------------------------------------------------ phases
    def sample(self, batch: list[Record], seed: int | None = None) -> Rollout:
        """G completions of each record's prompt, from the rollout engine (grpo.rollout); `seed`: this
        micro-batch slot's (None: the global torch RNG decides). With tools: whole conversations."""
        if self.tools is not None:
            return self.sample_conversations(batch, seed)
        g = self.g.num_generations
        parts = prompt_parts(batch, self.cfg)  # decoded once, for the processor and the rollout engine
        group, prompts = prompt_batch(batch, self.cfg, self.processor, self.accelerator.device,
                                      max_prompt_length=self.g.max_prompt_length, parts=parts)
        images_per_row = [len(record.images) for record in batch]
        pixel_rows = pixel_rows_per_prompt(self.processor, group)  # tiles per prompt where the family tiles
        request = RolloutRequest(batch, group, images_per_row, g, seed, pixel_rows=pixel_rows, images=parts[0],
                                 prompts=parts[1])
        drawn = self.rollout_engine.generate(self.model, request)
        records = [r for r in batch for _ in range(g)]
        prompts = [p for p in prompts for _ in range(g)]
        repeated = repeat_inputs(group, g, images_per_row, pixel_rows)
        rollout = Rollout(records, prompts, repeated, drawn.ids, drawn.mask, drawn.texts, group_inputs=group,
                          group_size=g, temperature=self.g.temperature,
                          truncated=~torch.isin(drawn.ids, self.eos.to(drawn.ids.device)).any(dim=1).cpu(),
                          sampler_logp=drawn.sampler_logp)
        rollout.paths = dict(drawn.paths)
        return rollout

    def sample_conversations(self, batch: list[Record], seed: int | None) -> Rollout:
        """G tool conversations per record (rl/tool_rollout.py), each turn drawn by the rollout engine."""
        images, prompts = prompt_parts(batch, self.cfg)
        paths: dict[str, bool] = {}

        def draw(inputs, images_per_row, group_size, turn, prompt_rows, row_images):
            if turn == 0:
                check_prompt_length(inputs, self.g.max_prompt_length, batch,
                                    what="prompt (the tools' system text included)")
            request = RolloutRequest([batch[i] for i in prompt_rows], inputs, images_per_row, group_size,
                                     turn_seed(seed, turn), pixel_rows=pixel_rows_per_prompt(self.processor, inputs),
                                     row_images=row_images)
            drawn = self.rollout_engine.generate(self.model, request)
            if turn == 0:
                paths.update(drawn.paths)
            return drawn

        with self.rollout_engine.hold(self.model):  # processes run different numbers of turns
            conversations = run_conversations(self.tools, self.processor, images, prompts, self.g.num_generations,
                                              draw, self.eos.tolist(), device=self.accelerator.device)
        rollout = conversation_rollout(batch, prompts, conversations, group_size=self.g.num_generations,
                                       temperature=self.g.temperature, device=self.accelerator.device)
        rollout.paths = paths
        return rollout

    def score(self, rollout: Rollout) -> None:
        columns = columns_of(rollout.records)
        if rollout.conversations is not None:
            columns.update(tool_columns(rollout.conversations))
        scored = self.rewards.score_all(rollout.completions, columns)
        rollout.scores, rollout.scorable = scored.components, torch.tensor(scored.applicable)
        rollout.parse_failed = torch.tensor(scored.parse_failed)
        rollout.rewards = torch.tensor(self.rewards.total(scored.components), dtype=torch.float32)

    def advantage(self, rollout: Rollout) -> None:
        """Group advantages, and which completions train: all, or not those of zero-variance groups
        (skip_zero_variance_groups) or cut at the length limit (mask_truncated_completions)."""
        g = self.g.num_generations
        scorable = rollout.scorable if self.g.unscorable == "exclude" else None
        rollout.advantages = group_advantages(rollout.rewards, g, scale=self.g.scale_rewards, scorable=scorable)
        rollout.zero_variance = zero_variance_groups(rollout.rewards, g, scorable)
        keep = torch.ones(rollout.rewards.numel(), dtype=torch.bool)
        if self.g.skip_zero_variance_groups:
            keep &= ~rollout.zero_variance.repeat_interleave(g)
        if self.g.mask_truncated_completions:
            keep &= ~rollout.truncated
        mask = rollout.completion_mask
        rollout.loss_mask = mask * keep.to(mask.device, mask.dtype)[:, None]

    @torch.no_grad()
    def reference(self, rollout: Rollout) -> None:
        if self._nothing_to_train(rollout):
            return  # every row is left out of the loss: the KL term would be multiplied by 0
        if self.ref_model is not None:
            rollout.ref_logp = rollout_logprobs(self.ref_model, rollout, fast=self.fast)
        else:  # LoRA: the reference is the base model, i.e. the policy with its adapters switched off
            with self.policy.disable_adapter():
                rollout.ref_logp = rollout_logprobs(self.model, rollout, fast=self.fast)

    @torch.no_grad()
    def old_policy(self, rollout: Rollout) -> None:
        rollout.old_logp = rollout_logprobs(self.model, rollout, fast=self.fast)

    def loss(self, rollout: Rollout, normalizer: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = rollout.train_mask()
        hint = None
        packed = self.fast and self._shortcut("packed", packing_blocker(self.model, rollout))
        corrected = self._correction(rollout)
        # dLoss/dlogp is known up front (ratio 1; a per-token correction depends on the token's own
        # log-prob only): the LM head's forward computes the gradients
        per_token = corrected is None or not self.g.vllm.correction.startswith("sequence")
        if self.fast and rollout.old_logp is None and per_token:
            hint = ratio_one_grad_hint(rollout.advantages, rollout.ref_logp, mask, self.objective, normalizer,
                                       is_weights=corrected)
        rollout.paths.update(packed=packed, grad_hint=hint is not None and lm_head_weight(self.model) is not None)
        logp = rollout_logprobs(self.model, rollout, fast=self.fast, grad_hint=hint)
        # With one update per rollout the sampling policy is the current one: the ratio is 1 and
        # only its gradient matters, so the detached log-probs stand in for a second forward pass.
        old = rollout.old_logp if rollout.old_logp is not None else logp.detach()
        weights = corrected(old) if corrected is not None else None
        loss, stats = policy_loss(logp, old, rollout.ref_logp, rollout.advantages, mask, self.objective, normalizer,
                                  is_weights=weights)
        if rollout.sampler_logp is not None:  # the engine mismatch, measured on every sampled token
            measured = mismatch_stats(old, rollout.sampler_logp, rollout.completion_mask, self.g.vllm.correction,
                                      self.g.vllm.correction_cap)
            stats.update({f"rollout/{key}": value for key, value in measured.items()})
        return loss, stats

    def _correction(self, rollout: Rollout):
        """`f(trainer_logp) -> weights` of the engine-mismatch correction (rl/mismatch.py), or None
        where the sampler was the policy itself or the correction is off."""
        mode, cap = self.g.vllm.correction, self.g.vllm.correction_cap
        if rollout.sampler_logp is None or mode == "off":
            return None
        sampler_logp, mask = rollout.sampler_logp, rollout.train_mask()
        return lambda trainer_logp: correction_weights(trainer_logp, sampler_logp.to(trainer_logp.device), mask,
                                                       mode, cap)

    def update(self, rollouts: list[Rollout]) -> dict[str, float]:
        self.model.train()
        stats: list[dict[str, float]] = []
        losses = []
        normalizer = self._loss_normalizer(rollouts)
        for i, rollout in enumerate(rollouts):
            if self._nothing_to_train(rollout):
                continue
            with self.engine.micro_batch(self.model, last=i == len(rollouts) - 1):
                loss, s = self.loss(rollout, normalizer)
                self.engine.backward(self.model, loss / len(rollouts))
            losses.append(loss.item() / len(rollouts))
            stats.append({k: v.item() for k, v in s.items()})
        grad_norm, stepped = self.engine.step(self.model, self.optimizer, self.scheduler)
        merged = {k: _merge(k, [s[k] for s in stats]) for k in stats[0]} if stats else {}
        return {"loss": sum(losses), "grad_norm": grad_norm, "stepped": stepped, **merged}

    def _loss_normalizer(self, rollouts: list[Rollout]) -> torch.Tensor:
        """What each micro-batch's loss is divided by: the step's loss units (completions, or tokens
        for dapo) over all micro-batches and processes, per micro-batch and process, so that the
        micro-batches' averaged gradients equal those of one batch holding the whole step."""
        units = sum(loss_units(r.train_mask(), self.g.loss_type, self.max_tokens).cpu() for r in rollouts)
        total = self.accelerator.reduce(torch.as_tensor(units, dtype=torch.float32, device=self.accelerator.device),
                                        "sum")
        return total / (len(rollouts) * self.accelerator.num_processes)

    def _nothing_to_train(self, rollout: Rollout) -> bool:
        """Every row left out of the loss; skipped only where the engine allows it (DDP needs every
        rank's backward, DeepSpeed counts micro-batches)."""
        return self.engine.may_skip_backward and not bool(rollout.train_mask().any())

    def _shortcut(self, name: str, blocker: str | None) -> bool:
        """Whether a shortcut applies; the first time one does not, say why (once per run)."""
        if blocker is not None and name not in self._explained and self.accelerator.is_main_process:
            self._explained.add(name)
            print(f"visual-rft: {name} shortcut off: {blocker}", file=sys.stderr)
        return blocker is None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        save_config(self.cfg, self._ensure_dir() / "config.yaml")
        bar = tqdm(range(self.start_step, self.total), initial=self.start_step, total=self.total,
                   desc="grpo", disable=not (self.cfg.output.progress and self.accelerator.is_main_process))
        with StopSignals() as stop:  # SIGTERM / SIGINT: finish the step in flight, save it, exit
            for step in bar:
                metrics, rollouts = self.train_step(step)
                self._log(step + 1, metrics, rollouts)
                bar.set_postfix(reward=f"{metrics['reward/total_mean']:.3f}")
                if self._should_save(step + 1):
                    self.save(step + 1)
                signum = self._agreed_stop(stop)
                if signum and step + 1 < self.total:
                    if not self._should_save(step + 1):
                        self.save(step + 1)
                    self.log.close()
                    raise Preempted(signum, step + 1, self.out / f"checkpoint-{step + 1}")
        self.log.close()
        return self.out

    def train_step(self, step: int) -> tuple[dict[str, float], list[Rollout]]:
        """Optimiser step `step + 1`: its phases, and the metrics of the global batch."""
        indices = step_indices(step, self.per_step, len(self.records), self.g.seed)
        micro = shard(indices, self.g.per_device_batch_size, self.accelerator.process_index,
                      self.accelerator.num_processes)
        self.model.eval()
        if self.rollout_engine.syncs_weights:  # the engine's own copy of the weights catches up with the policy
            with self.timer.phase("weight_sync"):
                self.rollout_engine.sync(self.model)
        with self.timer.phase("rollout"):
            rollouts = []
            for m, batch in enumerate(micro):
                # Sampling is seeded per (step, global micro-batch slot), so the completions do not
                # depend on how many processes share the step, nor on where a run was resumed.
                slot = m * self.accelerator.num_processes + self.accelerator.process_index
                rollouts.append(self.sample([self.records[i] for i in batch], seed=slot_seed(self.g.seed, step, slot)))
            self.rollout_engine.after_rollout()
        with self.timer.phase("reward"):
            for r in rollouts:
                self.score(r)
        with self.timer.phase("advantage"):
            for r in rollouts:
                self.advantage(r)
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
        if self.evaluator is not None:
            metrics.update(self.evaluator.maybe_run(step + 1, self.total, self.accelerator, self.model,
                                                    self.processor, self.log))
        return metrics, rollouts

    def _reduce_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Means over processes; the extremes (keys ending in _max / _min) as extremes."""
        device = self.accelerator.device
        means = self.accelerator.reduce(torch.tensor(list(values.values()), device=device), "mean").tolist()
        out = dict(zip(values, means))
        signs = {key: 1.0 if key.endswith("_max") else -1.0 for key in values if key.endswith(("_max", "_min"))}
        if signs:  # one max-reduce for all extremes: a minimum is the negated maximum of the negated values
            signed = torch.tensor([sign * values[key] for key, sign in signs.items()], device=device)
            reduced = self.accelerator.reduce(signed, "max").tolist()
            out.update({key: sign * value for (key, sign), value in zip(signs.items(), reduced)})
        return out

    def _agreed_stop(self, stop: StopSignals) -> int:
        """The stop signal any process received (0: none); every rank stops after the same step."""
        if self.accelerator.num_processes == 1:
            return stop.signum
        flag = torch.tensor(float(stop.signum), device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, "max").item())

    # ------------------------------------------------------------------ bookkeeping
    def _ensure_dir(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out

    def _should_save(self, step: int) -> bool:
        every = self.cfg.output.save_steps
        return step == self.total or (every > 0 and step % every == 0)

    def save(self, step: int) -> None:
        self.engine.save(self.model, self.out, step, processor=self.processor, optimizer=self.optimizer,
                         scheduler=self.scheduler, cfg=self.cfg, keep=self.cfg.output.save_total_limit,
                         extra={"total_steps": self.total})

    def _metrics(self, rollouts: list[Rollout], updates: list[dict[str, float]]) -> dict[str, float]:
        """Per-sample statistics gathered from every process, so the log describes the global batch."""
        columns = {"total": [], "length": [], "parse_failed": [], "unscorable": [], "truncated": [],
                   "zero_variance_group": [], **{f"reward/{n}": [] for n in self.rewards.names}}
        for r in rollouts:
            columns["total"].append(r.rewards)
            columns["length"].append(r.completion_mask.sum(1).float().cpu())
            columns["parse_failed"].append(r.parse_failed.float())  # the task's parser, run once while scoring
            columns["unscorable"].append((~r.scorable).float())
            columns["truncated"].append(r.truncated.float())
            columns["zero_variance_group"].append(r.zero_variance.float().repeat_interleave(r.group_size))
            for name in self.rewards.names:
                columns[f"reward/{name}"].append(torch.tensor(r.scores[name]))
        if self.tools is not None:
            for key, values in tool_metric_columns([c.rows() for r in rollouts for c in r.conversations]).items():
                columns[key] = [values]
        local = torch.stack([torch.cat(v) for v in columns.values()], dim=1)
        table = dict(zip(columns, self.accelerator.gather(local.to(self.accelerator.device)).cpu().unbind(1)))
        total = table["total"]
        out: dict[str, float] = {"reward/total_mean": total.mean().item(),
                                 "reward/group_std": group_reward_std(total, self.g.num_generations).item()}
        for name in self.rewards.names:
            values = table[f"reward/{name}"]
            out[f"reward/{name}_mean"] = values.mean().item()
            out[f"reward/{name}_std"] = values.std().item() if values.numel() > 1 else 0.0
        out["parse_failure_rate"] = table["parse_failed"].mean().item()
        out["completion_length"] = table["length"].mean().item()
        out["unscorable_frac"] = table["unscorable"].mean().item()
        out["truncated_frac"] = table["truncated"].mean().item()
        out.update(summarize_tool_columns({k: v for k, v in table.items() if k.startswith("tool/")}))
        out["frac_reward_zero_std"] = table["zero_variance_group"].mean().item()  # TRL's name; per group
        last = updates[-1]
        out.update(self._reduce_over_processes(last))  # averaged over processes, like the gradients
        for path in ("prefill_once", "inverse_cdf", "packed", "grad_hint"):  # which shortcuts ran (fraction of micro-batches)
            out[f"fast/{path}"] = statistics.fmean(float(r.paths.get(path, False)) for r in rollouts)
        out["lr"] = self.scheduler.get_last_lr()[0]
        out["skipped_steps_total"] = self.guard.total
        out.update(self.timer.pop())
        return out

    def _log(self, step: int, metrics: dict[str, float], rollouts: list[Rollout]) -> None:
        if step % max(self.cfg.output.log_steps, 1) == 0 or step == self.total:
            self.log.metrics(step, metrics)
        every = self.cfg.output.sample_steps
        if every > 0 and (step % every == 0 or step == 1):
            # tool images are written by the process that writes the log
            run_dir = self.out if self.accelerator.is_main_process else None
            self.log.rollouts(step, _rollout_rows(rollouts[0], self.rewards.names, run_dir, step))


def _merge(key: str, values: list[float]) -> float:
    """One step's value of a per-micro-batch statistic: the extreme for *_max / *_min, else the mean."""
    if key.endswith("_max"):
        return max(values)
    return min(values) if key.endswith("_min") else statistics.fmean(values)


ROLLOUT_IMAGES = "rollout_images"  # in the run folder: step<N>/<row>-<k>.png, the k-th image a sampled row's tools made


def _rollout_rows(rollout: Rollout, names: list[str], run_dir: Path | None = None,
                  step: int = 0) -> list[dict[str, Any]]:
    """The logged rows of a rollout; a tool conversation's with every turn (tool_eval.conversation_fields)
    and, with `run_dir`, its tools' images written there under ROLLOUT_IMAGES, each named (relative to
    the run folder) by the turn whose call made it."""
    rows = []
    for i, (text, record) in enumerate(zip(rollout.completions, rollout.records)):
        rows.append({"source": record.source, "prompt": rollout.prompts[i], "solution": record.solution,
                     "completion": text, "advantage": round(float(rollout.advantages[i]), 4),
                     **{name: rollout.scores[name][i] for name in names}})
        if rollout.conversations is not None:  # every turn and the tool's answer to it
            save = None if run_dir is None else image_saver(run_dir, f"{ROLLOUT_IMAGES}/step{step}/{i}")
            rows[-1].update(conversation_fields(rollout.conversations[i], save))
    return rows


def train_grpo(cfg: Config, *, resume: bool = False) -> Path:
    """Validate everything cheap first (rewards, data), then load models and train (evaluating on
    data.eval as eval.steps says)."""
    rewards = task_rewards(cfg.task, tools=cfg.tools)
    records = load_split(cfg, "train")
    evaluator = TrainingEval.from_config(cfg)
    trainer = GRPOTrainer(cfg, records, rewards, resume=resume)
    trainer.evaluator = evaluator
    return trainer.fit()
