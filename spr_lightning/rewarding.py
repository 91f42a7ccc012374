"""Stage 2 of SPR: score every candidate description of a region, refine the best, pair it with the worst.

``python -m spr_lightning predict --config configs/score/default.yaml`` runs :class:`PreferenceBuilder` over
candidate shards (:class:`datamodules.candidates.CandidateDataModule`); :class:`callbacks.ShardWriter` writes the
pairs it returns. Per candidate ``T`` of a query (SPR §3.2):

* ``S_sem``: CLIP similarity of ``T_plain`` (boxes stripped) with the region crop and with the full image under
  local attention (:class:`~spr_lightning.scoring.semantic.SemanticScorer`, Eq. 1-2);
* ``S_loc``: Algorithm 1 (:func:`~spr_lightning.scoring.localization.localization_scores`), batched over all
  candidates of the batch, with ``B_ground`` from Grounding DINO on the crop for ``T_plain``;
* ``S = λ S_sem + (1 - λ) S_loc`` (Eq. 3, λ = 0.8).

``loc_mode: algorithm1_gt`` keeps Algorithm 1 but puts the grounder's boxes on the ground-truth side only
(``B_pred = dedup(B_text)``): a written box is then scored on every object, found by the grounder or annotated,
instead of only on the annotated objects the grounder missed (``docs/scoring.md``; not the paper's).
``loc_mode: phrase`` swaps Algorithm 1 for the phrase-matched score of
:mod:`~spr_lightning.scoring.phrase_localization` (each written box against the grounder's boxes for its own
phrase; not the paper's, see that module for why it exists). The grounder then runs once per distinct phrase of a
query instead of once per plain text, and refinement snaps to ``dedup(B_anno ++ all those phrase boxes)``.

The highest-``S`` candidate is refined (:func:`~spr_lightning.scoring.refine.refine_description`) and becomes
``chosen``; the lowest is ``rejected`` as generated. Queries whose best and worst tie are not paired.

Ablations: ``semantic_scorer: null`` scores with ``S_loc`` alone (as λ = 0); ``grounder: null`` runs Algorithm 1
with ``B_ground = ∅`` (annotations are the only ground truth and the written boxes the only predictions).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule
from PIL import Image

from spr_lightning.coords import Codec, get_codec
from spr_lightning.regions import crop_to_image
from spr_lightning.scoring.grounders import Grounder, crop_image, ground_in_region
from spr_lightning.scoring.localization import DEFAULT_DEDUP_IOU_THRESHOLD, Box, localization_scores
from spr_lightning.scoring.phrase_localization import phrase_localization_scores, phrase_targets
from spr_lightning.scoring.refine import refine_description
from spr_lightning.scoring.semantic import SemanticScorer
from spr_lightning.shards import SCHEMA_VERSION

__all__ = ["LOC_MODES", "PreferenceBuilder", "Query", "combine_scores", "select_pair"]

#: ``algorithm1``: SPR's localization score (the paper, default); ``algorithm1_gt``: Algorithm 1 with the
#: grounder's boxes in ``B_gt`` only (``B_pred`` = the written boxes); ``phrase``: the phrase-matched score.
LOC_MODES = ("algorithm1", "algorithm1_gt", "phrase")

log = logging.getLogger(__name__)

_COUNTERS = (
    "queries", "pairs", "ties", "too_few", "candidates", "chosen_total", "rejected_total", "chosen_loc",
    "rejected_loc", "chosen_sem", "rejected_sem", "snapped", "kept", "unmatched", "duplicates", "skipped",
    "emptied",
)  # fmt: skip


def combine_scores(sem: float | None, loc: float, lam: float) -> float:
    """Eq. 3: ``S = λ S_sem + (1 - λ) S_loc``; without a semantic score, ``S = S_loc`` (λ = 0)."""
    return loc if sem is None else lam * sem + (1.0 - lam) * loc


def select_pair(totals: Sequence[float], texts: Sequence[str], min_score_gap: float = 0.0) -> tuple[int, int] | None:
    """``(best, worst)`` candidate indices, or ``None`` when they tie.

    The first maximum and the first minimum win (deterministic). A tie is a gap ``<= min_score_gap`` or the
    same text on both sides: such a pair teaches nothing, so the query is skipped. A blank candidate (the model
    wrote nothing) can be the rejected answer but never the chosen one: it describes nothing.
    """
    said = [i for i, text in enumerate(texts) if text.strip()]
    if len(totals) < 2 or not said:
        return None
    best = max(said, key=lambda i: (totals[i], -i))
    worst = min(range(len(totals)), key=lambda i: (totals[i], i))
    if totals[best] - totals[worst] <= min_score_gap or texts[best] == texts[worst]:
        return None
    return best, worst


@dataclass
class Query:
    """One candidate-shard sample, parsed for scoring."""

    key: str
    record: dict[str, Any]
    image: Image.Image
    image_data: Any  # what the pairs shard stores under "jpg": original JPEG bytes, else the PIL image
    codec: Codec
    coord_format: str
    image_size: tuple[int, int]
    region: Box
    crop_box: Box
    texts: list[str]
    plains: list[str]
    text_boxes: list[list[Box]]
    anno_boxes: list[Box]
    box_phrases: list[list[str]] = field(default_factory=list)  # per candidate, the phrase of each written box
    ground_boxes: list[list[Box]] = field(default_factory=list)
    phrase_ground: dict[str, list[Box]] = field(default_factory=dict)  # loc_mode "phrase": grounder boxes per phrase
    box_scores: list[list[float]] = field(default_factory=list)  # loc_mode "phrase": s_k per candidate


def _box(values: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def _region_and_crop(record: dict[str, Any], image_size: tuple[int, int]) -> tuple[Box, Box]:
    """Accept both the flat ``region``/``crop_box`` fields and a nested ``Region.to_dict()``."""
    region = record["region"]
    if isinstance(region, dict):
        return _box(region["box"]), _box(region.get("crop_box", region["box"]))
    crop = record.get("crop_box") or region or (0, 0, *image_size)
    return _box(region), _box(crop)


class PreferenceBuilder(LightningModule):
    """Scores candidate descriptions and emits (chosen, rejected) pairs (SPR §3.2, Algorithm 1).

    Args:
        semantic_scorer: CLIP scorer for ``S_sem``; ``None``: ``S = S_loc`` (semantic ablation).
        grounder: Grounding DINO backend for ``B_ground``; ``None``: ``B_ground = ∅`` (grounder ablation).
        coord_format_override: decode candidates with this codec instead of each record's ``coord_format``
            (for shards written with a wrong or missing format name).
        lam: λ of Eq. 3 (0.8 in SPR).
        loc_iou_threshold: IoU filter of Algorithm 1 step 6 (0.5) and the refinement match threshold.
        dedup_iou_threshold: greedy de-duplication IoU of Algorithm 1 steps 3-4 and of refinement (the paper
            gives none; 0.7, see :mod:`spr_lightning.scoring.localization`).
        refine: refine the chosen description (SPR); ``False`` pairs the raw texts.
        box_threshold: Grounding DINO box score threshold.
        text_threshold: Grounding DINO token score threshold.
        min_score_gap: skip queries whose best and worst ``S`` differ by at most this.
        coord_options: codec options (e.g. ``{square_pad: false}`` for LLaVA-OneVision's ``llava`` format); they
            update the record's own ``coord_options`` when it has them. Must match what generation used.
        grounder_batch_size: crops per grounder forward pass (backends with ``ground_batch``).
        skip_emptied: drop a query whose best candidate had boxes but lost every one in refinement (none matched
            an annotation). Off by default (the paper keeps such pairs); with a weak policy those box-free chosen
            answers teach DPO to stop writing boxes, so small-model runs turn it on. Counted as ``emptied``.
        refine_keep_unmatched: refinement keeps boxes that match nothing as written instead of removing them
            (:func:`~spr_lightning.scoring.refine.refine_description`); off by default (the paper removes them).
        loc_mode: ``"algorithm1"`` (the paper); ``"algorithm1_gt"``: Algorithm 1 with the grounder's boxes in
            ``B_gt`` only, ``B_pred`` the written boxes alone (not in the paper); or ``"phrase"``: each written box
            scored against the grounder's boxes for its own phrase
            (:mod:`~spr_lightning.scoring.phrase_localization`; not in the paper).
    """

    def __init__(
        self,
        semantic_scorer: SemanticScorer | None = None,
        grounder: Grounder | None = None,
        coord_format_override: str | None = None,
        lam: float = 0.8,
        loc_iou_threshold: float = 0.5,
        dedup_iou_threshold: float = DEFAULT_DEDUP_IOU_THRESHOLD,
        refine: bool = True,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        min_score_gap: float = 0.0,
        coord_options: dict[str, Any] | None = None,
        grounder_batch_size: int = 8,
        skip_emptied: bool = False,
        refine_keep_unmatched: bool = False,
        loc_mode: str = "algorithm1",
    ) -> None:
        super().__init__()
        if loc_mode not in LOC_MODES:
            raise ValueError(f"loc_mode must be one of {LOC_MODES}, got {loc_mode!r}")
        if loc_mode == "phrase" and grounder is None:
            raise ValueError("loc_mode 'phrase' scores each box against the grounder's boxes for its phrase: it needs "
                             "a grounder (grounder: null would tie every candidate at 0)")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if grounder_batch_size < 1:
            raise ValueError(f"grounder_batch_size must be >= 1, got {grounder_batch_size}")
        self.save_hyperparameters(ignore=["semantic_scorer", "grounder"])
        self.semantic_scorer = semantic_scorer
        self.grounder = grounder
        self.counts: dict[str, float] = dict.fromkeys(_COUNTERS, 0.0)
        self._codecs: dict[tuple[str, str], Codec] = {}
        self.summary: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ per batch
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Score all candidates of every query in ``batch``; return the pair samples for the shard writer.

        Samples the data module could not read (``on_error="skip"``: they carry an ``error``) are counted and
        logged, never scored."""
        for sample in batch:
            if "error" in sample:
                self.counts["skipped"] += 1
                log.warning("skipping unreadable candidate sample: %s", sample["error"])
        queries = [self._parse(sample) for sample in batch if "error" not in sample]
        if not queries:
            return []
        self._ground(queries)
        loc = self._localization(queries)
        sem = self._semantic(queries)
        pairs = []
        for q, q_loc, q_sem in zip(queries, loc, sem):
            pair = self._pair(q, q_loc, q_sem)
            if pair is not None:
                pairs.append(pair)
        return pairs

    def _parse(self, sample: dict[str, Any]) -> Query:
        record = sample["json"]
        fmt = self.hparams.coord_format_override or record["coord_format"]
        codec = self._codec(fmt, record.get("coord_options"))
        width, height = (int(v) for v in record["image_size"])
        region, crop = _region_and_crop(record, (width, height))
        texts = [str(t) for t in record["candidates"]]
        decoded = [codec.decode(t, (width, height)) for t in texts]
        image_data = sample["image_bytes"] if sample.get("image_ext") in ("jpg", "jpeg") else sample["image"]
        return Query(
            key=sample["__key__"], record=record, image=sample["image"], image_data=image_data, codec=codec,
            coord_format=fmt, image_size=(width, height), region=region, crop_box=crop, texts=texts,
            plains=[codec.strip(t) for t in texts], text_boxes=[[g.xyxy for g in d] for d in decoded],
            box_phrases=[[(g.phrase or codec.strip(t)).strip() for g in d] for t, d in zip(texts, decoded)],
            anno_boxes=[_box(o["box"]) for o in record.get("objects", [])],
        )  # fmt: skip

    def _codec(self, fmt: str, record_options: dict[str, Any] | None) -> Codec:
        options = {**(record_options or {}), **(self.hparams.coord_options or {})}
        key = (fmt, repr(sorted(options.items())))  # option values may be lists: not hashable
        if key not in self._codecs:
            self._codecs[key] = get_codec(fmt, **options)
        return self._codecs[key]

    def _ground(self, queries: list[Query]) -> None:
        """``B_ground`` per candidate: the grounder on the query's crop, once per distinct plain text of a query
        (``loc_mode: phrase``: once per distinct phrase; a candidate's ``B_ground`` is then its phrases' boxes).

        Backends with ``ground_batch`` get the crops of the whole batch in chunks of ``grounder_batch_size``.
        """
        if self.hparams.loc_mode == "phrase":
            captions = [{p for phrases in q.box_phrases for p in phrases} for q in queries]
        else:
            captions = [set(q.plains) for q in queries]
        jobs = sorted({(i, p) for i, caps in enumerate(captions) for p in caps if p.strip()})
        found: dict[tuple[int, str], list[Box]] = {}
        if self.grounder is not None and jobs:
            size = self.hparams.grounder_batch_size
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                results = self._ground_chunk([queries[i] for i, _ in chunk], [p for _, p in chunk])
                found.update(zip(chunk, results))
        for i, q in enumerate(queries):
            if self.hparams.loc_mode == "phrase":
                q.phrase_ground = {p: found.get((i, p), []) for p in captions[i]}
                q.ground_boxes = [[b for p in dict.fromkeys(ps) for b in q.phrase_ground[p]] for ps in q.box_phrases]
            else:
                q.ground_boxes = [found.get((i, p), []) for p in q.plains]

    def _ground_chunk(self, queries: list[Query], captions: list[str]) -> list[list[Box]]:
        thresholds = {"box_threshold": self.hparams.box_threshold, "text_threshold": self.hparams.text_threshold}
        if not hasattr(self.grounder, "ground_batch"):
            results = [ground_in_region(self.grounder, q.image, q.crop_box, c, **thresholds)
                       for q, c in zip(queries, captions)]  # fmt: skip
            return [[_box(b) for b in r.boxes.tolist()] for r in results]
        crops = [crop_image(q.image, q.crop_box) for q in queries]
        results = self.grounder.ground_batch([c for c, _ in crops], captions, **thresholds)
        return [
            [_box(b) for b in crop_to_image(r.boxes.float().cpu(), pixel_box).tolist()]
            for r, (_, pixel_box) in zip(results, crops)
        ]

    def _localization(self, queries: list[Query]) -> list[list[Any]]:
        """Algorithm 1 for every candidate of the batch in one batched kernel call; regrouped per query."""
        flat = localization_scores(
            [b for q in queries for b in q.text_boxes],
            [b for q in queries for b in q.ground_boxes],
            [q.anno_boxes for q in queries for _ in q.texts],
            iou_threshold=self.hparams.loc_iou_threshold,
            dedup_iou_threshold=self.hparams.dedup_iou_threshold,
            device=self.device,
            ground_in_pred=self.hparams.loc_mode != "algorithm1_gt",
        )
        if self.hparams.loc_mode == "phrase":
            flat = self._phrase_localization(queries, flat)
        out, start = [], 0
        for q in queries:
            out.append(flat[start : start + len(q.texts)])
            start += len(q.texts)
        return out

    def _phrase_localization(self, queries: list[Query], flat: list[Any]) -> list[Any]:
        """Replace each candidate's score by the phrase-matched one (Algorithm 1's ``B_gt`` stays for
        refinement); per-box scores go to ``Query.box_scores``."""
        keys = [(i, p) for i, q in enumerate(queries) for p in sorted(q.phrase_ground)]
        targets = dict(zip(keys, phrase_targets(
            [queries[i].phrase_ground[p] for i, p in keys], [queries[i].anno_boxes for i, _ in keys],
            snap_iou_threshold=self.hparams.dedup_iou_threshold, device=self.device,
        )))  # fmt: skip
        scored = phrase_localization_scores(
            [b for q in queries for b in q.text_boxes],
            [[targets[(i, p)] for p in ps] for i, q in enumerate(queries) for ps in q.box_phrases],
            iou_threshold=self.hparams.loc_iou_threshold, dedup_iou_threshold=self.hparams.dedup_iou_threshold,
            device=self.device,
        )  # fmt: skip
        start = 0
        for q in queries:
            q.box_scores = [per_box for _, per_box in scored[start : start + len(q.texts)]]
            start += len(q.texts)
        return [dataclasses.replace(result, score=score) for result, (score, _) in zip(flat, scored)]

    def _semantic(self, queries: list[Query]) -> list[list[dict[str, float]] | None]:
        """``S_sem`` per candidate. Each distinct plain text of a query is scored once, so candidates that
        differ only in their boxes get bit-identical semantic scores (a batched matmul need not give identical
        rows identical results) and an exact tie stays a tie."""
        if self.semantic_scorer is None:
            return [None] * len(queries)
        scored = [q for q in queries if q.texts]
        unique = [list(dict.fromkeys(q.plains)) for q in scored]
        results = iter(
            self.semantic_scorer.score(
                [q.image for q in scored], [q.region for q in scored], [q.crop_box for q in scored], unique
            )
        )
        out: list[list[dict[str, float]] | None] = []
        for q in queries:
            if not q.texts:
                out.append([])
                continue
            parts = {name: torch.as_tensor(v).float().cpu().tolist() for name, v in next(results).items()}
            position = {plain: j for j, plain in enumerate(dict.fromkeys(q.plains))}
            out.append([{name: values[position[p]] for name, values in parts.items()} for p in q.plains])
        return out

    def _pair(self, q: Query, loc: list[Any], sem: list[dict[str, float]] | None) -> dict[str, Any] | None:
        scores = []
        for k in range(len(q.texts)):
            entry = dict(sem[k]) if sem is not None else {"sem": None}
            entry["loc"] = loc[k].score
            if q.box_scores:
                entry["box_loc"] = q.box_scores[k]
            entry["total"] = combine_scores(entry["sem"], loc[k].score, self.hparams.lam)
            scores.append(entry)
        self.counts["queries"] += 1
        self.counts["candidates"] += len(scores)
        chosen_rejected = select_pair([s["total"] for s in scores], q.texts, self.hparams.min_score_gap)
        if chosen_rejected is None:
            self.counts["too_few" if len(set(q.texts)) < 2 else "ties"] += 1
            return None
        best, worst = chosen_rejected
        chosen, stats = q.texts[best], {}
        if self.hparams.refine:
            refined = refine_description(
                q.texts[best], q.codec, q.image_size, loc[best].gt_boxes, anno_boxes=q.anno_boxes, region=q.region,
                match_iou_threshold=self.hparams.loc_iou_threshold,
                dedup_iou_threshold=self.hparams.dedup_iou_threshold,
                keep_unmatched=self.hparams.refine_keep_unmatched,
            )  # fmt: skip
            chosen, stats = refined.text, refined.stats()
            if self.hparams.skip_emptied and q.text_boxes[best] and all(b is None for b in refined.boxes):
                self.counts["emptied"] += 1
                return None
        if chosen == q.texts[worst]:  # refinement made the best identical to the worst: nothing to learn
            self.counts["ties"] += 1
            return None
        self._count_pair(scores[best], scores[worst], stats)
        return {"__key__": q.key, "json": self._record(q, chosen, best, worst, scores, stats), "jpg": q.image_data}

    def _record(
        self, q: Query, chosen: str, best: int, worst: int, scores: list[dict], stats: dict[str, int]
    ) -> dict[str, Any]:
        def brief(s: dict[str, Any]) -> dict[str, Any]:
            return {"sem": s["sem"], "loc": s["loc"], "total": s["total"]}

        r = q.record
        return {
            "schema": SCHEMA_VERSION, "query_id": r["query_id"], "region_id": r.get("region_id"),
            "image_id": r["image_id"], "file_name": r.get("file_name"), "image_size": list(q.image_size),
            "region": list(q.region), "crop_box": list(q.crop_box), "prompt": r["prompt"],
            "chosen": chosen, "rejected": q.texts[worst], "chosen_raw": q.texts[best],
            "chosen_index": best, "rejected_index": worst,
            "scores": {"chosen": brief(scores[best]), "rejected": brief(scores[worst])},
            "all_scores": scores, "refine": stats, "lam": self.hparams.lam,
            "coord_format": q.coord_format, "source": r.get("model"),
        }  # fmt: skip

    def _count_pair(self, chosen: dict[str, Any], rejected: dict[str, Any], stats: dict[str, int]) -> None:
        c = self.counts
        c["pairs"] += 1
        for side, s in (("chosen", chosen), ("rejected", rejected)):
            c[f"{side}_total"] += s["total"]
            c[f"{side}_loc"] += s["loc"]
            c[f"{side}_sem"] += s["sem"] or 0.0
        for name, value in stats.items():
            c[name] += value

    # ------------------------------------------------------------------------------------------ run level
    def on_predict_start(self) -> None:
        self.counts = dict.fromkeys(_COUNTERS, 0.0)

    def on_predict_epoch_end(self) -> None:
        """Sum the counters over ranks (a collective: every rank gets here) and report on rank zero."""
        local = torch.tensor([self.counts[name] for name in _COUNTERS], dtype=torch.float64, device=self.device)
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        self.summary = summarize(dict(zip(_COUNTERS, total.cpu().tolist())), semantic=self.semantic_scorer is not None)
        if not self.trainer.is_global_zero:
            return
        message = format_summary(self.summary)
        log.info(message)
        if self.summary["skipped"]:
            log.warning("PreferenceBuilder: %d unreadable candidate samples were skipped (on_error=skip)",
                        self.summary["skipped"])
        print(message, flush=True)
        if self.trainer.logger is not None:
            self.trainer.logger.log_metrics({f"score/{k}": v for k, v in self.summary.items()})


def summarize(counts: dict[str, float], semantic: bool = True) -> dict[str, float]:
    """Run summary from summed counters: counts, and mean scores of the chosen and rejected sides."""
    pairs = max(counts["pairs"], 1.0)
    names = ("queries", "pairs", "ties", "too_few", "candidates", "skipped", "emptied")
    out = {name: counts.get(name, 0.0) for name in names}
    for side in ("chosen", "rejected"):
        out[f"{side}_total"] = counts[f"{side}_total"] / pairs
        out[f"{side}_loc"] = counts[f"{side}_loc"] / pairs
        if semantic:
            out[f"{side}_sem"] = counts[f"{side}_sem"] / pairs
    for name in ("snapped", "kept", "unmatched", "duplicates"):
        out[f"refine_{name}"] = counts[name]
    return out


def format_summary(summary: dict[str, float]) -> str:
    """One readable line per group for the log and the terminal."""
    summary = {"emptied": 0.0, **summary}  # summaries written before skip_emptied existed lack the count
    lines = [
        "PreferenceBuilder: {queries:.0f} queries ({candidates:.0f} candidates) -> {pairs:.0f} pairs; "
        "{ties:.0f} ties, {too_few:.0f} with fewer than two distinct candidates; "
        "{skipped:.0f} unreadable samples skipped".format(**summary),
        "  mean S   chosen {chosen_total:.4f}  rejected {rejected_total:.4f}".format(**summary),
        "  mean loc chosen {chosen_loc:.4f}  rejected {rejected_loc:.4f}".format(**summary),
    ]
    if "chosen_sem" in summary:
        lines.append("  mean sem chosen {chosen_sem:.4f}  rejected {rejected_sem:.4f}".format(**summary))
    lines.append(
        "  refinement: {refine_snapped:.0f} boxes snapped, {refine_kept:.0f} kept as written, "
        "{refine_unmatched:.0f} unmatched and {refine_duplicates:.0f} duplicates removed; {emptied:.0f} pairs "
        "dropped because refinement left the chosen answer without boxes".format(**summary)
    )
    return "\n".join(lines)
