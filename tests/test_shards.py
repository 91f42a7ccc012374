"""ShardWriter: atomic shards, manifests, resume without duplicates, schema validation."""

import json

import pytest
import torch
import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from callbacks import ShardWriter
from spr_lightning.shards import (
    SCHEMA_VERSION,
    ShardFormatError,
    done_keys,
    list_shards,
    sanitize_key,
    validate_record,
)


class EchoModule(LightningModule):
    """predict_step turns each integer of the batch into one sample (or raises at ``fail_at``)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.fail_at = fail_at
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom")
        return [{"__key__": f"q{int(i)}", "json": {"schema": SCHEMA_VERSION, "value": int(i)}} for i in batch]


def run_predict(out, items, samples_per_shard=3, fail_at=None):
    writer = ShardWriter(str(out), prefix="candidates", samples_per_shard=samples_per_shard)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(EchoModule(fail_at), DataLoader(items, batch_size=2), return_predictions=False)
    return writer


def read_keys(out):
    shards = list_shards(out, "candidates")
    return [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False).decode()]


def test_shards_are_complete_readable_and_listed(tmp_path):
    writer = run_predict(tmp_path, list(range(7)))
    assert writer.samples_written == 7
    assert len(list_shards(tmp_path, "candidates")) == 3  # 3 + 3 + 1
    assert sorted(read_keys(tmp_path)) == sorted(f"q{i}" for i in range(7))
    assert not list(tmp_path.glob(".*.tmp"))
    sample = next(iter(wds.WebDataset(list_shards(tmp_path, "candidates"), shardshuffle=False).decode()))
    assert sample["json"]["schema"] == SCHEMA_VERSION


def test_rerun_resumes_without_duplicates(tmp_path):
    run_predict(tmp_path, list(range(5)))
    writer = run_predict(tmp_path, list(range(9)))
    assert writer.duplicates_skipped == 5 and writer.samples_written == 4
    keys = read_keys(tmp_path)
    assert len(keys) == len(set(keys)) == 9
    assert done_keys(tmp_path) == {f"q{i}" for i in range(9)}


def test_crash_keeps_finished_samples_and_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        run_predict(tmp_path, list(range(10)), samples_per_shard=100, fail_at=2)
    assert sorted(read_keys(tmp_path)) == ["q0", "q1", "q2", "q3"]
    assert not list(tmp_path.glob(".*.tmp"))
    run_predict(tmp_path, list(range(10)), samples_per_shard=100)
    assert sorted(read_keys(tmp_path)) == sorted(f"q{i}" for i in range(10))


def test_torn_manifest_line_is_ignored(tmp_path):
    run_predict(tmp_path, list(range(3)))
    with open(tmp_path / "manifest-r000.jsonl", "a") as handle:
        handle.write('{"shard": "candidates-r000-0000')
    assert done_keys(tmp_path) == {"q0", "q1", "q2"}


def test_sanitize_key_never_escapes_the_directory():
    assert sanitize_key("../../etc/passwd") == "etc_passwd"
    assert "." not in sanitize_key("img.0001.jpg")
    with pytest.raises(ValueError):
        sanitize_key("///")


def test_validate_record_names_shard_and_key():
    good = {"schema": 1, "query_id": "a", "image_id": 1, "image_size": [4, 4], "region": [0, 0, 1, 1],
            "prompt": "p", "candidates": ["x"], "coord_format": "ferret"}
    assert validate_record("candidates", good) == good
    with pytest.raises(ShardFormatError, match=r"s\.tar: sample 'k1'.*schema 2"):
        validate_record("candidates", {**good, "schema": 2}, shard="s.tar", key="k1")
    with pytest.raises(ShardFormatError, match="missing field"):
        validate_record("pairs", good, shard="s.tar", key="k1")
    with pytest.raises(ShardFormatError, match="object"):
        validate_record("pairs", json.loads("[1]"))
