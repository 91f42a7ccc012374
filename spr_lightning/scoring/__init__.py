"""Scores and refinement of SPR §3.2: semantic score (CLIP), grounders (GroundingDINO), localization score.

- :mod:`~spr_lightning.scoring.semantic`: :class:`SemanticScorer` (Eq. 1-2, crop + local-attention full image).
- :mod:`~spr_lightning.scoring.local_attention`: the local-attention pooling step for open_clip ViTs.
- :mod:`~spr_lightning.scoring.grounders`: the :class:`Grounder` protocol, :class:`HFGroundingDino` (transformers),
  :class:`GroundingDinoPy` (``groundingdino-py``), :func:`ground_in_region`.
- :mod:`~spr_lightning.scoring.gdino_compat`: runtime shim so ``groundingdino-py`` runs under transformers 5.
- :mod:`~spr_lightning.scoring.localization`: the localization score (Algorithm 1) on the box kernels.
- :mod:`~spr_lightning.scoring.phrase_localization`: the phrase-matched localization score (``loc_mode: phrase``;
  an option, not the paper's).
- :mod:`~spr_lightning.scoring.refine`: refinement of the preferred description.

See ``docs/scoring.md``.
"""

from spr_lightning.scoring.grounders import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_TEXT_THRESHOLD,
    Grounder,
    GroundingDinoPy,
    GroundingResult,
    HFGroundingDino,
    crop_image,
    format_caption,
    ground_in_region,
    pixel_crop_box,
)
from spr_lightning.scoring.local_attention import (
    check_local_attention_support,
    encode_image_local,
    region_patch_mask,
)
from spr_lightning.scoring.localization import (
    DEFAULT_DEDUP_IOU_THRESHOLD,
    LocalizationResult,
    localization_score_reference,
    localization_scores,
    merge_dedup,
    pad_box_sets,
)
from spr_lightning.scoring.phrase_localization import (
    phrase_localization_score_reference,
    phrase_localization_scores,
    phrase_targets,
)
from spr_lightning.scoring.refine import RefineResult, refine_description
from spr_lightning.scoring.semantic import SemanticScorer, pad_to_square

__all__ = [
    "DEFAULT_BOX_THRESHOLD",
    "DEFAULT_DEDUP_IOU_THRESHOLD",
    "DEFAULT_TEXT_THRESHOLD",
    "Grounder",
    "GroundingDinoPy",
    "GroundingResult",
    "HFGroundingDino",
    "LocalizationResult",
    "RefineResult",
    "SemanticScorer",
    "check_local_attention_support",
    "crop_image",
    "encode_image_local",
    "format_caption",
    "ground_in_region",
    "localization_score_reference",
    "localization_scores",
    "merge_dedup",
    "pad_box_sets",
    "pad_to_square",
    "phrase_localization_score_reference",
    "phrase_localization_scores",
    "phrase_targets",
    "pixel_crop_box",
    "refine_description",
    "region_patch_mask",
]
