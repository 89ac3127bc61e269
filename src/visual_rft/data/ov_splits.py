"""Category sets of the paper's detection experiments and the open-vocabulary base/novel splits.

Sources (checked against each other, not taken from memory alone):
- COCO's 80 detection categories, with their official ids, as in `instances_*2017.json`.
- OV-COCO 65/15 (the paper's split; Rahman, Khan & Barnes, "Polarity loss for zero-shot object
  detection", arXiv 1811.08982): the 15 novel names are those of Visual-RFT's release,
  `coco_evaluation/Qwen2_VL_coco_infere.py` ("open vocabulary experiment: 15 new classes"), and
  agree with the 65/15 index lists `UNSEEN_65_15 = [4, 6, 12, 15, 21, 28, 29, 31, 42, 48, 52, 61,
  64, 70, 78]` (0-based contiguous COCO order) found in public zero-shot-detection code. Base = the
  other 65 categories.
- OV-COCO 48/17 (Bansal et al. 2018, used by OVR-CNN and most OVD papers): 17 novel / 48 base, from
  the public `COCO_UNSEEN_CLS` / `seen_class` lists of OVD code; 15 COCO categories are in neither.
- Visual-RFT's few-shot COCO experiment: 8 categories, `selected_cate` in the same release file.
- Visual-RFT's LVIS experiment: 13 rare categories (`lvis_evaluation/Qwen2_VL_lvis_infere.py`), and
  the 6 categories of its LVIS few-shot set (commented out in the same file).
- LVIS rare / common / frequent: the `frequency` field ("r" / "c" / "f") of each category in the
  LVIS json; no list is hard-coded for it.

Open-vocabulary protocol: train only on base-category queries (`filter_to_base`), evaluate on all
and report base / novel / all (det_eval reads the `ov_split` field that `annotate_split` sets).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from visual_rft.data.errors import DataError
from visual_rft.data.record import Record

# (official id, name) in COCO's order; ids skip 12, 26, 29, 30, 45, 66, 68, 69, 71, 83.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"),
    (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"),
    (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_NAMES: tuple[str, ...] = tuple(name for _, name in COCO_CATEGORIES)

# Order as in Visual-RFT's release (it is the order its evaluation notebook averages in).
COCO_OV_NOVEL_15: tuple[str, ...] = (
    "mouse", "fork", "hot dog", "cat", "airplane", "suitcase", "parking meter", "sandwich", "train",
    "hair drier", "toilet", "toaster", "snowboard", "frisbee", "bear",
)
COCO_OV_BASE_65: tuple[str, ...] = tuple(n for n in COCO_NAMES if n not in COCO_OV_NOVEL_15)

COCO_OV_NOVEL_17: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
    "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)
COCO_OV_BASE_48: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
    "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite",
    "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse",
    "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase", "toothbrush",
)

VISUAL_RFT_COCO_FEWSHOT_8: tuple[str, ...] = (
    "bus", "train", "fire hydrant", "stop sign", "cat", "dog", "bed", "toilet",
)
VISUAL_RFT_LVIS_RARE_13: tuple[str, ...] = (
    "casserole", "die", "egg_roll", "futon", "garbage", "handsaw", "hippopotamus", "kitchen_table",
    "mallet", "omelet", "shot_glass", "stepladder", "sugar_bowl",
)
VISUAL_RFT_LVIS_FEWSHOT_6: tuple[str, ...] = (
    "horse_buggy", "die", "kitchen_table", "omelet", "papaya", "stepladder",
)

# Names usable wherever a loader takes a category list (`coco:...?categories=coco_fewshot8`).
NAMED_CATEGORY_SETS: dict[str, tuple[str, ...]] = {
    "coco_fewshot8": VISUAL_RFT_COCO_FEWSHOT_8,
    "coco_base65": COCO_OV_BASE_65,
    "coco_novel15": COCO_OV_NOVEL_15,
    "coco_base48": COCO_OV_BASE_48,
    "coco_novel17": COCO_OV_NOVEL_17,
    "lvis_rare13": VISUAL_RFT_LVIS_RARE_13,
    "lvis_fewshot6": VISUAL_RFT_LVIS_FEWSHOT_6,
}


@dataclass(frozen=True)
class OVSplit:
    """A base/novel category split; `base` trains, both are evaluated."""

    name: str
    base: frozenset[str]
    novel: frozenset[str]

    def group(self, category: str) -> str | None:
        """'base', 'novel', or None for a category in neither (e.g. the 15 left out of 48/17)."""
        if category in self.base:
            return "base"
        if category in self.novel:
            return "novel"
        return None


OV_SPLITS: dict[str, OVSplit] = {
    "coco65_15": OVSplit("coco65_15", frozenset(COCO_OV_BASE_65), frozenset(COCO_OV_NOVEL_15)),
    "coco48_17": OVSplit("coco48_17", frozenset(COCO_OV_BASE_48), frozenset(COCO_OV_NOVEL_17)),
}


def resolve_categories(value: str | Iterable[str]) -> list[str]:
    """A category list from names, a named set (`coco_fewshot8`, ...), or a comma-separated mix."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in (str(i).strip() for i in items):
        for name in NAMED_CATEGORY_SETS.get(item, (item,)):
            if name and name not in names:
                names.append(name)
    if not names:
        raise DataError(f"empty category list: {value!r}")
    return names


def get_split(name: str) -> OVSplit:
    """An OV split by name ('coco65_15', 'coco48_17'); 'lvis' needs the categories, see lvis_split."""
    if name not in OV_SPLITS:
        raise DataError(f"unknown open-vocabulary split {name!r}; known: {', '.join(OV_SPLITS)}, lvis")
    return OV_SPLITS[name]


def lvis_frequency_groups(categories: Iterable[Mapping[str, Any]], source: str = "LVIS") -> dict[str, list[str]]:
    """Category names per LVIS frequency group {'r': [...], 'c': [...], 'f': [...]} from the json's
    `categories` entries; a category without a valid `frequency` is a DataError naming it."""
    groups: dict[str, list[str]] = {"r": [], "c": [], "f": []}
    for index, cat in enumerate(categories):
        frequency = cat.get("frequency")
        if frequency not in groups:
            raise DataError(
                f"{source}: categories[{index}] (id {cat.get('id')!r}, {cat.get('name')!r}) has frequency "
                f"{frequency!r}, expected 'r', 'c' or 'f' (is this an LVIS json?)"
            )
        groups[frequency].append(str(cat.get("name")))
    return groups


def lvis_split(categories: Iterable[Mapping[str, Any]], source: str = "LVIS") -> OVSplit:
    """LVIS open-vocabulary split: rare categories are novel, common + frequent are base."""
    groups = lvis_frequency_groups(categories, source)
    return OVSplit("lvis_rare", frozenset(groups["c"] + groups["f"]), frozenset(groups["r"]))


def annotate_split(records: list[Record], split: OVSplit) -> list[Record]:
    """Set each record's `ov_split` field ('base' / 'novel' / None) from its `category`, in place."""
    for record in records:
        record.fields["ov_split"] = split.group(str(_category(record)))
    return records


def filter_to_base(records: list[Record], split: OVSplit) -> list[Record]:
    """The records of base categories only: the open-vocabulary training set."""
    kept = [r for r in records if _category(r) in split.base]
    if not kept:
        raise DataError(f"no record has a base category of split {split.name!r}")
    return kept


def _category(record: Record) -> Any:
    if "category" not in record.fields:
        raise DataError(f"{record.source}: has no 'category' field (not a detection record)")
    return record.fields["category"]
