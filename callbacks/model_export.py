"""``ModelExport``: write the trained model as a plain transformers folder that later stages load by path."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class ModelExport(Callback):
    """Calls ``pl_module.export_model(folder)`` (e.g. :meth:`spr_lightning.sft.SFTModule.export_model`: LoRA merged
    into the base, ``save_pretrained`` + processor) at the end of fit and optionally every N steps.

    The folder loads with ``AutoModelForImageTextToText.from_pretrained`` and is what generation, DPO and
    evaluation take as ``model_name_or_path``. Under sharded strategies (FSDP, DeepSpeed stage 3) rank 0 does
    not hold the full weights; export from a LoRA run, or from the checkpoint after consolidating it.

    Args:
        dirpath: output folder; the final model goes to ``dirpath/final``, periodic ones to ``dirpath/step-<N>``.
            Default: ``<trainer.default_root_dir>/model``.
        every_n_steps: also export every N optimizer steps (0: only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0) -> None:
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def _root(self, trainer: Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "model"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "export_model", None)):
            raise TypeError(f"ModelExport needs a module with export_model(out_dir); {type(pl_module).__name__} "
                            "has none (use callbacks.AdapterExport for a DPOModule adapter)")

    @rank_zero_only
    def export(self, trainer: Trainer, pl_module: LightningModule, name: str) -> Path:
        """Write the model to ``<root>/<name>`` and return the folder."""
        out = pl_module.export_model(self._root(trainer) / name)
        log.info("ModelExport: wrote %s", out)
        return out

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # `global_step` repeats across the micro-batches of an accumulated step: export each step once.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.export(trainer, pl_module, f"step-{step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, "final")
