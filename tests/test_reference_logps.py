"""Precomputed reference log-probs (`predict` with `configs/ref_logps/*.yaml`): new pair shards carrying
`ref_logps`, the same DPO loss as the on-the-fly reference, every pair once under DDP, resume."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_pair_shards
from lightning.pytorch import Trainer

import datamodules.shard_predict as shard_predict
from callbacks import ShardWriter
from datamodules.pairs_predict import RAW_KEY, PairShardsPredictDataModule
from datamodules.preference import PreferenceDataModule, expand_urls
from spr_lightning.cli import cli_main
from spr_lightning.dpo import DPOModule
from spr_lightning.dpo_inputs import concatenated_inputs
from spr_lightning.reference import ReferenceLogpsWriter
from spr_lightning.shards import read_manifests

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ref_logps" / "tiny_llava.yaml"
# fp32: the writer's batches (3 + 1 pairs) and DPO's (4 pairs) differ only in how rows are grouped and padded.
# On CPU the values come out bit-identical; the tolerances leave room for kernels whose reduction order depends
# on the batch shape (GPU), at fp32 rounding of summed log-probs of a few hundred magnitude.
LOSS_ATOL = 1e-5
LOGPS_ATOL, LOGPS_RTOL = 1e-5, 1e-6


def tar_members(directory: Path) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}`` of every complete pairs shard under ``directory``."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in expand_urls(str(directory)):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def manifest_keys(directory: Path) -> list[str]:
    return [key for entry in read_manifests(directory) for key in entry["keys"]]


def directory_state(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------------------------------- data module
@pytest.mark.parametrize(("num_shards", "world", "workers"), [(1, 2, 1), (2, 2, 2), (3, 2, 1), (6, 2, 2)])
def test_every_pair_goes_to_exactly_one_reader_with_its_original_bytes(tmp_path, monkeypatch, num_shards, world,
                                                                       workers):
    pairs = write_pair_shards(tmp_path / "pairs", num_pairs=6, samples_per_shard=6 // num_shards)
    originals = tar_members(pairs)
    data = PairShardsPredictDataModule(str(pairs), num_workers=workers if workers > 1 else 0)
    seen: list[list[str]] = []
    for rank in range(world):
        for worker in range(workers):
            monkeypatch.setattr(shard_predict, "_worker", lambda worker=worker: (worker, workers))
            samples = list(data.dataset(rank, world))
            seen.append([s["__key__"] for s in samples])
            for sample in samples:
                assert sample[RAW_KEY] == {ext: b for ext, b in originals[sample["__key__"]].items() if ext != "json"}
                assert sample["json"] == json.loads(originals[sample["__key__"]]["json"])
                assert sample["jpg"].size == (64, 64)  # decoded for the collator, as PairStream decodes it
    flat = [key for keys in seen for key in keys]
    assert sorted(flat) == sorted(originals) and len(flat) == len(set(flat))
    assert all(seen), "no reader may be left without pairs"


def test_done_keys_are_skipped(tmp_path):
    pairs = write_pair_shards(tmp_path / "pairs", num_pairs=4, samples_per_shard=2)
    done = tmp_path / "done"
    writer = ShardWriter(str(done), prefix="pairs").start(0)
    writer.write_sample({"__key__": "img1-0", "json": {}})
    writer.finish()
    keys = [s["__key__"] for s in PairShardsPredictDataModule(str(pairs), skip_done_in=str(done)).dataset()]
    assert keys == ["img0-0", "img2-0", "img3-0"]


# ------------------------------------------------------------------------------------------- CLI + resume
def predict(urls, out: Path, model_path, *extra):
    return cli_main(["predict", "--config", str(CONFIG), f"--data.init_args.urls={urls}",
                     f"--data.init_args.skip_done_in={out}", f"--trainer.callbacks.init_args.output_dir={out}",
                     f"--model.init_args.model_name_or_path={model_path}", "--trainer.enable_progress_bar=false",
                     *extra])


def test_cli_writes_new_pair_shards_with_ref_logps_and_resumes(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["spr_lightning"])  # cli_main parses its args, not pytest's
    pairs = write_pair_shards(tmp_path / "pairs", num_pairs=4, samples_per_shard=2)
    out = tmp_path / "ref"
    first_shard = expand_urls(str(pairs))[0]
    predict(first_shard, out, tiny_models["llava"])  # an interrupted run: only the first shard's pairs
    assert sorted(manifest_keys(out)) == ["img0-0", "img1-0"]

    predict(pairs, out, tiny_models["llava"])  # resumes: the remaining pairs only
    originals, written = tar_members(pairs), tar_members(out)
    assert sorted(manifest_keys(out)) == sorted(originals)  # each key once, none twice
    assert written.keys() == originals.keys()
    for key, members in written.items():
        assert members["jpg"] == originals[key]["jpg"]  # the image bytes are stored as they were
        record, source = json.loads(members["json"]), json.loads(originals[key]["json"])
        ref = record.pop("ref_logps")
        assert record == source
        assert ref["model"] == str(tiny_models["llava"]) and ref["max_length"] == 512 and ref["adapter"] is None
        assert ref["chosen"] < 0 and ref["rejected"] < 0

    before = directory_state(out)
    again = predict(pairs, out, tiny_models["llava"])
    assert again.model.pairs_done == 0  # nothing computed again
    assert directory_state(out) == before  # nothing written, nothing touched


def test_ref_logps_configs_instantiate_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["spr_lightning"])
    for config in sorted((ROOT / "configs" / "ref_logps").glob("*.yaml")):
        settings = yaml.safe_load(config.read_text())
        assert settings.pop("return_predictions") is False  # samples go to shards, not memory
        path = tmp_path / config.name
        path.write_text(yaml.safe_dump(settings))
        cli = cli_main(["--config", str(path), "--trainer.accelerator", "cpu"], run=False)
        assert isinstance(cli.model, ReferenceLogpsWriter) and cli.model.reference is None
        assert isinstance(cli.datamodule, PairShardsPredictDataModule)
        writers = [c for c in cli.trainer.callbacks if isinstance(c, ShardWriter)]
        assert len(writers) == 1 and writers[0].prefix == "pairs"
        assert Path(cli.datamodule.skip_done_in) == writers[0].output_dir
        assert Path(cli.datamodule.urls) != writers[0].output_dir  # a new directory, never the input


# ------------------------------------------------------------------------------------------- same DPO loss
def write_ref_shards(pairs: Path, out: Path, model_path, **writer_kwargs) -> Path:
    module = ReferenceLogpsWriter(str(model_path), max_length=512, **writer_kwargs)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[ShardWriter(str(out), prefix="pairs")])
    trainer.predict(module, datamodule=PairShardsPredictDataModule(str(pairs), batch_size=3), return_predictions=False)
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_precomputed_shards_give_the_on_the_fly_dpo_loss(family, tmp_path, tiny_models):
    pairs = write_pair_shards(tmp_path / "pairs", num_pairs=4, samples_per_shard=2)
    ref = write_ref_shards(pairs, tmp_path / "ref", tiny_models[family])
    dpo = DPOModule(str(tiny_models[family]), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(0)
    for name, param in dpo.policy.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so that policy and reference differ
            param.data.normal_(0, 0.02)
    data = PreferenceDataModule(str(ref), processor_name_or_path=str(tiny_models[family]), batch_size=4,
                                max_length=512, shuffle_buffer=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch["keys"]) == [f"img{i}-0" for i in range(4)]
    assert "ref_chosen_logps" in batch  # the DPO datamodule reads the new shards unchanged

    dpo.policy.eval()
    with torch.no_grad():
        precomputed = dpo.dpo_step(batch)
        dpo.hparams.use_precomputed_ref = False
        on_the_fly = dpo.dpo_step(batch)
        ref_logps, _ = dpo.reference_logps(concatenated_inputs(batch, dpo.pad_id))
    torch.testing.assert_close(batch["ref_chosen_logps"], ref_logps[:4], atol=LOGPS_ATOL, rtol=LOGPS_RTOL)
    torch.testing.assert_close(batch["ref_rejected_logps"], ref_logps[4:], atol=LOGPS_ATOL, rtol=LOGPS_RTOL)
    assert abs(precomputed["loss"].item() - torch.log(torch.tensor(2.0)).item()) > 1e-4  # not the trivial ln 2
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert precomputed[name].item() == pytest.approx(on_the_fly[name].item(), abs=LOSS_ATOL), name


# ------------------------------------------------------------------------------------------- DDP
def test_ddp_two_ranks_write_every_pair_exactly_once(tmp_path, tiny_models):
    pairs = write_pair_shards(tmp_path / "pairs", num_pairs=5, samples_per_shard=2)  # 3 shards: 2 + 1 per rank
    out = tmp_path / "ref"
    cmd = [sys.executable, "-m", "spr_lightning", "predict", "--config", str(CONFIG),
           f"--data.init_args.urls={pairs}", f"--data.init_args.skip_done_in={out}",
           f"--trainer.callbacks.init_args.output_dir={out}", f"--model.init_args.model_name_or_path="
           f"{tiny_models['llava']}", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
           "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = {rank: [k for e in read_manifests(out) if e["shard"].startswith(f"pairs-r{rank:03d}-")
                       for k in e["keys"]] for rank in range(2)}
    assert per_rank[0] and per_rank[1], "each rank processes its own pairs"
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    keys = per_rank[0] + per_rank[1]
    assert sorted(keys) == [f"img{i}-0" for i in range(5)] and len(keys) == len(set(keys))
    written = tar_members(out)
    assert sorted(written) == sorted(keys)
    assert all("ref_logps" in json.loads(m["json"]) for m in written.values())
    originals = tar_members(pairs)
    assert all(written[key]["jpg"] == originals[key]["jpg"] for key in keys)


def test_adapter_reference_matches_dpo_with_that_reference_adapter(tmp_path, tiny_models):
    base = str(tiny_models["llava"])
    trained = DPOModule(base, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(0)
    for name, param in trained.policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    trained.policy.save_pretrained(str(tmp_path / "adapter"))
    pairs = write_pair_shards(tmp_path / "pairs", num_pairs=2, samples_per_shard=2)
    samples = list(PairShardsPredictDataModule(str(pairs)).dataset())

    writer = ReferenceLogpsWriter(base, adapter_path=str(tmp_path / "adapter"), max_length=512)
    out = writer.predict_step(samples)
    adapter = str(tmp_path / "adapter")
    dpo = DPOModule(base, lora_r=4, lora_alpha=8, reference_model=base, reference_adapter_path=adapter)
    batch = writer.collator([{k: v for k, v in s.items() if k != RAW_KEY} for s in samples])
    expected, _ = dpo.reference_logps(concatenated_inputs(batch, dpo.pad_id))
    got = torch.tensor([[o["json"]["ref_logps"][side] for o in out] for side in ("chosen", "rejected")]).flatten()
    torch.testing.assert_close(got, expected, atol=LOGPS_ATOL, rtol=LOGPS_RTOL)
    assert out[0]["json"]["ref_logps"]["adapter"] == str(tmp_path / "adapter")
    plain, _ = ReferenceLogpsWriter(base, max_length=512).reference_logps(batch)
    assert not torch.allclose(plain, expected[:2], atol=1e-3)  # the adapter really is applied
