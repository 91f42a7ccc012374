"""POPE (object hallucination, SPR Tab. 6) for ``python -m spr_lightning validate``.

POPE's question files (RUCAIBox/POPE ``output/coco/coco_pope_{random,popular,adversarial}.json``) hold one JSON
object per line (JSON Lines, despite the ``.json`` name): ``{"question_id", "image", "text", "label": "yes" |
"no"}``, ``image`` a COCO ``val2014`` file name. A JSON array of the same objects is read too. Each split is its
own file; samples carry their split so the metric can report each one.

A sample is ``{"key": "<split>-<question_id>", "question_id", "split", "question", "label", "file_name",
"image" (PIL RGB), "image_size"}``; a batch is the list of samples (the evaluator builds the prompts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from datamodules.grounding import _GroundingDataModule
from spr_lightning.jsonl import parse_json_lines

__all__ = ["POPEDataModule", "POPEDataset", "load_pope_questions"]


def _read_lines(path: Path) -> list[Any]:
    """JSON Lines, or one JSON array (detected by a leading ``[``)."""
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return parse_json_lines(text, path)


def load_pope_questions(path: str | Path, split: str) -> list[dict[str, Any]]:
    """The questions of one POPE file, in file order, tagged with ``split``.

    Raises:
        ValueError: naming the file and the line of the first malformed question.
    """
    path = Path(path)
    records = []
    for index, entry in enumerate(_read_lines(path)):
        where = f"{path}: question {index + 1}"
        if not isinstance(entry, dict) or not all(k in entry for k in ("question_id", "image", "text", "label")):
            raise ValueError(f"{where}: needs 'question_id', 'image', 'text' and 'label', got {entry!r}")
        label = str(entry["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where} (question_id={entry['question_id']!r}): label must be yes/no, "
                             f"got {entry['label']!r}")
        records.append({"key": f"{split}-{entry['question_id']}", "question_id": entry["question_id"],
                        "split": split, "question": str(entry["text"]).strip(), "label": label,
                        "file_name": str(entry["image"])})
    return records


class POPEDataset(Dataset):
    """POPE records with their image opened (RGB)."""

    def __init__(self, records: list[dict[str, Any]], image_root: str | Path) -> None:
        self.records = records
        self.image_root = Path(image_root)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        path = self.image_root / record["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"sample {record['key']!r}: image not found: {path}")
        with Image.open(path) as img:
            image = img.convert("RGB")
        return {**record, "image": image, "image_size": image.size}


class POPEDataModule(_GroundingDataModule):
    """POPE yes/no questions, one or more splits in one run.

    Args:
        question_files: split name -> question file, e.g. ``{"random": ".../coco_pope_random.json",
            "popular": ..., "adversarial": ...}``; evaluated in this order.
        image_root: the folder the ``image`` names are relative to (COCO ``val2014/``).
        batch_size: samples per generation batch per device.
        num_workers: dataloader workers per device.
        max_samples: evaluate only the first ``max_samples`` questions **of each split** (quick checks).
    """

    def __init__(self, question_files: dict[str, str], image_root: str, batch_size: int = 8, num_workers: int = 2,
                 max_samples: int | None = None) -> None:
        super().__init__(image_root, batch_size, num_workers, max_samples)
        if not question_files:
            raise ValueError("question_files must name at least one split file")
        self.question_files = dict(question_files)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            records = []
            for split, path in self.question_files.items():
                questions = load_pope_questions(path, split)
                records.extend(questions[: self.max_samples] if self.max_samples is not None else questions)
            self.dataset = POPEDataset(records, self.image_root)
