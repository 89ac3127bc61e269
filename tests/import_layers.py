"""Reading a module's visual_rft imports with ast, for the tests that keep a package's imports one
way (test_data_layers.py for data/, test_report_layers.py for report/, test_models.py for models/)."""

from __future__ import annotations

import ast
from pathlib import Path


def visual_rft_imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """(visual_rft module imported, whether the import sits inside a function) for every import in
    `path`, a module of `package`: relative imports resolve inside `package`, and `from package
    import x` names `package.x` (x is one of its modules)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.x` inside the package
                base = ".".join([package] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] if base == package else [base]
        else:
            continue
        found += [(target, id(node) in nested) for target in targets if target.split(".")[0] == "visual_rft"]
    return found
