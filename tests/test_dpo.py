"""DPO stage: LoRA placement, reference = disabled adapter, log-probs vs the model's own logits, collation."""

import pytest
import torch
from PIL import Image

from datamodules.collate import PreferenceCollator
from spr_lightning.dpo import DPOModule, sequence_logps
from spr_lightning.dpo_inputs import concatenated_inputs
from spr_lightning.logprobs import completion_logps_reference
from spr_lightning.models import load_policy

FAMILIES = ["llava", "qwen2_5_vl"]


def pair_samples(n=2):
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    return [{"__key__": f"k{i}", "json": {"prompt": f"Describe region {i} [10, 20, 300, 400].",
                                          "chosen": "A red square [12, 22, 298, 401]." * (i + 1),
                                          "rejected": "Nothing."}, "jpg": image} for i in range(n)]


@pytest.fixture(scope="module", params=FAMILIES)
def module(request, tiny_models):
    dpo = DPOModule(str(tiny_models[request.param]), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    # A non-zero LoRA B so that the adapter changes the outputs.
    torch.manual_seed(0)
    for name, param in dpo.policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    dpo.family = request.param
    return dpo


def test_only_language_model_lora_weights_train(module):
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    vision = [n for n in trainable if "visual" in n or "vision" in n or "projector" in n or "embed" in n]
    assert vision == []


def test_reference_is_the_base_model_exactly(module, tiny_models):
    batch = PreferenceCollator(module.processor, max_length=None)(pair_samples())
    inputs = concatenated_inputs(batch, module.pad_id)
    base = load_policy(str(tiny_models[module.family])).eval()
    with torch.no_grad():
        base_logits = base(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        with module._reference_mode() as reference:
            ref_logits = reference(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        policy_logits = module.policy.eval()(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    assert torch.equal(ref_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits)


def test_sequence_logps_match_full_logits(module):
    batch = PreferenceCollator(module.processor, max_length=None)(pair_samples())
    inputs = concatenated_inputs(batch, module.pad_id)
    module.policy.eval()
    with torch.no_grad():
        logps, counts = sequence_logps(module.policy, inputs, chunk_size=5)
        logits = module.policy(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    ref, ref_counts = completion_logps_reference(logits, inputs["labels"])
    assert torch.allclose(logps, ref, atol=1e-4)
    assert torch.equal(counts, ref_counts)
    # Chosen rows (first half) hold the longer completions.
    assert (counts[:2] > counts[2:]).all()


def test_step_zero_loss_is_ln2_with_fresh_adapter(tiny_models):
    dpo = DPOModule(str(tiny_models["llava"]), lora_r=4, lora_alpha=8)
    batch = PreferenceCollator(dpo.processor, max_length=None)(pair_samples())
    stats = dpo.dpo_step(batch)
    assert stats["loss"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert stats["rewards/chosen"].item() == 0.0


def test_rpo_alpha_adds_the_chosen_nll_per_token(tiny_models):
    plain = DPOModule(str(tiny_models["llava"]), lora_r=4, lora_alpha=8)
    rpo = DPOModule(str(tiny_models["llava"]), lora_r=4, lora_alpha=8, rpo_alpha=0.5)
    batch = PreferenceCollator(plain.processor, max_length=None)(pair_samples())
    with torch.no_grad():
        base, stats = plain.dpo_step(batch), rpo.dpo_step(batch)
        logps, counts = sequence_logps(rpo.policy, concatenated_inputs(batch, rpo.pad_id), chunk_size=64)
    nll = -logps[:2].sum() / counts[:2].sum()  # the chosen rows, per token
    assert "nll_loss" not in base
    assert stats["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert stats["loss"].item() == pytest.approx(base["loss"].item() + 0.5 * nll.item(), rel=1e-5)
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOModule(str(tiny_models["llava"]), lora_r=4, lora_alpha=8, rpo_alpha=-1.0)


def test_precomputed_reference_logps_give_the_same_loss(module):
    collator = PreferenceCollator(module.processor, max_length=None)
    batch = collator(pair_samples())
    module.policy.eval()
    with torch.no_grad():
        on_the_fly = module.dpo_step(batch)
        ref_logps, _ = module.reference_logps(concatenated_inputs(batch, module.pad_id))
        precomputed = dict(batch, ref_chosen_logps=ref_logps[:2], ref_rejected_logps=ref_logps[2:])
        stats = module.dpo_step(precomputed)
    assert stats["loss"].item() == pytest.approx(on_the_fly["loss"].item(), abs=1e-6)


def test_collator_truncates_completions_never_prompts(tiny_models):
    from spr_lightning.models import load_processor

    processor = load_processor(str(tiny_models["llava"]))
    full = PreferenceCollator(processor, max_length=None)(pair_samples(1))
    prompt_len = int(full["prompt_attention_mask"].sum())
    cut = PreferenceCollator(processor, max_length=prompt_len + 3)(pair_samples(1))
    assert torch.equal(cut["prompt_input_ids"], full["prompt_input_ids"])
    assert cut["chosen_attention_mask"].sum() == 3
    assert torch.equal(cut["chosen_input_ids"][0, :3], full["chosen_input_ids"][0, :3])
    with pytest.raises(ValueError, match="'k0'.*max_length"):
        PreferenceCollator(processor, max_length=prompt_len - 1)(pair_samples(1))
