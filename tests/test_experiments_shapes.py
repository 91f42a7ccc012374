"""``spr_lightning.experiments.shapes``: statistics, tables, the pairs -> SFT converter, run folders and, marked
``slow``, the whole experiment at the ``toy`` size with two seeds, every arm, and arms that made no pairs."""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile

import pytest
import yaml

from datamodules.sft import SFTDataset, read_sft_jsonl
from spr_lightning import quickstart
from spr_lightning.experiments import shapes
from spr_lightning.experiments.pair_quality import iter_records
from spr_lightning.shards import ShardFormatError


def _metrics(value: float) -> dict[str, float]:
    return dict.fromkeys(shapes.METRICS, value)


# ------------------------------------------------------------------------------------------ statistics
def test_summarize_values_is_mean_and_sample_std():
    s = shapes.summarize_values([0.2, 0.4, 0.9])
    assert s["mean"] == pytest.approx(0.5)
    assert s["std"] == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2))
    assert s["n"] == 3 and s["values"] == [0.2, 0.4, 0.9]
    assert shapes.summarize_values([0.7]) == {"mean": 0.7, "std": None, "n": 1, "values": [0.7]}
    assert shapes.summarize_values([])["mean"] is None


def test_aggregate_pairs_gains_by_seed_and_skips_seeds_without_pairs():
    per_seed = {
        "sft": {0: _metrics(0.5), 1: _metrics(0.7), 2: _metrics(0.1)},
        "spr": {0: _metrics(0.6), 1: _metrics(0.9), 2: None},
        "loc_only": {0: None, 1: None, 2: None},
    }
    out = shapes.aggregate(per_seed)
    assert "gain" not in out["sft"]
    assert out["sft"]["metrics"]["rec/acc@0.5"]["mean"] == pytest.approx(13 / 30)
    spr = out["spr"]
    assert spr["seeds"] == [0, 1] and spr["missing_seeds"] == [2]
    assert spr["metrics"]["phrase/recall@1@0.9"]["mean"] == pytest.approx(0.75)
    # paired by seed: (0.6 - 0.5, 0.9 - 0.7); seed 2 has no spr model so its baseline is left out too
    gain = spr["gain"]["rec/acc@0.7"]
    assert gain["values"] == pytest.approx([0.1, 0.2])
    assert gain["mean"] == pytest.approx(0.15) and gain["std"] == pytest.approx(math.sqrt(0.005))
    assert out["loc_only"]["seeds"] == [] and out["loc_only"]["gain"]["rec/acc@0.5"]["mean"] is None


def test_results_tables_in_percent_with_signed_gains_and_no_pair_rows():
    per_seed = {"sft": {0: _metrics(0.5), 1: _metrics(0.7)}, "spr": {0: _metrics(0.6), 1: _metrics(0.9)},
                "sem_only": {0: None, 1: None}, "loc_only": {0: _metrics(0.4), 1: None}}
    out = shapes.aggregate(per_seed)
    table = shapes.format_results_table(out, "metrics")
    lines = table.splitlines()
    assert lines[0].startswith("| arm | paper | seeds | REC Acc@0.5 |") and "Phrase R@1@0.9" in lines[0]
    row = next(line for line in lines if line.startswith("| `spr`"))
    assert row.count("75.0 ± 21.2") == len(shapes.METRICS)
    assert "Tab. 2-3 + SPR" in row
    loc = next(line for line in lines if line.startswith("| `loc_only`"))
    assert "1 (1 without pairs)" in loc and "| 40.0 |" in loc  # one seed: no std
    assert "no preference pairs" in next(line for line in lines if line.startswith("| `sem_only`"))
    gains = shapes.format_results_table(out, "gain").splitlines()
    assert not any(line.startswith("| `sft`") for line in gains)
    assert "+15.0 ± 7.1" in next(line for line in gains if line.startswith("| `spr`"))
    assert "-10.0" in next(line for line in gains if line.startswith("| `loc_only`"))


def test_ceiling_row_closes_the_accuracy_table_in_percent():
    ceiling = dict(_metrics(1.0), **{"rec/acc@0.9": 0.407})
    row = shapes.ceiling_row(ceiling)
    assert row.startswith("\n| format ceiling |") and row.count("| 100.0") == len(shapes.METRICS) - 1
    assert "| 40.7 |" in row
    assert shapes.ceiling_row(None) == ""


def test_pair_table_and_dpo_statistics(tmp_path):
    log = tmp_path / "metrics.csv"
    with log.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "train/loss", "rewards/margins", "rewards/accuracies"])
        writer.writeheader()
        for step in range(12):
            writer.writerow({"step": step, "train/loss": 0.69, "rewards/margins": step / 10,
                             "rewards/accuracies": 1.0 if step % 2 else 0.0})
    stats = shapes.dpo_statistics(log, last=4)
    assert stats["dpo_margin"] == pytest.approx((0.8 + 0.9 + 1.0 + 1.1) / 4)
    assert stats["dpo_accuracy"] == pytest.approx(0.5)
    assert stats["dpo_steps"] == 12
    table = shapes.pair_table({"spr": {0: {"pairs": 10.0, "chosen_total": 0.5, **stats},
                                       1: {"pairs": 14.0, "chosen_total": 0.7, **stats}},
                               "sft_chosen": {0: {"pairs": 10.0}}})
    spr = next(line for line in table.splitlines() if line.startswith("| `spr`"))
    assert "| 12 ± 3 |" in spr and "0.600 ± 0.141" in spr and "0.950 ± 0.000" in spr
    assert "| 10 | – |" in next(line for line in table.splitlines() if line.startswith("| `sft_chosen`"))


def test_audit_section_averages_the_seeds():
    one = {"queries": 10.0, "sem_spread": 0.5, "loc_spread": 0.1, "rho_sem_on_object": 0.0, "rho_sem_names_region": 0.2,
           "rho_loc_on_object": 0.4, "rho_loc_names_region": 0.6, "on_object_mean": 0.2, "on_object_best": 0.4,
           "lam0_pairs": 1.0, "lam0_better": 0.6, "lam0_worse": 0.2, "lam0_gap": 0.1}
    two = {**one, "sem_spread": 0.7, "lam0_better": 0.8}
    text = shapes._audit_section({"0": one, "1": two})
    assert "| S_sem | 0.600 | +0.000 | +0.200 |" in text and "| 0 | 100.0% | 70.0% | 20.0% | +10.0 |" in text
    assert "did not run" in shapes._audit_section({})


def test_rec_pairs_note_averages_the_control_and_is_empty_without_it():
    pairs = {"rec_dpo": {0: {"chosen_iou": 0.6, "rejected_iou": 0.2, "sampled_acc50": 0.4, "best_of_k_acc50": 0.7},
                         1: {"chosen_iou": 0.8, "rejected_iou": 0.0, "sampled_acc50": 0.5}}}
    note = shapes._rec_pairs_note(pairs)
    assert "chosen IoU 0.700, rejected IoU 0.100" in note and "0.450 reach IoU 0.5" in note and "samples 0.700" in note
    assert shapes._rec_pairs_note({"spr": {0: {"pairs": 3.0}}}) == ""


def test_description_table_in_percent_and_skips_seeds_without_regions():
    descriptions = {"sft": {0: {"regions": 10.0, "boxes": 2.0, "on_object": 0.5, "named": 0.25, "mean_iou": 0.4,
                                "names_region": 0.5}},
                    "spr": {0: {"regions": 10.0, "boxes": 3.0, "on_object": 0.4, "named": 0.2, "mean_iou": 0.3,
                                "names_region": 0.6},
                            1: {"regions": 10.0, "boxes": 5.0, "on_object": 0.6, "named": 0.3, "mean_iou": 0.5,
                                "names_region": 0.8},
                            2: {"regions": 0.0}}}
    lines = shapes.description_table(descriptions).splitlines()
    assert lines[2] == "| `sft` | 10 | 2.00 | 50.0 | 25.0 | 0.400 | 50.0 |"
    assert lines[3] == "| `spr` | 10 ± 0 | 4.00 ± 1.41 | 50.0 ± 14.1 | 25.0 ± 7.1 | 0.400 ± 0.141 | 70.0 ± 14.1 |"


def test_plot_gains_writes_a_png(tmp_path):
    out = shapes.aggregate({"sft": {0: _metrics(0.5), 1: _metrics(0.6)}, "spr": {0: _metrics(0.6), 1: None}})
    png = shapes.plot_gains(out, tmp_path / "gain.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- pairs -> SFT data
def test_pairs_to_sft_jsonl_writes_chosen_answers_the_sft_reader_accepts(pair_shards, tmp_path):
    path, count = shapes.pairs_to_sft_jsonl(pair_shards, tmp_path / "chosen")
    assert count == 4 and path == tmp_path / "chosen" / "sft_chosen.jsonl"
    records = read_sft_jsonl(path)  # SFTDataModule's own reader: images resolved relative to the JSONL
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in raw] == [f"img{i}-0" for i in range(4)]
    assert all(r["answer"].startswith("A ") and "square [" in r["answer"] for r in records)
    assert all(r["prompt"] == "Describe the region [0, 0, 999, 999] in detail." for r in records)
    assert {r["task"] for r in raw} == {"spr_chosen"}
    sample = SFTDataset(records)[1]
    assert sample["image"].size == (64, 64)
    red, green, _ = sample["image"].getpixel((25, 25))  # inside pair 1's square wherever the helper put it
    assert green > 150 and red < 100  # green: the helper's colour of pair 1


def test_pairs_to_sft_jsonl_names_the_shard_of_a_sample_without_image(tmp_path):
    from spr_lightning.shards import append_manifest

    folder = tmp_path / "pairs"
    folder.mkdir()
    record = {"schema": 1, "query_id": "q", "image_id": 0, "image_size": [8, 8], "region": [0, 0, 8, 8],
              "prompt": "p", "chosen": "a", "rejected": "b", "scores": {}, "coord_format": "ferret"}
    data = json.dumps(record).encode()
    with tarfile.open(folder / "pairs-r000-000000.tar", "w") as tar:
        info = tarfile.TarInfo("q.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    append_manifest(folder, 0, "pairs-r000-000000.tar", ["q"])
    with pytest.raises(ShardFormatError, match=r"pairs-r000-000000\.tar: sample 'q' has no image"):
        shapes.pairs_to_sft_jsonl(folder, tmp_path / "out")


# ------------------------------------------------------------------------------------------- run folders
def test_experiment_run_links_folders_and_adds_overrides(tmp_path):
    run = shapes.ExperimentRun(tmp_path / "seed_3" / "arms" / "spr", "toy",
                               links={"sft": tmp_path / "seed_3" / "sft", "world": tmp_path / "world"},
                               overrides={"*": {"seed_everything": 3}, "dpo": {"data.init_args.seed": 3}})
    assert run.path("sft", "model", "final") == tmp_path / "seed_3" / "sft" / "model" / "final"
    assert run.path("world") == tmp_path / "world"
    assert run.path("score", "pairs") == tmp_path / "seed_3" / "arms" / "spr" / "score" / "pairs"
    assert run.done("sft") is False
    (tmp_path / "seed_3" / "sft").mkdir(parents=True)
    (tmp_path / "seed_3" / "sft" / "DONE").write_text("{}")
    assert run.done("sft") is True
    config = yaml.safe_load(run.config("dpo", "dpo.yaml", {"trainer.max_steps": 2, "data.init_args.seed": 0})
                            .read_text())
    assert config["seed_everything"] == 3 and config["data"]["init_args"]["seed"] == 3  # the arm's values win
    assert config["trainer"]["max_steps"] == 2
    assert (tmp_path / "seed_3" / "arms" / "spr" / "configs" / "dpo.yaml").is_file()
    assert config["trainer"]["accelerator"] == "cpu"


def test_spr_boxes_arm_scores_its_own_candidates_without_the_grounder(tmp_path):
    experiment = shapes.ShapesExperiment(tmp_path, "toy", [2], ["sft", "spr", "spr_boxes"])
    boxes, spr = experiment.arm_run(2, "spr_boxes"), experiment.arm_run(2, "spr")
    own = tmp_path / "seed_2" / "arms" / "spr_boxes" / "box_candidates"
    assert boxes.path("generate", "candidates") == own / "candidates" == boxes.path("box_candidates", "candidates")
    assert spr.path("generate", "candidates") == tmp_path / "seed_2" / "generate" / "candidates"
    config = yaml.safe_load(boxes.config("score", "score.yaml", {}).read_text())["model"]["init_args"]
    assert config["grounder"] is None and config["refine"] is False and config["lam"] == 0.8
    assert config["semantic_scorer"] is not None


def test_experiment_passes_the_accelerator_to_every_run(tmp_path):
    experiment = shapes.ShapesExperiment(tmp_path, "toy", [0, 1], ["sft", "spr"], accelerator="gpu")
    for run in (experiment.shared, experiment.seed_run(1), experiment.arm_run(1, "spr")):
        config = yaml.safe_load(run.config("dpo", "dpo.yaml", {}).read_text())
        assert config["trainer"]["accelerator"] == "gpu", run.root
    with pytest.raises(ValueError, match="accelerator must be one of"):
        shapes.run_experiment(tmp_path / "x", "toy", accelerator="tpu")


def test_user_overrides_reach_every_run_and_an_arm_keeps_its_own_settings(tmp_path):
    user = {"score": {"model.init_args.lam": 0.3, "model.init_args.iou_threshold": 0.6},
            "sft": {"model.init_args.lr": 5e-4, "seed_everything": 99}}
    experiment = shapes.ShapesExperiment(tmp_path, "toy", [0], ["sft", "loc_only"], overrides=user)
    sft = yaml.safe_load(experiment.seed_run(0).config("sft", "sft.yaml", {}).read_text())
    assert sft["seed_everything"] == 0 and sft["model"]["init_args"]["lr"] == 5e-4  # the seed's own seed wins
    arm = experiment.arm_run(0, "loc_only")
    assert arm.overrides["score"]["model.init_args.lam"] == 0.0  # the arm's λ, not the user's
    assert arm.overrides["score"]["model.init_args.iou_threshold"] == 0.6
    assert experiment.seed_run(0).overrides["sft"]["model.init_args.lr"] == 5e-4
    assert experiment.seed_run(0).overrides["sft"]["data.init_args.seed"] == 0
    assert experiment.shared.overrides["sft"]["model.init_args.lr"] == 5e-4
    assert user["score"]["model.init_args.lam"] == 0.3  # the caller's mapping is left alone
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(tmp_path / "x"), "--set", "eval_rec_sft:a=1"])  # a quickstart name, not ours


def test_score_stage_without_pairs_is_recorded_and_other_errors_raise(tmp_path, monkeypatch):
    import inspect

    # the quickstart's own stage still says so when it makes no pair (the experiment recognises it by this)
    assert shapes.NO_PAIRS_MESSAGE in inspect.getsource(quickstart.stage_score)
    run = shapes.ExperimentRun(tmp_path, "toy")

    def no_pairs(_run):
        raise RuntimeError("the scoring stage made no preference pairs (every region's candidates tied): ...")

    monkeypatch.setattr(quickstart, "stage_score", no_pairs)
    info = shapes._stage_score(run)
    assert info["summary"]["pairs"] == 0 and "no preference pairs" in info["no_pairs"]

    def broken(_run):
        raise RuntimeError("CUDA error")

    monkeypatch.setattr(quickstart, "stage_score", broken)
    with pytest.raises(RuntimeError, match="CUDA error"):
        shapes._stage_score(run)


def test_arguments_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown arm"):
        shapes.run_experiment(tmp_path / "x", "toy", arms=["dpo_only"])
    with pytest.raises(ValueError, match="size"):
        shapes.run_experiment(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="seeds"):
        shapes.run_experiment(tmp_path / "x", "toy", seeds=[1, 1])
    with pytest.raises(ValueError, match="rec_dpo_samples >= 2"):
        shapes.run_experiment(tmp_path / "x", "toy", rec_dpo_samples=1)
    assert not (tmp_path / "x").exists()


def test_rec_dpo_size_defaults_to_the_seeds_regions_and_can_be_set(tmp_path, monkeypatch):
    from spr_lightning.experiments import rec_pairs

    asked = []

    def fake_build(model, world, out, *, queries, candidates, seed, coord_format):
        asked.append((queries, candidates, seed))
        return {"pairs": 0, "queries": queries, "chosen_iou_mean": 0.0, "rejected_iou_mean": 0.0,
                "sampled_acc": {"0.5": 0.0}, "best_of_k_acc": {"0.5": 0.0}}

    monkeypatch.setattr(rec_pairs, "build_rec_pairs", fake_build)
    records = [{"query_id": f"{i}-0", "candidates": ["a", "b", "c"]} for i in range(5)]
    monkeypatch.setattr(shapes, "iter_records", lambda folder, kind: (("s", r["query_id"], r) for r in records))
    run = shapes.ExperimentRun(tmp_path / "arm", "toy")
    shapes._stage_rec_pairs(run, seed=3)
    info = shapes._stage_rec_pairs(run, seed=3, questions=40, samples=8)
    assert asked == [(5, 3, 3), (40, 8, 3)] and "no_pairs" in info


def test_sft_start_must_be_a_finished_quickstart_run(tmp_path):
    start = tmp_path / "qs"
    for stage in ("world", "vision", "clip", "base"):
        (start / stage).mkdir(parents=True)
        (start / stage / "DONE").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"stage\(s\) \['sft'\] not finished"):
        shapes.run_experiment(tmp_path / "x", "toy", seeds=[0], sft_start=start)
    experiment = shapes.ShapesExperiment(tmp_path / "x", "toy", [4], ["sft", "spr"], sft_start=start)
    arm = experiment.arm_run(4, "spr")
    assert arm.path("sft", "model") == start / "sft" / "model" and arm.path("world") == start / "world"
    assert arm.path("generate") == tmp_path / "x" / "seed_4" / "generate"  # the SPR stages are the seed's own
    assert experiment.seed_run(4).path("base") == start / "base"
    two = shapes.ShapesExperiment(tmp_path / "x", "toy", [4, 5], ["sft", "spr"], sft_start=start)
    assert two.arm_run(5, "sft").root == two.arm_run(4, "sft").root  # the shared start is evaluated once
    assert two.arm_run(5, "spr").root != two.arm_run(4, "spr").root


def test_dpo_lr_and_epochs_apply_to_dpo_and_its_sft_twin(tmp_path):
    experiment = shapes.ShapesExperiment(tmp_path, "toy", [0], ["sft", "spr", "sft_chosen"], dpo_lr=3e-3, dpo_epochs=5)
    assert experiment.size.dpo_epochs == 5
    for arm, stage in (("spr", "dpo"), ("sft_chosen", "chosen_sft")):
        assert experiment.arm_run(0, arm).overrides[stage]["model.init_args.lr"] == 3e-3
    default = shapes.ShapesExperiment(tmp_path, "toy", [0], ["sft", "spr"])
    assert "model.init_args.lr" not in default.arm_run(0, "spr").overrides["dpo"]
    assert default.size.dpo_epochs == quickstart.SIZES["toy"].dpo_epochs
    with pytest.raises(ValueError, match="dpo_lr"):
        shapes.run_experiment(tmp_path / "x", "toy", dpo_lr=0.0)


def test_every_arm_is_documented_and_the_sft_arm_is_the_baseline():
    assert list(shapes.ARMS) == ["sft", "spr", "sft_chosen", "spr_norefine", "loc_only", "sem_only", "oracle",
                                 "rec_dpo", "spr_boxes"]
    assert shapes.ARMS["rec_dpo"].pairs == "rec" and shapes.ARMS["rec_dpo"].training == "dpo"
    assert shapes.ARMS["oracle"].pairs == "oracle" and shapes.ARMS["oracle"].training == "dpo"
    assert shapes.ARMS["spr_boxes"].pairs == "boxes" and shapes.ARMS["spr_boxes"].training == "dpo"
    assert shapes.ARMS["spr_boxes"].score == {"lam": 0.8, "refine": False, "grounder": None}
    assert all(arm.pairs == "descriptions" for name, arm in shapes.ARMS.items()
               if name not in ("rec_dpo", "oracle", "spr_boxes"))
    assert shapes.ARMS["sft"].training == "none" and shapes.ARMS["sft_chosen"].training == "sft_chosen"
    assert shapes.ARMS["loc_only"].score == {"lam": 0.0, "refine": True}
    assert shapes.ARMS["sem_only"].score == {"lam": 1.0, "refine": True}
    assert shapes.ARMS["spr_norefine"].score == {"lam": 0.8, "refine": False}
    for arm in shapes.ARMS:
        assert f"``{arm}``" in shapes.__doc__


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_shapes_experiment_toy_end_to_end(tmp_path, monkeypatch, capsys):
    """Two seeds, every arm; spr (seed 1) and sem_only (both seeds) are made to score no pairs, as a toy model
    whose candidates all tie would: those arms are reported as such, the rest of the experiment goes on."""
    real_score = quickstart.stage_score

    def score(run):
        if (run.root.name, run.root.parents[1].name) in {("spr", "seed_1"), ("sem_only", "seed_0"),
                                                          ("sem_only", "seed_1")}:
            raise RuntimeError("the scoring stage made no preference pairs (every region's candidates tied)")
        return real_score(run)

    monkeypatch.setattr(quickstart, "stage_score", score)
    out = tmp_path / "exp"
    shapes.main(["--out", str(out), "--size", "toy", "--seeds", "0", "1"])
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_seed"]) == set(shapes.ARMS)
    for arm, seeds in results["per_seed"].items():
        for seed, metrics in seeds.items():
            no_pairs = (arm == "sem_only") or (arm in ("spr", "sft_chosen") and seed == "1") or (
                arm in ("rec_dpo", "oracle", "spr_boxes") and results["pairs"][arm][seed]["pairs"] == 0)
            assert (metrics is None) == no_pairs, (arm, seed)
            if metrics is not None:
                assert set(metrics) == set(shapes.METRICS)
                assert all(0.0 <= v <= 1.0 for v in metrics.values())
    agg = results["aggregate"]
    assert agg["spr"]["seeds"] == [0] and agg["spr"]["missing_seeds"] == [1]
    assert agg["sem_only"]["seeds"] == [] and agg["loc_only"]["seeds"] == [0, 1]
    assert set(agg["loc_only"]["gain"]) == set(shapes.METRICS)
    assert results["pairs"]["loc_only"]["0"]["pairs"] > 0 and "dpo_margin" in results["pairs"]["loc_only"]["0"]
    assert 0.0 <= results["pairs"]["loc_only"]["0"]["chosen_named"] <= 1.0  # pair quality vs the annotations
    assert results["pairs"]["sft_chosen"]["0"]["pairs"] == results["pairs"]["spr"]["0"]["pairs"]
    # the oracle ranked every region of the seed (pairs + ties), its pairs on disk, checked against the annotations
    for seed in ("0", "1"):
        oracle = results["pairs"]["oracle"][seed]
        regions = len(list(iter_records(out / f"seed_{seed}" / "generate" / "candidates", "candidate")))
        assert oracle["queries"] == regions == oracle["pairs"] + oracle["ties"]
        if oracle["pairs"]:
            assert "chosen_named" in oracle and oracle["chosen_oracle"] > oracle["rejected_oracle"]
    # the REC control answered as many training questions as the seed has regions, and its pairs are on disk
    for seed in ("0", "1"):
        rec = results["pairs"]["rec_dpo"][seed]
        regions = len(list(iter_records(out / f"seed_{seed}" / "generate" / "candidates", "candidate")))
        assert rec["queries"] == regions and 0 <= rec["pairs"] <= regions
        pairs_dir = out / f"seed_{seed}" / "arms" / "rec_dpo" / "score" / "pairs"
        summary = json.loads((pairs_dir / "summary.json").read_text())
        assert summary["pairs"] == rec["pairs"] and "chosen_named" not in rec
    # the Tab. 8 arm trained (LoRA merged into a full model) on the chosen answers of the spr pairs
    chosen = out / "seed_0" / "arms" / "sft_chosen"
    assert (chosen / "chosen_sft" / "model" / "final" / "config.json").is_file()
    # plain instruction finetuning: the start's grounding-attention loss is off in the Tab. 8 arm
    chosen_config = yaml.safe_load((chosen / "configs" / "chosen_sft.yaml").read_text())
    assert chosen_config["model"]["init_args"]["grounding_attention_weight"] == 0.0
    lines = (chosen / "chosen_data" / "sft_chosen.jsonl").read_text().splitlines()
    assert len(lines) == results["pairs"]["spr"]["0"]["pairs"]
    assert (out / "seed_1" / "arms" / "spr" / "score" / "DONE").is_file()
    assert not (out / "seed_1" / "arms" / "spr" / "dpo").exists()
    text = (out / "results.md").read_text()
    for arm in shapes.ARMS:
        assert f"`{arm}`" in text
    for key in shapes.METRICS:
        assert shapes.metric_label(key) in text
    assert "no preference pairs" in text and "1 (1 without pairs)" in text
    assert set(results["ceiling"]) == set(shapes.METRICS) and "| format ceiling |" in text
    assert all(0.0 <= v <= 1.0 for v in results["ceiling"].values())
    assert "python -m spr_lightning validate --config" in text and "## Wall time" in text
    assert (out / "gain_vs_iou.png").stat().st_size > 0
    # the reward audit of the spr arm's candidates: seed 0 only (seed 1 made no pairs)
    assert set(results["reward_audit"]) == {"0"} and results["reward_audit"]["0"]["queries"] > 0
    assert "### Reward audit" in text and "| S_loc |" in text
    assert "`rec_dpo` (the start's REC answers to training questions" in text
    # SPR's own task on held-out regions, for every arm with a model (the adapter of DPO arms applied)
    assert "### Region descriptions on held-out regions" in text
    for arm, seeds in results["per_seed"].items():
        for seed, metrics in seeds.items():
            described = results["descriptions"].get(arm, {}).get(seed)
            assert (described is None) == (metrics is None), (arm, seed)
            if described is not None and described["regions"]:
                assert 0.0 <= described["on_object"] <= 1.0 and described["boxes"] >= 0
    describe_config = yaml.safe_load((out / "seed_0" / "arms" / "spr" / "configs" / "eval_describe.yaml").read_text())
    assert describe_config["model"]["init_args"]["adapter_path"].endswith("dpo/adapter/final")
    assert describe_config["model"]["init_args"]["do_sample"] is False
    assert describe_config["data"]["init_args"]["annotations"].endswith("instances_test.json")
    # a second run reuses every stage
    capsys.readouterr()
    shapes.main(["--out", str(out), "--size", "toy", "--seeds", "0", "1"])
    assert " finished in " not in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert all(t["reused"] for t in again["timings"]) and len(again["timings"]) == len(results["timings"])
    assert again["per_seed"] == results["per_seed"]
    assert set(results["per_seed"]["sft"]["0"]) == set(shapes.METRICS) and "rec/acc@0.75" in shapes.METRICS
    # an evaluation recorded before Acc@0.75 was measured runs again instead of failing the report
    marker = out / "seed_0" / "arms" / "sft" / "eval_rec" / "DONE"
    done = json.loads(marker.read_text())
    del done["info"]["rec/acc@0.75"]
    marker.write_text(json.dumps(done))
    shapes.main(["--out", str(out), "--size", "toy", "--seeds", "0", "1"])
    assert "eval_rec was done without ['rec/acc@0.75']; running it again" in capsys.readouterr().out
    rec = {k: v for k, v in results["per_seed"]["sft"]["0"].items() if k.startswith("rec/")}
    assert json.loads(marker.read_text())["info"] == rec  # greedy decoding: the same numbers again
    assert json.loads((out / "results.json").read_text())["per_seed"] == results["per_seed"]
    # --sft-start: a quickstart-layout folder (here links into this experiment) is every seed's start
    start = tmp_path / "qs"
    start.mkdir()
    for stage, target in (("world", out / "world"), ("vision", out / "vision"), ("clip", out / "clip"),
                          ("base", out / "seed_0" / "base"), ("sft", out / "seed_0" / "sft")):
        (start / stage).symlink_to(target)
    out2 = tmp_path / "exp2"
    shapes.main(["--out", str(out2), "--size", "toy", "--seeds", "7", "--arms", "spr", "--sft-start", str(start)])
    started = json.loads((out2 / "results.json").read_text())
    assert started["sft_start"] == str(start.resolve())
    assert started["per_seed"]["sft"]["7"] == results["per_seed"]["sft"]["0"]  # the same SFT model, evaluated
    assert not (out2 / "seed_7" / "sft").exists() and not (out2 / "world").exists()
    assert (out2 / "seed_7" / "generate" / "DONE").is_file()
