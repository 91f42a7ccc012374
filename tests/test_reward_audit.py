"""reward_audit: every candidate's scores against the annotations, on a hand-worked query."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from test_pair_quality import NOWHERE, RED_ON_BLUE, RED_RIGHT, SIZE, _annotations, _shard

from spr_lightning.experiments.reward_audit import (
    average_ranks,
    format_audit,
    main,
    names_region,
    reward_audit,
    spearman,
)
from spr_lightning.shards import ShardFormatError

# on_object: 1, 1, 0; naming the region (a red circle only): 1, 1, 0.
TEXTS = [RED_RIGHT, RED_ON_BLUE, NOWHERE]
SCORES = [{"sem": 1.0, "loc": 1.0}, {"sem": 3.0, "loc": 0.5}, {"sem": 2.0, "loc": 0.0}]


def _candidates(path: Path, texts: list[str] = TEXTS, query_id: str = "1-0") -> Path:
    record = {"query_id": query_id, "image_id": 1, "image_size": list(SIZE), "candidates": texts,
              "objects": [{"box": [0, 0, 20, 20], "label": "small red circle"}]}
    path.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path / "candidates-000000.tar", "w") as tar:
        for name, payload in (("0.json", json.dumps(record).encode()), ("0.jpg", b"not read")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _pairs(path: Path, scores: list[dict] | None = SCORES) -> Path:
    pair = {"query_id": "1-0", "image_id": 1, "image_size": list(SIZE), "chosen": RED_ON_BLUE,
            "rejected": RED_RIGHT}
    if scores is not None:
        pair["all_scores"] = scores
    _shard(path, [pair])
    return path


def test_ranks_and_spearman_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]
    rng = random.Random(0)
    for _ in range(20):
        a = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(6)]  # many ties
        b = [rng.random() for _ in range(6)]
        expected = stats.spearmanr(a, b).statistic
        got = spearman(a, b)
        assert (got is None) if len(set(a)) == 1 else got == pytest.approx(expected)
    assert spearman([1.0, 1.0], [0.0, 1.0]) is None
    with pytest.raises(ValueError, match="equal lengths"):
        spearman([1.0], [1.0, 2.0])


def test_names_region_reads_phrases_not_boxes() -> None:
    blue_on_blue = "<p>a large blue square</p> {<50><0><70><40>}"  # right box, but not an object of the region
    assert names_region(blue_on_blue, ["small red circle"], SIZE, "minigpt_v2") == 0.0
    assert names_region(f"{RED_ON_BLUE} and {blue_on_blue}", ["Small Red Circle"], SIZE, "minigpt_v2") == 0.5
    assert names_region("no boxes", ["small red circle"], SIZE, "minigpt_v2") == 0.0


def test_hand_worked_query(tmp_path: Path) -> None:
    summary = reward_audit(_pairs(tmp_path / "pairs"), _candidates(tmp_path / "cand"),
                           _annotations(tmp_path / "ann.json"), lambdas=(0.0, 0.8, 1.0))
    assert summary["queries"] == 1
    assert summary["sem_spread"] == pytest.approx((2 / 3) ** 0.5)  # pstdev of 1, 3, 2
    assert summary["loc_spread"] == pytest.approx((1 / 6) ** 0.5)  # pstdev of 1, 0.5, 0
    assert summary["rho_sem_on_object"] == pytest.approx(0.0)  # the two on-object answers rank lowest and highest
    assert summary["rho_loc_on_object"] == pytest.approx(3**0.5 / 2)
    assert summary["rho_loc_names_region"] == pytest.approx(3**0.5 / 2)
    assert (summary["on_object_mean"], summary["on_object_best"]) == (pytest.approx(2 / 3), 1.0)
    # λ = 0 pairs candidate 0 (on an object) with 2 (nowhere); λ = 0.8 and 1 pair 1 with 0: both on objects.
    assert (summary["lam0_pairs"], summary["lam0_better"], summary["lam0_worse"], summary["lam0_gap"]) == (1, 1, 0, 1)
    for lam in ("lam0.8", "lam1"):
        assert (summary[f"{lam}_better"], summary[f"{lam}_worse"], summary[f"{lam}_gap"]) == (0, 0, 0)
    table = format_audit(summary)
    assert "| S_loc | 0.408 | +0.866 | +0.866 |" in table and "| 0 | 100.0% | 100.0% | 0.0% | +100.0 |" in table


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "audit.json"
    main([str(_pairs(tmp_path / "pairs")), str(_candidates(tmp_path / "cand")), str(_annotations(tmp_path / "a.json")),
          "--json", str(out)])
    assert json.loads(out.read_text())["queries"] == 1
    assert "| λ |" in capsys.readouterr().out


def test_bad_inputs_name_the_query(tmp_path: Path) -> None:
    ann = _annotations(tmp_path / "ann.json")
    cand = _candidates(tmp_path / "cand")
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        reward_audit(_pairs(tmp_path / "p0"), tmp_path / "missing", ann)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.tar candidate shards"):
        reward_audit(_pairs(tmp_path / "p0"), tmp_path / "empty", ann)
    with pytest.raises(ShardFormatError, match="pair 1-0: no 'all_scores'"):
        reward_audit(_pairs(tmp_path / "p1", scores=None), cand, ann)
    with pytest.raises(ShardFormatError, match="pair 1-0: 2 scores for 3 candidates"):
        reward_audit(_pairs(tmp_path / "p2", scores=SCORES[:2]), cand, ann)
    with pytest.raises(KeyError, match="pair 1-0: no such query"):
        reward_audit(_pairs(tmp_path / "p3"), _candidates(tmp_path / "other", query_id="9-0"), ann)
