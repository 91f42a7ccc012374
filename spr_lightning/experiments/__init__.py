"""Experiments built on the quickstart's stages: each module is one ``python -m spr_lightning.experiments.<name>``.

* :mod:`spr_lightning.experiments.shapes`: SPR-DPO against the SFT start and the paper's ablations on SPR-Shapes,
  several seeds, REC and phrase grounding at IoU 0.5-0.9.
"""
