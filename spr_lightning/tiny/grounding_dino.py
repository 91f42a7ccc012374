"""Tiny random GroundingDINO: a 4-stage Swin backbone (transformers' own, no timm, nothing pretrained) and a
one-layer BERT text tower, saved so ``AutoModelForZeroShotObjectDetection`` / ``AutoProcessor`` load it."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    BertConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)

from spr_lightning.tiny._common import prepare_dir, seeded
from spr_lightning.tiny.tokenizer_factory import build_bert_tokenizer

# Short side 64 px keeps the deformable-attention feature pyramid (16, 8, 4, 2 px maps) tiny on CPU.
SHORTEST_EDGE = 96
LONGEST_EDGE = 128


def make_tiny_grounding_dino(seed: int = 0) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """Build the tiny GroundingDINO model (eval mode, float32) and its processor in memory.

    ``backbone_config`` is a transformers ``SwinConfig`` (GroundingDINO's default backbone type), so loading
    never touches timm or a pretrained checkpoint. Stages 2-4 feed three feature levels; the fourth level is the
    model's own strided conv on the last one, as in the real model.

    Args:
        seed: Seeds the random weights; the tokenizer does not depend on it.

    Returns:
        ``(model, processor)``, saveable with ``save_pretrained``.
    """
    tokenizer = build_bert_tokenizer()
    backbone = SwinConfig(
        image_size=SHORTEST_EDGE,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
        mlp_ratio=2.0,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,  # >= 2: the bbox-head weight tying pattern expects a second decoder layer
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=256,
    )
    with seeded(seed):
        model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": SHORTEST_EDGE, "longest_edge": LONGEST_EDGE})
    return model, GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_grounding_dino(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny GroundingDINO model and save model + processor into ``out_dir``; returns the directory."""
    path = prepare_dir(out_dir)
    model, processor = make_tiny_grounding_dino(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
