"""HTML pieces of the run report. Every string that reaches the page goes through `esc` here:
completions are model output (hostile text), and prompts, labels, sources and configs are user data.
The page is one file: inline CSS, no scripts, images as data URIs, nothing fetched from anywhere."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

MAX_TEXT = 4000  # characters of one completion/prompt shown; a runaway generation stays readable

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#243447;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.8;font-size:12px}
nav{padding:8px 24px;background:#e9eef3;font-size:13px}nav a{margin-right:14px;color:#243447}
main{padding:8px 24px 40px;max-width:1400px}
section.run{border-top:3px solid #243447;margin-top:28px}
h2{font-size:18px;margin:18px 0 8px}h3{font-size:15px;margin:16px 0 6px;color:#243447}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace}
details{margin:6px 0}summary{cursor:pointer;color:#243447}
details pre{background:#fff;border:1px solid #d5dbe1;padding:8px;max-height:480px;overflow:auto}
img.curve{display:block;max-width:100%;margin:6px 0 14px;border:1px solid #e1e5ea;background:#fff}
.group{display:flex;gap:14px;background:#fff;border:1px solid #d5dbe1;border-radius:6px;padding:10px;margin:10px 0}
.thumb img{image-rendering:pixelated;border:1px solid #ccc}.thumb{flex:none}
.placeholder{width:192px;height:192px;display:flex;align-items:center;justify-content:center;
 background:repeating-linear-gradient(45deg,#eee,#eee 8px,#f7f7f7 8px,#f7f7f7 16px);color:#888;border:1px solid #ccc}
.texts{flex:1;min-width:0}.meta{font-size:12px;color:#555;margin-bottom:4px}
tr.parse-fail td{background:#fde2e2}tr.parse-fail td.text pre{color:#8a1c1c}
table.completions td:first-child{white-space:nowrap}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#d62728;color:#fff;
 margin-left:4px}
.badge.ok{background:#2ca02c}.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
td.cm{text-align:right;min-width:28px}td.diag{font-weight:bold;outline:1px solid #2ca02c}
.bar{display:inline-block;height:10px;background:#1f77b4;vertical-align:middle;margin-right:6px}
.note{color:#666;font-size:12px}
.turn{border-left:3px solid #d5dbe1;padding-left:6px;margin:4px 0}.tool{font-size:12px;color:#243447;margin:2px 0}
img.tool-image{display:block;image-rendering:pixelated;border:1px solid #ccc;margin:2px 0 4px}
"""

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPECIAL_RUN = re.compile(r"(<\|[A-Za-z_]+\|>)(?:\1){3,}")


def esc(value: Any) -> str:
    """HTML-escaped text; C0 control characters (which tiny models emit) shown as control pictures."""
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group()) % 0x5E), html.escape(str(value), quote=True))


def fmt(value: Any) -> str:
    """A table cell's text, escaped: floats to 4 significant digits, None as a dash."""
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return esc(f"{value:.4g}") if math.isfinite(value) else esc(value)
    return esc(value)


def clip(text: Any, limit: int = MAX_TEXT) -> str:
    """Escaped text, cut at `limit` characters with a note of how much was cut."""
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return esc(text)
    return esc(text[:limit]) + f'<span class="note"> &hellip; ({len(text) - limit} more characters)</span>'


def squeeze_prompt(prompt: Any) -> str:
    """The chat prompt with long runs of one special token (the image pads) written once with a count."""
    return _SPECIAL_RUN.sub(lambda m: f"{m.group(1)}×{len(m.group(0)) // len(m.group(1))}", str(prompt or ""))


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{links}</nav>"
            f"<main>{body}</main></body></html>\n")


def section(anchor: str, title: str, body: str, cls: str = "run") -> str:
    return f'<section class="{cls}" id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def sub(title: str, body: str) -> str:
    return f"<h3>{esc(title)}</h3>{body}"


def details(summary: str, text: str, cls: str = "") -> str:
    return f'<details class="{esc(cls)}"><summary>{esc(summary)}</summary><pre>{clip(text, 200_000)}</pre></details>'


def img(uri: str, alt: str, cls: str = "curve") -> str:
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="{esc(uri)}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(header: Sequence[Any], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><tr>{head}</tr>{body}</table>'


def _cell(value: Any) -> str:
    num = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{fmt(value)}</td>' if num else f"<td>{fmt(value)}</td>"


def confusion_table(rows: Sequence[str], cols: Sequence[str], counts: Sequence[Sequence[int]]) -> str:
    """Counts as numbers (true label down, predicted across), shaded by each row's share."""
    head = "<th>true \\ predicted</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols)
    lines = []
    for label, values in zip(rows, counts):
        total = max(1, sum(values))
        cells = "".join(
            f'<td class="cm{" diag" if label == col else ""}" '
            f'style="background:rgba(31,119,180,{0.75 * n / total:.2f})">{n}</td>'
            for col, n in zip(cols, values))
        lines.append(f"<tr><th>{esc(label)}</th>{cells}</tr>")
    return f'<table class="confusion">{"<tr>" + head + "</tr>"}{"".join(lines)}</table>'


def bar_table(header: Sequence[str], values: dict[str, Any]) -> str:
    """Name / value rows with an inline bar (per-category AP, per-class accuracy), values in 0..1."""
    lines = []
    for name, value in values.items():
        width = int(120 * min(max(value, 0.0), 1.0)) if isinstance(value, (int, float)) else 0
        lines.append(f'<tr><td>{esc(name)}</td><td class="num"><span class="bar" style="width:{width}px">'
                     f"</span>{fmt(value)}</td></tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


@dataclass
class TurnView:
    """One model turn of a tool conversation, and what the tool answered to it."""

    text: Any
    tool: str = ""  # the call and the tool's answer text; "" for the final turn
    error: str = ""  # the call's error kind, "" when it ran
    image_uri: str | None = None  # the image the tool made


@dataclass
class CompletionView:
    """One completion as the gallery shows it."""

    text: Any
    scores: dict[str, Any] = field(default_factory=dict)  # column -> value (rewards, advantage, ...)
    failed: str = ""  # why it is highlighted ("parse failure", "format 0"); "" when it parsed
    color: str | None = None  # its boxes' colour on the image, for detection/grounding
    turns: list[TurnView] | None = None  # a tool conversation: shown turn by turn instead of `text`


def turns_html(turns: Sequence[TurnView]) -> str:
    """A tool conversation turn by turn: the model's text, the tool's answer, the tool's image."""
    parts = []
    for k, turn in enumerate(turns, start=1):
        parts.append(f'<div class="turn"><span class="meta">turn {k}</span><pre>{clip(turn.text)}</pre>')
        if turn.tool:
            badge = f'<span class="badge">{esc(turn.error)}</span> ' if turn.error else ""
            parts.append(f'<div class="tool">{badge}tool: {clip(turn.tool, 1000)}</div>')
        if turn.image_uri:
            parts.append(img(turn.image_uri, f"tool image, turn {k}", "tool-image"))
        parts.append("</div>")
    return "".join(parts)


def group_html(meta: str, image_uri: str | None, prompt: Any, solution: Any,
               completions: Sequence[CompletionView], columns: Sequence[str], step: Any = "", extra: str = "") -> str:
    thumb = (img(image_uri, "input image", "") if image_uri
             else '<div class="placeholder">no image</div>')
    head = "".join(f"<th>{esc(c)}</th>" for c in ["#", "completion", *columns])
    rows = []
    for i, c in enumerate(completions):
        swatch = f'<span class="swatch" style="background:{esc(c.color)}"></span>' if c.color else ""
        badge = f'<span class="badge">{esc(c.failed)}</span>' if c.failed else ""
        cells = "".join(_cell(c.scores.get(col)) for col in columns)
        text = turns_html(c.turns) if c.turns else f"<pre>{clip(c.text)}</pre>"
        rows.append(f'<tr class="{"parse-fail" if c.failed else "parsed"}"><td>{swatch}{i + 1}{badge}</td>'
                    f'<td class="text">{text}</td>{cells}</tr>')
    prompt_html = (f"<details><summary>prompt</summary><pre>{clip(squeeze_prompt(prompt))}</pre></details>"
                   if prompt else "")
    return (f'<div class="group" data-step="{esc(step)}"><div class="thumb">{thumb}</div><div class="texts">'
            f'<div class="meta">{esc(meta)}</div>{prompt_html}'
            f"<div>solution: <code>{clip(solution, 1000)}</code></div>{extra}"
            f'<table class="completions"><tr>{head}</tr>{"".join(rows)}</table></div></div>')
