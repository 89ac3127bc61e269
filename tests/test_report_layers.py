"""The report package's imports run one way (read, discover, stats -> figures/images -> html -> sweep -> build), read
from the source with ast, lazy imports inside functions included; and a report never trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from import_layers import visual_rft_imports

import visual_rft.report

PACKAGE = "visual_rft.report"
FOLDER = Path(visual_rft.report.__file__).parent
# a module may import from earlier layers only, never from its own layer or a later one
LAYERS = [{"read", "discover", "stats"}, {"plots", "images"}, {"html"}, {"sweep"}, {"build"}]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def imported(path: Path) -> set[str]:
    """Every visual_rft module `path` imports, lazy imports inside functions included."""
    return {name for name, _ in visual_rft_imports(path, PACKAGE)}


def package_imports(path: Path) -> set[str]:
    """The modules of the report package that `path` imports (by their file stem)."""
    prefix = PACKAGE + "."
    return {name[len(prefix):].split(".")[0] for name in imported(path) if name.startswith(prefix)}


MODULES = sorted(p for p in FOLDER.glob("*.py") if p.stem != "__init__")


def test_every_module_of_the_package_has_a_layer():
    assert {p.stem for p in MODULES} == set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_come_from_earlier_layers_only(path):
    later = {name for name in package_imports(path) if LAYER[name] >= LAYER[path.stem]}
    assert not later, f"{path.stem} (layer {LAYER[path.stem]}) imports {sorted(later)}"


def test_the_checker_sees_lazy_relative_and_from_package_imports(tmp_path):
    """The checks above can fail: each spelling of a backwards import is caught."""
    source = tmp_path / "read.py"
    source.write_text("def f():\n    from .build import write_report\n"
                      "from visual_rft.report import html\nimport visual_rft.report.sweep\n"
                      "from visual_rft.rl import trainer\n")
    assert package_imports(source) == {"build", "html", "sweep"}
    assert "visual_rft.rl" in imported(source)  # caught by test_nothing_imports_training


@pytest.mark.parametrize("path", [*MODULES, FOLDER / "__init__.py"], ids=lambda p: p.stem)
def test_nothing_imports_training(path):
    assert not {n for n in imported(path) if n == "visual_rft.rl" or n.startswith("visual_rft.rl.")}


def test_importing_the_report_loads_no_training_code():
    """Also what the report's own imports (config, tasks) pull in, checked in a fresh interpreter."""
    code = ("import sys, visual_rft.report.build, visual_rft.report.sweep; "
            "print(sorted(m for m in sys.modules if m.startswith('visual_rft.rl')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
