"""Turn (image, prompt, completion) samples into model inputs through the policy's own processor.

Used by DPO (chosen and rejected) and SFT. The prompt is rendered by the processor's chat template
with the generation prompt; the completion is whatever the template adds after it for the assistant
turn (its end-of-turn tokens included), so every model family gets the exact format it was tuned on.
Images are expanded to image tokens by the processor itself (LLaVA, LLaVA-OneVision anyres,
Qwen2.5-VL dynamic resolution). Truncation cuts completions from their end and never touches the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

TEXT_KEYS = ("input_ids", "attention_mask")


def user_message(prompt: str, with_image: bool = True) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def render_prompt_and_completion(
    processor: Any, prompt: str, completion: str, with_image: bool = True
) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` such that their concatenation is the templated conversation."""
    messages = user_message(prompt, with_image)
    prompt_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(
        messages + [{"role": "assistant", "content": [{"type": "text", "text": completion}]}], tokenize=False
    )
    if full.startswith(prompt_text):
        return prompt_text, full[len(prompt_text):]
    eos = getattr(processor.tokenizer, "eos_token", None) or ""
    return prompt_text, completion + eos


def pad_sequences(sequences: Sequence[Tensor], pad_value: int, side: str = "right") -> Tensor:
    """Stack 1-D tensors into ``[B, max_len]``, padding on ``side``."""
    length = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = seq
        else:
            out[row, length - len(seq):] = seq
    return out


def encode_prompts(
    processor: Any, prompt_texts: list[str], images: list[Any]
) -> tuple[list[Tensor], dict[str, list[Tensor]], dict[str, Any]]:
    """Per-sample unpadded prompt ids (image tokens expanded), per-token extras such as Qwen2.5-VL's
    ``mm_token_type_ids`` (unpadded, same length as the ids), and the batched image inputs."""
    kwargs: dict[str, Any] = {"text": prompt_texts, "return_tensors": "pt", "padding": True}
    bos = getattr(processor.tokenizer, "bos_token", None)
    if bos and all(text.startswith(bos) for text in prompt_texts):
        kwargs["add_special_tokens"] = False  # the chat template already wrote BOS; don't add a second one
    if any(image is not None for image in images):
        kwargs["images"] = [image for image in images if image is not None]
    batch = processor(**kwargs)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    per_sample = [row[row_mask] for row, row_mask in zip(ids, mask)]
    per_token: dict[str, list[Tensor]] = {}
    image_inputs: dict[str, Any] = {}
    for key, value in batch.items():
        if key in TEXT_KEYS:
            continue
        if isinstance(value, Tensor) and value.shape == ids.shape:
            per_token[key] = [row[row_mask] for row, row_mask in zip(value, mask)]
        else:
            image_inputs[key] = value
    return per_sample, per_token, image_inputs


def encode_completions(tokenizer: Any, texts: list[str]) -> list[Tensor]:
    return [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long) for text in texts]


def truncate_completion(prompt_len: int, completion: Tensor, max_length: int | None, key: str) -> Tensor:
    """Cut the completion from its end so that prompt + completion fit ``max_length``."""
    if max_length is None:
        return completion
    if prompt_len > max_length:
        raise ValueError(
            f"sample {key!r}: the prompt alone is {prompt_len} tokens (image tokens included), more than "
            f"max_length={max_length}; raise max_length or lower the image resolution"
        )
    return completion[: max_length - prompt_len]


class PreferenceCollator:
    """Collate pair samples (``{"__key__", "json": {...}, "jpg": PIL}``) into a DPO batch.

    Batch keys: ``prompt_input_ids``/``prompt_attention_mask`` (left-padded), ``chosen_input_ids``/
    ``chosen_attention_mask`` and ``rejected_*`` (right-padded completions), the processor's image inputs
    (``pixel_values``, ``image_grid_thw``, ...), per-token prompt extras as ``prompt_<name>`` (left-padded
    with 0; names in ``per_token_keys``; completion tokens get 0), ``keys``, and ``ref_chosen_logps``/
    ``ref_rejected_logps`` when every sample carries precomputed reference log-probs.

    Args:
        processor: the policy's ``AutoProcessor``.
        max_length: maximum prompt + completion tokens (``None``: no limit).
    """

    def __init__(self, processor: Any, max_length: int | None = 2048) -> None:
        self.processor = processor
        self.max_length = max_length
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [sample["__key__"] for sample in samples]
        records = [sample["json"] for sample in samples]
        images = [next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None) for sample in samples]
        prompts, chosen, rejected = [], [], []
        for record, image in zip(records, images):
            prompt_text, chosen_text = render_prompt_and_completion(
                self.processor, record["prompt"], record["chosen"], image is not None)
            _, rejected_text = render_prompt_and_completion(
                self.processor, record["prompt"], record["rejected"], image is not None)
            prompts.append(prompt_text)
            chosen.append(chosen_text)
            rejected.append(rejected_text)
        prompt_ids, per_token, image_inputs = encode_prompts(self.processor, prompts, images)
        tokenizer = self.processor.tokenizer
        chosen_ids = [truncate_completion(len(p), c, self.max_length, k)
                      for p, c, k in zip(prompt_ids, encode_completions(tokenizer, chosen), keys)]
        rejected_ids = [truncate_completion(len(p), r, self.max_length, k)
                        for p, r, k in zip(prompt_ids, encode_completions(tokenizer, rejected), keys)]
        batch: dict[str, Any] = {"keys": keys, **image_inputs}
        for name, seqs, side in (("prompt", prompt_ids, "left"), ("chosen", chosen_ids, "right"),
                                 ("rejected", rejected_ids, "right")):
            batch[f"{name}_input_ids"] = pad_sequences(seqs, self.pad_id, side)
            batch[f"{name}_attention_mask"] = pad_sequences([torch.ones_like(s) for s in seqs], 0, side)
        for key, seqs in per_token.items():
            batch[f"prompt_{key}"] = pad_sequences(seqs, 0, "left")
        batch["per_token_keys"] = sorted(per_token)
        ref = [record.get("ref_logps") for record in records]
        if all(isinstance(r, dict) for r in ref):
            batch["ref_chosen_logps"] = torch.tensor([r["chosen"] for r in ref], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([r["rejected"] for r in ref], dtype=torch.float32)
        return batch
