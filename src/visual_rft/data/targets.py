"""What the box-annotation formats (coco, lisa, trees) share: box targets in a box space, the answer
strings built from them, the image check, and the report of what a load kept and skipped."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from visual_rft.data.errors import DataError
from visual_rft.tasks.boxes import BoxSpace, to_space

NO_OBJECTS = "<answer>No Objects</answer>"
_ROUNDING = {BoxSpace.PIXELS: 2, BoxSpace.NORMALIZED: 4}


@dataclass
class LoadReport:
    """What a load kept and what it skipped, so no count hides behind a metric."""

    source: str
    images: int = 0
    annotations: int = 0
    positives: int = 0
    negatives: int = 0
    clipped_boxes: int = 0
    collapsed_boxes: int = 0  # targets that became zero-width/height in the box space (tiny objects)
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    empty_categories: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.positives} positive + {self.negatives} negative queries from {self.images} images"]
        if self.clipped_boxes:
            parts.append(f"{self.clipped_boxes} boxes clipped to the image")
        if self.collapsed_boxes:
            parts.append(f"{self.collapsed_boxes} targets collapsed to zero width/height in the box space")
        parts += [f"skipped {n} {key.replace('_', ' ')}" for key, n in sorted(self.skipped.items()) if n]
        if self.empty_categories:
            parts.append(f"{len(self.empty_categories)} categories without images: {self.empty_categories[:10]}")
        return f"{self.source}: " + "; ".join(parts)


# ---- solutions and sizes ------------------------------------------------------------------------


def detection_solution(boxes: Iterable[Iterable[float]]) -> str:
    """Visual-RFT's detection answer for ground-truth `boxes` (already in the box space)."""
    items = [{"Position": list(box), "Confidence": 1} for box in boxes]
    return f"<answer>{items!r}</answer>" if items else NO_OBJECTS


def grounding_solution(box: Iterable[int]) -> str:
    """Visual-RFT's grounding answer: `<answer> (x1,y1),(x2,y2) </answer>` in 0..1000 integers."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"<answer> ({x1},{y1}),({x2},{y2}) </answer>"


def qwen_input_size(width: int, height: int, *, min_pixels: int = 3136, max_pixels: int = 12845056,
                    factor: int = 28) -> tuple[int, int]:
    """(w, h) of the image Qwen2-VL / Qwen2.5-VL actually sees (its processor's smart_resize)."""
    # transformers takes seconds to import; only specs with min_pixels / max_pixels need it.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(int(height), int(width), factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(w), int(h)


def to_target(box_pixels: list[float], size: tuple[float, float], frame: tuple[float, float],
              space: BoxSpace) -> list[float]:
    """A pixel box (already inside the image) as a training target in `space` of the `frame`."""
    sx, sy = frame[0] / size[0], frame[1] / size[1]
    x1, y1, x2, y2 = box_pixels
    box = to_space((x1 * sx, y1 * sy, x2 * sx, y2 * sy), frame[0], frame[1], space)
    digits = _ROUNDING.get(space)
    return [int(v) for v in box] if digits is None else [round(v, digits) for v in box]


def clip_box(box: list[float], size: tuple[float, float]) -> list[float]:
    return [min(max(box[0], 0.0), size[0]), min(max(box[1], 0.0), size[1]),
            min(max(box[2], 0.0), size[0]), min(max(box[3], 0.0), size[1])]


def resolve_image(path: Path, size: tuple[float, float] | None, where: str, missing: str) -> Path | None:
    """`path` if it is a readable image (of `size`, when given); None when missing and skipped."""
    if not path.is_file():
        if missing == "skip":
            return None
        raise DataError(f"{where}: image file not found: {path} (set the image folder, or skip missing images)")
    if size is not None:
        try:
            with Image.open(path) as img:
                actual = img.size
        except (UnidentifiedImageError, OSError):
            return path  # no image at all: a bad record for the data check to name, like a truncated one
        if actual != (int(size[0]), int(size[1])):
            raise DataError(f"{where}: {path} is {actual[0]}x{actual[1]} but the file says {size[0]:g}x{size[1]:g}")
    return path
