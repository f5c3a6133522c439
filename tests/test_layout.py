"""The repository's layout must not shadow the packages its code imports.

Python puts a script's folder first on `sys.path`, so a folder named like a package beside a script (`recipes/` held a
`deepspeed/` config folder next to `recipes/train.py`) becomes importable under that name and can win over the real
package, or stand in for one that is not installed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIPPED = {".git", ".venv", ".venv-vllm", "build", "dist", "outputs", "runs", "__pycache__"}


def imported_top_level_names() -> set[str]:
    names: set[str] = set()
    for path in REPO.rglob("*.py"):
        if SKIPPED.intersection(path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def script_folders() -> set[Path]:
    """Every folder a Python script can be run from (its folder goes first on `sys.path`)."""
    return {path.parent for path in REPO.rglob("*.py") if not SKIPPED.intersection(path.relative_to(REPO).parts)} | {
        REPO
    }


def test_no_folder_beside_a_script_shadows_an_imported_package():
    # Installed packages and the standard library; the repository's own modules (`trl_moe_grpo`, `recipes/train.py`
    # imported by the tests as `train`) are meant to be found where they are.
    packages = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    at_risk = imported_top_level_names() & packages - {"trl_moe_grpo"}
    shadows = []
    for folder in script_folders():
        for entry in folder.iterdir():
            name = entry.name if entry.is_dir() else entry.stem
            if entry.name not in SKIPPED and name in at_risk and (entry.is_dir() or entry.suffix == ".py"):
                shadows.append(str(entry.relative_to(REPO)))
    assert not shadows, f"These shadow a package the code imports (rename them): {sorted(shadows)}"
