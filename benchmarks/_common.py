"""Helpers shared by the benchmark scripts: a CPU-sized LLaVA, pair shards, machine facts, fresh-process runs.

Every provider of a benchmark runs in a fresh Python process (:func:`run_worker`) so that its peak RSS
(``ru_maxrss``, monotone over a process's life) is its own and not the maximum of everything run before it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# Nothing in a benchmark may download weights: every model is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class LlavaSize:
    """Shape of the benchmark LLaVA (CLIP vision tower + MLP projector + Llama decoder)."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    vocab_size: int | None  # None: the tokenizer's own size

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


#: ``full``: LLaVA-1.5's image geometry (CLIP 336 px / patch 14 = 576 image tokens) with a small decoder, so that a
#: step costs seconds on a CPU and the prompt/completion proportions are those of a real SPR batch.
#: ``toy``: seconds per whole run, for the smoke test.
LLAVA_SIZES = {
    "full": LlavaSize(image_size=336, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                      text_hidden=512, text_intermediate=1376, text_layers=4, text_heads=8, vocab_size=32000),
    "toy": LlavaSize(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                     text_hidden=64, text_intermediate=128, text_layers=2, text_heads=4, vocab_size=None),
}


def make_bench_processor(size: str = "full"):
    """The tiny LLaVA's tokenizer (1k-token byte-level BPE + LLaVA-1.5 chat template) in a ``LlavaProcessor`` whose
    CLIP image processor and image-token count match ``LLAVA_SIZES[size]``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from spr_lightning.tiny.tokenizer_factory import build_llava_tokenizer

    spec = LLAVA_SIZES[size]
    tokenizer = build_llava_tokenizer()
    side = spec.image_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=spec.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tokenizer.chat_template,
    )


def save_bench_processor(out_dir: str | Path, size: str = "full") -> Path:
    """Save only the processor (enough for ``AutoProcessor`` and ``PreferenceDataModule``)."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    make_bench_processor(size).save_pretrained(path)
    return path


def build_bench_llava(out_dir: str | Path, size: str = "full", seed: int = 0) -> Path:
    """Build a random LLaVA-architecture model of ``LLAVA_SIZES[size]`` and save it with its processor.

    The tokenizer is the one of :func:`spr_lightning.tiny.llava.make_tiny_llava`; the model's vocabulary may be
    larger (32k, a Llama-sized LM head, which is what makes log-prob computation cost what it costs in a real
    model). Saved with ``save_pretrained`` so both trainers load it exactly as they would load a hub model.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from spr_lightning.tiny._common import seeded

    spec = LLAVA_SIZES[size]
    processor = make_bench_processor(size)
    tokenizer = processor.tokenizer
    vocab = max(spec.vocab_size or 0, len(tokenizer))
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                              projection_dim=spec.vision_hidden, num_hidden_layers=spec.vision_layers,
                              num_attention_heads=spec.vision_heads, image_size=spec.image_size,
                              patch_size=spec.patch_size)
    text = LlamaConfig(vocab_size=vocab, hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       num_key_value_heads=spec.text_heads, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    with seeded(seed):
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


_OBJECTS = ("man", "woman", "dog", "car", "bus", "chair", "table", "tree", "building", "horse", "boat", "bench")
_COLOURS = ("red", "blue", "green", "white", "black", "brown", "yellow", "gray")
_PLACES = ("left", "right", "top", "bottom", "middle", "front", "back", "corner")


def build_shapes_sft_world(tmp: Path, images: int) -> Path:
    """An SPR-Shapes world of ``images`` train images (7 SFT samples each); returns its SFT JSONL."""
    from spr_lightning.quickstart import COORD_FORMAT
    from spr_lightning.shapes import write_world

    paths = write_world(tmp / "world", {"train": images}, seed=0, image_size=224, coord_format=COORD_FORMAT)
    return Path(paths.sft["train"])


def build_quickstart_llava(tmp: Path, text_hidden: int = 128, text_layers: int = 2) -> Path:
    """The quickstart's small LLaVA (96-px tower, MiniGPT-v2 location tokens) with a ``text_hidden x text_layers``
    Llama, random weights, saved under ``tmp/model_<hidden>x<layers>``."""
    from spr_lightning.quickstart import VISION_96
    from spr_lightning.tiny.small_llava import MINIGPT_V2_TOKENS, build_small_llava

    return build_small_llava(tmp / f"model_{text_hidden}x{text_layers}", image_size=VISION_96["image_size"],
                             patch_size=VISION_96["patch_size"], vision_hidden=VISION_96["hidden_size"],
                             vision_layers=VISION_96["num_layers"], text_hidden=text_hidden, text_layers=text_layers,
                             location_tokens=MINIGPT_V2_TOKENS)


def _box(rng: random.Random) -> str:
    x1, y1 = rng.randint(0, 600), rng.randint(0, 600)
    return f"[{x1}, {y1}, {x1 + rng.randint(50, 399)}, {y1 + rng.randint(50, 399)}]"


def describe(rng: random.Random, clauses: int, boxes: bool) -> str:
    """A region description of ``clauses`` clauses (~32 tokens each with a box, ~12 without)."""
    parts = []
    for _ in range(clauses):
        obj, colour, place = rng.choice(_OBJECTS), rng.choice(_COLOURS), rng.choice(_PLACES)
        other = rng.choice(_OBJECTS)
        where = f" {_box(rng)}" if boxes else ""
        parts.append(f"a {colour} {obj}{where} is on the {place} near the {other}")
    return ("In this region " + ", and ".join(parts) + ".").capitalize()


def write_bench_pairs(out_dir: str | Path, num_pairs: int, *, image_size: tuple[int, int] = (480, 360),
                      samples_per_shard: int = 64, seed: int = 0, chosen_clauses: int = 2,
                      rejected_clauses: int = 5) -> Path:
    """Pair shards in the stage-2 schema (what the scoring stage writes), with JPEG images of ``image_size``.

    With the default clause counts, chosen answers carry boxes (two clauses, ~65 tokens with the tiny LLaVA
    tokenizer, which spells digits one by one) and rejected ones are vaguer (five clauses without boxes, ~63
    tokens), so completions are the length of SPR's region descriptions. One writer, ``pairs-r000-*.tar``
    in key order, so a sequential reader sees pair ``i`` at position ``i``.
    """
    from PIL import Image, ImageDraw

    from callbacks import ShardWriter
    from spr_lightning.shards import SCHEMA_VERSION

    rng = random.Random(seed)
    width, height = image_size
    writer = ShardWriter(str(out_dir), prefix="pairs", samples_per_shard=samples_per_shard).start(0)
    for i in range(num_pairs):
        image = Image.new("RGB", (width, height), tuple(rng.randint(0, 90) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x1, y1 = rng.randint(0, width - 40), rng.randint(0, height - 40)
            draw.rectangle((x1, y1, x1 + rng.randint(20, 160), y1 + rng.randint(20, 120)),
                           fill=tuple(rng.randint(0, 255) for _ in range(3)))
        record = {
            "schema": SCHEMA_VERSION, "query_id": f"bench{i:06d}", "image_id": i, "image_size": [width, height],
            "region": [0, 0, width, height], "prompt": f"Describe the region {_box(rng)} in detail.",
            "chosen": describe(rng, chosen_clauses, boxes=True),
            "rejected": describe(rng, rejected_clauses, boxes=False),
            "scores": {"chosen": {"sem": 1.0, "loc": 1.0, "total": 1.0},
                       "rejected": {"sem": 0.2, "loc": 0.0, "total": 0.1}},
            "coord_format": "ferret", "source": "benchmark",
        }
        writer.write_sample({"__key__": record["query_id"], "json": record, "jpg": image})
    writer.finish()
    return Path(out_dir)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine_info() -> dict[str, Any]:
    """Facts that go with every result: date, CPU, cores, load, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_1m_5m_15m": [round(x, 2) for x in load_average()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_worker(script: str | Path, args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script --worker-json OUT *args`` in a fresh process and return the JSON it wrote.

    Raises:
        RuntimeError: the worker failed; the message carries the tail of its output.
    """
    with tempfile.TemporaryDirectory(prefix="spr_bench_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker-json", str(out), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"worker {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=1))
