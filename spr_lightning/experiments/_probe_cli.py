"""The command line shared by the probes of a run: ``python -m spr_lightning.experiments.<probe> ... --out F``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spr_lightning.jsonl import read_json_lines


def probe_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser named after the module, its docstring as help, and ``--out`` (the result as JSON)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    return parser


def write_result(out: str | None, result: Any) -> None:
    """Write ``result`` as JSON to ``out`` when it is given."""
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``predictions-rank*.jsonl`` (what ``validate`` writes); a bad line is an error naming it."""
    return read_json_lines(path)
