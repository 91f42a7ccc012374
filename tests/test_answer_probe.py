"""answer_probe: token kinds by hand, the per-kind bookkeeping against a model whose right answers are known, and
the CLI on a saved small LLaVA."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from spr_lightning.experiments.answer_probe import answer_probe, main, select_samples, token_kinds
from spr_lightning.models import load_processor
from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, build_small_llava

ANSWERS = ["<p>a small red circle</p> {<10><20><30><40>}", "<p>a large blue star</p> {<50><5><70><25>}"]


def test_token_kinds_by_hand():
    assert token_kinds(" red") == ("colour",)
    assert token_kinds("Ġdiamond".replace("Ġ", " ")) == ("shape",)
    assert token_kinds(" red diamond") == ("colour", "shape")  # a merged token counts for both
    assert token_kinds("small ") == ("size",)
    assert token_kinds("<42>") == ("coord",) and token_kinds("7") == ("coord",)
    assert token_kinds("</p>") == ("other",) and token_kinds(" {") == ("other",)
    assert token_kinds(" reddish") == ("other",)  # whole words only


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """A saved small LLaVA (MiniGPT-v2 location tokens) and an SFT file of two region and one REC sample."""
    root = tmp_path_factory.mktemp("probe")
    model_dir = build_small_llava(root / "model", image_size=32, patch_size=16, vision_hidden=32, vision_layers=1,
                                  text_hidden=64, text_layers=1, location_tokens=MINIGPT_V2_TOKENS)
    Image.new("RGB", (64, 64), "gray").save(root / "a.png")
    lines = [{"id": f"r{i}", "image": "a.png", "task": "region", "prompt": "Describe the region {<0><0><99><99>}.",
              "answer": answer} for i, answer in enumerate(ANSWERS)]
    lines.append({"id": "q", "image": "a.png", "task": "rec", "prompt": "Where is the red circle?",
                  "answer": "{<10><20><30><40>}"})
    jsonl = root / "sft.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return model_dir, jsonl


class CoordOracle(torch.nn.Module):
    """Predicts the next token exactly where it is a coordinate, token 0 everywhere else."""

    def __init__(self, coord_ids: set[int], vocab: int) -> None:
        super().__init__()
        self.coord_ids, self.vocab = coord_ids, vocab

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 0] = 1.0
        following = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        rows, cols = torch.isin(following, torch.tensor(sorted(self.coord_ids))).nonzero(as_tuple=True)
        logits[rows, cols, following[rows, cols]] = 2.0
        return SimpleNamespace(logits=logits)


def test_accuracy_per_kind_matches_a_model_whose_hits_are_known(world):
    model_dir, jsonl = world
    processor = load_processor(str(model_dir))
    coord_ids = set(processor.tokenizer.convert_tokens_to_ids(list(MINIGPT_V2_TOKENS[:101])))
    records = select_samples(jsonl, ["region"], None)
    assert sorted(r["key"] for r in records) == ["r0", "r1"]
    result = answer_probe(CoordOracle(coord_ids, len(processor.tokenizer)), processor, records, batch_size=2)
    assert result["coord"] == {"accuracy": 1.0, "tokens": 8}  # four location tokens per answer, all right
    for kind in ("colour", "shape", "size"):
        assert result[kind]["accuracy"] == 0.0 and result[kind]["tokens"] >= 2, kind
    assert result["other"]["accuracy"] < 0.2  # only the tokens that happen to be id 0


def test_cli_on_a_saved_model_counts_every_answer_token(world, tmp_path, capsys):
    model_dir, jsonl = world
    out = tmp_path / "probe.json"
    result = main([str(model_dir), str(jsonl), "--task", "rec", "--samples", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["coord"]["tokens"] == 4 and 0.0 <= result["coord"]["accuracy"] <= 1.0
    assert "| coord |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no samples with task"):
        select_samples(jsonl, ["phrase"], None)
