"""State left behind in a process by one run must not break the next call (tests, notebooks, long-lived
workers run several stages in one interpreter)."""

from __future__ import annotations

import torch

from spr_lightning.scoring.localization import localization_scores


def test_scoring_after_an_inference_mode_run_works_outside_it():
    """Lightning runs ``predict_step`` under ``torch.inference_mode()``; a scratch buffer allocated there is an
    inference tensor, and writing into it afterwards outside inference mode raises. Reported against
    ``kernels/_workspace.py`` (see docs/reliability.md, open issue 7)."""
    args = ([[(8.0, 8.0, 40.0, 33.0), (50.0, 5.0, 60.0, 9.0)]], [[]], [[(8.0, 8.0, 40.0, 32.0)]])
    with torch.inference_mode():
        inside = localization_scores(*args)
    outside = localization_scores(*args)
    assert 0.0 < inside[0].score < 1.0 and [r.score for r in outside] == [r.score for r in inside]
    with torch.inference_mode():
        assert [r.score for r in localization_scores(*args)] == [r.score for r in inside]
