"""Matplotlib figures for the run report, rendered with the Agg canvas straight to PNG data URIs.

`matplotlib.figure.Figure` is used without pyplot so a report never switches the backend or
touches global figure state of the process that calls it (the demo, a notebook)."""

from __future__ import annotations

import base64
import io
import math
from typing import Sequence

from visual_rft.report.read import Series

# (label, steps, values, std band or None)
Line = tuple[str, Sequence[float], Sequence[float], Sequence[float] | None]
Panel = tuple[str, list[Line]]

GROUPS = ("reward", "eval", "accuracy", "kl", "completion_length", "loss", "parse_failure_rate", "time", "other")


def group_of(key: str) -> str:
    """Which figure a metrics key belongs to (the issue's list: rewards, accuracy/mAP, KL,
    completion length, loss, parse failures, time per phase; the rest under "other")."""
    low = key.lower()
    if low.startswith("reward/"):
        return "reward"
    if low.startswith("eval/"):  # held-out metrics logged during training (evaluate.TrainingEval)
        return "eval"
    if low.startswith("time/"):
        return "time"
    if "accuracy" in low or "map" in low.split("/")[-1]:
        return "accuracy"
    if low == "kl" or low.startswith("kl") or "/kl" in low:
        return "kl"
    for name in ("completion_length", "parse_failure_rate"):
        if low.startswith(name):
            return name
    return "loss" if "loss" in low else "other"


# counts logged beside the metrics (how many records an eval scored): numbers, but not curves
NOT_CURVES = ("num_samples", "eval_records", "num_records")


def group_curves(keys: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in sorted(keys):
        if key.split("/")[-1] in NOT_CURVES:
            continue
        out.setdefault(group_of(key), []).append(key)
    return {g: out[g] for g in GROUPS if g in out}


def reward_panels(curves: dict[str, Series], keys: Sequence[str]) -> list[Panel]:
    """One panel per reward component: its mean with a +-std band when the std is logged."""
    panels: list[Panel] = []
    for key in keys:
        if key.endswith("_std") and key[:-4] + "_mean" in curves:
            continue  # drawn as the band of its mean
        xs, ys = curves[key].points()
        band = None
        std_key = key[:-5] + "_std" if key.endswith("_mean") else None
        if std_key in curves:
            sx, sy = curves[std_key].points()
            band = sy if len(sy) == len(ys) else None
        panels.append((key, [(key.removeprefix("reward/"), xs, ys, band)]))
    return panels


def group_panels(group: str, curves: dict[str, Series], keys: Sequence[str]) -> list[Panel]:
    """Phase times share one panel (same unit, and their sum is the step time); other keys get a
    panel each, since lr (1e-6) next to grad_norm (1.0) would draw lr as a flat zero line."""
    if group == "reward":
        return reward_panels(curves, keys)
    if group == "time":
        return [("time per phase (s)", [(key.removeprefix("time/"), *curves[key].points(), None) for key in keys])]
    return [(key, [(key, *curves[key].points(), None)]) for key in keys]


def overlay_panels(runs: dict[str, dict[str, Series]], keys: Sequence[str]) -> list[Panel]:
    """One panel per key with one line per run that logged it."""
    return [(key, [(name, *curves[key].points(), None) for name, curves in runs.items() if key in curves])
            for key in keys]


def panels_png(panels: Sequence[Panel], ncols: int = 3) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows), dpi=80)
    FigureCanvasAgg(fig)
    for i, (title, lines) in enumerate(panels):
        draw_panel(fig.add_subplot(nrows, ncols, i + 1), title, lines)
    _margins(fig, 4.2 * ncols, 2.8 * nrows)
    return _uri(fig)


def draw_panel(ax, title: str, lines: Sequence[Line], first_color: int = 0) -> None:
    from matplotlib.ticker import MaxNLocator

    for j, line in enumerate(lines):
        _plot(ax, line, f"C{(first_color + j) % 10}")
    ax.set_ylim(*y_limits(lines))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at 1.5
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=7)


def y_limits(lines: Sequence[Line]) -> tuple[float, float]:
    """The y-range of the data: lines and their std bands, but a band never takes a 0..1 quantity
    (a reward, a rate) past 0 or 1 (matplotlib's own range ran such panels from -0.2 to 1.2)."""
    values = [float(y) for _, _, ys, _ in lines for y in ys if math.isfinite(y)]
    if not values:
        return 0.0, 1.0
    spread = [float(y) + sign * float(s) for _, _, ys, band in lines if band is not None
              for y, s in zip(ys, band) for sign in (-1, 1) if math.isfinite(y) and math.isfinite(s)]
    low, high = min(values + spread), max(values + spread)
    if 0 <= min(values) and max(values) <= 1:
        low, high = max(low, 0.0), min(high, 1.0)
    # a constant series (lr 3e-4 throughout) gets a range around its value, not a +-0.05 one that
    # draws it at "0.00"
    pad = 0.04 * (high - low) if high > low else (0.05 * abs(high) if high else 0.05)
    return low - pad, high + pad


def _margins(fig, width: float, height: float) -> None:
    """Fixed margins in inches: tight_layout draws every figure twice, doubling the report's time."""
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - 0.3 / height,
                        wspace=0.35, hspace=0.55)


def _plot(ax, line: Line, color: str) -> None:
    label, xs, ys, band = line
    if band is not None:
        ax.fill_between(xs, [y - s for y, s in zip(ys, band)], [y + s for y, s in zip(ys, band)],
                        color=color, alpha=0.15, linewidth=0)
    marker = "o" if len(xs) <= 30 else None  # few points: show where the logged steps are
    if len(ys) > 50:  # noisy RL curves: raw in light colour, a moving average on top
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(xs, moving_average(ys, max(2, len(ys) // 25)), color=color, label=label, linewidth=1.6)
    else:
        ax.plot(xs, ys, color=color, label=label, marker=marker, markersize=3, linewidth=1.4)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def bars_png(title: str, names: Sequence[str], values: Sequence[float]) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 * len(names) + 2, 2.8), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(list(names), list(values), color=[f"C{i % 10}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if all(0 <= v <= 1 for v in values):  # rates and accuracies: keep the full 0..1 scale honest
        ax.set_ylim(0, 1.08)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return _uri(fig)


def _uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
