"""SFT: answer-only labels (the same rows DPO builds), JSONL validation, a CLI overfit whose merged export loads
as a plain transformers model and greedy-generates the trained boxes, and full fine-tuning's frozen vision tower."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.collate import PreferenceCollator
from datamodules.sft import SFTCollator, SFTDataModule, SFTDataset, read_sft_jsonl
from spr_lightning.cli import cli_main
from spr_lightning.coords import get_codec
from spr_lightning.dpo_inputs import concatenated_inputs
from spr_lightning.logprobs import IGNORE_INDEX
from spr_lightning.models import load_processor
from spr_lightning.sft import SFTModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/sft/tiny_llava.yaml"
COLOURS = [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220)), ("yellow", (230, 220, 20))]
SIZE = (64, 64)


def write_sft_world(root: Path, seed: int = 0) -> Path:
    """One coloured square per image under ``root/images``; ``root/sft.jsonl`` asks where it is (ferret boxes)."""
    rng, codec = random.Random(seed), get_codec("ferret")
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (name, rgb) in enumerate(COLOURS):
        x1, y1, side = rng.randint(0, 30), rng.randint(0, 30), rng.randint(12, 30)
        box = [x1, y1, x1 + side, y1 + side]
        image = Image.new("RGB", SIZE, (rng.randint(0, 60),) * 3)
        image.paste(rgb, tuple(box))
        image.save(root / "images" / f"{i}.png")
        lines.append({"id": f"s{i}", "image": f"images/{i}.png", "prompt": f"Where is the {name} square? "
                      "Answer with a bounding box.", "answer": codec.encode(box, SIZE), "boxes": [box]})
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def samples(jsonl: Path) -> list[dict]:
    dataset = SFTDataset(read_sft_jsonl(jsonl))
    return [dataset[i] for i in range(len(dataset))]


END_OF_TURN = {"llava": " {}</s>\n", "qwen2_5_vl": "{}<|im_end|>\n"}  # the tiny chat templates, by hand


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_collator_labels_exactly_the_answer_and_matches_dpo_rows(family, tiny_models, tmp_path):
    processor = load_processor(str(tiny_models[family]))
    batch_samples = samples(write_sft_world(tmp_path))[:3]
    batch_samples[1] = {**batch_samples[1], "answer": "A much longer answer [1, 2, 3, 4] and more."}
    batch = SFTCollator(processor, max_length=None)(batch_samples)

    tokenizer = processor.tokenizer
    for row, sample in enumerate(batch_samples):
        labelled = batch["labels"][row] != IGNORE_INDEX
        assert tokenizer.decode(batch["labels"][row][labelled]) == END_OF_TURN[family].format(sample["answer"])
        assert torch.equal(batch["labels"][row][labelled], batch["input_ids"][row][labelled])
        # Labels are one contiguous block ending at the last real token; padding is masked and unlabelled.
        real = batch["attention_mask"][row].bool()
        first, last = labelled.nonzero()[[0, -1], 0].tolist()
        assert labelled[first : last + 1].all() and last == int(real.sum()) - 1 and not labelled[~real].any()

    # SFT trains on exactly the rows DPO scores: the chosen half of DPO's concatenated inputs for the same samples.
    pairs = [{"__key__": s["key"], "json": {"prompt": s["prompt"], "chosen": s["answer"], "rejected": "no"},
              "png": s["image"]} for s in batch_samples]
    dpo_collator = PreferenceCollator(processor, max_length=None)
    dpo = concatenated_inputs(dpo_collator(pairs), dpo_collator.pad_id)
    width = batch["input_ids"].shape[1]
    for key in ["input_ids", "labels", "attention_mask"] + (["mm_token_type_ids"] if family == "qwen2_5_vl" else []):
        dpo_rows = dpo[key][: len(pairs)]
        mask = batch["attention_mask"].bool()
        assert torch.equal(dpo_rows[:, :width][mask], batch[key][mask]), key
    assert torch.equal(dpo["pixel_values"][: batch["pixel_values"].shape[0]], batch["pixel_values"])


def test_max_length_cuts_the_answer_from_its_end(tiny_models, tmp_path):
    processor = load_processor(str(tiny_models["llava"]))
    sample = samples(write_sft_world(tmp_path))[0]
    full = SFTCollator(processor, max_length=None)([sample])
    prompt_len = int((full["labels"][0] == IGNORE_INDEX).sum())
    cut = SFTCollator(processor, max_length=prompt_len + 3)([sample])
    assert cut["input_ids"].shape[1] == prompt_len + 3
    assert torch.equal(cut["labels"][0, prompt_len:], full["labels"][0, prompt_len : prompt_len + 3])
    with pytest.raises(ValueError, match="the prompt alone"):
        SFTCollator(processor, max_length=prompt_len - 1)([sample])


def test_bad_lines_and_missing_images_name_the_file_and_line(tmp_path):
    jsonl = write_sft_world(tmp_path)
    lines = jsonl.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "", lines[1][:-5]]) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: not valid JSON"):
        read_sft_jsonl(bad)
    bad.write_text(lines[0] + "\n" + json.dumps({"image": None, "prompt": "hi", "answer": 3}) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: field 'answer' must be a string"):
        read_sft_jsonl(bad)
    bad.write_text(lines[0] + "\n" + lines[1].replace("images/1.png", "images/missing.png") + "\n")
    with pytest.raises(FileNotFoundError, match=rf"{bad}:2: image 'images/missing.png' not found"):
        read_sft_jsonl(bad)
    # image_root overrides the JSONL's folder; a text-only sample (image null) needs no image.
    other = tmp_path / "elsewhere" / "sft.jsonl"
    other.parent.mkdir()
    other.write_text(lines[0] + "\n" + json.dumps({"image": None, "prompt": "hi", "answer": "hello"}) + "\n")
    records = read_sft_jsonl(other, image_root=tmp_path)
    assert records[0]["image"] == str(tmp_path / "images/0.png") and records[1]["image"] is None
    assert [r["key"] for r in records] == ["s0", f"{other}:2"]
    with pytest.raises(FileNotFoundError, match="images/0.png"):
        read_sft_jsonl(other)


def test_datamodule_epoch_order_depends_only_on_seed_and_epoch(tiny_models, tmp_path):
    jsonl = write_sft_world(tmp_path)
    orders = []
    for _ in range(2):
        data = SFTDataModule(str(jsonl), processor_name_or_path=str(tiny_models["llava"]), batch_size=2, seed=3)
        data.setup("fit")
        loader = data.train_dataloader()
        epochs = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            epochs.append([key for batch in loader for key in batch["keys"]])
        orders.append(epochs)
    assert orders[0] == orders[1] and sorted(orders[0][0]) == ["s0", "s1", "s2", "s3"]
    assert orders[0][0] != orders[0][1]


def metric_rows(out: Path, name: str) -> list[dict]:
    rows = [row for f in sorted(out.glob("logs/version_*/metrics.csv")) for row in csv.DictReader(open(f))]
    return [row for row in rows if row.get(name)]


@pytest.fixture
def one_thread():
    """One intra-op thread: with other processes on the cores, OpenMP threads spinning on the tiny matmuls made
    each step ~80x slower (1.9 s instead of 25 ms measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_overfits_and_the_merged_export_generates_the_trained_boxes(tiny_models, tmp_path, one_thread):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    jsonl = write_sft_world(tmp_path / "world")
    out = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(CONFIG), f"--data.init_args.train_file={jsonl}",
                    f"--data.init_args.val_file={jsonl}",
                    f"--model.init_args.model_name_or_path={tiny_models['llava']}",
                    f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                    "--trainer.check_val_every_n_epoch=20", "--trainer.enable_progress_bar=false"])
    train = metric_rows(out, "train/loss")
    first, last = float(train[0]["train/loss"]), float(train[-1]["train/loss"])
    assert len(train) == 80 and first > 6.0 and last < first / 50, (first, last)
    assert float(train[0]["train/token_accuracy"]) < 0.1 < 0.9 < float(train[-1]["train/token_accuracy"])
    val = metric_rows(out, "val/token_accuracy")
    assert float(val[-1]["val/token_accuracy"]) > max(0.9, float(val[0]["val/token_accuracy"]))

    checkpoint = torch.load(next(out.glob("checkpoints/last.ckpt")), map_location="cpu",
                            weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in k or "modules_to_save" in k for k in checkpoint["state_dict"])

    export = out / "model" / "final"
    assert (export / "model.safetensors").exists() and not (export / "adapter_config.json").exists()
    model = AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    processor = AutoProcessor.from_pretrained(str(export))
    codec = get_codec("ferret")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    batch = SFTCollator(processor, max_length=None)(samples(jsonl))
    inputs = {k: v for k, v in batch.items() if k not in ("keys", "labels")}
    trained = cli.model.policy.eval()
    with torch.no_grad():  # the merge is exact: same logits as the trained LoRA model
        assert torch.allclose(model(**inputs).logits, trained(**inputs).logits, atol=1e-4)
    for record, sample in zip(records[:2], samples(jsonl)[:2]):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["prompt"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        prompt = processor(text=[text], images=[sample["image"]], return_tensors="pt", add_special_tokens=False)
        generated = model.generate(**prompt, max_new_tokens=30, do_sample=False)
        answer = processor.tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        boxes = [g.xyxy for g in codec.decode(answer, SIZE)]
        assert len(boxes) == 1, answer
        # ferret bins are 1/1000 of the side: within 2 px of the trained box on a 64-px image.
        assert torch.allclose(torch.tensor(boxes[0]), torch.tensor(record["boxes"][0], dtype=torch.float), atol=2.0)


@pytest.mark.parametrize(("family", "tower", "projector"), [
    ("llava", "model.vision_tower.", "model.multi_modal_projector."),
    ("qwen2_5_vl", "model.visual.", "model.visual.merger."),
])
def test_full_finetune_trains_language_model_and_projector_only(family, tower, projector, tiny_models):
    module = SFTModule(str(tiny_models[family]), lora=False)
    trainable = {name for name, p in module.policy.named_parameters() if p.requires_grad}
    names = [name for name, _ in module.policy.named_parameters()]
    assert {n for n in names if n.startswith(tower) and not n.startswith(projector)}.isdisjoint(trainable)
    assert {n for n in names if not n.startswith(tower) or n.startswith(projector)} == trainable
    assert any(n.startswith(projector) for n in trainable) and any("lm_head" in n for n in trainable)
    vision_too = SFTModule(str(tiny_models[family]), lora=False, full_finetune_vision=True)
    assert all(p.requires_grad for p in vision_too.policy.parameters())
    with pytest.raises(ValueError, match="lora=False"):
        SFTModule(str(tiny_models[family]), lora=True, full_finetune_vision=True)


def test_full_finetune_step_keeps_the_tower_and_exports_the_whole_model(tiny_models, tmp_path, one_thread):
    from transformers import AutoModelForImageTextToText

    module = SFTModule(str(tiny_models["llava"]), lora=False)
    before = {name: p.detach().clone() for name, p in module.policy.named_parameters()}
    batch = SFTCollator(module.processor)(samples(write_sft_world(tmp_path / "world")))
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=1e-3)
    module.sft_step(batch)["loss"].backward()
    optimizer.step()
    changed = {name for name, p in module.policy.named_parameters() if not torch.equal(p, before[name])}
    assert not any(n.startswith("model.vision_tower.") for n in changed)
    assert any(n.startswith("model.multi_modal_projector.") for n in changed) and "lm_head.weight" in changed

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert len(checkpoint["state_dict"]) == len(module.state_dict())  # a normal, complete checkpoint

    exported = AutoModelForImageTextToText.from_pretrained(str(module.export_model(tmp_path / "export")))
    state = exported.state_dict()
    assert all(torch.equal(state[name], p) for name, p in module.policy.state_dict().items())


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_from_last_checkpoint_continues_the_same_curve(group_by_length, tiny_models, tmp_path, one_thread):
    jsonl = write_sft_world(tmp_path / "world")

    def fit(out, *extra):
        cli_main(["fit", "--config", str(CONFIG), f"--data.init_args.train_file={jsonl}",
                  # groups of one batch: which samples share a batch then changes with the epoch, as in a real run
                  f"--data.init_args.group_by_length={str(group_by_length).lower()}",
                  "--data.init_args.length_group_size=1",
                  "--data.init_args.batch_size=2", f"--model.init_args.model_name_or_path={tiny_models['llava']}",
                  "--trainer.max_steps=8",
                  f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                  "--trainer.enable_progress_bar=false", *extra])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(straight)
    # Interrupted at the end of epoch 2 (two shuffled batches an epoch) of the same 8-step schedule.
    fit(resumed, "--trainer.callbacks+=stop_at_step.StopAtStep", "--trainer.callbacks.step=4")
    fit(resumed, f"--ckpt_path={resumed / 'checkpoints/last.ckpt'}")
    losses = [float(r["train/loss"]) for r in metric_rows(straight, "train/loss")]
    resumed_losses = [float(r["train/loss"]) for r in metric_rows(resumed, "train/loss")]
    assert len(losses) == 8 and resumed_losses == pytest.approx(losses, abs=1e-5)


def test_projector_lr_scale_sets_the_projector_group_and_zero_freezes_it(tiny_models, tmp_path, one_thread):
    from types import SimpleNamespace

    projector = "model.multi_modal_projector."
    scaled = SFTModule(str(tiny_models["llava"]), lora=False, lr=1e-3, projector_lr_scale=0.1)
    scaled.__dict__["_trainer"] = SimpleNamespace(estimated_stepping_batches=10)
    groups = scaled.configure_optimizers()["optimizer"].param_groups
    by_param = {id(p): group["initial_lr"] for group in groups for p in group["params"]}
    names = dict(scaled.policy.named_parameters())
    projector_lrs = [by_param[id(p)] for n, p in names.items() if n.startswith(projector)]
    assert projector_lrs and projector_lrs == pytest.approx([1e-4] * len(projector_lrs))
    assert {by_param[id(p)] for n, p in names.items() if p.requires_grad and not n.startswith(projector)} == {1e-3}

    frozen = SFTModule(str(tiny_models["llava"]), lora=False, projector_lr_scale=0.0)
    before = {name: p.detach().clone() for name, p in frozen.policy.named_parameters()}
    assert not any(p.requires_grad for n, p in frozen.policy.named_parameters() if n.startswith(projector))
    batch = SFTCollator(frozen.processor)(samples(write_sft_world(tmp_path / "world")))
    optimizer = torch.optim.AdamW([p for p in frozen.policy.parameters() if p.requires_grad], lr=1e-3)
    frozen.sft_step(batch)["loss"].backward()
    optimizer.step()
    changed = {name for name, p in frozen.policy.named_parameters() if not torch.equal(p, before[name])}
    assert "lm_head.weight" in changed and not any(n.startswith(projector) for n in changed)
    with pytest.raises(ValueError, match="projector_lr_scale"):
        SFTModule(str(tiny_models["llava"]), lora=False, projector_lr_scale=-1.0)
