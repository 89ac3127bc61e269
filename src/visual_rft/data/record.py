"""The one record type every loader produces and every task consumes, and how to read its image and answer."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visual_rft.tasks.common import first_answer_dotall

# data.max_image_pixels' default: larger images (width x height) are bad records, never decoded
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


ImageLike = Image.Image | str | Path | bytes  # bytes: an undecodable image, kept for the data check to report


@dataclass
class Record:
    """One labelled example: its image (or several, in prompt order), the question and the verifiable solution.

    `solution` is the string the verifier compares against, in Visual-RFT's layout
    (`<answer>garden phlox</answer>` for classification). `fields` carries task extras that the
    reward functions receive as keyword columns (e.g. `label`, `aliases`, `boxes`, `category`).
    `source` names where the record came from ("file.jsonl:12") so errors can point at it.
    """

    image: ImageLike | list[ImageLike]  # a list: several images, one image slot each in the prompt
    problem: str
    solution: str
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def images(self) -> list[ImageLike]:
        """The record's images in prompt order (one for most records)."""
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]

    def load_images(self, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[Image.Image]:
        """Every image as RGB, in prompt order (see load_image)."""
        images = self.images
        return [load_rgb(image, self._where(i, len(images)), max_pixels) for i, image in enumerate(images)]

    def load_image(self, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
        """The record's one image as RGB, opening it from disk when the record holds a path. An image
        over `max_pixels` is refused from its header, before decoding, as the data check refuses it (a
        decompression bomb stays a clear error with data.check=false too)."""
        images = self.images
        if len(images) != 1:
            raise ValueError(f"{self.source or 'record'}: holds {len(images)} images; use load_images()")
        return load_rgb(images[0], self.source, max_pixels)

    def _where(self, index: int, count: int) -> str:
        return self.source if count == 1 else f"{self.source or 'record'} (image {index + 1} of {count})"

    def columns(self) -> dict[str, Any]:
        """The keyword columns a reward function receives for this record."""
        return {"solution": self.solution, "problem": self.problem, **self.fields}


def load_rgb(image: ImageLike, where: str = "", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """One image (in memory, a path or bytes) as RGB; errors name `where` (the record's source)."""
    what = f"{len(image)} bytes" if isinstance(image, bytes) else image
    try:
        # In-memory images may be lazily decoded (loaders open bytes without decoding).
        if isinstance(image, Image.Image):
            _check_pixels(image, max_pixels, where or "image")
            return to_rgb(image)
        with open_image(image) as img:
            _check_pixels(img, max_pixels, where or str(what))
            img.load()
            # copy: closing the file invalidates `img`, and to_rgb returns RGB images as-is.
            return to_rgb(img.copy())
    except ImageTooLarge:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # SyntaxError: corrupt chunks
        raise ValueError(f"{where or what}: cannot open image {what}: {exc}") from exc


def answer_text(solution: str) -> str:
    """The text inside `<answer>…</answer>`, or the whole solution when it has no tags."""
    inner = first_answer_dotall(solution)
    return (solution if inner is None else inner).strip()


class ImageTooLarge(ValueError):
    """An image over data.max_image_pixels (a possible decompression bomb), refused from its header."""


def _check_pixels(image: Image.Image, max_pixels: int, where: str) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{where}: image is {width}x{height}, over the limit of {max_pixels:,} pixels "
                         "(data.max_image_pixels)")


def open_image(image: str | Path | bytes) -> Image.Image:
    """PIL's lazy open of a path or of raw bytes (use as a context manager)."""
    return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    PIL's own convert("RGB") clips 16/32-bit integer pixels at 255 instead of rescaling them, so a
    16-bit PNG (mode "I;16", or "I" in some Pillow versions) would come out almost white: rescale
    0..65535 to 0..255 first. A 32-bit "I" image already within 0..255 is left as it is.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0 + 0.5
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def columns_of(records: list[Record]) -> dict[str, list[Any]]:
    """Reward columns for a batch: one list per key, aligned with `records` (None where a record lacks it)."""
    rows = [r.columns() for r in records]
    keys = sorted({k for row in rows for k in row})
    return {k: [row.get(k) for row in rows] for k in keys}
