"""How high can a model score at all when it writes boxes in this format? The ground truth, written and read back.

A coordinate format rounds: MiniGPT-v2's location tokens ``<0>``...``<100>`` put a box edge on a grid of 1/100 of the
image side, so even a model that always finds the right object and writes its box exactly loses IoU to rounding.
On large objects that is nothing; on SPR-Shapes' small ones (median side 27 px of 224) a 2.24 px grid step is about
8% of the side, and the IoU of the best writable box falls below 0.9 for most REC targets. This probe encodes each
evaluated target with the answer's codec, decodes it as the evaluator does, and reports Acc@t (REC) or Recall@1@t
(phrase grounding, MERGED-BOXES: each phrase's enclosing box) that this perfect model reaches: the ceiling of every
threshold, against which a gain at a strict threshold has to be read.

    python -m spr_lightning.experiments.format_ceiling PREDICTIONS_JSONL [--coord-format minigpt_v2] [--out F]

``PREDICTIONS_JSONL`` is what ``validate`` writes (``predictions-rank0.jsonl``): REC rows carry ``gt_box``, phrase
rows ``gt_boxes`` (per phrase, a list of boxes); both carry ``image_size``. Only the targets are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torchvision.ops import box_iou

from spr_lightning.coords import Codec, get_codec
from spr_lightning.experiments._probe_cli import probe_parser, read_predictions, write_result

__all__ = ["DEFAULT_THRESHOLDS", "format_ceiling", "main", "read_predictions", "written_box_iou"]

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def written_box_iou(box: Sequence[float], image_size: tuple[int, int],
                    coord_format: str | Codec = "minigpt_v2") -> float:
    """IoU between ``box`` and the same box encoded in ``coord_format`` (a name or a codec) and decoded again (1.0:
    no loss)."""
    codec = get_codec(coord_format) if isinstance(coord_format, str) else coord_format
    written = codec.decode(codec.encode(list(box), image_size), image_size)
    if len(written) != 1:
        raise ValueError(f"{coord_format} wrote {box} as {len(written)} boxes, expected one")
    return float(box_iou(torch.tensor([written[0].xyxy], dtype=torch.float64),
                         torch.tensor([list(box)], dtype=torch.float64))[0, 0])


def _enclosing(boxes: Sequence[Sequence[float]]) -> list[float]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def _targets(row: dict[str, Any]) -> list[list[float]]:
    """The boxes a row is scored against: REC's ``gt_box``, or each phrase's enclosing box (MERGED-BOXES)."""
    if "gt_box" in row:
        return [list(row["gt_box"])]
    if "gt_boxes" in row:
        return [_enclosing(boxes) for boxes in row["gt_boxes"] if boxes]
    raise ValueError(f"prediction row {row.get('key')!r} has neither 'gt_box' (REC) nor 'gt_boxes' (phrases)")


def format_ceiling(rows: Iterable[dict[str, Any]], coord_format: str = "minigpt_v2",
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, float]:
    """``{"n": targets, "mean_iou": ..., "@<t>": share of targets whose written box has IoU >= t}``."""
    codec = get_codec(coord_format)
    ious = [written_box_iou(box, tuple(row["image_size"]), codec) for row in rows for box in _targets(row)]
    if not ious:
        raise ValueError("no targets to score: the predictions file is empty")
    result = {"n": float(len(ious)), "mean_iou": sum(ious) / len(ious)}
    result.update({f"@{t:g}": sum(iou >= t for iou in ious) / len(ious) for t in thresholds})
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = probe_parser(__name__, __doc__)
    parser.add_argument("predictions", help="predictions-rank0.jsonl of a REC or phrase-grounding validate run")
    parser.add_argument("--coord-format", default="minigpt_v2", help="how the model writes boxes")
    args = parser.parse_args(argv)
    result = format_ceiling(read_predictions(args.predictions), args.coord_format)
    print(f"{int(result['n'])} targets written in {args.coord_format} and read back: mean IoU "
          f"{result['mean_iou']:.3f}; " + ", ".join(f"{100 * v:.1f}% {k}" for k, v in result.items() if k[0] == "@"))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
