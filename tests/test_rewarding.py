"""Stage 2: candidate shards -> PreferenceBuilder -> pair shards (pairing, ties, refinement, resume, splitting)."""

from __future__ import annotations

import glob
import io
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from callbacks import ShardWriter
from datamodules.candidates import CandidateDataModule
from spr_lightning.coords import get_codec
from spr_lightning.rewarding import PreferenceBuilder, combine_scores, select_pair
from spr_lightning.scoring.grounders import GroundingResult
from spr_lightning.shards import SCHEMA_VERSION, ShardFormatError

ROOT = Path(__file__).resolve().parents[1]
# 200 x 100 images: Ferret bins are 5 per pixel in x and 10 in y, so integer pixel boxes survive the text
# exactly; the crop is not square (the tiny Grounding DINO cannot run on square inputs, see the report).
SIZE = (200, 100)
FERRET = get_codec("ferret")
RED = (20.0, 20.0, 60.0, 60.0)
BLUE = (120.0, 30.0, 170.0, 80.0)
REGION = (10.0, 10.0, 180.0, 90.0)
CROP = (0.0, 0.0, 200.0, 100.0)


def _enc(box):
    return FERRET.encode(box, SIZE)


def _image() -> Image.Image:
    image = Image.new("RGB", SIZE, (40, 40, 40))
    image.paste((220, 30, 30), tuple(int(v) for v in RED))
    image.paste((30, 40, 220), tuple(int(v) for v in BLUE))
    return image


# Candidates of one query share their plain text, so S_sem and B_ground are the same for all of them and the
# ranking is decided by the written boxes alone: near-exact (IoU > 0.85 with the annotations) > off > none.
NEAR = f"A red square {_enc((21, 20, 61, 61))} and a blue square {_enc((121, 30, 171, 80))}."
OFF = f"A red square {_enc((60, 60, 100, 90))} and a blue square {_enc((20, 70, 60, 95))}."
NONE = "A red square and a blue square."
QUERIES = {
    "q0": [OFF, NEAR, NONE],  # chosen: NEAR (index 1), refined onto the annotations
    "q1": [NONE, NEAR],  # chosen: NEAR
    "q2": [NEAR, NEAR],  # identical candidates: too few to pair
    "q3": [NONE.replace(".", " ."), NONE],  # same plain text, no boxes: exact tie
    "q4": [NEAR, OFF, f"{NEAR} A red square {_enc((22, 20, 60, 60))} again."],  # duplicate mention
}


def _record(query_id: str, candidates: list[str]) -> dict:
    return {
        "schema": SCHEMA_VERSION, "query_id": query_id, "region_id": query_id, "image_id": int(query_id[1:]),
        "file_name": f"{query_id}.jpg", "image_size": list(SIZE), "region": list(REGION), "crop_box": list(CROP),
        "objects": [{"box": list(RED), "label": "red square"}, {"box": list(BLUE), "label": "blue square"}],
        "prompt": f"Describe the region {_enc(REGION)}.", "candidates": candidates,
        "candidate_boxes": [[list(g.xyxy) for g in FERRET.decode(c, SIZE)] for c in candidates],
        "raw_candidates": candidates, "templates": ["region"] * len(candidates), "coord_format": "ferret",
        "model": "synthetic",
    }  # fmt: skip


def write_candidates(out_dir: Path, queries: dict[str, list[str]] = QUERIES, per_shard: int = 2) -> Path:
    writer = ShardWriter(str(out_dir), prefix="candidates", samples_per_shard=per_shard).start(0)
    for query_id, candidates in queries.items():
        writer.write_sample({"__key__": query_id, "json": _record(query_id, candidates), "jpg": _image()})
    writer.finish()
    return out_dir


def _sample(query_id: str, candidates: list[str]) -> dict:
    image = _image()
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return {"__key__": query_id, "json": _record(query_id, candidates), "image": image,
            "image_bytes": buf.getvalue(), "image_ext": "jpg"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- pure parts
def test_combine_scores_is_eq3():
    assert combine_scores(2.0, 0.5, 0.8) == pytest.approx(0.8 * 2.0 + 0.2 * 0.5)
    assert combine_scores(None, 0.5, 0.8) == 0.5  # no semantic scorer: S_loc alone


def test_select_pair_rules():
    assert select_pair([0.1, 0.9, 0.5], ["a", "b", "c"]) == (1, 0)
    assert select_pair([0.9, 0.9, 0.1, 0.1], list("abcd")) == (0, 2)  # first max, first min
    assert select_pair([0.5, 0.5], ["a", "b"]) is None  # tie
    assert select_pair([0.5, 0.6], ["a", "b"], min_score_gap=0.2) is None
    assert select_pair([0.5, 0.6], ["a", "a"]) is None  # same text
    assert select_pair([0.5], ["a"]) is None


# -------------------------------------------------------------------------------- predict_step with fakes
class FakeGrounder:
    """Finds the blue square (in crop pixels) whenever the caption mentions it; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], str]] = []

    def ground(self, image, caption, box_threshold=0.35, text_threshold=0.25):
        self.calls.append((image.size, caption))
        if "blue" not in caption:
            return GroundingResult()
        box = torch.tensor([[BLUE[0] - CROP[0], BLUE[1] - CROP[1], BLUE[2] - CROP[0], BLUE[3] - CROP[1]]])
        return GroundingResult(boxes=box, scores=torch.tensor([0.9]), phrases=["blue square"])


class FakeScorer:
    """S_sem = number of words / 10 for every candidate (crop and local alike)."""

    def score(self, images, regions, crop_boxes, texts):
        out = []
        for candidates in texts:
            sem = torch.tensor([len(t.split()) / 10 for t in candidates])
            out.append({"sem": sem, "crop": sem, "local": sem})
        return out


def test_predict_step_scores_pairs_and_refines():
    grounder = FakeGrounder()
    builder = PreferenceBuilder(semantic_scorer=FakeScorer(), grounder=grounder)
    batch = [_sample(q, QUERIES[q]) for q in ("q0", "q2", "q3")]
    pairs = builder.predict_step(batch, 0)
    assert [p["__key__"] for p in pairs] == ["q0"]
    rec = pairs[0]["json"]
    assert rec["chosen_raw"] == NEAR and rec["rejected"] in (OFF, NONE) and rec["chosen_index"] == 1
    assert [g.xyxy for g in FERRET.decode(rec["chosen"], SIZE)] == [RED, BLUE]
    assert FERRET.strip(rec["chosen"]) == FERRET.strip(NEAR)
    # Same plain text: one grounder call per query, on the (non-square) crop.
    assert grounder.calls == [((200, 100), FERRET.strip(NEAR)), ((200, 100), FERRET.strip(NEAR)),
                              ((200, 100), FERRET.strip(NONE))]  # fmt: skip
    # Hand-worked S_loc: B_gt = {RED, BLUE} (the grounder's BLUE duplicates the annotation).
    # NEAR: IoU((21, 20, 61, 61), RED) = 1560/1680 and IoU(BLUE shifted by 1 px) = 2450/2550 (the grounder's
    # exact BLUE is a duplicate of the written box in B_pred, so it does not help); OFF, NONE: BLUE only.
    loc = [s["loc"] for s in rec["all_scores"]]
    assert loc == pytest.approx([0.5, (1560 / 1680 + 2450 / 2550) / 2, 0.5], abs=1e-6)
    sem = 0.7  # seven words
    assert rec["scores"]["chosen"]["total"] == pytest.approx(0.8 * sem + 0.2 * loc[1], abs=1e-6)
    assert rec["refine"] == {"snapped": 2, "kept": 0, "unmatched": 0, "duplicates": 0}
    assert builder.counts["queries"] == 3 and builder.counts["pairs"] == 1
    assert builder.counts["too_few"] == 1 and builder.counts["ties"] == 1
    assert pairs[0]["jpg"] == batch[0]["image_bytes"]  # the original JPEG bytes, not a re-encoded image


def test_ablations_without_semantic_scorer_or_grounder():
    builder = PreferenceBuilder(semantic_scorer=None, grounder=None, refine=False)
    (pair,) = builder.predict_step([_sample("q0", QUERIES["q0"])], 0)
    rec = pair["json"]
    assert rec["chosen"] == rec["chosen_raw"] == NEAR  # refine=False
    assert rec["scores"]["chosen"]["sem"] is None
    assert [s["total"] for s in rec["all_scores"]] == [s["loc"] for s in rec["all_scores"]]
    assert rec["all_scores"][0]["loc"] == 0.0 and rec["all_scores"][2]["loc"] == 0.0  # no B_ground: nothing found


def test_duplicate_mention_removed_from_chosen():
    builder = PreferenceBuilder(semantic_scorer=None, grounder=None)
    (pair,) = builder.predict_step([_sample("q4", QUERIES["q4"])], 0)
    rec = pair["json"]
    assert rec["chosen_index"] == 0  # the first maximum: 0 and 2 tie on S_loc
    assert [g.xyxy for g in FERRET.decode(rec["chosen"], SIZE)] == [RED, BLUE]


# ----------------------------------------------------------------------------------------------- data module
def _keys(dm: CandidateDataModule, rank: int, world: int) -> list[str]:
    loader = torch.utils.data.DataLoader(dm.dataset(rank, world), batch_size=2, num_workers=dm.num_workers,
                                         collate_fn=list)  # fmt: skip
    return [s["__key__"] for batch in loader for s in batch]


@pytest.mark.parametrize(("per_shard", "world", "workers"), [(1, 2, 2), (2, 2, 1), (5, 3, 2), (1, 1, 0)])
def test_every_query_is_read_exactly_once(tmp_path, per_shard, world, workers):
    # per_shard=1: 5 shards (split by shard when readers <= 5); per_shard=5: one shard (split by sample).
    write_candidates(tmp_path / "cands", per_shard=per_shard)
    dm = CandidateDataModule(str(tmp_path / "cands"), batch_size=2, num_workers=workers)
    keys = [k for rank in range(world) for k in _keys(dm, rank, world)]
    assert sorted(keys) == sorted(QUERIES)


def test_datamodule_batches_resume_and_errors(tmp_path):
    write_candidates(tmp_path / "cands")
    dm = CandidateDataModule(str(tmp_path / "cands"), batch_size=2)
    batch = next(iter(dm.predict_dataloader()))
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["image"].size == SIZE and batch[0]["json"]["coord_format"] == "ferret"
    assert batch[0]["image_ext"] == "jpg" and batch[0]["image_bytes"][:2] == b"\xff\xd8"
    # Resume: keys in complete pair shards are skipped.
    done = ShardWriter(str(tmp_path / "pairs"), prefix="pairs").start(0)
    done.write_sample({"__key__": "q1", "json": {}})
    done.finish()
    resumed = CandidateDataModule(str(tmp_path / "cands"), skip_done_in=str(tmp_path / "pairs"))
    assert sorted(_keys(resumed, 0, 1)) == ["q0", "q2", "q3", "q4"]
    # A record missing a field is reported with its shard and key.
    bad = ShardWriter(str(tmp_path / "bad"), prefix="candidates").start(0)
    bad.write_sample({"__key__": "broken", "json": {"schema": SCHEMA_VERSION}, "jpg": _image()})
    bad.finish()
    with pytest.raises(ShardFormatError, match=r"candidates-r000-000000\.tar.*'broken'.*missing"):
        _keys(CandidateDataModule(str(tmp_path / "bad")), 0, 1)


# ----------------------------------------------------------------------------------------------- end to end
def _config(tmp_path: Path, cands: Path, pairs: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs/score/tiny.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(pairs)
    config["trainer"]["enable_progress_bar"] = False
    # One batch: one grounder forward for the whole fixture (the tiny Grounding DINO costs seconds per call on CPU).
    config["data"]["init_args"].update(urls=str(cands), skip_done_in=str(pairs), batch_size=8)
    path = tmp_path / "score.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_end_to_end_with_tiny_models_and_resume(tmp_path, capsys, monkeypatch):
    from spr_lightning.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["spr_lightning"])  # cli_main parses its args, not pytest's
    # Tiny models are all overhead: intra-op threads only spin on a busy CPU (one thread: ~50x faster here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _end_to_end(tmp_path, capsys, cli_main)
    finally:
        torch.set_num_threads(threads)


def _end_to_end(tmp_path, capsys, cli_main):
    cands, pairs = write_candidates(tmp_path / "cands"), tmp_path / "pairs"
    config = _config(tmp_path, cands, pairs)
    cli = cli_main(["predict", "--config", str(config)])
    assert "3 pairs" in capsys.readouterr().out
    assert cli.model.summary["queries"] == 5 and cli.model.summary["too_few"] == 1 and cli.model.summary["ties"] == 1

    shards = sorted(glob.glob(str(pairs / "pairs-*.tar")))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert sorted(s["__key__"] for s in samples) == ["q0", "q1", "q4"]
    for sample in samples:
        rec = sample["json"]
        assert sample["jpg"].size == SIZE
        assert rec["scores"]["chosen"]["total"] > rec["scores"]["rejected"]["total"]
        assert rec["chosen_raw"] == NEAR or rec["chosen_raw"].startswith(NEAR)
        assert [g.xyxy for g in FERRET.decode(rec["chosen"], SIZE)] == [RED, BLUE]  # refined onto the annotations
        assert rec["rejected"] in QUERIES[sample["__key__"]]

    # The same command again: every paired query is skipped, nothing new is written.
    before = sorted(p.name for p in pairs.iterdir())
    cli = cli_main(["predict", "--config", str(config)])
    assert cli.model.summary["queries"] == 2 and cli.model.summary["pairs"] == 0  # only the unpaired q2, q3
    assert sorted(p.name for p in pairs.iterdir()) == before


@pytest.mark.gpu
def test_predict_step_on_cuda_matches_cpu():
    # On CUDA the batched Algorithm 1 runs the Triton kernels; the pairs must not change.
    batch = [_sample(q, QUERIES[q]) for q in QUERIES]
    on_cpu = PreferenceBuilder(semantic_scorer=FakeScorer(), grounder=FakeGrounder()).predict_step(batch, 0)
    builder = PreferenceBuilder(semantic_scorer=FakeScorer(), grounder=FakeGrounder()).to("cuda")
    on_gpu = builder.predict_step(batch, 0)
    assert [p["json"]["chosen"] for p in on_gpu] == [p["json"]["chosen"] for p in on_cpu]
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert [s["loc"] for s in gpu["json"]["all_scores"]] == pytest.approx(
            [s["loc"] for s in cpu["json"]["all_scores"]], abs=1e-6
        )


@pytest.mark.parametrize("skip_emptied", [False, True])
def test_skip_emptied_drops_pairs_whose_chosen_lost_every_box(skip_emptied):
    # The longer text wins on S_sem (words / 10) but its boxes match no annotation: refinement removes both.
    wordy_off = OFF.replace("A red square", "A bright red square right there")
    builder = PreferenceBuilder(semantic_scorer=FakeScorer(), grounder=None, skip_emptied=skip_emptied)
    pairs = builder.predict_step([_sample("q9", [NONE, wordy_off]), _sample("q0", QUERIES["q0"])], 0)
    keys = [p["__key__"] for p in pairs]
    if skip_emptied:
        assert keys == ["q0"] and builder.counts["emptied"] == 1
    else:
        assert keys == ["q9", "q0"] and builder.counts["emptied"] == 0
        assert FERRET.decode(pairs[0]["json"]["chosen"], SIZE) == []  # the box-free chosen answer kept


def test_refine_keep_unmatched_keeps_the_chosen_boxes():
    wordy_off = OFF.replace("A red square", "A bright red square right there")
    builder = PreferenceBuilder(semantic_scorer=FakeScorer(), grounder=None, skip_emptied=True,
                                refine_keep_unmatched=True)
    (pair,) = builder.predict_step([_sample("q9", [NONE, wordy_off])], 0)
    rec = pair["json"]
    assert rec["chosen"] == wordy_off and rec["refine"]["kept"] == 2 and rec["refine"]["unmatched"] == 0
    assert builder.counts["emptied"] == 0
