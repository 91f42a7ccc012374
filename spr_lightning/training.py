"""What the training stages (DPO, SFT) share: the paper's optimizer/schedule and LoRA-only checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def adamw_cosine(params: list[nn.Parameter] | list[dict[str, Any]], lr: float, weight_decay: float, warmup_ratio: float,
                 total_steps: int) -> dict[str, Any]:
    """AdamW with linear warmup then cosine decay (the SPR authors' scripts), stepped every optimizer step."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(int(total_steps), 1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def keep_trainable_weights(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop frozen weights from a Lightning checkpoint (a 7B base would be 14 GB per checkpoint)."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
