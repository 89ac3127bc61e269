"""LISA-style reasoning-grounding files -> grounding `Record`s (one box per instruction; the `lisa:` spec:
data/detection_source.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from visual_rft.data.errors import DataError
from visual_rft.data.record import Record
from visual_rft.data.rows import json_or_jsonl_rows
from visual_rft.data.targets import LoadReport, clip_box, grounding_solution, resolve_image, to_target
from visual_rft.tasks.boxes import BoxSpace, from_space
from visual_rft.tasks.grounding import parse_solution

_IMG_TAG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


def _lisa_row(row: Any, where: str) -> tuple[Any, list[str], list[float] | None, str | None]:
    """(image, instructions, pixel box or None, 0..1000 answer or None) of one row in any of the
    accepted layouts: {image|image_path, instruction(s)|problem|text, box|boxes} (pixels; the first of
    `boxes`, as the release's gen_box_ann keeps one), or the release's SFT `conversations` file."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {type(row).__name__}, expected an object")
    if "conversations" in row:
        turns = {t.get("from"): str(t.get("value", "")) for t in row["conversations"] if isinstance(t, dict)}
        user, tag = turns.get("user", ""), _IMG_TAG.search(turns.get("user", ""))
        if tag is None or "assistant" not in turns:
            raise DataError(f"{where}: conversations need a user turn with <img>PATH</img> and an assistant box")
        text = _IMG_TAG.sub("", user).strip()
        return tag.group(1).strip(), [text.split("instruction:", 1)[-1].strip()], None, turns["assistant"]
    image = row.get("image_path", row.get("image"))
    texts = next((row[k] for k in ("instruction", "instructions", "problem", "text") if row.get(k)), None)
    texts = [texts] if isinstance(texts, str) else texts
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DataError(f"{where}: needs a non-empty 'instruction' (a string or a list of strings)")
    box = row.get("box", (row.get("boxes") or [None])[0])
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise DataError(f"{where}: needs 'box' [x1, y1, x2, y2] in pixels (4 finite numbers), got {box!r}")
    return image, [t.strip() for t in texts], [float(v) for v in box], None


def load_lisa(path: str | Path, *, image_root: str | Path | None = None, missing_images: str = "error",
              outside_tolerance: float = 2.0, limit: int | None = None) -> tuple[list[Record], LoadReport]:
    """Grounding records, one per instruction: fields `query`, `box` (0..1000 ints, built as
    `int(coord / W * 1000)`), `box_pixels`, `image_size`, `box_space`='qwen2vl'; solution
    `<answer> (x1,y1),(x2,y2) </answer>`. Degenerate boxes are skipped and counted; boxes beyond
    the image by more than `outside_tolerance` px are a DataError; missing images as in load_coco."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report, records = LoadReport(str(path)), []
    for where, row in json_or_jsonl_rows(path):
        image_value, texts, box, answer = _lisa_row(row, where)
        image = resolve_image(root / str(image_value), None, where, missing_images)
        if image is None:
            report.skipped["missing_images"] += 1
            continue
        try:  # the box is placed with the image's size, so an image without one cannot become a record
            with Image.open(image) as img:
                size = (float(img.size[0]), float(img.size[1]))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{where}: {image} is not a readable image: {exc}") from exc
        report.images += 1
        if answer is not None:
            try:
                target = list(parse_solution(f"<answer>{answer}</answer>"))
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from exc
            box = list(from_space(target, size[0], size[1], BoxSpace.QWEN2VL))
        if box[2] <= box[0] or box[3] <= box[1]:
            report.skipped["degenerate_boxes"] += 1
            continue
        if min(box[:2]) < -outside_tolerance or box[2] > size[0] + outside_tolerance or box[3] > size[1] + outside_tolerance:
            raise DataError(f"{where}: box {box} lies outside the {size[0]:g}x{size[1]:g} image {image}")
        report.clipped_boxes += clip_box(box, size) != box
        target = target if answer is not None else to_target(clip_box(box, size), size, size, BoxSpace.QWEN2VL)
        for text in texts:
            fields = {"query": text, "box": target, "box_pixels": box, "image_size": [size[0], size[1]],
                      "box_space": BoxSpace.QWEN2VL.value}
            records.append(Record(image, "", grounding_solution(target), fields, where))
        report.positives = len(records)
        if limit is not None and len(records) >= limit:
            return records[:limit], report
    return records, report
