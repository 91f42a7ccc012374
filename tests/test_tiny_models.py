"""Tiny model families: saved folders load through the real loaders and reproduce the in-memory models exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
    GroundingDinoForObjectDetection,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from spr_lightning.tiny import (
    TINY_OPEN_CLIP_NAME,
    load_tiny_open_clip,
    make_tiny_grounding_dino,
    make_tiny_llava,
    make_tiny_open_clip,
    make_tiny_qwen2_5_vl,
    register_tiny_open_clip,
    resolve_model_path,
)
from spr_lightning.tiny import build as tiny_build
from spr_lightning.tiny._common import dir_size_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
COORD_TEXTS = [
    "[0.12, 0.34, 0.56, 0.78]",
    "[12, 345, 678, 999]",
    '{"bbox_2d": [10, 20, 630, 470], "label": "red car"}',
    "The dog (41,7),(300,220) is left of the café ☃.",
]


def _image(width: int = 40, height: int = 30) -> Image.Image:
    """A non-constant RGB image, so vision towers see structure rather than a flat colour."""
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    pixels = torch.stack([x, y, (x + y) / 2], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": text}]}]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- LLaVA -------------------------------------------------------------------------------------------------------


def test_llava_loads_with_auto_classes_and_reproduces_logits_exactly(tiny_models: dict) -> None:
    path = tiny_models["llava"]
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(loaded, LlavaForConditionalGeneration)
    inputs = processor.apply_chat_template(
        _user_turn("Where is the dog?"),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    # (32 / 8)^2 patches + CLS - CLS ("default" strategy) = 16 placeholders, one per projected patch feature.
    assert int((inputs["input_ids"] == loaded.config.image_token_id).sum()) == 16
    assert int((inputs["input_ids"] == processor.tokenizer.bos_token_id).sum()) == 1
    reference, _ = make_tiny_llava(seed=0)
    with torch.no_grad():
        got, want = loaded(**inputs).logits, reference(**inputs).logits
    assert got.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.equal(got, want)


def test_llava_generates_from_image_and_prompt_through_chat_template(tiny_models: dict) -> None:
    path = tiny_models["llava"]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(_user_turn("Describe the region."), add_generation_prompt=True)
    assert prompt == "<s>USER: <image>\nDescribe the region.\nASSISTANT:"
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape == (4,)
    reference, _ = make_tiny_llava(seed=0)
    again = reference.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out, again)  # greedy decoding of identical weights
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_llava_chat_template_marks_exactly_the_assistant_completion(tiny_models: dict) -> None:
    processor = AutoProcessor.from_pretrained(tiny_models["llava"])
    tokenizer = processor.tokenizer
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": COORD_TEXTS[0]}]},
    ]
    prompt = tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    assert full.startswith(prompt)
    enc = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [tok for tok, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == " " + COORD_TEXTS[0] + tokenizer.eos_token


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("text", COORD_TEXTS)
def test_bpe_tokenizers_round_trip_coordinates(tiny_models: dict, family: str, text: str) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_models[family]).tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    digits = [t for t in tokenizer.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert all(len(t) == 1 for t in digits), digits  # one token per digit, as Llama / Qwen tokenize numbers


# --- Qwen2.5-VL --------------------------------------------------------------------------------------------------


def test_qwen2_5_vl_forward_with_image_matches_in_memory_model(tiny_models: dict) -> None:
    path = tiny_models["qwen2_5_vl"]
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(loaded, Qwen2_5_VLForConditionalGeneration)
    assert processor.video_processor is not None
    inputs = processor.apply_chat_template(
        _user_turn("Locate the dog."),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    grid = inputs["image_grid_thw"][0]
    # 40x30 px is below min_pixels, so it is upscaled to a 28 px multiple: 2x2 merged tokens at least.
    assert int(grid.prod()) // 4 == int((inputs["input_ids"] == loaded.config.image_token_id).sum()) >= 4
    reference, _ = make_tiny_qwen2_5_vl(seed=0)
    with torch.no_grad():
        got, want = loaded(**inputs).logits, reference(**inputs).logits
    assert got.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


def test_qwen_special_tokens_follow_the_bpe_vocab_in_qwen_order(tiny_models: dict) -> None:
    path = tiny_models["qwen2_5_vl"]
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    ids = tok.convert_tokens_to_ids(names)
    assert ids[:3] == [ids[0], ids[0] + 1, ids[0] + 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    config = AutoModelForImageTextToText.from_pretrained(path).config
    assert (config.vision_start_token_id, config.vision_end_token_id, config.image_token_id) == tuple(ids[3:])
    text = processor.apply_chat_template(_user_turn("hi"), add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


# --- open_clip ---------------------------------------------------------------------------------------------------


def test_open_clip_loads_through_factory_and_matches_in_memory_model(tiny_models: dict) -> None:
    model, preprocess, tokenizer = load_tiny_open_clip(tiny_models["open_clip"])
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    assert os.path.isfile(open_clip.tokenizer.default_bpe())  # BPE vocab ships inside the wheel: no download
    assert model.visual.pool_type == "tok" and model.visual.attn_pool is None  # class-token pooling
    image = preprocess(_image()).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    text = tokenizer(["a red car", "the dog on the left"])
    reference = make_tiny_open_clip(seed=0)
    with torch.no_grad():
        assert torch.equal(model.encode_image(image), reference.encode_image(image))
        assert torch.equal(model.encode_text(text), reference.encode_text(text))
        by_folder, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(tiny_models["open_clip"]))
        assert torch.equal(by_folder.eval().encode_image(image), reference.encode_image(image))


def test_register_tiny_open_clip_is_idempotent() -> None:
    assert register_tiny_open_clip() == TINY_OPEN_CLIP_NAME
    paths_before = list(open_clip.factory._MODEL_CONFIG_PATHS)
    assert register_tiny_open_clip() == TINY_OPEN_CLIP_NAME
    assert open_clip.factory._MODEL_CONFIG_PATHS == paths_before
    assert open_clip.list_models().count(TINY_OPEN_CLIP_NAME) == 1


# --- GroundingDINO -----------------------------------------------------------------------------------------------


def test_grounding_dino_round_trip_and_post_processing(tiny_models: dict) -> None:
    path = tiny_models["grounding_dino"]
    loaded = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(loaded, GroundingDinoForObjectDetection)
    image = _image(120, 80)
    inputs = processor(images=image, text=[["a dog", "a red car"]], return_tensors="pt")
    reference, _ = make_tiny_grounding_dino(seed=0)
    with torch.no_grad():
        got, want = loaded(**inputs), reference(**inputs)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.pred_boxes, want.pred_boxes)
    results = processor.post_process_grounded_object_detection(
        got, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(80, 120)]
    )
    boxes = results[0]["boxes"]
    assert boxes.shape == (loaded.config.num_queries, 4)
    assert len(results[0]["scores"]) == len(results[0]["text_labels"]) == loaded.config.num_queries
    centers_x, centers_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    assert bool(((centers_x >= 0) & (centers_x <= 120) & (centers_y >= 0) & (centers_y <= 80)).all())


def test_grounding_dino_tokenizer_has_the_bert_ids_the_model_hard_codes(tiny_models: dict) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_models["grounding_dino"]).tokenizer
    expected = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    ids = tokenizer("A dog. Where is the zebra?")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and 1012 in ids and 1029 in ids
    assert 100 not in ids  # lower-cased words and ## pieces cover ordinary English


# --- determinism, size, cache, CLI -------------------------------------------------------------------------------


def _make_model(make, seed: int) -> torch.nn.Module:
    built = make(seed=seed)
    return built[0] if isinstance(built, tuple) else built


@pytest.mark.parametrize("make", [make_tiny_llava, make_tiny_qwen2_5_vl, make_tiny_open_clip, make_tiny_grounding_dino])
def test_same_seed_same_weights_other_seed_other_weights(make) -> None:
    first, second = _state(_make_model(make, 0)), _state(_make_model(make, 0))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = _state(_make_model(make, 1))
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_rebuilding_writes_identical_files(tiny_models: dict, tmp_path: Path) -> None:
    for name in ("llava", "qwen2_5_vl"):
        rebuilt = tiny_build.BUILDERS[name](tmp_path / name, seed=0)
        for file in ("model.safetensors", "tokenizer.json"):
            assert (rebuilt / file).read_bytes() == (tiny_models[name] / file).read_bytes(), (name, file)


def test_all_families_built_and_small(tiny_models: dict) -> None:
    assert set(tiny_models) == {"llava", "qwen2_5_vl", "open_clip", "grounding_dino"}
    total = sum(dir_size_bytes(path) for path in tiny_models.values())
    assert 0 < total < 60e6


def test_resolve_model_path_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = tiny_build.BUILDERS["grounding_dino"]
    monkeypatch.setitem(
        tiny_build.BUILDERS, "grounding_dino", lambda out, seed: calls.append(seed) or real(out, seed=seed)
    )
    first = resolve_model_path("tiny:grounding_dino", tmp_path)
    second = resolve_model_path("tiny:grounding_dino", tmp_path)
    assert first == second and calls == [0]
    assert isinstance(AutoModelForZeroShotObjectDetection.from_pretrained(first), GroundingDinoForObjectDetection)
    assert [p.name for p in Path(first).parent.iterdir()] == ["grounding_dino"]  # no staging folders left


def test_resolve_model_path_real_llava_and_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPR_TINY_CACHE", str(tmp_path))
    path = resolve_model_path("tiny:llava")
    assert Path(path).is_relative_to(tmp_path) and resolve_model_path("tiny:llava") == path
    assert isinstance(AutoModelForImageTextToText.from_pretrained(path), LlavaForConditionalGeneration)


def test_resolve_model_path_passes_other_specs_through_and_rejects_unknown_tiny() -> None:
    assert resolve_model_path("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_model_path("/data/models/qwen") == "/data/models/qwen"
    with pytest.raises(ValueError, match="unknown tiny model"):
        resolve_model_path("tiny:gpt5")


def test_resolve_model_path_loses_a_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishing first (the target appears mid-build) wins; our staging copy is discarded."""
    target = tmp_path / f"seed0-v{tiny_build.TINY_RECIPE_VERSION}" / "open_clip"
    real = tiny_build.BUILDERS["open_clip"]

    def build_while_other_rank_finishes(out: Path, seed: int) -> Path:
        real(target, seed=seed)
        (target / "winner.txt").write_text("other rank")
        return real(out, seed=seed)

    monkeypatch.setitem(tiny_build.BUILDERS, "open_clip", build_while_other_rank_finishes)
    assert resolve_model_path("tiny:open_clip", tmp_path) == str(target)
    assert (target / "winner.txt").read_text() == "other rank"
    assert [p.name for p in target.parent.iterdir()] == ["open_clip"]


def test_cli_builds_and_reports_sizes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "spr_lightning.tiny", str(tmp_path), "--seed", "3", "--only", "grounding_dino"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"grounding_dino  {tmp_path / 'grounding_dino'}" in proc.stdout and "MB" in proc.stdout
    assert (tmp_path / "grounding_dino" / "model.safetensors").is_file()
    assert not (tmp_path / "llava").exists()
