"""The code's shape, enforced by the test suite (and so by CI): lint, one-way layers, short functions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "scripts", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_layers_point_one_way():
    """import-linter's layers contract in pyproject.toml: core <- models/data <- runs <- train|analysis <-
    experiments <- report <- cli (a module imports only from its own layer or lower ones)."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_no_long_functions_and_no_function_local_csn_imports():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from check_code import findings
    finally:
        sys.path.pop(0)
    assert findings(ROOT / "src" / "csn") == []


def test_the_check_can_fail(tmp_path):
    """check_code flags a long function and a function-local csn import (the check is not vacuous)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from check_code import findings
    finally:
        sys.path.pop(0)
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\n\ndef local():\n    from csn import dist\n    return dist\n")
    found = findings(tmp_path)
    assert any("function long has 86 lines" in f for f in found)
    assert any("function-local import of csn in local" in f or "import of csn" in f for f in found)
