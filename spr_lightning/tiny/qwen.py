"""Tiny random Qwen2.5-VL model: windowed ViT with 2x2 patch merging + small Qwen2 text model with M-RoPE."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from spr_lightning.tiny._common import prepare_dir, seeded
from spr_lightning.tiny.tokenizer_factory import build_qwen_tokenizer

PATCH_SIZE = 14
MERGE_SIZE = 2
# One merged token covers 28x28 px; 4..16 merged tokens per image keeps sequences short on CPU.
MIN_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2 * 4
MAX_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2 * 16


def _pixel_processors() -> tuple[Qwen2VLImageProcessor, Qwen2VLVideoProcessor]:
    """Image and video processors with small pixel budgets; the processor class requires both."""
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    common = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": 2, "size": size}
    return Qwen2VLImageProcessor(**common), Qwen2VLVideoProcessor(**common)


def make_tiny_qwen2_5_vl(seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Build the tiny Qwen2.5-VL model (eval mode, float32) and its processor in memory.

    The text model's head_dim is 16, so the M-RoPE sections (temporal, height, width) must sum to 8.
    The vision tower keeps one windowed and one full-attention block so both code paths run.

    Args:
        seed: Seeds the random weights; the tokenizer does not depend on it.

    Returns:
        ``(model, processor)``, saveable with ``save_pretrained``.
    """
    tokenizer = build_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "out_hidden_size": 64,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    with seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor, video_processor = _pixel_processors()
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_tiny_qwen2_5_vl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny Qwen2.5-VL model and save model + processor into ``out_dir``; returns the directory."""
    path = prepare_dir(out_dir)
    model, processor = make_tiny_qwen2_5_vl(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
