"""token_variance: the variance share by hand, and the CLI on a saved small LLaVA and a generated SPR-Shapes split."""

import json

import pytest
import torch

from spr_lightning.experiments.token_variance import LABELS, main, variance_explained
from spr_lightning.shapes.writer import write_world
from spr_lightning.tiny.small_llava import build_small_llava


def test_variance_explained_by_hand():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    # Mean (1, 1.5); total sum of squares 17; group means (2, 0) and (0, 3): between 2 * 3.25 + 2 * 3.25 = 13.
    assert variance_explained(features, ["a", "a", "b", "b"]) == pytest.approx(13 / 17)
    assert variance_explained(features, ["a", "b", "c", "d"]) == pytest.approx(1.0)  # every row its own group
    assert variance_explained(features, ["a"] * 4) == pytest.approx(0.0)
    assert variance_explained(torch.ones(3, 2), ["a", "b", "b"]) == 0.0  # no variance at all
    with pytest.raises(ValueError, match="labels"):
        variance_explained(features, ["a"])


def test_cli_on_a_saved_small_llava(tmp_path, capsys):
    world = write_world(tmp_path / "world", {"test": 3}, seed=1)
    model = build_small_llava(tmp_path / "model", image_size=32, patch_size=16, vision_hidden=32, vision_layers=1,
                              text_hidden=64, text_layers=1)
    out = tmp_path / "variance.json"
    result = main([str(model), str(world.detection["test"]), str(world.image_root), "--out", str(out)])
    objects = sum(1 for a in json.loads(world.detection["test"].read_text())["annotations"])
    assert result["objects"] == objects > 8
    for stage in ("tower", "projector"):
        assert set(result[stage]) == set(LABELS) and all(0.0 <= v <= 1.0 + 1e-9 for v in result[stage].values())
    # 2 x 2 patches: the cell label has at most 4 groups, and it explains something of a random tower's tokens.
    assert result["tower"]["cell"] > 0.0
    written = json.loads(out.read_text())
    assert written["objects"] == objects and written["tower"] == pytest.approx(result["tower"])
    assert "projector" in capsys.readouterr().out
