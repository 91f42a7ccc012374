"""Reading JSON-lines files (predictions, question files) with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["parse_json_lines", "read_json_lines"]


def parse_json_lines(text: str, source: str | Path) -> list[Any]:
    """One value per non-blank line of ``text``; a bad line is a ``ValueError`` naming ``source`` and its number."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{source}:{number}: not JSON ({err.msg})") from err
    return rows


def read_json_lines(path: str | Path) -> list[Any]:
    """:func:`parse_json_lines` of the file at ``path`` (UTF-8)."""
    return parse_json_lines(Path(path).read_text(encoding="utf-8"), path)
