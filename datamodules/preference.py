"""``PreferenceDataModule``: pair shards → DPO batches, streamed with WebDataset.

Shards are split by node (rank) and by dataloader worker, shuffled (shards, then a sample buffer), and
repeated to a fixed number of samples per worker per epoch (``with_epoch``), so every rank runs the
same number of steps under DDP and Lightning knows the epoch length.
"""

from __future__ import annotations

import glob
import math
import tarfile
from pathlib import Path
from typing import Any

import webdataset as wds
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.collate import PreferenceCollator
from spr_lightning.shards import list_shards, read_manifests, validate_record


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns, directories (their complete ``pairs`` shards), globs, or any URL WebDataset takes."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            shards = list_shards(path, "pairs") or sorted(str(p) for p in path.glob("*.tar"))
            if not shards:
                raise FileNotFoundError(f"no .tar shards in directory {path}")
            out.extend(shards)
        elif any(ch in item for ch in "*?[") and "://" not in item:
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no shards match {item!r}")
            out.extend(matches)
        else:
            out.extend(wds.shardlists.expand_urls(item))
    return out


def count_samples(shards: list[str]) -> int:
    """Samples in local shards: from manifests where present, else by reading tar headers."""
    total = 0
    manifest_counts: dict[str, int] = {}
    for directory in {str(Path(s).parent) for s in shards if Path(s).exists()}:
        manifest_counts.update({str(Path(directory) / e["shard"]): e["count"] for e in read_manifests(directory)})
    for shard in shards:
        if shard in manifest_counts:
            total += manifest_counts[shard]
            continue
        if not Path(shard).exists():
            raise ValueError(f"cannot count samples of remote shard {shard}; set samples_per_epoch")
        with tarfile.open(shard) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return total


class _SampleSplit:
    """Picklable pipeline stage: every ``n``-th sample per (rank, worker), for when there are fewer shards
    than readers and shard-level splitting would leave some rank with nothing (and DDP hanging)."""

    def __call__(self, source):
        import torch.distributed as dist
        from torch.utils.data import get_worker_info

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = rank * workers + worker, world * workers
        for index, sample in enumerate(source):
            if index % slots == slot:
                yield sample


class _ValidatePairs:
    """Picklable map: decode-time schema check naming the shard and key."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "json" not in sample:
            raise ValueError(f"{sample.get('__url__', '?')}: sample {sample.get('__key__')!r} has no json")
        sample["json"] = validate_record("pairs", sample["json"], shard=sample.get("__url__", "?"),
                                         key=sample.get("__key__", "?"))
        return sample


def _all_shards(urls):
    """Splitter that gives every reader all shards (samples are split later by :class:`_SampleSplit`)."""
    yield from urls


class PreferenceDataModule(LightningDataModule):
    """Streams preference-pair shards for :class:`spr_lightning.dpo.DPOModule`.

    Args:
        train_urls: pair shards: a directory written by the scoring stage, a glob, a brace pattern
            (``pairs-r000-{000000..000009}.tar``), or any URL/pipe WebDataset accepts.
        val_urls: optional validation shards.
        processor_name_or_path: processor for collation; default: the policy module's own processor.
        batch_size: pairs per batch per device (SPR: 2).
        num_workers: dataloader workers per device.
        max_length: maximum prompt + completion tokens; completions are cut from their end.
        shuffle_buffer: sample shuffle buffer (0: no sample shuffle).
        samples_per_epoch: global samples per training epoch; default: counted from local shards.
        seed: shard/sample shuffle seed.
    """

    def __init__(
        self,
        train_urls: str | list[str],
        val_urls: str | list[str] | None = None,
        processor_name_or_path: str | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        max_length: int | None = 2048,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.collator: PreferenceCollator | None = None

    def _processor(self) -> Any:
        if self.hparams.processor_name_or_path is not None:
            from spr_lightning.models import load_processor

            return load_processor(self.hparams.processor_name_or_path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "processor"):
            raise ValueError("PreferenceDataModule needs processor_name_or_path, or a module with a `processor`")
        return module.processor

    def setup(self, stage: str) -> None:
        if self.collator is None:
            self.collator = PreferenceCollator(self._processor(), max_length=self.hparams.max_length)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _loader(self, urls: str | list[str], train: bool) -> DataLoader:
        hp = self.hparams
        shards = expand_urls(urls)
        total = hp.samples_per_epoch if (train and hp.samples_per_epoch) else count_samples(shards)
        workers = max(hp.num_workers, 1)
        per_worker = math.ceil(total / (self._world() * workers))
        split_shards = len(shards) >= self._world() * workers
        dataset = wds.WebDataset(
            shards, shardshuffle=len(shards) if train else False, seed=hp.seed, repeat=True, empty_check=False,
            nodesplitter=wds.split_by_node if split_shards else _all_shards,
            workersplitter=wds.split_by_worker if split_shards else _all_shards,
        )
        if not split_shards:
            dataset = dataset.compose(_SampleSplit())
        if train and hp.shuffle_buffer > 0:
            dataset = dataset.shuffle(hp.shuffle_buffer, seed=hp.seed)
        dataset = dataset.decode("pil").map(_ValidatePairs()).with_epoch(per_worker).with_length(per_worker * workers)
        return DataLoader(dataset, batch_size=hp.batch_size, num_workers=hp.num_workers, collate_fn=self.collator,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_urls, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.hparams.val_urls is None:
            return []
        return self._loader(self.hparams.val_urls, train=False)
