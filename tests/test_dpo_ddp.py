"""DPO under DDP on CPU (gloo): ranks read different samples; 2×1 pairs equals 1×2 pairs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_pair_shards
from safetensors.torch import load_file

import datamodules.preference as preference
from datamodules.preference import PairStream, expand_urls

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_each_rank_reads_different_samples(tmp_path, monkeypatch, num_shards):
    shards = expand_urls(str(write_pair_shards(tmp_path / "p", num_pairs=4, samples_per_shard=4 // num_shards)))
    assert len(shards) == num_shards
    seen = []
    for rank in range(2):
        monkeypatch.setattr(preference, "_reader_slot", lambda rank=rank: (rank, 2, 0, 1))
        stream = PairStream(shards, samples_per_reader=2, readers=1, shuffle=True, shuffle_buffer=4, seed=0)
        seen.append([s["__key__"] for s in stream])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"img{i}-0" for i in range(4)]


def fit_once(tmp_path, name, pairs, model_path, devices, batch_size):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "spr_lightning", "fit", "--config", str(ROOT / "configs/dpo/tiny_llava.yaml"),
           f"--model.init_args.model_name_or_path={model_path}", f"--data.init_args.train_urls={pairs}",
           f"--data.init_args.batch_size={batch_size}", "--data.init_args.shuffle_buffer=0",
           "--trainer.max_steps=1", f"--trainer.devices={devices}", "--trainer.accelerator=cpu",
           f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
           "--trainer.enable_progress_bar=false", "--optimizer=torch.optim.SGD", "--optimizer.lr=0.5"]
    if devices > 1:
        cmd.append("--trainer.strategy=ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "adapter" / "final" / "adapter_model.safetensors"))


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_models):
    pairs = write_pair_shards(tmp_path / "pairs", num_pairs=2, samples_per_shard=1)
    single = fit_once(tmp_path, "single", pairs, tiny_models["llava"], devices=1, batch_size=2)
    ddp = fit_once(tmp_path, "ddp", pairs, tiny_models["llava"], devices=2, batch_size=1)
    assert single.keys() == ddp.keys()
    moved = [k for k in single if "lora_B" in k and single[k].abs().max() > 0]
    assert moved, "one SGD step must move the LoRA B weights"
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-6, rtol=1e-4)
