"""`visual-rft demo`: the whole Visual-RFT story on a 2-core CPU in a few minutes.

tiny Qwen2-VL (random init) -> supervised warm-up on real digits (the "base": it follows the answer
format and recognises some digits) -> from that same base, SFT and Visual-RFT (GRPO) on the same
k-shot split -> base / SFT / RFT accuracy on held-out digits, a table, a plot and results.json.
"""

from __future__ import annotations

import copy
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from visual_rft.checkpoint import latest_checkpoint
from visual_rft.config import Config, load_config
from visual_rft.data.embedded import mnist_records
from visual_rft.data.fewshot import sample_k_shot, split_records, write_split
from visual_rft.data.record import Record
from visual_rft.evaluate import evaluate_model
from visual_rft.models import build_tiny_model
from visual_rft.report import write_report
from visual_rft.rewards import resolve_rewards
from visual_rft.rl.trainer import GRPOTrainer
from visual_rft.runlog import read_jsonl
from visual_rft.runtime import load_policy, make_accelerator
from visual_rft.sft import train_sft


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("visual_rft") / "configs" / name))


def prepare_data(cfg: Config, out: Path) -> dict[str, list[Record]]:
    """Stratified warm-up / pool / test split of the embedded digits, and the k-shot sample of the pool."""
    d = cfg.demo
    total = d.warmup_records + d.pool_records + d.test_records
    records = mnist_records(limit=total, size=cfg.data.image_size)
    splits = split_records(records, {"warmup": d.warmup_records, "pool": d.pool_records, "test": d.test_records},
                           seed=d.seed, stratify_key="label")
    splits["kshot"] = sample_k_shot(splits.pop("pool"), d.k, seed=d.seed)
    for name, split in splits.items():  # written out so every phase can be re-run from the CLI
        write_split(split, out / "data" / name)
    return splits


def _phase_config(cfg: Config, out: Path, model: Path | str, **sft: Any) -> Config:
    phase = copy.deepcopy(cfg)
    phase.model.name_or_path = str(model)
    phase.output.dir = str(out)
    for key, value in sft.items():
        setattr(phase.sft, key, value)
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


def run_demo(out_dir: str | Path = "runs/demo", config_path: str | Path | None = None,
             overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(config_path or packaged_config("demo.yaml"), overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    corpus = [cfg.task.question, cfg.task.instruction, cfg.sft.think]
    tiny = build_tiny_model(out / "tiny-model", seed=cfg.demo.seed, image_size=cfg.data.image_size or 56,
                            corpus=corpus)
    splits = prepare_data(cfg, out)
    cfg.data.train, cfg.data.eval = str(out / "data/kshot/data.jsonl"), str(out / "data/test/data.jsonl")
    lap("setup")

    d = cfg.demo
    warmup = _phase_config(cfg, out / "base", tiny, max_steps=d.warmup_steps, batch_size=d.warmup_batch_size,
                           learning_rate=d.warmup_learning_rate)
    base = _final_model(train_sft(warmup, splits["warmup"]))
    lap("warmup")
    sft = _final_model(train_sft(_phase_config(cfg, out / "sft", base), splits["kshot"]))
    lap("sft")
    rft_cfg = _phase_config(cfg, out / "rft", base)
    rewards = resolve_rewards(cfg.task.name, cfg.task.rewards, cfg.task.mode, cfg.task.reward_weights)
    rft = _final_model(GRPOTrainer(rft_cfg, splits["kshot"], rewards).fit())
    lap("rft")
    results = {name: _evaluate(cfg, path, splits["test"], out / "eval" / name)
               for name, path in (("base", base), ("sft", sft), ("rft", rft))}
    lap("eval")
    summary = _summary(cfg, results, timings, out)
    plot_path = plot_demo(out)
    summary["plot"] = str(plot_path)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    report = write_report([out])  # the report recognises a demo by its results.json
    print(format_table(summary))
    print(f"report: {report}")
    return {"results": str(out / "results.json"), "plot": str(plot_path), "report": str(report)}


def _summary(cfg: Config, results: dict[str, dict[str, Any]], timings: dict[str, float], out: Path) -> dict[str, Any]:
    rows = {name: {"accuracy": m["accuracy"], "format_rate": m["format_rate"],
                   "parse_failure_rate": m["parse_failure_rate"]} for name, m in results.items()}
    return {"test_records": cfg.demo.test_records, "k_shot": cfg.demo.k, "kshot_records": cfg.demo.k * 10,
            "seed": cfg.demo.seed, "models": rows, "seconds": timings, "out": str(out)}


def format_table(summary: dict[str, Any]) -> str:
    lines = [f"held-out digits: {summary['test_records']}   k-shot: {summary['k_shot']} per class "
             f"({summary['kshot_records']} images)   seed {summary['seed']}",
             f"{'model':<6} {'accuracy':>9} {'format':>8} {'unparsed':>9}"]
    for name, row in summary["models"].items():
        lines.append(f"{name:<6} {row['accuracy']:>9.3f} {row['format_rate']:>8.3f} {row['parse_failure_rate']:>9.3f}")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    lines.append(f"plot: {summary['plot']}")
    return "\n".join(lines)


def plot_demo(out: Path) -> Path:
    """Training curves of the RFT run (reward components) and SFT loss, and held-out accuracy bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rft = read_jsonl(out / "rft" / "metrics.jsonl")
    sft = read_jsonl(out / "sft" / "metrics.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in rft]
    for key, label in (("reward/accuracy_mean", "accuracy reward"), ("reward/format_mean", "format reward")):
        axes[0].plot(steps, _smooth([r[key] for r in rft]), label=label)
    axes[0].set(title="Visual-RFT: training reward (k-shot, smoothed)", xlabel="step", ylim=(0, 1.05))
    axes[0].legend()
    axes[1].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[1].set(title="SFT: training loss (k-shot)", xlabel="step")
    names = ["base", "sft", "rft"]
    accs = [json.loads((out / "eval" / n / "metrics.json").read_text())["accuracy"] for n in names]
    bars = axes[2].bar(names, accs, color=["grey", "tab:blue", "tab:orange"])
    axes[2].bar_label(bars, fmt="%.3f")
    axes[2].set(title="held-out accuracy", ylim=(0, 1))
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]
