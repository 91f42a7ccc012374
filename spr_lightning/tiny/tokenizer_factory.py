"""Offline tokenizers for the tiny model families, trained in-process with the ``tokenizers`` library.

Each tokenizer mirrors the *kind* of tokenizer its real model ships (byte-level BPE for LLaVA's Llama-style
text model and for Qwen2.5, WordPiece for GroundingDINO's BERT), so the real processors, chat templates and
post-processing run on them unchanged. Named ``tokenizer_factory`` rather than ``tokenizers`` so that running a
file from this folder as a script can never shadow the ``tokenizers`` package.
"""

from __future__ import annotations

import functools
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BertTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from spr_lightning.tiny.corpus import training_corpus, wordpiece_words

LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# GroundingDINO's post-processing hard-codes these BERT ids (``SPECIAL_TOKENS`` in modeling_grounding_dino.py).
BERT_FIXED_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

# LLaVA-1.5 conversation format. The assistant turn opens with "ASSISTANT:" outside the generation block, so the
# generation prompt is an exact string prefix of the rendered conversation and ``{% generation %}`` marks exactly
# the completion (" answer</s>") for assistant-token masks.
LLAVA_CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}{% else %}"
    "{% for item in content | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for item in content | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ render(message['content']) + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT:' }}"
    "{% generation %}{{ ' ' + render(message['content']) + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['role'].upper() + ': ' + render(message['content']) + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}{% else %}{% for item in content %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' or 'video' in item %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ render(message['content']) + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _train_bpe(tokenizer: Tokenizer, vocab_size: int, special_tokens: tuple[str, ...]) -> Tokenizer:
    """Train ``tokenizer``'s BPE model on the built-in corpus; byte alphabet first so nothing is ever unknown."""
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return tokenizer


@functools.lru_cache(maxsize=1)
def _llava_backend(vocab_size: int) -> str:
    """Train the Llama-style byte-level BPE once per process and return it as JSON (copied per caller)."""
    tok = Tokenizer(models.BPE())
    # Single digits, like Llama: coordinates then cost a fixed number of tokens per digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    _train_bpe(tok, vocab_size, LLAVA_SPECIAL_TOKENS)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tok.to_str()


def build_llava_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with Llama/LLaVA special tokens and a LLaVA-1.5 style chat template.

    Args:
        vocab_size: Target BPE vocabulary size including the special tokens.

    Returns:
        A fast tokenizer with ``<image>`` as a special token, BOS added on encode, and ``chat_template`` set.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_llava_backend(vocab_size)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=2048,
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


@functools.lru_cache(maxsize=1)
def _qwen_vocab_merges(vocab_size: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Train BPE with Qwen2's exact normalizer and pre-tokenizer; return (vocab items, merges).

    The normalizer and pre-tokenizer (NFC, Qwen2's split regex with single digits, byte-level) are taken from an
    empty ``Qwen2Tokenizer`` so they always match what the installed class rebuilds on load.
    """
    reference = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE())
    tok.normalizer = reference.normalizer
    tok.pre_tokenizer = reference.pre_tokenizer
    _train_bpe(tok, vocab_size, ())
    model = json.loads(tok.to_str())["model"]
    vocab = tuple(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return vocab, merges


def build_qwen_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """Qwen2 BPE tokenizer with the Qwen2.5-VL special tokens appended after the BPE vocab, as in the real one.

    Args:
        vocab_size: Target size of the learned BPE vocabulary (special tokens come on top).

    Returns:
        A ``Qwen2Tokenizer`` (the class ``AutoTokenizer`` picks for ``qwen2_5_vl``) with the chat template set.
    """
    vocab, merges = _qwen_vocab_merges(vocab_size)
    full_vocab = dict(vocab)
    # Specials go right after the BPE vocab in the real order (<|endoftext|> first), as in Qwen's tokenizer.json.
    full_vocab.update({tok: len(vocab) + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=full_vocab,
        merges=[tuple(m) for m in merges],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def bert_vocab() -> dict[str, int]:
    """WordPiece vocab with the BERT ids GroundingDINO hard-codes, plus letters, ``##`` pieces and corpus words.

    Free slots below ``.``/``?`` (ids 1012/1029) that the content does not fill become ``[unusedN]``, as in the
    real ``bert-base-uncased`` vocab, so the fixed ids hold without a 30k-token vocabulary.
    """
    fixed = {idx: tok for tok, idx in BERT_FIXED_IDS.items()}
    chars = [chr(c) for c in range(33, 127) if chr(c) not in BERT_FIXED_IDS and not chr(c).isupper()]
    content = chars + ["##" + c for c in chars if c.isalnum()] + wordpiece_words()
    content = [t for t in dict.fromkeys(content) if t not in BERT_FIXED_IDS]
    size = max(max(fixed) + 1, len(fixed) + len(content))
    vocab: dict[str, int] = {}
    items = iter(content)
    unused = 0
    for idx in range(size):
        if idx in fixed:
            token = fixed[idx]
        elif idx < 100:  # real BERT keeps ids 1-99 as [unused] slots
            token = f"[unused{unused}]"
            unused += 1
        else:
            token = next(items, None) or f"[unused{unused}]"
            if token.startswith("[unused"):
                unused += 1
        vocab[token] = idx
    return vocab


def build_bert_tokenizer() -> BertTokenizer:
    """Lower-casing BERT WordPiece tokenizer for the tiny GroundingDINO text tower."""
    return BertTokenizer(vocab=bert_vocab(), do_lower_case=True, model_max_length=256)
