"""Readable code: no function in medunet/ longer than MAX_FUNCTION_LINES lines (docstring and comments included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medunet"
MAX_FUNCTION_LINES = 80

def function_lengths() -> dict[str, int]:
    """"path:qualified name" -> lines, for every function and method under medunet/."""
    lengths: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE.parent).as_posix()

        def visit(node: ast.AST, prefix: str, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        assert child.end_lineno is not None
                        lengths[f"{module}:{name}"] = child.end_lineno - child.lineno + 1
                    visit(child, f"{name}.")

        visit(ast.parse(path.read_text(), filename=str(path)), "")
    return lengths


def test_no_function_is_longer_than_the_limit() -> None:
    lengths = function_lengths()
    assert len(lengths) > 300, "found too few functions: is PACKAGE right?"
    too_long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them): " + ", ".join(
        f"{name} ({n} lines)" for name, n in sorted(too_long.items())
    )
