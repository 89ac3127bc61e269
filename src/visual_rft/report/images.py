"""Images for the run report: find a record's image from its `source`, read the boxes of a
detection/grounding answer and its solution, draw them on the image and embed it as a PNG data URI.

Everything here degrades to "no image" / "no boxes" instead of raising: a report of a broken or
moved run should still show the text and the curves."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw

from visual_rft.data.record import load_rgb
from visual_rft.tasks.boxes import Box, BoxSpace, from_space

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PALETTE = ["#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#aec7e8"]
GT_COLOR = "#2ca02c"
DISPLAY_MIN, DISPLAY_MAX = 192, 384  # digits are 56 px: scale up so boxes and strokes are visible
_JSONL_ROW = re.compile(r"^(.*\.jsonl):(\d+)$")
_GROUNDING_BOX = re.compile(r"\(\s*\d+\s*,\s*\d+\s*\)\s*,\s*\(\s*\d+\s*,\s*\d+\s*\)")
_BAD_IMAGE = (OSError, ValueError, Image.DecompressionBombError)


@dataclass
class Found:
    path: Path | list[Path] | None = None  # a list: a record with several images, all shown side by side
    row: dict[str, Any] = field(default_factory=dict)  # the data row (box_space, image_size, ...)
    record: Any = None  # a loaded data.record.Record, for images held in the data (parquet / arrow bytes)

    @property
    def image(self) -> Any:
        """What render_image draws: the image file, else the record that holds the image."""
        return self.path if self.path is not None else self.record


@dataclass(frozen=True)
class DataSpec:
    """A dataset a run read (its config's data.train / data.eval), to find records' images by source."""

    path: str
    image_root: str | None = None
    task: str = "classification"
    limit: int | None = None


class ImageFinder:
    """Resolves sources to images: an image path, `FILE.jsonl:LINE` (the row's `image`, relative to
    the file), a source listed in a split's manifest.json (the demo's digits come from a packaged
    array, and data/<split>/ holds their PNGs), else the record of that source in a dataset the run
    read (`datasets`: its config's data.train / data.eval) or in the dataset the source names
    (`FILE.parquet:ROW`, `FILE.json:ROW`, `DIR::split:ROW`): images held as bytes (parquet,
    save_to_disk), embedded digits and COCO records all come back through the loaders that made them."""

    def __init__(self, roots: Sequence[Path], datasets: Sequence[DataSpec] = ()) -> None:
        self.roots = [Path(r) for r in roots]
        self.datasets = list(dict.fromkeys(datasets))
        self._manifest: dict[str, tuple[Path, int]] | None = None
        self.cache: dict[str, Found] = {}

    def find_many(self, sources: Iterable[Any]) -> dict[str, Found]:
        wanted: dict[Path, dict[int, list[str]]] = {}
        asked = {str(s) for s in sources if s is not None}
        for source in asked - set(self.cache):
            self.cache[source] = Found()
            target = self._locate(source)
            if isinstance(target, Path):
                self.cache[source] = Found(target)
            elif target is not None:
                wanted.setdefault(target[0], {}).setdefault(target[1], []).append(source)
        for path, lines in wanted.items():
            for number, row in _rows_at(path, set(lines)):
                image = _image_path(row.get("image") or row.get("images"), path.parent)
                for source in lines[number]:
                    self.cache[source] = Found(image, row)
        missing = {s for s in asked if self.cache[s].image is None}
        if missing:
            self._from_datasets(missing)
        return self.cache

    def _from_datasets(self, missing: set[str]) -> None:
        """Load the run's datasets (then those the sources name) until every source has its record.
        A dataset is read again for a later section's sources: only the records asked for are kept
        (their images may be in memory), so one read for the training gallery does not cover the
        eval cards of the same dataset (they said "no image" when reported together)."""
        for spec in dict.fromkeys([*self.datasets, *_named_datasets(missing)]):
            if not missing:
                return
            for record in _load_quietly(spec):
                if record.source in missing:
                    missing.discard(record.source)
                    on_disk = all(isinstance(image, Path) for image in record.images)
                    self.cache[record.source] = Found(record.image if on_disk else None, dict(record.fields), record)

    def _locate(self, source: str) -> Path | tuple[Path, int] | None:
        direct = self._file(source)
        if direct is not None and direct.suffix.lower() in IMAGE_SUFFIXES:
            return direct
        match = _JSONL_ROW.match(source)
        if match and self._file(match.group(1)) is not None:
            return self._file(match.group(1)), int(match.group(2))
        return self.manifest().get(source)

    def _file(self, name: str) -> Path | None:
        path = Path(name)
        for candidate in [path] if path.is_absolute() else [path, *(r / path for r in self.roots)]:
            try:
                if candidate.is_file():
                    return candidate
            except (OSError, ValueError):  # a hostile or overlong "source" is just not a file
                continue
        return None

    def manifest(self) -> dict[str, tuple[Path, int]]:
        """source -> (data.jsonl, line) from every data/<split>/manifest.json under the roots."""
        if self._manifest is None:
            self._manifest = {}
            for root in self.roots:
                for manifest in sorted(root.glob("data/*/manifest.json")):
                    try:
                        sources = json.loads(manifest.read_text(encoding="utf-8")).get("sources", [])
                    except (OSError, ValueError, AttributeError):
                        continue
                    for line, source in enumerate(sources, start=1):  # write_split: one row per line
                        self._manifest.setdefault(str(source), (manifest.parent / "data.jsonl", line))
        return self._manifest


_DATASET_ROW = re.compile(r"^(.*\.(?:json|parquet)|.*::[^:/]+):(\d+)$")


def _named_datasets(sources: Iterable[str]) -> list[DataSpec]:
    """`FILE.json:ROW`, `FILE.parquet:ROW`, `DIR::split:ROW` name their dataset; load up to the last row."""
    rows: dict[str, int] = {}
    for source in sources:
        match = _DATASET_ROW.match(source)
        if match and Path(match.group(1).split("::")[0]).exists():
            rows[match.group(1)] = max(rows.get(match.group(1), 0), int(match.group(2)))
    return [DataSpec(path, limit=last) for path, last in sorted(rows.items())]


def _load_quietly(spec: DataSpec) -> list[Any]:
    """The records of `spec`, or none when it cannot be read now (moved, deleted, malformed): a report
    of such a run still shows its text and curves."""
    from visual_rft.data.sources import load_records

    try:
        return load_records(spec.path, task=spec.task, image_root=spec.image_root, limit=spec.limit)
    except (ValueError, OSError, ImportError, KeyError, TypeError, RuntimeError):
        return []


def _rows_at(path: Path, numbers: set[int]) -> Iterable[tuple[int, dict[str, Any]]]:
    """The rows at the given 1-based line numbers, read in one streaming pass."""
    last = max(numbers)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, start=1):
                if number in numbers:
                    try:
                        row = json.loads(line)
                    except (ValueError, RecursionError):
                        continue
                    if isinstance(row, dict):
                        yield number, row
                if number >= last:
                    return
    except OSError:
        return


def _image_path(value: Any, base: Path) -> Path | list[Path] | None:
    if isinstance(value, list):  # a row's `images`: every one of them, or none
        paths = [_image_path(item, base) for item in value]
        return paths if paths and all(isinstance(p, Path) for p in paths) else None
    if isinstance(value, dict):  # HF image feature {"bytes", "path"}: only the path is usable here
        value = value.get("path")
    if not isinstance(value, str) or not value:
        return None
    path = Path(value) if Path(value).is_absolute() else base / value
    return path if path.is_file() else None


# ---------------------------------------------------------------- boxes

def infer_task(solution: Any, configured: str | None = None) -> str:
    """The run's configured task, else a guess from the solution's layout."""
    if configured in ("classification", "detection", "grounding"):
        return configured
    text = str(solution or "")
    if "Position" in text or "no objects" in text.casefold():
        return "detection"
    return "grounding" if _GROUNDING_BOX.search(text) else "classification"


@dataclass
class Boxes:
    """Boxes in the space they were written in, and that space (sizes come from the data row)."""

    gt: list[Box]
    pred: list[Box] | None  # None: the answer did not parse
    space: BoxSpace = BoxSpace.QWEN2VL
    declared_size: tuple[float, float] | None = None


def read_boxes(task: str, mode: str, completion: Any, solution: Any, row: dict[str, Any]) -> Boxes | None:
    """Ground-truth and predicted boxes of a detection/grounding answer; None for other tasks."""
    if task not in ("detection", "grounding"):
        return None
    from visual_rft.tasks import detection, grounding

    text, sol = str(completion or ""), str(solution or "")
    try:  # a malformed solution raises ValueError in the parsers: show the text without boxes
        if task == "grounding":
            pred = grounding.parse_answer(text, mode=mode)
            return Boxes([grounding.parse_solution(sol)], None if pred is None else [pred])
        space = BoxSpace.parse(row.get("box_space") or BoxSpace.QWEN2VL)
        size = row.get("image_size")
        parsed = detection.parse_answer(text, mode=mode, box_space=space, image_size=size)
        pred_boxes = None if parsed is None else [b for b, _ in parsed]
        declared = tuple(size) if isinstance(size, (list, tuple)) and len(size) == 2 else None
        return Boxes(detection.parse_solution(sol), pred_boxes, space, declared)
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None


def to_pixels(box: Sequence[Any], boxes: Boxes, width: int, height: int) -> Box | None:
    """A box in pixels of the image on disk; None when it is not 4 finite numbers."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    if boxes.space is BoxSpace.PIXELS and boxes.declared_size and min(boxes.declared_size) > 0:
        # pixel boxes refer to the image the model saw; the file on disk may be larger or smaller
        sx, sy = width / boxes.declared_size[0], height / boxes.declared_size[1]
        return values[0] * sx, values[1] * sy, values[2] * sx, values[3] * sy
    return from_space(values, width, height, boxes.space)


# ---------------------------------------------------------------- drawing

def _open_all(path: Any) -> list[Image.Image]:
    """The RGB images behind `path`: an image file, a list of them, or a data Record (bytes, in-memory
    images or files; all of a multi-image record's)."""
    if hasattr(path, "load_images"):
        return path.load_images()
    # the loader's decoding (data.record.load_rgb): a 16-bit image shows as it trained, not clipped white
    return [load_rgb(one, str(one)) for one in (path if isinstance(path, list) else [path])]


def _scale(img: Image.Image) -> float:
    width, height = img.size
    return min(DISPLAY_MAX / max(width, height), max(1.0, DISPLAY_MIN / max(width, height)))


def _display(img: Image.Image) -> Image.Image:
    """The image at display size: small digits scaled up (nearest), large photos down."""
    scale = _scale(img)
    return img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                      Image.NEAREST if scale > 1 else Image.LANCZOS)


def _side_by_side(images: list[Image.Image], gap: int = 6) -> Image.Image:
    strip = Image.new("RGB", (sum(i.size[0] for i in images) + gap * (len(images) - 1),
                              max(i.size[1] for i in images)), "white")
    x = 0
    for img in images:
        strip.paste(img, (x, 0))
        x += img.size[0] + gap
    return strip


def png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_image(path: Any, boxes: Boxes | None = None, pred_colors: Sequence[str] = (),
                 preds: Sequence[Sequence[Box] | None] = ()) -> str | None:
    """A data URI of the image (a file, or a Record holding it) at display size with the ground truth
    (green, thick) and each completion's predicted boxes (its palette colour) drawn on it; None if
    it cannot be read."""
    shown = draw_image(path, boxes, pred_colors, preds)
    return None if shown is None else png_uri(shown)


def draw_image(path: Any, boxes: Boxes | None = None, pred_colors: Sequence[str] = (),
               preds: Sequence[Sequence[Box] | None] = ()) -> Image.Image | None:
    """What render_image shows, as a PIL image (`visual-rft predict` saves it as a PNG)."""
    if path is None:
        return None
    try:
        images = _open_all(path)
    except _BAD_IMAGE:
        return None
    if len(images) > 1:  # several images: side by side, in prompt order (no boxes: box tasks hold one image)
        return _side_by_side([_display(img) for img in images])
    img = images[0]
    width, height = img.size
    shown, scale = _display(img), _scale(img)
    if boxes is not None:
        draw = ImageDraw.Draw(shown)
        for color, pred in zip(pred_colors, preds):
            for box in pred or []:
                _rectangle(draw, to_pixels(box, boxes, width, height), scale, color, 2, shown.size)
        for box in boxes.gt:
            _rectangle(draw, to_pixels(box, boxes, width, height), scale, GT_COLOR, 3, shown.size)
    return shown


def _rectangle(draw: ImageDraw.ImageDraw, box: Box | None, scale: float, color: str, width: int,
               size: tuple[int, int]) -> None:
    if box is None:
        return
    # inverted or far out-of-range boxes (visual_rft mode keeps them) are clamped so PIL can draw them
    xs = sorted(min(max(v * scale, 0), size[0] - 1) for v in (box[0], box[2]))
    ys = sorted(min(max(v * scale, 0), size[1] - 1) for v in (box[1], box[3]))
    draw.rectangle((xs[0], ys[0], xs[1], ys[1]), outline=color, width=width)
