"""Build the concatenated chosen+rejected model inputs from a :class:`datamodules.collate.PreferenceCollator`
batch: rows ``[chosen_1..chosen_B, rejected_1..rejected_B]``, prompt then completion, right-padded,
labels ``-100`` everywhere but the completion; image inputs repeated for the second half."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spr_lightning.logprobs import IGNORE_INDEX

BATCH_TEXT_KEYS = {
    "keys", "prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask",
    "rejected_input_ids", "rejected_attention_mask", "ref_chosen_logps", "ref_rejected_logps", "per_token_keys",
}


def image_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The processor's image tensors of a batch (``pixel_values``, ``image_grid_thw``, ...)."""
    per_token = {f"prompt_{name}" for name in batch.get("per_token_keys", [])}
    return {k: v for k, v in batch.items() if k not in BATCH_TEXT_KEYS and k not in per_token}


def repeat_image_inputs(inputs: dict[str, Any], times: int) -> dict[str, Any]:
    """Repeat every image tensor along dim 0; valid for per-image rows (LLaVA ``[B,3,H,W]``, ``image_sizes``)
    and for flattened patches with their grid (Qwen2.5-VL ``pixel_values [sum_patches, D]`` + ``image_grid_thw``)."""
    return {k: torch.cat([v] * times) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def concatenated_inputs(batch: dict[str, Any], pad_id: int) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` for ``2B`` rows, per-token extras (completion tokens get
    0, e.g. ``mm_token_type_ids`` "text"), plus the repeated image inputs."""
    per_token_keys = list(batch.get("per_token_keys", []))
    rows: list[dict[str, Tensor]] = []
    prompt_mask = batch["prompt_attention_mask"].bool()
    for name in ("chosen", "rejected"):
        ids, mask = batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"].bool()
        for i in range(ids.shape[0]):
            prompt = batch["prompt_input_ids"][i][prompt_mask[i]]
            completion = ids[i][mask[i]]
            row = {
                "input_ids": torch.cat([prompt, completion]),
                "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), completion]),
            }
            for key in per_token_keys:
                extra = batch[f"prompt_{key}"][i][prompt_mask[i]]
                row[key] = torch.cat([extra, torch.zeros_like(completion, dtype=extra.dtype)])
            rows.append(row)
    length = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, **{key: 0 for key in per_token_keys}}
    out = {key: torch.full((len(rows), length), value, dtype=rows[0][key].dtype,
                           device=batch["prompt_input_ids"].device) for key, value in fill.items()}
    out["attention_mask"] = torch.zeros_like(out["input_ids"])
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for key in fill:
            out[key][i, :n] = row[key]
        out["attention_mask"][i, :n] = 1
    return {**out, **repeat_image_inputs(image_inputs(batch), 2)}
