"""Shared-prefix DPO forward: same log-probs, loss and LoRA gradients as the concatenated forward, image encoded
once per pair, correct rope positions, and a logged fallback where it can't run."""

import logging

import pytest
import torch
from PIL import Image

from datamodules.collate import PreferenceCollator, pad_sequences
from spr_lightning import shared_prefix
from spr_lightning.dpo import DPOModule, sequence_logps
from spr_lightning.dpo_inputs import concatenated_inputs
from spr_lightning.shared_prefix import completion_positions, prompt_positions, shared_prefix_logps

FAMILIES = ["llava", "qwen2_5_vl"]
CHUNK = 7


def uneven_pairs():
    """Three pairs whose prompts and completions all differ in length, so left and right padding both occur,
    and the rejected completion is longer than the chosen one in one pair."""
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    records = [
        ("Describe region [10, 20, 300, 400].", "A red square [12, 22, 298, 401].", "Nothing."),
        ("Short?", "Yes, a red square [1, 2, 3, 4] on the left side.", "No."),
        ("A much longer prompt with many more words, asking about the region [5, 6, 700, 800] in detail.",
         "Red.", "There is nothing there at all, only a dark background."),
    ]
    return [{"__key__": f"k{i}", "json": {"prompt": p, "chosen": c, "rejected": r}, "jpg": image}
            for i, (p, c, r) in enumerate(records)]


def make_module(path, **kwargs):
    dpo = DPOModule(str(path), lora_r=4, lora_alpha=8, lora_dropout=0.0, **kwargs)
    # A non-zero LoRA B: the adapter then changes the outputs and every LoRA weight gets a gradient.
    torch.manual_seed(0)
    for name, param in dpo.policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return dpo


@pytest.fixture(scope="module", params=FAMILIES)
def module(request, tiny_models):
    dpo = make_module(tiny_models[request.param])
    dpo.family = request.param
    return dpo


@pytest.fixture
def batch(module):
    return PreferenceCollator(module.processor, max_length=None)(uneven_pairs())


def vision_rows(module):
    """A hook list recording how many image rows (LLaVA) / patches (Qwen) each vision-tower call sees."""
    inner = module.policy.get_base_model().model
    tower = inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual
    seen = []
    handle = tower.register_forward_hook(lambda mod, args, kwargs, out: seen.append(
        (args[0] if args else next(iter(kwargs.values()))).shape[0]), with_kwargs=True)
    return seen, handle


def test_batch_really_is_uneven(batch):
    prompt_lengths = batch["prompt_attention_mask"].sum(1)
    assert len(set(prompt_lengths.tolist())) == 3
    assert batch["rejected_attention_mask"].sum(1)[2] > batch["chosen_attention_mask"].sum(1)[2]
    assert batch["chosen_attention_mask"].sum(1)[1] > batch["rejected_attention_mask"].sum(1)[1]


def test_logps_match_concatenated_forward(module, batch):
    module.policy.eval()
    with torch.no_grad():
        expected, expected_counts = sequence_logps(module.policy, concatenated_inputs(batch, module.pad_id), CHUNK)
        logps, counts = shared_prefix_logps(module.policy, batch, module.pad_id, CHUNK)
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)
    assert torch.equal(counts, expected_counts)


def test_loss_and_lora_gradients_match_concatenated_forward(module, batch):
    module.policy.train()
    results = {}
    for mode in ("concat", "shared_prefix"):
        module.hparams.forward_mode = mode
        module.policy.zero_grad(set_to_none=True)
        stats = module.dpo_step(batch)
        stats["loss"].backward()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
        results[mode] = (stats, grads)
    module.hparams.forward_mode = "concat"
    (concat, concat_grads), (shared, shared_grads) = results["concat"], results["shared_prefix"]
    assert concat["loss"].item() != pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        torch.testing.assert_close(shared[key], concat[key], atol=1e-4, rtol=1e-5)
    assert concat_grads.keys() == shared_grads.keys() and len(concat_grads) > 0
    assert all(g.abs().sum() > 0 for g in concat_grads.values())
    for name, grad in concat_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_empty_completion_gives_zero_like_concatenated(module):
    prompt_lengths = PreferenceCollator(module.processor, max_length=None)(uneven_pairs())["prompt_attention_mask"]
    # The longest prompt fills max_length: its completions are cut to nothing.
    batch = PreferenceCollator(module.processor, max_length=int(prompt_lengths.sum(1).max()))(uneven_pairs())
    module.policy.eval()
    with torch.no_grad():
        expected, expected_counts = sequence_logps(module.policy, concatenated_inputs(batch, module.pad_id), CHUNK)
        logps, counts = shared_prefix_logps(module.policy, batch, module.pad_id, CHUNK)
    assert counts[2] == 0 and counts[5] == 0 and logps[2] == 0
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)
    assert torch.equal(counts, expected_counts)


def test_images_are_encoded_once_per_pair(module, batch):
    seen, handle = vision_rows(module)
    try:
        with torch.no_grad():
            shared_prefix_logps(module.policy, batch, module.pad_id, CHUNK)
            sequence_logps(module.policy, concatenated_inputs(batch, module.pad_id), CHUNK)
    finally:
        handle.remove()
    rows = batch["pixel_values"].shape[0]
    assert seen == [rows, 2 * rows]


def test_positions_are_those_of_the_concatenated_rows(module, batch):
    """Prompt and completion positions (1-D for LLaVA, 3-D mrope for Qwen2.5-VL) equal the positions the
    concatenated forward gives the same tokens."""
    inner = module.policy.get_base_model().model
    style = shared_prefix.POSITION_STYLES[module.family]
    images = shared_prefix.image_inputs(batch)
    extras = {key: batch[f"prompt_{key}"] for key in batch["per_token_keys"]}
    positions, next_position = prompt_positions(
        inner, style, batch["prompt_input_ids"], batch["prompt_attention_mask"], images, extras)
    inputs = concatenated_inputs(batch, module.pad_id)
    if style == shared_prefix.MROPE:
        expected, _ = inner.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
        assert positions.shape[0] == 3
        assert (positions[1] != positions[0]).any()  # image tokens really get 2-D positions
    else:
        expected = torch.arange(inputs["input_ids"].shape[1]).expand(inputs["input_ids"].shape[0], -1)
        positions, expected = positions[None], expected[None]
    completions = completion_positions(style, next_position, 5)
    completions = completions if style == shared_prefix.MROPE else completions[None]
    prompt_mask = batch["prompt_attention_mask"].bool()
    for row in range(prompt_mask.shape[0]):
        length = int(prompt_mask[row].sum())
        assert torch.equal(positions[:, row, prompt_mask[row]], expected[:, row, :length])
        assert torch.equal(completions[:, row], expected[:, row, length:length + 5])


def test_unknown_family_falls_back_with_one_warning(module, batch, monkeypatch, caplog):
    monkeypatch.delitem(shared_prefix.POSITION_STYLES, module.family)
    monkeypatch.setattr(shared_prefix, "_warned", set())
    seen, handle = vision_rows(module)
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="spr_lightning.shared_prefix"):
            first, _ = shared_prefix_logps(module.policy, batch, module.pad_id, CHUNK)
            second, _ = shared_prefix_logps(module.policy, batch, module.pad_id, CHUNK)
    finally:
        handle.remove()
    warnings = [r for r in caplog.records if r.name == "spr_lightning.shared_prefix"]
    assert len(warnings) == 1 and "concatenated forward" in warnings[0].getMessage()
    assert module.family in warnings[0].getMessage()
    rows = batch["pixel_values"].shape[0]
    assert seen == [2 * rows, 2 * rows]  # the concatenated forward ran
    with torch.no_grad():
        expected, _ = sequence_logps(module.policy, concatenated_inputs(batch, module.pad_id), CHUNK)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_activation_checkpointing_keeps_the_shared_prefix(tiny_models, monkeypatch, caplog):
    """Checkpointed layers replay their forward in backward: the replay-safe caches give the same loss and LoRA
    gradients as the concatenated forward, and the image is still encoded once per pair."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    module = make_module(tiny_models["llava"], gradient_checkpointing=True)
    module.family = "llava"
    batch = PreferenceCollator(module.processor, max_length=None)(uneven_pairs())
    checkpointed = [m for m in module.policy.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert checkpointed and all(m.gradient_checkpointing for m in checkpointed)
    monkeypatch.setattr(shared_prefix, "_warned", set())
    module.policy.train()
    results = {}
    for mode in ("concat", "shared_prefix"):
        module.hparams.forward_mode = mode
        module.policy.zero_grad(set_to_none=True)
        seen, handle = vision_rows(module)
        try:
            with caplog.at_level(logging.WARNING):
                stats = module.dpo_step(batch)
                stats["loss"].backward()
        finally:
            handle.remove()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
        results[mode] = (stats["loss"], grads, seen)
    rows = batch["pixel_values"].shape[0]
    assert results["concat"][2] == [2 * rows, 2 * rows] and results["shared_prefix"][2] == [rows, rows]
    torch.testing.assert_close(results["shared_prefix"][0], results["concat"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["concat"][1].items():
        torch.testing.assert_close(results["shared_prefix"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert not [r for r in caplog.records if "cache" in r.getMessage().lower()]
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in checkpointed)


def test_forward_mode_is_validated(tiny_models):
    with pytest.raises(ValueError, match="forward_mode"):
        DPOModule(str(tiny_models["llava"]), forward_mode="prefix")


def text_only_batch(vocab_size, pad_id=0):
    """Random token ids: left-padded prompts and right-padded completions of different lengths."""
    generator = torch.Generator().manual_seed(0)
    lengths = [(5, 4, 2), (9, 1, 6), (3, 7, 7)]
    rows = [[torch.randint(5, vocab_size, (n,), generator=generator) for n in row] for row in lengths]
    batch = {"per_token_keys": []}
    for column, (name, side) in enumerate((("prompt", "left"), ("chosen", "right"), ("rejected", "right"))):
        seqs = [row[column] for row in rows]
        batch[f"{name}_input_ids"] = pad_sequences(seqs, pad_id, side)
        batch[f"{name}_attention_mask"] = pad_sequences([torch.ones_like(s) for s in seqs], 0, side)
    return batch


def other_family(model_type):
    """Tiny random LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL built in memory (no processor needed for text)."""
    import transformers as tf

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    if model_type == "llava_next":
        config = tf.LlavaNextConfig(text_config=tf.LlamaConfig(**text).to_dict(),
                                    vision_config=tf.CLIPVisionConfig(**vision).to_dict(), image_token_id=99)
        model_class = tf.LlavaNextForConditionalGeneration
    elif model_type == "llava_onevision":
        config = tf.LlavaOnevisionConfig(text_config=tf.Qwen2Config(**text).to_dict(),
                                         vision_config=tf.SiglipVisionConfig(**vision).to_dict(),
                                         image_token_id=99, video_token_id=98)
        model_class = tf.LlavaOnevisionForConditionalGeneration
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        config = tf.Qwen2VLConfig(text_config=dict(text, rope_parameters=rope),
                                  vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2))
        model_class = tf.Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_class(config).eval()


@pytest.mark.parametrize("model_type", ["llava_next", "llava_onevision", "qwen2_vl"])
def test_other_listed_families_match_on_text(model_type):
    """The families listed without a tiny checkpoint: cache, mask and position handling of their decoders."""
    model = other_family(model_type)
    assert model.config.model_type == model_type and model_type in shared_prefix.POSITION_STYLES
    batch = text_only_batch(90)
    with torch.no_grad():
        expected, expected_counts = sequence_logps(model, concatenated_inputs(batch, 0), CHUNK)
        logps, counts = shared_prefix_logps(model, batch, 0, CHUNK)
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)
    assert torch.equal(counts, expected_counts)
