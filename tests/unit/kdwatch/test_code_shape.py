"""Units a reader can hold: no module over 600 lines and no function over 80 in the product code."""

from __future__ import annotations

import ast
from pathlib import Path

import kdwatch

PACKAGE = Path(kdwatch.__file__).parent
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _product_modules() -> list[Path]:
    # The design folders are symlinked into kdwatch/; migrations are generated revision scripts.
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts) + sorted(
        p for folder in ("collector", "analyzer", "slo", "storage", "runner")
        for p in (PACKAGE / folder).resolve().rglob("*.py") if "migrations" not in p.parts)


def test_the_walk_reaches_every_design_folder() -> None:
    seen = {p.resolve().parent.name for p in _product_modules()}
    assert {"kdwatch", "api", "collector", "analyzer", "slo", "storage", "runner"} <= seen


def test_no_module_is_over_600_lines() -> None:
    long = {str(p): n for p in _product_modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_is_over_80_lines() -> None:
    long = {}
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path}:{node.lineno} {node.name}"] = lines
    assert not long, long
