"""Imports sit at the top of a module (STYLE rule 12): a function-level import of one of
edgestack's own modules hides an edge, so each one left says why it is lazy on its line
(``# lazy: torch at import``, ``# lazy: keeps CLI start light``, ...)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "edgestack"


def _function_level_own_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every import of an ``edgestack`` module inside a function."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n == "edgestack" or n.startswith("edgestack.") for n in names):
                found.append((node.lineno, " ".join(lines[node.lineno - 1:node.end_lineno])))
    return found


def test_every_function_level_import_of_edgestack_says_why() -> None:
    unmarked = [f"{path.relative_to(SRC.parent)}:{line}: {text.strip()}"
                for path in sorted(SRC.rglob("*.py"))
                for line, text in _function_level_own_imports(path)
                if "lazy:" not in text]
    assert not unmarked, ("move these imports to the top of their module, or say on the line "
                          "why they stay lazy ('# lazy: <why>'):\n" + "\n".join(unmarked))


def test_the_check_sees_an_unmarked_import(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from edgestack.core import atomic\n"
                    "    import edgestack.zoo  # lazy: torch\n    import json\n")
    found = _function_level_own_imports(path)
    assert [line for line, _ in found] == [2, 3]
    assert ["lazy:" in text for _, text in found] == [False, True]
