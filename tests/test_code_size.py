"""Size limits of the package's source (issue 26): a newcomer can read and change one module or
one function at a time. Split a file or extract a helper rather than raise a limit."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "nexus_moe"
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 80  # from the `def` line to the last line of the body, docstring included

FILES = sorted(SRC.rglob("*.py"))


def test_the_source_is_found():
    assert len(FILES) > 20 and SRC / "cli" / "__init__.py" in FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_file_and_function_lengths(path):
    text = path.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= MAX_FILE_LINES, f"{path}: {lines} lines (at most {MAX_FILE_LINES})"
    too_long = [
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text, str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not too_long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {too_long}"
