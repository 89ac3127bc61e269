"""data/ imports run one way: each module imports only modules of lower layers (read with `ast`).

Allowing only strictly lower layers also rules out import cycles, so the old knot (loaders <-> coco
<-> lisa, hidden behind imports inside functions) cannot come back. A new module must be given a
layer here: the test fails for any data module it does not know.
"""

from __future__ import annotations

from pathlib import Path

import visual_rft.data

from import_layers import visual_rft_imports

DATA = Path(visual_rft.data.__file__).parent
PACKAGE = "visual_rft.data"

# bottom (0) to top: record type and error; row readers and helpers on records; one module per
# source format; the annotation spec options; the spec -> loader registry.
LAYERS = {
    "__init__": 0, "errors": 0, "record": 0,
    "rows": 1, "targets": 1, "ov_splits": 1, "fewshot": 1, "embedded": 1, "check": 1,
    "record_files": 2, "coco": 2, "lisa": 2, "trees": 2, "tool_digits": 2,
    "detection_source": 3,
    "sources": 4,
}


def data_imports(path: Path) -> list[tuple[str, bool]]:
    """(data module imported, whether the import sits inside a function) for every import in `path`."""
    return [(target.split(".")[2], nested) for target, nested in visual_rft_imports(path, PACKAGE)
            if target.startswith(PACKAGE + ".")]


def test_every_data_module_has_a_layer():
    assert sorted(p.stem for p in DATA.glob("*.py")) == sorted(LAYERS)


def test_data_imports_only_point_down():
    upward = [f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})"
              for module in LAYERS for target, _ in data_imports(DATA / f"{module}.py")
              if LAYERS[target] >= LAYERS[module]]
    assert upward == []


def test_no_data_import_hides_inside_a_function():
    hidden = [f"{module} -> {target}" for module in LAYERS for target, nested in data_imports(DATA / f"{module}.py")
              if nested]
    assert hidden == []


def test_the_checker_sees_every_import_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import visual_rft.data.rows\nfrom visual_rft.data import trees\nfrom . import coco\n"
                      "from .record import Record\nimport json\n"
                      "def f():\n    from visual_rft.data.sources import load_records\n")
    assert data_imports(source) == [("rows", False), ("trees", False), ("coco", False), ("record", False),
                                    ("sources", True)]
