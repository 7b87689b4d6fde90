"""The public surface of the ``handoff`` package (as trio's test_exports does)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import handoff


def test_all_is_sorted_complete_and_resolves() -> None:
    assert handoff.__all__ == sorted(handoff.__all__)
    assert set(handoff.__all__) == set(handoff._EXPORTS)
    for name in handoff.__all__:
        assert getattr(handoff, name) is not None, name


def test_type_checkers_see_the_names_and_modules_of_exports() -> None:
    """The TYPE_CHECKING block repeats ``_EXPORTS`` for mypy; it must say exactly the same."""
    tree = ast.parse(Path(handoff.__file__).read_text())
    (block,) = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    seen: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom), ast.unparse(node)
        for alias in node.names:
            assert alias.asname == alias.name, f"{ast.unparse(node)}: re-export as the same name"
            seen[alias.name] = "." * node.level + (node.module or "")
    assert seen == handoff._EXPORTS


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        handoff.no_such_thing  # type: ignore[attr-defined]  # noqa: B018


def test_cli_client_path_imports_no_heavy_dependency() -> None:
    """`handoffd status/upgrade/stop` start fast: no trio, pydantic or structlog on that path."""
    code = (
        "import sys, handoff, handoff._cli; "
        "print(sorted(m for m in ('trio', 'pydantic', 'structlog') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
