"""`visual-rft sweep`: data efficiency measured — SFT vs Visual-RFT over k-shot sizes and seeds.

The protocol (also in the README, "Data efficiency"):
- one base for every run: the demo's supervised warm-up on its digits (`sweep.base: warmup`, cached
  on disk under `sweep.base_cache`, keyed by everything that decides it), or `model.name_or_path`;
- the target data (`sweep.target`: the demo's digit split, or any data source) is cut into a pool,
  a validation split carved from the pool side, and the held-out split; for every k in `sweep.ks`
  and seed in `sweep.seeds` the k-shot draw comes from the pool with that seed, and SFT and RFT
  train from the base on it with that training seed;
- the same budget for both: every run sees `sweep.images_seen` training images, `images_per_step`
  per optimiser step (SFT batch size = GRPO prompts per step; GRPO samples G completions of each
  image, which is the method, not more data), so both take images_seen / images_per_step steps;
- the same learning-rate search for both: every rate of `sweep.learning_rates` at k = `search_k`,
  on the first seed, scored on the validation split (never the held-out one); the best is used;
- every model (base included) is scored on the same held-out split by the same verifier (eval).

Every finished run appends one line to OUT/results.jsonl; a rerun skips those (resume), and the
table, plot and report are rebuilt from that file (report/sweep.py, report/build.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visual_rft.config import NO_THINK_INSTRUCTION, Config, ConfigError, load_config, to_dict
from visual_rft.data.fewshot import sample_k_shot, split_records
from visual_rft.data.record import Record
from visual_rft.data.sources import load_records
from visual_rft.demo import _evaluate, _final_model, _phase_config, digit_splits, tokenizer_corpus, warmup_config
from visual_rft.models.tiny import build_tiny_model
from visual_rft.report.build import write_report
from visual_rft.report.discover import SWEEP_RESULTS
from visual_rft.report.sweep import arm, write_tables
from visual_rft.rewards import task_rewards
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.runlog import cpu_model, read_jsonl
from visual_rft.sft import train_sft
from visual_rft.tasks import CLASS_KEY

METHODS = ("sft", "rft", "rft_nothink")  # rft_nothink: GRPO with task.thinking=off (No-Thinking RFT)


def load_sweep_config(path: str | Path | None, overrides: list[str] | None) -> Config:
    from visual_rft.demo import packaged_config

    cfg = load_config(path or packaged_config("sweep_shift.yaml"), overrides)
    s = cfg.sweep
    problems = []
    if not s.ks or any(k < 1 for k in s.ks):
        problems.append(f"sweep.ks must be positive examples-per-class counts, got {s.ks}")
    if not s.seeds:
        problems.append("sweep.seeds is empty")
    if s.images_per_step < 1 or s.images_seen < s.images_per_step or s.images_seen % s.images_per_step:
        problems.append(f"sweep.images_seen ({s.images_seen}) must be a positive multiple of "
                        f"sweep.images_per_step ({s.images_per_step})")
    if not s.learning_rates or any(lr <= 0 for lr in s.learning_rates):
        problems.append(f"sweep.learning_rates must be positive, got {s.learning_rates}")
    if len(s.learning_rates) > 1 and s.val_records < 1:
        problems.append("sweep.val_records must be >= 1 to search more than one learning rate")
    if not s.methods or len(set(s.methods)) != len(s.methods) or set(s.methods) - set(METHODS):
        problems.append(f"sweep.methods must be distinct names among {list(METHODS)}, got {s.methods}")
    if s.base_steps is not None and (not s.base_steps or any(n < 1 for n in s.base_steps)
                                     or len(set(s.base_steps)) != len(s.base_steps)):
        problems.append(f"sweep.base_steps must be distinct positive warm-up lengths, got {s.base_steps}")
    if s.base_steps is not None and s.base != "warmup":
        problems.append("sweep.base_steps needs sweep.base=warmup (a given model is one base)")
    if s.target != "demo" and not s.test_records:
        problems.append(f"sweep.target={s.target} needs sweep.test_records (how many held-out records to carve)")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def target_splits(cfg: Config) -> dict[str, list[Record]]:
    """pool / val / test of the target, and the warm-up records when the base is warmed up here."""
    s, label = cfg.sweep, CLASS_KEY[cfg.task.name]
    demo = digit_splits(cfg) if s.base == "warmup" or s.target == "demo" else {}
    if s.target == "demo":
        pool, test = demo["pool"], demo["test"][:s.test_records]
    else:
        records = load_records(s.target, task=cfg.task.name, image_root=cfg.data.image_root)
        cut = split_records(records, {"test": s.test_records, "pool": len(records) - s.test_records},
                            seed=cfg.demo.seed, stratify_key=label)
        pool, test = cut["pool"], cut["test"]
    cut = split_records(pool, {"val": s.val_records, "pool": len(pool) - s.val_records},
                        seed=cfg.demo.seed, stratify_key=label)
    return {"warmup": demo.get("warmup", []), "pool": cut["pool"], "val": cut["val"], "test": test}


def base_model(cfg: Config, warmup: list[Record], log: Any = print, steps: int | None = None) -> Path:
    """The base every run starts from; a warm-up base is trained once per setting and cached.
    `steps`: another warm-up length than demo.warmup_steps (sweep.base_steps)."""
    if cfg.sweep.base == "model":
        return Path(cfg.model.name_or_path)
    if steps is not None:
        cfg = copy.deepcopy(cfg)
        cfg.demo.warmup_steps = steps
    # the thread count too: CPU float reductions, and so the warm-up's weights, change with it
    decided_by = {"demo": to_dict(cfg.demo), "image_size": cfg.data.image_size, "task": to_dict(cfg.task),
                  "sft": to_dict(cfg.sft), "model": to_dict(cfg.model), "threads": torch.get_num_threads()}
    digest = hashlib.sha256(json.dumps(decided_by, sort_keys=True, default=str).encode()).hexdigest()[:12]
    home = Path(cfg.sweep.base_cache) / digest
    marker = home / "base.json"
    if marker.is_file():
        log(f"base: reusing {home} (cached warm-up)")
        return home / json.loads(marker.read_text())["model"]
    shutil.rmtree(home, ignore_errors=True)  # an unfinished warm-up is redone from scratch
    log(f"base: warming up into {home} ({cfg.demo.warmup_steps} SFT steps on {len(warmup)} records)")
    d = cfg.demo
    tiny = build_tiny_model(home / "tiny-model", seed=d.seed, image_size=cfg.data.image_size or 56,
                            corpus=tokenizer_corpus(cfg, warmup))
    warm = warmup_config(cfg, home / "base", tiny)
    warm.output.progress = False
    model = _final_model(train_sft(warm, warmup))
    # relative to the cache folder, so the cache can move or be read from another working directory
    marker.write_text(json.dumps({"model": str(model.relative_to(home)), "decided_by": decided_by}, indent=2,
                                 default=str))
    return model


def base_fingerprint(base: Path) -> str:
    """sha256 of the base's weight files (a hub id, which has no local files, stands for itself)."""
    if not base.is_dir():
        return f"id:{base}"
    digest = hashlib.sha256()
    for weights in sorted(base.glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()[:16]


def check_base(out: Path, base: Path, name: str = "base.json") -> None:
    """Refuse to add runs to a sweep whose finished runs started from other weights: a warm-up base
    rebuilt at another thread count or library version is another model, and mixing them would
    make one table of two experiments. `name`: the record of this base (one per sweep.base_steps)."""
    saved = out / name
    now = {"fingerprint": base_fingerprint(base), "path": str(base), "threads": torch.get_num_threads(),
           "cpu": cpu_model()}
    if saved.is_file():
        before = json.loads(saved.read_text())
        if before["fingerprint"] != now["fingerprint"]:
            raise ConfigError(
                f"{out}: its finished runs started from a base with weights {before['fingerprint']} "
                f"({before['path']}, {before['threads']} threads); this base is {now['fingerprint']} "
                f"({now['path']}, {now['threads']} threads). Resume with the same base (a warm-up base "
                "changes with OMP_NUM_THREADS and library versions) or use another --out")
        return
    saved.write_text(json.dumps(now, indent=2))


@dataclass
class Job:
    phase: str  # "base" (the base on held-out), "search" (on validation) or "grid" (on held-out)
    method: str  # base / sft / rft / rft_nothink
    k: int = 0
    seed: int = 0
    learning_rate: float = 0.0
    base_steps: int | None = None  # which base (sweep.base_steps); None: the one base

    @property
    def key(self) -> str:
        prefix = f"b{self.base_steps}/" if self.base_steps is not None else ""
        return f"{prefix}{self.phase}/{self.method}/k{self.k}/s{self.seed}/lr{self.learning_rate:g}"


def method_config(cfg: Config, method: str) -> Config:
    """The run's settings for `method`: rft_nothink is GRPO with task.thinking=off and the answer-only
    instruction, trained and scored that way; sft and rft keep the preset's (thinking on)."""
    if method != "rft_nothink":
        return cfg
    out = copy.deepcopy(cfg)
    out.task.thinking, out.task.instruction = "off", NO_THINK_INSTRUCTION
    return out


@dataclass
class Sweep:
    cfg: Config
    out: Path
    splits: dict[str, list[Record]]
    bases: dict[int | None, Path]  # by sweep.base_steps entry (None: the one base)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def run(self, job: Job, index: int, total: int) -> dict[str, Any]:
        if job.key in self.done:
            return self.done[job.key]
        began = time.perf_counter()
        run_dir = self.out / "runs" / job.key.replace("/", "-")
        shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off earlier starts over
        kshot = self.kshot(job.k, job.seed) if job.phase != "base" else []
        model = self.bases[job.base_steps] if job.phase == "base" else self.train(job, kshot, run_dir)
        trained = time.perf_counter()
        split = "val" if job.phase == "search" else "test"
        metrics = _evaluate(self.eval_config(job), model, self.splits[split], run_dir / "eval")
        for ckpt in run_dir.glob("checkpoint-*"):  # the weights are not needed once scored
            shutil.rmtree(ckpt)
        value = metrics[self.cfg.sweep.metric] if self.cfg.sweep.metric in metrics else None
        if value is None:
            raise ConfigError(f"sweep.metric={self.cfg.sweep.metric} is not in eval's metrics ({sorted(metrics)})")
        row = {"key": job.key, "phase": job.phase, "method": job.method, "k": job.k, "seed": job.seed,
               "learning_rate": job.learning_rate, "base_steps": job.base_steps, "steps": self.steps if job.phase != "base" else 0,
               "kshot_records": len(kshot), "eval_split": split, "eval_records": len(self.splits[split]),
               "metric": self.cfg.sweep.metric, "value": value,
               "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
               "seconds": {"train": round(trained - began, 1), "eval": round(time.perf_counter() - trained, 1)}}
        with open(self.out / SWEEP_RESULTS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        self.done[job.key] = row
        elapsed = time.perf_counter() - self.started
        base = f" base={job.base_steps}" if job.base_steps is not None else ""
        print(f"[{index}/{total}] {job.phase} {job.method}{base} k={job.k} seed={job.seed} lr={job.learning_rate:g}: "
              f"{row['metric']} {value:.3f} on {row['eval_records']} {split} "
              f"({time.perf_counter() - began:.0f} s; elapsed {elapsed / 60:.1f} min)", flush=True)
        return row

    @property
    def steps(self) -> int:
        return self.cfg.sweep.images_seen // self.cfg.sweep.images_per_step

    def kshot(self, k: int, seed: int) -> list[Record]:
        return sample_k_shot(self.splits["pool"], k, seed=seed, label_key=CLASS_KEY[self.cfg.task.name])

    def eval_config(self, job: Job) -> Config:
        """Scored with the settings it was trained with (rft_nothink: thinking off); the base as the preset."""
        cfg = _phase_config(method_config(self.cfg, job.method), self.out, self.bases[job.base_steps])
        cfg.output.progress = False
        return cfg

    def train(self, job: Job, records: list[Record], run_dir: Path) -> Path:
        """One SFT or RFT run from its base: `steps` steps of `images_per_step` images at the job's rate."""
        cfg = _phase_config(method_config(self.cfg, job.method), run_dir, self.bases[job.base_steps])
        cfg.output.progress = False
        per_step = self.cfg.sweep.images_per_step
        if job.method == "sft":
            s = cfg.sft
            s.max_steps, s.batch_size, s.grad_accum_steps, s.optim.learning_rate, s.seed = (
                self.steps, per_step, 1, job.learning_rate, job.seed)
            return _final_model(train_sft(cfg, records))
        g = cfg.grpo
        g.max_steps, g.per_device_batch_size, g.grad_accum_steps, g.optim.learning_rate, g.seed = (
            self.steps, per_step, 1, job.learning_rate, job.seed)
        rewards = task_rewards(cfg.task)
        return _final_model(GRPOTrainer(cfg, records, rewards).fit())


def _settings(cfg: Config) -> dict[str, Any]:
    """What decides a run's result: all but the grid's extent, so ks / seeds / methods / bases can grow
    on resume (each run's key names its method and base)."""
    tree = to_dict(cfg)
    for key in ("ks", "seeds", "base_cache", "methods", "base_steps"):
        tree["sweep"].pop(key)
    tree["output"] = {}
    if cfg.sweep.base == "warmup":  # the warm-up builds its own tiny model
        tree["model"].pop("name_or_path")
    return tree


def _open_out(cfg: Config, out: Path) -> dict[str, dict[str, Any]]:
    """Create OUT or check that it holds a sweep of the same settings; the finished runs by key."""
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(_settings(cfg), default=str))
    saved = out / "sweep.json"
    if saved.is_file():
        changed = _changed(json.loads(saved.read_text()), settings)
        if changed:
            raise ConfigError(f"{out} holds a sweep with other settings ({', '.join(changed)} differ); "
                              "use another --out or delete it")
    saved.write_text(json.dumps(settings, indent=2))
    done = {row["key"]: row for row in read_jsonl(out / SWEEP_RESULTS)} if (out / SWEEP_RESULTS).is_file() else {}
    _check_search_seed(cfg, out, done)
    return done


def _check_search_seed(cfg: Config, out: Path, done: dict[str, dict[str, Any]]) -> None:
    """The learning-rate search runs on the first of sweep.seeds; extending the seeds of some cells
    with a list of only the new ones would search again on another seed and mix two protocols in
    one table. Refuse it and say which seed to list first."""
    searched = {row["seed"] for row in done.values() if row["phase"] == "search"}
    if searched and cfg.sweep.seeds[0] not in searched:
        raise ConfigError(f"{out}: its learning-rate search ran on seed {sorted(searched)[0]}; list that seed "
                          f"first in sweep.seeds (got {cfg.sweep.seeds}): finished runs are skipped, so "
                          f"sweep.seeds={[sorted(searched)[0], *[x for x in cfg.sweep.seeds if x not in searched]]} "
                          "runs only the new seeds")


def _changed(before: dict[str, Any], now: dict[str, Any], where: str = "") -> list[str]:
    """Dotted keys whose values differ; keys only one side has are skipped, so a config field
    added by a later version of this package does not orphan a finished sweep."""
    out = []
    for key in before.keys() & now.keys():
        a, b, path = before[key], now[key], f"{where}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, path + ".")
        elif a != b:
            out.append(path)
    return sorted(out)


def base_list(cfg: Config) -> list[int | None]:
    return list(cfg.sweep.base_steps) if cfg.sweep.base_steps else [None]


def plan(cfg: Config, best: dict[str, float] | None) -> list[Job]:
    """Each base, the learning-rate search (per method and base), then the grid seed by seed (a
    cut-off sweep has whole seeds)."""
    s, bases = cfg.sweep, base_list(cfg)
    jobs = [Job("base", "base", base_steps=b) for b in bases]
    if len(s.learning_rates) > 1:
        jobs += [Job("search", m, s.search_k, s.seeds[0], lr, b) for b in bases for m in s.methods
                 for lr in s.learning_rates]
    lrs = best or {arm(m, b): s.learning_rates[0] for b in bases for m in s.methods}
    jobs += [Job("grid", m, k, seed, lrs[arm(m, b)], b) for seed in s.seeds for k in s.ks for b in bases
             for m in s.methods]
    return jobs


def best_rates(cfg: Config, done: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per method and base, the searched rate with the best validation metric (ties: the first listed)."""
    s, best = cfg.sweep, {}
    for b in base_list(cfg):
        for method in s.methods:
            if len(s.learning_rates) == 1:
                best[arm(method, b)] = s.learning_rates[0]
                continue
            scores = [done[Job("search", method, s.search_k, s.seeds[0], lr, b).key]["value"]
                      for lr in s.learning_rates]
            best[arm(method, b)] = s.learning_rates[scores.index(max(scores))]
    return best


def write_outputs(cfg: Config, out: Path, rows: list[dict[str, Any]], best: dict[str, float]) -> dict[str, str]:
    """The table, plot and report of the runs finished so far; the report is `visual-rft report OUT`'s page."""
    paths = write_tables(cfg, out, rows, best)
    report = write_report([out], out / "report.html", title="visual-rft sweep")
    return {**paths, "report": str(report), "results": str(out / SWEEP_RESULTS)}


def default_out(config_path: str | Path | None) -> Path:
    """runs/CONFIG_NAME, where a sweep writes without --out."""
    return Path(f"runs/{Path(config_path or 'sweep_shift').stem}")


def run_sweep(out_dir: str | Path | None = None, config_path: str | Path | None = None,
              overrides: list[str] | None = None, report_only: bool = False) -> dict[str, Any]:
    cfg = load_sweep_config(config_path, overrides)
    out = Path(out_dir or default_out(config_path))
    done = _open_out(cfg, out)
    if report_only:  # the table, plot and report of the runs finished so far (e.g. of a cut-off sweep)
        if not all(j.key in done for j in plan(cfg, None) if j.phase == "search"):
            raise ConfigError(f"{out}: the learning-rate search has not finished; nothing to tabulate yet")
        return write_outputs(cfg, out, list(done.values()), best_rates(cfg, done))
    splits = target_splits(cfg)
    bases = {b: base_model(cfg, splits["warmup"], steps=b) for b in base_list(cfg)}
    for b, path in bases.items():
        check_base(out, path, "base.json" if b is None else f"base-b{b}.json")
    sweep = Sweep(cfg, out, splits, bases, done)
    searched = all(j.key in done for j in plan(cfg, None) if j.phase == "search")
    planned = plan(cfg, best_rates(cfg, done) if searched else None)
    total, finished = len(planned), sum(job.key in done for job in planned)
    print(f"sweep: {total} runs ({finished} already finished in {out / SWEEP_RESULTS}); each trains "
          f"{sweep.steps} steps x {cfg.sweep.images_per_step} images; pool {len(splits['pool'])}, "
          f"validation {len(splits['val'])}, held-out {len(splits['test'])}", flush=True)
    search = [j for j in plan(cfg, None) if j.phase != "grid"]
    for index, job in enumerate(search, 1):
        sweep.run(job, index, total)
    best = best_rates(cfg, sweep.done)
    print(f"learning rates (best on validation at k={cfg.sweep.search_k}): {best}", flush=True)
    paths = write_outputs(cfg, out, list(sweep.done.values()), best)
    for index, job in enumerate(plan(cfg, best)[len(search):], len(search) + 1):
        if job.key not in sweep.done:  # the table is current after every run: a cut-off sweep still has one
            sweep.run(job, index, total)
            paths = write_outputs(cfg, out, list(sweep.done.values()), best)
    print(Path(paths["table_md"]).read_text(), flush=True)
    print(f"wall time {(time.perf_counter() - sweep.started) / 60:.1f} min; report: {paths['report']}")
    return paths
