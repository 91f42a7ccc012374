"""A *small* LLaVA-architecture VLM that can learn to ground SPR-Shapes objects on a CPU in minutes.

The tiny LLaVA (:mod:`spr_lightning.tiny.llava`: 32 px images, 64-wide text model, generic tokenizer) proves the
plumbing but is too small to see shapes. This recipe is sized for SFT on SPR-Shapes within a CPU budget (a step of
16 samples in well under a second on two free cores at the quickstart's 64 px / 2 + 2 layer setting). Trained
from scratch it learns the answer format quickly but grounding only slowly: ``docs/quickstart.md`` records the
learning curves measured. It is a real ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` saved with
``save_pretrained``, so every stage loads it by path exactly like a released LLaVA checkpoint.

Choices and why:

* **Vision:** a CLIP ViT at ``image_size`` px with ``patch_size`` patches. A small SPR-Shapes object covers about
  a tenth of the image side, i.e. about one patch at 96 px / patch 12: colour is easy to see at that scale and
  the shape is still a few pixels wide. 8 x 8 = 64 image tokens keep sequences short.
* **Tokenizer:** byte-level BPE (Llama-style, like the tiny one, built with the same special tokens and
  LLaVA-1.5 chat template) but trained on the *SPR-Shapes* texts, with single digits. By default it splits
  words first (GPT-2's pre-tokenization regex), so every word of the world is one token of its own:
  ``" red"`` is the same token in a question, a description and a caption, and the model can learn what it
  means once. Without that split (``split_words=False``, the tokenizer of sessions 1-12) BPE merges frequent
  multi-word pieces (``"of the small red "``, ``"green square."``) into single tokens: shorter sequences, but
  a colour or shape inside such a piece has to be learned separately for every piece it occurs in. A ``full``
  quickstart start trained with it put half as many REC boxes on an object (REC Acc@0.5 7.1% vs 11.3%), though
  it read colours better while describing (``docs/results/notebook.md``, "One token per word").
* **Text model:** a small Llama (``text_hidden`` wide, ``text_layers`` deep). Randomly initialised: SFT
  (:mod:`spr_lightning.sft`) teaches it the world; nothing here is pretrained or downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from spr_lightning.tiny._common import prepare_dir, seeded
from spr_lightning.tiny.tokenizer_factory import LLAVA_CHAT_TEMPLATE, LLAVA_SPECIAL_TOKENS

__all__ = [
    "MINIGPT_V2_TOKENS",
    "build_shapes_tokenizer",
    "build_small_llava",
    "make_small_llava",
    "shapes_corpus",
    "small_vision_config",
]

DEFAULT_VOCAB_SIZE = 1024


def shapes_corpus(num_scenes: int = 120, seed: int = 7) -> list[str]:
    """Texts of SPR-Shapes scenes (no images drawn): every prompt template and answer form the stages use.

    The SFT questions and answers of ``num_scenes`` random scenes in the Ferret and pixel formats, the region
    prompts of every template, and the referring expressions and captions; a fixed seed, so the tokenizer is
    always the same.
    """
    from spr_lightning.coords import get_codec
    from spr_lightning.regions import DEFAULT_TEMPLATES
    from spr_lightning.shapes.captions import make_caption
    from spr_lightning.shapes.referring import referring_expressions
    from spr_lightning.shapes.scene import make_scene
    from spr_lightning.shapes.sft import sft_samples

    codecs = [get_codec("ferret"), get_codec("locvlm_ivb")]
    lines = [t.text for t in DEFAULT_TEMPLATES.values()] + ["0123456789 .,;:!?()[]{}<>", "USER: ASSISTANT:"]
    for k in range(num_scenes):
        rng = np.random.default_rng([seed, k])
        scene = make_scene(rng)
        expressions = referring_expressions(scene.objects, scene.size, rng)
        captions = [make_caption(scene.objects, scene.background.kind, rng) for _ in range(2)]
        for sample in sft_samples(scene, expressions, captions, codecs[k % 2], rng, 3, 1):
            lines += [sample.prompt, sample.answer]
        lines += [c.text for c in captions]
    return lines


@functools.lru_cache(maxsize=4)
def _shapes_backend(vocab_size: int, split_words: bool = True) -> str:
    tok = Tokenizer(models.BPE())
    # Digits one by one (coarse-to-fine coordinates, a fixed cost per number); with split_words, GPT-2's regex
    # keeps every word (with its leading space) apart, so merges never cross a word boundary.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=split_words)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(LLAVA_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                  max_token_length=24)
    tok.train_from_iterator(shapes_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok.to_str()


#: MiniGPT-v2's location vocabulary: ``<0>`` ... ``<100>`` and the phrase/box markup, one token each.
MINIGPT_V2_TOKENS = tuple(f"<{k}>" for k in range(101)) + ("<p>", "</p>", "<delim>")


def build_shapes_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, location_tokens: Sequence[str] = (),
                           split_words: bool = True) -> PreTrainedTokenizerFast:
    """The LLaVA-style tokenizer of the tiny models (same special tokens, chat template), trained on
    :func:`shapes_corpus`, plus ``location_tokens`` as whole tokens (e.g. :data:`MINIGPT_V2_TOKENS`: a
    MiniGPT-v2 box ``{<12><40><33><61>}`` is then six tokens, each coordinate one 101-way choice).
    ``split_words=False`` lets BPE merge across words (the module docstring says why that is not the default)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_shapes_backend(vocab_size, split_words)),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=2048,
    )  # fmt: skip
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    if location_tokens:
        tokenizer.add_tokens(list(location_tokens))
    return tokenizer


def small_vision_config(image_size: int, patch_size: int, hidden_size: int, num_layers: int) -> CLIPVisionConfig:
    """The CLIP ViT shape of the small LLaVA (heads of 32 channels, MLP 4x wide); also what
    :class:`~spr_lightning.shapes.vision_pretraining.VisionPretrainModule` pretrains, so the two always agree."""
    return CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=4 * hidden_size, projection_dim=hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 32),
                            image_size=image_size, patch_size=patch_size)


def make_small_llava(
    *,
    seed: int = 0,
    image_size: int = 96,
    patch_size: int = 12,
    vision_hidden: int = 128,
    vision_layers: int = 3,
    text_hidden: int = 192,
    text_layers: int = 3,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    vision_tower: str | Path | None = None,
    location_tokens: Sequence[str] = (),
    split_words: bool = True,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the small LLaVA (eval mode, float32, seeded random weights) and its processor in memory.

    Args:
        seed: seeds the weights (the tokenizer never depends on it).
        image_size: side of the CLIP input in pixels (images are resized to it).
        patch_size: ViT patch side; ``(image_size / patch_size) ** 2`` image tokens per image.
        vision_hidden: ViT width (heads of 32 channels).
        vision_layers: ViT depth (LLaVA reads the second-to-last layer).
        text_hidden: Llama width (heads of 32 channels, half as many key/value heads).
        text_layers: Llama depth.
        vocab_size: BPE vocabulary size of :func:`build_shapes_tokenizer`.
        vision_tower: folder of a pretrained ``CLIPVisionModel`` (e.g. from
            :class:`~spr_lightning.shapes.vision_pretraining.VisionPretrainModule`): the LLaVA gets its weights
            and shape (``image_size``, ``patch_size``, ``vision_hidden`` and ``vision_layers`` are then taken from
            it) and reads its last layer, which is the one that was pretrained.
        location_tokens: extra whole tokens of the coordinate format (see :func:`build_shapes_tokenizer`).
        split_words: keep words apart in the tokenizer (see :func:`build_shapes_tokenizer`).
    """
    tower = None
    if vision_tower is not None:
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(vision_tower)
        vision = tower.config
        image_size, patch_size = vision.image_size, vision.patch_size
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    tokenizer = build_shapes_tokenizer(vocab_size, location_tokens, split_words)
    if tower is None:
        vision = small_vision_config(image_size, patch_size, vision_hidden, vision_layers)
    heads = max(2, text_hidden // 32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=3 * text_hidden,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                       max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default",
                         vision_feature_layer=-1 if tower is not None else -2,
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    with seeded(seed):
        model = LlavaForConditionalGeneration(config).eval()
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    return model, processor


def build_small_llava(out_dir: str | Path, **kwargs: Any) -> Path:
    """Build the small LLaVA (:func:`make_small_llava` arguments) and ``save_pretrained`` model + processor
    into ``out_dir``; returns the folder (loadable by ``AutoModelForImageTextToText`` / ``AutoProcessor``)."""
    path = prepare_dir(out_dir)
    model, processor = make_small_llava(**kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
