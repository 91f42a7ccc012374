"""One-off probe (docs/results/notebook.md, "One token per word", session 13): in how many different tokens does a
colour or a shape word of SPR-Shapes reach the language model?

A byte-level BPE trained without a word-splitting pre-tokenizer merges frequent multi-word pieces of the world's
texts (``"of the small red "``, ``"green square."``): the word "red" then reaches the model inside many different
token ids, each of which must learn separately that it means red. This counts, over an SFT file's prompts and answers,
the distinct tokens that contain each colour and shape word, for the small LLaVA's tokenizer with and without the
word split (``build_shapes_tokenizer(split_words=...)``), and the mean tokens per sample (the sequence-length cost).
Run by hand, not part of the package:

    python docs/results/probes/token_fragmentation.py SFT_JSONL [--samples 5000]
"""

from __future__ import annotations

import argparse
import json
from itertools import islice

from spr_lightning.shapes.scene import COLORS, SHAPES
from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, build_shapes_tokenizer


def fragmentation(texts: list[str], split_words: bool) -> dict[str, float]:
    """Distinct tokens carrying a colour / shape word (``Ġ`` read as a space) and mean tokens per text."""
    tokenizer = build_shapes_tokenizer(location_tokens=MINIGPT_V2_TOKENS, split_words=split_words)
    used: set[str] = set()
    lengths = []
    for text in texts:
        pieces = tokenizer.tokenize(text)
        used.update(pieces)
        lengths.append(len(pieces))
    words = [p.replace("Ġ", " ").split() for p in used]
    return {
        "tokens_with_colour": sum(any(w.rstrip(".,?") in COLORS for w in ws) for ws in words),
        "tokens_with_shape": sum(any(w.rstrip("s.,?") in SHAPES for w in ws) for ws in words),
        "mean_tokens": sum(lengths) / len(lengths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sft_jsonl")
    parser.add_argument("--samples", type=int, default=5000)
    args = parser.parse_args()
    with open(args.sft_jsonl, encoding="utf-8") as f:
        rows = [json.loads(line) for line in islice(f, args.samples)]
    texts = [r["prompt"] + " " + r["answer"] for r in rows]
    print(f"{len(texts)} samples of {args.sft_jsonl}")
    print(f"{'tokenizer':<22}{'tokens w/ colour':>18}{'tokens w/ shape':>17}{'tokens/sample':>15}")
    for name, split in (("words split (default)", True), ("merged across words", False)):
        r = fragmentation(texts, split)
        print(f"{name:<22}{r['tokens_with_colour']:>18}{r['tokens_with_shape']:>17}{r['mean_tokens']:>15.1f}")


if __name__ == "__main__":
    main()
