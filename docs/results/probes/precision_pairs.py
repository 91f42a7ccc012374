"""One-off probe (docs/results/notebook.md, "The reward decides by S_sem"): does DPO on *box precision alone* move the
strict IoU thresholds?

SPR pairs its best description with its worst, so the two sides differ in which objects they name and where. Here
each pair is one description against itself: chosen = the score stage's refined answer (boxes that match an
annotation at IoU > 0.5 snapped to it), rejected = the same answer as the policy wrote it (``chosen_raw``). Only
the snapped coordinate tokens differ, so the preference says "these boxes, exactly" and nothing else. Pairs where
refinement changed nothing are dropped. The image, prompt and scores are copied from the input pair. Run by hand,
not part of the package:

    python docs/results/probes/precision_pairs.py PAIRS_DIR OUT_DIR

then train and evaluate on OUT_DIR as on any pair folder (e.g. put it in place of an experiment arm's
``score/pairs``, keeping that stage's ``DONE``, and rerun the experiment command).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from callbacks import ShardWriter
from datamodules.preference import expand_urls
from spr_lightning.experiments.pair_quality import pair_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", help="a score stage's pairs folder (records with chosen and chosen_raw)")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    writer = ShardWriter(args.out, prefix="pairs", samples_per_shard=1000).start()
    unchanged = 0
    for _, key, members in pair_samples(expand_urls(args.pairs)):
        record = json.loads(members["json"])
        if record["chosen"] == record.get("chosen_raw", record["chosen"]):
            unchanged += 1
            continue
        record["rejected"] = record["chosen_raw"]
        writer.write_sample({"__key__": key, "json": json.dumps(record).encode(), "jpg": members["jpg"]})
    writer.finish()
    print(f"{writer.samples_written} precision pairs, {unchanged} pairs whose refinement changed nothing; {args.out}")

if __name__ == "__main__":
    main()
