"""A data-efficiency sweep's outputs, rebuilt from its results.jsonl: the table (JSON + markdown),
the plot (held-out metric vs examples per class: each method's mean with its 95% interval over seeds,
the base as a line) and the report's section showing both. Every cell carries its 95% t interval and
every gap (to SFT; no-thinking to thinking RFT) its interval and two-sided p (report/stats.py), in
table.json, table.md and the report. `visual-rft sweep` writes the table and plot here (write_tables);
the report reads them back from the sweep's folder (sweep_folder_section), for the sweep's own
report.html and for `visual-rft report SWEEP_DIR` alike."""

from __future__ import annotations

import base64
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from visual_rft.config import Config
from visual_rft.report.html import img, note, section, sub, table
from visual_rft.report.stats import LEVEL, cell_gap, mean_interval

NAMES = {"sft": "SFT", "rft": "Visual-RFT", "rft_nothink": "Visual-RFT, no thinking"}
SHORT = {"sft": "SFT", "rft": "RFT", "rft_nothink": "RFT no-think"}  # table columns and gaps
COLORS = {"sft": "tab:blue", "rft": "tab:orange", "rft_nothink": "tab:green"}
TABLE, TABLE_MD, PLOT = "table.json", "table.md", "sweep.png"  # in the sweep's folder, next to its results.jsonl


def cell_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; 0 for one seed), the mean's 95% t interval (None for
    one seed), range and count of one (k, method) cell."""
    values = list(values)
    mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    ci = mean_interval(mean, std, len(values))
    return {"n": len(values), "mean": mean, "std": std, "ci95": [ci["low"], ci["high"]],
            "min": min(values), "max": max(values), "values": values}


def arm(method: str, base_steps: int | None) -> str:
    """A method from one base: the unit that gets its own learning-rate search and table column
    (the sweep's keys of its chosen rates; sweep.py, which trains, imports it from here)."""
    return method if base_steps is None else f"b{base_steps}/{method}"


def summarize(cfg: Config, rows: list[dict[str, Any]], best: dict[str, float]) -> dict[str, Any]:
    """The table: per base, k and method the grid runs' metric over the configured seeds, plus each base."""
    s = cfg.sweep
    bases = list(s.base_steps) if s.base_steps else [None]
    grid = [r for r in rows if r["phase"] == "grid" and r["k"] in s.ks and r["seed"] in s.seeds
            and r["method"] in s.methods and r.get("base_steps") in bases
            and r["learning_rate"] == best.get(arm(r["method"], r.get("base_steps")))]
    base_rows = {r.get("base_steps"): r for r in rows if r["phase"] == "base"}
    cells = []
    for b in bases:
        for k in s.ks:
            for method in s.methods:
                found = sorted((r for r in grid if r["k"] == k and r["method"] == method and r.get("base_steps") == b),
                               key=lambda r: r["seed"])
                if found:
                    cells.append({"k": k, "method": method, "base_steps": b, "seeds": [r["seed"] for r in found],
                                  **cell_stats([r["value"] for r in found])})
    gaps = [{"k": k, "method": m, "versus": ref, "base_steps": b, **cell_gap(before, after)}
            for b in bases for k in s.ks for m, ref in compared(s.methods)
            for before, after in [(_find(cells, k, ref, b), _find(cells, k, m, b))] if before and after]
    search = [{"method": r["method"], "base_steps": r.get("base_steps"), "learning_rate": r["learning_rate"],
               "value": r["value"]} for r in rows if r["phase"] == "search"]
    first = base_rows.get(bases[0])
    any_row = grid[0] if grid else {}
    return {"metric": s.metric, "target": s.target, "base": first["value"] if first else None,
            "bases": [{"base_steps": b, "value": base_rows[b]["value"] if b in base_rows else None} for b in bases],
            "methods": list(s.methods),
            "eval_records": first["eval_records"] if first else None, "ks": s.ks, "seeds": s.seeds,
            "learning_rates": best, "search": search,
            "protocol": {"images_seen": s.images_seen, "images_per_step": s.images_per_step,
                         "steps": any_row.get("steps"), "search_k": s.search_k, "val_records": s.val_records,
                         "searched": s.learning_rates, "num_generations": cfg.grpo.num_generations},
            "cells": cells, "gaps": gaps, "wall_seconds": round(sum(sum(r["seconds"].values()) for r in rows), 1)}


def _methods(summary: dict[str, Any]) -> list[str]:
    return summary.get("methods") or ["sft", "rft"]  # a table written before sweep.methods existed


def _bases(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return summary.get("bases") or [{"base_steps": None, "value": summary["base"]}]


def _find(cells: list[dict[str, Any]], k: int, method: str, base_steps: int | None) -> dict[str, Any] | None:
    return next((c for c in cells if c["k"] == k and c["method"] == method and c.get("base_steps") == base_steps),
                None)


def _cell(summary: dict[str, Any], k: int, method: str, base_steps: int | None = None) -> dict[str, Any] | None:
    return _find(summary["cells"], k, method, base_steps)


def _interval(cell: dict[str, Any]) -> tuple[float | None, float | None]:
    """The cell's 95% interval (recomputed from mean / std / n for a table written before it was stored)."""
    if "ci95" in cell:
        return tuple(cell["ci95"])
    ci = mean_interval(cell["mean"], cell["std"], cell["n"])
    return ci["low"], ci["high"]


def _fmt(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "—"
    low, high = _interval(cell)
    if low is None:
        return f"{cell['mean']:.3f} (n={cell['n']})"
    return f"{cell['mean']:.3f} [{low:.3f}, {high:.3f}] (sd {cell['std']:.3f}, n={cell['n']})"


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def gap_text(gap: dict[str, Any], brief: bool = False) -> str:
    """A gap with its 95% interval and two-sided p (`brief`: without the test's name)."""
    if gap["p"] is None:
        return f"{gap['gap']:+.3f} (one seed: no interval)"
    text = f"{gap['gap']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}] {_p(gap['p'])}"
    return text if brief else f"{text} ({gap['test']})"


def verdict(ref: dict[str, Any] | None, other: dict[str, Any] | None, name: str = "RFT",
            ref_name: str = "SFT") -> str:
    """`other` (called `name`) minus `ref` (SFT unless named): the mean gap, its 95% interval and
    two-sided p (paired over seeds, or Welch), and what the interval says: who is ahead, or no clear
    difference (it spans 0)."""
    if ref is None or other is None:
        return "—"
    gap = cell_gap(ref, other)
    if gap["p"] is None:
        return gap_text(gap)
    if gap["low"] > 0 or gap["high"] < 0:
        return f"{gap_text(gap)}: {name if gap['gap'] > 0 else ref_name} ahead"
    return f"{gap_text(gap)}: no clear difference"


def compared(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The gaps a table shows, as (method, reference): each method against SFT when SFT ran, and
    no-thinking against thinking RFT when both ran (the paper's and CLS-RL's question)."""
    pairs = [(m, "sft") for m in methods if m != "sft"] if "sft" in methods else []
    return pairs + ([("rft_nothink", "rft")] if {"rft", "rft_nothink"} <= set(methods) else [])


def _rivals(summary: dict[str, Any]) -> list[tuple[str, str]]:
    return compared(_methods(summary))


def _gap_name(pair: tuple[str, str]) -> str:
    return f"{SHORT[pair[0]]} − {SHORT[pair[1]]}"


def _rows(summary: dict[str, Any], base: dict[str, Any], text: bool = False) -> list[list[Any]]:
    """One row per k: k, the base's value (`text`: as 0.123), each method's cell, each compared gap."""
    b, value = base["base_steps"], base["value"]
    shown = ("—" if value is None else f"{value:.3f}") if text else value
    rows = []
    for k in summary["ks"]:
        cells = {m: _cell(summary, k, m, b) for m in _methods(summary)}
        rows.append([k, shown, *(_fmt(cells[m]) for m in _methods(summary)),
                     *(verdict(cells[ref], cells[m], SHORT[m], SHORT[ref]) for m, ref in _rivals(summary))])
    return rows


def _base_label(base: dict[str, Any], metric: str) -> str:
    value = "—" if base["value"] is None else f"{base['value']:.3f}"
    return f"base: {base['base_steps']}-step warm-up, held-out {metric} {value}"


def markdown(summary: dict[str, Any]) -> str:
    metric, methods = summary["metric"], _methods(summary)
    header = (f"| k per class | base | " + " | ".join(f"{SHORT[m]} {metric} mean [95% CI] (sd, n)" for m in methods)
              + "".join(f" | {_gap_name(pair)}" for pair in _rivals(summary)) + " |")
    rule = "|" + "---|" * (2 + len(methods) + len(_rivals(summary)))
    bases, blocks = _bases(summary), []
    for base in bases:
        lines = [f"**{_base_label(base, metric)}**", ""] if len(bases) > 1 else []
        lines += [header, rule] + [f"| {' | '.join(str(x) for x in row)} |" for row in _rows(summary, base, text=True)]
        blocks.append("\n".join(lines) + "\n")
    if len(bases) > 1 and _rivals(summary):
        blocks.append(gap_markdown(summary))
    return "\n".join(blocks)


def gap_markdown(summary: dict[str, Any]) -> str:
    """Each compared gap per base and k (95% interval, two-sided p): whether a stronger prior moves it."""
    metric = summary["metric"]
    lines = [f"**gaps by base ({metric}; mean [95% CI] and two-sided p)**", "",
             "| base (held-out) | gap | " + " | ".join(f"k={k}" for k in summary["ks"]) + " |",
             "|" + "---|" * (2 + len(summary["ks"]))]
    for base in _bases(summary):
        label = f"{base['base_steps']} steps ({'—' if base['value'] is None else format(base['value'], '.3f')})"
        for method, ref in _rivals(summary):
            gaps = []
            for k in summary["ks"]:
                b = base["base_steps"]
                before, after = _cell(summary, k, ref, b), _cell(summary, k, method, b)
                gaps.append("—" if before is None or after is None else gap_text(cell_gap(before, after), brief=True))
            lines.append(f"| {label} | {_gap_name((method, ref))} | " + " | ".join(gaps) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    """Held-out metric vs k (log2 axis), one panel per base: mean line and its 95% interval band over
    seeds per method (none for one seed), the base dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bases = _bases(summary)
    fig = Figure(figsize=(6 * len(bases), 4), dpi=90)
    FigureCanvasAgg(fig)
    for i, base in enumerate(bases):
        ax = fig.add_subplot(1, len(bases), i + 1)
        for method in _methods(summary):
            cells = [c for c in summary["cells"] if c["method"] == method and c.get("base_steps") == base["base_steps"]]
            if cells:
                ks = [c["k"] for c in cells]
                rate = summary["learning_rates"].get(arm(method, base["base_steps"]))
                ax.plot(ks, [c["mean"] for c in cells], "o-", color=COLORS[method],
                        label=f"{NAMES[method]} (lr {rate:g})" if rate is not None else NAMES[method])
                bands = [_interval(c) for c in cells]
                ax.fill_between(ks, [c["mean"] if lo is None else lo for c, (lo, _) in zip(cells, bands)],
                                [c["mean"] if hi is None else hi for c, (_, hi) in zip(cells, bands)],
                                color=COLORS[method], alpha=0.2, linewidth=0)
        if base["value"] is not None:
            ax.axhline(base["value"], color="grey", linestyle="--", label="base")
        ax.set_xscale("log", base=2)
        ax.set_xticks(summary["ks"], [str(k) for k in summary["ks"]])
        panel = title if len(bases) == 1 else f"{title}\n{_base_label(base, summary['metric'])}"
        ax.set(xlabel="training examples per class (k)", ylabel=f"held-out {summary['metric']}", title=panel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        seeds = max((c["n"] for c in summary["cells"]), default=0)
        ax.legend(fontsize=8, title=f"bands: 95% interval of the mean, up to {seeds} seeds", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def sweep_section(summary: dict[str, Any], plot_path: Path, title: str) -> str:
    """The report's data-efficiency section: the plot, the table(s), the learning-rate search, the protocol."""
    uri = "data:image/png;base64," + base64.b64encode(plot_path.read_bytes()).decode("ascii")
    metric, methods, bases = summary["metric"], _methods(summary), _bases(summary)
    header = ["k per class", f"base {metric}", *(NAMES[m] for m in methods),
              *(_gap_name(pair) for pair in _rivals(summary))]
    tables = "".join((note(_base_label(base, metric)) if len(bases) > 1 else "")
                     + table(header, _rows(summary, base), cls="demo-results") for base in bases)
    search = table(["method", "base", "learning rate", f"validation {metric}"],
                   [[NAMES[r["method"]], "—" if r.get("base_steps") is None else r["base_steps"], r["learning_rate"],
                     r["value"]] for r in summary["search"]])
    protocol = summary["protocol"]
    text = (f"Every run sees {protocol['images_seen']} training images, {protocol['images_per_step']} per step "
            f"({protocol['steps']} steps; GRPO samples {protocol['num_generations']} completions of each). "
            f"Learning rates searched at k={protocol['search_k']} on {protocol['val_records']} validation "
            f"records carved from the pool: {protocol['searched']}; used: {summary['learning_rates']}. "
            f"Held-out: {summary['eval_records']} records; mean over seeds {summary['seeds']} with its "
            f"{LEVEL:.0%} t interval [low, high], sample std and n. Gaps (each method minus SFT; no-thinking "
            f"minus thinking RFT): mean difference, its {LEVEL:.0%} interval and two-sided p of a paired "
            f"t-test over seeds (seed s drew the same k-shot "
            f"sample for both), Welch's test where the seed lists differ; no correction for the number of "
            f"gaps. Run time (train + eval, all runs): {summary['wall_seconds'] / 60:.1f} min.")
    body = img(uri, "data efficiency", cls="demo") + tables + note(text)
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
