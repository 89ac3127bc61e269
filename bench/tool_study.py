"""What a tiny model learns with image tools (issue 29), over seeds: the README's "Thinking with images" table.

    python bench/tool_study.py --out runs/tool_study                 # 3 seeds, ~25 min a seed on one thread
    python bench/tool_study.py --out runs/tool_study --seeds 0 --quick   # the pipeline in ~3 minutes

The task: MNIST digits turned by 0, 90, 180 or 270 degrees (`embedded:mnist_rotated`, angles 0..270, so
whether to call is itself a decision); the tiny Qwen2-VL sees each digit at 56 x 56. Per seed, from one
tiny model (its tokenizer trained with the tool listing and the calls, so a call is ~30 tokens, not 64):

    base     SFT on upright digits, direct answers (the demo's warm-up: the model learns to read digits)
    direct   base -> SFT on rotated digits, direct answers (tools off) -> eval without tools
                  -> GRPO without tools -> eval
    tools    base -> SFT on tool trajectories (a rotate call that sets the digit upright, then the answer;
                  none for upright digits) -> eval with tools -> GRPO with tools -> eval with tools

Both arms see the same records, steps, batch sizes and learning rates; the warm-up, training and held-out
digits are disjoint. Everything runs through the command line (`visual-rft sft / train / eval`), one
process at a time, one thread. Writes OUT/results.jsonl (one row per seed x arm x stage), OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tools_digits.yaml"
ANGLES = (0, 90, 180, 270)


def tokenizer_corpus(cfg_overrides: list[str]) -> list[str]:
    """The tool listing, the question and every call the trajectories write, weighted so BPE merges them."""
    from visual_rft.config import load_config
    from visual_rft.tools.registry import select_tools, tools_prompt

    cfg = load_config(CONFIG, cfg_overrides)
    listing = tools_prompt(select_tools(cfg.tools.names), "qwen2vl")
    calls = [f'<think>{cfg.tools.think}</think><tool_call>\n{{"name": "rotate", "arguments": {{"angle": {a}}}}}'
             "\n</tool_call>" for a in ANGLES[1:]]
    return [listing] * 4 + calls * 8 + [cfg.task.question, cfg.task.instruction, cfg.sft.think]


def write_splits(out: Path, seed: int, sizes: dict[str, int]) -> dict[str, Path]:
    """Disjoint splits of the 5,000 digits (shuffled by `seed`): `warmup` upright, `train` and `test`
    rotated by a seeded choice of ANGLES."""
    from visual_rft.data.fewshot import write_split
    from visual_rft.data.tool_digits import rotated_digit_records

    turned, upright = rotated_digit_records(seed=seed, angles=ANGLES), rotated_digit_records(seed=seed, angles=(0,))
    order = list(range(len(turned)))
    random.Random(seed).shuffle(order)
    paths, start = {}, 0
    for name, size in sizes.items():
        part = [(upright if name == "warmup" else turned)[i] for i in order[start:start + size]]
        start += size
        folder = out / f"data-{name}"
        paths[name] = folder / "data.jsonl" if (folder / "data.jsonl").exists() else write_split(
            part, folder, meta={"seed": seed, "angles": [0] if name == "warmup" else list(ANGLES)})
    return paths


def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-m", "visual_rft.cli", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"visual-rft {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def _trained(run: Path) -> bool:
    return any(run.glob("checkpoint-*/model"))


def run_seed(out: Path, seed: int, quick: bool, warmup_steps: int = 300) -> list[dict]:
    from visual_rft.models.tiny import build_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    sizes = {"warmup": 64, "train": 64, "test": 40} if quick else {"warmup": 3000, "train": 1500, "test": 500}
    splits = write_splits(out, seed, sizes)
    model = out / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, seed=seed, vocab_size=1024, corpus=tokenizer_corpus([]))
    steps = ["sft.max_steps=4", "grpo.max_steps=2", "eval.batch_size=20"] if quick else []
    common = [f"data.train={splits['train']}", f"data.eval={splits['test']}", "data.limit=null",
              f"sft.seed={seed}", f"grpo.seed={seed}", "output.progress=false", "eval.steps=-1", *steps]
    base = out / "base"
    if not _trained(base):  # the demo's warm-up: reading upright digits, one turn
        cli("sft", str(CONFIG), f"model.name_or_path={model}", f"output.dir={base}", *common,
            f"data.train={splits['warmup']}", "tools.enabled=false", "sft.batch_size=32", "sft.optim.learning_rate=1e-3",
            "sft.max_steps=4" if quick else f"sft.max_steps={warmup_steps}")
    rows = [evaluate(out, "base", "warm-up", base, [*common, "tools.enabled=false"], seed)]
    for arm, tools in (("direct", "false"), ("tools", "true")):
        arm_args = [*common, f"tools.enabled={tools}"]
        sft_dir, rl_dir = out / f"{arm}-sft", out / f"{arm}-grpo"
        if not _trained(sft_dir):
            cli("sft", str(CONFIG), f"model.name_or_path={base}", f"output.dir={sft_dir}", *arm_args)
        if not _trained(rl_dir):
            cli("train", str(CONFIG), f"model.name_or_path={sft_dir}", f"output.dir={rl_dir}", *arm_args)
        rows += [evaluate(out, arm, stage, run, arm_args, seed) for stage, run in (("sft", sft_dir),
                                                                                 ("sft+grpo", rl_dir))]
    return rows


def _turned_by(turns: list[dict]) -> int:
    """The total rotation the conversation's calls that ran applied to the digit (degrees, mod 360)."""
    calls = [t["call"] for t in turns if t.get("call") and t.get("error") is None and t.get("result") is not None]
    return sum(c["arguments"]["angle"] for c in calls if c["name"] == "rotate") % 360


def evaluate(out: Path, arm: str, stage: str, run: Path, args: list[str], seed: int) -> dict:
    """`visual-rft eval` of a run on the held-out digits (once), with the accuracy per rotation."""
    evaluated = out / f"eval-{arm}-{stage.replace('+', '-')}"
    if not (evaluated / "metrics.json").exists():
        cli("eval", str(CONFIG), f"model.name_or_path={run}", f"output.dir={evaluated}", *args)
    metrics = json.loads((evaluated / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (evaluated / "predictions.jsonl").read_text().splitlines()]
    split = out / "data-test" / "data.jsonl"  # predictions come in the split's order; its rows keep `rotation`
    truth = [json.loads(line) for line in split.read_text().splitlines()]
    for angle in ANGLES:
        hits = [p["accuracy"] for p, row in zip(predictions, truth) if row["rotation"] == angle]
        metrics[f"accuracy_rot{angle}"] = statistics.fmean(hits) if hits else None
    if all("turns" in p for p in predictions):  # tools: did the image end upright (no call = angle 0)?
        metrics["upright_rate"] = statistics.fmean(float(_turned_by(p["turns"]) == row["undo"])
                                                   for p, row in zip(predictions, truth))
    print(f"seed {seed} {arm:6s} {stage:8s} accuracy {metrics['accuracy']:.3f} "
          f"call rate {metrics.get('tool/call_rate', 0.0):.3f}", flush=True)
    return {"seed": seed, "arm": arm, "stage": stage, **metrics}


def _interval(values: list[float | None]) -> str:
    from visual_rft.report.stats import mean_interval

    values = [v for v in values if v is not None]  # e.g. accuracy with a call where nothing called
    if not values:
        return "-"
    mean = statistics.fmean(values)
    est = mean_interval(mean, statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
    return f"{mean:.3f}" if est["low"] is None else f"{mean:.3f} [{est['low']:.3f}, {est['high']:.3f}]"


def table(rows: list[dict]) -> str:
    """Mean [95% CI] over seeds per arm and stage, and the tools - direct gap paired by seed."""
    from visual_rft.report.stats import paired_gap

    keys = ("accuracy", *(f"accuracy_rot{a}" for a in ANGLES), "format_rate", "tool/call_rate", "tool/calls_mean",
            "tool/call_error_rate", "upright_rate", "tool/accuracy_with_call", "tool/accuracy_without_call")
    lines = [f"n = {len({r['seed'] for r in rows})} seeds; mean [95% CI]", "",
             "| arm | stage | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for arm, stage in (("base", "warm-up"), ("direct", "sft"), ("direct", "sft+grpo"), ("tools", "sft"),
                       ("tools", "sft+grpo")):
        cells = [r for r in rows if r["arm"] == arm and r["stage"] == stage]
        if cells:
            lines.append(f"| {arm} | {stage} | " + " | ".join(
                _interval([r.get(k) for r in cells]) for k in keys) + " |")
    lines.append("")
    for stage in ("sft", "sft+grpo"):
        pairs = {(r["seed"], r["arm"]): r["accuracy"] for r in rows if r["stage"] == stage}
        seeds = sorted({s for s, _ in pairs if (s, "direct") in pairs and (s, "tools") in pairs})
        if seeds:
            gap = paired_gap([pairs[(s, "direct")] for s in seeds], [pairs[(s, "tools")] for s in seeds])
            interval = "" if gap["low"] is None else f" [{gap['low']:+.3f}, {gap['high']:+.3f}], p={gap['p']:.3f}"
            lines.append(f"- accuracy, tools - direct after {stage}: {gap['gap']:+.3f}{interval} (paired, n={gap['n']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "tool_study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a few steps and records: checks the pipeline")
    parser.add_argument("--warmup-steps", type=int, default=300,
                        help="steps of the base's warm-up on upright digits (batch 32; the demo's 300 by default)")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        rows += run_seed(args.out / f"seed{seed}", seed, args.quick, args.warmup_steps)
        with open(args.out / "results.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    (args.out / "table.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
