"""``experiments.box_resample``: the generate constraint by hand, and a run on a saved small LLaVA with MiniGPT-v2
location tokens: words kept token for token, coordinates drawn from the policy where DPO will read them."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from spr_lightning.experiments.box_resample import (
    box_slots,
    build_constraint,
    location_token_ids,
    main,
    slot_positions,
)
from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, build_shapes_tokenizer, build_small_llava

BASE = "<p>a small red circle</p> {<10><20><30><40>} and <p>a large blue square</p> {<50><50><90><95>}."
OTHER = "<p>a large green star</p> {<5><5><60><70>}."
PROMPT = "Describe the region {<0><0><99><99>} of the image in detail."


def _words(text: str) -> str:
    return re.sub(r"<\d+>", "", text)


def test_location_tokens_are_the_101_coordinates():
    tokenizer = build_shapes_tokenizer(location_tokens=MINIGPT_V2_TOKENS)
    ids = location_token_ids(tokenizer)
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == sorted(
        (f"<{k}>" for k in range(101)), key=tokenizer.convert_tokens_to_ids)
    assert "<p>" not in tokenizer.convert_ids_to_tokens(ids)
    with pytest.raises(ValueError, match="no location tokens"):
        location_token_ids(build_shapes_tokenizer())


def test_constraint_keeps_words_frees_slots_and_ends():
    locations = [100, 101, 102]
    descriptions = [[7, 100, 8], [9, 9, 101, 102]]
    assert slot_positions(descriptions[1], locations) == [False, False, True, True]
    allowed = build_constraint(descriptions, prompt_length=3, location_ids=locations, eos_id=2)
    prompt = torch.zeros(3, dtype=torch.long)
    # generate passes the prompt's index for every one of its sampled sequences
    assert allowed(0, prompt) == [7]
    assert allowed(0, torch.zeros(4, dtype=torch.long)) == locations
    assert allowed(0, torch.zeros(5, dtype=torch.long)) == [8]
    assert allowed(0, torch.zeros(6, dtype=torch.long)) == [2]
    assert allowed(1, torch.zeros(5, dtype=torch.long)) == locations
    assert allowed(1, torch.zeros(7, dtype=torch.long)) == [2]


def test_box_slots_group_each_boxes_coordinates():
    assert box_slots([False, True, True, False, True, True, True, True, False]) == [[1, 2], [4, 5, 6, 7]]
    assert box_slots([False, False]) == []


def test_constraint_frees_only_the_chosen_positions():
    allowed = build_constraint([[7, 100, 101, 8]], prompt_length=0, location_ids=[100, 101, 102], eos_id=2,
                               free=[[False, False, True, False]])
    assert allowed(0, torch.zeros(1, dtype=torch.long)) == [100]
    assert allowed(0, torch.zeros(2, dtype=torch.long)) == [100, 101, 102]


def _candidates(folder: Path, texts: list[str], second: str = "ignored") -> Path:
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100), (200, 30, 30)).save(buffer, format="JPEG")
    with tarfile.open(folder / "candidates-r000-000000.tar", "w") as tar:
        for i, text in enumerate(texts):
            record = {"schema": 1, "query_id": f"1-{i}", "image_id": 1, "image_size": [100, 100],
                      "region": [0, 0, 99, 99], "prompt": PROMPT, "candidates": [text, second],
                      "coord_format": "minigpt_v2"}
            for name, payload in ((f"1-{i}.json", json.dumps(record).encode()), (f"1-{i}.jpg", buffer.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return build_small_llava(tmp_path_factory.mktemp("resample") / "model", image_size=32, patch_size=16,
                             vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=1,
                             location_tokens=MINIGPT_V2_TOKENS)


def test_variants_keep_the_words_and_resample_the_boxes(policy, tmp_path):
    from spr_lightning.experiments.pair_quality import iter_records

    source = _candidates(tmp_path / "cands", [BASE, "no box in this one.", OTHER])
    summary = main([str(policy), str(source), str(tmp_path / "out"), "--variants", "3", "--seed", "1"])
    assert summary == {"regions": 2, "skipped": 1, "variants": 3, "same_as_base": summary["same_as_base"],
                       "bases": [0]}
    records = {key: record for _, key, record in iter_records(tmp_path / "out", "candidate")}
    assert sorted(records) == ["1-0", "1-2"]
    for key, base, boxes_per_answer in (("1-0", BASE, 2), ("1-2", OTHER, 1)):
        record = records[key]
        assert record["resampled_from"] == base and len(record["candidates"]) == 3
        for text, boxes in zip(record["candidates"], record["candidate_boxes"]):
            assert _words(text) == _words(base), "each region keeps its own words, in one batch"
            assert len(boxes) == boxes_per_answer
    assert len(set(records["1-0"]["candidates"])) > 1, "a random policy at temperature 1 repeats its boxes"
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_each_coordinate_is_the_policys_own_choice_where_dpo_reads_it(policy, tmp_path):
    """Near temperature 0 every sampled coordinate is the policy's best location token at that position of the
    answer *as DPO tokenises it* (chat template, leading space, end token): no shift between the two."""
    from datamodules.collate import encode_completions, render_prompt_and_completion
    from spr_lightning.experiments.pair_quality import iter_records
    from spr_lightning.generation import CandidateGenerator

    source = _candidates(tmp_path / "cands", [BASE])
    main([str(policy), str(source), str(tmp_path / "out"), "--variants", "2", "--temperature", "0.001"])
    [(_, _, record)] = list(iter_records(tmp_path / "out", "candidate"))
    text = record["candidates"][0]
    assert record["candidates"][1] == text

    generator = CandidateGenerator(str(policy), "minigpt_v2", num_candidates=1)
    generator.configure_model()
    tokenizer = generator.processor.tokenizer
    locations = location_token_ids(tokenizer)
    [(_, members)] = [(k, m) for k, m in _tar_members(source)]
    inputs = generator.model_inputs([PROMPT], [Image.open(io.BytesIO(members["jpg"])).convert("RGB")])
    completion = encode_completions(tokenizer, [render_prompt_and_completion(generator.processor, PROMPT, text)[1]])[0]
    ids = torch.cat([inputs["input_ids"][0], completion])[None]
    with torch.no_grad():
        logits = generator.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=inputs["pixel_values"]).logits[0]
    start = inputs["input_ids"].shape[1]
    slots = [i for i, t in enumerate(completion.tolist()) if t in set(locations)]
    assert len(slots) == 8
    for i in slots:
        best = locations[int(logits[start + i - 1, locations].argmax())]
        assert completion[i].item() == best


def _tar_members(folder: Path):
    from spr_lightning.shards import tar_samples

    yield from tar_samples(str(next(folder.glob("*.tar"))))


def test_one_box_variants_differ_in_one_box_only(policy, tmp_path):
    from spr_lightning.coords import get_codec
    from spr_lightning.experiments.pair_quality import iter_records

    source = _candidates(tmp_path / "cands", [BASE])
    main([str(policy), str(source), str(tmp_path / "out"), "--variants", "6", "--one-box", "--seed", "3"])
    [(_, _, record)] = list(iter_records(tmp_path / "out", "candidate"))
    assert record["resampled_boxes"] == "one"
    codec = get_codec("minigpt_v2")
    base = [g.xyxy for g in codec.decode(BASE, (100, 100))]
    changed = set()
    for text in record["candidates"]:
        assert _words(text) == _words(BASE)
        boxes = [g.xyxy for g in codec.decode(text, (100, 100))]
        changed |= {k for k, (new, old) in enumerate(zip(boxes, base)) if new != old}
    assert len(changed) == 1, f"all variants re-draw the same single box, got boxes {sorted(changed)} changed"


def test_several_bases_give_one_sample_per_candidate(policy, tmp_path):
    from spr_lightning.experiments.pair_quality import iter_records

    source = _candidates(tmp_path / "cands", [BASE, "no box in this one."], second=OTHER)
    summary = main([str(policy), str(source), str(tmp_path / "out"), "--variants", "2", "--base", "0", "1", "5"])
    assert summary["regions"] == 3 and summary["skipped"] == 1 and summary["bases"] == [0, 1, 5]
    records = {key: record for _, key, record in iter_records(tmp_path / "out", "candidate")}
    # 1-1's first candidate has no box (skipped); candidate 5 does not exist (not asked for)
    assert sorted(records) == ["1-0_b0", "1-0_b1", "1-1_b1"]
    expected = {"1-0_b0": BASE, "1-0_b1": OTHER, "1-1_b1": OTHER}
    for key, record in records.items():
        assert record["resampled_from"] == expected[key]
        assert all(_words(t) == _words(expected[key]) for t in record["candidates"])


@pytest.mark.gpu
def test_resampling_on_cuda_keeps_the_words(policy, tmp_path):
    from spr_lightning.experiments.pair_quality import iter_records

    source = _candidates(tmp_path / "cands", [BASE])
    main([str(policy), str(source), str(tmp_path / "out"), "--variants", "3", "--one-box", "--device", "cuda"])
    [(_, _, record)] = list(iter_records(tmp_path / "out", "candidate"))
    assert all(_words(t) == _words(BASE) for t in record["candidates"])
