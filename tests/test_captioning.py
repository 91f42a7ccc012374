"""Region captioning (SPR Tab. 4): COCO caption scores equal pycocoevalcap's own, in one process and under DDP;
RefCOCOg / Visual Genome regions read from their real layouts; ``validate`` end to end on tiny fixtures."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from fixtures_captioning import write_vg_fixture
from fixtures_grounding import write_refcoco_fixture

from datamodules.captioning import RegionCaptionDataModule, load_refcocog_regions, load_vg_regions
from spr_lightning.captioning import DEFAULT_REGION_PROMPT, RegionCaptionEvaluator, render_region_prompt
from spr_lightning.cli import cli_main
from spr_lightning.coords import get_codec
from spr_lightning.metrics import CaptionScores
from spr_lightning.metrics import captions as captions_module
from spr_lightning.metrics.captions import caption_scores

pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(captions_module.shutil.which("java") is None, reason="needs java (pycocoevalcap)")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "eval"
FERRET = get_codec("ferret")

# Hand-checked pairs. ROUGE_L (LCS over PTB tokens, lower-cased, punctuation dropped; best precision and best
# recall over the references taken separately; F = (1 + β²) P R / (R + β² P), β = 1.2):
#   1. c = a man is riding a horse (6): ref 1 LCS 5 -> P 5/6, R 1        -> F = 2.44 * 5/6 / (1 + 1.44 * 5/6)
#   2. c = a red car (3) vs the red car parked (4): LCS 2 -> P 2/3, R 1/2 -> F = 2.44/3 / (1/2 + 0.96) = 0.55708
#   3. c = two dogs playing in the snow (6): ref 2 LCS 4 -> P 2/3, R 1   -> F = 2.44 * 2/3 / (1 + 0.96)
#   4. an empty caption (a generation that was only a box)               -> 0
#   5. "Blue sky." vs "blue sky": identical after tokenisation           -> 1
PAIRS = [
    ("A man is riding a horse.", ["a man riding a horse", "a person on a brown horse"]),
    ("a red car", ["the red car parked"]),
    ("two dogs playing in the snow", ["two dogs play in snow", "dogs in the snow"]),
    ("", ["blue sky"]),
    ("Blue sky.", ["blue sky"]),
]
ROUGE_BY_HAND = [2.44 * 5 / 6 / (1 + 1.44 * 5 / 6), 2.44 / 3 / (0.5 + 0.96), 2.44 * 2 / 3 / 1.96, 0.0, 1.0]


@pytest.fixture(scope="module", autouse=True)
def _start_meteor_early():
    """Start this process's METEOR JVM (a non-blocking Popen) before the first test, so its 10-30 s of loading
    overlap the tests that don't need it; the METEOR tests come last in this file."""
    if captions_module.shutil.which("java") is not None:
        captions_module._shared_meteor()


def _pycocoevalcap_directly(pairs, fresh_meteor: bool):
    """What ``COCOEvalCap.evaluate`` does (tokenise gts and res separately, score the corpus, in the given order)
    with pycocoevalcap's own classes. COCOEvalCap itself can't run offline: it also runs SPICE, which downloads
    models. ``Meteor`` is pycocoevalcap's object either way; unless ``fresh_meteor`` it is the process's running
    one (stateless between calls), which saves a JVM start (10-25 s on a busy 2-core machine)."""
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(pairs)}
    res = {i: [{"caption": c}] for i, (c, _) in enumerate(pairs)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    meteor_scorer = Meteor() if fresh_meteor else captions_module._shared_meteor()
    assert type(meteor_scorer) is Meteor
    meteor, _ = meteor_scorer.compute_score(gts, res)
    rouge, per_pair = Rouge().compute_score(gts, res)
    return {"METEOR": meteor, "ROUGE_L": float(rouge)}, list(per_pair)


# ------------------------------------------------------------------------------------------ the metric
def test_caption_scores_input_checks_and_empty_corpus():
    assert caption_scores([], [], metrics=("METEOR", "CIDEr")) == {"METEOR": 0.0, "CIDEr": 0.0}
    with pytest.raises(ValueError, match="subset of"):
        CaptionScores(metrics=("SPICE",))
    metric = CaptionScores()
    with pytest.raises(ValueError, match="one list of references each"):
        metric.update(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        metric.update(["a"], ["a reference string, not a list"])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        metric.update(["a"], [[]])


def test_strings_survive_moving_the_metric():
    metric = CaptionScores()
    metric.update(["a dog"], [["a brown dog", "a dog"]])
    metric.to("cpu").double()  # what Lightning does to a LightningModule holding the metric
    assert metric.preds == ["a dog"] and metric.references == [["a brown dog", "a dog"]]


def test_missing_java_is_named(monkeypatch):
    monkeypatch.setattr(captions_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="`java` on PATH"):
        caption_scores(["a dog"], [["a dog"]])


# ------------------------------------------------------------------------------------------------- DDP
DDP_METRICS = ("Bleu_4", "ROUGE_L", "CIDEr")  # not METEOR: syncing is scorer-independent, and a JVM costs ~10 s


def _ddp_run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        calls = []
        compute = captions_module._caption_scores_compute
        captions_module._caption_scores_compute = lambda *a: calls.append(1) or compute(*a)
        metric = CaptionScores(metrics=DDP_METRICS)
        if rank == 0:  # uneven shares: 4 samples in two batches here, 1 there plus an empty batch
            metric.update(*map(list, zip(*PAIRS[:1])))
            metric.update(*map(list, zip(*PAIRS[1:4])))
        else:
            metric.update(*map(list, zip(*PAIRS[4:])))
            metric.update([], [])
        values = metric.compute()
        local = len(metric.preds)  # unsynced again after compute: this rank's own samples
        torch.save({"values": values, "scored_here": len(calls), "local": local}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_java
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_equals_single_process(tmp_path: Path):
    single = caption_scores([p for p, _ in PAIRS], [r for _, r in PAIRS], metrics=DDP_METRICS)
    assert all(0 < v < 10 for v in single.values())
    forkable = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    mp.start_processes(_ddp_run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork" if forkable else "spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in results:
        assert {k: v.item() for k, v in result["values"].items()} == pytest.approx(single, abs=1e-12)
    assert [r["scored_here"] for r in results] == [1, 0]  # rank 0 ran the scorers once, rank 1 got its numbers
    assert [r["local"] for r in results] == [4, 1]


# ----------------------------------------------------------------------------------------- datamodules
def test_refcocog_regions_group_every_sentence_of_a_ref(tmp_path):
    refcoco = write_refcoco_fixture(tmp_path / "refcoco")
    regions = load_refcocog_regions(refcoco["annotations"], "val")
    assert [(r["key"], r["references"], r["box"]) for r in regions] == [
        ("101", ["red box on the left", "the top left red one"], [8, 8, 40, 32]),  # two sentences, one region
        ("102", ["green box"], [56, 30, 86, 58]),
    ]
    dm = RegionCaptionDataModule("refcocog", refcoco["annotations"], refcoco["image_root"], split="val",
                                 batch_size=2, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert [s["key"] for s in batch] == ["101", "102"]
    assert batch[0]["region"].tolist() == [8, 8, 40, 32] and batch[0]["image"].size == batch[0]["image_size"]
    assert "target" not in batch[0]


def test_vg_regions_from_region_descriptions_and_image_data(tmp_path):
    vg = write_vg_fixture(tmp_path / "vg")
    records = load_vg_regions(vg["annotations"], vg["image_data"], vg["image_ids_file"], "test")
    assert [{k: r[k] for k in ("key", "file_name", "references", "box")} for r in records] == vg["test"]
    assert len(load_vg_regions(vg["annotations"], vg["image_data"])) == 5  # no split file: every region
    dm = RegionCaptionDataModule("vg", vg["annotations"], vg["image_root"], split="test", image_data=vg["image_data"],
                                 image_ids_file=vg["image_ids_file"], num_workers=0, max_samples=3)
    dm.setup()
    sample = dm.dataset[0]
    assert len(dm.dataset) == 3 and sample["image_size"] == (80, 60) and sample["region"].tolist() == [5, 5, 35, 25]
    with pytest.raises(ValueError, match="no split 'testB'"):
        load_vg_regions(vg["annotations"], vg["image_data"], vg["image_ids_file"], "testB")
    with pytest.raises(ValueError, match="needs image_data"):
        RegionCaptionDataModule("vg", vg["annotations"], vg["image_root"])


def test_vg_bad_region_error_names_file_image_and_region(tmp_path):
    vg = write_vg_fixture(tmp_path / "vg")
    data = json.loads(Path(vg["annotations"]).read_text())
    data[1]["regions"][1]["width"] = None
    Path(vg["annotations"]).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"region_descriptions.json: entry 1 \(id=2\), region 1 \(region_id=22\)"):
        load_vg_regions(vg["annotations"], vg["image_data"])


# ------------------------------------------------------------------------------------------ prompts
def test_region_prompt_template_is_checked_and_filled():
    prompt = render_region_prompt(DEFAULT_REGION_PROMPT, "[1, 2, 3, 4]")
    assert prompt == "Describe the region [1, 2, 3, 4] in the image."
    for bad in ("Describe the image.", "Describe {region} for {expression}."):
        with pytest.raises(ValueError, match="exactly the field"):
            render_region_prompt(bad, "[1, 2, 3, 4]")


def test_qwen_regions_are_written_in_the_processors_resized_pixels(monkeypatch):
    from PIL import Image

    evaluator = RegionCaptionEvaluator("tiny:qwen2_5_vl", coord_format="qwen2_5_vl", metrics=("ROUGE_L",))
    monkeypatch.setattr(RegionCaptionEvaluator, "generate", lambda self, prompts, images: ["a red box"] * len(prompts))
    image = Image.new("RGB", (64, 48))
    image_processor = evaluator.processor.image_processor
    _, grid_h, grid_w = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    w2, h2 = grid_w * image_processor.patch_size, grid_h * image_processor.patch_size
    sample = {"key": "k", "image": image, "image_size": (64, 48), "region": torch.tensor([0.0, 0.0, 32.0, 24.0]),
              "references": ["a red box"]}
    record, = evaluator.score_batch([sample])
    assert record["prompt"] == f'Describe the region {{"bbox_2d": [0, 0, {w2 // 2}, {h2 // 2}]}} in the image.'
    assert (w2, h2) != (64, 48)  # the resize is real, so the check above means something


# ------------------------------------------------------------- the metric against pycocoevalcap itself
@needs_java
@pytest.mark.parametrize("fresh_meteor", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_caption_scores_equal_pycocoevalcap_called_directly(fresh_meteor):
    direct, rouge_per_pair = _pycocoevalcap_directly(PAIRS, fresh_meteor)
    assert rouge_per_pair == pytest.approx(ROUGE_BY_HAND, abs=1e-5)  # the toolkit is what the hand says
    assert direct["ROUGE_L"] == pytest.approx(sum(ROUGE_BY_HAND) / 5, abs=1e-5)
    assert 0.1 < direct["METEOR"] < 0.9

    metric = CaptionScores()
    metric.update(*map(list, zip(*PAIRS[:2])))
    metric.update(*map(list, zip(*PAIRS[2:])))
    values = metric.compute()
    assert set(values) == {"METEOR", "ROUGE_L"}
    assert values["METEOR"].item() == pytest.approx(direct["METEOR"], abs=1e-12)
    assert values["ROUGE_L"].item() == pytest.approx(direct["ROUGE_L"], abs=1e-12)

    shuffled = [PAIRS[i] for i in (3, 0, 4, 2, 1)]  # the functional twin; the order of samples is irrelevant
    again = caption_scores([p for p, _ in shuffled], [r for _, r in shuffled])
    assert again == pytest.approx({k: v.item() for k, v in values.items()}, abs=1e-12)


# --------------------------------------------------------------------------------------- end to end
def _validate(monkeypatch, config: str, out: Path, data_args: dict[str, str]):
    monkeypatch.setattr(sys, "argv", ["spr_lightning"])  # pytest's own arguments are not the CLI's
    args = ["validate", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(out)]
    for name, value in data_args.items():
        args += [f"--data.init_args.{name}", value]
    cli = cli_main(args)
    lines = (out / "predictions-rank0.jsonl").read_text().splitlines()
    return cli.trainer.callback_metrics, [json.loads(line) for line in lines]


@needs_java
def test_captions_are_stripped_of_boxes_and_scored_from_fake_generations(tmp_path, monkeypatch, capsys):
    refcoco = write_refcoco_fixture(tmp_path / "refcoco")
    red = FERRET.encode((8, 8, 40, 32), (96, 64))
    green = FERRET.encode((56, 30, 86, 58), (96, 64))
    answers = {red: f"The red box {red} on the left.", green: "a green square"}

    def generate(self, prompts, images):
        return [next(a for region, a in answers.items() if region in p) for p in prompts]

    monkeypatch.setattr(RegionCaptionEvaluator, "generate", generate)
    metrics, records = _validate(monkeypatch, "tiny_refcocog_caption.yaml", tmp_path / "out",
                                 {"annotations": refcoco["annotations"], "image_root": refcoco["image_root"]})
    assert [r["key"] for r in records] == ["101", "102"]
    assert records[0]["prompt"] == f"Describe the region {red} in the image."
    assert records[0]["caption"] == "The red box on the left."  # the box is gone from what is scored
    assert records[0]["references"] == ["red box on the left", "the top left red one"]
    assert records[1]["region"] == [56.0, 30.0, 86.0, 58.0]
    expected = caption_scores(["The red box on the left.", "a green square"],
                              [["red box on the left", "the top left red one"], ["green box"]])
    assert metrics["val/METEOR"].item() == pytest.approx(expected["METEOR"], abs=1e-6)
    assert metrics["val/ROUGE_L"].item() == pytest.approx(expected["ROUGE_L"], abs=1e-6)
    out = capsys.readouterr().out
    assert "val region caption | tiny:llava | 2 samples" in out and "| METEOR  |" in out


@needs_java
@pytest.mark.parametrize("config", ["tiny_refcocog_caption.yaml", "tiny_vg_caption.yaml"])
def test_caption_validate_end_to_end_with_tiny_model(config, tmp_path, monkeypatch):
    if "vg" in config:
        vg = write_vg_fixture(tmp_path / "vg")
        data = {k: vg[k] for k in ("annotations", "image_data", "image_ids_file", "image_root")}
        keys = [r["key"] for r in vg["test"]]
    else:
        refcoco = write_refcoco_fixture(tmp_path / "refcoco")
        data = {"annotations": refcoco["annotations"], "image_root": refcoco["image_root"]}
        keys = ["101", "102"]
    metrics, records = _validate(monkeypatch, config, tmp_path / "out", data)
    assert [r["key"] for r in records] == keys
    assert all({"prompt", "generation", "caption", "references", "region"} <= set(r) for r in records)
    assert all(r["prompt"].startswith("Describe the region [") for r in records)
    assert set(metrics) == {"val/METEOR", "val/ROUGE_L"}
    assert all(0.0 <= v.item() <= 1.0 for v in metrics.values())


@needs_java
@pytest.mark.slow
def test_ddp_validate_scores_every_region_once(tmp_path):
    """Two CPU ranks (gloo) through the real command: disjoint shares, one global score printed once."""
    vg = write_vg_fixture(tmp_path / "vg")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spr_lightning", "validate", "--config", str(CONFIGS / "tiny_vg_caption.yaml"),
           "--trainer.default_root_dir", str(out), "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.init_args.batch_size", "1"]
    for name in ("annotations", "image_data", "image_ids_file", "image_root"):
        cmd += [f"--data.init_args.{name}", vg[name]]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for r in (0, 1) for line in (out / f"predictions-rank{r}.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in lines]
    assert sorted(r["key"] for r in records) == ["11", "12", "21", "22"]
    assert proc.stdout.count("region caption | tiny:llava | 4 samples") == 1
    expected = caption_scores([r["caption"] for r in records], [r["references"] for r in records])
    assert f"| METEOR  | {100 * expected['METEOR']:7.2f} |" in proc.stdout
    assert f"| ROUGE_L | {100 * expected['ROUGE_L']:7.2f} |" in proc.stdout


@pytest.mark.parametrize("name", ["refcocog_caption.yaml", "vg_caption.yaml", "tiny_refcocog_caption.yaml",
                                  "tiny_vg_caption.yaml"])
def test_caption_configs_name_real_arguments(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    for section, cls in (("model", RegionCaptionEvaluator), ("data", RegionCaptionDataModule)):
        assert config[section]["class_path"] == f"{cls.__module__}.{cls.__name__}"
        assert set(config[section]["init_args"]) <= set(inspect.signature(cls).parameters)
    init = config["model"]["init_args"]
    render_region_prompt(init.get("prompt_template", DEFAULT_REGION_PROMPT), "[0, 0, 1, 1]")
    get_codec(init["coord_format"], **init.get("codec_options", {}))
    assert config["data"]["init_args"]["source"] == ("vg" if "vg" in name else "refcocog")
    tiny = name.startswith("tiny_")
    assert config["trainer"]["accelerator"] == ("cpu" if tiny else "gpu")
    assert (init["model_name_or_path"] == "tiny:llava") == tiny
