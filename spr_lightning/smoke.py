"""A CLI smoke test, not a stage: proves ``python -m spr_lightning fit|validate`` loads a real VLM.

:class:`CLISmokeTestModule` trains a (tiny) ``AutoModelForImageTextToText`` on random token
sequences with its own language-modelling loss. It exists only so that the CLI, config parsing,
model loading by path and the Trainer loop are exercised end to end; the SPR stages replace it
(``spr_lightning.dpo.DPOModule`` etc.). It makes no claim about learning anything useful.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, Dataset

from spr_lightning.tiny import resolve_model_path


class RandomTokenDataset(Dataset):
    """Seeded random token sequences (``input_ids`` only; no images)."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        # Stay clear of the low ids, where tiny tokenizers keep their special tokens.
        self.data = torch.randint(16, vocab_size, (num_samples, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[index]}


class CLISmokeTestDataModule(LightningDataModule):
    """Random token batches for :class:`CLISmokeTestModule`.

    Args:
        num_samples: samples per split.
        seq_len: tokens per sample.
        vocab_size: upper bound (exclusive) of the token ids; must not exceed the model's vocabulary.
        batch_size: samples per batch.
    """

    def __init__(self, num_samples: int = 8, seq_len: int = 16, vocab_size: int = 200, batch_size: int = 2) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokenDataset(self.num_samples, self.seq_len, self.vocab_size, 0), self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokenDataset(self.num_samples, self.seq_len, self.vocab_size, 1), self.batch_size)


class CLISmokeTestModule(LightningModule):
    """Loads a VLM through ``AutoModelForImageTextToText`` and fits its LM loss (smoke test only).

    Args:
        model_name_or_path: hub id, local path, or ``tiny:<family>`` (built offline on first use).
        lr: AdamW learning rate.
    """

    def __init__(self, model_name_or_path: str = "tiny:llava", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForImageTextToText

        self.model = AutoModelForImageTextToText.from_pretrained(resolve_model_path(model_name_or_path))

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr)
