"""Grounding attention: patch cover and box positions by hand, the loss against its formula, and an SFT step on a
saved small LLaVA whose supervised head learns to look where the box is."""

import math

import pytest
import torch
from PIL import Image

from datamodules.sft import SFTCollator
from spr_lightning.grounding_attention import (
    BoxQuery,
    box_queries,
    covered_patches,
    grounding_attention_loss,
    location_token_values,
    phrase_positions,
    phrase_token_ids,
)
from spr_lightning.sft import SFTModule
from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, build_small_llava


def test_covered_patches_by_hand():
    # 4x4 grid: centres at 0.125, 0.375, 0.625, 0.875.
    assert covered_patches((0.0, 0.0, 0.5, 0.5), 4).tolist() == [0, 1, 4, 5]
    assert covered_patches((0.3, 0.6, 0.9, 0.7), 4).tolist() == [9, 10, 11]
    # Smaller than a patch and between centres: the patch under its centre.
    assert covered_patches((0.51, 0.76, 0.6, 0.8), 4).tolist() == [14]
    # Thin in x only: the column under the centre, every row it covers.
    assert covered_patches((0.26, 0.1, 0.3, 0.4), 4).tolist() == [1, 5]


@pytest.fixture(scope="module")
def small_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("ga")
    model_dir = build_small_llava(root / "model", image_size=32, patch_size=8, vision_hidden=32, vision_layers=1,
                                  text_hidden=64, text_layers=2, location_tokens=MINIGPT_V2_TOKENS)
    image = Image.new("RGB", (64, 64), "gray")
    return model_dir, image


def _batch(model_dir, image):
    module = SFTModule(str(model_dir), lora=False, lr=3e-3, grounding_attention_weight=1.0)
    samples = [
        {"key": "region", "prompt": "Describe the region.", "image": image,
         "answer": "<p>a red circle</p> {<0><0><50><50>} and <p>a blue star</p> {<60><70><90><95>}"},
        {"key": "rec", "prompt": "Where is the star?", "image": image, "answer": "{<30><30><40><40>}"},
    ]
    return module, SFTCollator(module.processor)(samples)


def test_box_queries_find_each_box_and_the_position_before_it(small_llava):
    module, batch = _batch(*small_llava)
    values = location_token_values(module.processor.tokenizer)
    assert int((values >= 0).sum()) == 101
    queries = box_queries(batch["input_ids"], batch["labels"], module.base_model.config.image_token_id, values)
    assert [q.row for q in queries] == [0, 0, 1]
    image_positions = (batch["input_ids"][0] == module.base_model.config.image_token_id).nonzero().flatten()
    assert len(image_positions) == 16  # 4x4 patches
    for query, first in zip(queries, [0, 60, 30]):
        # The query position's next token is the box's first coordinate.
        assert int(values[batch["input_ids"][query.row, query.query + 1]]) == first
    # <0><0><50><50>: centres 0.125 and 0.375 in both axes -> patches 0, 1, 4, 5.
    assert queries[0].targets.tolist() == image_positions[[0, 1, 4, 5]].tolist()
    # <60><70><90><95>: columns at 0.625, 0.875; rows at 0.875 -> patches 14, 15.
    assert queries[1].targets.tolist() == image_positions[[14, 15]].tolist()
    # <30><30><40><40> holds no centre: the patch under (0.35, 0.35) -> patch 5.
    assert queries[2].targets.tolist() == image_positions[[5]].tolist()


def test_every_coordinate_adds_the_three_following_positions(small_llava):
    module, batch = _batch(*small_llava)
    values = location_token_values(module.processor.tokenizer)
    image_token_id = module.base_model.config.image_token_id
    first = box_queries(batch["input_ids"], batch["labels"], image_token_id, values)
    every = box_queries(batch["input_ids"], batch["labels"], image_token_id, values, every_coordinate=True)
    assert len(every) == 4 * len(first)
    for index, query in enumerate(first):
        group = every[4 * index : 4 * index + 4]
        assert [q.query for q in group] == [query.query + k for k in range(4)]
        assert all(q.row == query.row and q.targets.tolist() == query.targets.tolist() for q in group)
        # Each of them predicts a location token.
        assert all(int(values[batch["input_ids"][q.row, q.query + 1]]) >= 0 for q in group)


def test_phrase_positions_by_hand():
    # ids: <p>=1, </p>=2, "{"=3, a location token=9, IGNORE=-100; the box starts at index 7.
    labels = torch.tensor([-100, -100, 1, 5, 6, 2, 3, 9, 9, 9, 9])
    # <p> at 2 predicts word 5, 3 predicts 6, 4 predicts </p>.
    assert phrase_positions(labels, 7, (1, 2)) == [2, 3, 4]
    # No </p> just before the box (a REC answer): nothing.
    assert phrase_positions(torch.tensor([-100, 3, 9, 9, 9, 9]), 2, (1, 2)) == []
    # A </p> whose <p> lies in the prompt (ignored) does not count.
    assert phrase_positions(torch.tensor([-100, 5, 2, 3, 9, 9, 9, 9]), 4, (1, 2)) == []
    # The </p> too far before the box: not this box's phrase.
    assert phrase_positions(torch.tensor([1, 5, 2, 7, 7, 7, 7, 7, 9, 9, 9, 9]), 8, (1, 2)) == []


def test_phrase_queries_cover_each_phrase_with_its_box_patches(small_llava):
    module, batch = _batch(*small_llava)
    tokenizer = module.processor.tokenizer
    values = location_token_values(tokenizer)
    image_token_id = module.base_model.config.image_token_id
    phrase_ids = phrase_token_ids(tokenizer)
    boxes = box_queries(batch["input_ids"], batch["labels"], image_token_id, values)
    queries = box_queries(batch["input_ids"], batch["labels"], image_token_id, values, phrase_ids=phrase_ids)
    box_positions = {(q.row, q.query) for q in boxes}
    phrase_queries = [q for q in queries if (q.row, q.query) not in box_positions]
    assert len(phrase_queries) > 0 and all(q.row == 0 for q in phrase_queries)  # the REC answer has no phrase
    ids = batch["input_ids"][0]
    for box, phrase in zip(boxes[:2], ["a red circle", "a blue star"]):
        mine = [q for q in phrase_queries if q.targets.tolist() == box.targets.tolist()]
        # From <p> to the token before </p>: together they predict the phrase and its closing tag.
        assert int(ids[mine[0].query]) == phrase_ids[0]
        assert int(ids[mine[-1].query + 1]) == phrase_ids[1]
        assert tokenizer.decode(ids[mine[0].query + 1 : mine[-1].query + 1]).strip() == phrase
        assert [q.query for q in mine] == list(range(mine[0].query, mine[-1].query + 1))


def test_a_tokenizer_that_splits_the_phrase_tags_is_refused():
    class Splitting:
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [1] * len(text)})()

    with pytest.raises(ValueError, match="as one token"):
        phrase_token_ids(Splitting())


def test_loss_is_mean_negative_log_mass_on_the_targets():
    attention = torch.full((1, 2, 4, 4), 0.25)
    attention[0, 0, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    queries = [BoxQuery(0, 3, torch.tensor([1, 3])), BoxQuery(0, 2, torch.tensor([0]))]
    expected = -(math.log(0.6) + math.log(0.25)) / 2
    assert grounding_attention_loss(attention, queries, head=0).item() == pytest.approx(expected)
    assert grounding_attention_loss(attention, queries, head=1).item() == pytest.approx(-math.log(0.5 * 0.25) / 2)
    assert grounding_attention_loss(attention, [], head=0).item() == 0.0


def test_batched_loss_matches_query_by_query_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 2, 9, 9, generator=generator).softmax(-1).requires_grad_(True)
    queries = [BoxQuery(row, int(torch.randint(9, (1,), generator=generator)),
                        torch.randperm(9, generator=generator)[: int(torch.randint(1, 5, (1,), generator=generator))])
               for row in (0, 0, 1, 2, 2, 2)]
    reference = -torch.log(torch.stack([attention[q.row, 1, q.query, q.targets].sum() for q in queries])).mean()
    (expected,) = torch.autograd.grad(reference, attention)
    loss = grounding_attention_loss(attention, queries, head=1)
    (got,) = torch.autograd.grad(loss, attention)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(got, expected, atol=1e-6) and got.abs().sum() > 0


def test_a_tokenizer_without_location_tokens_is_refused():
    class Plain:
        def __len__(self):
            return 3

        def get_vocab(self):
            return {"a": 0, "<1>": 1, "b": 2}

    with pytest.raises(ValueError, match="location tokens"):
        location_token_values(Plain())


def test_sft_steps_raise_the_attention_mass_on_the_boxes(small_llava):
    torch.manual_seed(0)
    module, batch = _batch(*small_llava)
    inputs = {k: v for k, v in batch.items() if k != "keys"}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    first = module.sft_step(inputs | {"keys": batch["keys"]})
    assert set(first) >= {"loss", "grounding_attention"}
    assert first["loss"].item() > first["grounding_attention"].item() > 0
    for _ in range(30):
        stats = module.sft_step(inputs | {"keys": batch["keys"]})
        optimizer.zero_grad()
        stats["loss"].backward()
        optimizer.step()
    last = module.sft_step(inputs | {"keys": batch["keys"]})
    # Mass on the boxes' patches: from about 16/(16 + text) of the image share to most of it.
    assert last["grounding_attention"].item() < 0.5 * first["grounding_attention"].item()
    assert math.exp(-last["grounding_attention"].item()) > 0.5


def test_weight_zero_is_plain_sft(small_llava):
    model_dir, image = small_llava
    module = SFTModule(str(model_dir), lora=False)
    sample = {"key": "a", "prompt": "Where?", "image": image, "answer": "{<1><2><3><4>}"}
    batch = SFTCollator(module.processor)([sample])
    assert "grounding_attention" not in module.sft_step(batch)
    with pytest.raises(ValueError, match="grounding_attention_weight"):
        SFTModule(str(model_dir), grounding_attention_weight=-1.0)


def test_grounding_attention_start_switches_the_loss_on_after_its_share_of_steps(small_llava):
    from types import SimpleNamespace

    model_dir, image = small_llava
    module = SFTModule(str(model_dir), lora=False, grounding_attention_weight=1.0, grounding_attention_start=0.5)
    batch = SFTCollator(module.processor)([{"key": "a", "prompt": "Where?", "image": image,
                                            "answer": "{<1><2><30><40>}"}])
    module._trainer = SimpleNamespace(global_step=4, estimated_stepping_batches=10)
    assert "grounding_attention" not in module.sft_step(batch)
    module._trainer.global_step = 5
    assert module.sft_step(batch)["grounding_attention"].item() > 0
    with pytest.raises(ValueError, match="grounding_attention_start"):
        SFTModule(str(model_dir), grounding_attention_start=1.0)


def test_phrase_supervision_adds_the_phrase_positions_to_the_loss(small_llava):
    model_dir, image = small_llava
    module = SFTModule(str(model_dir), lora=False, grounding_attention_weight=1.0, grounding_attention_phrase=True)
    batch = SFTCollator(module.processor)([{"key": "a", "prompt": "Describe.", "image": image,
                                            "answer": "<p>a red circle</p> {<0><0><50><50>}"}])
    base = module.base_model
    with torch.no_grad():
        got = module.sft_step(batch)["grounding_attention"]
        inputs = {k: v for k, v in batch.items() if k not in ("keys", "labels")}
        attention = base.model(**inputs, use_cache=False, output_attentions=True).attentions[-1]
    values = location_token_values(module.processor.tokenizer)
    queries = box_queries(batch["input_ids"], batch["labels"], base.config.image_token_id, values,
                          phrase_ids=phrase_token_ids(module.processor.tokenizer))
    assert len(queries) > 1
    assert got.item() == pytest.approx(grounding_attention_loss(attention, queries).item(), rel=1e-5)
    box_only = box_queries(batch["input_ids"], batch["labels"], base.config.image_token_id, values)
    assert got.item() != pytest.approx(grounding_attention_loss(attention, box_only).item(), rel=1e-3)
