"""A data-efficiency sweep's outputs, rebuilt from its results.jsonl: the table (JSON + markdown),
the plot (held-out metric vs examples per class: SFT and RFT means with their seed range, the base as
a line) and the report's section showing both. `visual-rft sweep` writes the table and plot here
(write_tables); the report reads them back from the sweep's folder (sweep_folder_section), for the
sweep's own report.html and for `visual-rft report SWEEP_DIR` alike."""

from __future__ import annotations

import base64
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from visual_rft.config import Config
from visual_rft.report.html import img, note, section, sub, table

NAMES = {"sft": "SFT", "rft": "Visual-RFT"}
COLORS = {"sft": "tab:blue", "rft": "tab:orange"}
TABLE, TABLE_MD, PLOT = "table.json", "table.md", "sweep.png"  # in the sweep's folder, next to its results.jsonl


def cell_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; 0 for one seed), range and count of one (k, method) cell."""
    values = list(values)
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def summarize(cfg: Config, rows: list[dict[str, Any]], best: dict[str, float]) -> dict[str, Any]:
    """The table: per k and method the grid runs' metric over the configured seeds, plus the base."""
    s = cfg.sweep
    grid = [r for r in rows if r["phase"] == "grid" and r["k"] in s.ks and r["seed"] in s.seeds
            and r["learning_rate"] == best[r["method"]]]
    base = next((r for r in rows if r["phase"] == "base"), None)
    cells = []
    for k in s.ks:
        for method in NAMES:
            found = sorted((r for r in grid if r["k"] == k and r["method"] == method), key=lambda r: r["seed"])
            if found:
                cells.append({"k": k, "method": method, "seeds": [r["seed"] for r in found],
                              **cell_stats([r["value"] for r in found])})
    search = [{"method": r["method"], "learning_rate": r["learning_rate"], "value": r["value"]}
              for r in rows if r["phase"] == "search"]
    any_row = grid[0] if grid else {}
    return {"metric": s.metric, "target": s.target, "base": base["value"] if base else None,
            "eval_records": base["eval_records"] if base else None, "ks": s.ks, "seeds": s.seeds,
            "learning_rates": best, "search": search,
            "protocol": {"images_seen": s.images_seen, "images_per_step": s.images_per_step,
                         "steps": any_row.get("steps"), "search_k": s.search_k, "val_records": s.val_records,
                         "searched": s.learning_rates, "num_generations": cfg.grpo.num_generations},
            "cells": cells, "wall_seconds": round(sum(sum(r["seconds"].values()) for r in rows), 1)}


def _cell(summary: dict[str, Any], k: int, method: str) -> dict[str, Any] | None:
    return next((c for c in summary["cells"] if c["k"] == k and c["method"] == method), None)


def _fmt(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "—"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f} ({cell['min']:.3f}–{cell['max']:.3f}, n={cell['n']})"


def verdict(sft: dict[str, Any] | None, rft: dict[str, Any] | None) -> str:
    """Which mean is higher, and whether the gap clears the seed spread (larger of the two stds)."""
    if sft is None or rft is None:
        return "—"
    gap = rft["mean"] - sft["mean"]
    leader = "RFT" if gap > 0 else "SFT" if gap < 0 else "tie"
    spread = max(sft["std"], rft["std"])
    if min(sft["n"], rft["n"]) == 1:
        return f"{leader} {gap:+.3f} (one seed)"
    clear = "" if abs(gap) > spread else " (within seed spread)"
    return f"{leader} {gap:+.3f}{clear}"


def markdown(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    lines = [f"| k per class | base | SFT {metric} mean ± std (min–max, n) | RFT {metric} mean ± std (min–max, n) "
             "| RFT − SFT |", "|---|---|---|---|---|"]
    base = "—" if summary["base"] is None else f"{summary['base']:.3f}"
    for k in summary["ks"]:
        sft, rft = _cell(summary, k, "sft"), _cell(summary, k, "rft")
        lines.append(f"| {k} | {base} | {_fmt(sft)} | {_fmt(rft)} | {verdict(sft, rft)} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Held-out metric vs k (log2 axis): mean line and min–max band over seeds per method, base dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method, name in NAMES.items():
        cells = [c for c in summary["cells"] if c["method"] == method]
        if cells:
            ks = [c["k"] for c in cells]
            ax.plot(ks, [c["mean"] for c in cells], "o-", color=COLORS[method],
                    label=f"{name} (lr {summary['learning_rates'][method]:g})")
            ax.fill_between(ks, [c["min"] for c in cells], [c["max"] for c in cells], color=COLORS[method],
                            alpha=0.2, linewidth=0)
    if summary["base"] is not None:
        ax.axhline(summary["base"], color="grey", linestyle="--", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["ks"], [str(k) for k in summary["ks"]])
    ax.set(xlabel="training examples per class (k)", ylabel=f"held-out {summary['metric']}", title=title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=f"bands: min–max over up to {max((c['n'] for c in summary['cells']), default=0)} seeds", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def sweep_section(summary: dict[str, Any], plot_path: Path, title: str) -> str:
    """The report's data-efficiency section: the plot, the table, the learning-rate search, the protocol."""
    uri = "data:image/png;base64," + base64.b64encode(plot_path.read_bytes()).decode("ascii")
    metric = summary["metric"]
    rows = []
    for k in summary["ks"]:
        sft, rft = _cell(summary, k, "sft"), _cell(summary, k, "rft")
        rows.append([k, summary["base"], _fmt(sft), _fmt(rft), verdict(sft, rft)])
    header = ["k per class", f"base {metric}", "SFT", "Visual-RFT", "RFT − SFT"]
    search = table(["method", "learning rate", f"validation {metric}"],
                   [[NAMES[r["method"]], r["learning_rate"], r["value"]] for r in summary["search"]])
    protocol = summary["protocol"]
    text = (f"Every run sees {protocol['images_seen']} training images, {protocol['images_per_step']} per step "
            f"({protocol['steps']} steps; GRPO samples {protocol['num_generations']} completions of each). "
            f"Learning rates searched at k={protocol['search_k']} on {protocol['val_records']} validation "
            f"records carved from the pool: {protocol['searched']}; used: {summary['learning_rates']}. "
            f"Held-out: {summary['eval_records']} records; mean ± sample std (min–max) over seeds "
            f"{summary['seeds']}. Run time (train + eval, all runs): {summary['wall_seconds'] / 60:.1f} min.")
    body = img(uri, "data efficiency", cls="demo") + table(header, rows, cls="demo-results") + note(text)
    body += sub("learning-rate search (validation split)", search)
    return section("sweep", title, body)


def sweep_title(target: str, folder: Path) -> str:
    return f"data efficiency: {target} ({folder.name})"


def write_tables(cfg: Config, out: Path, rows: list[dict[str, Any]], best: dict[str, float]) -> dict[str, str]:
    """The sweep's table (JSON and markdown) and plot in `out`, from its finished runs' rows."""
    summary = summarize(cfg, rows, best)
    (out / TABLE).write_text(json.dumps(summary, indent=2))
    (out / TABLE_MD).write_text(markdown(summary))
    png = plot(summary, out / PLOT, sweep_title(cfg.sweep.target, out))
    return {"table_json": str(out / TABLE), "table_md": str(out / TABLE_MD), "plot": str(png)}


def sweep_folder_section(folder: Path) -> str:
    """The section of a sweep's folder, from the table and plot `write_tables` left there."""
    try:
        summary = json.loads((folder / TABLE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or not (folder / PLOT).is_file():
        # the table is first written once the learning-rate search has finished
        return section("sweep", f"data efficiency ({folder.name})",
                       note(f"no {TABLE} and {PLOT} yet: the learning-rate search of this sweep has not finished"))
    return sweep_section(summary, folder / PLOT, sweep_title(summary.get("target"), folder))
