"""``python -m spr_lightning.shapes OUT_DIR [--size small|full] [--num-images N] [--seed S] ...``

Writes an SPR-Shapes world (see ``docs/shapes.md``) and prints where everything went.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from spr_lightning.coords import available_codecs

#: Images per split of the presets: ``small`` for a CPU quickstart, ``full`` for a real (GPU) run.
PRESETS = {"small": {"train": 200, "val": 50, "test": 50}, "full": {"train": 8000, "val": 1000, "test": 1000}}


def split_counts(size: str, num_images: int | None) -> dict[str, int]:
    """The preset's counts, or ``num_images`` split 80/10/10 (val and test get at least one image each)."""
    if num_images is None:
        return dict(PRESETS[size])
    if num_images < 3:
        raise ValueError(f"--num-images must be at least 3 (one image per split), got {num_images}")
    held_out = max(1, num_images // 10)
    return {"train": num_images - 2 * held_out, "val": held_out, "test": held_out}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spr_lightning.shapes", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the world into")
    parser.add_argument("--size", choices=sorted(PRESETS), default="small",
                        help="preset images per split: small = 200/50/50, full = 8000/1000/1000")
    parser.add_argument("--num-images", type=int, default=None, help="total images instead of the preset (80/10/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--coord-format", default="ferret", choices=available_codecs(),
                        help="box format of the SFT answers")
    parser.add_argument("--workers", type=int, default=0, help="drawing processes (0: this process)")
    args = parser.parse_args(argv)

    from spr_lightning.shapes.writer import write_world  # after parsing: --help stays instant

    counts = split_counts(args.size, args.num_images)
    start = time.perf_counter()
    paths = write_world(args.out_dir, counts, seed=args.seed, image_size=args.image_size,
                        coord_format=args.coord_format, workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"wrote {sum(counts.values())} images ({counts}) to {paths.root} in {seconds:.1f} s")
    for name, value in paths.to_dict().items():
        print(f"  {name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
