"""Check every record before training or evaluation: images decode, fields exist, labels and boxes parse.

Run by `visual-rft data check CONFIG` and at the start of `train`, `sft` and `eval`. Each problem
names its record's source (file:row); `data.on_bad_record` decides whether a bad record stops the run
(`fail`, the default) or is skipped and counted (`skip`). With tools (tools.enabled) a record's
`tool_calls` trajectory is checked too: every call parses and runs on the record's images
(tools/trajectory.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from visual_rft.data.errors import DataError
from visual_rft.data.record import DEFAULT_MAX_IMAGE_PIXELS, ImageLike, Record, answer_text, load_rgb, open_image
from visual_rft.rewards import task_module

if TYPE_CHECKING:
    from visual_rft.tools.trajectory import TrajectoryCheck

# Larger images are refused rather than decoded: a 100k x 100k PNG would take the machine's memory.


@dataclass
class CheckReport:
    """What `check_records` found: counts and one (source, reason) per bad record."""

    total: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)  # image modes seen (L, RGBA, CMYK, I;16, P, ...)

    @property
    def bad(self) -> int:
        return len(self.problems)

    def summary(self, limit: int = 10) -> str:
        lines = [f"{self.total} records checked, {self.bad} bad"]
        lines += [f"  {source}: {reason}" for source, reason in self.problems[:limit]]
        if self.bad > limit:
            lines.append(f"  ... and {self.bad - limit} more")
        return "\n".join(lines)


def _image_problem(record: Record, max_pixels: int, modes: dict[str, int]) -> str | None:
    """The first problem among the record's images (each one checked), naming which image when it has several."""
    images = record.images
    for index, image in enumerate(images):
        problem = _one_image_problem(image, max_pixels, modes)
        if problem is not None:
            return problem if len(images) == 1 else f"image {index + 1} of {len(images)}: {problem}"
    return None


def _one_image_problem(image: ImageLike, max_pixels: int, modes: dict[str, int]) -> str | None:
    try:
        if not isinstance(image, Image.Image):
            with open_image(image) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    return f"image is {width}x{height}, over the limit of {max_pixels:,} pixels"
                modes[opened.mode] = modes.get(opened.mode, 0) + 1
        else:
            modes[image.mode] = modes.get(image.mode, 0) + 1
            if image.size[0] * image.size[1] > max_pixels:
                return f"image is {image.size[0]}x{image.size[1]}, over the limit of {max_pixels:,} pixels"
        rgb = load_rgb(image)  # the full decode, with the same mode conversion training uses
    except (ValueError, OSError, Image.DecompressionBombError) as exc:
        return f"image does not decode: {exc}"
    if rgb.size[0] < 1 or rgb.size[1] < 1:
        return "image is empty"
    return None


def _label_problem(record: Record, task: str) -> str | None:
    if not isinstance(record.solution, str) or not record.solution.strip():
        return "empty solution"
    if task == "classification":
        return None if answer_text(record.solution) else "solution has an empty answer"
    try:  # the task's own solution parser: ground truth that the reward could not read is bad data
        task_module(task).parse_solution(record.solution)
    except (ValueError, TypeError, KeyError) as exc:
        return f"solution does not parse as {task} ground truth: {exc}"
    return None


def _trajectory_problem(record: Record, tools: "TrajectoryCheck", max_pixels: int, decode: bool) -> str | None:
    images = record.load_images(max_pixels) if decode else None  # they decoded: _image_problem passed
    return tools.problem(record.fields, images)


def check_records(records: list[Record], task: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  decode: bool = True, tools: "TrajectoryCheck | None" = None) -> CheckReport:
    """`tools`: check each record's `tool_calls` as a run with those tools would make them."""
    report = CheckReport(total=len(records))
    for record in records:
        problem = _label_problem(record, task)
        if problem is None and decode:
            problem = _image_problem(record, max_pixels, report.modes)
        if problem is None and tools is not None:
            problem = _trajectory_problem(record, tools, max_pixels, decode)
        if problem is not None:
            report.problems.append((record.source or "?", problem))
    return report


def apply_policy(records: list[Record], report: CheckReport, policy: str, what: str) -> list[Record]:
    """`fail`: raise naming the bad records; `skip`: drop them (the count is printed)."""
    if not report.bad:
        return records
    if policy == "fail":
        raise DataError(f"{what}: {report.summary()}\n(set data.on_bad_record=skip to drop bad records instead)")
    bad_sources = {source for source, _ in report.problems}
    kept = [r for r in records if (r.source or "?") not in bad_sources]
    print(f"{what}: skipping {len(records) - len(kept)} bad records of {len(records)}\n{report.summary()}")
    if not kept:
        raise DataError(f"{what}: every record is bad")
    return kept


def checked(records: list[Record], task: str, policy: str, what: str, **kwargs: Any) -> list[Record]:
    return apply_policy(records, check_records(records, task, **kwargs), policy, what)
