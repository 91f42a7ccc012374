"""Shared-prefix DPO forward: the image and prompt are encoded once per pair, both completions on top of them.

The concatenated forward (:func:`spr_lightning.dpo_inputs.concatenated_inputs`) runs the vision tower and every
prompt token twice per pair, once under the chosen and once under the rejected completion. Prompts of a VLM
hold hundreds to thousands of image tokens while SPR completions are a few dozen text tokens, so most of that
work is duplicated. Here the decoder runs once on the left-padded prompts, recording each layer's keys/values;
they are indexed into ``[prompt_1..B, prompt_1..B]`` rows (indexing stays in the autograd graph, nothing is
detached), and one more decoder call runs the chosen and rejected completion tokens against them. Gradients of
both branches flow back through the shared keys/values into the prefix.

The cache is two small ``transformers.Cache`` objects rather than one ``DynamicCache``: the prefix pass
records each layer's keys/values (and attends to them only), the completion pass attends to
``prefix ++ own`` keys/values and stores nothing. Neither pass mutates what the other reads, so a layer's forward
can be replayed: activation checkpointing (whose transformers wrapper otherwise drops the cache, as an
appending ``DynamicCache`` would grow a second time on the backward replay) recomputes exactly the original
forward, and checkpointed layers are told to keep the cache for the duration of the call.

Positions must match what the concatenated forward (and generation) gives each token:

* LLaVA-style 1-D rope: the prompt's positions are ``cumsum(mask) - 1`` (0 on the left padding), completion
  token ``t`` sits at ``prompt_length + t``.
* Qwen2-VL / Qwen2.5-VL multimodal rope: the prompt's ``[3, B, P]`` positions come from the model's own
  ``get_rope_index``; completion token ``t`` is text and gets ``max(prompt positions) + 1 + t`` on all three
  axes (the ``rope_deltas`` rule ``generate`` uses).

The first completion token is predicted by the last prompt position (always a real token: prompts are
left-padded), so that hidden state is kept from the prefix pass and put in front of the completion's own.

Families not listed in :data:`POSITION_STYLES`, and decoders with non-full-attention layers (sliding window,
linear attention: their caches are not the plain keys/values handled here), fall back to the concatenated
forward with a one-line warning, logged once per reason.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from spr_lightning.dpo_inputs import image_inputs
from spr_lightning.logprobs import IGNORE_INDEX, completion_logps

log = logging.getLogger(__name__)

LINEAR = "linear"
MROPE = "mrope"
# ``config.model_type`` -> how positions are built. Only families whose inner ``model.model`` forward takes
# ``position_ids``/``cache`` with the transformers-5 semantics and whose rope is checked in the tests (or is the
# same Llama/Qwen2 text decoder as a checked one) are listed.
POSITION_STYLES: dict[str, str] = {
    "llava": LINEAR,
    "llava_next": LINEAR,
    "llava_onevision": LINEAR,
    "qwen2_vl": MROPE,
    "qwen2_5_vl": MROPE,
}
_warned: set[str] = set()


def _base(model: nn.Module) -> nn.Module:
    """The transformers ``*ForConditionalGeneration`` under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fallback_reason(base: nn.Module) -> str | None:
    """Why the shared-prefix forward can't run on ``base`` (``None``: it can)."""
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in POSITION_STYLES:
        return f"model type {model_type!r} has no known position scheme"
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"{model_type} has non-full-attention layers ({sorted(set(layer_types))})"
    return None


class PrefixRecorder(DynamicLayer):
    """Prefix-pass cache layer: keeps the layer's keys/values and returns them unchanged (the prefix attends to
    itself only). A checkpoint replay overwrites them with the same values, after the completion pass read them."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class PrefixReader(DynamicLayer):
    """Completion-pass cache layer over fixed prefix keys/values: returns ``prefix ++ new`` and stores nothing,
    so every (re)play of the layer sees the same prefix."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def branch_cache(recorded: Cache, rows: Tensor) -> Cache:
    """A reader cache over rows ``rows`` of the recorded prefix (indexing keeps the autograd graph)."""
    return Cache(layers=[PrefixReader(layer.keys[rows], layer.values[rows]) for layer in recorded.layers])


@contextlib.contextmanager
def cache_through_checkpointing(base: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep the cache (our caches are replay-safe); restores the flag afterwards."""
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class attribute


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("shared-prefix forward unavailable (%s); using the concatenated forward", reason)


def prompt_positions(
    inner: nn.Module, style: str, prompt_ids: Tensor, prompt_mask: Tensor, images: dict[str, Any],
    extras: dict[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """Position ids of the left-padded prompts and the position of each row's first completion token.

    Returns:
        ``(position_ids, next_position)``: ``[B, P]`` (linear) or ``[3, B, P]`` (mrope), and ``[B]``.
    """
    mask = prompt_mask.long()
    grids = {k: images[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in images}
    if style == MROPE and "mm_token_type_ids" in extras and grids.keys() & {"image_grid_thw", "video_grid_thw"}:
        positions, deltas = inner.get_rope_index(
            prompt_ids, mm_token_type_ids=extras["mm_token_type_ids"], attention_mask=mask, **grids)
        # deltas = max position + 1 - real length, so this is max(prompt positions) + 1.
        return positions, mask.sum(-1) + deltas.reshape(-1).to(mask.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if style == MROPE:
        positions = positions[None].expand(3, -1, -1)
    return positions, mask.sum(-1)


def completion_positions(style: str, next_position: Tensor, length: int) -> Tensor:
    """``next_position + t`` for ``t < length``: ``[N, length]`` (linear) or ``[3, N, length]`` (mrope)."""
    positions = next_position[:, None] + torch.arange(length, device=next_position.device)
    return positions[None].expand(3, -1, -1) if style == MROPE else positions


def stacked_completions(batch: dict[str, Any], pad_id: int) -> tuple[Tensor, Tensor]:
    """Chosen then rejected completions as ``[2B, C]`` ids and mask, right-padded to the longer of the two."""
    parts = [(batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"]) for name in ("chosen", "rejected")]
    length = max(ids.shape[1] for ids, _ in parts)
    ids = torch.cat([nn.functional.pad(i, (0, length - i.shape[1]), value=pad_id) for i, _ in parts])
    mask = torch.cat([nn.functional.pad(m, (0, length - m.shape[1]), value=0) for _, m in parts])
    return ids, mask


def shared_prefix_logps(
    model: nn.Module, batch: dict[str, Any], pad_id: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs of a :class:`datamodules.collate.PreferenceCollator` batch.

    Args:
        model: the policy (peft-wrapped or not) or a plain reference model.
        batch: a preference batch (left-padded prompts, right-padded chosen/rejected completions, image inputs).
        pad_id: pad token id (fills the shorter completion block).
        chunk_size: completion positions per LM-head block (:func:`~spr_lightning.logprobs.completion_logps`).

    Returns:
        ``(logps[2B], counts[2B])`` fp32, rows ``[chosen_1..B, rejected_1..B]`` — the same values and order as
        ``sequence_logps(model, concatenated_inputs(batch, pad_id), chunk_size)``.
    """
    base = _base(model)
    reason = fallback_reason(base)
    if reason is not None:
        _warn_once(reason)
        # Imported here: `spr_lightning.dpo` imports this module.
        from spr_lightning.dpo import sequence_logps
        from spr_lightning.dpo_inputs import concatenated_inputs

        return sequence_logps(model, concatenated_inputs(batch, pad_id), chunk_size)
    style = POSITION_STYLES[base.config.model_type]
    inner = base.model
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded and non-empty (the last prompt column predicts the completion)")
    batch_size = prompt_ids.shape[0]
    images = image_inputs(batch)
    extras = {key: batch[f"prompt_{key}"] for key in batch.get("per_token_keys", [])}
    positions, next_position = prompt_positions(inner, style, prompt_ids, prompt_mask, images, extras)
    recorded = Cache(layer_class_to_replicate=PrefixRecorder)
    completion_ids, completion_mask = stacked_completions(batch, pad_id)
    length = completion_ids.shape[1]
    with cache_through_checkpointing(base):
        # use_cache=False: the caches are ours and are passed explicitly (layers use any cache they are given);
        # True would only make transformers warn under checkpointing and switch it off itself.
        prefix = inner(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, cache=recorded,
                       use_cache=False, **images, **extras)
        last_prompt_hidden = prefix.last_hidden_state[:, -1:].repeat(2, 1, 1)
        if length == 0:
            hidden = last_prompt_hidden
        else:
            # Rows [prompt_1..B, prompt_1..B] under [chosen_1..B, rejected_1..B].
            rows = torch.arange(batch_size, device=prompt_ids.device).repeat(2)
            completion = inner(
                input_ids=completion_ids,
                attention_mask=torch.cat([prompt_mask.repeat(2, 1), completion_mask], dim=1),
                position_ids=completion_positions(style, next_position.repeat(2), length),
                cache=branch_cache(recorded, rows),
                use_cache=False,
                **{key: torch.zeros_like(completion_ids, dtype=value.dtype) for key, value in extras.items()},
            )
            hidden = torch.cat([last_prompt_hidden, completion.last_hidden_state], dim=1)
    # Column 0 stands for the last prompt token: it carries no label and predicts completion token 0.
    labels = torch.full((2 * batch_size, length + 1), IGNORE_INDEX, dtype=torch.long, device=prompt_ids.device)
    labels[:, 1:] = completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return completion_logps(hidden, base.get_output_embeddings(), labels, chunk_size=chunk_size)
