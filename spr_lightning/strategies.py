"""Strategy helpers for LoRA fine-tuning of VLMs at scale.

``LoRAFSDPStrategy`` names the layer classes to wrap instead of importing them, so one YAML serves every
model family, and always uses ``use_orig_params=True``: inside one FSDP unit the frozen base weights and
the trainable LoRA weights must keep their own ``requires_grad`` (flat parameters would need them equal).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


class ModuleNameMatcher:
    """Picklable predicate: is this module an instance of one of the named classes?"""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = frozenset(class_names)

    def __call__(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.class_names


def name_based_wrap_policy(class_names: Sequence[str]) -> Any:
    """An FSDP ``auto_wrap_policy`` wrapping every module whose class name is in ``class_names``."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=ModuleNameMatcher(class_names))


class LoRAFSDPStrategy(FSDPStrategy):
    """FSDP for LoRA policies: decoder (and vision) layers as units, original parameters kept.

    Args:
        layer_class_names: class names of the transformer blocks to make FSDP units (and, with
            ``activation_checkpointing_layers``, to checkpoint), e.g. ``Qwen2DecoderLayer``.
        activation_checkpointing_layers: recompute those layers' activations in backward.
        **kwargs: passed to :class:`lightning.pytorch.strategies.FSDPStrategy` (``sharding_strategy``,
            ``cpu_offload``, ``state_dict_type``, ...).
    """

    def __init__(
        self, layer_class_names: list[str], activation_checkpointing_layers: bool = True, **kwargs: Any
    ) -> None:
        if not layer_class_names:
            raise ValueError("LoRAFSDPStrategy needs at least one layer class name to wrap")
        policy = name_based_wrap_policy(layer_class_names)
        if activation_checkpointing_layers:
            kwargs.setdefault("activation_checkpointing_policy", policy)
        kwargs["use_orig_params"] = True
        super().__init__(auto_wrap_policy=policy, **kwargs)
        self.layer_class_names = list(layer_class_names)
