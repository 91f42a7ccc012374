"""Runtime compatibility shim that lets ``groundingdino-py`` (0.4) build and run under transformers 5.

Its ``BertModelWarper`` (``groundingdino/models/GroundingDINO/bertwarper.py``) re-implements ``BertModel.forward``
from transformers 4 and binds ``bert_model.get_extended_attention_mask``, ``invert_attention_mask`` and
``get_head_mask`` in ``__init__``. transformers 5 removed those helpers from ``BertModel`` (and renamed
``BertEmbeddings``' ``past_key_values_length`` and ``BertEncoder``'s ``head_mask``/``return_dict`` arguments), so
building the model fails with ``AttributeError: 'BertModel' object has no attribute
'get_extended_attention_mask'``.

:func:`apply` replaces ``BertModelWarper.__init__`` and ``forward`` on the class (site-packages is never edited).
The replacement keeps the submodule names ``embeddings``/``encoder``/``pooler``, so official checkpoints' ``bert.*``
keys still load, and does what the original forward did for the inputs GroundingDINO passes (``input_ids``,
``attention_mask`` as a ``[B, L]`` or sub-sentence ``[B, L, L]`` mask, ``token_type_ids``, ``position_ids``):
turn the 0/1 mask into an additive ``[B, 1, L, L]`` mask (what ``get_extended_attention_mask`` returned) and run
embeddings → encoder → pooler. transformers 4's ``BertEncoder`` takes the same additive mask, so the shim is
harmless there, but it is only applied where it is needed (:func:`needs_patch`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

PATCH_MARKER = "_spr_lightning_compat"
_ORIGINALS: dict[str, Any] = {}


def _warper_class() -> type:
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper

    return BertModelWarper


def _init(self: nn.Module, bert_model: BertModel) -> None:
    nn.Module.__init__(self)
    self.config = bert_model.config
    self.embeddings = bert_model.embeddings
    self.encoder = bert_model.encoder
    self.pooler = bert_model.pooler


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 mask ``[B, L]`` or ``[B, L, L]`` → additive ``[B, 1, L|1, L]`` mask (0 keep, dtype min drop).

    What transformers 4's ``ModuleUtilsMixin.get_extended_attention_mask`` returned for an encoder.
    """
    if attention_mask.dim() == 3:
        mask = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        mask = attention_mask[:, None, None, :]
    else:
        raise ValueError(f"attention_mask must be [B, L] or [B, L, L], got {tuple(attention_mask.shape)}")
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


def _forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **unused: Any,
) -> BaseModelOutputWithPoolingAndCrossAttentions:
    if input_ids is None:
        raise ValueError("the GroundingDINO text encoder is always called with input_ids")
    hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape, device=input_ids.device)
    mask = extended_attention_mask(attention_mask, hidden.dtype)
    sequence = self.encoder(hidden, attention_mask=mask)[0]
    pooled = self.pooler(sequence) if self.pooler is not None else None
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled)


def needs_patch() -> bool:
    """Whether the installed transformers lacks the ``BertModel`` helpers ``BertModelWarper`` binds."""
    return not hasattr(BertModel, "get_extended_attention_mask")


def is_patched() -> bool:
    return bool(getattr(_warper_class(), PATCH_MARKER, False))


def apply(force: bool = False) -> bool:
    """Patch ``BertModelWarper`` if needed (or if ``force``); idempotent.

    Returns:
        whether the class is patched after the call.
    """
    cls = _warper_class()
    if is_patched() or not (force or needs_patch()):
        return is_patched()
    _ORIGINALS.update(__init__=cls.__init__, forward=cls.forward)
    cls.__init__ = _init
    cls.forward = _forward
    setattr(cls, PATCH_MARKER, True)
    return True


def revert() -> None:
    """Restore the package's own ``BertModelWarper`` (for tests that show the shim is needed)."""
    cls = _warper_class()
    if not is_patched():
        return
    cls.__init__ = _ORIGINALS["__init__"]
    cls.forward = _ORIGINALS["forward"]
    delattr(cls, PATCH_MARKER)
