"""The code's shape, enforced by the test suite (and so by CI): lint, one-way layers, short functions."""

from __future__ import annotations

import ast
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
    """check_code flags a long function, one with more than 8 parameters and a function-local csn import (the check
    is not vacuous); the list of functions written before the 8-parameter rule names only functions that exist."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from check_code import OVER_PARAMETERS, findings
    finally:
        sys.path.pop(0)
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\n\ndef local():\n    from csn import dist\n    return dist\n"
                                   "\n\ndef many(a, b, c, d, e, f, g, h, *, i):\n    return a\n"
                                   "\n\nclass K:\n    def ok(self, a, b, c, d, e, f, g, h):\n        return a\n")
    found = findings(tmp_path)
    assert any("function long has 86 lines" in f for f in found)
    over = [f for f in found if "parameters" in f]  # `many`, not the method (self is not counted)
    assert len(over) == 1 and over[0].endswith("function many has 9 parameters (at most 8; pass an options object)")
    defined = {(p.relative_to(ROOT / "src" / "csn").as_posix(), n.name) for p in (ROOT / "src" / "csn").rglob("*.py")
               for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)}
    assert OVER_PARAMETERS <= defined
    assert any("function-local import of csn in local" in f or "import of csn" in f for f in found)
