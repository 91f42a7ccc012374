"""``AdapterExport``: write the trained LoRA adapter (safetensors, ``save_pretrained``) during and after fit."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class AdapterExport(Callback):
    """Saves ``pl_module.policy`` (a peft model) with ``save_pretrained`` and the processor beside it.

    Args:
        dirpath: output folder; the final adapter goes to ``dirpath/final``, periodic ones to
            ``dirpath/step-<N>``. Default: ``<trainer.default_root_dir>/adapter``.
        every_n_steps: also export every N optimizer steps (0: only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0) -> None:
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps

    def _root(self, trainer: Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "adapter"

    @rank_zero_only
    def export(self, trainer: Trainer, pl_module: LightningModule, name: str) -> Path:
        """Write the adapter (and processor) to ``<root>/<name>`` and return the folder."""
        out = self._root(trainer) / name
        pl_module.policy.save_pretrained(str(out), safe_serialization=True)
        processor = getattr(pl_module, "processor", None)
        if processor is not None:
            processor.save_pretrained(str(out))
        log.info("AdapterExport: wrote %s", out)
        return out

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.export(trainer, pl_module, f"step-{step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, "final")
