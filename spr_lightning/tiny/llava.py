"""Tiny random LLaVA-1.5-style model: CLIP vision tower + MLP projector + small Llama text model."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from spr_lightning.tiny._common import prepare_dir, seeded
from spr_lightning.tiny.tokenizer_factory import build_llava_tokenizer

IMAGE_SIZE = 32
PATCH_SIZE = 8


def make_tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the tiny LLaVA model (eval mode, float32) and its processor in memory.

    ``vision_feature_select_strategy="default"`` drops the CLIP class token, so the processor must count
    ``num_additional_image_tokens=1`` for it: (32/8)^2 + 1 - 1 = 16 ``<image>`` tokens per image.

    Args:
        seed: Seeds the random weights; the tokenizer does not depend on it.

    Returns:
        ``(model, processor)``; saving both with ``save_pretrained`` gives a directory that
        ``AutoModelForImageTextToText`` / ``AutoProcessor`` load.
    """
    tokenizer = build_llava_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    with seeded(seed):
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_tiny_llava(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny LLaVA model and save model + processor into ``out_dir``; returns the directory."""
    path = prepare_dir(out_dir)
    model, processor = make_tiny_llava(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
