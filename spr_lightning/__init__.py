"""spr_lightning: Spatial Preference Rewarding (SPR) for grounding MLLMs on PyTorch Lightning.

Stages (each a LightningCLI run): region queries and candidate generation, scoring and preference
pairs, DPO training, evaluation. See ``docs/architecture.md``.
"""

__version__ = "0.1.0"
