"""The one record type every loader produces and every task consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass
class Record:
    """One labelled example: an image, the question about it and the verifiable solution.

    `solution` is the string the verifier compares against, in Visual-RFT's layout
    (`<answer>garden phlox</answer>` for classification). `fields` carries task extras that the
    reward functions receive as keyword columns (e.g. `label`, `aliases`, `boxes`, `category`).
    `source` names where the record came from ("file.jsonl:12") so errors can point at it.
    """

    image: Image.Image | str | Path
    problem: str
    solution: str
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def load_image(self) -> Image.Image:
        """Return the image as RGB, opening it from disk when the record holds a path."""
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB") if self.image.mode != "RGB" else self.image
        try:
            with Image.open(self.image) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.source or self.image}: cannot open image {self.image}: {exc}") from exc

    def columns(self) -> dict[str, Any]:
        """The keyword columns a reward function receives for this record."""
        return {"solution": self.solution, "problem": self.problem, **self.fields}
