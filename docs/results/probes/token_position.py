"""One-off probe (docs/results/notebook.md, session 24): do a start's image tokens say where they are?

The language model writes absolute coordinates, but LLaVA gives its image tokens no 2-D position of their own: the
only place information is what the vision tower's learned position embeddings leave in each token (the language
model's RoPE sees one flattened sequence). This probe classifies every token's grid row and column from the token
alone, with a linear reader (what one attention read gives) and a small MLP, trained on the training split's
images and scored on the test split's, for the tower's tokens and the projected ones the language model receives.
If a linear reader finds the cell, a missing position signal is not what costs the start its box precision.

    python docs/results/probes/token_position.py MODEL WORLD_DIR [--train-images 1500] [--test-images 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from box_readout import split_objects, token_grids  # noqa: E402

from spr_lightning.models import load_policy, load_processor  # noqa: E402


def cell_labels(grids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens ``[N * G * G, D]`` with their row and column indices."""
    count, grid = grids.shape[0], grids.shape[1]
    rows = torch.arange(grid).view(1, grid, 1).expand(count, grid, grid).reshape(-1)
    columns = torch.arange(grid).view(1, 1, grid).expand(count, grid, grid).reshape(-1)
    return grids.reshape(-1, grids.shape[-1]), rows, columns


def fit_reader(kind: str, train: Tensor, rows: Tensor, columns: Tensor, grid: int,
               steps: int = 3000, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)

    def head() -> torch.nn.Module:
        if kind == "linear":
            return torch.nn.Linear(train.shape[1], grid)
        return torch.nn.Sequential(torch.nn.Linear(train.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, grid))

    row_head, column_head = head(), head()
    optimiser = torch.optim.AdamW([*row_head.parameters(), *column_head.parameters()], lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        batch = torch.randint(0, len(train), (512,))
        loss = (torch.nn.functional.cross_entropy(row_head(train[batch]), rows[batch])
                + torch.nn.functional.cross_entropy(column_head(train[batch]), columns[batch]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return row_head, column_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("world", type=Path)
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--test-images", type=int, default=300)
    args = parser.parse_args()
    started = time.time()
    model, processor = load_policy(args.model).eval(), load_processor(args.model)
    train_pictures, _, _ = split_objects(args.world, "train", args.train_images)
    test_pictures, _, _ = split_objects(args.world, "test", args.test_images)
    train_grids = token_grids(model, processor, train_pictures)
    test_grids = token_grids(model, processor, test_pictures)
    for stage, index in (("tower", 0), ("projected", 1)):
        train, rows, columns = cell_labels(train_grids[index])
        test, test_rows, test_columns = cell_labels(test_grids[index])
        mean, std = train.mean(0), train.std(0) + 1e-6
        train, test = (train - mean) / std, (test - mean) / std
        grid = train_grids[index].shape[1]
        for kind in ("linear", "mlp"):
            row_head, column_head = fit_reader(kind, train, rows, columns, grid)
            with torch.no_grad():
                row_error = (row_head(test).argmax(1) - test_rows).abs()
                column_error = (column_head(test).argmax(1) - test_columns).abs()
            print(json.dumps({
                "tokens": stage, "reader": kind, "grid": grid,
                "exact_cell": round(100 * float(((row_error == 0) & (column_error == 0)).float().mean()), 1),
                "within_one_cell": round(100 * float(((row_error <= 1) & (column_error <= 1)).float().mean()), 1),
                "mean_abs_error_cells": round(float((row_error.float().mean() + column_error.float().mean()) / 2), 3),
            }), flush=True)
    print(json.dumps({"seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
