"""``ReferenceLogpsWriter``: precompute DPO reference log-probs once, as a ``predict`` stage over pair shards.

DPO (SPR Eq. 4) needs ``log π_ref(y|x)`` of every chosen and rejected answer. :class:`spr_lightning.dpo.DPOModule`
computes them on the fly with a second forward per step (the policy with its adapter disabled); for several
epochs, or when the reference differs from the policy's base, computing them once is cheaper. This module
reads pair shards (:class:`datamodules.pairs_predict.PairShardsPredictDataModule`) and returns every pair
unchanged — same key, same encoded image bytes, same record — plus::

    json["ref_logps"] = {"chosen": float, "rejected": float, "model": str, "adapter": str | None,
                         "max_length": int | None}

for :class:`callbacks.ShardWriter` to write into a *new* directory of ``pairs`` shards, which
:class:`datamodules.preference.PreferenceDataModule` reads as it reads any pair shards; the collator turns
``ref_logps`` into ``ref_chosen_logps``/``ref_rejected_logps`` and ``DPOModule`` uses them instead of its own
reference forward (``use_precomputed_ref=True``, its default).

The numbers come from the code DPO itself runs: the same collator, :func:`spr_lightning.dpo_inputs.
concatenated_inputs` and :func:`spr_lightning.dpo.sequence_logps`, in eval mode without gradients, and the
reference is loaded the way ``DPOModule`` loads one (the base policy; with ``adapter_path``, the base with that
adapter frozen on top, as ``DPOModule(reference_model=..., reference_adapter_path=...)``). They are valid only
for DPO runs with the same ``max_length`` (truncation changes the completions) and processor; both are stored
in the record so a mismatch can be seen.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from datamodules.collate import PreferenceCollator
from datamodules.pairs_predict import RAW_KEY
from spr_lightning.dpo import sequence_logps
from spr_lightning.dpo_inputs import concatenated_inputs
from spr_lightning.models import load_processor, load_reference

log = logging.getLogger(__name__)

__all__ = ["ReferenceLogpsWriter", "load_reference", "with_ref_logps"]


def with_ref_logps(sample: dict[str, Any], chosen: float, rejected: float, meta: dict[str, Any]) -> dict[str, Any]:
    """The output sample: the input's key and encoded payload unchanged, the record plus ``ref_logps``."""
    record = {**sample["json"], "ref_logps": {"chosen": chosen, "rejected": rejected, **meta}}
    return {"__key__": sample["__key__"], **sample[RAW_KEY], "json": record}


class ReferenceLogpsWriter(LightningModule):
    """Reference log-probs of chosen and rejected answers, written back into pair samples.

    ``predict_step`` takes a list of samples from ``PairShardsPredictDataModule`` and returns them, in order,
    with ``json["ref_logps"]`` added (fp32 values), for ``callbacks.ShardWriter(prefix="pairs")``.

    Args:
        model_name_or_path: the DPO policy's base model (hub id, local path or ``tiny:<family>``): DPO's
            ``model.init_args.model_name_or_path``, or its ``reference_model`` when it sets one.
        adapter_path: a trained adapter to put (frozen) on the base, for a reference that is a previous DPO
            round (DPO's ``reference_adapter_path``). ``None``: the base model, i.e. the reference of a
            ``DPOModule`` without ``reference_model`` — also one that continues from ``adapter_path``, since
            its reference is the policy with the adapter disabled.
        max_length: maximum prompt + completion tokens; must equal the DPO data's ``max_length``.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``, ``auto``); the DPO run's ``dtype``.
        logps_chunk_size: completion positions per LM-head block (memory only; results do not depend on it).
        trust_remote_code: allow custom model code from the hub (off unless set).
    """

    def __init__(
        self,
        model_name_or_path: str,
        adapter_path: str | None = None,
        max_length: int | None = 2048,
        dtype: str = "float32",
        logps_chunk_size: int = 1024,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.processor: Any = None
        self.collator: PreferenceCollator | None = None
        self.reference: nn.Module | None = None
        self.meta = {"model": model_name_or_path, "adapter": adapter_path, "max_length": max_length}
        self.pairs_done = 0

    @property
    def pad_id(self) -> int:
        return self.collator.pad_id

    def configure_model(self) -> None:
        """Load processor and reference once, inside the strategy's context (before it moves them to the device).

        Not in ``__init__``, so that a config can be parsed and instantiated without fetching any weights.
        """
        if self.reference is not None:
            return
        hp = self.hparams
        self.processor = load_processor(hp.model_name_or_path, trust_remote_code=hp.trust_remote_code)
        self.collator = PreferenceCollator(self.processor, max_length=hp.max_length)
        self.reference = load_reference(hp.model_name_or_path, adapter_path=hp.adapter_path, dtype=hp.dtype,
                                        trust_remote_code=hp.trust_remote_code)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(chosen[B], rejected[B])`` fp32 reference log-probs of a collated DPO batch."""
        self.configure_model()
        self.reference.eval()
        batch = move_data_to_device(batch, self.device)
        logps, _ = sequence_logps(self.reference, concatenated_inputs(batch, self.pad_id),
                                  self.hparams.logps_chunk_size)
        size = batch["chosen_input_ids"].shape[0]
        return logps[:size].float(), logps[size:].float()

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int = 0,
                     dataloader_idx: int = 0) -> list[dict[str, Any]]:
        if not batch:
            return []
        self.configure_model()
        collated = self.collator([{k: v for k, v in s.items() if k != RAW_KEY} for s in batch])
        chosen, rejected = self.reference_logps(collated)
        self.pairs_done += len(batch)
        return [with_ref_logps(sample, c, r, self.meta)
                for sample, c, r in zip(batch, chosen.tolist(), rejected.tolist(), strict=True)]

    def on_predict_start(self) -> None:
        self.pairs_done = 0

    def on_predict_end(self) -> None:
        log.info("rank %d: reference log-probs of %d pairs", self.global_rank, self.pairs_done)
