"""One-off probe (docs/results/notebook.md, session 24): does a larger language model write more precise boxes? Grow
a trained small LLaVA's language model without changing what it computes, then continue its SFT.

A larger language model is the lever the box-readout probe points at, but a start of one from scratch is hours of
SFT on 2 CPU cores. Growing a trained start function-preservingly makes the question cheap to ask: the grown model
answers exactly as the start does (checked here on a batch of random inputs before saving), so a short
continuation of its SFT, against the same continuation of the ungrown start, measures what the extra capacity buys.

* ``--add-layers K`` appends K decoder layers after the last one, each an exact identity at first: their attention
  output projection and MLP down projection are zero, so the residual stream passes through unchanged (the zero
  projections receive gradient from the first step). Their other weights keep the model's random initialisation
  (``--init random``, std 0.02: measured, they stay nearly unused over a 4 000-step continuation) or copy the
  start's layers in turn (``--init copy``), so that their attention and MLP act at the trained scale at once.
  Measured (session 24): used a little more, and REC within noise of the ungrown continuation either way.
* ``--intermediate-size N`` widens every layer's MLP: the new gate/up rows are random, the new columns of the
  down projection zero.

Writes a ``from_pretrained`` folder (model, tokenizer, processor) that the SFT config loads as its
``model_name_or_path``. With appended layers, set ``grounding_attention_layer`` to the start's last layer
(its index, e.g. 1 for a 2-layer start) so that the continuation supervises the same head as its control.

    python docs/results/probes/grow_language_model.py START OUT [--add-layers 2] [--intermediate-size 1536]
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration


def grow(model: LlavaForConditionalGeneration, add_layers: int = 0, intermediate_size: int | None = None,
         seed: int = 0, init: str = "random") -> LlavaForConditionalGeneration:
    """A copy of ``model`` with ``add_layers`` identity layers appended and MLPs widened to ``intermediate_size``."""
    config = copy.deepcopy(model.config)
    text = config.text_config
    old_layers, old_width = text.num_hidden_layers, text.intermediate_size
    text.num_hidden_layers = old_layers + add_layers
    text.intermediate_size = intermediate_size or old_width
    if text.intermediate_size < old_width:
        raise ValueError(f"--intermediate-size {text.intermediate_size} is below the start's {old_width}")
    torch.manual_seed(seed)
    grown = LlavaForConditionalGeneration(config).to(model.dtype)
    target, weights = grown.state_dict(), model.state_dict()
    for name, value in weights.items():
        if name not in target:
            raise KeyError(f"{name}: in the start, not in the grown model")
        slot = target[name]
        if slot.shape == value.shape:
            slot.copy_(value)
        elif name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            slot[:old_width].copy_(value)
        elif name.endswith("mlp.down_proj.weight"):
            slot.zero_()
            slot[:, :old_width].copy_(value)
        else:
            raise ValueError(f"{name}: shape {tuple(value.shape)} cannot grow to {tuple(slot.shape)}")
    for index in range(old_layers, old_layers + add_layers):
        if init == "copy":
            source = f"layers.{index % old_layers}."
            for name, value in weights.items():
                if source in name and ".language_model." in name and target[name].shape == value.shape:
                    target[name.replace(source, f"layers.{index}.")].copy_(value)
        o_proj = next(n for n in target if n.endswith(f"layers.{index}.self_attn.o_proj.weight"))
        prefix = o_proj.rsplit("self_attn", 1)[0]
        target[prefix + "self_attn.o_proj.weight"].zero_()
        target[prefix + "mlp.down_proj.weight"].zero_()
    grown.load_state_dict(target)
    return grown.eval()


@torch.no_grad()
def check_same_outputs(start: LlavaForConditionalGeneration, grown: LlavaForConditionalGeneration) -> float:
    """Largest logit difference on random text and a random image: must be float rounding only."""
    vocab, image_token = start.config.text_config.vocab_size, start.config.image_token_id
    size = start.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    n_image = (size // start.config.vision_config.patch_size) ** 2
    n_image += int(start.config.vision_feature_select_strategy == "full")
    text = torch.randint(4, vocab, (2, 24))
    text[text == image_token] = 4
    ids = torch.cat([text[:, :4], torch.full((2, n_image), image_token), text[:, 4:]], 1)
    a = start(input_ids=ids, pixel_values=pixels).logits
    b = grown(input_ids=ids, pixel_values=pixels).logits
    return float((a - b).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--add-layers", type=int, default=0)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=("random", "copy"), default="random",
                        help="the added layers' other weights: random, or copies of the start's layers")
    args = parser.parse_args()
    start = LlavaForConditionalGeneration.from_pretrained(args.start).eval()
    grown = grow(start, args.add_layers, args.intermediate_size, args.seed, args.init)
    difference = check_same_outputs(start, grown)
    if difference > 1e-4:
        raise RuntimeError(f"the grown model computes something else (largest logit difference {difference:.2e})")
    args.out.mkdir(parents=True, exist_ok=True)
    grown.save_pretrained(args.out)
    for file in args.start.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in ("config.json",):
            shutil.copy2(file, args.out / file.name)
    text = grown.config.text_config
    counts = sum(p.numel() for p in grown.model.language_model.parameters())
    print(f"{args.out}: {text.num_hidden_layers} layers, MLP {text.intermediate_size}, language model "
          f"{counts / 1e6:.2f} M parameters; largest logit difference to the start {difference:.1e}")


if __name__ == "__main__":
    main()
