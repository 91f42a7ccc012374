"""Load a policy VLM and put LoRA on its language model only (SPR appendix §2).

Vision tower, projector, embeddings and LM head stay frozen: peft freezes every base weight, and the
LoRA target set is built from the ``nn.Linear`` layers *inside the language model* only, so nothing in
the vision path ever gets an adapter.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from spr_lightning.tiny import resolve_model_path

log = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(
    model_name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """Any ``AutoModelForImageTextToText`` by hub id, local path or ``tiny:<family>``.

    ``trust_remote_code`` stays off unless the config sets it (custom code is never run by default).
    """
    from transformers import AutoModelForImageTextToText

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    kwargs = {"dtype": _DTYPES[dtype], "trust_remote_code": trust_remote_code, "revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForImageTextToText.from_pretrained(resolve_model_path(model_name_or_path), **kwargs)


def load_processor(model_name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The model's own ``AutoProcessor`` (tokenizer, image processor, chat template)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(
        resolve_model_path(model_name_or_path), trust_remote_code=trust_remote_code, revision=revision
    )


def language_model_prefix(model: nn.Module) -> str:
    """Dotted name of the language-model submodule (``model.language_model`` in transformers 5 VLMs)."""
    for name, _ in model.named_modules():
        if name.split(".")[-1] == "language_model":
            return name
    raise ValueError(
        f"{type(model).__name__} has no 'language_model' submodule; pass lora_target_modules explicitly"
    )


def language_model_lora_targets(model: nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> str:
    """A peft ``target_modules`` regex matching every ``nn.Linear`` inside the language model only."""
    prefix = language_model_prefix(model)
    leaves = sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude
    })
    if not leaves:
        raise ValueError(f"no nn.Linear layers found under {prefix!r}")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"


def apply_lora(
    model: nn.Module,
    *,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    target_modules: str | list[str] | None = None,
    adapter_path: str | None = None,
) -> nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA on the language model (SPR: r=128, α=256).

    With ``adapter_path`` an existing adapter is loaded (trainable) instead of a fresh one.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path is not None:
        return PeftModel.from_pretrained(model, str(Path(adapter_path)), is_trainable=True)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or language_model_lora_targets(model),
        bias="none",
    )
    return get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_reference(
    model_name_or_path: str,
    *,
    adapter_path: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> nn.Module:
    """A frozen reference in eval mode: the base policy, or the base with a (frozen) peft adapter on top.

    Used by ``DPOModule`` (option ``reference_model``) and the reference log-probs stage; the default
    reference of ``DPOModule`` (its policy with the adapter disabled) has exactly the base weights, so
    ``adapter_path=None`` reproduces it.
    """
    model = load_policy(model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
    model.eval().requires_grad_(False)
    return model
