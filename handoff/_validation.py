"""The one renderer of pydantic validation errors for people (config files, wire messages)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def render_loc(loc: tuple[int | str, ...], whole: str = "(top level)") -> str:
    """``program.drain_timeout``, ``listener[0].address``; ``whole`` when the error is the root."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or whole


def render_errors(
    exc: ValidationError,
    *,
    whole: str = "(top level)",
    limit: int | None = None,
    inputs: bool = False,
) -> list[str]:
    """One ``field: what is wrong`` line per problem (the first ``limit`` of them).

    ``inputs`` adds the offending value (``(got '30s')``): right for a config file the reader
    wrote, wrong for wire messages whose values may be large or not theirs.
    """
    lines = []
    for err in exc.errors(include_url=False)[:limit]:
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if not inputs or err["type"] == "missing" else f" (got {err.get('input')!r})"
        lines.append(f"{render_loc(err['loc'], whole)}: {msg}{got}")
    return lines
