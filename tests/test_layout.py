"""The layering: the product (scheduler, backends, sim, serve) never imports the calibration lab (calib)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("scheduler", "backends", "sim", "serve")


@pytest.mark.parametrize("module", ["sim.model", "backends.cost", "backends.synthetic", "sim.cli_simulate"])
def test_importing_the_simulator_loads_nothing_from_calib(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'calib' or m.startswith('calib.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_only_cli_front_ends_import_calib():
    offenders = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.startswith("cli"):
                continue  # a command's front end may run the lab
            bad = sorted(m for m in _imports(path) if m == "calib" or m.startswith("calib."))
            if bad:
                offenders.append(f"{path.relative_to(ROOT)} imports {', '.join(bad)}")
    assert offenders == []


def test_the_layout_check_sees_a_function_level_import(tmp_path):
    # the check must catch the import style the CLI front ends use (inside a function), not only top-level ones
    f = tmp_path / "m.py"
    f.write_text("def run():\n    from calib.validate import rel_errors\n    return rel_errors\n")
    assert "calib.validate" in _imports(f)


MAX_MODULE_LINES = 500


def test_no_module_of_the_product_or_the_lab_is_over_500_lines():
    # a module that grows past this is split by what its parts decide
    long = [f"{p.relative_to(ROOT)}: {n} lines" for package in PRODUCT + ("calib",)
            for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert long == []
