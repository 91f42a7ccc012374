"""LengthGroupedSampler: every sample once an epoch, batches of similar length, order a function of (seed, epoch),
ranks disjoint and stepping through batches of the same length, and the datamodule switch that uses it."""

import json
import random

import pytest
from torch.utils.data import DistributedSampler

from datamodules.sft import LengthGroupedSampler, SFTDataModule


def batches_of(sampler: LengthGroupedSampler) -> list[list[int]]:
    order = list(sampler)
    return [order[k : k + sampler.batch_size] for k in range(0, len(order), sampler.batch_size)]


def bimodal(n: int, seed: int = 0) -> list[int]:
    """Short and long samples mixed, like SPR-Shapes' REC answers and region descriptions."""
    rng = random.Random(seed)
    return [rng.choice([rng.randint(10, 20), rng.randint(200, 260)]) for _ in range(n)]


def test_every_sample_once_and_batches_are_one_length_class():
    lengths = bimodal(640)
    sampler = LengthGroupedSampler(lengths, 16, group_size=8)
    batches = batches_of(sampler)
    assert sorted(i for b in batches for i in b) == list(range(640)) and len(sampler) == 640
    mixed = sum(1 for b in batches if min(lengths[i] for i in b) < 100 < max(lengths[i] for i in b))
    assert mixed <= 640 // (16 * 8)  # at most the one batch straddling the split inside each sorted group
    random_order = [random.Random(1).sample(range(640), 640)[k : k + 16] for k in range(0, 640, 16)]
    padding = lambda bs: sum(16 * max(lengths[i] for i in b) for b in bs) / sum(lengths)  # noqa: E731
    assert padding(batches) < 1.1 < 1.5 < padding(random_order)


def test_a_short_last_batch_is_filled_from_the_start_like_distributed_sampler():
    sampler = LengthGroupedSampler(list(range(1, 11)), 4)
    order = list(sampler)
    assert len(order) == len(sampler) == 12 and set(order) == set(range(10))


def test_order_depends_only_on_seed_and_epoch_and_epoch_fn_wins():
    lengths = bimodal(200)
    first = LengthGroupedSampler(lengths, 8, seed=5)
    again = LengthGroupedSampler(lengths, 8, seed=5)
    assert list(first) == list(again)
    first.set_epoch(1)
    assert list(first) != list(again)
    epoch = {"now": 1}
    driven = LengthGroupedSampler(lengths, 8, seed=5, epoch_fn=lambda: epoch["now"])
    driven.set_epoch(7)  # Lightning's count; the trainer's current epoch (epoch_fn) is what counts
    assert list(driven) == list(first)
    assert list(LengthGroupedSampler(lengths, 8, seed=6)) != list(again)


def test_ranks_are_disjoint_and_step_through_batches_of_the_same_length():
    lengths = bimodal(512, seed=2)
    ranks = [LengthGroupedSampler(lengths, 8, group_size=4, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    assert all(isinstance(s, DistributedSampler) for s in ranks)  # so Lightning does not split it again
    per_rank = [batches_of(s) for s in ranks]
    seen = [set(i for b in batches for i in b) for batches in per_rank]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(512))
    long_ = [[min(lengths[i] for i in b) > 100 for b in batches] for batches in per_rank]
    agree = sum(a == b for a, b in zip(*long_))
    assert agree >= len(long_[0]) - 512 // (16 * 4)  # only batches straddling the split may disagree


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size"), ({"group_size": 0}, "group_size"),
                                           ({"rank": 2, "num_replicas": 2}, "rank")])
def test_bad_arguments_are_named(kwargs, match):
    args = {"lengths": [1, 2, 3], "batch_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        LengthGroupedSampler(**args)


def test_datamodule_group_by_length_uses_it_for_training_only(tiny_models, tmp_path):
    jsonl = tmp_path / "sft.jsonl"
    answers = ["{<1><2><3><4>}", "a red square {<1><2><3><4>} and a blue one {<5><6><7><8>}"] * 2
    jsonl.write_text("".join(json.dumps({"id": f"s{k}", "image": None, "prompt": "Where?", "answer": a}) + "\n"
                             for k, a in enumerate(answers)))
    data = SFTDataModule(str(jsonl), val_file=str(jsonl), processor_name_or_path=str(tiny_models["llava"]),
                         batch_size=2, group_by_length=True, length_group_size=2)
    data.setup("fit")
    train = data.train_dataloader()
    assert isinstance(train.sampler, LengthGroupedSampler)
    assert sorted(key for batch in train for key in batch["keys"]) == ["s0", "s1", "s2", "s3"]
    assert not isinstance(data.val_dataloader().sampler, LengthGroupedSampler)
