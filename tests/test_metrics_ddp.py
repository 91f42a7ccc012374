"""The grounding metrics give the same numbers on 2 CPU processes (gloo) as on one, uneven shards included."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spr_lightning.metrics import AccuracyAtIoU, PhraseGroundingRecall

TYPES = ("people", "animals")


def _data() -> dict:
    g = torch.Generator().manual_seed(0)

    def rand_boxes(n: int) -> torch.Tensor:
        b = torch.rand(n, 4, generator=g) * 20
        b[:, 2:] += b[:, :2] + 1
        return b

    preds, target = rand_boxes(10), rand_boxes(10)
    preds[:4] = target[:4] + 0.5  # a few near hits so every threshold sees some
    preds[7] = float("nan")  # an unreadable answer
    phrase_preds = [rand_boxes(int(n)) for n in torch.randint(0, 4, (12,), generator=g)]
    phrase_targets = [rand_boxes(int(n)) for n in torch.randint(0, 3, (12,), generator=g)]
    phrase_preds[0] = phrase_targets[0].clone() if len(phrase_targets[0]) else rand_boxes(1)
    types = [TYPES[i % 2] for i in range(12)]
    return {"preds": preds, "target": target, "pp": phrase_preds, "pt": phrase_targets, "types": types}


def _metrics() -> tuple[AccuracyAtIoU, PhraseGroundingRecall]:
    return AccuracyAtIoU(), PhraseGroundingRecall(k=(1, 2), iou_thresholds=(0.3, 0.5), phrase_types=TYPES)


def _run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # gloo otherwise resolves the hostname to pick an interface, which can stall on machines without DNS
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        d = _data()
        acc, rec = _metrics()
        # uneven shards: rank 0 gets 7 samples and 9 phrases, rank 1 the rest plus an empty batch
        a, p = (slice(0, 7), slice(0, 9)) if rank == 0 else (slice(7, 10), slice(9, 12))
        acc.update(d["preds"][a], d["target"][a])
        acc.update(torch.empty(0, 4), torch.empty(0, 4))
        rec.update(d["pp"][p], d["pt"][p], types=d["types"][p])
        rec.update([], [], types=[])
        torch.save({"acc": acc.compute(), "rec": rec.compute()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_equals_single_process(tmp_path: Path):
    d = _data()
    acc, rec = _metrics()
    acc.update(d["preds"], d["target"])
    rec.update(d["pp"], d["pt"], types=d["types"])
    single = {"acc": acc.compute(), "rec": rec.compute()}
    assert 0 < single["acc"]["acc@0.5"].item() < 1 and 0 < single["rec"]["recall@2@0.3"].item() < 1

    # fork: the children inherit torch/torchmetrics already imported (spawn re-imports them, ~10 s on 2 cores);
    # but never fork a process that has initialised CUDA
    forkable = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    method = "fork" if forkable else "spawn"
    mp.start_processes(_run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    for rank in range(2):
        synced = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("acc", "rec"):
            assert synced[name].keys() == single[name].keys()
            for key, value in single[name].items():
                assert synced[name][key].item() == pytest.approx(value.item()), (rank, name, key)
