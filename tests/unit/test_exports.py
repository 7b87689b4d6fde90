"""The public surface of the ``handoff`` package (as trio's test_exports does)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import handoff


def test_all_is_sorted_complete_and_resolves() -> None:
    assert handoff.__all__ == sorted(handoff.__all__)
    assert set(handoff.__all__) == set(handoff._EXPORTS)
    for name in handoff.__all__:
        assert getattr(handoff, name) is not None, name


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
