"""`visual-rft demo`: the whole Visual-RFT story on a 2-core CPU in a few minutes.

tiny Qwen2-VL (random init) -> supervised warm-up (the "base": it follows the answer format and
gets some answers right) -> from that same base, SFT and Visual-RFT (GRPO) on the same k-shot split
-> base / SFT / RFT on held-out data, a table, a plot, results.json and report.html.

Two datasets behind `demo.dataset`, one pipeline: `mnist` (real digits, classification, accuracy)
and `trees` (the deepforest aerial tree tiles, detection, COCO mAP / AP50 and the IoU reward).
"""

from __future__ import annotations

import copy
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from visual_rft.checkpoint import latest_checkpoint
from visual_rft.config import Config, ConfigError, load_config
from visual_rft.data.embedded import mnist_records
from visual_rft.data.fewshot import sample_k_shot, split_records, write_split
from visual_rft.data.record import Record
from visual_rft.engine import make_accelerator
from visual_rft.evaluate import evaluate_model
from visual_rft.models.tiny import build_tiny_model
from visual_rft.report.build import write_report
from visual_rft.report.plots import moving_average
from visual_rft.rewards import task_rewards
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.runlog import cpu_model, read_jsonl
from visual_rft.runtime import load_policy, load_split
from visual_rft.sft import sft_target, train_sft
from visual_rft.tasks import CLASS_KEY
from visual_rft.tasks.prompts import build_prompt

# Per dataset: the task it needs, what a held-out item and a k-shot unit are called, the held-out
# metrics that go into results.json (the digits' keys are kept as they were), the table's columns
# (title, metric) and the metrics drawn as bars.
DATASETS = {
    "mnist": {"task": "classification", "items": "digits", "k_unit": "per class",
              "metrics": ("accuracy", "format_rate", "parse_failure_rate"),
              "columns": (("accuracy", "accuracy"), ("format", "format_rate"), ("unparsed", "parse_failure_rate")),
              "bars": ("accuracy",)},
    "trees": {"task": "detection", "items": "tree tiles", "k_unit": "tiles",
              "metrics": ("mAP", "AP50", "AP75", "iou", "confidence", "format_rate", "parse_failure_rate"),
              "columns": (("mAP", "mAP"), ("AP50", "AP50"), ("iou rwd", "iou"), ("format", "format_rate"),
                          ("unparsed", "parse_failure_rate")),
              "bars": ("mAP", "AP50")},
}


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("visual_rft") / "configs" / name))


def prepare_data(cfg: Config, out: Path) -> dict[str, list[Record]]:
    """Warm-up / k-shot / test splits of the configured dataset, written out so every phase can be
    re-run from the CLI (`visual-rft sft|train|eval data.train=OUT/data/kshot/data.jsonl ...`)."""
    splits = _tree_splits(cfg) if cfg.demo.dataset == "trees" else _digit_splits(cfg)
    for name, split in splits.items():
        write_split(split, out / "data" / name)
    return splits


def digit_splits(cfg: Config) -> dict[str, list[Record]]:
    """Stratified warm-up / pool / test split of the embedded digits (the demo's and the sweep's)."""
    d = cfg.demo
    total = d.warmup_records + d.pool_records + d.test_records
    records = mnist_records(limit=total, size=cfg.data.image_size)
    return split_records(records, {"warmup": d.warmup_records, "pool": d.pool_records, "test": d.test_records},
                         seed=d.seed, stratify_key="label")


def _digit_splits(cfg: Config) -> dict[str, list[Record]]:
    """The demo's digit splits with the pool replaced by its k-shot sample."""
    splits = digit_splits(cfg)
    splits["kshot"] = sample_k_shot(splits.pop("pool"), cfg.demo.k, seed=cfg.demo.seed)
    return splits


def _tree_splits(cfg: Config) -> dict[str, list[Record]]:
    """data.train tiles -> warm-up + pool (stratified by photo, disjoint), k tiles of the pool -> k-shot;
    the first test_records tiles of data.eval are held out (the tiles of one photo never cross the two)."""
    d = cfg.demo
    train, test = load_split(cfg, "train"), load_split(cfg, "eval")
    splits = split_records(train, {"warmup": d.warmup_records, "pool": d.pool_records}, seed=d.seed,
                           stratify_key="photo")
    pool = splits.pop("pool") or splits["warmup"]
    splits["kshot"] = sample_k_shot(pool, d.k, seed=d.seed, label_key=CLASS_KEY[cfg.task.name])
    splits["test"] = test[:d.test_records]
    return splits


def tokenizer_corpus(cfg: Config, records: list[Record]) -> list[str]:
    """What the tiny tokenizer's BPE learns from: the prompt texts and, for long structured answers
    (detection's JSON boxes), whole prompts + SFT targets of the first demo.corpus_records records,
    so that `'Position': [` is one token, not ten, and completions fit max_completion_length."""
    corpus = [cfg.task.question, cfg.task.instruction, cfg.sft.think]
    for record in records[:cfg.demo.corpus_records]:
        corpus += [build_prompt(record, cfg.task), sft_target(record, cfg.sft.think, cfg.task.thinking)]
    return corpus


def _phase_config(cfg: Config, out: Path, model: Path | str) -> Config:
    phase = copy.deepcopy(cfg)
    phase.model.name_or_path = str(model)
    phase.output.dir = str(out)
    return phase


def warmup_config(cfg: Config, out: Path, model: Path | str) -> Config:
    """The warm-up phase: SFT at the demo section's steps, batch size and learning rate."""
    phase = _phase_config(cfg, out, model)
    d = phase.demo
    phase.sft.max_steps, phase.sft.batch_size, phase.sft.optim.learning_rate = (
        d.warmup_steps, d.warmup_batch_size, d.warmup_learning_rate)
    return phase


def _final_model(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RuntimeError(f"{run_dir} has no checkpoint")
    return ckpt / "model"


def _evaluate(cfg: Config, model_dir: Path, records: list[Record], out: Path) -> dict[str, Any]:
    accelerator = make_accelerator(cfg)
    model, processor = load_policy(cfg, accelerator.device, model_dir)
    return evaluate_model(model, processor, records, cfg, accelerator.device, out, progress=cfg.output.progress)


def load_demo_config(config_path: str | Path | None, overrides: list[str] | None) -> Config:
    cfg = load_config(config_path or packaged_config("demo.yaml"), overrides)
    wanted = DATASETS[cfg.demo.dataset]["task"]
    if cfg.task.name != wanted:
        raise ConfigError(f"demo.dataset={cfg.demo.dataset} is a {wanted} dataset but task.name={cfg.task.name}")
    return cfg


def run_demo(out_dir: str | Path = "runs/demo", config_path: str | Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = load_demo_config(config_path, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    splits = prepare_data(cfg, out)
    tiny = build_tiny_model(out / "tiny-model", seed=cfg.demo.seed, image_size=cfg.data.image_size or 56,
                            corpus=tokenizer_corpus(cfg, splits["warmup"]))
    cfg.data.train, cfg.data.eval = str(out / "data/kshot/data.jsonl"), str(out / "data/test/data.jsonl")
    lap("setup")

    base = _final_model(train_sft(warmup_config(cfg, out / "base", tiny), splits["warmup"]))
    lap("warmup")
    sft = _final_model(train_sft(_phase_config(cfg, out / "sft", base), splits["kshot"]))
    lap("sft")
    rft_cfg = _phase_config(cfg, out / "rft", base)
    rewards = task_rewards(cfg.task)
    rft = _final_model(GRPOTrainer(rft_cfg, splits["kshot"], rewards).fit())
    lap("rft")
    results = {name: _evaluate(cfg, path, splits["test"], out / "eval" / name)
               for name, path in (("base", base), ("sft", sft), ("rft", rft))}
    lap("eval")
    summary = _summary(cfg, splits, results, timings, out)
    plot_path = plot_demo(out, cfg)
    summary["plot"] = str(plot_path)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    report = write_report([out])  # the report recognises a demo by its results.json
    print(format_table(summary))
    print(f"report: {report}")
    return {"results": str(out / "results.json"), "plot": str(plot_path), "report": str(report)}


def _summary(cfg: Config, splits: dict[str, list[Record]], results: dict[str, dict[str, Any]],
             timings: dict[str, float], out: Path) -> dict[str, Any]:
    keys = DATASETS[cfg.demo.dataset]["metrics"]
    rows = {name: {k: m[k] for k in keys if k in m} for name, m in results.items()}
    summary = {"test_records": len(splits["test"]), "k_shot": cfg.demo.k, "kshot_records": len(splits["kshot"]),
               "seed": cfg.demo.seed, "models": rows, "seconds": timings, "out": str(out),
               # float reductions differ by CPU model and thread count: the same seed gives another table
               "cpu": cpu_model(), "threads": torch.get_num_threads()}
    if cfg.demo.dataset != "mnist":  # the digits' results.json keeps exactly its original keys
        summary.update(dataset=cfg.demo.dataset, warmup_records=len(splits["warmup"]),
                       rft_reward=_reward_trend(out / "rft" / "metrics.jsonl", cfg.task.rewards))
    return summary


def _reward_trend(path: Path, names: list[str], window: int = 10) -> dict[str, dict[str, float]]:
    """Mean training reward of the first and last `window` GRPO steps, per component: did it rise?"""
    rows = read_jsonl(path)
    trend = {}
    for name in names:
        values = [r[f"reward/{name}_mean"] for r in rows if f"reward/{name}_mean" in r]
        if values:
            head, tail = values[:window], values[-window:]
            trend[name] = {"first": round(sum(head) / len(head), 4), "last": round(sum(tail) / len(tail), 4)}
    return trend


def format_table(summary: dict[str, Any]) -> str:
    spec = DATASETS[summary.get("dataset", "mnist")]
    lines = [f"held-out {spec['items']}: {summary['test_records']}   k-shot: {summary['k_shot']} {spec['k_unit']} "
             f"({summary['kshot_records']} images)   one seed ({summary['seed']})"]
    if summary.get("cpu"):
        lines.append(f"measured on {summary['cpu']}, {summary['threads']} thread(s); another CPU model or thread "
                     "count gives another table (make sweep: seeds x k)")
    columns = spec["columns"]
    lines.append(f"{'model':<6}" + "".join(f" {title:>9}" for title, _ in columns))
    for name, row in summary["models"].items():
        lines.append(f"{name:<6}" + "".join(f" {row[key]:>9.3f}" for _, key in columns))
    for name, trend in summary.get("rft_reward", {}).items():
        lines.append(f"RFT training {name} reward: {trend['first']:.3f} (first steps) -> {trend['last']:.3f} (last)")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    lines.append(f"plot: {summary['plot']}")
    return "\n".join(lines)


def plot_demo(out: Path, cfg: Config) -> Path:
    """RFT training reward per component, SFT training loss, and the held-out headline metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rft = read_jsonl(out / "rft" / "metrics.jsonl")
    sft = read_jsonl(out / "sft" / "metrics.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in rft]
    for name in cfg.task.rewards:
        if f"reward/{name}_mean" in (rft[0] if rft else {}):
            axes[0].plot(steps, moving_average([r[f"reward/{name}_mean"] for r in rft], 10), label=f"{name} reward")
    axes[0].set(title="Visual-RFT: training reward (k-shot, smoothed)", xlabel="step", ylim=(0, 1.05))
    axes[0].legend()
    axes[1].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[1].set(title="SFT: training loss (k-shot)", xlabel="step")
    _metric_bars(axes[2], out, DATASETS[cfg.demo.dataset]["bars"])
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _metric_bars(ax: Any, out: Path, keys: tuple[str, ...]) -> None:
    """Grouped bars: one group per model, one bar per held-out metric."""
    names, colors = ["base", "sft", "rft"], ["grey", "tab:blue", "tab:orange"]
    metrics = [json.loads((out / "eval" / n / "metrics.json").read_text()) for n in names]
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, [m.get(key, 0.0) for m in metrics], width, color=colors, alpha=1 - 0.35 * j,
                      label=key if len(keys) > 1 else None)
        ax.bar_label(bars, fmt=f"{key + ' ' if len(keys) > 1 else ''}%.3f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set(title="held-out " + " / ".join(keys), ylim=(0, 1))
