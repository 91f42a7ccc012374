"""``python -m spr_lightning.quickstart``: the whole SPR loop, offline on a CPU, on the SPR-Shapes world.

Random tiny models write noise, so the quickstart first *teaches* small models the synthetic world, then lets SPR
improve the VLM, and measures what SPR changed:

====================  ==================================================================================
stage                 what runs (every model stage is ``spr_lightning.cli.cli_main`` on a YAML config)
====================  ==================================================================================
``world``             :func:`spr_lightning.shapes.write_world`: images, COCO/REC/phrase annotations, SFT data
``vision``            ``fit`` ``configs/quickstart/vision.yaml``: the LLaVA's vision tower pretrained on dense targets
``base``              :func:`spr_lightning.tiny.small_llava.build_small_llava`: a small LLaVA around that tower
``clip``              ``fit`` ``configs/quickstart/clip.yaml``: a small open_clip trained on the world's crops
``sft``               ``fit`` ``configs/quickstart/sft.yaml``: the LLaVA learns grounded answers (SFTModule)
``generate``          ``predict`` ``configs/quickstart/generate.yaml``: region descriptions (SPR §3.1)
``score``             ``predict`` ``configs/quickstart/score.yaml``: CLIP + Algorithm 1 + refinement (SPR §3.2)
``dpo``               ``fit`` ``configs/quickstart/dpo.yaml``: LoRA DPO on the pairs (SPR §3.3)
``eval``              ``validate`` ``configs/quickstart/eval_{rec,phrase}.yaml``: SFT model vs SFT + DPO adapter
====================  ==================================================================================

Each stage's resolved config is written to ``<out>/configs/<stage>.yaml`` (rerun any stage by hand with
``python -m spr_lightning <subcommand> --config <out>/configs/<stage>.yaml``), and a ``DONE`` file in the stage's
folder marks it finished: running the quickstart again skips finished stages (``--redo STAGE`` reruns one and
everything after it). The end is a table of REC Acc@0.5-0.9 and phrase Recall@1 before and after SPR, printed
and saved with the DPO reward curves as ``<out>/quickstart.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from spr_lightning.stop_request import StopRequest

__all__ = ["SIZES", "QuickstartSize", "main", "run_quickstart", "size_by_name"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
STAGES = ("world", "vision", "base", "clip", "sft", "generate", "score", "dpo", "eval")
SFT_TASKS = ("rec", "phrase", "region")
#: How every quickstart answer writes boxes (the world's SFT data, generation, scoring and evaluation agree).
COORD_FORMAT = "minigpt_v2"
#: Side of the world's images (px) and the file in ``world/`` that keeps its scene settings.
WORLD_IMAGE_SIZE = 224
SCENE_FILE = "scene.json"
#: Language-model settings of the base stage that ``--model`` may change (``make_small_llava`` arguments).
MODEL_KEYS = ("text_hidden", "text_layers")
#: Vision-tower settings of the vision stage that ``--vision`` may change (``VisionPretrainModule`` arguments).
VISION_KEYS = ("image_size", "patch_size", "hidden_size", "num_layers")
REC_THRESHOLDS = ("0.5", "0.6", "0.7", "0.8", "0.9")
#: ``--accelerator`` choices (Lightning's names); every stage runs on one device.
ACCELERATORS = ("cpu", "gpu", "auto")
#: The configs a quickstart run writes (``<out>/configs/<name>.yaml``): what ``--set NAME:key=value`` may change.
CONFIG_NAMES = ("vision", "clip", "sft", "generate", "score", "dpo", "eval_rec_sft", "eval_phrase_sft",
                "eval_rec_spr", "eval_phrase_spr")


@dataclass(frozen=True)
class QuickstartSize:
    """How big each stage is: world images, model shape, training steps, generated regions, evaluated samples.

    ``warmup`` is the SFT curriculum: ``{most objects: images}`` of extra training scenes with at most that many
    objects (and at least one fewer), whose REC questions are mixed into the SFT data. A model whose answers do
    not yet depend on the image learns to read one object's box first; choosing among many comes after.
    """

    world: dict[str, int]
    model: dict[str, int] = field(default_factory=dict)
    vision: dict[str, int] = field(default_factory=dict)
    vision_steps: int = 2000
    vision_scenes: int = 4000
    vision_batch_size: int = 32
    warmup: dict[int, int] = field(default_factory=dict)
    clip_steps: int = 200
    clip_batch_size: int = 32
    sft_steps: int = 400
    sft_batch_size: int = 16
    generate_images: int = 150
    num_candidates: int = 4
    max_new_tokens: int = 200
    dpo_epochs: int = 2
    dpo_max_steps: int = -1
    dpo_batch_size: int = 4
    rec_samples: int | None = 200
    phrase_samples: int | None = 100


#: The vision tower of the ``small`` and ``full`` LLaVA: 96 px, 12 px patches (8 x 8 tokens), 3 x 128 wide.
VISION_96 = {"image_size": 96, "patch_size": 12, "hidden_size": 128, "num_layers": 3}

#: ``toy`` is for tests (minutes, numbers meaningless); ``small`` the default; ``full`` the longer run.
SIZES: dict[str, QuickstartSize] = {
    "toy": QuickstartSize(
        world={"train": 12, "val": 2, "test": 3},
        vision={"image_size": 32, "patch_size": 16, "hidden_size": 32, "num_layers": 1}, vision_steps=2,
        vision_scenes=8, vision_batch_size=4, model={"text_hidden": 64, "text_layers": 1}, warmup={1: 3},
        clip_steps=2, clip_batch_size=8, sft_steps=2, sft_batch_size=4, generate_images=4, num_candidates=3,
        max_new_tokens=24, dpo_epochs=2, dpo_max_steps=2, dpo_batch_size=2, rec_samples=4, phrase_samples=2,
    ),
    "small": QuickstartSize(
        world={"train": 600, "val": 50, "test": 100},
        vision=VISION_96, vision_steps=1500, model={"text_hidden": 128, "text_layers": 2}, warmup={1: 1500, 3: 1500},
        clip_steps=500, sft_steps=2500, generate_images=100, max_new_tokens=160, dpo_epochs=1, rec_samples=150,
        phrase_samples=40,
    ),
    "full": QuickstartSize(
        world={"train": 3000, "val": 200, "test": 300},
        vision=VISION_96, vision_steps=3000, vision_scenes=8000, model={"text_hidden": 128, "text_layers": 2},
        warmup={1: 3000, 3: 3000, 6: 3000},
        clip_steps=1000, sft_steps=20000, generate_images=600, dpo_epochs=1, rec_samples=1000, phrase_samples=300,
    ),
}


def size_by_name(name: str) -> QuickstartSize:
    """``SIZES[name]``, or a ``ValueError`` that lists the sizes (the one check both runners make)."""
    if name not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]


# ------------------------------------------------------------------------------------------ plumbing
def set_in(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_in(cfg, "model.init_args.lr", 1e-3)``; a ``[i]`` part indexes a list (``trainer.callbacks[0]``)."""
    node: Any = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        name, _, index = part.partition("[")
        node = node.setdefault(name, {}) if name else node
        if index:
            node = node[int(index.rstrip("]"))]
    node[parts[-1]] = value


def write_config(template: str, out: Path, overrides: dict[str, Any]) -> Path:
    """``configs/quickstart/<template>`` with ``overrides`` applied, written to ``out`` (what the stage runs)."""
    config = yaml.safe_load((CONFIG_DIR / template).read_text(encoding="utf-8"))
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        set_in(config, key, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by python -m spr_lightning.quickstart from configs/quickstart/{template}.\n"
    out.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


def run_cli(subcommand: str, config: Path, ckpt_path: Path | None = None) -> Any:
    """One stage through the project's LightningCLI, as ``python -m spr_lightning <subcommand> --config``
    (``fit`` from ``ckpt_path`` when given)."""
    from spr_lightning.cli import cli_main

    args = [subcommand, "--config", str(config)] + ([] if ckpt_path is None else ["--ckpt_path", str(ckpt_path)])
    print(f"\n$ python -m spr_lightning {' '.join(args)}", flush=True)
    argv = sys.argv
    sys.argv = argv[:1]  # the quickstart's own flags are not the stage's (LightningCLI warns when it sees both)
    try:
        return cli_main(args)
    finally:
        sys.argv = argv


def fit_stage(run: Run, stage: str, config: Path) -> Any:
    """``fit`` one of the :data:`RESUMABLE` stages: from ``<stage>/checkpoints/last.ckpt`` when an interrupted run
    left one (its config writes one every 500 steps), so that hours of SFT are not lost to a kill; the checkpoints
    are deleted once the stage has finished and exported its model."""
    last = run.path(stage, "checkpoints", "last.ckpt")
    resume = last if last.is_file() else None
    if resume is not None:
        print(f"[quickstart] {stage}: resuming from {resume} (--redo {stage} starts over)", flush=True)
    cli = run_cli("fit", config, resume)
    shutil.rmtree(run.path(stage, "checkpoints"), ignore_errors=True)
    return cli


def clear_stage(run: Run, stage: str) -> None:
    """Empty a stage's folder before it runs again; a :data:`RESUMABLE` stage keeps its ``checkpoints`` and, when
    it will resume from one, its ``logs`` too, so the interrupted part's metrics stay (the resumed part logs into the
    next ``logs/version_*``)."""
    folder = run.path(stage)
    if stage not in RESUMABLE or not folder.is_dir() or folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)  # refuses a symlink (ignored): a linked folder's files stay
        return
    keep = {"checkpoints", "logs"} if (folder / "checkpoints" / "last.ckpt").is_file() else {"checkpoints"}
    for child in folder.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child)
        elif child.is_file():
            child.unlink()


class Run:
    """The run folder: stage folders, ``DONE`` markers, and the resolved configs.

    ``accelerator`` goes into every stage's ``trainer.accelerator`` (Lightning's names: ``cpu``, ``gpu``, ``auto``).
    ``overrides`` maps a config name (``"*"``: every config) to dotted config values applied after the stage's own
    (:func:`parse_overrides` reads them from ``--set``). ``scene`` changes the world's scenes
    (:func:`~spr_lightning.shapes.scene.scene_config`) when the world stage runs; it is kept in
    ``world/scene.json``, from which the later stages read it (:func:`world_scene`). ``model`` changes the size
    preset's language model (:data:`MODEL_KEYS`) when the base stage runs; ``base/DONE`` records what was built.
    ``vision`` changes the preset's vision tower (:data:`VISION_KEYS`) when the vision stage runs; the tower's own
    ``config.json`` records what was built.
    """

    def __init__(self, root: Path, size_name: str, accelerator: str = "cpu",
                 overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 scene: Mapping[str, Any] | None = None, model: Mapping[str, int] | None = None,
                 vision: Mapping[str, int] | None = None) -> None:
        self.root = root
        self.scene = dict(scene or {})
        self.size_name = size_name
        self.size = size_by_name(size_name)
        if model:
            self.size = replace(self.size, model={**self.size.model, **model})
        if vision:
            self.size = replace(self.size, vision={**self.size.vision, **vision})
        if accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
        self.accelerator = accelerator
        self.overrides = {name: dict(values) for name, values in (overrides or {}).items()}

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def done(self, stage: str) -> bool:
        return self.path(stage, "DONE").is_file()

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        marker = self.path(stage, "DONE")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"size": self.size_name, **info}, indent=2), encoding="utf-8")

    def config(self, stage: str, template: str, overrides: dict[str, Any]) -> Path:
        merged = {"trainer.accelerator": self.accelerator, **overrides, **self.overrides.get("*", {}),
                  **self.overrides.get(stage, {})}
        return write_config(template, self.path("configs", f"{stage}.yaml"), merged)


def parse_overrides(items: Sequence[str], names: Sequence[str] = CONFIG_NAMES) -> dict[str, dict[str, Any]]:
    """``["sft:model.init_args.lr=5e-4", "*:trainer.precision=bf16-mixed"]`` -> ``{config name: {key: value}}``.

    Values are read as YAML (``true`` a bool, ``[a, b]`` a list), and a number YAML 1.1 leaves a string (``5e-4``,
    no dot) as a float, the way LightningCLI reads a float argument.
    """
    parsed: dict[str, dict[str, Any]] = {}
    for item in items:
        name, colon, rest = item.partition(":")
        key, equals, value = rest.partition("=")
        if not colon or not equals or not key:
            raise ValueError(f"--set {item!r}: expected CONFIG:dotted.key=value, e.g. sft:model.init_args.lr=5e-4")
        if name != "*" and name not in names:
            raise ValueError(f"--set {item!r}: no config named {name!r}; configs: {', '.join(names)} (or * for all)")
        parsed.setdefault(name, {})[key] = _yaml_value(value)
    return parsed


def _yaml_value(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_scene(world: Path) -> dict[str, Any]:
    """The scene settings a world folder was made with (``{}``: the defaults, or a world older than the file)."""
    path = world / SCENE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def world_scene(run: Run) -> dict[str, Any]:
    """The scene settings of the run's world (with an experiment's links: the start's world)."""
    return read_scene(run.path("world"))


def parse_scene(items: Sequence[str]) -> dict[str, Any]:
    """``["small_side=[0.14, 0.18]", "max_objects=12"]`` -> scene settings, checked by ``scene_config``."""
    from spr_lightning.shapes import scene_config

    scene: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError(f"--scene {item!r}: expected KEY=VALUE, e.g. small_side=[0.14,0.18]")
        scene[key] = yaml.safe_load(value)
    scene_config(WORLD_IMAGE_SIZE, scene)
    return scene


# -------------------------------------------------------------------------------------------- stages
def stage_world(run: Run) -> dict[str, Any]:
    """The world, plus the warm-up scenes of the SFT curriculum (:data:`QuickstartSize.warmup`)."""
    import random

    from spr_lightning.shapes import scene_config, write_world

    workers = min(2, os.cpu_count() or 1)
    run.path("world").mkdir(parents=True, exist_ok=True)
    run.path("world", SCENE_FILE).write_text(json.dumps(run.scene, indent=1), encoding="utf-8")
    paths = write_world(run.path("world"), run.size.world, seed=0, coord_format=COORD_FORMAT, workers=workers,
                        scene_config=scene_config(WORLD_IMAGE_SIZE, run.scene))
    tasks = set(SFT_TASKS)
    lines = [line for line in paths.sft["train"].read_text(encoding="utf-8").splitlines()
             if json.loads(line)["task"] in tasks]
    warm = []
    for most, count in run.size.warmup.items():
        folder = f"warmup_{most}"
        config = scene_config(WORLD_IMAGE_SIZE, {**run.scene, "min_objects": max(1, most - 1), "max_objects": most})
        warm_paths = write_world(run.path("world", folder), {"train": count}, seed=100 + most,
                                 coord_format=COORD_FORMAT, workers=workers, rec_per_image=2, scene_config=config)
        for line in warm_paths.sft["train"].read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["task"] == "rec":
                record["image"] = f"{folder}/{record['image']}"  # relative to the world folder, like the rest
                warm.append(json.dumps(record))
    lines += warm
    random.Random(0).shuffle(lines)
    run.path("world", "sft_quickstart_train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"images": run.size.world, "warmup": run.size.warmup, "sft_samples": len(lines),
            "warmup_samples": len(warm), "scene": run.scene}


def fit_overrides(run: Run, stage: str, max_steps: int) -> dict[str, Any]:
    """The trainer overrides every ``fit`` stage shares: steps, and its folder for logs and the exported model."""
    return {"trainer.max_steps": max_steps, "trainer.default_root_dir": str(run.path(stage)),
            "trainer.logger.init_args.save_dir": str(run.path(stage)),
            "trainer.callbacks[0].init_args.dirpath": str(run.path(stage, "model"))}


def stage_vision(run: Run) -> dict[str, Any]:
    s, scene = run.size, world_scene(run)
    config = run.config("vision", "vision.yaml", {
        **fit_overrides(run, "vision", s.vision_steps),
        **{f"model.init_args.{k}": v for k, v in s.vision.items()},
        "data.init_args.image_size": s.vision["image_size"], "data.init_args.patch_size": s.vision["patch_size"],
        "data.init_args.num_train": s.vision_scenes, "data.init_args.batch_size": s.vision_batch_size,
        **({"data.init_args.scene": scene} if scene else {}),
    })  # fmt: skip
    fit_stage(run, "vision", config)
    return {"model": str(run.path("vision", "model", "final")), "tower": s.vision}


def build_base(run: Run, seed: int = 0) -> dict[str, Any]:
    """The small LLaVA around the stage-``vision`` tower, with the coordinate format's location tokens."""
    from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, build_small_llava

    tokens = MINIGPT_V2_TOKENS if COORD_FORMAT == "minigpt_v2" else ()
    build_small_llava(run.path("base", "model"), seed=seed, vision_tower=run.path("vision", "model", "final"),
                      location_tokens=tokens, **run.size.model)
    return {"model": run.size.model, "seed": seed, "vision_tower": str(run.path("vision", "model", "final"))}


def stage_base(run: Run) -> dict[str, Any]:
    return build_base(run)


def stage_clip(run: Run) -> dict[str, Any]:
    world, s = run.path("world"), run.size
    config = run.config("clip", "clip.yaml", {
        **fit_overrides(run, "clip", s.clip_steps),
        "data.init_args.annotations": str(world / "annotations" / "instances_train.json"),
        "data.init_args.image_root": str(world / "images"), "data.init_args.batch_size": s.clip_batch_size,
    })  # fmt: skip
    fit_stage(run, "clip", config)
    return {"model": str(run.path("clip", "model", "final"))}


def stage_sft(run: Run) -> dict[str, Any]:
    s = run.size
    config = run.config("sft", "sft.yaml", {
        **fit_overrides(run, "sft", s.sft_steps),
        "model.init_args.model_name_or_path": str(run.path("base", "model")),
        "data.init_args.train_file": str(run.path("world", "sft_quickstart_train.jsonl")),
        "data.init_args.image_root": str(run.path("world")), "data.init_args.batch_size": s.sft_batch_size,
    })  # fmt: skip
    fit_stage(run, "sft", config)
    return {"model": str(run.path("sft", "model", "final"))}


def stage_generate(run: Run) -> dict[str, Any]:
    world, s, shards = run.path("world"), run.size, str(run.path("generate", "candidates"))
    config = run.config("generate", "generate.yaml", {
        # Predict stages have no logger: without a root dir LightningCLI writes its config.yaml to the cwd.
        "trainer.default_root_dir": str(run.path("generate")),
        "trainer.callbacks[0].init_args.output_dir": shards,
        "model.init_args.model_name_or_path": str(run.path("sft", "model", "final")),
        "model.init_args.num_candidates": s.num_candidates, "model.init_args.max_new_tokens": s.max_new_tokens,
        "data.init_args.annotations": str(world / "annotations" / "instances_train.json"),
        "data.init_args.image_root": str(world / "images"), "data.init_args.skip_done_in": shards,
        "data.init_args.max_images": s.generate_images,
    })  # fmt: skip
    run_cli("predict", config)
    return {"shards": shards}


def stage_score(run: Run) -> dict[str, Any]:
    shards, scene = str(run.path("score", "pairs")), world_scene(run)
    config = run.config("score", "score.yaml", {
        "trainer.default_root_dir": str(run.path("score")),
        "trainer.callbacks[0].init_args.output_dir": shards,
        "model.init_args.semantic_scorer.init_args.model_name": str(run.path("clip", "model", "final")),
        "data.init_args.urls": str(run.path("generate", "candidates")), "data.init_args.skip_done_in": shards,
        **({"model.init_args.grounder.init_args.scene": scene} if scene else {}),
    })  # fmt: skip
    cli = run_cli("predict", config)
    summary = dict(getattr(cli.model, "summary", {}) or {})
    if not summary.get("pairs"):
        raise RuntimeError("the scoring stage made no preference pairs (every region's candidates tied): "
                           "generate more regions or candidates")
    return {"shards": shards, "summary": summary}


def stage_dpo(run: Run) -> dict[str, Any]:
    s = run.size
    config = run.config("dpo", "dpo.yaml", {
        "trainer.max_epochs": s.dpo_epochs, "trainer.max_steps": s.dpo_max_steps,
        "trainer.default_root_dir": str(run.path("dpo")), "trainer.logger.init_args.save_dir": str(run.path("dpo")),
        "trainer.callbacks[0].init_args.dirpath": str(run.path("dpo", "adapter")),
        "model.init_args.model_name_or_path": str(run.path("sft", "model", "final")),
        "data.init_args.train_urls": str(run.path("score", "pairs")), "data.init_args.batch_size": s.dpo_batch_size,
    })  # fmt: skip
    run_cli("fit", config)
    return {"adapter": str(run.path("dpo", "adapter", "final"))}


def eval_overrides(run: Run, task: str, model: str, adapter: str | None, folder: Path) -> dict[str, Any]:
    """Config overrides of ``configs/quickstart/eval_<task>.yaml`` for ``model`` (+ ``adapter``) on the world's
    test split of ``task`` (``rec`` or ``phrase``), writing into ``folder``."""
    world, s = run.path("world"), run.size
    overrides: dict[str, Any] = {
        "trainer.default_root_dir": str(folder), "model.init_args.model_name_or_path": model,
        "model.init_args.adapter_path": adapter, "data.init_args.image_root": str(world / "images"),
        "data.init_args.max_samples": s.rec_samples if task == "rec" else s.phrase_samples,
    }  # fmt: skip
    if task == "rec":
        overrides["data.init_args.annotations"] = str(world / "annotations" / "refcoco_shapes.json")
    else:
        overrides["data.init_args.annotations"] = str(world / "annotations" / "flickr_test.json")
        overrides["model.init_args.max_new_tokens"] = s.max_new_tokens
    return overrides


def _evaluate(run: Run, task: str, model: str) -> dict[str, float]:
    folder = run.path("eval", f"{task}_{model}")
    adapter = str(run.path("dpo", "adapter", "final")) if model == "spr" else None
    overrides = eval_overrides(run, task, str(run.path("sft", "model", "final")), adapter, folder)
    cli = run_cli("validate", run.config(f"eval_{task}_{model}", f"eval_{task}.yaml", overrides))
    metrics = {k.split("/", 1)[-1]: float(v) for k, v in cli.trainer.callback_metrics.items()}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def stage_eval(run: Run) -> dict[str, Any]:
    return {f"{task}_{model}": _evaluate(run, task, model) for model in ("sft", "spr") for task in ("rec", "phrase")}


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "world": stage_world, "vision": stage_vision, "base": stage_base, "clip": stage_clip, "sft": stage_sft,
    "generate": stage_generate, "score": stage_score, "dpo": stage_dpo, "eval": stage_eval,
}  # fmt: skip
#: Stages that start over when they rerun (``predict`` stages resume from their shards instead) ...
_RESTART = ("vision", "clip", "sft", "dpo", "eval")
#: ... except that these resume from their last checkpoint when an interrupted run left one (:func:`fit_stage`).
RESUMABLE = ("vision", "clip", "sft")


# -------------------------------------------------------------------------------------------- report
def metric_rows(results: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(name, SFT, SFT + SPR)`` in percent: REC Acc@0.5-0.9, then phrase-grounding Recall@1."""
    rows = [(f"REC Acc@{t}", results["rec_sft"][f"acc@{t}"], results["rec_spr"][f"acc@{t}"]) for t in REC_THRESHOLDS]
    rows.append(("Phrase Recall@1", results["phrase_sft"]["recall@1"], results["phrase_spr"]["recall@1"]))
    return [(name, 100 * a, 100 * b) for name, a, b in rows]


def format_table(rows: list[tuple[str, float, float]], title: str) -> str:
    lines = [title, f"{'metric':<18}{'SFT':>9}{'SFT+SPR':>10}{'change':>9}", "-" * 46]
    lines += [f"{name:<18}{a:>9.1f}{b:>10.1f}{b - a:>+9.1f}" for name, a, b in rows]
    return "\n".join(lines)


def reward_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"rewards/chosen": [(step, value), ...], ...}`` from DPO's CSVLogger file."""
    import csv

    curves: dict[str, list[tuple[int, float]]] = {}
    with metrics_csv.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
                if row.get(name):
                    curves.setdefault(name, []).append((int(row["step"]), float(row[name])))
    return curves


def plot(rows: list[tuple[str, float, float]], curves: dict[str, list[tuple[int, float]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(rows))
    left.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="SFT")
    left.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="SFT + SPR")
    left.set_xticks(list(xs), [r[0].replace("REC ", "").replace("Phrase ", "Phr. ") for r in rows], fontsize=8)
    left.set_ylim(0, max([1.0] + [max(r[1], r[2]) * 1.15 for r in rows]))
    left.set_ylabel("%")
    left.set_title("Grounding on the SPR-Shapes test split")
    left.legend()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        if name in curves:
            right.plot(*zip(*curves[name]), label=name.split("/")[1])
    right.set_xlabel("DPO step")
    right.set_title("DPO implicit rewards")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(run: Run, elapsed: float) -> str:
    results = json.loads(run.path("eval", "DONE").read_text(encoding="utf-8"))["results"]
    rows = metric_rows(results)
    logs = sorted(run.path("dpo", "logs").glob("version_*/metrics.csv"))
    curves = reward_curves(logs[-1]) if logs else {}
    png = plot(rows, curves, run.path("quickstart.png"))
    title = f"SPR quickstart ({run.size_name}) on SPR-Shapes, test split: SFT model vs SFT + SPR (DPO adapter)"
    table = format_table(rows, title)
    score = json.loads(run.path("score", "DONE").read_text(encoding="utf-8"))["info"].get("summary", {})
    extra = (f"pairs: {score.get('pairs', 0):.0f} from {score.get('queries', 0):.0f} regions; mean S chosen "
             f"{score.get('chosen_total', 0):.3f} vs rejected {score.get('rejected_total', 0):.3f}")
    extra += (f"; refinement snapped {score.get('refine_snapped', 0):.0f} boxes to annotations and removed "
              f"{score.get('refine_unmatched', 0):.0f} that matched none")
    if "rewards/margins" in curves:
        extra += f"; final DPO reward margin {curves['rewards/margins'][-1][1]:+.3f}"
    text = f"{table}\n{extra}\nplot: {png}\nwall time: {elapsed / 60:.1f} min"
    run.path("quickstart.txt").write_text(text + "\n", encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------- main
def reruns(redo: str | None, stage: str) -> bool:
    """Whether ``--redo redo`` reruns ``stage`` (it reruns its own stage and every later one)."""
    return redo is not None and STAGES.index(redo) <= STAGES.index(stage)


def parse_whole_numbers(flag: str, items: Sequence[str], keys: Sequence[str]) -> dict[str, int]:
    """``["KEY=VALUE", ...]`` of a repeatable ``flag`` -> ``{KEY: int}``, every KEY one of ``keys``."""
    settings: dict[str, int] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or key not in keys:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE with KEY one of {', '.join(keys)}")
        try:
            settings[key] = int(value)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {key} must be a whole number") from None
        if settings[key] < 1:
            raise ValueError(f"{flag} {item!r}: {key} must be >= 1")
    return settings


def parse_model(items: Sequence[str]) -> dict[str, int]:
    """``["text_hidden=256", "text_layers=4"]`` -> language-model settings for the base stage."""
    model = parse_whole_numbers("--model", items, MODEL_KEYS)
    hidden = model.get("text_hidden", 64)
    if hidden < 64 or hidden % 32:
        raise ValueError(f"--model: text_hidden must be a multiple of 32 (heads of 32 channels) and >= 64; "
                         f"got {model}")
    return model


def parse_vision(items: Sequence[str]) -> dict[str, int]:
    """``["image_size=144", "patch_size=12"]`` -> vision-tower settings for the vision stage."""
    vision = parse_whole_numbers("--vision", items, VISION_KEYS)
    if vision.get("hidden_size", 32) % 32:
        raise ValueError(f"--vision: hidden_size must be a multiple of 32 (heads of 32 channels); got {vision}")
    return vision


def built_tower_shape(out: str | Path) -> dict[str, int] | None:
    """:data:`VISION_KEYS` of the tower the vision stage of ``out`` exported (``None``: none built yet)."""
    stage = Path(out).resolve() / "vision"
    config = stage / "model" / "final" / "config.json"
    if not (stage / "DONE").is_file() or not config.is_file():
        return None
    tower = json.loads(config.read_text(encoding="utf-8"))
    return {"image_size": tower["image_size"], "patch_size": tower["patch_size"],
            "hidden_size": tower["hidden_size"], "num_layers": tower["num_hidden_layers"]}


def check_vision_tower(out: str | Path, size: str, vision: Mapping[str, int] | None, redo: str | None = None) -> None:
    """Refuse ``vision`` when the tower already pretrained in ``out`` has another shape and is not being redone:
    the base model and everything after it were built on that one.

    Raises:
        ValueError: ``image_size`` not a multiple of ``patch_size``, or naming both shapes and the way out.
    """
    if not vision:
        return
    wanted = {**size_by_name(size).vision, **vision}
    if wanted["image_size"] % wanted["patch_size"]:
        raise ValueError(f"--vision: image_size {wanted['image_size']} must be a multiple of patch_size "
                         f"{wanted['patch_size']}")
    if reruns(redo, "vision"):
        return
    built = built_tower_shape(out)
    if built is not None and built != wanted:
        raise ValueError(f"{Path(out).resolve() / 'vision'} holds a tower built with {built}, not {wanted}: drop "
                         "--vision to reuse it, or add --redo vision to retrain it and every later stage")


def check_base_model(out: str | Path, size: str, model: Mapping[str, int] | None, redo: str | None = None) -> None:
    """Refuse ``model`` when the base model already built in ``out`` has another shape and is not being rebuilt:
    the SFT start and everything after it were trained on that one.

    Raises:
        ValueError: naming both shapes and the way out.
    """
    done = Path(out).resolve() / "base" / "DONE"
    if not model or not done.is_file() or reruns(redo, "base"):
        return
    wanted = {**size_by_name(size).model, **model}
    built = json.loads(done.read_text(encoding="utf-8")).get("info", {}).get("model")
    if built != wanted:
        raise ValueError(f"{done.parent} holds a model built with {built}, not {wanted}: drop --model to reuse it, "
                         "or add --redo base to rebuild it and every later stage")


def check_world_scene(out: str | Path, scene: Mapping[str, Any] | None, redo: str | None = None) -> None:
    """Refuse ``scene`` when the world already made in ``out`` has other scene settings and is not being remade:
    every later stage (the tower, the SFT data, the grounder) was made for that world.

    Raises:
        ValueError: naming both settings and the way out.
    """
    world = Path(out).resolve() / "world"
    if scene is None or reruns(redo, "world") or not (world / "DONE").is_file() or dict(scene) == read_scene(world):
        return
    raise ValueError(f"{world} was made with scene {read_scene(world)}, not {dict(scene)}: drop --scene "
                     "to reuse it, or add --redo world to remake the world and every later stage")


def run_quickstart(out: str | Path = "runs/quickstart", size: str = "small", redo: str | None = None,
                   accelerator: str = "cpu", overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   scene: Mapping[str, Any] | None = None, model: Mapping[str, int] | None = None,
                   vision: Mapping[str, int] | None = None, until: str | None = None) -> str:
    """Run (or resume) every stage into ``out`` on ``accelerator``, with ``overrides`` (:class:`Run`) applied to
    the configs of the stages it runs, ``scene`` to a world it makes, ``vision`` to a tower it pretrains and
    ``model`` to a base model it builds; returns the printed report.

    ``until`` stops after that stage (e.g. ``"sft"`` to build an SFT start for ``experiments.shapes --sft-start``
    without the quickstart's own SPR stages); the return value then says where it stopped.

    Raises:
        ValueError: ``scene``, ``vision`` or ``model`` differs from that of the world, tower or base model already
            made in ``out`` (``--redo world`` / ``--redo vision`` / ``--redo base`` remakes it).
    """
    size_by_name(size)
    if redo is not None and redo not in STAGES:
        raise ValueError(f"redo must be one of {STAGES}, got {redo!r}")
    if until is not None and until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_world_scene(out, scene, redo)
    check_vision_tower(out, size, vision, redo)
    check_base_model(out, size, model, redo)
    run = Run(Path(out).resolve(), size, accelerator, overrides, scene, model, vision)
    start = time.perf_counter()
    stages = STAGES if until is None else STAGES[: STAGES.index(until) + 1]
    with StopRequest("quickstart") as stop:
        for k, stage in enumerate(stages):
            if reruns(redo, stage):
                shutil.rmtree(run.path(stage), ignore_errors=True)
            if run.done(stage):
                print(f"[quickstart] {stage}: done already ({run.path(stage, 'DONE')})", flush=True)
                continue
            if stage in _RESTART:
                clear_stage(run, stage)
            print(f"\n[quickstart] stage {k + 1}/{len(STAGES)}: {stage}", flush=True)
            began = time.perf_counter()
            with stop.stage(stage):
                info = STAGE_FUNCTIONS[stage](run)
            seconds = time.perf_counter() - began
            run.mark_done(stage, {"seconds": round(seconds, 1), "results" if stage == "eval" else "info": info})
            print(f"[quickstart] {stage} finished in {seconds:.0f} s", flush=True)
            stop.check(stage)
    if stages != STAGES:
        minutes = (time.perf_counter() - start) / 60
        text = (f"[quickstart] stopped after {until} (--until {until}) in {minutes:.1f} min; "
                f"run again without --until to go on from {STAGES[len(stages)]}")
        print(text, flush=True)
        return text
    text = report(run, time.perf_counter() - start)
    print("\n" + text, flush=True)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="run folder (stages already DONE there are reused)")
    # "toy" (the end-to-end test's size) is accepted but not advertised.
    parser.add_argument("--size", default="small", choices=list(SIZES), metavar="{small,full}",
                        help="small (default): under 10 min on 2 CPU cores; full: longer, better models")
    parser.add_argument("--redo", choices=STAGES, help="rerun this stage and every later one")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage, e.g. sft to build an SFT start "
                        "for python -m spr_lightning.experiments.shapes --sft-start (a later run goes on from there)")
    parser.add_argument("--accelerator", default="cpu", choices=ACCELERATORS,
                        help="Lightning accelerator of every stage (default cpu: the README's timings and numbers "
                        "are CPU runs; gpu or auto for a CUDA device, one device)")
    parser.add_argument("--set", action="append", default=[], metavar="CONFIG:KEY=VALUE",
                        help="change one value of a stage's config, e.g. sft:model.init_args.lr=5e-4 or "
                        "sft:trainer.max_steps=32000 (repeatable; * for every config). Applies to stages that run: "
                        "a stage already DONE is reused as it is (--redo STAGE reruns it)")
    parser.add_argument("--scene", action="append", default=None, metavar="KEY=VALUE",
                        help="change the world's scenes, e.g. small_side=[0.14,0.18] large_side=[0.26,0.34] "
                        "max_objects=12 (repeatable; fields of spr_lightning.shapes.SceneConfig). Used when the "
                        "world is made and kept in world/scene.json for the tower, the grounder and reruns")
    parser.add_argument("--model", action="append", default=None, metavar="KEY=VALUE",
                        help="change the size preset's language model, e.g. text_hidden=256 text_layers=4 (repeatable; "
                        f"keys {', '.join(MODEL_KEYS)}). Used when the base model is built; recorded in base/DONE")
    parser.add_argument("--vision", action="append", default=None, metavar="KEY=VALUE",
                        help="change the size preset's vision tower, e.g. image_size=144 (repeatable; keys "
                        f"{', '.join(VISION_KEYS)}; image tokens per image: (image_size / patch_size)^2). Used "
                        "when the tower is pretrained; the base model takes its shape from it")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        scene = None if args.scene is None else parse_scene(args.scene)
        model = None if args.model is None else parse_model(args.model)
        vision = None if args.vision is None else parse_vision(args.vision)
        check_world_scene(args.out, scene, args.redo)
        check_vision_tower(args.out, args.size, vision, args.redo)
        check_base_model(args.out, args.size, model, args.redo)
    except ValueError as error:
        parser.error(str(error))
    run_quickstart(args.out, args.size, args.redo, args.accelerator, overrides, scene, model, vision, args.until)


if __name__ == "__main__":
    main()
