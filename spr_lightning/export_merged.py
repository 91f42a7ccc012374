"""Merge a LoRA adapter into its base model and save a model that loads without peft.

``python -m spr_lightning.export_merged --base BASE --adapter ADAPTER_DIR --out OUT_DIR``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spr_lightning.models import load_policy, load_processor


def export_merged(base: str, adapter: str, out: str, *, dtype: str = "float32") -> Path:
    """Load ``base`` + ``adapter``, merge the LoRA deltas into the weights, save model + processor."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_policy(base, dtype=dtype), adapter).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    load_processor(base).save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model: hub id, path or tiny:<family>")
    parser.add_argument("--adapter", required=True, help="adapter folder written by AdapterExport")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    print(export_merged(args.base, args.adapter, args.out, dtype=args.dtype))


if __name__ == "__main__":
    main()
