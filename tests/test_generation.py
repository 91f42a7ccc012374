"""Candidate generation: crop->image rewriting of answers, region items, DDP splitting, CLI runs and resume."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
import yaml
from fixtures_coco import write_coco_fixture
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from PIL import Image
from torch.utils.data import DistributedSampler

from callbacks import ShardWriter
from datamodules.regions import (
    ImageLoadError,
    RegionQueryDataModule,
    collate_regions,
    reusable_jpeg,
)
from spr_lightning.cli import cli_main
from spr_lightning.coords import get_codec
from spr_lightning.generation import CandidateGenerator, candidate_to_image, check_model_sizes
from spr_lightning.regions import crop_to_image, inside_fraction
from spr_lightning.shards import done_keys, list_shards, validate_record
from spr_lightning.tiny import resolve_model_path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "generate").glob("*.yaml"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("coco"), num_images=3, seed=0)


def make_data(coco, coord_format="ferret", **kwargs) -> RegionQueryDataModule:
    kwargs.setdefault("templates", ["region", "crop", "crop_objects"])
    return RegionQueryDataModule(str(coco.annotations), str(coco.image_root), coord_format, **kwargs)


# ----------------------------------------------------------------------------- answers: crop -> image
@pytest.mark.parametrize(
    ("fmt", "options"),
    [("ferret", {}), ("qwen2_5_vl", {"resized_size": "smart", "min_pixels": 3136, "max_pixels": 12544}),
     ("llava", {"square_pad": False})],
)
def test_crop_answer_boxes_are_rewritten_as_image_boxes(fmt, options):
    codec = get_codec(fmt, **options)
    image_size, crop_box, crop_size = (200, 150), (40.0, 30.0, 140.0, 110.0), (100, 80)
    crop_boxes = [[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 100.0, 80.0]]
    first, second = (codec.encode(b, crop_size) for b in crop_boxes)
    raw = f"A red circle {first} beside a bar {second}."
    text, boxes = candidate_to_image(raw, codec, crop_box, crop_size, image_size)
    # what the model meant, in image pixels, from its own (quantised) crop boxes
    meant = crop_to_image([list(g.xyxy) for g in codec.decode(raw, crop_size)], crop_box)
    assert torch.allclose(torch.tensor(boxes), torch.tensor(meant), atol=1.0)
    assert torch.allclose(torch.tensor(boxes), torch.tensor([[50.0, 50.0, 90.0, 90.0], [40.0, 30.0, 140.0, 110.0]]),
                          atol=1.5)
    assert [list(g.xyxy) for g in codec.decode(text, image_size)] == boxes  # stored boxes = what readers decode
    assert codec.strip(text) == codec.strip(raw)  # only the boxes changed
    assert text != raw


def test_full_image_answers_are_kept_verbatim_and_unreadable_boxes_survive():
    codec = get_codec("ferret")
    raw = "a dog [100, 200, 300, 400] and a cat [12, 3"
    text, boxes = candidate_to_image(raw, codec, (0, 0, 640, 480), (640, 480), (640, 480))
    assert text == raw
    assert len(boxes) == 1 and boxes[0] == list(codec.decode(raw, (640, 480))[0].xyxy)
    text, boxes = candidate_to_image("no boxes at all", codec, (10, 10, 50, 50), (40, 40), (640, 480))
    assert (text, boxes) == ("no boxes at all", [])


def test_qwen_resize_check_compares_codec_and_processor_sizes():
    codec = get_codec("qwen2_5_vl", resized_size="smart", min_pixels=3136, max_pixels=12544)
    width, height = codec.model_size((160, 120))
    grid = torch.tensor([[1, height // 14, width // 14]])
    check_model_sizes(codec, [(160, 120)], grid, patch_size=14)  # agrees: no error
    with pytest.raises(ValueError, match="coord_options"):
        check_model_sizes(codec, [(160, 120)], torch.tensor([[1, 8, 8]]), patch_size=14)


def test_generator_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="num_candidates"):
        CandidateGenerator("tiny:llava", "ferret", do_sample=False, num_candidates=2)
    with pytest.raises(ValueError, match="region"):
        CandidateGenerator("tiny:llava", "ferret", canonical_prompt="Describe the image.")
    with pytest.raises(ValueError, match="templates"):
        CandidateGenerator("tiny:llava", "ferret", templates=["nope"])


def test_candidate_shards_keep_the_jpeg_the_policy_saw(coco, monkeypatch):
    """A JPEG file goes into the candidate shard byte for byte (scoring and DPO decode the pixels generation saw);
    a PNG goes in as the decoded image (encoded once by the shard writer)."""
    data = make_data(coco)
    data.setup("predict")
    dataset = data.predict_dataloader().dataset
    items = collate_regions([dataset[i] for i in range(len(dataset.specs))])
    gen = CandidateGenerator("tiny:llava", "ferret", num_candidates=2)
    monkeypatch.setattr(gen, "generate", lambda prompts, images, frames: [["a shape."] * 2 for _ in prompts])
    kinds = set()
    for item, sample in zip(items, gen.predict_step(items)):
        stored = (Path(coco.image_root) / item.spec.file_name).read_bytes()
        if item.spec.file_name.endswith(".jpg"):
            assert item.image_bytes == stored and sample["jpg"] == stored
            assert Image.open(io.BytesIO(sample["jpg"])).convert("RGB").tobytes() == item.image.tobytes()
        else:
            assert item.image_bytes is None and sample["jpg"] is item.image
        kinds.add(item.spec.file_name[-3:])
    assert kinds == {"jpg", "png"}  # the fixture has both


def test_reusable_jpeg_refuses_what_would_decode_differently():
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    jpeg, png, grey, rotated = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    image.save(jpeg, format="JPEG")
    image.save(png, format="PNG")
    image.convert("L").save(grey, format="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: loaded transposed when the annotations say 20 x 40
    image.save(rotated, format="JPEG", exif=exif)
    assert reusable_jpeg(jpeg.getvalue(), image) == jpeg.getvalue()
    assert reusable_jpeg(png.getvalue(), image) is None
    assert reusable_jpeg(grey.getvalue(), image.convert("L").convert("RGB")) is None  # decoded as L, not RGB
    assert reusable_jpeg(rotated.getvalue(), image.transpose(Image.Transpose.ROTATE_270)) is None
    assert reusable_jpeg(b"not an image", image) is None


def test_predict_step_maps_known_answers_without_a_model(coco, monkeypatch):
    data = make_data(coco)
    data.setup("predict")
    items = collate_regions([data.predict_dataloader().dataset[i] for i in range(2)])
    gen = CandidateGenerator("tiny:llava", "ferret", num_candidates=2)
    answer = "a shape [100, 100, 500, 500]."
    monkeypatch.setattr(gen, "generate", lambda prompts, images, frames: [[answer] * 2 for _ in prompts])
    samples = gen.predict_step(items)
    assert [s["__key__"] for s in samples] == [i.spec.region_id for i in items]
    for sample, item in zip(samples, items):
        record = validate_record("candidates", sample["json"])
        assert record["templates"] == ["region", "region", "crop", "crop", "crop_objects", "crop_objects"]
        assert record["raw_candidates"] == [answer] * 6
        width, height = item.spec.image_size
        expected_full = [100 / 999 * width, 100 / 999 * height, 500 / 999 * width, 500 / 999 * height]
        x1, y1, x2, y2 = item.spec.region.crop_box
        cw, ch = x2 - x1, y2 - y1
        expected_crop = [x1 + 100 / 999 * cw, y1 + 100 / 999 * ch, x1 + 500 / 999 * cw, y1 + 500 / 999 * ch]
        for template, boxes in zip(record["templates"], record["candidate_boxes"]):
            expected = expected_full if template == "region" else expected_crop
            assert torch.allclose(torch.tensor(boxes[0]), torch.tensor(expected), atol=1.0)
        assert record["prompt"] == gen.canonical_prompt.format(region=gen.codec.encode(item.spec.region.box,
                                                                                       item.spec.image_size))
        image = sample["jpg"] if isinstance(sample["jpg"], Image.Image) else Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == tuple(record["image_size"])
    assert gen.stats == {"regions": 2, "queries": 6, "candidates": 12, "failed": 0}


def test_adapter_path_samples_from_the_aligned_policy(coco, tmp_path):
    """A LoRA adapter given as ``adapter_path`` is applied (unmerged) on load: its weights are the saved ones and the
    next-token logits differ from the base policy's; the records name the adapter."""
    from peft import LoraConfig, get_peft_model

    from spr_lightning.models import load_policy

    base = str(resolve_model_path("tiny:llava"))
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(load_policy(base), config)
    peft.save_pretrained(tmp_path / "adapter")
    saved = {k: v for k, v in peft.state_dict().items() if "lora_B" in k}

    plain = CandidateGenerator(base, "ferret", num_candidates=1, do_sample=False)
    aligned = CandidateGenerator(base, "ferret", num_candidates=1, do_sample=False,
                                 adapter_path=str(tmp_path / "adapter"))
    plain.configure_model()
    aligned.configure_model()
    loaded = {k: v for k, v in aligned.model.state_dict().items() if "lora_B" in k}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    data = make_data(coco, templates=["region"])
    data.setup("predict")
    item = data.predict_dataloader().dataset[0]
    prompt = item.spec.prompts[0].text
    with torch.no_grad():
        logits = [g.model(**{k: v for k, v in g.model_inputs([prompt], [item.image]).items()
                             if k != "pad_token_id"}).logits[0, -1] for g in (plain, aligned)]
    assert not torch.allclose(logits[0], logits[1])
    aligned.generate = lambda prompts, images, frames: [["a shape [1, 2, 3, 4]."] for _ in prompts]
    sample = aligned.predict_step(collate_regions([item]))[0]
    assert sample["json"]["model"] == f"{base} + {tmp_path / 'adapter'}"


# ------------------------------------------------------------------------------------- region items
def test_region_items_crops_and_prompts(coco):
    data = make_data(coco, regions_per_image=2)
    data.setup("predict")
    again = make_data(coco, regions_per_image=2)
    again.setup("predict")
    assert data.specs == again.specs and len(data.specs) == 6  # deterministic, 2 regions x 3 images
    codec = get_codec("ferret")
    for item in (data.predict_dataloader().dataset[i] for i in range(len(data.specs))):
        spec = item.spec
        assert item.image.mode == "RGB" and item.image.size == spec.image_size
        crop = spec.region.crop_box
        assert all(float(v).is_integer() for v in crop)
        assert inside_fraction([spec.region.box], crop).item() == 1.0
        assert item.crop.size == (crop[2] - crop[0], crop[3] - crop[1])
        assert [p.template_name for p in spec.prompts] == ["region", "crop", "crop_objects"]
        for prompt in spec.prompts:
            frame = item.crop.size if prompt.uses_crop else item.image.size
            region_box = codec.decode(prompt.text, frame)[0].xyxy  # the region is the prompt's first box
            in_image = crop_to_image([list(region_box)], prompt.frame_box)[0]
            assert torch.allclose(torch.tensor(in_image), torch.tensor(spec.region.box), atol=1)
        assert len(spec.objects) > 4


def test_max_images_and_skip_done_in(coco, tmp_path):
    data = make_data(coco, max_images=2)
    data.setup("predict")
    assert sorted({s.image_id for s in data.specs}) == coco.image_ids[:2]
    writer = ShardWriter(str(tmp_path / "out")).start(0)
    writer.write_sample({"__key__": data.specs[0].region_id, "json": {"schema": 1}})
    writer.finish()
    resumed = make_data(coco, max_images=2, skip_done_in=str(tmp_path / "out"))
    resumed.setup("predict")
    assert [s.region_id for s in resumed.specs] == [s.region_id for s in data.specs[1:]]
    assert resumed.num_done == 1


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_unreadable_image_raises_naming_the_file_or_is_skipped(tmp_path, damage):
    coco = write_coco_fixture(tmp_path, num_images=2, seed=1)
    first = sorted(coco.image_root.iterdir())[0]
    if damage == "missing":
        first.unlink()
    else:
        first.write_bytes(b"not an image at all")
    data = make_data(coco)
    data.setup("predict")
    with pytest.raises(ImageLoadError, match=first.name):
        data.predict_dataloader().dataset[0]
    skipping = make_data(coco, on_error="skip")
    skipping.setup("predict")
    batch = collate_regions([skipping.predict_dataloader().dataset[i] for i in range(2)])
    assert batch[0].error is not None and first.name in batch[0].error and batch[0].image is None
    gen = CandidateGenerator("tiny:llava", "ferret")
    assert gen.predict_step(batch[:1]) == []
    assert gen.stats["failed"] == 1


def test_generator_rejects_a_different_coord_format(coco):
    data = make_data(coco, coord_format="cogvlm")
    data.setup("predict")
    gen = CandidateGenerator("tiny:llava", "ferret")
    with pytest.raises(ValueError, match="coord_format"):
        gen.predict_step(collate_regions([data.predict_dataloader().dataset[0]]))


# --------------------------------------------------------------------------------------- DDP split
@pytest.mark.parametrize(("max_images", "regions_per_image"), [(1, 1), (3, 1), (3, 2)])
def test_predict_sampler_gives_each_region_to_exactly_one_rank(coco, max_images, regions_per_image):
    """Checks the installed Lightning: predict uses the unrepeated sampler (a DistributedSampler would pad), and
    the data module pads with placeholders only when there are fewer regions than ranks."""
    world = 2
    data = make_data(coco, max_images=max_images, regions_per_image=regions_per_image)
    data.trainer = SimpleNamespace(world_size=world, callbacks=[])
    data.setup("predict")
    num_regions = len(data.specs)
    seen = []
    for rank in range(world):
        loader = data.predict_dataloader()
        sampler = _get_distributed_sampler(loader, shuffle=False, overfit_batches=0, mode=RunningStage.PREDICTING,
                                           num_replicas=world, rank=rank)
        assert isinstance(sampler, UnrepeatedDistributedSamplerWrapper)
        indices = list(sampler)
        assert indices, "every rank needs an index or Lightning's sampler asserts"
        items = collate_regions([loader.dataset[i] for i in indices])  # placeholders yield nothing
        seen += [item.spec.region_id for item in items]
    assert sorted(seen) == sorted(s.region_id for s in data.specs)
    if num_regions % world:
        padded = [i for r in range(world) for i in DistributedSampler(range(num_regions), world, r, shuffle=False)]
        assert len(padded) > num_regions  # why the unrepeated sampler matters


# ------------------------------------------------------------------------------------------- CLI
def cli_args(config: str, coco, out: Path, *extra: str) -> list[str]:
    return ["predict", "--config", str(REPO / "configs" / "generate" / config),
            "--data.init_args.annotations", str(coco.annotations), "--data.init_args.image_root", str(coco.image_root),
            "--data.init_args.skip_done_in", str(out), "--trainer.callbacks.init_args.output_dir", str(out),
            "--trainer.enable_progress_bar", "false", *extra]


def read_records(out: Path) -> list[dict]:
    shards = list_shards(out, "candidates")
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    records = []
    for sample in samples:
        record = validate_record("candidates", sample["json"], key=sample["__key__"])
        assert sample["__key__"] == record["query_id"]
        assert sample["jpg"].size == tuple(record["image_size"])
        records.append(record)
    return records


def check_structure(records: list[dict], templates: list[str], k: int) -> None:
    for record in records:
        width, height = record["image_size"]
        assert record["templates"] == [t for t in templates for _ in range(k)]
        assert len(record["candidates"]) == len(record["raw_candidates"]) == len(record["candidate_boxes"])
        assert all(isinstance(c, str) for c in record["candidates"])
        for boxes in record["candidate_boxes"]:
            for x1, y1, x2, y2 in boxes:
                assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert len(record["region"]) == 4 and len(record["objects"]) > 4


def test_cli_tiny_llava_writes_valid_shards_and_resumes(coco, tmp_path):
    out = tmp_path / "out"
    cli = cli_main(cli_args("tiny_llava.yaml", coco, out))
    records = read_records(out)
    assert sorted(r["query_id"] for r in records) == sorted(f"{i}-0" for i in coco.image_ids)
    check_structure(records, ["region", "crop"], k=2)
    assert all(r["coord_format"] == "ferret" and r["model"] == "tiny:llava" for r in records)
    assert cli.model.stats["candidates"] == 3 * 2 * 2
    manifests = sorted(p.read_text() for p in out.glob("manifest-*.jsonl"))

    again = cli_main(cli_args("tiny_llava.yaml", coco, out))
    assert again.model.stats["regions"] == 0  # nothing generated again
    assert sorted(p.read_text() for p in out.glob("manifest-*.jsonl")) == manifests
    assert sorted(r["query_id"] for r in read_records(out)) == sorted(r["query_id"] for r in records)


def test_cli_tiny_qwen2_5_vl(coco, tmp_path):
    out = tmp_path / "out"
    cli_main(cli_args("tiny_qwen2_5_vl.yaml", coco, out, "--data.init_args.max_images", "1"))
    records = read_records(out)
    assert [r["query_id"] for r in records] == [f"{coco.image_ids[0]}-0"]
    check_structure(records, ["region", "crop"], k=2)
    assert '"bbox_2d"' in records[0]["prompt"]


@pytest.mark.parametrize("config", [c.name for c in CONFIGS])
def test_generate_configs_instantiate(config, tmp_path):
    settings = yaml.safe_load((REPO / "configs" / "generate" / config).read_text())
    assert settings.pop("return_predictions") is False  # a `predict` option: samples go to shards, not memory
    path = tmp_path / config
    path.write_text(yaml.safe_dump(settings))
    cli = cli_main(["--config", str(path), "--trainer.accelerator", "cpu"], run=False)  # builds no model weights
    assert isinstance(cli.model, CandidateGenerator)
    assert isinstance(cli.datamodule, RegionQueryDataModule)
    assert cli.model.coord_format == cli.datamodule.coord_format
    assert cli.model.coord_options == cli.datamodule.coord_options
    assert repr(cli.model.codec) == repr(cli.datamodule.codec)  # same codec, same options
    writers = [c for c in cli.trainer.callbacks if isinstance(c, ShardWriter)]
    assert len(writers) == 1 and writers[0].prefix == "candidates"
    assert Path(cli.datamodule.skip_done_in) == writers[0].output_dir


def test_ddp_two_ranks_generate_every_region_exactly_once(coco, tmp_path):
    resolve_model_path("tiny:llava")  # build once here, not concurrently in both ranks
    out = tmp_path / "out"
    args = cli_args("tiny_llava.yaml", coco, out, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                    "--trainer.accelerator", "cpu", "--model.init_args.max_new_tokens", "4")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "spr_lightning", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = {}
    for manifest in sorted(out.glob("manifest-r*.jsonl")):
        per_rank[manifest.name] = [k for line in manifest.read_text().splitlines() for k in json.loads(line)["keys"]]
    assert sorted(per_rank) == ["manifest-r000.jsonl", "manifest-r001.jsonl"]
    keys = [k for ks in per_rank.values() for k in ks]
    assert sorted(keys) == sorted(f"{i}-0" for i in coco.image_ids)  # union = all, no duplicates
    assert done_keys(out) == set(keys)
    check_structure(read_records(out), ["region", "crop"], k=2)
