"""One-off probe (docs/results/notebook.md, "How precise can the image tokens make a box?"): is a start's REC precision
limited by what its image tokens hold, or by the language model that reads them?

For every annotated object, the tokens in a ``window`` x ``window`` neighbourhood of the grid cell that holds the
object's box centre (zero-padded at the border), from the tower (the layer the language model reads) or after the
projector (what it receives), are regressed onto the object's box: centre offset from that cell's centre and log
width/height, in cell units. A ridge regression and a small MLP (L1 loss) are fitted on the training split's
objects and scored on the test split's REC targets by IoU with the annotation, raw and with the box written in the
answer format (MiniGPT-v2's 1/100 grid) and read back. The probe is *told* the cell, which the language model must
find itself, so its accuracy is an upper bound on precision given the object was found: compare its
Acc@0.75 / Acc@0.5 with the start's. Run by hand, not part of the package:

    python docs/results/probes/box_readout.py MODEL WORLD_DIR [--window 1 3 5] [--train-images 3000]
        [--predictions START_EVAL/predictions-rank0.jsonl] [--out F]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from spr_lightning.coords import get_codec
from spr_lightning.experiments.token_variance import _llava_parts, read_objects
from spr_lightning.metrics.accuracy import paired_iou
from spr_lightning.models import load_policy, load_processor

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)


@torch.no_grad()
def token_grids(model, processor, pictures, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """``(tower [N, G, G, D_v], projected [N, G, G, D])``: every image's token grid, class token dropped."""
    tower, projector = _llava_parts(model)
    layer = model.config.vision_feature_layer
    towers, projected = [], []
    for start in range(0, len(pictures), batch_size):
        pixels = processor.image_processor(list(pictures[start : start + batch_size]), return_tensors="pt")
        hidden = tower(pixels["pixel_values"], output_hidden_states=True).hidden_states[layer]
        if model.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        grid = math.isqrt(hidden.shape[1])
        towers.append(hidden.reshape(-1, grid, grid, hidden.shape[-1]).float())
        mapped = projector(hidden)
        projected.append(mapped.reshape(-1, grid, grid, mapped.shape[-1]).float())
    return torch.cat(towers), torch.cat(projected)


def object_rows(grids: Tensor, boxes: list[list[list[float]]], side: float,
                window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Features (the window's tokens, flattened, plus the cell's position), regression targets and the cell
    centres (pixels) of every object, in the order of ``boxes`` (per image)."""
    grid = grids.shape[1]
    cell = side / grid
    pad = window // 2
    padded = torch.nn.functional.pad(grids, (0, 0, pad, pad, pad, pad))
    features, targets, centres = [], [], []
    for image, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes:
            column = min(int((x1 + x2) / 2 / cell), grid - 1)
            row = min(int((y1 + y2) / 2 / cell), grid - 1)
            patch = padded[image, row : row + window, column : column + window].reshape(-1)
            position = torch.tensor([(row + 0.5) / grid, (column + 0.5) / grid])
            features.append(torch.cat([patch, position]))
            cx, cy = (column + 0.5) * cell, (row + 0.5) * cell
            targets.append(torch.tensor([((x1 + x2) / 2 - cx) / cell, ((y1 + y2) / 2 - cy) / cell,
                                         math.log(max(x2 - x1, 1.0) / cell), math.log(max(y2 - y1, 1.0) / cell)]))
            centres.append(torch.tensor([cx, cy]))
    return torch.stack(features), torch.stack(targets), torch.stack(centres)


def to_boxes(outputs: Tensor, centres: Tensor, cell: float, side: float) -> Tensor:
    cx, cy = centres[:, 0] + outputs[:, 0] * cell, centres[:, 1] + outputs[:, 1] * cell
    w, h = outputs[:, 2].exp() * cell, outputs[:, 3].exp() * cell
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).clamp(0, side)


def to_format_grid(boxes: Tensor, side: float, coord_format: str = "minigpt_v2") -> Tensor:
    """Each box written in the answer format and read back by its codec, as an answer's box is."""
    codec, size = get_codec(coord_format), (int(side), int(side))
    return torch.tensor([codec.decode(codec.encode(box, size), size)[0].xyxy for box in boxes.tolist()])


def ridge(train_x: Tensor, train_y: Tensor, test_x: Tensor, penalty: float = 1.0) -> Tensor:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], 1).double()
    weights = torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1], dtype=a.dtype), a.T @ train_y.double())
    b = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1)], 1).double()
    return (b @ weights).float()


def mlp(train_x: Tensor, train_y: Tensor, test_x: Tensor, steps: int = 4000, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    net = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, 4))
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    x = (train_x - mean) / std
    for _ in range(steps):
        batch = torch.randint(0, len(x), (256,))
        loss = torch.nn.functional.smooth_l1_loss(net(x[batch]), train_y[batch], beta=0.05)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        return net((test_x - mean) / std)


def scores(predicted: Tensor, truth: Tensor) -> dict[str, float]:
    ious = paired_iou(predicted, truth)
    row = {f"acc@{t}": round(100 * float((ious >= t).float().mean()), 1) for t in THRESHOLDS}
    row["median_iou"] = round(float(ious.median()), 3)
    hits = ious >= 0.5
    row["acc@0.75|hit@0.5"] = round(100 * float((ious[hits] >= 0.75).float().mean()), 1) if hits.any() else 0.0
    return row


def rec_targets(world: Path, split: str, predictions: Path | None) -> tuple[list[int], list[dict]]:
    """The annotation ids to score, one per REC expression of ``predictions`` (a start's evaluation records,
    ``key`` = ``<ref id>-<sentence>``) with those records, or every REC target of the split once."""
    refs = json.loads((world / "annotations" / "refcoco_shapes.json").read_text(encoding="utf-8"))
    if predictions is None:
        return sorted({ref["ann_id"] for ref in refs if ref["split"] == split}), []
    by_ref = {ref["id"]: ref["ann_id"] for ref in refs if ref["split"] == split}
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [by_ref[int(record["key"].split("-")[0])] for record in records], records


def split_objects(world: Path, split: str, images: int) -> tuple[list, list, list[int]]:
    pictures, boxes, _ = read_objects(world / "annotations" / f"instances_{split}.json", world / "images", images)
    data = json.loads((world / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
    chosen = {entry["id"] for entry in data["images"][:images]}
    order = {entry["id"]: n for n, entry in enumerate(data["images"][:images])}
    ids: list[list[int]] = [[] for _ in order]
    for ann in data["annotations"]:
        if ann["image_id"] in chosen:
            ids[order[ann["image_id"]]].append(ann["id"])
    return pictures, boxes, [i for image in ids for i in image]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("world", type=Path)
    parser.add_argument("--window", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--predictions", type=Path, help="a start's REC predictions-rank0.jsonl: score its targets")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.time()
    model, processor = load_policy(args.model).eval(), load_processor(args.model)
    side = float(json.loads((args.world / "world.json").read_text(encoding="utf-8"))["image_size"][0])
    train_pictures, train_boxes, _ = split_objects(args.world, "train", args.train_images)
    test_pictures, test_boxes, test_ids = split_objects(args.world, "test", 10**9)
    targets, records = rec_targets(args.world, "test", args.predictions)
    position = {ann_id: n for n, ann_id in enumerate(test_ids)}
    keep = torch.tensor([position[ann_id] for ann_id in targets])
    grids = {"train": token_grids(model, processor, train_pictures),
             "test": token_grids(model, processor, test_pictures)}
    truth = torch.tensor([b for image in test_boxes for b in image], dtype=torch.float32)[keep]
    if records:
        if not torch.allclose(truth, torch.tensor([r["gt_box"] for r in records], dtype=torch.float32)):
            raise ValueError(f"{args.predictions}: its gt_box values are not this world's test annotations")
        start_boxes = torch.tensor([r["pred_box"] if r["pred_box"] else [0.0] * 4 for r in records])
        print(json.dumps({"start": scores(start_boxes.nan_to_num(0.0), truth)}), flush=True)
    report: dict = {"model": args.model, "train_objects": sum(map(len, train_boxes)),
                    "test_rec_targets": len(keep), "grid": grids["test"][0].shape[1], "rows": []}
    for stage, index in (("tower", 0), ("projector", 1)):
        for window in args.window:
            train_x, train_y, _ = object_rows(grids["train"][index], train_boxes, side, window)
            test_x, _, centres = object_rows(grids["test"][index], test_boxes, side, window)
            test_x, centres = test_x[keep], centres[keep]
            cell = side / grids["test"][index].shape[1]
            for reader in ("ridge", "mlp"):
                outputs = ridge(train_x, train_y, test_x) if reader == "ridge" else mlp(train_x, train_y, test_x,
                                                                                          args.steps)
                boxes = to_boxes(outputs, centres, cell, side)
                row = {"tokens": stage, "window": window, "reader": reader, "raw": scores(boxes, truth),
                       "format": scores(to_format_grid(boxes, side), truth)}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    report["truth_in_format"] = scores(to_format_grid(truth, side), truth)
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
