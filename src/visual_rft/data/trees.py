"""Real detection data that ships inside the `deepforest` wheel: aerial photos with tree boxes.

`deepforest/data/` holds four photos with Pascal-VOC annotations (`<stem>.png` + `<stem>.xml`):
two NEON Yellowstone crops (2299x2472 with 574 boxes, 1249x1035 with 279), OSBS_029 (400x400,
61) and SOAP_061 (400x400, 37) = 951 boxes. SOAP_061 labels its trees "Dead" / "Alive"; every
box is a tree crown here, so all become the category "tree". Files are read from the installed
package directory; deepforest itself is never imported (it pulls in torch-vision stacks).

Tiling: each photo is cut into `tile` x `tile` crops, the fewest per side that cover it, spread
evenly (starts round(i * (L - tile) / (n - 1))), so every tile is full-size, the photo is covered
and neighbours overlap by a few pixels (a box in an overlap can belong to both tiles). A box is kept in a tile when at least `min_visible` (default
0.5) of its area lies inside, clipped to the tile; boxes less visible than that are dropped (a
crown cut in half by the tile edge is still a crown; a sliver is not a fair target). A tile whose
dropped slivers are its only trees has no positive query; `include_empty` turns such tiles into
"No Objects" queries. Everything is a pure function of the files and the arguments; `seed` only
orders the records (and `tree_splits` cuts train/test per photo), so two calls give identical records.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from PIL import Image

from visual_rft.data.errors import DataError
from visual_rft.data.fewshot import split_records
from visual_rft.data.record import Record
from visual_rft.data.targets import detection_solution, to_target
from visual_rft.tasks.boxes import BoxSpace

INSTALL_HINT = "pip install --no-deps deepforest==2.1.0  (only its data files are used)"
CATEGORY = "tree"


def deepforest_data_dir() -> Path:
    """The installed `deepforest/data` folder, found without importing deepforest."""
    candidates = []
    spec = importlib.util.find_spec("deepforest")
    if spec is not None:
        candidates += [Path(loc) / "data" for loc in spec.submodule_search_locations or []]
    try:
        candidates.append(Path(str(importlib.metadata.distribution("deepforest").locate_file("deepforest/data"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.xml")):
            return folder
    if not candidates:
        raise DataError(f"the embedded tree photos come from the deepforest wheel, not installed: {INSTALL_HINT}")
    raise DataError(f"deepforest is installed but {candidates[0]} has no annotated photos; {INSTALL_HINT}")


def _voc_boxes(xml_path: Path) -> tuple[tuple[int, int], list[list[float]]]:
    """((width, height), xyxy boxes) of one Pascal-VOC file; malformed entries are DataErrors."""
    try:
        root = ET.parse(xml_path).getroot()
        size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
        boxes = [[float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for obj in root.iter("object")]
    except (ET.ParseError, TypeError, ValueError) as exc:
        raise DataError(f"{xml_path}: not a readable Pascal-VOC annotation: {exc}") from exc
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if not (0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]):
            raise DataError(f"{xml_path}: object {i + 1} box {boxes[i]} is degenerate or outside {size}")
    return size, boxes


@functools.lru_cache(maxsize=1)
def tree_photos() -> tuple[tuple[str, Image.Image, tuple[list[float], ...]], ...]:
    """(stem, RGB photo, boxes) for every `<stem>.xml` with a `<stem>.png`, sorted by stem (cached)."""
    folder = deepforest_data_dir()
    photos = []
    for xml_path in sorted(folder.glob("*.xml")):
        png = xml_path.with_suffix(".png")
        if not png.is_file():
            continue  # an annotation without its photo in this wheel
        size, boxes = _voc_boxes(xml_path)
        with Image.open(png) as img:
            image = img.convert("RGB")
        if image.size != size:
            raise DataError(f"{xml_path}: says {size[0]}x{size[1]} but {png.name} is {image.size[0]}x{image.size[1]}")
        photos.append((xml_path.stem, image, tuple(boxes)))
    if not photos:
        raise DataError(f"{folder}: no <name>.png with a <name>.xml annotation; {INSTALL_HINT}")
    return tuple(photos)


def tile_origins(length: int, tile: int) -> list[int]:
    """Grid starts along one side: the fewest full tiles that cover it, spread evenly."""
    if length <= tile:
        return [0]
    n = -(-length // tile)
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def boxes_in_tile(boxes: tuple[list[float], ...], x0: int, y0: int, tile: tuple[int, int],
                  min_visible: float) -> list[list[float]]:
    """Boxes with at least `min_visible` of their area inside the tile, clipped, in tile pixels."""
    kept = []
    for x1, y1, x2, y2 in boxes:
        cx1, cy1 = max(x1, x0), max(y1, y0)
        cx2, cy2 = min(x2, x0 + tile[0]), min(y2, y0 + tile[1])
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        if (cx2 - cx1) * (cy2 - cy1) >= min_visible * (x2 - x1) * (y2 - y1):
            kept.append([cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0])
    return kept


def tree_records(*, tile: int = 224, min_visible: float = 0.5, box_space: BoxSpace | str = BoxSpace.QWEN2VL,
                 include_empty: bool = False, seed: int = 0, limit: int | None = None) -> list[Record]:
    """Detection records of the tiled tree photos (in-memory RGB tiles), in a seeded order.

    Fields as coco.load_coco's: `category` "tree", `category_id` 1, `image_id` (tile number in
    grid order), `boxes` (in `box_space`), `boxes_pixels` (tile pixels), `areas`, `image_size`,
    `orig_size`, `box_space`, `crowd` (empty), plus `photo` (file stem) and `origin` ([x, y] of the tile in the photo).
    """
    if tile < 28:
        raise DataError(f"tile must be at least 28 px (one Qwen2-VL patch pair), got {tile}")
    if not 0 < min_visible <= 1:
        raise DataError(f"min_visible must be in (0, 1], got {min_visible}")
    space = BoxSpace.parse(box_space)
    records: list[Record] = []
    for stem, photo, boxes in tree_photos():
        width, height = photo.size
        size = (min(tile, width), min(tile, height))
        for y0 in tile_origins(height, tile):
            for x0 in tile_origins(width, tile):
                kept = boxes_in_tile(boxes, x0, y0, size, min_visible)
                if kept or include_empty:
                    records.append(_tile_record(photo, stem, x0, y0, size, kept, space, len(records)))
    random.Random(f"{seed}:trees").shuffle(records)
    return records[:limit] if limit is not None else records


def _tile_record(photo: Image.Image, stem: str, x0: int, y0: int, size: tuple[int, int],
                 boxes: list[list[float]], space: BoxSpace, number: int) -> Record:
    crop = photo.crop((x0, y0, x0 + size[0], y0 + size[1]))
    targets = [to_target(b, size, size, space) for b in boxes]
    fields: dict[str, Any] = {
        "category": CATEGORY, "category_id": 1, "image_id": number + 1, "boxes": targets,
        "boxes_pixels": boxes, "areas": [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes],
        "image_size": [size[0], size[1]], "orig_size": [size[0], size[1]], "box_space": space.value,
        "crowd": [], "photo": stem, "origin": [x0, y0],
    }
    return Record(crop, "", detection_solution(targets), fields, f"deepforest:{stem}.png@{x0},{y0}")


def tree_splits(test_fraction: float = 0.25, *, seed: int = 0, **kwargs: Any) -> dict[str, list[Record]]:
    """{'train': ..., 'test': ...}: a seeded split of the tiles, stratified by photo."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    records = tree_records(seed=seed, **kwargs)
    return split_records(records, {"train": 1 - test_fraction, "test": test_fraction}, seed=seed,
                         stratify_key="photo")


def trees_from_spec(name: str, *, limit: int | None = None, box_space: str | None = None) -> list[Record]:
    """Records for `embedded:trees[::train|::test][?tile=112&min_visible=0.5&box_space=pixels&empty=1
    &seed=0&test_fraction=0.25]` (sources.load_records passes the part after `embedded:`); the train/test
    split is tree_splits' (75/25, stratified by photo)."""
    head, _, query = name.partition("?")
    base, _, split = head.partition("::")
    if base != "trees":
        raise DataError(f"embedded:{name}: unknown embedded dataset (available: embedded:trees[::train|::test])")
    kwargs: dict[str, Any] = {"box_space": box_space} if box_space else {}  # the spec's own option wins
    casts = {"tile": int, "min_visible": float, "box_space": str, "seed": int, "test_fraction": float,
             "empty": lambda v: v.lower() in ("1", "true", "yes")}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in casts:
            raise DataError(f"embedded:{name}: unknown option {key!r}; known: {sorted(casts)}")
        try:
            kwargs["include_empty" if key == "empty" else key] = casts[key](value)
        except ValueError as exc:
            raise DataError(f"embedded:{name}: bad value for {key}: {value!r}") from exc
    if not split:
        kwargs.pop("test_fraction", None)
        return tree_records(limit=limit, **kwargs)
    splits = tree_splits(**kwargs)
    if split not in splits:
        raise DataError(f"embedded:{name}: unknown split {split!r} (available: train, test)")
    return splits[split][:limit] if limit is not None else splits[split]
