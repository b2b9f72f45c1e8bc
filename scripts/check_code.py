#!/usr/bin/env python3
"""Code-shape checks the test suite runs (tests/test_code.py): no function over 80 lines in src/csn, no function
with more than 8 parameters (options objects instead; the functions that still have more are listed in
OVER_PARAMETERS, a list that may only shrink), and no function-local import of a csn module (imports sit at the top
of modules, so an import cycle cannot hide).

usage: python scripts/check_code.py [SRC_DIR]      exit status 1 and one line per finding when something is off
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 80
MAX_PARAMETERS = 8
OVER_PARAMETERS: frozenset[tuple[str, str]] = frozenset()
"""(path relative to src/csn, function) written before the rule (2026-12-05), each to take an options object: none left."""


def findings(src: Path) -> list[str]:
    """'path:line what' for every function over MAX_LINES lines, every function over MAX_PARAMETERS parameters not
    in OVER_PARAMETERS, and every function-local csn import."""
    out = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_LINES:
                out.append(f"{path}:{fn.lineno} function {fn.name} has {length} lines (at most {MAX_LINES})")
            a = fn.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            if len(params) > MAX_PARAMETERS and (path.relative_to(src).as_posix(), fn.name) not in OVER_PARAMETERS:
                out.append(f"{path}:{fn.lineno} function {fn.name} has {len(params)} parameters (at most "
                           f"{MAX_PARAMETERS}; pass an options object)")
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "csn"):
                    out.append(f"{path}:{node.lineno} function-local import of {node.module} in {fn.name}")
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "csn" for a in node.names):
                    out.append(f"{path}:{node.lineno} function-local import of csn in {fn.name}")
    return out


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src" / "csn"
    found = findings(src)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
