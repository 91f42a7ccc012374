"""Sequence log-probs over completion tokens only, without materialising ``[B, T, V]`` logits.

The LM head runs on the hidden states of completion positions only, ``chunk_size`` rows at a time,
each chunk under activation checkpointing, so peak memory holds one ``[chunk, V]`` fp32 block instead
of a full fp32 logits tensor (150k-token vocabularies make that the largest tensor of a VLM step).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(
    hidden_states: Tensor, lm_head: nn.Module, labels: Tensor, *, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the labelled tokens of each row.

    Args:
        hidden_states: ``[B, T, H]`` last hidden states (position ``t`` predicts token ``t + 1``).
        lm_head: the output projection (``nn.Linear``; LoRA on it is not supported — it is never a target).
        labels: ``[B, T]`` token ids, ``-100`` everywhere but the completion.
        chunk_size: completion positions per LM-head block.

    Returns:
        ``(logps[B], num_tokens[B])``, fp32.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    selected = hidden_states[:, :-1][rows, cols]
    targets = target[rows, cols]
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        args = (selected[start : start + chunk_size], weight, bias, targets[start : start + chunk_size])
        if torch.is_grad_enabled() and selected.requires_grad:
            pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(*args))
    token_logps = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
    batch = labels.shape[0]
    logps = torch.zeros(batch, dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    return logps, mask.sum(dim=1).float()


def completion_logps_reference(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The plain formula on full logits (tests compare :func:`completion_logps` with it)."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(dim=1), mask.sum(dim=1).float()
