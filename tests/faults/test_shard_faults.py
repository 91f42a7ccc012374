"""Bad shards: truncated tars, samples missing a part, invalid JSON, future schemas, degenerate pairs, unicode,
very long texts, unsafe keys — read by the scoring stage (candidates) and by DPO (pairs)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from callbacks import ShardWriter
from datamodules.candidates import CandidateDataModule
from datamodules.preference import PairStream
from spr_lightning.rewarding import PreferenceBuilder
from spr_lightning.shards import SCHEMA_VERSION, ShardFormatError, done_keys, list_shards, read_manifests

SIZE = (64, 48)


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", SIZE, (90, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def candidate(key: str, candidates: list[str] | None = None, **extra) -> dict:
    return {"schema": SCHEMA_VERSION, "query_id": key, "image_id": 1, "image_size": list(SIZE),
            "region": [0, 0, *SIZE], "prompt": "Describe [0, 0, 999, 999].", "coord_format": "ferret",
            "candidates": candidates or ["a red thing [0, 0, 500, 500]", "nothing"], "objects": [], **extra}


def pair(key: str, chosen: str = "A red square [0, 0, 500, 500].", rejected: str = "Shapes.", **extra) -> dict:
    return {"schema": SCHEMA_VERSION, "query_id": key, "image_id": 1, "image_size": list(SIZE),
            "region": [0, 0, *SIZE], "prompt": "Describe the region [0, 0, 999, 999].", "chosen": chosen,
            "rejected": rejected, "scores": {}, "coord_format": "ferret", **extra}


def write(out: Path, prefix: str, samples: list[dict], per_shard: int = 100) -> Path:
    writer = ShardWriter(str(out), prefix=prefix, samples_per_shard=per_shard).start(0)
    for sample in samples:
        writer.write_sample(sample)
    writer.finish()
    return out


def raw_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar written by hand (for contents ShardWriter would never produce)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_candidates(source, **kwargs) -> list[dict]:
    module = CandidateDataModule(source, batch_size=4, **kwargs)
    return [s for batch in module.predict_dataloader() for s in batch]


def read_pairs(shards: list[str], n: int) -> list[dict]:
    return list(PairStream(shards, n, 1, shuffle=False, shuffle_buffer=0, seed=0))


# -------------------------------------------------------------------------------------- truncated tars
def test_truncated_candidate_shard_names_the_shard_and_deleting_it_makes_its_queries_again(tmp_path):
    out = write(tmp_path / "cands", "candidates",
                [{"__key__": f"q{i}", "json": candidate(f"q{i}"), "jpg": jpeg()} for i in range(6)], per_shard=3)
    shards = list_shards(out, "candidates")
    damaged = Path(shards[1])
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    for on_error in ("raise", "skip"):  # samples past the cut are unknown: never silently skipped
        with pytest.raises(ShardFormatError, match=rf"{damaged.name}: cannot read this shard.*Delete it"):
            read_candidates(str(out), on_error=on_error)
    damaged.unlink()  # the recovery the message gives: its manifest entry is then ignored ...
    assert done_keys(out) == {"q0", "q1", "q2"}
    assert [e["shard"] for e in read_manifests(out)] == [Path(shards[0]).name]
    rerun = write(out, "candidates",  # ... and the same command makes exactly the missing samples again
                  [{"__key__": f"q{i}", "json": candidate(f"q{i}"), "jpg": jpeg()} for i in range(6)])
    assert sorted(s["__key__"] for s in read_candidates(str(rerun))) == [f"q{i}" for i in range(6)]


def test_missing_listed_shard_names_the_shard(tmp_path):
    with pytest.raises(ShardFormatError, match=r"gone\.tar: cannot read this shard"):
        read_candidates([str(tmp_path / "gone.tar")])


def test_truncated_pair_shard_error_names_the_shard_in_words(tmp_path):
    out = write(tmp_path / "pairs", "pairs", [{"__key__": f"p{i}", "json": pair(f"p{i}"), "jpg": jpeg()}
                                              for i in range(4)])
    shard = Path(list_shards(out, "pairs")[0])
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardFormatError, match=rf"{shard.name}.*truncated"):
        read_pairs([str(shard)], 4)


# ---------------------------------------------------------------------------------- bad samples: candidates
BAD_CANDIDATES = {
    "no_json": ({"jpg": jpeg()}, "has no json"),
    "no_image": ({"json": json.dumps(candidate("k")).encode()}, "has no image"),
    "bad_json": ({"json": b"{\"schema\": 1, ", "jpg": jpeg()}, "json does not parse"),
    "future_schema": ({"json": json.dumps(candidate("k", schema=SCHEMA_VERSION + 1)).encode(), "jpg": jpeg()},
                      f"schema {SCHEMA_VERSION + 1} is not supported"),
    "missing_field": ({"json": json.dumps({"schema": SCHEMA_VERSION}).encode(), "jpg": jpeg()}, "missing field"),
    "candidates_not_list": ({"json": json.dumps(candidate("k") | {"candidates": "x"}).encode(), "jpg": jpeg()},
                            "must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_CANDIDATES))
def test_bad_candidate_sample_names_shard_key_and_fault_or_is_skipped_and_counted(tmp_path, case):
    members, reason = BAD_CANDIDATES[case]
    good = {f"good.{ext}": data for ext, data in
            {"json": json.dumps(candidate("good")).encode(), "jpg": jpeg()}.items()}
    shard = tmp_path / "cands-000.tar"
    raw_tar(shard, {**{f"bad.{ext}": data for ext, data in members.items()}, **good})
    with pytest.raises(ShardFormatError, match=rf"cands-000\.tar: sample 'bad'.*{reason}"):
        read_candidates([str(shard)])
    samples = read_candidates([str(shard)], on_error="skip")
    assert [s["__key__"] for s in samples] == ["bad", "good"]
    assert reason in samples[0]["error"] and "error" not in samples[1]
    builder = PreferenceBuilder(semantic_scorer=None, grounder=None)
    builder.predict_step(samples, 0)
    assert builder.counts["skipped"] == 1 and builder.counts["queries"] == 1


# ---------------------------------------------------------------------------------------- bad samples: pairs
@pytest.mark.parametrize(
    ("case", "record", "reason"),
    [("future_schema", pair("k", schema=SCHEMA_VERSION + 1), "is not supported"),
     ("chosen_is_rejected", pair("k", chosen="Same.", rejected="Same."), "'chosen' equals 'rejected'"),
     ("blank_chosen", pair("k", chosen="  "), "'chosen' is blank"),
     ("chosen_not_text", pair("k", chosen=None), "must be strings"),
     ("missing_field", {k: v for k, v in pair("k").items() if k != "prompt"}, "missing field")],
)
def test_bad_pair_sample_names_shard_key_and_fault(tmp_path, case, record, reason):
    shard = tmp_path / "pairs-000.tar"
    raw_tar(shard, {"k.json": json.dumps(record).encode(), "k.jpg": jpeg()})
    with pytest.raises(ShardFormatError, match=rf"pairs-000\.tar: sample 'k'.*{reason}"):
        read_pairs([str(shard)], 1)


def test_invalid_json_in_a_pair_shard_names_shard_and_key(tmp_path):
    shard = tmp_path / "pairs-000.tar"
    raw_tar(shard, {"k.json": b"{\"schema\": 1,", "k.jpg": jpeg()})
    with pytest.raises(Exception, match=r"pairs-000\.tar.*'k'"):
        read_pairs([str(shard)], 1)


def test_pair_without_image_is_refused(tmp_path):
    shard = tmp_path / "pairs-000.tar"
    raw_tar(shard, {"k.json": json.dumps(pair("k")).encode()})
    with pytest.raises(ShardFormatError, match=r"pairs-000\.tar: sample 'k'.*image"):
        read_pairs([str(shard)], 1)


def test_pair_without_json_names_shard_and_key(tmp_path):
    shard = tmp_path / "pairs-000.tar"
    raw_tar(shard, {"k.jpg": jpeg()})
    with pytest.raises(ValueError, match=r"pairs-000\.tar: sample 'k' has no json"):
        read_pairs([str(shard)], 1)


# ------------------------------------------------------------------------- unicode, blank, very long texts
UNICODE = "Ein Ährenfeld 🌾 [10, 20, 500, 600], 赤い四角 [0, 0, 100, 100] und ‏שלום‎ e\u0301"


def test_unicode_and_blank_rejected_pairs_round_trip_and_collate(tmp_path, tiny_models):
    from datamodules.collate import PreferenceCollator
    from spr_lightning.models import load_processor

    out = write(tmp_path / "pairs", "pairs", [
        {"__key__": "u", "json": pair("u", chosen=UNICODE, prompt="Beschreibe 区域 [0, 0, 999, 999] 🙂"),
         "jpg": Image.new("RGB", SIZE)},
        {"__key__": "b", "json": pair("b", rejected=""), "jpg": Image.new("RGB", SIZE)},
    ])
    samples = read_pairs(list_shards(out, "pairs"), 2)
    assert {s["__key__"]: s["json"]["chosen"] for s in samples}["u"] == UNICODE  # byte-exact round trip
    batch = PreferenceCollator(load_processor(str(tiny_models["llava"])), max_length=512)(samples)
    assert batch["chosen_input_ids"].shape[0] == 2
    assert (batch["rejected_attention_mask"].sum(-1) >= 1).all()  # a blank answer still has its end-of-turn


def test_very_long_texts_are_cut_to_max_length_and_scored_without_error(tmp_path, tiny_models):
    from datamodules.collate import PreferenceCollator
    from spr_lightning.models import load_processor

    long_text = "A red square [10, 10, 500, 500] next to a blue one. " * 4000  # ~200k characters
    out = write(tmp_path / "pairs", "pairs", [{"__key__": "long", "json": pair("long", chosen=long_text),
                                               "jpg": Image.new("RGB", SIZE)}])
    (sample,) = read_pairs(list_shards(out, "pairs"), 1)
    batch = PreferenceCollator(load_processor(str(tiny_models["llava"])), max_length=256)([sample])
    lengths = batch["prompt_attention_mask"].sum(-1) + batch["chosen_attention_mask"].sum(-1)
    assert lengths.item() == 256  # the completion is cut from its end, the prompt kept

    from spr_lightning.scoring.grounders import HFGroundingDino
    from spr_lightning.scoring.semantic import SemanticScorer

    cands = write(tmp_path / "cands", "candidates", [
        {"__key__": "long", "json": candidate("long", [long_text, "A red square [0, 0, 400, 400]."]),
         "jpg": jpeg()}])
    torch.set_num_threads(1)
    builder = PreferenceBuilder(semantic_scorer=SemanticScorer("tiny:open_clip"),
                                grounder=HFGroundingDino("tiny:grounding_dino"))
    pairs = builder.predict_step(read_candidates(str(cands)), 0)
    assert builder.counts["queries"] == 1 and builder.counts["skipped"] == 0
    assert len(pairs) <= 1 and all(p["json"]["chosen"].strip() for p in pairs)


# --------------------------------------------------------------------------------------- keys and names
def test_unsafe_keys_stay_inside_the_output_directory_and_never_collide_silently(tmp_path):
    out = tmp_path / "out"
    writer = ShardWriter(str(out), prefix="pairs").start(0)
    for key in ("../../escape", "/abs/path", "dots.in.key", "ünïcode-ключ"):
        writer.write_sample({"__key__": key, "json": {"k": key}})
    with pytest.raises(ValueError, match=r"'dots\.in\.key' and 'dots/in/key' both become 'dots_in_key'"):
        writer.write_sample({"__key__": "dots/in/key", "json": {}})
    writer.finish()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["manifest-r000.jsonl",
                                                                          "pairs-r000-000000.tar"]
    with tarfile.open(out / "pairs-r000-000000.tar") as tar:
        names = tar.getnames()
    assert all("/" not in n and n.count(".") == 1 and not n.startswith(".") for n in names)
    with pytest.raises(ValueError, match="plain name"):
        ShardWriter(str(out), prefix="../pairs")


def test_manifest_entries_that_point_outside_the_directory_are_ignored(tmp_path):
    out = write(tmp_path / "out", "pairs", [{"__key__": "a", "json": pair("a"), "jpg": jpeg()}])
    (tmp_path / "secret.tar").write_bytes(b"x")
    with open(out / "manifest-r000.jsonl", "a") as handle:
        handle.write(json.dumps({"shard": "../secret.tar", "count": 1, "keys": ["evil"]}) + "\n")
        handle.write(json.dumps({"shard": str(tmp_path / "secret.tar"), "count": 1, "keys": ["evil2"]}) + "\n")
    assert done_keys(out) == {"a"}
    assert list_shards(out, "pairs") == [str(out / "pairs-r000-000000.tar")]
