"""``RunDirCheckpoint``: checkpoints in one folder per run directory, so ``--ckpt_path last`` finds them."""

from __future__ import annotations

import os

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class RunDirCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose default folder is ``<trainer.default_root_dir>/checkpoints``.

    Lightning's default puts checkpoints under the logger's ``version_N`` folder, and a re-run (version N+1)
    then finds no ``last`` checkpoint and silently trains from step 0. With a folder fixed by the run
    directory, re-running the same command with ``--ckpt_path last`` resumes. Takes every
    ``ModelCheckpoint`` argument; an explicit ``dirpath`` wins.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
