"""Soft targets for coordinate tokens: neighbouring bins are near misses, not errors.

A bin format (MiniGPT-v2's ``<0>``...``<100>``) makes each box coordinate one token out of 101, and plain
cross-entropy punishes ``<35>`` for a target ``<34>`` as hard as ``<90>``: nothing in the loss says the bins are
ordered. With ``sigma`` > 0 the answer tokens that are coordinates are trained against a Gaussian over the bins,
centred on the written one with a standard deviation of ``sigma`` bins (truncated to the bins that exist and
renormalised); every other token keeps its one-hot target. The loss stays a cross-entropy,
``logsumexp(logits) - sum_j q_j * logit_j``, so it is exact against ``-sum_j q_j log p_j`` over the whole vocabulary.

Why here: on SPR-Shapes the image tokens hold far tighter boxes than the language model writes from them
(docs/results/notebook.md, "How precise can the image tokens make a box?").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CoordinateTargets", "coordinate_targets", "soft_target_logits"]


@dataclass(frozen=True)
class CoordinateTargets:
    """What the loss needs to soften coordinate tokens.

    Attributes:
        value_of: ``[V]`` long, the bin a token id stands for, ``-1`` for any other token.
        location_ids: ``[L]`` long, the token id of bin ``0..L-1`` in order.
        kernel: ``[L, L]`` float, row ``k`` the target distribution over the bins for a written ``<k>``.
    """

    value_of: Tensor
    location_ids: Tensor
    kernel: Tensor

    def to(self, device: torch.device | str) -> CoordinateTargets:
        return CoordinateTargets(self.value_of.to(device), self.location_ids.to(device), self.kernel.to(device))


def coordinate_targets(value_of: Tensor, sigma: float) -> CoordinateTargets:
    """Gaussian soft targets over the bins that ``value_of`` (``[V]``, -1 for non-location tokens; e.g.
    :func:`spr_lightning.grounding_attention.location_token_values`) names.

    Raises:
        ValueError: ``sigma`` <= 0, or the bins are not exactly ``0..L-1``, each one token.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 bins, got {sigma}")
    ids = (value_of >= 0).nonzero().squeeze(1)
    values = value_of[ids]
    order = values.argsort()
    ids, values = ids[order], values[order]
    if not torch.equal(values, torch.arange(len(values))):
        raise ValueError(f"coordinate labels need one token per bin 0..{len(values) - 1}; the tokenizer's location "
                         "tokens are not that")
    bins = torch.arange(len(values), dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((bins[None, :] - bins[:, None]) / sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    return CoordinateTargets(value_of=value_of.long(), location_ids=ids, kernel=kernel.float())


def soft_target_logits(logits: Tensor, targets: Tensor, soft: CoordinateTargets | None) -> Tensor:
    """Per position, the target-weighted logit ``sum_j q_j * logit_j``: the target token's logit where its target
    is one-hot, the Gaussian-weighted mean of the location logits where the target is a coordinate token.

    Args:
        logits: ``[N, V]`` fp32 logits.
        targets: ``[N]`` target token ids.
        soft: the coordinate targets, or ``None`` for plain one-hot targets everywhere.
    """
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    if soft is None:
        return picked
    bins = soft.value_of[targets]
    rows = (bins >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return picked
    weights = soft.kernel[bins[rows]].to(logits.dtype)
    smoothed = (logits[rows][:, soft.location_ids] * weights).sum(-1)
    return picked.index_put((rows,), smoothed)
