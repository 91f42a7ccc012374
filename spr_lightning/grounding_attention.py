"""Grounding attention: an auxiliary SFT loss that teaches a language model to *look up* the box it writes.

Why: a small language model trained on grounded answers alone learns where objects are (attention to a
position) long before it learns which one is named (attention to a content): on SPR-Shapes the box of a REC
answer lands on *an* object far more often than on the named one (docs/results.md). Supervising the attention
says directly what the answer's cross-entropy says only through many lookups gone right: before the first
coordinate token of each box, one attention head of one layer should put its mass on the image tokens the box
covers,

    L_att = -(1 / M) * Σ_boxes log Σ_{p ∈ patches(box)} a[head, query(box), p],

``query(box)`` the position whose output predicts the box's first coordinate, ``patches(box)`` the image tokens
(row-major patch grid) whose centres lie inside the box, or the one under its centre for a box smaller than a
patch. With ``phrase_ids`` the positions that predict the words of the box's grounded phrase (``<p>..</p>`` just
before it) are supervised the same way: a phrase is written before its box, so the choice of *what* to name is
made there, and naming an object is reading the patches under it. Needs a location vocabulary of whole tokens
(MiniGPT-v2's ``<0>``..``<100>``) and image tokens laid out as a square patch grid in the sequence (LLaVA with
the ``default`` feature strategy).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from spr_lightning.logprobs import IGNORE_INDEX

_LOCATION = re.compile(r"^<(\d+)>$")


def location_token_values(tokenizer, max_value: int = 100) -> Tensor:
    """``[V]`` long tensor: the integer a token stands for when it is a whole location token ``<k>``, else -1."""
    values = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for token, index in tokenizer.get_vocab().items():
        match = _LOCATION.match(token)
        if match and int(match.group(1)) <= max_value and index < len(values):
            values[index] = int(match.group(1))
    if (values >= 0).sum() < max_value + 1:
        raise ValueError(f"grounding attention needs whole location tokens <0>..<{max_value}> in the tokenizer; "
                         f"found {int((values >= 0).sum())} (a coordinate format written as several tokens "
                         "is not supported)")
    return values


def phrase_token_ids(tokenizer, open_tag: str = "<p>", close_tag: str = "</p>") -> tuple[int, int]:
    """Ids of the phrase tags when each is one whole token (as in the MiniGPT-v2 / Shikra grounded format)."""
    ids = []
    for tag in (open_tag, close_tag):
        encoded = tokenizer(tag, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            raise ValueError(f"grounding attention on phrases needs {tag!r} as one token; the tokenizer splits it "
                             f"into {len(encoded)}")
        ids.append(encoded[0])
    return ids[0], ids[1]


@dataclass(frozen=True)
class BoxQuery:
    """One supervised lookup: row ``row`` of the batch, its position ``query``, the image positions to attend."""

    row: int
    query: int
    targets: Tensor


def covered_patches(box: tuple[float, float, float, float], grid: int) -> Tensor:
    """Row-major indices of the ``grid x grid`` patches whose centres lie inside ``box`` (fractions of the side)."""
    x1, y1, x2, y2 = box
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    cols = ((centres >= x1) & (centres <= x2)).nonzero().flatten()
    rows = ((centres >= y1) & (centres <= y2)).nonzero().flatten()
    if len(cols) == 0 or len(rows) == 0:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        col = min(max(int(cx * grid), 0), grid - 1) if len(cols) == 0 else None
        row = min(max(int(cy * grid), 0), grid - 1) if len(rows) == 0 else None
        cols = cols if col is None else torch.tensor([col])
        rows = rows if row is None else torch.tensor([row])
    return (rows[:, None] * grid + cols[None, :]).flatten()


def phrase_positions(labels_row: Tensor, box_start: int, phrase_ids: tuple[int, int],
                     max_gap: int = 4) -> list[int]:
    """Positions that predict the words of the grounded phrase just before the box at ``box_start``.

    ``phrase_ids`` are the ids of ``<p>`` and ``</p>``. The phrase closes at most ``max_gap`` tokens before the box
    (``</p> {``); the positions are ``<p>`` up to the token before ``</p>`` (each predicts the next word). Empty
    when the box has no phrase (a REC answer) or the phrase is not part of the answer.
    """
    open_id, close_id = phrase_ids
    close = next((i for i in range(box_start - 1, max(box_start - 1 - max_gap, -1), -1)
                  if int(labels_row[i]) == close_id), None)
    if close is None:
        return []
    for i in range(close - 1, -1, -1):
        token = int(labels_row[i])
        if token == open_id:
            return list(range(i, close))
        if token in (IGNORE_INDEX, close_id):
            return []
    return []


def box_queries(input_ids: Tensor, labels: Tensor, image_token_id: int, location_values: Tensor,
                scale: float = 100.0, every_coordinate: bool = False,
                phrase_ids: tuple[int, int] | None = None) -> list[BoxQuery]:
    """Every box written in the answers (four location tokens in a row) and the image tokens it covers.

    The query is the position that predicts the box's first coordinate, or, with ``every_coordinate``, each of
    the four positions that predict its coordinates (one :class:`BoxQuery` each). With ``phrase_ids`` (the ids
    of ``<p>`` and ``</p>``) the positions that predict the box's phrase are queries too (:func:`phrase_positions`).
    """
    queries: list[BoxQuery] = []
    values = location_values.to(labels.device)
    answer = labels.clamp(min=0)
    is_location = (values[answer] >= 0) & (labels != IGNORE_INDEX)
    for row in range(labels.shape[0]):
        image_positions = (input_ids[row] == image_token_id).nonzero().flatten()
        if len(image_positions) == 0:
            continue
        grid = math.isqrt(len(image_positions))
        if grid * grid != len(image_positions):
            raise ValueError(f"grounding attention needs a square patch grid; row {row} has "
                             f"{len(image_positions)} image tokens")
        loc = is_location[row]
        starts = (loc[1:] & ~loc[:-1]).nonzero().flatten() + 1
        for start in starts.tolist():
            if start + 4 > len(loc) or not bool(loc[start:start + 4].all()):
                continue
            x1, y1, x2, y2 = (values[labels[row, start:start + 4]].float() / scale).tolist()
            patches = covered_patches((x1, y1, x2, y2), grid).to(image_positions.device)
            targets = image_positions[patches]
            for offset in range(4 if every_coordinate else 1):
                queries.append(BoxQuery(row, start - 1 + offset, targets))
            if phrase_ids is not None:
                queries.extend(BoxQuery(row, position, targets)
                               for position in phrase_positions(labels[row], start, phrase_ids))
    return queries


def grounding_attention_loss(attention: Tensor, queries: list[BoxQuery], head: int = 0) -> Tensor:
    """Mean ``-log`` attention mass that ``head`` puts on each box's patches (0 when there is no box).

    Args:
        attention: ``[B, H, T, T]`` attention probabilities of one layer.
        queries: from :func:`box_queries`.
        head: the supervised head.
    """
    if not queries:
        return attention.new_zeros(())
    # One gather for every query: indexing query by query made each backward step write a zero tensor the size of
    # the whole [B, H, T, T] map, which took most of an SFT step's time on the quickstart's model.
    device = attention.device
    counts = torch.tensor([len(q.targets) for q in queries], device=device)
    rows = torch.tensor([q.row for q in queries], device=device).repeat_interleave(counts)
    positions = torch.tensor([q.query for q in queries], device=device).repeat_interleave(counts)
    targets = torch.cat([q.targets.to(device) for q in queries])
    picked = attention[rows, head, positions, targets].float()
    segment = torch.arange(len(queries), device=device).repeat_interleave(counts)
    masses = picked.new_zeros(len(queries)).index_add(0, segment, picked)
    return -torch.log(masses.clamp_min(1e-6)).mean()
