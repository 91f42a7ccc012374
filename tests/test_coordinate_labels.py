"""Coordinate soft labels: the Gaussian targets by hand, the loss against -sum q log p over the whole vocabulary,
one-hot behaviour for every other token, and SFT steps on a saved small LLaVA that move probability mass onto the
bins next to the written one."""

import math

import pytest
import torch
from PIL import Image

from datamodules.sft import SFTCollator
from spr_lightning.coordinate_labels import coordinate_targets, soft_target_logits
from spr_lightning.grounding_attention import location_token_values
from spr_lightning.sft import SFTModule, answer_token_stats
from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, build_small_llava

# A 10-token vocabulary whose ids 7, 3, 5, 8 are the bins <0>..<3> (deliberately out of order).
VALUES = torch.tensor([-1, -1, -1, 1, -1, 2, -1, 0, 3, -1])


def test_kernel_rows_are_truncated_normalised_gaussians_by_hand():
    soft = coordinate_targets(VALUES, sigma=1.0)
    assert soft.location_ids.tolist() == [7, 3, 5, 8]
    g = [math.exp(-0.5 * d * d) for d in range(4)]
    row0 = torch.tensor(g) / sum(g)
    row1 = torch.tensor([g[1], g[0], g[1], g[2]]) / (g[0] + 2 * g[1] + g[2])
    assert torch.allclose(soft.kernel[0], row0, atol=1e-6) and torch.allclose(soft.kernel[1], row1, atol=1e-6)
    assert torch.allclose(soft.kernel.sum(1), torch.ones(4))


def test_soft_cross_entropy_is_minus_sum_q_log_p_over_the_vocabulary():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 10), torch.tensor([5, 0, 8, 9])  # bin 2, plain, bin 3, plain
    soft = coordinate_targets(VALUES, sigma=0.8)
    loss = torch.logsumexp(logits, -1) - soft_target_logits(logits, targets, soft)
    q = torch.nn.functional.one_hot(targets, 10).float()
    for row, token in enumerate(targets.tolist()):
        if VALUES[token] >= 0:
            q[row] = 0.0
            q[row, soft.location_ids] = soft.kernel[VALUES[token]]
    expected = -(q * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(loss, expected, atol=1e-5)
    # Non-coordinate targets are untouched: plain cross-entropy there.
    plain = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(loss[[1, 3]], plain[[1, 3]], atol=1e-6)
    assert not torch.allclose(loss[[0, 2]], plain[[0, 2]], atol=1e-3)


def test_a_narrow_gaussian_is_plain_cross_entropy_and_bad_inputs_are_refused():
    torch.manual_seed(1)
    logits, targets = torch.randn(3, 10), torch.tensor([7, 3, 2])
    narrow = coordinate_targets(VALUES, sigma=0.05)
    assert torch.allclose(torch.logsumexp(logits, -1) - soft_target_logits(logits, targets, narrow),
                          torch.nn.functional.cross_entropy(logits, targets, reduction="none"), atol=1e-5)
    assert torch.equal(soft_target_logits(logits, targets, None), logits.gather(1, targets[:, None]).squeeze(1))
    with pytest.raises(ValueError, match="sigma"):
        coordinate_targets(VALUES, sigma=0.0)
    with pytest.raises(ValueError, match="one token per bin"):
        coordinate_targets(torch.tensor([0, 2, -1]), sigma=1.0)  # bin 1 missing


def test_answer_token_stats_soft_gradient_matches_autograd_of_the_formula():
    torch.manual_seed(2)
    head = torch.nn.Linear(6, 10, bias=False)
    hidden = torch.randn(1, 5, 6, requires_grad=True)
    labels = torch.tensor([[-100, 7, 3, 1, 8]])
    soft = coordinate_targets(VALUES, sigma=1.0)
    nll, correct, count = answer_token_stats(hidden, head, labels, chunk_size=2, coordinate_soft_targets=soft)
    logits = head(hidden[0, :-1]).float()
    targets = labels[0, 1:]
    q = torch.zeros(4, 10)
    for row, token in enumerate(targets.tolist()):
        if VALUES[token] >= 0:
            q[row, soft.location_ids] = soft.kernel[VALUES[token]]
        else:
            q[row, token] = 1.0
    expected = -(q * logits.log_softmax(-1)).sum()
    assert torch.allclose(nll, expected, atol=1e-5) and int(count) == 4
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    (grad,) = torch.autograd.grad(nll, hidden)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert torch.allclose(grad, expected_grad, atol=1e-5)


@pytest.fixture(scope="module")
def small_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords")
    return build_small_llava(root / "model", image_size=32, patch_size=8, vision_hidden=32, vision_layers=1,
                             text_hidden=64, text_layers=2, location_tokens=MINIGPT_V2_TOKENS)


def _neighbour_mass(module, batch, written: int) -> float:
    """Probability the model gives the two bins next to ``written`` at the first coordinate of the answer."""
    base = module.base_model.eval()
    inputs = {k: v for k, v in batch.items() if k not in ("keys", "labels")}
    with torch.no_grad():
        logits = base(**inputs).logits[0]
    first = int((batch["labels"][0] != -100).nonzero()[0, 0]) + 1  # "{" is the first answer token
    values = location_token_values(module.processor.tokenizer)
    ids = {int(v): i for i, v in enumerate(values.tolist()) if v >= 0}
    probs = logits[first - 1].softmax(-1)
    base.train()
    return float(probs[ids[written - 1]] + probs[ids[written + 1]])


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_sft_steps_with_soft_labels_put_mass_on_the_neighbouring_bins(small_llava, sigma):
    torch.manual_seed(0)
    module = SFTModule(str(small_llava), lora=False, lr=3e-3, coordinate_label_sigma=sigma)
    sample = {"key": "rec", "prompt": "Where is the star?", "image": Image.new("RGB", (64, 64), "gray"),
              "answer": "{<40><30><60><50>}"}
    batch = SFTCollator(module.processor)([sample])
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        module.sft_step(batch)["loss"].backward()
        optimizer.step()
    mass = _neighbour_mass(module, batch, 40)
    # One-hot SFT drives the neighbours to nothing; sigma 2 tends to 2 * N(1; 0, 2) / sum = 0.35 there.
    assert (mass < 0.05) if sigma == 0 else (0.2 < mass < 0.5), mass


def test_sigma_is_checked_and_needs_location_tokens(small_llava, tiny_models):
    with pytest.raises(ValueError, match="coordinate_label_sigma"):
        SFTModule(str(small_llava), lora=False, coordinate_label_sigma=-1.0)
    with pytest.raises(ValueError, match="coordinate_label_sigma=1.0 on .*location tokens"):
        SFTModule(str(tiny_models["llava"]), coordinate_label_sigma=1.0)


def test_coordinate_label_start_trains_one_hot_until_its_share_of_steps(small_llava):
    from types import SimpleNamespace

    sample = {"key": "rec", "prompt": "Where is the star?", "image": Image.new("RGB", (64, 64), "gray"),
              "answer": "{<40><30><60><50>}"}
    losses = {}
    for name, kwargs in {"one_hot": {}, "soft": {"coordinate_label_sigma": 2.0},
                         "late": {"coordinate_label_sigma": 2.0, "coordinate_label_start": 0.5}}.items():
        torch.manual_seed(0)  # the same weights in every module (lora=False: no random adapter)
        module = SFTModule(str(small_llava), lora=False, **kwargs)
        batch = SFTCollator(module.processor)([sample])
        module._trainer = SimpleNamespace(global_step=4, estimated_stepping_batches=10)
        with torch.no_grad():
            before = module.sft_step(batch)["loss"].item()
            module._trainer.global_step = 5
            losses[name] = (before, module.sft_step(batch)["loss"].item())
    one_hot, soft = losses["one_hot"][0], losses["soft"][0]
    assert abs(one_hot - soft) > 1e-3  # the two targets give different losses on these weights
    assert losses["late"][0] == pytest.approx(one_hot, rel=1e-6)
    assert losses["late"][1] == pytest.approx(soft, rel=1e-6)


def test_coordinate_label_start_is_checked(small_llava):
    with pytest.raises(ValueError, match="coordinate_label_start must be in"):
        SFTModule(str(small_llava), lora=False, coordinate_label_sigma=1.0, coordinate_label_start=1.0)
    with pytest.raises(ValueError, match="set coordinate_label_sigma > 0"):
        SFTModule(str(small_llava), lora=False, coordinate_label_start=0.5)
