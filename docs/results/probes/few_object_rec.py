"""One-off probe (docs/results/notebook.md, "Batch size, learning rate and a curriculum"): REC-only SFT on scenes of a
few objects, to compare SFT recipes on the image lookup at a cost a CPU can pay.

Writes, into ``OUT``: fresh SPR-Shapes scenes of ``--min-objects``..``--max-objects`` objects (``train`` and a
held-out ``test`` split, their own seeds), the REC lines of the training scenes as ``rec_train.jsonl``, and, from a
quickstart run's resolved configs, ``sft.yaml`` (the run's SFT stage on those lines, from its base model, with
``--batch-size``, ``--steps``, ``--lr`` and ``--seed``, the order of the training data) and ``eval_rec.yaml`` (the
run's REC evaluation on the test scenes, of the model that ``sft.yaml`` exports). Then, by hand:

    python docs/results/probes/few_object_rec.py RUN OUT --batch-size 32 --steps 1000
    python -m spr_lightning fit --config OUT/sft.yaml
    python -m spr_lightning validate --config OUT/eval_rec.yaml
    python -m spr_lightning.experiments.rec_choice OUT/eval/predictions-rank0.jsonl \\
        OUT/scenes_test/annotations/refcoco_shapes.json OUT/scenes_test/annotations/instances_test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from spr_lightning.quickstart import CONFIG_DIR, COORD_FORMAT, set_in
from spr_lightning.shapes import SceneConfig, write_world


def write_configs(run: Path, out: Path, batch_size: int, steps: int, lr: float, seed: int, samples: int) -> None:
    """``sft.yaml`` and ``eval_rec.yaml`` in ``out``: the quickstart run's own resolved configs, overridden."""
    overrides = {
        "sft.yaml": {
            "trainer.max_steps": steps, "trainer.default_root_dir": str(out / "sft"),
            "trainer.logger.init_args.save_dir": str(out / "sft"),
            "trainer.callbacks[0].init_args.dirpath": str(out / "sft" / "model"),
            "model.init_args.model_name_or_path": str(run / "base" / "model"), "model.init_args.lr": lr,
            "data.init_args.train_file": str(out / "rec_train.jsonl"),
            "data.init_args.image_root": str(out / "scenes_train"),
            "data.init_args.batch_size": batch_size, "data.init_args.seed": seed,
        },
        "eval_rec.yaml": {
            "trainer.default_root_dir": str(out / "eval"),
            "model.init_args.model_name_or_path": str(out / "sft" / "model" / "final"),
            "data.init_args.annotations": str(out / "scenes_test" / "annotations" / "refcoco_shapes.json"),
            "data.init_args.image_root": str(out / "scenes_test" / "images"), "data.init_args.max_samples": samples,
        },
    }  # fmt: skip
    sources = {"sft.yaml": ("sft.yaml", "sft.yaml"), "eval_rec.yaml": ("eval_rec_sft.yaml", "eval_rec.yaml")}
    for name, changes in overrides.items():
        resolved, template = sources[name]
        # The run's resolved config when the run got that far, else the quickstart template (the same but for
        # the paths and settings overridden here).
        source = run / "configs" / resolved
        source = source if source.exists() else CONFIG_DIR / template
        config = yaml.safe_load(source.read_text(encoding="utf-8"))
        for key, value in changes.items():
            set_in(config, key, value)
        (out / name).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a quickstart run folder (base/model and configs/ are used)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="SFT data order (seed_everything leaves it alone)")
    args = parser.parse_args()
    scenes = SceneConfig(image_size=224, min_objects=args.min_objects, max_objects=args.max_objects)
    train = write_world(args.out / "scenes_train", {"train": args.train_images}, seed=303, coord_format=COORD_FORMAT,
                        workers=2, rec_per_image=2, scene_config=scenes)
    write_world(args.out / "scenes_test", {"test": args.test_images}, seed=909, coord_format=COORD_FORMAT,
                workers=2, rec_per_image=2, scene_config=scenes)
    lines = [line for line in train.sft["train"].read_text(encoding="utf-8").splitlines()
             if json.loads(line)["task"] == "rec"]
    (args.out / "rec_train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_configs(args.run, args.out, args.batch_size, args.steps, args.lr, args.seed, 2 * args.test_images)
    print(f"{len(lines)} REC training lines; configs in {args.out}")


if __name__ == "__main__":
    main()
