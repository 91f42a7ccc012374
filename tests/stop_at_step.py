"""Test helper: end a fit at a given global step, as an interruption would (the config is unchanged)."""

from lightning.pytorch import Callback


class StopAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True

