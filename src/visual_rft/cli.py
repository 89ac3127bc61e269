"""`visual-rft` command line: parse, load the config, call one function per command."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from visual_rft import __version__
from visual_rft.config import ConfigError, load_config
from visual_rft.tasks import CLASS_KEY


class BadData(Exception):
    """`data check` found data it cannot read at all (exit 1, like records that fail the check)."""


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
    parser.add_argument("--version", action="version", version=f"visual-rft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="GRPO fine-tuning with verifiable rewards")
    _config_args(p)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in output.dir (an error if there is none)")
    resume.add_argument("--resume-if-present", action="store_true",
                        help="resume when output.dir has a checkpoint, else start from scratch (for job scripts)")
    resume.add_argument("--resume-with-changes", action="store_true",
                        help="--resume, accepting settings that differ from the run's own (each change is "
                             "recorded in output.dir/resume_changes.jsonl); without it such a resume stops")
    resume.add_argument("--overwrite", action="store_true",
                        help="start a new run in an output.dir that holds one, removing its checkpoints and logs")

    p = sub.add_parser("sft", help="supervised baseline on the same data")
    _config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output.dir that holds a run, removing its checkpoints and logs")

    p = sub.add_parser("eval", help="evaluate a model with the task's verifier")
    _config_args(p)
    p.add_argument("--model", help="a run directory (its latest checkpoint), checkpoint-N[/model] (LoRA adapters load "
                                    "over the base they were trained on), an export or a hub id "
                                    "(default: model.name_or_path)")
    p.add_argument("--out", help="output directory for metrics.json and predictions.jsonl (default: output.dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in that directory")

    p = sub.add_parser("score", help="score saved completions (JSONL with completion + solution)")
    p.add_argument("--task", default="classification", choices=["classification", "detection", "grounding"],
                   help="which task's rewards score the rows (default: classification)")
    p.add_argument("--mode", default="strict", choices=["strict", "visual_rft"],
                   help="reward semantics: strict (default) or visual_rft (the original release's, quirks included)")
    p.add_argument("--thinking", default="on", choices=["on", "off"],
                   help="on (default): <think>…</think><answer>…</answer>; off: the answer block alone (task.thinking)")
    p.add_argument("input", help="JSONL, one object per line with `completion` and `solution` (+ any columns)")
    p.add_argument("output", help="where to write the rows with one field per reward added")

    p = sub.add_parser("tiny-model", help="build the embedded tiny Qwen2-VL (or another family) into DIR")
    p.add_argument("dir", help="new model directory (config.json, weights, processor)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--arch", default="qwen2_vl", help="qwen2_vl (default), qwen2_5_vl, qwen3_vl, qwen3_5, "
                   "internvl, gemma3, smolvlm, llava_onevision or glm4v")

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("fewshot", help="write a seeded k-shot split")
    q.add_argument("source", help="dataset path or embedded:mnist")
    q.add_argument("out", help="output directory (data.jsonl + images/)")
    q.add_argument("--k", type=int, required=True, help="examples per class")
    q.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0); a larger k contains a smaller")
    q.add_argument("--task", choices=sorted(CLASS_KEY), default="classification",
                   help="what a class is: the label (classification) or the queried category (detection)")
    q.add_argument("--label-key", default=None, help="record field that names the class (overrides --task)")
    q = data_sub.add_parser("check", help="check every record of the configured splits (exit 1 if any is bad or "
                                          "cannot be read, e.g. a missing image; 2 for a bad command or config)")
    _config_args(q)

    p = sub.add_parser("report", help="self-contained HTML report of training / eval / demo runs")
    p.add_argument("runs", nargs="+", help="run directories (several: compared side by side)")
    p.add_argument("--out", help="HTML file (default: RUNS[0]/report.html)")

    p = sub.add_parser("predict", help="ask a model (a run, checkpoint, LoRA run or hub id) about an image or several")
    p.add_argument("model", help="run directory (latest checkpoint), checkpoint-N[/model], model directory or hub id")
    p.add_argument("image", help="the image file to ask about")
    p.add_argument("--image", dest="more_images", action="append", default=[], metavar="IMAGE",
                   help="another image, after IMAGE in the prompt (repeat for more; classification only)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (on the run's own config)")
    p.add_argument("--question", help="the question (default: the run's task.question; task.instruction is appended)")
    p.add_argument("--task", choices=["classification", "detection", "grounding"], help="default: the run's task")
    p.add_argument("--samples", type=int, default=1, help="a group of N samples, as GRPO draws them")
    p.add_argument("--temperature", type=float, help="default: 0 (greedy) for one sample, grpo.temperature for a group")
    p.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens (greedy) or grpo.max_completion_length")
    p.add_argument("--solution", help="ground truth: each sample gets the task's rewards and its group advantage")
    p.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                   help="a record field the question or parser reads, e.g. category=tree, box_space=pixels")
    p.add_argument("--out", help="PNG with the boxes drawn (detection/grounding; default IMAGE_STEM.boxes.png)")
    p.add_argument("--config", help="config YAML for a model that is not a run (default: the run's config.yaml)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--tool-images", help="with tools.enabled: folder for the images the tools make "
                                         "(default: IMAGE_STEM.tools/)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("export", help="a run or checkpoint as a plain Hugging Face model directory (LoRA merged)")
    p.add_argument("model", help="run directory (latest checkpoint), checkpoint-N[/model] or model directory")
    p.add_argument("out", help="new directory to write (never overwritten)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. model.name_or_path=BASE for LoRA)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: model.dtype)")
    p.add_argument("--config", help="config YAML for a model that is not a run")

    p = sub.add_parser("demo", help="tiny model + real digits: base vs SFT vs Visual-RFT")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--config", default=None, help="demo config (default: the packaged configs/demo.yaml values)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")

    p = sub.add_parser("sweep", help="data efficiency: SFT vs Visual-RFT over k-shot sizes x seeds, one base")
    _config_args(p)
    p.add_argument("--out", default=None, help="output directory (default: runs/CONFIG_NAME); rerun to resume")
    p.add_argument("--report-only", action="store_true", help="only rebuild table, plot and report from results.jsonl")
    return parser


def run_lock(folder: str, command: str) -> contextlib.AbstractContextManager:
    """The run folder's lock, taken by the main process only (torchrun / accelerate start several)."""
    from visual_rft.runfolder import RunLock, is_main_process

    return RunLock(folder, command) if is_main_process() else contextlib.nullcontext()


def check_resume_settings(cfg: Any, ckpt: Any, *, accept_changes: bool) -> None:
    """The resumed run's settings (its checkpoint's config.yaml) against the requested ones."""
    from visual_rft.config import to_dict
    from visual_rft.runfolder import check_resume

    saved = load_config(ckpt / "config.yaml")
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    check_resume(to_dict(saved), to_dict(cfg), where=ckpt.name, step=step, accept_changes=accept_changes,
                 folder=cfg.output.dir)


def start_model(cfg: Any) -> Any:
    """train / sft: model.name_or_path resolved as eval / predict / export resolve a model (a run folder
    or checkpoint -> its model/), so config.yaml records the weights the run started from."""
    import dataclasses

    from visual_rft.model_source import training_model

    resolved = training_model(cfg.model.name_or_path)
    if resolved == cfg.model.name_or_path:
        return cfg
    from visual_rft.runfolder import is_main_process

    if is_main_process():
        print(f"visual-rft: model.name_or_path={cfg.model.name_or_path} -> {resolved}", file=sys.stderr)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=resolved))


def _run_in_folder(args: argparse.Namespace, cfg: Any, out: str | None) -> object:
    """train / sft / eval, from the checks that run before torch is imported to the command's result."""
    from visual_rft.preflight import find_resume_checkpoint, preflight
    from visual_rft.runfolder import check_eval_out, check_fresh_run

    preflight(cfg, args.command, out, "--out" if out else "output.dir")  # before torch and any model load
    with run_lock(out or cfg.output.dir, args.command):
        if args.command == "train":
            ckpt = None
            if args.resume or args.resume_with_changes or args.resume_if_present:
                ckpt = find_resume_checkpoint(cfg.output.dir, required=not args.resume_if_present)
            if ckpt is None:
                check_fresh_run(cfg.output.dir, "output.dir", overwrite=args.overwrite)
            else:
                check_resume_settings(cfg, ckpt, accept_changes=args.resume_with_changes)
            from visual_rft.rl.trainer import train_grpo
            return {"output": str(train_grpo(cfg, resume=ckpt is not None))}
        if args.command == "sft":
            check_fresh_run(cfg.output.dir, "output.dir", overwrite=args.overwrite)
            from visual_rft.sft import train_sft
            return {"output": str(train_sft(cfg))}
        check_eval_out(out or cfg.output.dir, "--out" if out else "output.dir", overwrite=args.overwrite)
        from visual_rft.evaluate import run_eval
        return run_eval(cfg, args.model or cfg.model.name_or_path, args.out)  # a run folder too, as --model


def run(args: argparse.Namespace) -> object:
    if args.command in ("train", "sft", "eval"):
        path, overrides = _split_config(args)
        cfg = load_config(path, overrides)
        if args.command != "eval":  # eval resolves --model, else model.name_or_path, itself (evaluate.py)
            cfg = start_model(cfg)
        from visual_rft.runfolder import removed_if_left_empty

        out = getattr(args, "out", None)
        with removed_if_left_empty(out or cfg.output.dir):
            return _run_in_folder(args, cfg, out)
    if args.command == "score":
        from visual_rft.score import score_file
        return score_file(args.input, args.output, args.task, args.mode, args.thinking)
    if args.command == "tiny-model":
        from visual_rft.models.tiny import build_tiny_model
        return {"model": str(build_tiny_model(args.dir, seed=args.seed, arch=args.arch))}
    if args.command == "data" and args.data_command == "check":
        from visual_rft.data.errors import DataError
        from visual_rft.runtime import check_data
        path, overrides = _split_config(args)
        cfg = load_config(path, overrides)
        try:
            return check_data(cfg)
        except DataError as exc:  # the data is bad (a missing image, a row without a solution): exit 1, as
            raise BadData(str(exc)) from None  # for an image that does not decode; 2 is for a bad command
    if args.command == "data":
        from visual_rft.data.sources import fewshot_command
        return fewshot_command(args.source, args.out, args.k, args.seed, args.label_key or CLASS_KEY[args.task])
    if args.command == "report":
        from visual_rft.report.build import report_command
        return report_command(args.runs, args.out)
    if args.command == "predict":
        from visual_rft.predict import format_prediction, predict_image
        images = [args.image, *args.more_images]
        result = predict_image(args.model, images, question=args.question, task=args.task, samples=args.samples,
                               temperature=args.temperature, solution=args.solution, out=args.out, fields=args.field,
                               config=args.config, overrides=args.overrides, max_new_tokens=args.max_new_tokens,
                               seed=args.seed, tool_images=args.tool_images)
        if args.json:
            return result
        print(format_prediction(result))
        return None
    if args.command == "export":
        from visual_rft.export import export_model
        return export_model(args.model, args.out, config=args.config, overrides=args.overrides, dtype=args.dtype)
    if args.command == "demo":
        from visual_rft.demo import run_demo
        return run_demo(args.out, config_path=args.config, overrides=args.overrides)
    if args.command == "sweep":
        from visual_rft.sweep import default_out, run_sweep
        path, overrides = _split_config(args)
        with run_lock(args.out or default_out(path), "sweep"):
            return run_sweep(args.out, config_path=path, overrides=overrides, report_only=args.report_only)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from visual_rft.checkpoint import CheckpointWriteError
    from visual_rft.preemption import Preempted
    from visual_rft.runfolder import is_main_process

    try:
        result = run(args)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, CheckpointWriteError) as exc:
        print(f"visual-rft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BadData as exc:
        print(f"visual-rft {args.command}: bad data: {exc}", file=sys.stderr)
        return 1
    except Preempted as stopped:
        if is_main_process():
            print(f"visual-rft {args.command}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    if result is not None and is_main_process():  # one summary under torchrun
        print(json.dumps(result, indent=2, default=str))
    if args.command == "data" and args.data_command == "check":
        return 1 if any(split["bad"] for split in result.values()) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
