"""`visual-rft` command line: parse, load the config, call one function per command."""

from __future__ import annotations

import argparse
import json
import os
import sys

from visual_rft.config import ConfigError, load_config
from visual_rft.tasks import CLASS_KEY


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (configs/...); omit to use defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.beta=0 model.name_or_path=DIR")


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # `visual-rft train grpo.beta=0` (no file) reads the first override as the config path otherwise.
    if args.config and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, args.overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visual-rft", description="Visual reinforcement fine-tuning (GRPO).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="GRPO fine-tuning with verifiable rewards")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")

    p = sub.add_parser("sft", help="supervised baseline on the same data")
    _config_args(p)

    p = sub.add_parser("eval", help="evaluate a model with the task's verifier")
    _config_args(p)
    p.add_argument("--model", help="model directory (default: model.name_or_path)")
    p.add_argument("--out", help="output directory (default: output.dir)")

    p = sub.add_parser("score", help="score saved completions (JSONL with completion + solution)")
    p.add_argument("--task", default="classification", choices=["classification", "detection", "grounding"])
    p.add_argument("--mode", default="strict", choices=["strict", "visual_rft"])
    p.add_argument("input")
    p.add_argument("output")

    p = sub.add_parser("tiny-model", help="build the embedded tiny Qwen2-VL into DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("fewshot", help="write a seeded k-shot split")
    q.add_argument("source", help="dataset path or embedded:mnist")
    q.add_argument("out", help="output directory (data.jsonl + images/)")
    q.add_argument("--k", type=int, required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--task", choices=sorted(CLASS_KEY), default="classification",
                   help="what a class is: the label (classification) or the queried category (detection)")
    q.add_argument("--label-key", default=None, help="record field that names the class (overrides --task)")
    q = data_sub.add_parser("check", help="check every record of the configured splits (exit 1 if any is bad)")
    _config_args(q)

    p = sub.add_parser("report", help="self-contained HTML report of training / eval / demo runs")
    p.add_argument("runs", nargs="+", help="run directories (several: compared side by side)")
    p.add_argument("--out", help="HTML file (default: RUNS[0]/report.html)")

    p = sub.add_parser("demo", help="tiny model + real digits: base vs SFT vs Visual-RFT")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=None, help="demo config (default: the packaged configs/demo.yaml values)")
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("sweep", help="data efficiency: SFT vs Visual-RFT over k-shot sizes x seeds, one base")
    _config_args(p)
    p.add_argument("--out", default=None, help="output directory (default: runs/CONFIG_NAME); rerun to resume")
    p.add_argument("--report-only", action="store_true", help="only rebuild table, plot and report from results.jsonl")
    return parser


def run(args: argparse.Namespace) -> object:
    if args.command in ("train", "sft", "eval"):
        path, overrides = _split_config(args)
        cfg = load_config(path, overrides)
        if args.command == "train":
            from visual_rft.rl.trainer import train_grpo
            return {"output": str(train_grpo(cfg, resume=args.resume))}
        if args.command == "sft":
            from visual_rft.sft import train_sft
            return {"output": str(train_sft(cfg))}
        from visual_rft.evaluate import run_eval
        return run_eval(cfg, args.model, args.out)
    if args.command == "score":
        from visual_rft.score import score_file
        return score_file(args.input, args.output, args.task, args.mode)
    if args.command == "tiny-model":
        from visual_rft.models import build_tiny_model
        return {"model": str(build_tiny_model(args.dir, seed=args.seed))}
    if args.command == "data" and args.data_command == "check":
        from visual_rft.runtime import check_data
        path, overrides = _split_config(args)
        return check_data(load_config(path, overrides))
    if args.command == "data":
        from visual_rft.data.fewshot import fewshot_command
        return fewshot_command(args.source, args.out, args.k, args.seed, args.label_key or CLASS_KEY[args.task])
    if args.command == "report":
        from visual_rft.report import report_command
        return report_command(args.runs, args.out)
    if args.command == "demo":
        from visual_rft.demo import run_demo
        return run_demo(args.out, config_path=args.config, overrides=args.overrides)
    if args.command == "sweep":
        from visual_rft.sweep import run_sweep
        path, overrides = _split_config(args)
        return run_sweep(args.out, config_path=path, overrides=overrides, report_only=args.report_only)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"visual-rft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None and os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(json.dumps(result, indent=2, default=str))
    if args.command == "data" and args.data_command == "check":
        return 1 if any(split["bad"] for split in result.values()) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
