"""``PairShardsPredictDataModule``: pair shards → per-sample batches for a ``predict`` pass over them.

Used by :class:`spr_lightning.reference.ReferenceLogpsWriter`, which reads pair shards and writes them again
with precomputed reference log-probs. Such a pass must see every pair exactly once, also under DDP and with
dataloader workers, so the split is the one of :mod:`datamodules.candidates` (shards dealt to ranks then
workers when there are enough of them, else every reader keeps every n-th sample), with rank and world size
taken from the trainer when the dataloader is built. No shuffling, no repetition, no padding to equal lengths.

Every sample carries two views of the same entries:

* the decoded view DPO training would see — ``json`` as a validated dict, images as PIL — produced by the same
  WebDataset ``"pil"`` decoder as :class:`datamodules.preference.PairStream`, so collating it gives exactly the
  tensors of a DPO batch;
* ``__raw__``: the original encoded bytes of every payload entry but ``json`` (``jpg``, ``png``, ``txt``, ...),
  so the output shard stores the image as it was instead of compressing a JPEG a second time.

Keys already in a complete shard of ``skip_done_in`` (the output directory of the same command) are dropped
before decoding, so a re-run only processes what is missing.
"""

from __future__ import annotations

from typing import Any

from webdataset import autodecode

from datamodules.shard_predict import ShardPredictDataModule
from spr_lightning.shards import ShardFormatError, validate_record

__all__ = ["PairShardsPredictDataModule", "RAW_KEY"]

#: Sample entry holding the original encoded payload but ``json`` (``{extension: bytes}``); not a tar member.
RAW_KEY = "__raw__"


class _DecodePair:
    """Map: keep the encoded payload, decode it as DPO training would, validate the record.

    Errors name the shard and the key.
    """

    def __init__(self) -> None:
        self.decoder = autodecode.Decoder([autodecode.imagehandler("pil")])

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        shard, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        if "json" not in sample:
            raise ShardFormatError(f"{shard}: sample {key!r} has no json")
        raw = {name: value for name, value in sample.items() if not name.startswith("__") and name != "json"}
        try:
            decoded = self.decoder(dict(sample))
        except autodecode.DecodingError as err:
            raise ShardFormatError(f"{shard}: sample {key!r}: entry {err.k!r} does not decode: "
                                   f"{err.__cause__!r}") from None
        decoded["json"] = validate_record("pairs", decoded["json"], shard=shard, key=key)
        decoded[RAW_KEY] = raw
        return decoded


class PairShardsPredictDataModule(ShardPredictDataModule):
    """Streams pair shards for a ``predict`` pass, each pair exactly once across ranks and workers.

    A batch is the list of samples ``{"__key__", "__url__", "json": dict, "jpg": PIL, ..., "__raw__":
    {extension: original bytes}}``; the module collates it with its own processor.

    Args:
        urls: pair shards: a directory written by the scoring stage (its complete ``pairs`` shards), a glob,
            a brace pattern (``pairs-r000-{000000..000009}.tar``) or any URL WebDataset accepts; or a list.
        batch_size: pairs per batch per device.
        num_workers: dataloader workers per device (JPEG decoding, JSON parsing).
        skip_done_in: the output directory of a previous run of the same command: pairs whose key is in one
            of its complete shards are skipped (resume). ``None``: process everything.
    """

    def __init__(
        self,
        urls: str | list[str],
        batch_size: int = 8,
        num_workers: int = 0,
        skip_done_in: str | None = None,
    ) -> None:
        super().__init__(urls, batch_size, num_workers, skip_done_in)

    def decoder(self) -> _DecodePair:
        return _DecodePair()
