"""`visual-rft report RUN [RUN ...]`: one self-contained static HTML page per set of folders.

The folders are training runs, eval outputs, demos and sweeps (discover.py tells which). The page
shows each run's resolved config, its curves, a bounded gallery of sampled rollouts (image, prompt,
the G completions with their per-component rewards and advantage, boxes drawn for
detection/grounding), eval tables (confusion matrix, per-category AP, examples), for several runs
base vs SFT vs RFT side by side, and a sweep's data-efficiency table and plot (sweep.py). Files are
streamed; see read.py for the bounds. The top of the report package: it imports every other layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from visual_rft.report.discover import DEMO_PHASES, Run, config_text, discover
from visual_rft.report.html import (CompletionView, TurnView, bar_table, confusion_table, details, esc, group_html, img,
                                    note, page, section, sub, table)
from visual_rft.report.images import PALETTE, DataSpec, ImageFinder, infer_task, read_boxes, render_image
from visual_rft.report.plots import bars_png, group_curves, group_panels, overlay_panels, panels_png
from visual_rft.report.read import (NO_ANSWER, PREDICTION_KEYS, ROLLOUT_KEYS, Series, confusion_matrix, is_correct,
                                    is_number, iter_jsonl, read_curves, read_predictions, reward_keys,
                                    sample_rollouts)
from visual_rft.report.sweep import sweep_folder_section


def _datasets_of(text: str | None) -> list[DataSpec]:
    """The data.train / data.eval datasets a run's config names: where its records' images are."""
    import yaml

    try:
        cfg = yaml.safe_load(text or "") or {}
        data, task = cfg.get("data") or {}, (cfg.get("task") or {}).get("name") or "classification"
        return [DataSpec(str(data[k]), data.get("image_root"), str(task), data.get("limit"))
                for k in ("eval", "train") if data.get(k)]
    except (yaml.YAMLError, AttributeError, TypeError):
        return []


# ---------------------------------------------------------------- sections

@dataclass
class Context:
    finder: ImageFinder
    curves: dict[str, dict[str, Series]] = field(default_factory=dict)  # run anchor -> key -> series


def _mode(run: Run) -> str:
    return run.task.get("mode") if run.task.get("mode") in ("strict", "visual_rft") else "strict"


def _task_line(run: Run) -> str:
    """Which verifier scored the run: task, reward mode and thinking (on: <think> + answer; off: answer only)."""
    task = run.task or {}
    return (f"task {task.get('name', 'classification')} · reward mode {_mode(run)} · thinking "
            f"{task.get('thinking', 'on')}")


def train_section(run: Run, ctx: Context, budget: int) -> str:
    parts = [note(_task_line(run))]
    config = config_text(run.path)
    parts.append(details("resolved config (config.yaml)", config) if config else note("no config.yaml found"))
    curves = ctx.curves.get(run.anchor, {})
    groups = group_curves(list(curves))
    for group, keys in groups.items():
        parts.append(sub(group, img(panels_png(group_panels(group, curves, keys)), f"curve: {group}")))
    if not groups:
        parts.append(note("no metrics.jsonl rows with numeric values"))
    if (run.path / "rollouts.jsonl").is_file():
        parts.append(gallery(run, ctx, budget))
    return section(run.anchor, f"training: {run.name}", "".join(parts))


def box_defaults(run: Run) -> dict[str, Any]:
    """What a run's config says of its boxes, for data rows that do not say it themselves: the box
    space (task.box_space; `auto` = the family default of the model its config names, read from that
    model's config.json) and, for `pixels`, the size of the image the model saw (data.image_size)."""
    import yaml

    try:
        cfg = yaml.safe_load(config_text(run.path) or "") or {}
    except yaml.YAMLError:
        return {}
    task, data = cfg.get("task") or {}, cfg.get("data") or {}
    space = task.get("box_space") or "auto"
    if space == "auto":
        space = _family_box_space((cfg.get("model") or {}).get("name_or_path"))
    out: dict[str, Any] = {"box_space": space} if space else {}
    size = data.get("image_size")
    if space == "pixels" and isinstance(size, int) and size > 0:
        out["image_size"] = [size, size]
    return out


def _family_box_space(model: Any) -> str | None:
    try:
        model_type = json.loads((Path(str(model)) / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the model is gone or a hub id: rows without a box space are read as qwen2vl
    from visual_rft.models.families import default_box_space

    return default_box_space(model_type)


def gallery(run: Run, ctx: Context, budget: int) -> str:
    groups, total = sample_rollouts(run.path / "rollouts.jsonl", budget)
    defaults = box_defaults(run)
    found = ctx.finder.find_many(g.rows[0].get("source") for g in groups if g.rows)
    cards = []
    for group in groups:
        if not group.rows:
            continue
        first = group.rows[0]
        hit = found.get(str(first.get("source")))
        task = infer_task(first.get("solution"), run.task.get("name"))
        views, preds, boxes = [], [], None
        names = list(dict.fromkeys(k for row in group.rows for k in reward_keys(row, ROLLOUT_KEYS)))
        for i, row in enumerate(group.rows):
            failed, boxes_i = _failure(task, _mode(run), row, {**defaults, **(hit.row if hit else {})})
            color = PALETTE[i % len(PALETTE)] if boxes_i is not None else None
            boxes = boxes or boxes_i
            preds.append(boxes_i.pred if boxes_i else None)
            views.append(CompletionView(row.get("completion"), row, failed, color, turn_views(row, run.path)))
        uri = render_image(hit.image if hit else None, boxes, [v.color for v in views], preds)
        more = f" (+{group.truncated} more completions not shown)" if group.truncated else ""
        meta = f"step {group.step} · {len(group.rows)} completions{more} · source {first.get('source')}"
        cards.append(group_html(meta, uri, first.get("prompt"), first.get("solution"), views,
                                [*names, "advantage"], step=group.step))
    head = note(f"{len(cards)} of {total} logged rollout groups, spread from the first logged step to the last. "
                "Red rows: the answer did not parse or scored format 0. Boxes: green = ground truth, "
                "other colours = the completion with that swatch.")
    return sub("sampled rollouts", head + "".join(cards))


def _failure(task: str, mode: str, row: dict[str, Any], data_row: dict[str, Any]) -> tuple[str, Any]:
    """Why a completion is highlighted ("" if it is not), and its boxes for detection/grounding."""
    boxes = read_boxes(task, mode, row.get("completion"), row.get("solution"), data_row)
    if row.get("parse_failed") is True or (boxes is not None and boxes.pred is None):
        return "parse failure", boxes
    if task == "classification" and "parse_failed" not in row:
        from visual_rft.tasks.classification import parse_answer

        if parse_answer(str(row.get("completion") or ""), mode=mode) is None:
            return "parse failure", boxes
    if row.get("format") == 0:
        return "format 0", boxes
    return "", boxes


def eval_section(run: Run, ctx: Context) -> str:
    parts = [note(_task_line(run))] if run.task else []
    metrics = _metrics_json(run.path)
    scalars = [(k, v) for k, v in metrics.items() if is_number(v)]
    if scalars:
        parts.append(sub("metrics", table(["metric", "value"], scalars)))
    for key, title in (("per_category_AP", "per-category AP"), ("per_category_AP50", "per-category AP50"),
                       ("per_category_ap", "per-category AP"), ("per_class_accuracy", "per-class accuracy")):
        if isinstance(metrics.get(key), dict) and metrics[key]:
            parts.append(sub(title, bar_table(["category" if "ap" in key else "class", key], metrics[key])))
    preds = run.path / "predictions.jsonl"
    if preds.is_file():
        parts.append(_predictions_html(run, ctx, preds))
    return section(run.anchor, f"eval: {run.name}", "".join(parts) or note("empty eval directory"))


def _predictions_html(run: Run, ctx: Context, path: Path) -> str:
    first = _first_row(path)
    task = infer_task(first.get("solution"), run.task.get("name"))
    tally = read_predictions(path, task)
    parts = []
    if task == "classification" and tally.counts:
        rows, cols, counts = confusion_matrix(tally)
        shown = f" (the {len(rows)} most frequent labels)" if len(tally.labels) > len(rows) else ""
        parts.append(sub("confusion matrix", note(f"{tally.rows} predictions{shown}; {NO_ANSWER} = no parseable "
                                                  "answer") + confusion_table(rows, cols, counts)))
    examples = tally.correct + tally.wrong
    found = ctx.finder.find_many(r.get("source") for r in examples)
    defaults = box_defaults(run)
    cards = []
    for row in examples:
        hit = found.get(str(row.get("source")))
        failed, boxes = _failure(task, _mode(run), row, {**defaults, **(hit.row if hit else {})})
        color = PALETTE[0] if boxes is not None else None
        uri = render_image(hit.image if hit else None, boxes, [color], [boxes.pred if boxes else None])
        verdict = "correct" if is_correct(row) else "wrong"
        names = ["label", "prediction", *reward_keys(row, PREDICTION_KEYS), "completion_tokens", "tool_calls",
                 "truncated"]
        view = CompletionView(row.get("completion"), {**row, "prediction": _short(row.get("prediction"))},
                              failed, color, turn_views(row, run.path))
        cards.append(group_html(f"{verdict} · source {row.get('source')}", uri, None, row.get("solution"),
                                [view], [n for n in names if n in row], extra=_verdict_badge(verdict)))
    if cards:
        parts.append(sub("example predictions", "".join(cards)))
    return "".join(parts)


MAX_TURNS_SHOWN = 16  # a hostile or runaway row cannot make a card of a thousand turns


def turn_views(row: dict[str, Any], base: Path | None) -> list[TurnView] | None:
    """A tool conversation's turns (the row's `turns`, tool_eval.py / the trainer's rollouts), each
    with the image its tool made when the row names a file under `base` (eval's tool_images/, a GRPO
    run's rollout_images/);
    None for a one-turn row."""
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        return None
    views = []
    for turn in turns[:MAX_TURNS_SHOWN]:
        turn = turn if isinstance(turn, dict) else {"text": turn}
        tool = ""
        if turn.get("result") is not None:
            call = turn.get("call") if isinstance(turn.get("call"), dict) else {}
            named = f"{call.get('name')} {json.dumps(call.get('arguments'))} -> " if call else ""
            tool = f"{named}{turn['result']}"
        views.append(TurnView(turn.get("text"), tool, str(turn.get("error") or ""),
                              _tool_image(base, turn.get("image"))))
    if len(turns) > MAX_TURNS_SHOWN:
        views.append(TurnView(f"({len(turns) - MAX_TURNS_SHOWN} more turns not shown)"))
    return views


def _tool_image(base: Path | None, name: Any) -> str | None:
    """The data URI of a tool image `name` relative to `base`; None for a path that leaves `base`."""
    if base is None or not isinstance(name, str) or not name:
        return None
    root = base.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return render_image(path)


def _verdict_badge(verdict: str) -> str:
    return f'<span class="badge{" ok" if verdict == "correct" else ""}">{esc(verdict)}</span>'


def _short(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value)[:500]


def _first_row(path: Path) -> dict[str, Any]:
    rows = iter_jsonl(path)
    try:
        return next(rows, {})
    finally:
        rows.close()


def _metrics_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def comparison_section(runs: Sequence[Run], ctx: Context) -> str:
    """Several runs: their held-out metrics side by side, and curves of runs of the same kind
    overlaid (SFT losses with SFT losses, GRPO rewards with GRPO rewards: an SFT loss and a
    policy-gradient loss are different quantities)."""
    parts = []
    evals = [r for r in runs if r.kind == "eval"]
    if len(evals) >= 2:
        metrics = {r.name: _metrics_json(r.path) for r in evals}
        keys = list(dict.fromkeys(k for m in metrics.values() for k, v in m.items() if is_number(v)))
        rows = [[k, *(m.get(k) for m in metrics.values())] for k in keys]
        parts.append(sub("held-out metrics", table(["metric", *metrics], rows, cls="comparison")))
        headline = next((k for k in ("accuracy", "map", "mAP", "giou", "iou") if k in keys), None)
        if headline:
            values = [m.get(headline) if is_number(m.get(headline)) else 0.0 for m in metrics.values()]
            parts.append(img(bars_png(f"held-out {headline}", list(metrics), values), f"comparison: {headline}"))
    trains = [r for r in runs if r.kind == "train" and ctx.curves.get(r.anchor)]
    for flavour in ("GRPO", "SFT"):
        same = {r.name: ctx.curves[r.anchor] for r in trains if _flavour(ctx.curves[r.anchor]) == flavour}
        shared = [k for k in dict.fromkeys(k for c in same.values() for k in c)
                  if sum(k in c for c in same.values()) >= 2]
        for group, keys in group_curves(shared).items():
            png = panels_png(overlay_panels(same, keys))
            parts.append(sub(f"{flavour} runs overlaid: {group}", img(png, f"overlay: {group}")))
    if not parts:
        return ""
    names = {r.name for r in runs}
    title = "base vs SFT vs RFT" if set(DEMO_PHASES) <= names else "comparison"
    return section("comparison", title, "".join(parts), cls="run comparison")


def _flavour(curves: dict[str, Series]) -> str:
    return "GRPO" if any(k.startswith("reward/") for k in curves) else "SFT"


def demo_section(path: Path) -> str:
    try:
        results = json.loads((path / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return section("demo", f"demo: {path}", note("results.json is unreadable"))
    models = results.get("models", {}) if isinstance(results, dict) else {}
    rows = [[DEMO_PHASES.get(name, name), m.get("accuracy"), m.get("format_rate"), m.get("parse_failure_rate")]
            for name, m in models.items() if isinstance(m, dict)]
    parts = [table(["model", "held-out accuracy", "format rate", "parse failure rate"], rows, cls="demo-results")]
    settings = {k: results.get(k) for k in ("test_records", "k_shot", "kshot_records", "seed") if k in results}
    if settings:
        parts.append(table(list(settings), [list(settings.values())]))
    if isinstance(results.get("seconds"), dict):
        parts.append(sub("seconds per phase", table(list(results["seconds"]), [list(results["seconds"].values())])))
    return section("demo", f"demo: {path.name or path}", "".join(parts))


def _budgets(n: int, total: int) -> list[int]:
    """`total` rollout groups shared over `n` runs (earlier runs take the remainder)."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)] if n else []


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None, *, max_rollouts: int = 24,
                 title: str = "visual-rft report") -> Path:
    """Write one self-contained HTML report of `run_dirs` to `out` (default RUN_DIRS[0]/report.html).
    `visual-rft sweep` writes its report.html through here too, titled "visual-rft sweep"."""
    if not run_dirs:
        raise ValueError("report: give at least one run directory")
    found = discover(run_dirs)
    runs = found.runs
    roots = list(dict.fromkeys(p for r in runs for p in (r.path, r.path.parent, r.path.parent.parent)))
    ctx = Context(ImageFinder(roots, [d for r in runs for d in _datasets_of(config_text(r.path))]))
    for run in runs:
        if run.kind == "train" and (run.path / "metrics.jsonl").is_file():
            ctx.curves[run.anchor] = read_curves(run.path / "metrics.jsonl")
    with_rollouts = [r for r in runs if r.kind == "train" and (r.path / "rollouts.jsonl").is_file()]
    budget = dict(zip((r.anchor for r in with_rollouts), _budgets(len(with_rollouts), max(0, max_rollouts))))
    comparison = comparison_section(runs, ctx)
    body = [demo_section(d) for d in found.demos] + [sweep_folder_section(s) for s in found.sweeps] + [comparison]
    for run in runs:
        body.append(train_section(run, ctx, budget.get(run.anchor, 0)) if run.kind == "train"
                    else eval_section(run, ctx))
    nav = [("demo", "demo")] * bool(found.demos) + [("sweep", "data efficiency")] * bool(found.sweeps)
    nav += [("comparison", "comparison")] * bool(comparison)
    nav += [(r.anchor, f"{r.kind}: {r.name}") for r in runs]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{', '.join(str(Path(d)) for d in run_dirs)} · generated {stamp}"
    target = Path(out) if out is not None else Path(run_dirs[0]) / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page(title, subtitle, nav, "".join(body)), encoding="utf-8")
    return target


def report_command(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, str]:
    """`visual-rft report RUN_A [RUN_B ...] [--out FILE]`."""
    return {"report": str(write_report(run_dirs, out))}
