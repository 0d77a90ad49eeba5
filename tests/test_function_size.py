"""No function in the package grows past a screenful, checked from the source (issue #26, item 10).

A function that long does several things; split it into named steps, each with one job (as
``training/train.py``'s ``train`` and ``cli.py``'s ``plan_text`` are). The count is the whole
definition, from its ``def`` line to its last line, docstring and comments included; a nested
function counts inside its parent too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdsweep"
MAX_FUNCTION_LINES = 60  # the longest after the #26 splits is 60 (models/shapes_build.py's build)

# "path relative to sdsweep/:qualified name" -> (allowed lines, why it is not split). Each entry
# must still be over the limit: once a function is split, its exception goes too.
EXCEPTIONS: dict[str, tuple[int, str]] = {}


def function_lengths() -> dict[str, int]:
    """Every function and method in the package: "path:Class.name" -> lines from ``def`` to its end."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lengths[f"{path}:{name}"] = child.end_lineno - child.lineno + 1
                visit(child, path, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, path, f"{prefix}{child.name}.")
            else:
                visit(child, path, prefix)

    for source in sorted(PACKAGE.rglob("*.py")):
        path = source.relative_to(PACKAGE).as_posix()
        visit(ast.parse(source.read_text(encoding="utf-8")), path, "")
    return lengths


def test_no_function_is_longer_than_the_limit():
    lengths = function_lengths()
    too_long = {
        name: lines
        for name, lines in lengths.items()
        if lines > MAX_FUNCTION_LINES and lines > EXCEPTIONS.get(name, (0, ""))[0]
    }
    listed = "\n".join(f"  {name}: {lines} lines" for name, lines in sorted(too_long.items()))
    assert not too_long, (
        f"functions over {MAX_FUNCTION_LINES} lines; split each into named steps with one job each:\n{listed}"
    )


def test_every_exception_is_still_needed():
    lengths = function_lengths()
    stale = [name for name in EXCEPTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES]
    assert not stale, (
        f"these are now within {MAX_FUNCTION_LINES} lines (or gone); drop them from EXCEPTIONS: {stale}"
    )


def test_the_count_sees_methods_and_nested_functions():
    lengths = function_lengths()
    assert "training/train.py:train" in lengths
    assert "evaluation/evaluate.py:Evaluator.__init__" in lengths
