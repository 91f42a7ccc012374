"""The one entry point of every stage: a thin :class:`LightningCLI` subclass.

Model and datamodule are picked by ``class_path`` in the YAML (subclass mode), so each stage
(generation, scoring, DPO, evaluation) is just a config file.
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

DEFAULT_SEED = 1234


class SPRLightningCLI(LightningCLI):
    """LightningCLI with spr_lightning's defaults (seeded runs, config saved beside the logs)."""

    def add_arguments_to_parser(self, parser) -> None:
        """Stage-specific argument links are added here as stages land."""


def cli_main(args: ArgsType = None, *, run: bool = True) -> SPRLightningCLI:
    """Run the CLI; ``args`` lets tests call it in-process (``cli_main(["fit", "--config", path])``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SPRLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=DEFAULT_SEED,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
