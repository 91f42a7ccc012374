"""Boxes in text: one codec per model family, chosen by name.

>>> codec = get_codec("ferret")
>>> codec.encode((64, 48, 320, 240), image_size=(640, 480))
'[100, 100, 500, 500]'
>>> [g.xyxy for g in codec.decode("a dog [100, 100, 500, 500]", (640, 480))]
[(64.0, 48.0, 320.0, 240.0)]

See ``docs/coordinates.md`` for every format, its conventions and the phrase rule.
"""

from __future__ import annotations

from spr_lightning.coords.base import Codec, Grounding, tidy_spacing
from spr_lightning.coords.bins import CogVLMCodec, FerretCodec, MiniGPTv2Codec
from spr_lightning.coords.floats import LlavaCodec, ShikraCodec
from spr_lightning.coords.locvlm import LocVLMDIGACodec, LocVLMIVBCodec, LocVLMNFPCodec
from spr_lightning.coords.qwen import Qwen2_5VLCodec, QwenVLCodec, smart_resize

__all__ = [
    "CODECS",
    "Codec",
    "Grounding",
    "available_codecs",
    "get_codec",
    "smart_resize",
    "tidy_spacing",
]

#: Format name -> codec class (the names used as ``coord_format`` in configs and shards).
CODECS: dict[str, type[Codec]] = {
    cls.name: cls
    for cls in (
        FerretCodec,
        CogVLMCodec,
        ShikraCodec,
        LlavaCodec,
        QwenVLCodec,
        Qwen2_5VLCodec,
        MiniGPTv2Codec,
        LocVLMNFPCodec,
        LocVLMIVBCodec,
        LocVLMDIGACodec,
    )
}


def available_codecs() -> list[str]:
    """Names accepted by :func:`get_codec`."""
    return sorted(CODECS)


def get_codec(name: str, **options: object) -> Codec:
    """Build the codec of a coordinate format.

    Args:
        name: one of :func:`available_codecs` (``"ferret"``, ``"cogvlm"``, ``"qwen2_5_vl"``, ...).
        **options: the codec's constructor options, e.g. ``square_pad=False`` for ``shikra``,
            ``num_bins=336`` for ``locvlm_ivb``, ``resized_size="smart"`` for ``qwen2_5_vl``.

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    try:
        cls = CODECS[name]
    except KeyError:
        raise KeyError(f"unknown coordinate format {name!r}; available: {', '.join(available_codecs())}") from None
    return cls(**options)  # type: ignore[arg-type]
